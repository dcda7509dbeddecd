/* test_cudaemu_backend.c - the CUDA backend (worker/engine/cuda/backend.cu
 * with kernels.cu, attention.cu and device.cu), built for the CPU emulator
 * (tests/cuda_emu/), against the CPU backend: every op on random inputs
 * (upload, run, download), the bf16/fp16 products, registered weights, the
 * sticky error, allocation failure, device discovery, and whole-model
 * forward and training passes through llama_model_to_backend.
 *
 * Tolerances (max |cuda - cpu| <= tol * max |cpu| over each output):
 *   fp32, every op: 1e-5 (FP32_TOL): both compute in fp32 from the same
 *     inputs; only summation orders differ.
 *   bf16 / fp16 products vs the CPU product of the operands rounded to
 *     bf16 / fp16 on the host: 1e-5 (LOWP_EXACT_TOL): a product of two
 *     such operands is exact in fp32, so again only the order of the fp32
 *     sums differs.
 *   bf16 / fp16 products vs the fp32 product: 2e-2 / 4e-3 (BF16_TOL,
 *     FP16_TOL): each operand carries a relative rounding error up to 2^-9
 *     (bf16) / 2^-12 (fp16); over a dot product of random signs that stays
 *     well inside these.
 *   whole model, fp32: hidden states and logits 1e-5; loss 1e-5 and each
 *     parameter tensor's gradient 1e-5 (GRAD_TOL) relative to its largest
 *     element (measured 5e-7).
 *   whole model, bf16 with registered weights: hidden states and logits
 *     2e-2 (MODEL_BF16_TOL) of the fp32 result (measured 0.009).
 *   frozen weights (llama_model_to_backend_frozen): bitwise equal to the
 *     registered-copy path in bf16 and fp16 (the same conversion kernel
 *     makes the same copy), and to llama_model_to_backend in fp32. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <inttypes.h>

#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/backend.h"
#include "worker/engine/cuda/cuda.h"
#include "worker/engine/forward.h"
#include "worker/engine/model.h"
#include "worker/engine/model_backend.h"

#define FP32_TOL 1e-5
#define LOWP_EXACT_TOL 1e-5
#define BF16_TOL 2e-2
#define FP16_TOL 4e-3
#define GRAD_TOL 1e-5
#define MODEL_BF16_TOL 2e-2
/* The emulated device's memory (STRATA_EMU_MEMORY), set before the first
 * cudaMalloc. */
#define EMU_MEMORY ((size_t)256 << 20)

/* --- helpers ---------------------------------------------------------- */

/* splitmix64 (tu_rand_uniform) from this seed, so runs repeat exactly. */
static uint64_t rng_state = 0x5eed1234abcdULL;

static const backend *open_cuda(cuda_precision p) {
    char err[ERR_LEN] = "";
    const backend *be = cuda_backend_open(0, p, err, sizeof err);
    if (!be) fail_msg("cuda_backend_open: %s", err);
    assert_string_equal(be->name, "cuda");
    assert_false(be->host_memory);
    return be;
}

/* Closes the thread's context after checking no error is pending. */
static void close_cuda(void) {
    char err[ERR_LEN] = "";
    if (cuda_backend_sync(err, sizeof err) != 0) fail_msg("pending GPU error: %s", err);
    cuda_backend_close();
}

/* A device buffer holding bytes of host (NULL: uninitialised). */
static void *dev_from(const backend *be, const void *host, size_t bytes) {
    char err[ERR_LEN] = "";
    void *d = be->alloc(bytes, err, sizeof err);
    if (!d) fail_msg("alloc %zu: %s", bytes, err);
    if (host) be->upload(d, host, bytes);
    return d;
}

static float *dev_floats(const backend *be, const float *host, size_t n) {
    return dev_from(be, host, n * sizeof(float));
}

/* The device buffer's n floats in a new host array. */
static float *host_floats(const backend *be, const float *dev, size_t n) {
    float *h = malloc((n ? n : 1) * sizeof *h);
    assert_non_null(h);
    be->download(h, dev, n * sizeof *h);
    return h;
}

/* Asserts dev (n floats on the device) is within tol of want (host). */
static void expect_close(const backend *be, const float *dev, const float *want, size_t n,
                         double tol, const char *what) {
    float *got = host_floats(be, dev, n);
    double e = tu_rel_or_abs_err_ff(got, want, n, what);
    if (!(e <= tol)) fail_msg("%s: relative error %.3g over %.3g", what, e, tol);
    free(got);
}

/* bf16 rounding on the host, round to nearest even (finite inputs). */
static float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    u &= 0xFFFF0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* IEEE half rounding by the compiler's _Float16 (round to nearest even). */
static float round_fp16(float f) { return (float)(_Float16)f; }

static float *rounded(const float *x, size_t n, cuda_precision p) {
    float *y = tu_dup_floats(x, n);
    for (size_t i = 0; i < n; i++) y[i] = p == CUDA_FP16 ? round_fp16(x[i]) : round_bf16(x[i]);
    return y;
}

/* --- every op in fp32 ------------------------------------------------- */

static void test_ops_elementwise(void **state) {
    (void)state;
    const backend *cpu = backend_cpu(), *be = open_cuda(CUDA_FP32);
    size_t n = 1000;
    float *x = tu_rand_floats(&rng_state, n, 2.0f), *y = tu_rand_floats(&rng_state, n, 2.0f);
    float *dx = dev_floats(be, x, n), *dy = dev_floats(be, y, n), *dz = dev_floats(be, NULL, n);

    float *w = tu_dup_floats(x, n);
    cpu->scale(w, n, -0.75f);
    be->scale(dx, n, -0.75f);
    expect_close(be, dx, w, n, FP32_TOL, "scale");

    cpu->residual_add(w, y, n);
    be->residual_add(dx, dy, n);
    expect_close(be, dx, w, n, FP32_TOL, "residual_add");

    be->copy(dz, dx, n);
    expect_close(be, dz, w, n, 0.0, "copy");
    be->zero(dz, n - 1);
    float *z = host_floats(be, dz, n);
    for (size_t i = 0; i + 1 < n; i++) assert_true(z[i] == 0.0f);
    assert_true(z[n - 1] == w[n - 1]);
    free(z);

    /* swiglu and its backward (dgate aliasing dout, as forward.c calls it). */
    float *gate = tu_rand_floats(&rng_state, n, 4.0f), *up = tu_rand_floats(&rng_state, n, 2.0f);
    float *dout = tu_rand_floats(&rng_state, n, 1.0f);
    float *g_dev = dev_floats(be, gate, n), *u_dev = dev_floats(be, up, n);
    float *sw = tu_dup_floats(gate, n);
    cpu->swiglu(sw, up, n);
    be->swiglu(g_dev, u_dev, n);
    expect_close(be, g_dev, sw, n, FP32_TOL, "swiglu");
    be->upload(g_dev, gate, n * sizeof(float));
    float *dg = tu_dup_floats(dout, n), *du = malloc(n * sizeof *du);
    assert_non_null(du);
    cpu->swiglu_backward(dg, du, dg, gate, up, n);
    float *dg_dev = dev_floats(be, dout, n), *du_dev = dev_floats(be, NULL, n);
    be->swiglu_backward(dg_dev, du_dev, dg_dev, g_dev, u_dev, n);
    expect_close(be, dg_dev, dg, n, FP32_TOL, "swiglu_backward dgate");
    expect_close(be, du_dev, du, n, FP32_TOL, "swiglu_backward dup");

    /* dropout: a fresh output, then accumulating into one. */
    uint64_t key = 0x1234567887654321ULL, thr = (uint64_t)(0.3 * 0x1p53);
    float *dr = tu_rand_floats(&rng_state, n, 1.0f), *dr_dev = dev_floats(be, NULL, n);
    cpu->dropout(dr, x, n, key, thr, 1.0f / 0.7f, false);
    be->upload(dx, x, n * sizeof(float));
    be->dropout(dr_dev, dx, n, key, thr, 1.0f / 0.7f, false);
    expect_close(be, dr_dev, dr, n, 0.0, "dropout");
    cpu->dropout(dr, y, n, key ^ 1, thr, 2.0f, true);
    be->dropout(dr_dev, dy, n, key ^ 1, thr, 2.0f, true);
    expect_close(be, dr_dev, dr, n, FP32_TOL, "dropout accumulate");

    be->free_buf(dx);
    be->free_buf(dy);
    be->free_buf(dz);
    be->free_buf(g_dev);
    be->free_buf(u_dev);
    be->free_buf(dg_dev);
    be->free_buf(du_dev);
    be->free_buf(dr_dev);
    free(x), free(y), free(w), free(gate), free(up), free(dout), free(sw), free(dg), free(du),
        free(dr);
    close_cuda();
}

static void test_ops_matmul_fp32(void **state) {
    (void)state;
    const backend *cpu = backend_cpu(), *be = open_cuda(CUDA_FP32);
    size_t N = 13, in = 40, out = 24;
    float *x = tu_rand_floats(&rng_state, N * in, 1.0f);
    float *w = tu_rand_floats(&rng_state, out * in, 0.5f);
    float *y = tu_rand_floats(&rng_state, N * out, 1.0f);
    float *x_d = dev_floats(be, x, N * in), *w_d = dev_floats(be, w, out * in);
    float *y_d = dev_floats(be, y, N * out);

    for (int acc = 0; acc < 2; acc++) {
        float *want = tu_dup_floats(y, N * out);
        cpu->matmul(want, x, w, N, in, out, acc);
        be->upload(y_d, y, N * out * sizeof(float));
        be->matmul(y_d, x_d, w_d, N, in, out, acc);
        expect_close(be, y_d, want, N * out, FP32_TOL, acc ? "matmul +=" : "matmul");
        free(want);
    }

    float *dy = tu_rand_floats(&rng_state, N * out, 1.0f);
    float *dx0 = tu_rand_floats(&rng_state, N * in, 1.0f);
    float *dw0 = tu_rand_floats(&rng_state, out * in, 1.0f);
    float *dy_d = dev_floats(be, dy, N * out);
    float *dx_d = dev_floats(be, NULL, N * in), *dw_d = dev_floats(be, NULL, out * in);
    for (int acc = 0; acc < 2; acc++) {
        float *dx = tu_dup_floats(dx0, N * in), *dw = tu_dup_floats(dw0, out * in);
        cpu->matmul_backward(dx, dw, dy, x, w, N, in, out, acc);
        be->upload(dx_d, dx0, N * in * sizeof(float));
        be->upload(dw_d, dw0, out * in * sizeof(float));
        be->matmul_backward(dx_d, dw_d, dy_d, x_d, w_d, N, in, out, acc);
        expect_close(be, dx_d, dx, N * in, FP32_TOL, "matmul_backward dx");
        expect_close(be, dw_d, dw, out * in, FP32_TOL, "matmul_backward dw");
        free(dx), free(dw);
    }
    /* dx only and dw only. */
    float *dx = tu_dup_floats(dx0, N * in), *dw = tu_dup_floats(dw0, out * in);
    cpu->matmul_backward(NULL, dw, dy, x, w, N, in, out, false);
    cpu->matmul_backward(dx, NULL, dy, x, w, N, in, out, false);
    be->upload(dx_d, dx0, N * in * sizeof(float));
    be->upload(dw_d, dw0, out * in * sizeof(float));
    be->matmul_backward(NULL, dw_d, dy_d, x_d, w_d, N, in, out, false);
    be->matmul_backward(dx_d, NULL, dy_d, x_d, w_d, N, in, out, false);
    expect_close(be, dx_d, dx, N * in, FP32_TOL, "matmul_backward dx alone");
    expect_close(be, dw_d, dw, out * in, FP32_TOL, "matmul_backward dw alone");

    be->free_buf(x_d), be->free_buf(w_d), be->free_buf(y_d), be->free_buf(dy_d),
        be->free_buf(dx_d), be->free_buf(dw_d);
    free(x), free(w), free(y), free(dy), free(dx0), free(dw0), free(dx), free(dw);
    close_cuda();
}

static void test_ops_rows(void **state) {
    (void)state;
    const backend *cpu = backend_cpu(), *be = open_cuda(CUDA_FP32);
    size_t N = 11, C = 48, V = 37;
    float eps = 1e-6f;

    /* rmsnorm, in place and not; backward with and without dweight. */
    float *x = tu_rand_floats(&rng_state, N * C, 3.0f), *wt = tu_rand_floats(&rng_state, C, 1.0f);
    float *dout = tu_rand_floats(&rng_state, N * C, 1.0f);
    float *x_d = dev_floats(be, x, N * C), *wt_d = dev_floats(be, wt, C);
    float *o_d = dev_floats(be, NULL, N * C);
    float *want = malloc(N * C * sizeof *want);
    assert_non_null(want);
    cpu->rmsnorm(want, x, wt, N, C, eps);
    be->rmsnorm(o_d, x_d, wt_d, N, C, eps);
    expect_close(be, o_d, want, N * C, FP32_TOL, "rmsnorm");
    be->copy(o_d, x_d, N * C);
    be->rmsnorm(o_d, o_d, wt_d, N, C, eps);
    expect_close(be, o_d, want, N * C, FP32_TOL, "rmsnorm in place");

    float *dx = tu_rand_floats(&rng_state, N * C, 1.0f), *dwt = tu_rand_floats(&rng_state, C, 1.0f);
    float *dx_d = dev_floats(be, dx, N * C), *dwt_d = dev_floats(be, dwt, C);
    float *dout_d = dev_floats(be, dout, N * C);
    float *dx_w = tu_dup_floats(dx, N * C), *dwt_w = tu_dup_floats(dwt, C);
    cpu->rmsnorm_backward(dx_w, dwt_w, dout, x, wt, N, C, eps);
    be->rmsnorm_backward(dx_d, dwt_d, dout_d, x_d, wt_d, N, C, eps);
    expect_close(be, dx_d, dx_w, N * C, FP32_TOL, "rmsnorm_backward dx");
    expect_close(be, dwt_d, dwt_w, C, FP32_TOL, "rmsnorm_backward dweight");
    cpu->rmsnorm_backward(dx_w, NULL, dout, x, wt, N, C, eps);
    be->rmsnorm_backward(dx_d, NULL, dout_d, x_d, wt_d, N, C, eps);
    expect_close(be, dx_d, dx_w, N * C, FP32_TOL, "rmsnorm_backward frozen");

    /* embedding and its backward, tokens repeated. */
    int tokens[11] = {3, 0, 36, 3, 17, 17, 17, 5, 36, 1, 3};
    float *table = tu_rand_floats(&rng_state, V * C, 1.0f);
    float *dtable = tu_rand_floats(&rng_state, V * C, 1.0f);
    int *tok_d = dev_from(be, tokens, sizeof tokens);
    float *table_d = dev_floats(be, table, V * C), *dtable_d = dev_floats(be, dtable, V * C);
    cpu->embedding(want, tokens, table, N, C);
    be->embedding(o_d, tok_d, table_d, N, C);
    expect_close(be, o_d, want, N * C, 0.0, "embedding");
    cpu->embedding_backward(dtable, dout, tokens, N, C);
    be->embedding_backward(dtable_d, dout_d, tok_d, N, C);
    expect_close(be, dtable_d, dtable, V * C, FP32_TOL, "embedding_backward");

    /* cross-entropy: some rows unscored. */
    int targets[11] = {4, -1, 36, 0, 12, -1, 7, 7, 20, 35, 1};
    float *logits = tu_rand_floats(&rng_state, N * V, 6.0f);
    float *lg_d = dev_floats(be, logits, N * V);
    int *tg_d = dev_from(be, targets, sizeof targets);
    double *rl_d = dev_from(be, NULL, N * sizeof(double));
    double rl_want[11], rl_got[11];
    cpu->cross_entropy(logits, rl_want, targets, N, V, 0.125f);
    be->cross_entropy(lg_d, rl_d, tg_d, N, V, 0.125f);
    expect_close(be, lg_d, logits, N * V, FP32_TOL, "cross_entropy gradient");
    be->download(rl_got, rl_d, sizeof rl_got);
    for (size_t i = 0; i < N; i++) {
        if (targets[i] < 0) assert_true(rl_got[i] == 0.0);
        if (fabs(rl_got[i] - rl_want[i]) > 1e-6 * fabs(rl_want[i]) + 1e-12)
            fail_msg("cross_entropy row %zu: %.17g vs %.17g", i, rl_got[i], rl_want[i]);
    }

    be->free_buf(x_d), be->free_buf(wt_d), be->free_buf(o_d), be->free_buf(dx_d),
        be->free_buf(dwt_d), be->free_buf(dout_d), be->free_buf(tok_d), be->free_buf(table_d),
        be->free_buf(dtable_d), be->free_buf(lg_d), be->free_buf(tg_d), be->free_buf(rl_d);
    free(x), free(wt), free(dout), free(want), free(dx), free(dwt), free(dx_w), free(dwt_w),
        free(table), free(dtable), free(logits);
    close_cuda();
}

static void test_ops_rope(void **state) {
    (void)state;
    const backend *cpu = backend_cpu(), *be = open_cuda(CUDA_FP32);
    int npos = 20, HS = 16, nheads = 3;
    float theta = 10000.0f;
    size_t N = 9, width = (size_t)nheads * (size_t)HS, ncs = (size_t)npos * (size_t)HS;
    int pos[9] = {0, 1, 2, 19, 7, 7, 3, 12, 5};

    float *cs = malloc(ncs * sizeof *cs);
    assert_non_null(cs);
    cpu->rope_table(cs, npos, HS, theta);
    float *cs_d = dev_floats(be, NULL, ncs);
    be->rope_table(cs_d, npos, HS, theta);
    expect_close(be, cs_d, cs, ncs, 0.0, "rope_table");

    float *x = tu_rand_floats(&rng_state, N * width, 1.0f), *x_d = dev_floats(be, x, N * width);
    int *pos_d = dev_from(be, pos, sizeof pos);
    float *want = tu_dup_floats(x, N * width);
    cpu->rope_cached(want, pos, N, nheads, HS, cs);
    be->rope_cached(x_d, pos_d, N, nheads, HS, cs_d);
    expect_close(be, x_d, want, N * width, FP32_TOL, "rope_cached");
    cpu->rope_backward_cached(want, pos, N, nheads, HS, cs);
    be->rope_backward_cached(x_d, pos_d, N, nheads, HS, cs_d);
    expect_close(be, x_d, want, N * width, FP32_TOL, "rope_backward_cached");
    /* The inverse rotation brings x back. */
    expect_close(be, x_d, x, N * width, FP32_TOL, "rope round trip");

    cpu->rope(want, pos, N, nheads, HS, theta);
    be->rope(x_d, pos_d, N, nheads, HS, theta);
    expect_close(be, x_d, want, N * width, FP32_TOL, "rope");

    be->free_buf(cs_d), be->free_buf(x_d), be->free_buf(pos_d);
    free(cs), free(x), free(want);
    close_cuda();
}

static void test_ops_attention(void **state) {
    (void)state;
    const backend *cpu = backend_cpu(), *be = open_cuda(CUDA_FP32);
    int B = 3, T = 37, NH = 4, NKV = 2, HS = 8;
    int lengths[3] = {37, 5, 20};
    size_t nq = (size_t)B * T * NH * HS, nkv = (size_t)B * T * NKV * HS, tt = (size_t)T * T;
    float *q = tu_rand_floats(&rng_state, nq, 1.5f), *k = tu_rand_floats(&rng_state, nkv, 1.5f);
    float *v = tu_rand_floats(&rng_state, nkv, 1.0f);
    float *dout = tu_rand_floats(&rng_state, nq, 1.0f);
    /* Padding rows carry no gradient in training (backend.h). */
    for (int b = 0; b < B; b++)
        for (int t = lengths[b]; t < T; t++)
            memset(dout + ((size_t)b * T + t) * NH * HS, 0, (size_t)NH * HS * sizeof(float));
    float *scratch = malloc(2 * tt * sizeof *scratch), *out = malloc(nq * sizeof *out);
    assert_non_null(scratch);
    assert_non_null(out);
    float *q_d = dev_floats(be, q, nq), *k_d = dev_floats(be, k, nkv);
    float *v_d = dev_floats(be, v, nkv);
    float *o_d = dev_floats(be, NULL, nq), *s_d = dev_floats(be, NULL, 2 * tt);
    float *dout_d = dev_floats(be, dout, nq);
    int *len_d = dev_from(be, lengths, sizeof lengths);

    cpu->attention(out, q, k, v, lengths, B, T, NH, NKV, HS, scratch);
    be->attention(o_d, q_d, k_d, v_d, len_d, B, T, NH, NKV, HS, s_d);
    expect_close(be, o_d, out, nq, FP32_TOL, "attention");

    float *dq = tu_rand_floats(&rng_state, nq, 1.0f), *dk = tu_rand_floats(&rng_state, nkv, 1.0f);
    float *dv = tu_rand_floats(&rng_state, nkv, 1.0f);
    float *dq_d = dev_floats(be, dq, nq), *dk_d = dev_floats(be, dk, nkv),
          *dv_d = dev_floats(be, dv, nkv);
    cpu->attention_backward(dq, dk, dv, dout, q, k, v, lengths, B, T, NH, NKV, HS, scratch);
    be->attention_backward(dq_d, dk_d, dv_d, dout_d, q_d, k_d, v_d, len_d, B, T, NH, NKV, HS,
                           s_d);
    /* Rows past a length are skipped by both: compare only real rows of dq. */
    float *dq_got = host_floats(be, dq_d, nq);
    for (int b = 0; b < B; b++) {
        size_t off = (size_t)b * T * NH * HS, n = (size_t)lengths[b] * NH * HS;
        double e = tu_rel_or_abs_err_ff(dq_got + off, dq + off, n, "attention_backward dq");
        if (!(e <= FP32_TOL)) fail_msg("attention_backward dq, sequence %d: %.3g", b, e);
    }
    expect_close(be, dk_d, dk, nkv, FP32_TOL, "attention_backward dk");
    expect_close(be, dv_d, dv, nkv, FP32_TOL, "attention_backward dv");

    be->free_buf(q_d), be->free_buf(k_d), be->free_buf(v_d), be->free_buf(o_d),
        be->free_buf(s_d), be->free_buf(dout_d), be->free_buf(len_d), be->free_buf(dq_d),
        be->free_buf(dk_d), be->free_buf(dv_d);
    free(q), free(k), free(v), free(dout), free(scratch), free(out), free(dq), free(dk),
        free(dv), free(dq_got);
    close_cuda();
}

/* --- bf16 / fp16 products --------------------------------------------- */

/* matmul and matmul_backward in precision p against the CPU on rounded
 * operands (tight) and on the fp32 ones (loose). */
static void check_lowp(cuda_precision p, double loose) {
    const backend *cpu = backend_cpu(), *be = open_cuda(p);
    size_t N = 10, in = 64, out = 20;
    float *x = tu_rand_floats(&rng_state, N * in, 1.0f);
    float *w = tu_rand_floats(&rng_state, out * in, 0.5f);
    float *dy = tu_rand_floats(&rng_state, N * out, 1.0f);
    float *dw0 = tu_rand_floats(&rng_state, out * in, 0.1f);
    float *xr = rounded(x, N * in, p), *wr = rounded(w, out * in, p);
    float *dyr = rounded(dy, N * out, p);
    float *x_d = dev_floats(be, x, N * in), *w_d = dev_floats(be, w, out * in);
    float *y_d = dev_floats(be, NULL, N * out), *dy_d = dev_floats(be, dy, N * out);
    float *dx_d = dev_floats(be, NULL, N * in), *dw_d = dev_floats(be, dw0, out * in);
    const char *name = cuda_precision_name(p);
    char what[64];

    float *exact = malloc(N * out * sizeof *exact), *full = malloc(N * out * sizeof *full);
    assert_non_null(exact);
    assert_non_null(full);
    cpu->matmul(exact, xr, wr, N, in, out, false);
    cpu->matmul(full, x, w, N, in, out, false);
    be->matmul(y_d, x_d, w_d, N, in, out, false);
    snprintf(what, sizeof what, "%s matmul vs rounded operands", name);
    expect_close(be, y_d, exact, N * out, LOWP_EXACT_TOL, what);
    snprintf(what, sizeof what, "%s matmul vs fp32", name);
    expect_close(be, y_d, full, N * out, loose, what);

    float *dx_e = malloc(N * in * sizeof *dx_e), *dw_e = tu_dup_floats(dw0, out * in);
    assert_non_null(dx_e);
    cpu->matmul_backward(dx_e, dw_e, dyr, xr, wr, N, in, out, false);
    be->matmul_backward(dx_d, dw_d, dy_d, x_d, w_d, N, in, out, false);
    snprintf(what, sizeof what, "%s matmul_backward dx vs rounded", name);
    expect_close(be, dx_d, dx_e, N * in, LOWP_EXACT_TOL, what);
    snprintf(what, sizeof what, "%s matmul_backward dw vs rounded", name);
    expect_close(be, dw_d, dw_e, out * in, LOWP_EXACT_TOL, what);
    float *dx_f = malloc(N * in * sizeof *dx_f);
    assert_non_null(dx_f);
    cpu->matmul_backward(dx_f, NULL, dy, x, w, N, in, out, false);
    snprintf(what, sizeof what, "%s matmul_backward dx vs fp32", name);
    expect_close(be, dx_d, dx_f, N * in, loose, what);

    /* The same products, with W's low-precision copy registered: equal
     * bit for bit (the same rounding, made once). */
    char err[ERR_LEN] = "";
    float *y_unreg = host_floats(be, y_d, N * out), *dx_unreg = host_floats(be, dx_d, N * in);
    if (cuda_backend_register_weights(w_d, out * in, err, sizeof err) != 0)
        fail_msg("register: %s", err);
    be->matmul(y_d, x_d, w_d, N, in, out, false);
    be->matmul_backward(dx_d, NULL, dy_d, x_d, w_d, N, in, out, false);
    snprintf(what, sizeof what, "%s registered matmul", name);
    expect_close(be, y_d, y_unreg, N * out, 0.0, what);
    snprintf(what, sizeof what, "%s registered matmul_backward", name);
    expect_close(be, dx_d, dx_unreg, N * in, 0.0, what);

    /* A slice of the registered range (one layer of a stacked tensor) is
     * read from the copy at the same offset. */
    size_t rows = 8, off = 6 * in;
    float *part = malloc(N * rows * sizeof *part);
    assert_non_null(part);
    cpu->matmul(part, xr, wr + off, N, in, rows, false);
    be->matmul(y_d, x_d, w_d + off, N, in, rows, false);
    snprintf(what, sizeof what, "%s registered slice", name);
    expect_close(be, y_d, part, N * rows, LOWP_EXACT_TOL, what);

    /* New weights: the copy is stale until registered again. */
    float *w2 = tu_rand_floats(&rng_state, out * in, 0.5f), *w2r = rounded(w2, out * in, p);
    be->upload(w_d, w2, out * in * sizeof(float));
    be->matmul(y_d, x_d, w_d, N, in, out, false);
    snprintf(what, sizeof what, "%s stale registered copy", name);
    expect_close(be, y_d, exact, N * out, LOWP_EXACT_TOL, what);
    if (cuda_backend_register_weights(w_d, out * in, err, sizeof err) != 0)
        fail_msg("register again: %s", err);
    cpu->matmul(exact, xr, w2r, N, in, out, false);
    be->matmul(y_d, x_d, w_d, N, in, out, false);
    snprintf(what, sizeof what, "%s refreshed registered copy", name);
    expect_close(be, y_d, exact, N * out, LOWP_EXACT_TOL, what);
    /* Forgotten: converted on the fly, same values. */
    cuda_backend_forget_weights(w_d);
    be->matmul(y_d, x_d, w_d, N, in, out, true);
    for (size_t i = 0; i < N * out; i++) exact[i] *= 2.0f;
    snprintf(what, sizeof what, "%s forgotten, accumulated", name);
    expect_close(be, y_d, exact, N * out, LOWP_EXACT_TOL, what);

    be->free_buf(x_d), be->free_buf(w_d), be->free_buf(y_d), be->free_buf(dy_d),
        be->free_buf(dx_d), be->free_buf(dw_d);
    free(x), free(w), free(dy), free(dw0), free(xr), free(wr), free(dyr), free(exact),
        free(full), free(dx_e), free(dw_e), free(dx_f), free(y_unreg), free(dx_unreg),
        free(part), free(w2), free(w2r);
    close_cuda();
}

static void test_bf16_products(void **state) {
    (void)state;
    check_lowp(CUDA_BF16, BF16_TOL);
}

static void test_fp16_products(void **state) {
    (void)state;
    check_lowp(CUDA_FP16, FP16_TOL);
}

/* Reopening with another precision switches the products of the same
 * context; registered copies follow the new precision. */
static void test_precision_switch(void **state) {
    (void)state;
    const backend *cpu = backend_cpu(), *be = open_cuda(CUDA_BF16);
    size_t N = 4, in = 32, out = 8;
    float *x = tu_rand_floats(&rng_state, N * in, 1.0f);
    float *w = tu_rand_floats(&rng_state, out * in, 1.0f);
    float *x_d = dev_floats(be, x, N * in), *w_d = dev_floats(be, w, out * in);
    float *y_d = dev_floats(be, NULL, N * out);
    char err[ERR_LEN] = "";
    if (cuda_backend_register_weights(w_d, out * in, err, sizeof err) != 0)
        fail_msg("register: %s", err);
    float *want = malloc(N * out * sizeof *want);
    assert_non_null(want);

    assert_ptr_equal(cuda_backend_open(0, CUDA_FP16, err, sizeof err), be);
    float *xr = rounded(x, N * in, CUDA_FP16), *wr = rounded(w, out * in, CUDA_FP16);
    cpu->matmul(want, xr, wr, N, in, out, false);
    be->matmul(y_d, x_d, w_d, N, in, out, false);
    expect_close(be, y_d, want, N * out, LOWP_EXACT_TOL, "switched to fp16");

    assert_ptr_equal(cuda_backend_open(0, CUDA_FP32, err, sizeof err), be);
    cpu->matmul(want, x, w, N, in, out, false);
    be->matmul(y_d, x_d, w_d, N, in, out, false);
    expect_close(be, y_d, want, N * out, FP32_TOL, "switched to fp32");

    /* Another device while this one is open is refused. */
    assert_null(cuda_backend_open(1, CUDA_FP32, err, sizeof err));
    assert_non_null(strstr(err, "close"));

    be->free_buf(x_d), be->free_buf(w_d), be->free_buf(y_d);
    free(x), free(w), free(want), free(xr), free(wr);
    close_cuda();
}

/* --- failures --------------------------------------------------------- */

static void test_sticky_error(void **state) {
    (void)state;
    const backend *be = open_cuda(CUDA_FP32);
    /* Head size 258 is past what the attention kernels take. */
    int B = 1, T = 2, NH = 1, HS = 258, lengths[1] = {2};
    size_t n = (size_t)B * T * NH * HS;
    float *ones = malloc(n * sizeof *ones);
    assert_non_null(ones);
    for (size_t i = 0; i < n; i++) ones[i] = 1.0f;
    float *q = dev_floats(be, ones, n), *o = dev_floats(be, ones, n);
    float *s = dev_floats(be, NULL, 2 * (size_t)T * T);
    int *len = dev_from(be, lengths, sizeof lengths);
    be->attention(o, q, q, q, len, B, T, NH, NH, HS, s);
    /* Later ops do nothing; downloads give all-ones bytes (NaN). */
    be->scale(q, n, 2.0f);
    float got[4];
    be->download(got, q, sizeof got);
    assert_true(isnan(got[0]) && isnan(got[3]));

    char err[ERR_LEN] = "";
    assert_int_equal(cuda_backend_sync(err, sizeof err), -1);
    assert_non_null(strstr(err, "attention"));
    /* Reported once; the context works again, and the scale never ran. */
    assert_int_equal(cuda_backend_sync(err, sizeof err), 0);
    be->download(got, q, sizeof got);
    assert_true(got[0] == 1.0f && got[3] == 1.0f);
    be->scale(q, n, 2.0f);
    be->download(got, q, sizeof got);
    assert_true(got[0] == 2.0f);

    be->free_buf(q), be->free_buf(o), be->free_buf(s), be->free_buf(len);
    free(ones);
    close_cuda();
}

static void test_alloc_failure(void **state) {
    (void)state;
    const backend *be = open_cuda(CUDA_BF16);
    char err[ERR_LEN] = "";
    size_t free_b = 0, total_b = 0;
    assert_int_equal(cuda_backend_memory(&free_b, &total_b, err, sizeof err), 0);
    assert_true(total_b == EMU_MEMORY);
    assert_true(free_b <= total_b);
    assert_null(be->alloc(total_b + 1, err, sizeof err));
    assert_non_null(strstr(err, "out of GPU memory allocating"));
    assert_non_null(strstr(err, "GiB free of 0.25 GiB"));
    /* A weight buffer of 4/5 of the free memory leaves too little for its
     * bf16 copy (2/5): registration fails cleanly, nothing is pending. */
    size_t n = free_b / 5;
    float *big = be->alloc(n * sizeof(float), err, sizeof err);
    if (!big) fail_msg("alloc of %zu floats: %s", n, err);
    assert_int_equal(cuda_backend_register_weights(big, n, err, sizeof err), -1);
    assert_non_null(strstr(err, "out of GPU memory for a bf16 copy"));
    be->free_buf(big);
    assert_int_equal(cuda_backend_memory(&n, &total_b, err, sizeof err), 0);
    assert_int_equal(n, free_b);
    /* Nothing is pending: allocation failures are returned, not sticky. */
    assert_int_equal(cuda_backend_sync(err, sizeof err), 0);
    close_cuda();
}

/* An op on a thread that never opened a context aborts (in a child). */
static void test_no_context_aborts(void **state) {
    (void)state;
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        const backend *be = open_cuda(CUDA_FP32);
        cuda_backend_close();
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) dup2(devnull, 2);
        be->zero(NULL, 1);
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGABRT);
}

static void test_devices(void **state) {
    (void)state;
    cuda_device_info devs[CUDA_MAX_DEVICES];
    char why[256] = "";
    int n = cuda_devices(devs, CUDA_MAX_DEVICES, why, sizeof why);
    assert_true(n >= 1);
    assert_int_equal(devs[0].index, 0);
    assert_true(devs[0].name[0] != '\0');
    assert_true(fabs(devs[0].memory_gb - 0.25) < 1e-9);
    assert_true(devs[0].major >= 8);
    /* Cached: the same answer again; max bounds what is written. */
    cuda_device_info one[1];
    assert_int_equal(cuda_devices(one, 1, why, sizeof why), 1);
    assert_string_equal(one[0].name, devs[0].name);
    assert_int_equal(cuda_devices(NULL, 0, why, sizeof why), 0);

    setenv("STRATA_GPUS", "none", 1);
    assert_int_equal(cuda_devices(devs, CUDA_MAX_DEVICES, why, sizeof why), 0);
    assert_non_null(strstr(why, "STRATA_GPUS=none"));
    unsetenv("STRATA_GPUS");
    assert_int_equal(cuda_devices(devs, CUDA_MAX_DEVICES, why, sizeof why), n);

    char err[ERR_LEN] = "";
    assert_null(cuda_backend_open(n, CUDA_FP32, err, sizeof err));
    assert_non_null(strstr(err, "does not exist"));
    assert_null(cuda_backend_open(-1, CUDA_FP32, err, sizeof err));

    cuda_precision p;
    assert_int_equal(cuda_precision_parse("bf16", &p, err, sizeof err), 0);
    assert_int_equal(p, CUDA_BF16);
    assert_string_equal(cuda_precision_name(CUDA_FP16), "fp16");
    assert_int_equal(cuda_precision_parse("tf32", &p, err, sizeof err), -1);
    assert_non_null(strstr(err, "fp32, bf16, fp16"));
}

/* --- whole model ------------------------------------------------------ */

/* A random model small enough for the emulator: GQA, tied or not. */
static void make_model(llama_model *m, bool tied) {
    llama_config cfg = {
        .hidden_size = 32,
        .intermediate_size = 48,
        .num_hidden_layers = 2,
        .num_attention_heads = 4,
        .num_key_value_heads = 2,
        .vocab_size = 41,
        .max_position_embeddings = 64,
        .rms_norm_eps = 1e-5f,
        .rope_theta = 10000.0f,
        .tie_word_embeddings = tied,
        .bos_token_id = 1,
        .eos_token_id = 2,
        .pad_token_id = -1,
    };
    char err[ERR_LEN] = "";
    if (llama_alloc(m, &cfg, err, sizeof err) != 0) fail_msg("llama_alloc: %s", err);
    for (size_t i = 0; i < m->nparams; i++) m->params[i] = 0.2f * tu_rand_uniform(&rng_state);
    size_t C = (size_t)cfg.hidden_size, L = (size_t)cfg.num_hidden_layers;
    /* Norm weights near one, as trained models have them. */
    for (size_t i = 0; i < L * C; i++) {
        m->w.attn_norm[i] = 1.0f + 0.1f * tu_rand_uniform(&rng_state);
        m->w.mlp_norm[i] = 1.0f + 0.1f * tu_rand_uniform(&rng_state);
    }
    for (size_t i = 0; i < C; i++) m->w.final_norm[i] = 1.0f + 0.1f * tu_rand_uniform(&rng_state);
    if (tied) assert_ptr_equal(m->w.lm_head, m->w.embed);
}

enum { MB = 2, MT = 7 };
static const int model_lengths[MB] = {7, 4};

static void model_tokens(int *tokens, int V) {
    for (int i = 0; i < MB * MT; i++) tokens[i] = (int)((unsigned)(i * 7 + 3) % (unsigned)V);
    tokens[MT + 5] = -1; /* padding may hold anything */
}

/* Collects every hidden state (L + 1 of (B, T, C)) into a flat array. */
typedef struct {
    float *states;
    size_t per_layer;
    int calls;
} hidden_sink;

static int sink_hook(void *user, int layer, const float *x, int B, int T, int C, char *err,
                     size_t errlen) {
    (void)err;
    (void)errlen;
    hidden_sink *s = user;
    assert_int_equal((size_t)B * T * C, s->per_layer);
    memcpy(s->states + (size_t)layer * s->per_layer, x, s->per_layer * sizeof(float));
    s->calls++;
    return 0;
}

/* The forward on be (model already placed there) into hidden and logits. */
static void run_forward(const backend *be, const llama_model *m, hidden_sink *sink,
                        float *logits) {
    llama_state s;
    char err[ERR_LEN] = "";
    int tokens[MB * MT];
    model_tokens(tokens, m->cfg.vocab_size);
    if (llama_state_init(&s, be, &m->cfg, MB, MT, err, sizeof err) != 0)
        fail_msg("llama_state_init on %s: %s", be->name, err);
    sink->calls = 0;
    if (llama_forward(be, m, &s, tokens, model_lengths, MB, MT, sink_hook, sink, logits, err,
                      sizeof err) != 0)
        fail_msg("llama_forward on %s: %s", be->name, err);
    assert_int_equal(sink->calls, m->cfg.num_hidden_layers + 1);
    llama_state_free(&s);
}

/* Real positions only: padding rows are computed but not compared. */
static double rel_err_real(const float *got, const float *want, size_t width) {
    double num = 0.0, den = 0.0;
    for (int b = 0; b < MB; b++)
        for (int t = 0; t < model_lengths[b]; t++)
            for (size_t j = 0; j < width; j++) {
                size_t i = ((size_t)b * MT + (size_t)t) * width + j;
                if (!isfinite(got[i])) fail_msg("non-finite value at %zu", i);
                double d = fabs((double)got[i] - (double)want[i]);
                if (d > num) num = d;
                if (fabs((double)want[i]) > den) den = fabs((double)want[i]);
            }
    return den > 0.0 ? num / den : num;
}

static void check_forward(bool tied) {
    llama_model host;
    make_model(&host, tied);
    int L = host.cfg.num_hidden_layers, V = host.cfg.vocab_size;
    size_t per = (size_t)MB * MT * host.cfg.hidden_size, nlog = (size_t)MB * MT * V;
    float *h_cpu = calloc((size_t)(L + 1) * per, sizeof(float));
    float *h_gpu = calloc((size_t)(L + 1) * per, sizeof(float));
    float *lg_cpu = calloc(nlog, sizeof(float)), *lg_gpu = calloc(nlog, sizeof(float));
    assert_true(h_cpu && h_gpu && lg_cpu && lg_gpu);
    hidden_sink sc = {h_cpu, per, 0}, sg = {h_gpu, per, 0};
    run_forward(backend_cpu(), &host, &sc, lg_cpu);

    const backend *be = open_cuda(CUDA_FP32);
    llama_model dev;
    char err[ERR_LEN] = "";
    if (llama_model_to_backend(be, &host, &dev, err, sizeof err) != 0)
        fail_msg("llama_model_to_backend: %s", err);
    assert_true(dev.params != host.params);
    assert_int_equal(dev.nparams, host.nparams);
    assert_true(dev.w.wk - dev.params == host.w.wk - host.params);
    assert_int_equal(dev.w.lm_head == dev.w.embed, tied);

    run_forward(be, &dev, &sg, lg_gpu);
    for (int l = 0; l <= L; l++) {
        double e = rel_err_real(h_gpu + (size_t)l * per, h_cpu + (size_t)l * per,
                                (size_t)host.cfg.hidden_size);
        if (!(e <= FP32_TOL)) fail_msg("fp32 hidden state %d: %.3g", l, e);
    }
    double e = rel_err_real(lg_gpu, lg_cpu, (size_t)V);
    if (!(e <= FP32_TOL)) fail_msg("fp32 logits: %.3g", e);

    /* bf16 with every weight read from its registered copy. */
    assert_ptr_equal(cuda_backend_open(0, CUDA_BF16, err, sizeof err), be);
    if (cuda_backend_register_weights(dev.params, dev.nparams, err, sizeof err) != 0)
        fail_msg("register: %s", err);
    run_forward(be, &dev, &sg, lg_gpu);
    double worst = 0.0;
    for (int l = 0; l <= L; l++) {
        e = rel_err_real(h_gpu + (size_t)l * per, h_cpu + (size_t)l * per,
                         (size_t)host.cfg.hidden_size);
        if (e > worst) worst = e;
    }
    e = rel_err_real(lg_gpu, lg_cpu, (size_t)V);
    if (e > worst) worst = e;
    print_message("bf16 forward (%s head): worst relative error %.3g vs fp32 (tolerance %g)\n",
                  tied ? "tied" : "untied", worst, MODEL_BF16_TOL);
    if (!(worst <= MODEL_BF16_TOL)) fail_msg("bf16 forward: %.3g", worst);
    /* ... and not equal to fp32: the products really were rounded. */
    assert_true(worst > 1e-6);

    llama_model_free_backend(be, &dev);
    assert_null(dev.params);
    free(h_cpu), free(h_gpu), free(lg_cpu), free(lg_gpu);
    llama_free(&host);
    close_cuda();
}

static void test_forward_untied(void **state) {
    (void)state;
    check_forward(false);
}

static void test_forward_tied(void **state) {
    (void)state;
    check_forward(true);
}

/* The CPU backend shares the host model's weights. */
static void test_model_to_cpu_shares(void **state) {
    (void)state;
    llama_model host, dev;
    make_model(&host, false);
    char err[ERR_LEN] = "";
    assert_int_equal(llama_model_to_backend(backend_cpu(), &host, &dev, err, sizeof err), 0);
    assert_ptr_equal(dev.params, host.params);
    assert_ptr_equal(dev.w.w_down, host.w.w_down);
    llama_model_free_backend(backend_cpu(), &dev);
    /* host still owns its weights. */
    host.params[0] = 1.0f;
    llama_model bad = host;
    bad.w.wq = host.params + host.nparams; /* one past the end */
    assert_int_equal(llama_model_to_backend(backend_cpu(), &bad, &dev, err, sizeof err), -1);
    assert_non_null(strstr(err, "outside"));
    llama_free(&host);
}

static void check_loss_and_grad(bool tied) {
    llama_model host;
    make_model(&host, tied);
    int V = host.cfg.vocab_size;
    int tokens[MB * MT], labels[MB * MT];
    model_tokens(tokens, V);
    for (int b = 0; b < MB; b++)
        for (int t = 0; t < MT; t++) {
            int i = b * MT + t;
            /* The first two tokens are a prompt; padding is not scored. */
            labels[i] = t < 2 || t >= model_lengths[b] ? LLAMA_IGNORE_INDEX : tokens[i];
        }
    char err[ERR_LEN] = "";
    size_t np = host.nparams;
    float *g_cpu = calloc(np, sizeof(float));
    assert_non_null(g_cpu);
    llama_state s;
    double loss_cpu = 0.0, loss_gpu = 0.0;
    long n_cpu = 0, n_gpu = 0;
    if (llama_state_init_train(&s, backend_cpu(), &host.cfg, MB, MT, err, sizeof err) != 0)
        fail_msg("state: %s", err);
    if (llama_loss_and_grad(backend_cpu(), &host, &s, tokens, labels, model_lengths, MB, MT,
                            0.25, g_cpu, &loss_cpu, &n_cpu, err, sizeof err) != 0)
        fail_msg("cpu loss_and_grad: %s", err);
    llama_state_free(&s);

    const backend *be = open_cuda(CUDA_FP32);
    llama_model dev;
    if (llama_model_to_backend(be, &host, &dev, err, sizeof err) != 0)
        fail_msg("to backend: %s", err);
    float *zeros = calloc(np, sizeof(float));
    assert_non_null(zeros);
    float *g_dev = dev_floats(be, zeros, np);
    if (llama_state_init_train(&s, be, &host.cfg, MB, MT, err, sizeof err) != 0)
        fail_msg("cuda state: %s", err);
    if (llama_loss_and_grad(be, &dev, &s, tokens, labels, model_lengths, MB, MT, 0.25, g_dev,
                            &loss_gpu, &n_gpu, err, sizeof err) != 0)
        fail_msg("cuda loss_and_grad: %s", err);
    if (cuda_backend_sync(err, sizeof err) != 0) fail_msg("sync: %s", err);
    assert_int_equal(n_gpu, n_cpu);
    assert_true(n_cpu > 0);
    if (!(fabs(loss_gpu - loss_cpu) <= FP32_TOL * fabs(loss_cpu)))
        fail_msg("loss %.9g vs %.9g", loss_gpu, loss_cpu);

    float *g_got = host_floats(be, g_dev, np);
    /* Tensor by tensor, each relative to its own largest gradient. */
    double worst = 0.0;
    const float *starts[] = {host.w.embed,  host.w.attn_norm, host.w.wq,       host.w.wk,
                             host.w.wv,     host.w.wo,        host.w.mlp_norm, host.w.w_gate,
                             host.w.w_up,   host.w.w_down,    host.w.final_norm};
    size_t nt = sizeof starts / sizeof starts[0];
    for (size_t i = 0; i < nt; i++) {
        size_t a = (size_t)(starts[i] - host.params);
        size_t b = i + 1 < nt ? (size_t)(starts[i + 1] - host.params) : np;
        if (!tied && i + 1 == nt) b = (size_t)(host.w.lm_head - host.params);
        double e = tu_rel_or_abs_err_ff(g_got + a, g_cpu + a, b - a, "gradient");
        if (!(e <= GRAD_TOL)) fail_msg("gradient of tensor %zu: %.3g", i, e);
        if (e > worst) worst = e;
    }
    if (!tied) {
        size_t a = (size_t)(host.w.lm_head - host.params);
        double e = tu_rel_or_abs_err_ff(g_got + a, g_cpu + a, np - a, "lm_head gradient");
        if (!(e <= GRAD_TOL)) fail_msg("lm_head gradient: %.3g", e);
        if (e > worst) worst = e;
    }
    print_message("fp32 training (%s head): loss %.9g vs %.9g, worst gradient error %.3g "
                  "(tolerance %g)\n", tied ? "tied" : "untied", loss_gpu, loss_cpu, worst,
                  GRAD_TOL);

    llama_state_free(&s);
    be->free_buf(g_dev);
    llama_model_free_backend(be, &dev);
    free(g_cpu), free(zeros), free(g_got);
    llama_free(&host);
    close_cuda();
}

static void test_loss_and_grad_untied(void **state) {
    (void)state;
    check_loss_and_grad(false);
}

static void test_loss_and_grad_tied(void **state) {
    (void)state;
    check_loss_and_grad(true);
}

/* --- frozen weights --------------------------------------------------- */

/* Floats of the fp32 part of a frozen placement of m (embed and norms). */
static size_t frozen_fp32_count(const llama_model *m) {
    size_t C = (size_t)m->cfg.hidden_size, L = (size_t)m->cfg.num_hidden_layers;
    return (size_t)m->cfg.vocab_size * C + 2 * L * C + C;
}

/* Device bytes free on the thread's device. */
static size_t free_bytes(void) {
    size_t f = 0, t = 0;
    char err[ERR_LEN] = "";
    if (cuda_backend_memory(&f, &t, err, sizeof err) != 0) fail_msg("memory: %s", err);
    return f;
}

/* Forward of host on precision p two ways: llama_model_to_backend with
 * every weight registered, and llama_model_to_backend_frozen; hidden states
 * and logits must agree bit for bit, and freeing must return all memory. */
static void check_frozen_forward(cuda_precision p, bool tied) {
    llama_model host;
    make_model(&host, tied);
    int L = host.cfg.num_hidden_layers, V = host.cfg.vocab_size;
    size_t per = (size_t)MB * MT * host.cfg.hidden_size, nh = (size_t)(L + 1) * per;
    size_t nlog = (size_t)MB * MT * V;
    float *h_reg = calloc(nh, sizeof(float)), *h_frz = calloc(nh, sizeof(float));
    float *lg_reg = calloc(nlog, sizeof(float)), *lg_frz = calloc(nlog, sizeof(float));
    assert_true(h_reg && h_frz && lg_reg && lg_frz);
    hidden_sink sr = {h_reg, per, 0}, sf = {h_frz, per, 0};
    char err[ERR_LEN] = "";

    const backend *be = open_cuda(p);
    size_t free0 = free_bytes();
    llama_model dev;
    if (llama_model_to_backend(be, &host, &dev, err, sizeof err) != 0)
        fail_msg("llama_model_to_backend: %s", err);
    if (p != CUDA_FP32 &&
        cuda_backend_register_weights(dev.params, dev.nparams, err, sizeof err) != 0)
        fail_msg("register: %s", err);
    run_forward(be, &dev, &sr, lg_reg);
    cuda_backend_forget_weights(dev.params);
    llama_model_free_backend(be, &dev);
    /* What stays is the context's product scratch, grown by the forward
     * (never shrunk); the frozen forward needs no more of it. */
    assert_true(free_bytes() <= free0);
    free0 = free_bytes();

    if (llama_model_to_backend_frozen(be, &host, &dev, err, sizeof err) != 0)
        fail_msg("llama_model_to_backend_frozen: %s", err);
    assert_int_equal(dev.w.lm_head == dev.w.embed, tied);
    uintptr_t base = (uintptr_t)dev.params, end = base + dev.nparams * sizeof(float);
    if (p == CUDA_FP32) {
        /* fp32: the ordinary placement, every offset as in host. */
        assert_int_equal(dev.nparams, host.nparams);
        assert_true(dev.w.w_down - dev.params == host.w.w_down - host.params);
    } else {
        /* Only embed and norms in params; every projection is a key
         * outside any device buffer. */
        assert_int_equal(dev.nparams, frozen_fp32_count(&host));
        const float *keys[] = {dev.w.wq, dev.w.wk, dev.w.wv, dev.w.wo,
                               dev.w.w_gate, dev.w.w_up, dev.w.w_down, dev.w.lm_head};
        for (size_t i = 0; i < (tied ? 7u : 8u); i++) {
            uintptr_t k = (uintptr_t)keys[i];
            assert_true(k < base || k >= end);
        }
        assert_true((uintptr_t)dev.w.final_norm >= base &&
                    (uintptr_t)dev.w.final_norm < end);
        /* The fp32 part plus two bytes a projection weight (and the tied
         * head's copy). */
        size_t lowp = host.nparams - frozen_fp32_count(&host);
        size_t want = dev.nparams * sizeof(float) + lowp * 2 +
                      (tied ? (size_t)V * (size_t)host.cfg.hidden_size * 2 : 0);
        assert_int_equal(free0 - free_bytes(), want);
    }
    run_forward(be, &dev, &sf, lg_frz);
    assert_memory_equal(h_frz, h_reg, nh * sizeof(float));
    assert_memory_equal(lg_frz, lg_reg, nlog * sizeof(float));
    print_message("%s frozen forward (%s head): bitwise equal to the %s path\n",
                  cuda_precision_name(p), tied ? "tied" : "untied",
                  p == CUDA_FP32 ? "ordinary" : "registered-copy");
    llama_model_free_backend(be, &dev);
    assert_null(dev.params);
    assert_int_equal(free_bytes(), free0);
    free(h_reg), free(h_frz), free(lg_reg), free(lg_frz);
    llama_free(&host);
    close_cuda();
}

static void test_frozen_bf16(void **state) {
    (void)state;
    check_frozen_forward(CUDA_BF16, false);
    check_frozen_forward(CUDA_BF16, true);
}

static void test_frozen_fp16(void **state) {
    (void)state;
    check_frozen_forward(CUDA_FP16, false);
    check_frozen_forward(CUDA_FP16, true);
}

static void test_frozen_fp32(void **state) {
    (void)state;
    check_frozen_forward(CUDA_FP32, false);
    check_frozen_forward(CUDA_FP32, true);
    /* The low-level upload refuses an fp32 context. */
    open_cuda(CUDA_FP32);
    float w[4] = {1, 2, 3, 4};
    const float *key = w;
    char err[ERR_LEN] = "";
    assert_int_equal(cuda_backend_upload_frozen(w, 4, &key, err, sizeof err), -1);
    assert_null(key);
    assert_non_null(strstr(err, "bf16 or fp16"));
    assert_false(cuda_backend_low_precision());
    close_cuda();
}

/* Whether /proc/self/maps lists [a, a + bytes) inside one mapping with no
 * access ("---p"). */
static bool mapped_without_access(uintptr_t a, size_t bytes) {
    FILE *f = fopen("/proc/self/maps", "r");
    assert_non_null(f);
    char line[512];
    bool found = false;
    while (fgets(line, sizeof line, f)) {
        uintptr_t lo = 0, hi = 0;
        char perms[8] = "";
        if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR " %7s", &lo, &hi, perms) != 3) continue;
        if (a >= lo && a + bytes <= hi) {
            found = strcmp(perms, "---p") == 0;
            break;
        }
    }
    fclose(f);
    return found;
}

/* A key is host address space that no one can read: a child that reads
 * one dies instead of seeing numbers; the range is mapped with no access;
 * the key works only where the registry maps it. */
static void test_frozen_key_unreadable(void **state) {
    (void)state;
    const backend *be = open_cuda(CUDA_BF16);
    assert_true(cuda_backend_low_precision());
    size_t n = 3000;
    float *w = tu_rand_floats(&rng_state, n, 1.0f);
    const float *key = NULL;
    char err[ERR_LEN] = "";
    if (cuda_backend_upload_frozen(w, n, &key, err, sizeof err) != 0)
        fail_msg("upload_frozen: %s", err);
    assert_non_null(key);
    assert_true(mapped_without_access((uintptr_t)key, n * sizeof(float)));
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) dup2(devnull, 2);
        /* cmocka turns SIGSEGV into a failed test and carries on. */
        signal(SIGSEGV, SIG_DFL);
        volatile const float *k = key;
        float v = k[n / 2];
        _exit(v == v ? 0 : 3);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    /* SIGSEGV, or a sanitizer's report of it and a nonzero exit. */
    assert_false(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (WIFSIGNALED(status)) assert_int_equal(WTERMSIG(status), SIGSEGV);

    /* A product reads the copy: x = e_j picks row j of W in bf16. */
    size_t in = 30, out = 100; /* n = out * in */
    float *x = calloc(in, sizeof(float));
    assert_non_null(x);
    x[7] = 1.0f;
    float *dx = dev_floats(be, x, in), *dy = dev_floats(be, NULL, out);
    be->matmul(dy, dx, key, 1, in, out, false);
    float *y = host_floats(be, dy, out);
    for (size_t o = 0; o < out; o++)
        if (y[o] != round_bf16(w[o * in + 7])) fail_msg("row %zu: %g vs %g", o, y[o], w[o * in + 7]);
    /* Registering inside a key is a no-op (the copy is all there is);
     * forgetting it keeps it; past its end is refused. */
    assert_int_equal(cuda_backend_register_weights(key + in, 2 * in, err, sizeof err), 0);
    cuda_backend_forget_weights(key);
    assert_int_equal(cuda_backend_register_weights(key + 1, n, err, sizeof err), -1);
    assert_non_null(strstr(err, "frozen"));
    /* The precision cannot change under frozen weights. */
    assert_null(cuda_backend_open(0, CUDA_FP16, err, sizeof err));
    assert_non_null(strstr(err, "frozen bf16"));
    cuda_backend_free_frozen(key);
    assert_false(mapped_without_access((uintptr_t)key, n * sizeof(float)));
    cuda_backend_free_frozen(key); /* no longer a key: ignored */
    assert_ptr_equal(cuda_backend_open(0, CUDA_FP16, err, sizeof err), be);
    be->free_buf(dx), be->free_buf(dy);
    free(w), free(x), free(y);
    close_cuda();
}

/* Peak device bytes of a frozen placement of m: the fp32 part, then each
 * key's copy with its staging (chunk = the tensor) beside the earlier
 * copies, then the tied head's copy. */
static size_t frozen_peak(const llama_model *m) {
    const llama_weights *w = &m->w;
    const float *order[] = {w->wq, w->wk, w->wv, w->wo, w->mlp_norm,
                            w->w_gate, w->w_up, w->w_down, w->final_norm};
    size_t held = frozen_fp32_count(m) * sizeof(float), peak = held;
    /* Each projection's size: to the next tensor in the layout. */
    for (size_t i = 0; i + 1 < sizeof order / sizeof order[0]; i++) {
        if (order[i] == w->mlp_norm) continue;
        size_t n = (size_t)(order[i + 1] - order[i]);
        if (held + n * 6 > peak) peak = held + n * 6;
        held += n * 2;
    }
    size_t head = (size_t)m->cfg.vocab_size * (size_t)m->cfg.hidden_size;
    if (peak < held + (m->w.lm_head == m->w.embed ? head * 2 : head * 6))
        peak = held + (m->w.lm_head == m->w.embed ? head * 2 : head * 6);
    return peak;
}

/* With the device's memory just at the frozen placement's peak, the
 * frozen upload succeeds where the fp32 one fails; one byte less and it
 * fails cleanly too; every failure and free returns all memory. */
static void check_frozen_memory(bool tied) {
    llama_model host;
    make_model(&host, tied);
    const backend *be = open_cuda(CUDA_BF16);
    size_t free0 = free_bytes(), used0 = EMU_MEMORY - free0;
    size_t peak = frozen_peak(&host);
    /* The premise: the fp32 weights alone exceed the frozen peak. */
    assert_true(host.nparams * sizeof(float) > peak);
    char mem[32], err[ERR_LEN] = "";
    llama_model dev;

    snprintf(mem, sizeof mem, "%zu", used0 + peak - 1);
    setenv("STRATA_EMU_MEMORY", mem, 1);
    size_t free_small = free_bytes();
    assert_int_equal(llama_model_to_backend_frozen(be, &host, &dev, err, sizeof err), -1);
    assert_non_null(strstr(err, "out of GPU memory"));
    assert_null(dev.params);
    assert_int_equal(free_bytes(), free_small);

    snprintf(mem, sizeof mem, "%zu", used0 + peak);
    setenv("STRATA_EMU_MEMORY", mem, 1);
    free_small = free_bytes();
    assert_int_equal(llama_model_to_backend(be, &host, &dev, err, sizeof err), -1);
    assert_non_null(strstr(err, "out of GPU memory"));
    if (llama_model_to_backend_frozen(be, &host, &dev, err, sizeof err) != 0)
        fail_msg("frozen placement within %zu bytes: %s", peak, err);
    print_message("frozen placement (%s head): peak %zu bytes vs %zu of fp32 weights\n",
                  tied ? "tied" : "untied", peak, host.nparams * sizeof(float));
    llama_model_free_backend(be, &dev);
    assert_int_equal(free_bytes(), free_small);

    snprintf(mem, sizeof mem, "%zu", EMU_MEMORY);
    setenv("STRATA_EMU_MEMORY", mem, 1);
    assert_int_equal(free_bytes(), free0);
    llama_free(&host);
    close_cuda();
}

static void test_frozen_memory(void **state) {
    (void)state;
    check_frozen_memory(false);
    check_frozen_memory(true);
}

int main(void) {
    /* Before the emulator's first cudaMalloc, which reads it. */
    char mem[32];
    snprintf(mem, sizeof mem, "%zu", EMU_MEMORY);
    setenv("STRATA_EMU_MEMORY", mem, 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_devices),
        cmocka_unit_test(test_ops_elementwise),
        cmocka_unit_test(test_ops_matmul_fp32),
        cmocka_unit_test(test_ops_rows),
        cmocka_unit_test(test_ops_rope),
        cmocka_unit_test(test_ops_attention),
        cmocka_unit_test(test_bf16_products),
        cmocka_unit_test(test_fp16_products),
        cmocka_unit_test(test_precision_switch),
        cmocka_unit_test(test_sticky_error),
        cmocka_unit_test(test_alloc_failure),
        cmocka_unit_test(test_no_context_aborts),
        cmocka_unit_test(test_model_to_cpu_shares),
        cmocka_unit_test(test_forward_untied),
        cmocka_unit_test(test_forward_tied),
        cmocka_unit_test(test_loss_and_grad_untied),
        cmocka_unit_test(test_loss_and_grad_tied),
        cmocka_unit_test(test_frozen_bf16),
        cmocka_unit_test(test_frozen_fp16),
        cmocka_unit_test(test_frozen_fp32),
        cmocka_unit_test(test_frozen_key_unreadable),
        cmocka_unit_test(test_frozen_memory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
