/* test_gpu.c - `make test-gpu`: the CUDA backend against the CPU backend on
 * a real GPU (and, linked against tests/cuda_emu/, on the CPU emulator as
 * `make test-gpu-emu`, which proves this program before GPU time is spent).
 *
 *   test_gpu [--device N] [--small] [--only PREFIX] [--verbose]
 *
 * Checks, each a row of the table printed at the end:
 *   op ...        every backend.h op forward and backward on seeded random
 *                 inputs, GPU vs backend_cpu(): fp32 within 1e-5 relative
 *                 (max |gpu - cpu| / max |cpu| per output). In bf16 and fp16
 *                 only the matrix products change (cuda.h: everything else
 *                 stays fp32), so those modes re-run matmul and its backward,
 *                 through a registered low-precision weight copy and
 *                 through on-the-fly conversion, against
 *                   (a) the CPU product of the same operands rounded to
 *                       bf16/fp16 on the host: MATMUL_ROUNDED_TOL 1e-4. The
 *                       products of rounded operands are exact in fp32, so
 *                       only the summation differs; tensor cores align
 *                       addends by truncation rather than IEEE rounding,
 *                       which for K <= 1376 terms bounds the difference by
 *                       about K * 2^-24 ~ 8e-5 of the output's scale;
 *                   (b) the fp32 CPU product: bf16 1e-2, fp16 2e-3. Each
 *                       operand carries a relative rounding error up to
 *                       2^-9 (bf16, 8 significant bits) or 2^-12 (fp16, 11
 *                       bits); for sums of K products of independent
 *                       uniform inputs the error of an output is about
 *                       that unit times its typical size, so the worst of
 *                       ~10^5 outputs over the largest output stays near
 *                       2^-9 ~ 2e-3 (bf16) / 2^-12 ~ 2.4e-4 (fp16); the
 *                       bounds leave a factor of about 5 above that.
 *                 Attention runs on the tensor cores there too (attn_gemm.h,
 *                 T >= 64), so each low-precision mode also checks it
 *                 against the fp32 CPU attention (ATTN_BF16_TOL and
 *                 ATTN_FP16_TOL below).
 *   gemm lt vs ex gemm.h's two paths for bf16/fp16 products (cublasGemmEx
 *                 and cublasLt, gemm_set_path) on transposes, beta 0/1,
 *                 padded strides and an operand off 256-byte alignment:
 *                 each against the other and a float64 product of the same
 *                 rounded operands, MATMUL_ROUNDED_TOL; the path counts of
 *                 gemm_get_stats must add up (Lt's shape cache hit on a
 *                 repeat, at least one product on Lt itself).
 *   ref ...       tests/reference/ PyTorch fixtures (forward hidden states
 *                 and logits; loss and gradients of full and LoRA training)
 *                 through llama_forward / llama_loss_and_grad on the GPU in
 *                 fp32, with the CPU tests' tolerance 1e-4.
 *   fwd bf16/fp16 a whole forward in low precision vs the float64 reference.
 *   train ...     train jobs (runner_run, full and LoRA) on the GPU vs the CPU.
 *   predict/cka   predict jobs on the GPU vs the CPU, then CKA jobs on their
 *                 outputs, and GPU CKA (cka_gpu_compute) on a larger input.
 * Exit status: 0 when every row passes, 1 when any fails, 77 (skip) when
 * the process sees no GPU. */
#include "tests/gpu/test_gpu.h"

#include "common/util.h"
#include "worker/engine/backend.h"
#include "worker/engine/cuda/cuda.h"
#include "worker/engine/cuda/gemm.h"
#include "tests/cuda_emu/half_bits.h"

#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define OP_FP32_TOL 1e-5
#define MATMUL_ROUNDED_TOL 1e-4
#define MATMUL_BF16_TOL 1e-2
#define MATMUL_FP16_TOL 2e-3
/* Attention in bf16/fp16 (the tensor-core path, attn_gemm.h, for T >= 64;
 * its products run gemm_run_strided_batched) vs the fp32 CPU attention:
 * q, k, v, P (and dO, dS) carry 2^-9 / 2^-12 relative rounding, which the
 * emulated test measures at 5e-3 (bf16) and 8e-4 (fp16) of the largest
 * output; 4-5x above that. */
#define ATTN_BF16_TOL 2e-2
#define ATTN_FP16_TOL 4e-3
#define GT_MAX_ROWS 256
#define GT_DEV_BUFS 32

gt_config gt_cfg;

/* ---- the table ----------------------------------------------------------- */

typedef struct {
    char check[48];
    double err, tol, seconds;
    bool pass;
    char note[160];
} gt_row;

static gt_row gt_rows[GT_MAX_ROWS];
static int gt_nrows;

void gt_record(const char *check, double err, double tol, double seconds, const char *note) {
    if (gt_nrows == GT_MAX_ROWS) {
        fprintf(stderr, "test_gpu: table full, dropping %s\n", check);
        return;
    }
    gt_row *r = &gt_rows[gt_nrows++];
    snprintf(r->check, sizeof r->check, "%s", check);
    r->err = err, r->tol = tol, r->seconds = seconds;
    r->pass = err <= tol; /* false for NaN */
    snprintf(r->note, sizeof r->note, "%s", note ? note : "");
    /* One line as it happens, so a crash later still leaves the rows seen. */
    fprintf(stderr, "test_gpu: %-40s %-4s err %.3g tol %.3g %.2fs %s\n", r->check,
            r->pass ? "ok" : "FAIL", err, tol, seconds, r->note);
}

bool gt_wanted(const char *name) {
    return !gt_cfg.only || strncmp(name, gt_cfg.only, strlen(gt_cfg.only)) == 0;
}

/* Prints the table; returns the number of failed rows. */
static int gt_print_table(double total_seconds) {
    int failed = 0;
    printf("\n%-40s %10s %10s %6s %8s  %s\n", "check", "max error", "tolerance", "result",
           "seconds", "note");
    for (int i = 0; i < gt_nrows; i++) {
        const gt_row *r = &gt_rows[i];
        if (!r->pass) failed++;
        printf("%-40s %10.3g %10.3g %6s %8.2f  %s\n", r->check, r->err, r->tol,
               r->pass ? "pass" : "FAIL", r->seconds, r->note);
    }
    printf("\n%d checks, %d failed, %.1f s on %s (device %d)%s\n", gt_nrows, failed,
           total_seconds, gt_cfg.device_name, gt_cfg.device,
           gt_cfg.small ? ", small shapes" : "");
    return failed;
}

/* ---- helpers ------------------------------------------------------------- */

uint64_t gt_next(gt_rng *r) {
    r->state += 0x9E3779B97F4A7C15ULL;
    return backend_mix64(r->state);
}

float gt_uniform(gt_rng *r, float lo, float hi) {
    double u = (double)(gt_next(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(lo + (hi - lo) * u);
}

void gt_fill(gt_rng *r, float *x, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = gt_uniform(r, lo, hi);
}

double gt_rel_err(const float *got, const float *want, size_t n) {
    double scale = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        scale = fmax(scale, fabs((double)want[i]));
        worst = fmax(worst, fabs((double)got[i] - (double)want[i]));
    }
    if (scale == 0.0) return worst == 0.0 ? 0.0 : INFINITY;
    return worst / scale;
}

double gt_rel_err_d(const double *got, const double *want, size_t n) {
    double scale = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        scale = fmax(scale, fabs(want[i]));
        worst = fmax(worst, fabs(got[i] - want[i]));
    }
    if (scale == 0.0) return worst == 0.0 ? 0.0 : INFINITY;
    return worst / scale;
}

/* x rounded to bfloat16 (nearest even), as a float. */
static float gt_round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u) return x; /* inf, NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* x rounded to IEEE half (nearest even, subnormals kept, overflow to inf),
 * as a float. Exact in double: the scaled values are integers below 2^53. */
static float gt_round_fp16(float x) {
    double d = x;
    if (!isfinite(d) || d == 0.0) return x;
    int k;
    frexp(d, &k); /* d = m 2^k, 0.5 <= |m| < 1 */
    int shift = k - 11 < -24 ? -24 : k - 11; /* ulp 2^(k-11); subnormals 2^-24 */
    double q = ldexp(nearbyint(ldexp(d, -shift)), shift);
    if (fabs(q) > 65504.0) return q > 0 ? INFINITY : -INFINITY;
    return (float)q;
}

static void gt_round_all(cuda_precision p, const float *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++)
        dst[i] = p == CUDA_BF16 ? gt_round_bf16(src[i])
                 : p == CUDA_FP16 ? gt_round_fp16(src[i])
                                  : src[i];
}

/* Device buffers of one check, freed together. */
typedef struct {
    const backend *be;
    void *bufs[GT_DEV_BUFS];
    int n;
    bool failed;
    char err[ERR_LEN];
} gt_dev;

/* A device buffer of bytes, holding a copy of host when host is not NULL.
 * NULL (with d->failed and d->err set) when it cannot be allocated. */
static void *gt_put(gt_dev *d, const void *host, size_t bytes) {
    if (d->failed) return NULL;
    if (d->n == GT_DEV_BUFS) {
        d->failed = true;
        snprintf(d->err, sizeof d->err, "too many device buffers in one check");
        return NULL;
    }
    void *p = d->be->alloc(bytes, d->err, sizeof d->err);
    if (!p) {
        d->failed = true;
        return NULL;
    }
    d->bufs[d->n++] = p;
    if (host) d->be->upload(p, host, bytes);
    return p;
}

static void gt_dev_free(gt_dev *d) {
    for (int i = 0; i < d->n; i++) d->be->free_buf(d->bufs[i]);
    d->n = 0;
}

/* Synchronises the GPU; false (d->err set) on an asynchronous failure or an
 * earlier allocation failure. */
static bool gt_dev_ok(gt_dev *d) {
    if (d->failed) return false;
    if (cuda_backend_sync(d->err, sizeof d->err) != 0) {
        d->failed = true;
        return false;
    }
    return true;
}

static float *gt_host(size_t n) {
    float *p = calloc(n ? n : 1, sizeof *p);
    if (!p) {
        fprintf(stderr, "test_gpu: out of host memory (%zu floats)\n", n);
        abort(); /* a test program on a machine with no memory left: nothing to report */
    }
    return p;
}

static float *gt_host_copy(const float *src, size_t n) {
    float *p = gt_host(n);
    memcpy(p, src, n * sizeof *p);
    return p;
}

static float *gt_download(const backend *be, const void *dev, size_t n) {
    float *p = gt_host(n);
    be->download(p, dev, n * sizeof *p);
    return p;
}

/* Shapes of the op checks. */
typedef struct {
    int B, T, C, FF, NH, NKV, HS, V;
} gt_shape;

/* Worst error over the outputs of one op, with a note listing each. */
typedef struct {
    double worst;
    char note[160];
    size_t used;
} gt_errs;

static void gt_errs_add(gt_errs *e, const char *what, double err) {
    if (!(err <= e->worst)) e->worst = err; /* NaN sticks */
    if (e->used < sizeof e->note) {
        int n = snprintf(e->note + e->used, sizeof e->note - e->used, "%s%s %.2g",
                         e->used ? ", " : "", what, err);
        if (n > 0) e->used += (size_t)n;
    }
}

/* Records an op row from d's state and the collected errors. */
static void gt_op_done(const char *check, gt_dev *d, gt_errs *e, double tol, double t0) {
    if (d->failed)
        gt_record(check, NAN, tol, util_now_seconds() - t0, d->err);
    else
        gt_record(check, e->worst, tol, util_now_seconds() - t0, e->note);
    gt_dev_free(d);
}

/* ---- the op checks (fp32) ------------------------------------------------ */

static void gt_op_elementwise(const backend *gpu, const gt_shape *s, gt_rng *rng) {
    if (!gt_wanted("op elementwise")) return;
    double t0 = util_now_seconds();
    const backend *cpu = backend_cpu();
    size_t n = (size_t)s->B * (size_t)s->T * (size_t)s->FF;
    float *x = gt_host(n), *y = gt_host(n);
    gt_fill(rng, x, n, -4.0f, 4.0f);
    gt_fill(rng, y, n, -2.0f, 2.0f);
    gt_dev d = {.be = gpu};
    gt_errs e = {0};
    float *dx = gt_put(&d, x, n * 4), *dy = gt_put(&d, y, n * 4), *dz = gt_put(&d, NULL, n * 4);
    if (dx && dy && dz) {
        /* zero + copy + scale + residual_add, each checked on its own */
        gpu->zero(dz, n);
        float *z = gt_download(gpu, dz, n), *zero = gt_host(n);
        gt_errs_add(&e, "zero", gt_rel_err(z, zero, n) == 0.0 ? 0.0 : 1.0);
        free(z);
        gpu->copy(dz, dx, n);
        z = gt_download(gpu, dz, n);
        gt_errs_add(&e, "copy", memcmp(z, x, n * 4) == 0 ? 0.0 : gt_rel_err(z, x, n) + 1e-30);
        free(z);
        float *c = gt_host_copy(x, n);
        cpu->scale(c, n, 0.37f);
        gpu->scale(dz, n, 0.37f);
        z = gt_download(gpu, dz, n);
        gt_errs_add(&e, "scale", gt_rel_err(z, c, n));
        free(z);
        cpu->residual_add(c, y, n);
        gpu->residual_add(dz, dy, n);
        z = gt_download(gpu, dz, n);
        gt_errs_add(&e, "residual_add", gt_rel_err(z, c, n));
        free(z);
        /* swiglu in place on gate, and its backward */
        float *gate = gt_host_copy(x, n);
        cpu->swiglu(gate, y, n);
        gpu->copy(dz, dx, n);
        gpu->swiglu(dz, dy, n);
        z = gt_download(gpu, dz, n);
        gt_errs_add(&e, "swiglu", gt_rel_err(z, gate, n));
        free(z);
        float *dout = gt_host(n), *dg = gt_host(n), *du = gt_host(n);
        gt_fill(rng, dout, n, -1.0f, 1.0f);
        cpu->swiglu_backward(dg, du, dout, x, y, n);
        float *ddout = gt_put(&d, dout, n * 4), *ddg = gt_put(&d, NULL, n * 4);
        if (ddout && ddg) {
            gpu->swiglu_backward(ddg, dz, ddout, dx, dy, n);
            float *g1 = gt_download(gpu, ddg, n), *g2 = gt_download(gpu, dz, n);
            gt_errs_add(&e, "swiglu_bwd dgate", gt_rel_err(g1, dg, n));
            gt_errs_add(&e, "dup", gt_rel_err(g2, du, n));
            free(g1);
            free(g2);
        }
        free(zero);
        free(c);
        free(gate);
        free(dout);
        free(dg);
        free(du);
    }
    gt_dev_ok(&d);
    gt_op_done("op zero/copy/scale/residual/swiglu", &d, &e, OP_FP32_TOL, t0);
    free(x);
    free(y);
}

static void gt_op_rmsnorm(const backend *gpu, const gt_shape *s, gt_rng *rng) {
    if (!gt_wanted("op rmsnorm")) return;
    double t0 = util_now_seconds();
    const backend *cpu = backend_cpu();
    size_t N = (size_t)s->B * (size_t)s->T, C = (size_t)s->C, n = N * C;
    float eps = 1e-5f;
    float *x = gt_host(n), *w = gt_host(C), *out = gt_host(n), *dout = gt_host(n);
    float *dx = gt_host(n), *dw = gt_host(C);
    gt_fill(rng, x, n, -3.0f, 3.0f);
    gt_fill(rng, w, C, 0.5f, 1.5f);
    gt_fill(rng, dout, n, -1.0f, 1.0f);
    gt_fill(rng, dx, n, -1.0f, 1.0f); /* backward adds into dx and dweight */
    gt_fill(rng, dw, C, -1.0f, 1.0f);
    gt_dev d = {.be = gpu};
    gt_errs e = {0};
    float *gx = gt_put(&d, x, n * 4), *gw = gt_put(&d, w, C * 4), *gout = gt_put(&d, NULL, n * 4);
    float *gdout = gt_put(&d, dout, n * 4), *gdx = gt_put(&d, dx, n * 4);
    float *gdw = gt_put(&d, dw, C * 4);
    if (gx && gw && gout && gdout && gdx && gdw) {
        cpu->rmsnorm(out, x, w, N, C, eps);
        gpu->rmsnorm(gout, gx, gw, N, C, eps);
        float *o = gt_download(gpu, gout, n);
        gt_errs_add(&e, "fwd", gt_rel_err(o, out, n));
        free(o);
        cpu->rmsnorm_backward(dx, dw, dout, x, w, N, C, eps);
        gpu->rmsnorm_backward(gdx, gdw, gdout, gx, gw, N, C, eps);
        float *a = gt_download(gpu, gdx, n), *b = gt_download(gpu, gdw, C);
        gt_errs_add(&e, "dx", gt_rel_err(a, dx, n));
        gt_errs_add(&e, "dweight", gt_rel_err(b, dw, C));
        free(a);
        free(b);
        /* frozen weight: dweight NULL, and in place forward (out == x) */
        cpu->rmsnorm_backward(dx, NULL, dout, x, w, N, C, eps);
        gpu->rmsnorm_backward(gdx, NULL, gdout, gx, gw, N, C, eps);
        a = gt_download(gpu, gdx, n);
        gt_errs_add(&e, "dx (frozen)", gt_rel_err(a, dx, n));
        free(a);
        cpu->rmsnorm(x, x, w, N, C, eps);
        gpu->rmsnorm(gx, gx, gw, N, C, eps);
        a = gt_download(gpu, gx, n);
        gt_errs_add(&e, "in place", gt_rel_err(a, x, n));
        free(a);
    }
    gt_dev_ok(&d);
    gt_op_done("op rmsnorm fwd+bwd", &d, &e, OP_FP32_TOL, t0);
    free(x), free(w), free(out), free(dout), free(dx), free(dw);
}

static void gt_op_rope(const backend *gpu, const gt_shape *s, gt_rng *rng) {
    if (!gt_wanted("op rope")) return;
    double t0 = util_now_seconds();
    const backend *cpu = backend_cpu();
    size_t N = (size_t)s->B * (size_t)s->T;
    int nheads = s->NH, HS = s->HS, npos = s->T + 7;
    size_t n = N * (size_t)nheads * (size_t)HS, ncs = (size_t)npos * (size_t)HS;
    float theta = 10000.0f;
    float *x = gt_host(n), *cs = gt_host(ncs);
    int *pos = malloc(N * sizeof *pos);
    if (!pos) abort();
    gt_fill(rng, x, n, -2.0f, 2.0f);
    for (size_t i = 0; i < N; i++) pos[i] = (int)(gt_next(rng) % (uint64_t)npos);
    gt_dev d = {.be = gpu};
    gt_errs e = {0};
    float *gx = gt_put(&d, x, n * 4), *gcs = gt_put(&d, NULL, ncs * 4);
    int *gpos = gt_put(&d, pos, N * sizeof *pos);
    if (gx && gcs && gpos) {
        cpu->rope_table(cs, npos, HS, theta);
        gpu->rope_table(gcs, npos, HS, theta);
        float *a = gt_download(gpu, gcs, ncs);
        gt_errs_add(&e, "table", gt_rel_err(a, cs, ncs));
        free(a);
        float *c = gt_host_copy(x, n);
        cpu->rope_cached(c, pos, N, nheads, HS, cs);
        gpu->rope_cached(gx, gpos, N, nheads, HS, gcs);
        a = gt_download(gpu, gx, n);
        gt_errs_add(&e, "cached", gt_rel_err(a, c, n));
        free(a);
        cpu->rope_backward_cached(c, pos, N, nheads, HS, cs);
        gpu->rope_backward_cached(gx, gpos, N, nheads, HS, gcs);
        a = gt_download(gpu, gx, n);
        gt_errs_add(&e, "backward", gt_rel_err(a, c, n));
        free(a);
        memcpy(c, x, n * 4);
        gpu->upload(gx, x, n * 4);
        cpu->rope(c, pos, N, nheads, HS, theta);
        gpu->rope(gx, gpos, N, nheads, HS, theta);
        a = gt_download(gpu, gx, n);
        gt_errs_add(&e, "uncached", gt_rel_err(a, c, n));
        free(a);
        free(c);
    }
    gt_dev_ok(&d);
    gt_op_done("op rope table/cached/bwd/uncached", &d, &e, OP_FP32_TOL, t0);
    free(x), free(cs), free(pos);
}

/* One attention shape: forward and backward with padded sequences. */
static void gt_op_attention_case(const backend *gpu, gt_rng *rng, const char *check, int B, int T,
                                 int NH, int NKV, int HS, double tol) {
    if (!gt_wanted(check)) return;
    double t0 = util_now_seconds();
    const backend *cpu = backend_cpu();
    size_t N = (size_t)B * (size_t)T, QD = (size_t)NH * (size_t)HS,
           KVD = (size_t)NKV * (size_t)HS;
    size_t nq = N * QD, nkv = N * KVD, TT = (size_t)T * (size_t)T;
    float *q = gt_host(nq), *k = gt_host(nkv), *v = gt_host(nkv), *out = gt_host(nq);
    float *dout = gt_host(nq), *dq = gt_host(nq), *dk = gt_host(nkv), *dv = gt_host(nkv);
    float *scratch = gt_host(2 * TT);
    int *lengths = malloc((size_t)B * sizeof *lengths);
    if (!lengths) abort();
    for (int b = 0; b < B; b++) /* full, and shorter ones down to a single token */
        lengths[b] = b == 0 ? T : 1 + (int)(gt_next(rng) % (uint64_t)T);
    if (B > 2) lengths[B - 1] = 1;
    gt_fill(rng, q, nq, -1.5f, 1.5f);
    gt_fill(rng, k, nkv, -1.5f, 1.5f);
    gt_fill(rng, v, nkv, -1.0f, 1.0f);
    gt_fill(rng, dout, nq, -1.0f, 1.0f);
    for (int b = 0; b < B; b++) /* training's padding rows carry no gradient */
        for (int t = lengths[b]; t < T; t++)
            memset(dout + ((size_t)b * (size_t)T + (size_t)t) * QD, 0, QD * 4);
    gt_fill(rng, dq, nq, -0.5f, 0.5f); /* the backward adds */
    gt_fill(rng, dk, nkv, -0.5f, 0.5f);
    gt_fill(rng, dv, nkv, -0.5f, 0.5f);
    gt_dev d = {.be = gpu};
    gt_errs e = {0};
    float *gq = gt_put(&d, q, nq * 4), *gk = gt_put(&d, k, nkv * 4), *gv = gt_put(&d, v, nkv * 4);
    float *gout = gt_put(&d, NULL, nq * 4), *gdout = gt_put(&d, dout, nq * 4);
    float *gdq = gt_put(&d, dq, nq * 4), *gdk = gt_put(&d, dk, nkv * 4);
    float *gdv = gt_put(&d, dv, nkv * 4), *gscr = gt_put(&d, NULL, 2 * TT * 4);
    int *glen = gt_put(&d, lengths, (size_t)B * sizeof *lengths);
    if (gq && gk && gv && gout && gdout && gdq && gdk && gdv && gscr && glen) {
        cpu->attention(out, q, k, v, lengths, B, T, NH, NKV, HS, scratch);
        gpu->attention(gout, gq, gk, gv, glen, B, T, NH, NKV, HS, gscr);
        float *a = gt_download(gpu, gout, nq);
        gt_errs_add(&e, "out", gt_rel_err(a, out, nq));
        free(a);
        cpu->attention_backward(dq, dk, dv, dout, q, k, v, lengths, B, T, NH, NKV, HS, scratch);
        gpu->attention_backward(gdq, gdk, gdv, gdout, gq, gk, gv, glen, B, T, NH, NKV, HS, gscr);
        float *a1 = gt_download(gpu, gdq, nq), *a2 = gt_download(gpu, gdk, nkv);
        float *a3 = gt_download(gpu, gdv, nkv);
        gt_errs_add(&e, "dq", gt_rel_err(a1, dq, nq));
        gt_errs_add(&e, "dk", gt_rel_err(a2, dk, nkv));
        gt_errs_add(&e, "dv", gt_rel_err(a3, dv, nkv));
        free(a1), free(a2), free(a3);
    }
    gt_dev_ok(&d);
    gt_op_done(check, &d, &e, tol, t0);
    free(q), free(k), free(v), free(out), free(dout), free(dq), free(dk), free(dv);
    free(scratch), free(lengths);
}

static void gt_op_embedding_ce(const backend *gpu, const gt_shape *s, gt_rng *rng) {
    if (!gt_wanted("op embedding")) return;
    double t0 = util_now_seconds();
    const backend *cpu = backend_cpu();
    size_t N = (size_t)s->B * (size_t)s->T, C = (size_t)s->C, V = (size_t)s->V;
    float *table = gt_host(V * C), *out = gt_host(N * C), *dout = gt_host(N * C);
    float *dtable = gt_host(V * C), *logits = gt_host(N * V);
    int *tokens = malloc(N * sizeof *tokens), *targets = malloc(N * sizeof *targets);
    double *row_loss = malloc(N * sizeof *row_loss);
    if (!tokens || !targets || !row_loss) abort();
    gt_fill(rng, table, V * C, -1.0f, 1.0f);
    gt_fill(rng, dout, N * C, -1.0f, 1.0f);
    gt_fill(rng, dtable, V * C, -0.1f, 0.1f);
    gt_fill(rng, logits, N * V, -6.0f, 6.0f);
    /* few distinct tokens, so rows repeat and their gradients must sum */
    for (size_t i = 0; i < N; i++) {
        tokens[i] = (int)(gt_next(rng) % (V < 37 ? V : 37));
        targets[i] = i % 5 == 3 ? -1 : (int)(gt_next(rng) % V);
    }
    gt_dev d = {.be = gpu};
    gt_errs e = {0};
    float *gtab = gt_put(&d, table, V * C * 4), *gout = gt_put(&d, NULL, N * C * 4);
    float *gdout = gt_put(&d, dout, N * C * 4), *gdtab = gt_put(&d, dtable, V * C * 4);
    float *glog = gt_put(&d, logits, N * V * 4);
    int *gtok = gt_put(&d, tokens, N * sizeof *tokens);
    int *gtgt = gt_put(&d, targets, N * sizeof *targets);
    double *gloss = gt_put(&d, NULL, N * sizeof *row_loss);
    if (gtab && gout && gdout && gdtab && glog && gtok && gtgt && gloss) {
        cpu->embedding(out, tokens, table, N, C);
        gpu->embedding(gout, gtok, gtab, N, C);
        float *a = gt_download(gpu, gout, N * C);
        gt_errs_add(&e, "embedding", gt_rel_err(a, out, N * C));
        free(a);
        cpu->embedding_backward(dtable, dout, tokens, N, C);
        gpu->embedding_backward(gdtab, gdout, gtok, N, C);
        a = gt_download(gpu, gdtab, V * C);
        gt_errs_add(&e, "embedding_bwd", gt_rel_err(a, dtable, V * C));
        free(a);
        float scale = 1.0f / (float)N;
        cpu->cross_entropy(logits, row_loss, targets, N, V, scale);
        gpu->cross_entropy(glog, gloss, gtgt, N, V, scale);
        a = gt_download(gpu, glog, N * V);
        double *l = malloc(N * sizeof *l);
        if (!l) abort();
        gpu->download(l, gloss, N * sizeof *l);
        gt_errs_add(&e, "ce grad", gt_rel_err(a, logits, N * V));
        gt_errs_add(&e, "ce loss", gt_rel_err_d(l, row_loss, N));
        free(a);
        free(l);
    }
    gt_dev_ok(&d);
    gt_op_done("op embedding/cross_entropy fwd+bwd", &d, &e, OP_FP32_TOL, t0);
    free(table), free(out), free(dout), free(dtable), free(logits);
    free(tokens), free(targets), free(row_loss);
}

static void gt_op_dropout(const backend *gpu, const gt_shape *s, gt_rng *rng) {
    if (!gt_wanted("op dropout")) return;
    double t0 = util_now_seconds();
    const backend *cpu = backend_cpu();
    size_t n = (size_t)s->B * (size_t)s->T * (size_t)s->C;
    float p = 0.1f, scale = 1.0f / (1.0f - p);
    uint64_t threshold = (uint64_t)((double)p * 9007199254740992.0), key = gt_next(rng);
    float *x = gt_host(n), *out = gt_host(n);
    gt_fill(rng, x, n, -1.0f, 1.0f);
    gt_fill(rng, out, n, -1.0f, 1.0f);
    gt_dev d = {.be = gpu};
    gt_errs e = {0};
    float *gx = gt_put(&d, x, n * 4), *gout = gt_put(&d, out, n * 4);
    if (gx && gout) {
        cpu->dropout(out, x, n, key, threshold, scale, true);
        gpu->dropout(gout, gx, n, key, threshold, scale, true);
        float *a = gt_download(gpu, gout, n);
        gt_errs_add(&e, "accumulate", gt_rel_err(a, out, n));
        free(a);
        cpu->dropout(x, x, n, key, threshold, scale, false);
        gpu->dropout(gx, gx, n, key, threshold, scale, false);
        a = gt_download(gpu, gx, n);
        gt_errs_add(&e, "in place", gt_rel_err(a, x, n));
        free(a);
    }
    gt_dev_ok(&d);
    gt_op_done("op dropout", &d, &e, OP_FP32_TOL, t0);
    free(x), free(out);
}

/* ---- matmul in every precision ------------------------------------------- */

/* matmul and matmul_backward with out (N, FF) = x (N, C) W^T, W (FF, C),
 * and the backward of the down projection's shape (K = FF) too. In fp32
 * against the fp32 CPU product (1e-5); in bf16/fp16 against the CPU product
 * of rounded operands and against the fp32 one (see the file comment). With
 * registered, W is registered first, so products read the backend's
 * low-precision copy; otherwise they convert it on the fly. */
static void gt_op_matmul(const backend *gpu, const gt_shape *s, gt_rng *rng, cuda_precision prec,
                         bool registered) {
    char check[48];
    snprintf(check, sizeof check, "op matmul %s%s", cuda_precision_name(prec),
             prec == CUDA_FP32 ? "" : registered ? " registered" : " on the fly");
    if (!gt_wanted(check)) return;
    double t0 = util_now_seconds();
    const backend *cpu = backend_cpu();
    size_t N = (size_t)s->B * (size_t)s->T, IN = (size_t)s->C, OUT = (size_t)s->FF;
    float *x = gt_host(N * IN), *w = gt_host(OUT * IN), *out0 = gt_host(N * OUT);
    float *dy = gt_host(N * OUT), *dx0 = gt_host(N * IN), *dw0 = gt_host(OUT * IN);
    gt_fill(rng, x, N * IN, -1.0f, 1.0f);
    gt_fill(rng, w, OUT * IN, -0.1f, 0.1f);
    gt_fill(rng, out0, N * OUT, -1.0f, 1.0f); /* accumulate adds to it */
    gt_fill(rng, dy, N * OUT, -1.0f, 1.0f);
    gt_fill(rng, dx0, N * IN, -1.0f, 1.0f);
    gt_fill(rng, dw0, OUT * IN, -1.0f, 1.0f);
    /* The references: [0] fp32 operands, [1] operands rounded as the GPU
     * reads them (same as [0] in fp32). Rounding applies to x, W and dy; the
     * accumulated-into buffers stay fp32. */
    float *xr = gt_host(N * IN), *wr = gt_host(OUT * IN), *dyr = gt_host(N * OUT);
    gt_round_all(prec, x, xr, N * IN);
    gt_round_all(prec, w, wr, OUT * IN);
    gt_round_all(prec, dy, dyr, N * OUT);
    float *ref_out[2], *ref_acc[2], *ref_dx[2], *ref_dw[2], *ref_dxd[2];
    for (int r = 0; r < 2; r++) {
        const float *xs = r ? xr : x, *ws = r ? wr : w, *dys = r ? dyr : dy;
        ref_out[r] = gt_host(N * OUT);
        cpu->matmul(ref_out[r], xs, ws, N, IN, OUT, false);
        ref_acc[r] = gt_host_copy(out0, N * OUT);
        cpu->matmul(ref_acc[r], xs, ws, N, IN, OUT, true);
        ref_dx[r] = gt_host_copy(dx0, N * IN);
        ref_dw[r] = gt_host_copy(dw0, OUT * IN);
        cpu->matmul_backward(ref_dx[r], ref_dw[r], dys, xs, ws, N, IN, OUT, true);
        /* the down projection's backward: dx (N, FF) = dy (N, C) W_down,
         * W_down (C, FF) is W^T's shape; reuse w reshaped as (IN, OUT) */
        ref_dxd[r] = gt_host(N * OUT);
        cpu->matmul_backward(ref_dxd[r], NULL, r ? xr : x, NULL, ws, N, OUT, IN, false);
    }
    gt_dev d = {.be = gpu};
    gt_errs e[2];
    memset(e, 0, sizeof e);
    float *gx = gt_put(&d, x, N * IN * 4), *gw = gt_put(&d, w, OUT * IN * 4);
    float *gout = gt_put(&d, NULL, N * OUT * 4), *gdy = gt_put(&d, dy, N * OUT * 4);
    float *gdx = gt_put(&d, dx0, N * IN * 4), *gdw = gt_put(&d, dw0, OUT * IN * 4);
    float *gdxd = gt_put(&d, NULL, N * OUT * 4);
    if (gx && gw && gout && gdy && gdx && gdw && gdxd) {
        if (registered &&
            cuda_backend_register_weights(gw, OUT * IN, d.err, sizeof d.err) != 0)
            d.failed = true;
        if (!d.failed) {
            gpu->matmul(gout, gx, gw, N, IN, OUT, false);
            float *a = gt_download(gpu, gout, N * OUT);
            for (int r = 0; r < 2; r++)
                gt_errs_add(&e[r], "out", gt_rel_err(a, ref_out[r], N * OUT));
            free(a);
            gpu->upload(gout, out0, N * OUT * 4);
            gpu->matmul(gout, gx, gw, N, IN, OUT, true);
            a = gt_download(gpu, gout, N * OUT);
            for (int r = 0; r < 2; r++)
                gt_errs_add(&e[r], "+=", gt_rel_err(a, ref_acc[r], N * OUT));
            free(a);
            gpu->matmul_backward(gdx, gdw, gdy, gx, gw, N, IN, OUT, true);
            float *a1 = gt_download(gpu, gdx, N * IN), *a2 = gt_download(gpu, gdw, OUT * IN);
            for (int r = 0; r < 2; r++) {
                gt_errs_add(&e[r], "dx", gt_rel_err(a1, ref_dx[r], N * IN));
                gt_errs_add(&e[r], "dw", gt_rel_err(a2, ref_dw[r], OUT * IN));
            }
            free(a1), free(a2);
            gpu->matmul_backward(gdxd, NULL, gx, NULL, gw, N, OUT, IN, false);
            a = gt_download(gpu, gdxd, N * OUT);
            for (int r = 0; r < 2; r++)
                gt_errs_add(&e[r], "dx (K=C)", gt_rel_err(a, ref_dxd[r], N * OUT));
            free(a);
        }
        if (registered) cuda_backend_forget_weights(gw);
    }
    gt_dev_ok(&d);
    if (prec == CUDA_FP32) {
        gt_op_done(check, &d, &e[0], OP_FP32_TOL, t0);
    } else {
        bool failed = d.failed;
        char err[ERR_LEN];
        snprintf(err, sizeof err, "%s", d.err);
        char check2[64];
        snprintf(check2, sizeof check2, "%s vs rounded", check);
        gt_op_done(check2, &d, &e[1], MATMUL_ROUNDED_TOL, t0);
        snprintf(check2, sizeof check2, "%s vs fp32", check);
        if (failed)
            gt_record(check2, NAN, 0, 0, err);
        else
            gt_record(check2, e[0].worst, prec == CUDA_BF16 ? MATMUL_BF16_TOL : MATMUL_FP16_TOL,
                      0.0, e[0].note);
    }
    free(x), free(w), free(out0), free(dy), free(dx0), free(dw0), free(xr), free(wr), free(dyr);
    for (int r = 0; r < 2; r++)
        free(ref_out[r]), free(ref_acc[r]), free(ref_dx[r]), free(ref_dw[r]), free(ref_dxd[r]);
}

/* ---- gemm.h's two paths (cublasGemmEx and cublasLt) ---------------------- */

/* One product of the gemm path check: C (M, N) = alpha op(A) op(B) + beta C
 * with row strides padded by pad elements; offset shifts A's start by that
 * many elements (an operand that is not 256-byte aligned, which Lt's
 * heuristic must be told). */
typedef struct {
    bool ta, tb;
    size_t M, N, K, pad, offset;
    float alpha, beta;
} gt_gemm_case;

/* Runs every case through GEMM_PATH_EX and then GEMM_PATH_LT (twice: the
 * second round must hit the shape cache) on a context of the backend's
 * stream, in type (bf16 or fp16), and compares both with each other and
 * with a float64 product of the same rounded operands, within
 * MATMUL_ROUNDED_TOL (only the summation differs). The counts must add up:
 * every Ex-path product run by Ex, every Lt-path product by Lt or counted
 * as a fallback, at least one by Lt itself (the emulator runs none of
 * cuBLAS; it records the path). One row. */
static void gt_gemm_paths(const backend *gpu, cuda_precision prec) {
    char check[48];
    snprintf(check, sizeof check, "gemm lt vs ex %s", cuda_precision_name(prec));
    if (!gt_wanted(check)) return;
    double t0 = util_now_seconds();
    static const gt_gemm_case full[] = {
        {false, true, 256, 384, 512, 0, 0, 1.0f, 0.0f},
        {false, false, 256, 512, 384, 0, 0, 1.0f, 1.0f},
        {true, false, 384, 512, 256, 0, 0, 0.5f, 1.0f},
        {true, true, 128, 64, 1024, 8, 0, 1.0f, 0.0f},
        {false, true, 37, 53, 29, 3, 1, 0.75f, 1.0f},
        {true, false, 61, 17, 70, 1, 3, 1.0f, 0.0f},
    };
    static const gt_gemm_case small[] = {
        {false, true, 32, 48, 64, 0, 0, 1.0f, 0.0f},
        {true, false, 48, 32, 16, 0, 0, 0.5f, 1.0f},
        {false, true, 7, 9, 13, 3, 1, 0.75f, 1.0f},
        {true, true, 5, 11, 6, 1, 3, 1.0f, 0.0f},
    };
    const gt_gemm_case *cs = gt_cfg.small ? small : full;
    size_t ncases = gt_cfg.small ? sizeof small / sizeof small[0] : sizeof full / sizeof full[0];
    gemm_type type = prec == CUDA_FP16 ? GEMM_F16 : GEMM_BF16;
    char err[ERR_LEN] = "";
    gemm_ctx *g = NULL;
    if (gemm_ctx_new(cuda_backend_stream(), (size_t)32 << 20, &g, err, sizeof err) != 0) {
        gt_record(check, NAN, MATMUL_ROUNDED_TOL, util_now_seconds() - t0, err);
        return;
    }
    gt_rng rng = {0x6e44a7u + (uint64_t)prec};
    gt_errs e = {0};
    gt_dev d = {.be = gpu};
    double worst_pair = 0.0;
    /* per path run: stats before Ex, before Lt, after Lt */
    gemm_stats st[3];
    unsigned long long ran = 0, ex_n = 0, ex_lt = 0, lt_n = 0, fb_n = 0, q_n = 0;
    for (size_t c = 0; c < ncases && !d.failed; c++) {
        const gt_gemm_case *k = &cs[c];
        size_t a_rows = k->ta ? k->K : k->M, a_cols = k->ta ? k->M : k->K;
        size_t b_rows = k->tb ? k->N : k->K, b_cols = k->tb ? k->K : k->N;
        size_t lda = a_cols + k->pad, ldb = b_cols + k->pad, ldc = k->N + k->pad;
        size_t na = k->offset + a_rows * lda, nb = b_rows * ldb, nc = k->M * ldc;
        uint16_t *ha = calloc(na, sizeof *ha), *hb = calloc(nb, sizeof *hb);
        float *fa = gt_host(na), *fb = gt_host(nb), *c0 = gt_host(nc), *ref = gt_host(nc);
        if (!ha || !hb) abort();
        for (size_t i = 0; i < na; i++) { /* the value each 16-bit operand holds */
            float v = gt_uniform(&rng, -1.0f, 1.0f);
            ha[i] = type == GEMM_BF16 ? half_bits_bf16_from_f32(v) : half_bits_f16_from_f32(v);
            fa[i] = type == GEMM_BF16 ? half_bits_bf16_to_f32(ha[i]) : half_bits_f16_to_f32(ha[i]);
        }
        for (size_t i = 0; i < nb; i++) {
            float v = gt_uniform(&rng, -1.0f, 1.0f);
            hb[i] = type == GEMM_BF16 ? half_bits_bf16_from_f32(v) : half_bits_f16_from_f32(v);
            fb[i] = type == GEMM_BF16 ? half_bits_bf16_to_f32(hb[i]) : half_bits_f16_to_f32(hb[i]);
        }
        gt_fill(&rng, c0, nc, -1.0f, 1.0f);
        /* float64 reference; padding columns of C keep their values */
        memcpy(ref, c0, nc * sizeof *ref);
        const float *A = fa + k->offset;
        for (size_t i = 0; i < k->M; i++)
            for (size_t j = 0; j < k->N; j++) {
                double acc = 0.0;
                for (size_t t = 0; t < k->K; t++)
                    acc += (double)(k->ta ? A[t * lda + i] : A[i * lda + t]) *
                           (double)(k->tb ? fb[j * ldb + t] : fb[t * ldb + j]);
                ref[i * ldc + j] = (float)((double)k->alpha * acc +
                                           (k->beta == 0.0f ? 0.0 : (double)k->beta *
                                                                        c0[i * ldc + j]));
            }
        uint16_t *da = gt_put(&d, ha, na * sizeof *ha), *db = gt_put(&d, hb, nb * sizeof *hb);
        float *dc = gt_put(&d, NULL, nc * sizeof(float));
        float *got[2] = {NULL, NULL};
        for (int path = 0; path < 2 && dc && da && db; path++) {
            gemm_set_path(g, path == 0 ? GEMM_PATH_EX : GEMM_PATH_LT);
            gemm_get_stats(g, &st[path]);
            for (int round = 0; round < 1 + path; round++) {
                gpu->upload(dc, c0, nc * sizeof(float));
                if (gemm_run(g, type, k->ta, k->tb, k->M, k->N, k->K, k->alpha, da + k->offset,
                             lda, db, ldb, k->beta, dc, ldc, d.err, sizeof d.err) != 0) {
                    d.failed = true;
                    break;
                }
            }
            if (d.failed || !gt_dev_ok(&d)) break;
            got[path] = gt_download(gpu, dc, nc);
        }
        if (got[0] && got[1]) {
            gemm_get_stats(g, &st[2]);
            ex_n += st[1].ex_products - st[0].ex_products;
            ex_lt += st[1].lt_products - st[0].lt_products;
            lt_n += st[2].lt_products - st[1].lt_products;
            fb_n += st[2].lt_fallbacks - st[1].lt_fallbacks;
            q_n += st[2].lt_queries - st[1].lt_queries;
            char what[48];
            snprintf(what, sizeof what, "%s%s %zux%zux%zu", k->ta ? "T" : "N", k->tb ? "T" : "N",
                     k->M, k->N, k->K);
            double ex = gt_rel_err(got[0], ref, nc), lt = gt_rel_err(got[1], ref, nc);
            double pair = gt_rel_err(got[1], got[0], nc);
            gt_errs_add(&e, what, fmax(ex, fmax(lt, pair)));
            worst_pair = fmax(worst_pair, pair);
            ran++;
        }
        free(got[0]), free(got[1]), free(ha), free(hb), free(fa), free(fb), free(c0), free(ref);
        gt_dev_free(&d);
    }
    char note[160];
    snprintf(note, sizeof note, "ex %llu, lt %llu, fallback %llu, queries %llu for %llu shapes; "
             "lt-ex %.2g; %.80s", ex_n, lt_n, fb_n, q_n, ran, worst_pair, e.note);
    double worst = e.worst;
    /* Ex ran each case once and Lt none of them; Lt each twice (the
     * second a cache hit: at most one heuristic query per shape); at least
     * one product on Lt itself. */
    bool counts_ok = ex_n == ran && ex_lt == 0 && lt_n + fb_n == 2 * ran && q_n <= ran &&
                     lt_n > 0;
    if (!d.failed && !counts_ok) {
        worst = INFINITY;
        snprintf(note, sizeof note, "path counts wrong: ex %llu (lt %llu), lt %llu, fallback "
                 "%llu, queries %llu for %llu shapes (want ex %llu, lt + fallback %llu)",
                 ex_n, ex_lt, lt_n, fb_n, q_n, ran, ran, 2 * ran);
    }
    if (d.failed)
        gt_record(check, NAN, MATMUL_ROUNDED_TOL, util_now_seconds() - t0, d.err);
    else
        gt_record(check, worst, MATMUL_ROUNDED_TOL, util_now_seconds() - t0, note);
    gt_dev_free(&d);
    gemm_ctx_free(g);
}

/* Every op check, in every precision the backend has. */
static void gt_check_ops(int device) {
    static const gt_shape full = {4, 128, 512, 1376, 8, 2, 64, 8192};
    static const gt_shape small = {2, 16, 64, 96, 4, 2, 16, 101};
    const gt_shape *s = gt_cfg.small ? &small : &full;
    static const cuda_precision precs[] = {CUDA_FP32, CUDA_BF16, CUDA_FP16};
    for (size_t i = 0; i < sizeof precs / sizeof precs[0]; i++) {
        char err[ERR_LEN];
        const backend *gpu = cuda_backend_open(device, precs[i], err, sizeof err);
        if (!gpu) {
            gt_record("cuda_backend_open", NAN, 0, 0, err);
            return;
        }
        gt_rng rng = {0x5eed0000u + (uint64_t)i};
        if (precs[i] == CUDA_FP32) {
            gt_op_elementwise(gpu, s, &rng);
            gt_op_rmsnorm(gpu, s, &rng);
            gt_op_rope(gpu, s, &rng);
            if (gt_cfg.small) {
                gt_op_attention_case(gpu, &rng, "op attention fwd+bwd GQA HS16", 2, 16, 4, 2, 16,
                                     OP_FP32_TOL);
                gt_op_attention_case(gpu, &rng, "op attention fwd+bwd MHA HS64", 3, 9, 2, 2, 64,
                                     OP_FP32_TOL);
            } else {
                gt_op_attention_case(gpu, &rng, "op attention fwd+bwd GQA HS64", 4, 256, 8, 2, 64,
                                     OP_FP32_TOL);
                gt_op_attention_case(gpu, &rng, "op attention fwd+bwd MHA HS128", 2, 512, 8, 8,
                                     128, OP_FP32_TOL);
            }
            gt_op_embedding_ce(gpu, s, &rng);
            gt_op_dropout(gpu, s, &rng);
            gt_op_matmul(gpu, s, &rng, precs[i], false);
        } else {
            gt_op_matmul(gpu, s, &rng, precs[i], true);
            gt_op_matmul(gpu, s, &rng, precs[i], false);
            gt_gemm_paths(gpu, precs[i]);
            /* Long enough for the tensor-core attention (T >= 64). */
            bool bf = precs[i] == CUDA_BF16;
            double tol = bf ? ATTN_BF16_TOL : ATTN_FP16_TOL;
            if (gt_cfg.small)
                gt_op_attention_case(gpu, &rng,
                                     bf ? "op attention bf16 GQA HS16"
                                        : "op attention fp16 GQA HS16",
                                     2, 70, 4, 2, 16, tol);
            else
                gt_op_attention_case(gpu, &rng,
                                     bf ? "op attention bf16 GQA HS128 T1024"
                                        : "op attention fp16 GQA HS128 T1024",
                                     2, 1024, 8, 2, 128, tol);
        }
    }
    char err[ERR_LEN];
    if (!cuda_backend_open(device, CUDA_FP32, err, sizeof err))
        gt_record("cuda_backend_open fp32", NAN, 0, 0, err);
}

/* ---- main ---------------------------------------------------------------- */

static int gt_rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

static void gt_usage(void) {
    fprintf(stderr, "usage: test_gpu [--device N] [--small] [--only PREFIX] [--verbose]\n");
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--small") == 0) {
            gt_cfg.small = true;
        } else if (strcmp(argv[i], "--verbose") == 0) {
            gt_cfg.verbose = true;
        } else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
            gt_cfg.only = argv[++i];
        } else if (strcmp(argv[i], "--device") == 0 && i + 1 < argc) {
            int64_t v;
            if (util_parse_i64(argv[++i], 0, CUDA_MAX_DEVICES - 1, &v) != 0) {
                gt_usage();
                return 2;
            }
            gt_cfg.device = (int)v;
        } else {
            gt_usage();
            return 2;
        }
    }
    cuda_device_info devs[CUDA_MAX_DEVICES];
    char why[ERR_LEN] = "";
    int ndev = cuda_devices(devs, CUDA_MAX_DEVICES, why, sizeof why);
    if (ndev <= 0) {
        printf("test_gpu: SKIPPED: no GPU: %s\n", why);
        return 77;
    }
    if (gt_cfg.device >= ndev) {
        printf("test_gpu: SKIPPED: device %d asked, %d found\n", gt_cfg.device, ndev);
        return 77;
    }
    const cuda_device_info *dev = &devs[gt_cfg.device];
    snprintf(gt_cfg.device_name, sizeof gt_cfg.device_name, "%s", dev->name);
    /* The emulator runs kernels thread by thread on the CPU: full shapes
     * would take hours there. */
    if (strstr(dev->name, "emulator")) gt_cfg.small = true;
    printf("test_gpu: %s, %.1f GiB, sm_%d%d, %d SMs%s\n", dev->name, dev->memory_gb, dev->major,
           dev->minor, dev->multiprocessors, gt_cfg.small ? " (small shapes)" : "");
    fflush(stdout);
    snprintf(gt_cfg.tmp, sizeof gt_cfg.tmp, "/tmp/strata-gputest-XXXXXX");
    if (!mkdtemp(gt_cfg.tmp)) {
        fprintf(stderr, "test_gpu: mkdtemp: %s\n", strerror(errno));
        return 1;
    }
    double t0 = util_now_seconds();
    gt_check_ops(gt_cfg.device);
    char err[ERR_LEN];
    const backend *gpu = cuda_backend_open(gt_cfg.device, CUDA_FP32, err, sizeof err);
    if (gpu) {
        gt_check_reference_forward(gpu);
        gt_check_reference_backward(gpu);
    }
    gt_check_forward_precision(gt_cfg.device);
    cuda_backend_close();
    gt_check_train_jobs();
    gt_check_predict_cka_jobs();
    gt_check_cka_gpu();
    int failed = gt_print_table(util_now_seconds() - t0);
    if (nftw(gt_cfg.tmp, gt_rm_entry, 16, FTW_DEPTH | FTW_PHYS) != 0)
        fprintf(stderr, "test_gpu: could not remove %s\n", gt_cfg.tmp);
    if (gt_nrows == 0) {
        printf("test_gpu: no check matched --only %s\n", gt_cfg.only ? gt_cfg.only : "");
        return 1;
    }
    return failed ? 1 : 0;
}
