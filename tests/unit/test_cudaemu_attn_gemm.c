/* test_cudaemu_attn_gemm.c - the tensor-core attention path (attn_gemm.h)
 * for bf16/fp16 jobs, under the CUDA emulator (tests/cuda_emu), and the
 * gemm_run_strided_batched it is built on.
 *
 * - attn_gemm_plan_make / attn_gemm_row_block / attn_gemm_wanted on the CPU:
 *   workspace regions aligned and disjoint, heads per chunk under a cap,
 *   refusals, the threshold.
 * - gemm_run_strided_batched (gemm_emu.c's) against naive loops over
 *   16-bit operands, every transpose, zero strides, C's gaps untouched.
 * - attention forward and backward (B 2-3, T 1..100 with lengths 1, T and
 *   between, NH 4 over NKV 2 and 4, HS 16/64/128, bf16 and fp16, one chunk
 *   and one head per chunk) against
 *   (a) a CPU computation that rounds q, k, v, dout, P and dS to 16 bits
 *       where the path does (ROUNDED_TOL: the path and this reference sum
 *       in other orders, so a P or dS near a rounding tie may land one
 *       16-bit step apart; a wrong mask or index is off by O(1));
 *   (b) backend_cpu()'s fp32 attention (BF16_TOL, FP16_TOL: the 16-bit
 *       rounding of operands and probabilities, relative to the largest
 *       output), with gradients accumulated into random initial values and
 *       rows past the length untouched.
 * - the CUDA backend's dispatch: bf16 and T >= ATTN_GEMM_MIN_T gives the
 *   path's bits, below it and in fp32 the flash kernels' bits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/cuda_emu/half_bits.h"
#include "tests/unit/testutil.h"
#include "worker/engine/backend.h"
#include "worker/engine/cuda/attn_gemm.h"
#include "worker/engine/cuda/cuda.h"
#include "worker/engine/cuda/gemm.h"
#include "worker/engine/cuda/kernels.h"

#define ROUNDED_TOL 1e-3
#define BF16_TOL 2e-2
#define FP16_TOL 4e-3
#define GEMM_TOL 1e-6
#define ERR_LEN 256
#define REF_MAX_T 128 /* the rounded reference keeps a row of scores on the stack */

/* splitmix64 (tu_rand_uniform) from this seed: the same numbers every run. */
static uint64_t rng_state = 0xa77e6e33ULL;

/* x rounded to the 16-bit format of type and widened back (exact). */
static float round16(gemm_type type, float x) {
    return type == GEMM_F16 ? half_bits_f16_to_f32(half_bits_f16_from_f32(x))
                            : half_bits_bf16_to_f32(half_bits_bf16_from_f32(x));
}

static double worst_seen[3]; /* rounded, bf16, fp16: printed at the end */

static void expect_close(const float *got, const float *want, size_t n, double tol,
                         const char *what, const char *shape, double *worst) {
    double e = tu_rel_or_abs_err_ff(got, want, n, what);
    if (e > *worst) *worst = e;
    if (e > tol) fail_msg("%s (%s): relative error %.3g > %g", what, shape, e, tol);
}

/* --- plans --------------------------------------------------------------- */

static void test_plan(void **state) {
    (void)state;
    char err[ERR_LEN] = "";
    attn_gemm_plan p;
    assert_false(attn_gemm_wanted(false, 4096));
    assert_false(attn_gemm_wanted(true, ATTN_GEMM_MIN_T - 1));
    assert_true(attn_gemm_wanted(true, ATTN_GEMM_MIN_T));
    assert_int_equal(attn_gemm_row_block(1), 32);
    assert_int_equal(attn_gemm_row_block(256), 32);
    assert_int_equal(attn_gemm_row_block(257), 64);
    assert_int_equal(attn_gemm_row_block(1024), 128);
    assert_int_equal(attn_gemm_row_block(100000), ATTN_GEMM_ROW_BLOCK_MAX);

    /* 7B-shaped backward: all 32 heads in one chunk at T 1024. */
    assert_int_equal(attn_gemm_plan_make(&p, 4, 1024, 32, 32, 128, true, ATTN_GEMM_SP_CAP, err,
                                         sizeof err), 0);
    assert_int_equal(p.chunk_heads, 32);
    assert_int_equal(p.ld, 1024);
    assert_int_equal(p.group, 1);
    assert_true(fabsf(p.scale - 1.0f / sqrtf(128.0f)) == 0.0f);
    size_t nq = (size_t)4 * 1024 * 32 * 128;
    size_t offs[] = {p.off_q, p.off_k, p.off_v, p.off_dout, p.off_s, p.off_p, p.ws_bytes};
    size_t need[] = {nq * 2, nq * 2, nq * 2, nq * 2, 32 * p.pair_elems * 4, 32 * p.pair_elems * 2};
    for (size_t i = 0; i < 6; i++) {
        assert_int_equal(offs[i] % ATTN_GEMM_ALIGN, 0);
        assert_true(offs[i] + need[i] <= offs[i + 1]);
        assert_true(offs[i + 1] - (offs[i] + need[i]) < ATTN_GEMM_ALIGN);
    }
    assert_int_equal(p.row_block, 128);

    /* Forward: no dout copy. ld rounds T up to 8. */
    assert_int_equal(attn_gemm_plan_make(&p, 2, 70, 4, 2, 16, false, ATTN_GEMM_SP_CAP, err,
                                         sizeof err), 0);
    assert_int_equal(p.ld, 72);
    assert_int_equal(p.pair_elems, 70 * 72);
    assert_int_equal(p.off_dout, p.off_s);
    assert_int_equal(p.group, 2);

    /* A cap for 3 heads' S and P gives 3 of 4; one head's worth gives 1;
     * less than one head is refused (the backend then uses flash). */
    size_t per_head = (size_t)70 * 72 * 6;
    assert_int_equal(attn_gemm_plan_make(&p, 2, 70, 8, 4, 16, true, 3 * per_head + 5, err,
                                         sizeof err), 0);
    assert_int_equal(p.chunk_heads, 3);
    assert_int_equal(attn_gemm_plan_make(&p, 2, 70, 8, 4, 16, true, per_head, err, sizeof err),
                     0);
    assert_int_equal(p.chunk_heads, 1);
    assert_int_equal(attn_gemm_plan_make(&p, 2, 70, 8, 4, 16, true, per_head - 1, err,
                                         sizeof err), -1);
    assert_non_null(strstr(err, "cap"));
    assert_int_equal(attn_gemm_plan_make(&p, 2, 8192, 32, 32, 128, true, ATTN_GEMM_SP_CAP, err,
                                         sizeof err), 0);
    assert_int_equal(p.chunk_heads, 1);
    assert_int_equal(attn_gemm_plan_make(&p, 2, 12000, 32, 32, 128, true, ATTN_GEMM_SP_CAP,
                                         err, sizeof err), -1);

    assert_int_equal(attn_gemm_plan_make(&p, 2, 70, 6, 4, 16, true, ATTN_GEMM_SP_CAP, err,
                                         sizeof err), -1);
    assert_non_null(strstr(err, "multiple"));
    assert_int_equal(attn_gemm_plan_make(&p, 0, 70, 4, 4, 16, true, ATTN_GEMM_SP_CAP, err,
                                         sizeof err), -1);
    assert_non_null(strstr(err, "at least 1"));
    assert_int_equal(attn_gemm_plan_make(&p, 1, 70, 1 << 20, 1 << 20, 4096, true,
                                         (size_t)1 << 40, err, sizeof err), -1);
}

/* --- gemm_run_strided_batched --------------------------------------------- */

/* One batched product vs naive loops over the rounded operands: C has
 * gaps between and beside the products (ldc > N, stride_c > M ldc) that
 * must keep their values. */
static void check_batched(gemm_type type, bool ta, bool tb, size_t M, size_t N, size_t K,
                          size_t batch, bool shared_b) {
    char err[ERR_LEN] = "";
    gemm_ctx *g = NULL;
    assert_int_equal(gemm_ctx_new(NULL, 0, &g, err, sizeof err), 0);
    size_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
    size_t lda = ac + 3, ldb = bc + 1, ldc = N + 2;
    size_t sa = ar * lda + 5, sb = shared_b ? 0 : br * ldb + 2, sc = M * ldc + 7;
    size_t na = sa * batch, nb = shared_b ? br * ldb : sb * batch, ncl = sc * batch;
    float *fa = tu_rand_floats(&rng_state, na, 1.0f), *fb = tu_rand_floats(&rng_state, nb, 1.0f);
    float *c = tu_rand_floats(&rng_state, ncl, 1.0f);
    float *c0 = tu_dup_floats(c, ncl);
    uint16_t *ha = malloc(na * sizeof *ha), *hb = malloc(nb * sizeof *hb);
    assert_true(ha && hb);
    for (size_t i = 0; i < na; i++) {
        ha[i] = type == GEMM_F16 ? half_bits_f16_from_f32(fa[i]) : half_bits_bf16_from_f32(fa[i]);
        if (type != GEMM_F32) fa[i] = round16(type, fa[i]);
    }
    for (size_t i = 0; i < nb; i++) {
        hb[i] = type == GEMM_F16 ? half_bits_f16_from_f32(fb[i]) : half_bits_bf16_from_f32(fb[i]);
        if (type != GEMM_F32) fb[i] = round16(type, fb[i]);
    }
    const void *A = type == GEMM_F32 ? (const void *)fa : (const void *)ha;
    const void *B = type == GEMM_F32 ? (const void *)fb : (const void *)hb;
    float alpha = 0.75f, beta = 0.5f;
    assert_int_equal(gemm_run_strided_batched(g, type, ta, tb, M, N, K, alpha, A, lda, sa, B,
                                              ldb, sb, beta, c, ldc, sc, batch, err, sizeof err),
                     0);
    for (size_t i = 0; i < batch; i++)
        for (size_t r = 0; r < M; r++)
            for (size_t col = 0; col < ldc && r * ldc + col < sc; col++) {
                size_t at = i * sc + r * ldc + col;
                if (col >= N) {
                    assert_true(c[at] == c0[at]);
                    continue;
                }
                double acc = 0.0;
                for (size_t kk = 0; kk < K; kk++) {
                    double a = fa[i * sa + (ta ? kk * lda + r : r * lda + kk)];
                    double b = fb[i * sb + (tb ? col * ldb + kk : kk * ldb + col)];
                    acc += a * b;
                }
                double want = alpha * acc + beta * c0[at];
                if (fabs(c[at] - want) > GEMM_TOL * (double)K)
                    fail_msg("batched gemm type %d ta %d tb %d item %zu (%zu, %zu): %g vs %g",
                             (int)type, ta, tb, i, r, col, (double)c[at], want);
            }
    /* The tail of each item past M rows of ldc keeps its values. */
    for (size_t i = 0; i < batch; i++)
        for (size_t at = i * sc + M * ldc; at < (i + 1) * sc; at++) assert_true(c[at] == c0[at]);
    free(fa);
    free(fb);
    free(c);
    free(c0);
    free(ha);
    free(hb);
    gemm_ctx_free(g);
}

static void test_gemm_strided_batched(void **state) {
    (void)state;
    const gemm_type types[] = {GEMM_BF16, GEMM_F16, GEMM_F32};
    for (int t = 0; t < 3; t++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++) check_batched(types[t], ta, tb, 7, 5, 9, 3, false);
    check_batched(GEMM_BF16, false, true, 6, 4, 16, 4, true);
    check_batched(GEMM_F16, true, false, 1, 1, 1, 1, false);
    /* batch 0 and M 0 do nothing, and succeed */
    char err[ERR_LEN] = "";
    gemm_ctx *g = NULL;
    assert_int_equal(gemm_ctx_new(NULL, 0, &g, err, sizeof err), 0);
    float c = 3.0f;
    uint16_t a = 0, b = 0;
    assert_int_equal(gemm_run_strided_batched(g, GEMM_BF16, false, false, 1, 1, 1, 1.0f, &a, 1,
                                              1, &b, 1, 1, 0.0f, &c, 1, 1, 0, err, sizeof err),
                     0);
    assert_true(c == 3.0f);
    assert_int_equal(gemm_run_strided_batched(g, GEMM_BF16, false, false, 1, 1, 1, 1.0f, &a, 1,
                                              1, &b, 1, 1, 0.0f, &c, 1, 1, (size_t)1 << 33, err,
                                              sizeof err),
                     -1);
    gemm_ctx_free(g);
}

/* --- attention ------------------------------------------------------------ */

typedef struct {
    int B, T, NH, NKV, HS;
    int lengths[3];
} attn_case;

/* The rounded reference: what the path computes, in double where it sums
 * in fp32, with its 16-bit roundings. out (overwritten) and dq, dk, dv
 * (+=); dout NULL skips the backward. */
static void ref_rounded(gemm_type type, const attn_case *c, const float *q, const float *k,
                        const float *v, const float *dout, float *out, float *dq, float *dk,
                        float *dv) {
    int T = c->T, HS = c->HS, G = c->NH / c->NKV;
    size_t qrow = (size_t)c->NH * (size_t)HS, kvrow = (size_t)c->NKV * (size_t)HS;
    float scale = 1.0f / sqrtf((float)HS);
    float *p = malloc((size_t)T * sizeof *p), *ds = malloc((size_t)T * sizeof *ds);
    double *dp = malloc((size_t)T * sizeof *dp);
    assert_true(p && ds && dp);
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->NH; h++) {
            int len = c->lengths[b];
            size_t qb = (size_t)b * (size_t)T * qrow + (size_t)h * (size_t)HS;
            size_t kb = (size_t)b * (size_t)T * kvrow + (size_t)(h / G) * (size_t)HS;
            for (int t = 0; t < T; t++) {
                int live = t < len ? t + 1 : len;
                const float *qt = q + qb + (size_t)t * qrow;
                double m = -INFINITY, sum = 0.0;
                float srow[REF_MAX_T];
                assert_true(T <= REF_MAX_T);
                for (int j = 0; j < live; j++) {
                    double acc = 0.0;
                    for (int d = 0; d < HS; d++)
                        acc += (double)round16(type, qt[d]) *
                               round16(type, k[kb + (size_t)j * kvrow + (size_t)d]);
                    srow[j] = scale * (float)acc;
                    if (srow[j] > m) m = srow[j];
                }
                for (int j = 0; j < live; j++) sum += exp(srow[j] - m);
                for (int j = 0; j < T; j++)
                    p[j] = j < live ? round16(type, (float)(exp(srow[j] - m) / sum)) : 0.0f;
                for (int d = 0; d < HS; d++) {
                    double acc = 0.0;
                    for (int j = 0; j < live; j++)
                        acc += (double)p[j] * round16(type, v[kb + (size_t)j * kvrow + (size_t)d]);
                    out[qb + (size_t)t * qrow + (size_t)d] = (float)acc;
                }
                if (!dout || t >= len) continue;
                const float *dot = dout + qb + (size_t)t * qrow;
                double D = 0.0;
                for (int j = 0; j < live; j++) {
                    double acc = 0.0;
                    for (int d = 0; d < HS; d++)
                        acc += (double)round16(type, dot[d]) *
                               round16(type, v[kb + (size_t)j * kvrow + (size_t)d]);
                    dp[j] = (float)acc;
                    D += (double)p[j] * dp[j];
                }
                for (int j = 0; j < live; j++)
                    ds[j] = round16(type, (float)(p[j] * (dp[j] - (double)(float)D)));
                for (int d = 0; d < HS; d++) {
                    double acc = 0.0;
                    for (int j = 0; j < live; j++)
                        acc += (double)ds[j] * round16(type, k[kb + (size_t)j * kvrow + (size_t)d]);
                    dq[qb + (size_t)t * qrow + (size_t)d] += (float)(scale * acc);
                }
                for (int j = 0; j < live; j++)
                    for (int d = 0; d < HS; d++) {
                        size_t at = kb + (size_t)j * kvrow + (size_t)d;
                        dk[at] += (float)(scale * (double)ds[j] * round16(type, qt[d]));
                        dv[at] += (float)((double)p[j] * round16(type, dot[d]));
                    }
            }
        }
    free(p);
    free(ds);
    free(dp);
}

/* One case in one type, with S and P capped at sp_cap: forward and
 * backward (into random gradients) against both references. */
static void run_case(const attn_case *c, gemm_type type, size_t sp_cap) {
    const backend *cpu = backend_cpu();
    char shape[160], err[ERR_LEN] = "";
    snprintf(shape, sizeof shape, "%s B %d T %d NH %d NKV %d HS %d len %d,%d,%d cap %zu",
             type == GEMM_F16 ? "fp16" : "bf16", c->B, c->T, c->NH, c->NKV, c->HS, c->lengths[0],
             c->lengths[1], c->B > 2 ? c->lengths[2] : 0, sp_cap);
    size_t T = (size_t)c->T;
    size_t nq = (size_t)c->B * T * (size_t)c->NH * (size_t)c->HS;
    size_t nkv = (size_t)c->B * T * (size_t)c->NKV * (size_t)c->HS;
    float *q = tu_rand_floats(&rng_state, nq, 1.5f), *k = tu_rand_floats(&rng_state, nkv, 1.5f);
    float *v = tu_rand_floats(&rng_state, nkv, 1.0f);
    float *dout = tu_rand_floats(&rng_state, nq, 1.0f);
    float *scratch = malloc(2 * T * T * sizeof *scratch);
    assert_non_null(scratch);
    int *len = malloc(sizeof c->lengths);
    assert_non_null(len);
    memcpy(len, c->lengths, sizeof c->lengths);
    gemm_ctx *g = NULL;
    assert_int_equal(gemm_ctx_new(NULL, 0, &g, err, sizeof err), 0);
    attn_gemm_plan plan;
    attn_gemm_ws ws = {NULL, 0};
    if (attn_gemm_plan_make(&plan, c->B, c->T, c->NH, c->NKV, c->HS, true, sp_cap, err,
                            sizeof err) != 0 ||
        attn_gemm_reserve(&ws, plan.ws_bytes, NULL, err, sizeof err) != 0)
        fail_msg("plan (%s): %s", shape, err);
    double *w_round = &worst_seen[0], *w_lp = &worst_seen[type == GEMM_F16 ? 2 : 1];
    double lp_tol = type == GEMM_F16 ? FP16_TOL : BF16_TOL;

    float *got = tu_rand_floats(&rng_state, nq, 1.0f), *ref = tu_rand_floats(&rng_state, nq, 1.0f);
    float *cpu_out = tu_rand_floats(&rng_state, nq, 1.0f);
    if (attn_gemm_forward(&plan, &ws, g, type, got, q, k, v, len, NULL, err, sizeof err) != 0)
        fail_msg("attn_gemm_forward (%s): %s", shape, err);
    ref_rounded(type, c, q, k, v, NULL, ref, NULL, NULL, NULL);
    cpu->attention(cpu_out, q, k, v, len, c->B, c->T, c->NH, c->NKV, c->HS, scratch);
    expect_close(got, ref, nq, ROUNDED_TOL, "out vs rounded", shape, w_round);
    expect_close(got, cpu_out, nq, lp_tol, "out vs fp32", shape, w_lp);

    float *dq0 = tu_rand_floats(&rng_state, nq, 1.0f), *dk0 = tu_rand_floats(&rng_state, nkv, 1.0f);
    float *dv0 = tu_rand_floats(&rng_state, nkv, 1.0f);
    float *dq = tu_dup_floats(dq0, nq), *dk = tu_dup_floats(dk0, nkv);
    float *dv = tu_dup_floats(dv0, nkv);
    float *rq = tu_dup_floats(dq0, nq), *rk = tu_dup_floats(dk0, nkv);
    float *rv = tu_dup_floats(dv0, nkv);
    float *cq = tu_dup_floats(dq0, nq), *ck = tu_dup_floats(dk0, nkv);
    float *cv = tu_dup_floats(dv0, nkv);
    if (attn_gemm_backward(&plan, &ws, g, type, dq, dk, dv, dout, q, k, v, len, NULL, err,
                           sizeof err) != 0)
        fail_msg("attn_gemm_backward (%s): %s", shape, err);
    ref_rounded(type, c, q, k, v, dout, ref, rq, rk, rv);
    cpu->attention_backward(cq, ck, cv, dout, q, k, v, len, c->B, c->T, c->NH, c->NKV, c->HS,
                            scratch);
    /* Compare the gradients themselves (minus the initial values), so the
     * tolerance is relative to their scale rather than the initial ones'. */
    float *grads[3][4] = {{dq, rq, cq, dq0}, {dk, rk, ck, dk0}, {dv, rv, cv, dv0}};
    size_t ns[3] = {nq, nkv, nkv};
    const char *names[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        size_t n = ns[i];
        float *dg = malloc(n * sizeof *dg), *dr = malloc(n * sizeof *dr);
        float *dc = malloc(n * sizeof *dc);
        assert_true(dg && dr && dc);
        for (size_t e = 0; e < n; e++) {
            dg[e] = grads[i][0][e] - grads[i][3][e];
            dr[e] = grads[i][1][e] - grads[i][3][e];
            dc[e] = grads[i][2][e] - grads[i][3][e];
        }
        char what[64];
        snprintf(what, sizeof what, "%s vs rounded", names[i]);
        expect_close(dg, dr, n, ROUNDED_TOL, what, shape, w_round);
        snprintf(what, sizeof what, "%s vs fp32", names[i]);
        expect_close(dg, dc, n, lp_tol, what, shape, w_lp);
        free(dg);
        free(dr);
        free(dc);
    }
    /* Rows past the length: dq keeps its values; keys past it get nothing. */
    size_t qrow = (size_t)c->NH * (size_t)c->HS, kvrow = (size_t)c->NKV * (size_t)c->HS;
    for (int b = 0; b < c->B; b++)
        for (size_t t = (size_t)c->lengths[b]; t < T; t++) {
            size_t qo = ((size_t)b * T + t) * qrow, ko = ((size_t)b * T + t) * kvrow;
            assert_memory_equal(dq + qo, dq0 + qo, qrow * sizeof(float));
            assert_memory_equal(dk + ko, dk0 + ko, kvrow * sizeof(float));
            assert_memory_equal(dv + ko, dv0 + ko, kvrow * sizeof(float));
        }
    float **all[] = {&q, &k, &v, &dout, &scratch, &got, &ref, &cpu_out, &dq0, &dk0, &dv0,
                     &dq, &dk, &dv, &rq, &rk, &rv, &cq, &ck, &cv};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(*all[i]);
    free(len);
    attn_gemm_ws_free(&ws);
    gemm_ctx_free(g);
}

static const attn_case cases[] = {
    {2, 1, 4, 2, 16, {1, 1, 0}},
    {3, 5, 4, 4, 64, {1, 5, 3}},
    {2, 33, 4, 2, 16, {33, 17, 0}},
    {3, 64, 4, 2, 128, {64, 1, 40}},
    {2, 100, 4, 4, 16, {100, 63, 0}},
    {3, 100, 4, 2, 64, {7, 100, 99}},
};

static void test_attention_bf16(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_case(&cases[i], GEMM_BF16, ATTN_GEMM_SP_CAP);
}

static void test_attention_fp16(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_case(&cases[i], GEMM_F16, ATTN_GEMM_SP_CAP);
}

/* One head's S and P per product: the chunk loop over kv heads. */
static void test_attention_one_head_chunks(void **state) {
    (void)state;
    const attn_case c = {2, 70, 4, 2, 16, {70, 31, 0}};
    size_t per_head = (size_t)70 * 72 * 6;
    run_case(&c, GEMM_BF16, per_head);
    const attn_case m = {2, 65, 4, 4, 64, {12, 65, 0}};
    run_case(&m, GEMM_F16, 3 * (size_t)65 * 72 * 6);
}

/* --- the backend's dispatch ------------------------------------------------ */

/* be->attention and attention_backward on device copies, results to host. */
static void backend_attention(const backend *be, const attn_case *c, const float *q,
                              const float *k, const float *v, const float *dout, float *out,
                              float *dq, float *dk, float *dv) {
    char err[ERR_LEN] = "";
    size_t T = (size_t)c->T;
    size_t nq = (size_t)c->B * T * (size_t)c->NH * (size_t)c->HS;
    size_t nkv = (size_t)c->B * T * (size_t)c->NKV * (size_t)c->HS;
    size_t sizes[] = {nq, nkv, nkv, nq, nq, nq, nkv, nkv, 2 * T * T};
    float *d[9];
    for (int i = 0; i < 9; i++) {
        d[i] = be->alloc(sizes[i] * sizeof(float), err, sizeof err);
        assert_non_null(d[i]);
    }
    int *dlen = be->alloc(sizeof c->lengths, err, sizeof err);
    assert_non_null(dlen);
    be->upload(d[0], q, nq * sizeof(float));
    be->upload(d[1], k, nkv * sizeof(float));
    be->upload(d[2], v, nkv * sizeof(float));
    be->upload(d[3], dout, nq * sizeof(float));
    be->upload(dlen, c->lengths, sizeof c->lengths);
    be->zero(d[5], nq);
    be->zero(d[6], nkv);
    be->zero(d[7], nkv);
    be->attention(d[4], d[0], d[1], d[2], dlen, c->B, c->T, c->NH, c->NKV, c->HS, d[8]);
    be->attention_backward(d[5], d[6], d[7], d[3], d[0], d[1], d[2], dlen, c->B, c->T, c->NH,
                           c->NKV, c->HS, d[8]);
    be->download(out, d[4], nq * sizeof(float));
    be->download(dq, d[5], nq * sizeof(float));
    be->download(dk, d[6], nkv * sizeof(float));
    be->download(dv, d[7], nkv * sizeof(float));
    if (cuda_backend_sync(err, sizeof err) != 0) fail_msg("backend attention: %s", err);
    for (int i = 0; i < 9; i++) be->free_buf(d[i]);
    be->free_buf(dlen);
}

/* What each path gives on its own: the gemm path in type, or (type F32)
 * the flash kernels. */
static void direct_attention(gemm_type type, const attn_case *c, const float *q, const float *k,
                             const float *v, const float *dout, float *out, float *dq, float *dk,
                             float *dv) {
    char err[ERR_LEN] = "";
    size_t T = (size_t)c->T;
    size_t nq = (size_t)c->B * T * (size_t)c->NH * (size_t)c->HS;
    size_t nkv = (size_t)c->B * T * (size_t)c->NKV * (size_t)c->HS;
    memset(dq, 0, nq * sizeof *dq);
    memset(dk, 0, nkv * sizeof *dk);
    memset(dv, 0, nkv * sizeof *dv);
    if (type == GEMM_F32) {
        float *scratch = malloc(2 * T * T * sizeof *scratch);
        assert_non_null(scratch);
        assert_int_equal(cuk_attention(out, q, k, v, c->lengths, c->B, c->T, c->NH, c->NKV,
                                       c->HS, scratch, NULL, err, sizeof err), 0);
        assert_int_equal(cuk_attention_backward(dq, dk, dv, dout, q, k, v, c->lengths, c->B,
                                                c->T, c->NH, c->NKV, c->HS, scratch, NULL, err,
                                                sizeof err), 0);
        free(scratch);
        return;
    }
    gemm_ctx *g = NULL;
    assert_int_equal(gemm_ctx_new(NULL, 0, &g, err, sizeof err), 0);
    attn_gemm_plan plan;
    attn_gemm_ws ws = {NULL, 0};
    assert_int_equal(attn_gemm_plan_make(&plan, c->B, c->T, c->NH, c->NKV, c->HS, true,
                                         ATTN_GEMM_SP_CAP, err, sizeof err), 0);
    assert_int_equal(attn_gemm_reserve(&ws, plan.ws_bytes, NULL, err, sizeof err), 0);
    assert_int_equal(attn_gemm_forward(&plan, &ws, g, type, out, q, k, v, c->lengths, NULL, err,
                                       sizeof err), 0);
    assert_int_equal(attn_gemm_backward(&plan, &ws, g, type, dq, dk, dv, dout, q, k, v,
                                        c->lengths, NULL, err, sizeof err), 0);
    attn_gemm_ws_free(&ws);
    gemm_ctx_free(g);
}

/* Whether the backend's four results equal a direct path's bit for bit. */
static bool same_bits(const attn_case *c, float *const got[4], float *const want[4]) {
    size_t T = (size_t)c->T;
    size_t nq = (size_t)c->B * T * (size_t)c->NH * (size_t)c->HS;
    size_t nkv = (size_t)c->B * T * (size_t)c->NKV * (size_t)c->HS;
    size_t ns[4] = {nq, nq, nkv, nkv};
    for (int i = 0; i < 4; i++)
        if (memcmp(got[i], want[i], ns[i] * sizeof(float)) != 0) return false;
    return true;
}

static void check_dispatch(cuda_precision prec, const attn_case *c, bool want_gemm) {
    char err[ERR_LEN] = "";
    size_t T = (size_t)c->T;
    size_t nq = (size_t)c->B * T * (size_t)c->NH * (size_t)c->HS;
    size_t nkv = (size_t)c->B * T * (size_t)c->NKV * (size_t)c->HS;
    float *q = tu_rand_floats(&rng_state, nq, 1.5f), *k = tu_rand_floats(&rng_state, nkv, 1.5f);
    float *v = tu_rand_floats(&rng_state, nkv, 1.0f);
    float *dout = tu_rand_floats(&rng_state, nq, 1.0f);
    float *got[4], *gemm_r[4], *flash_r[4];
    size_t ns[4] = {nq, nq, nkv, nkv};
    for (int i = 0; i < 4; i++) {
        got[i] = malloc(ns[i] * sizeof(float));
        gemm_r[i] = malloc(ns[i] * sizeof(float));
        flash_r[i] = malloc(ns[i] * sizeof(float));
        assert_true(got[i] && gemm_r[i] && flash_r[i]);
    }
    const backend *be = cuda_backend_open(0, prec, err, sizeof err);
    if (!be) fail_msg("cuda_backend_open: %s", err);
    backend_attention(be, c, q, k, v, dout, got[0], got[1], got[2], got[3]);
    cuda_backend_close();
    gemm_type low = prec == CUDA_FP16 ? GEMM_F16 : GEMM_BF16;
    direct_attention(low, c, q, k, v, dout, gemm_r[0], gemm_r[1], gemm_r[2], gemm_r[3]);
    direct_attention(GEMM_F32, c, q, k, v, dout, flash_r[0], flash_r[1], flash_r[2], flash_r[3]);
    assert_false(same_bits(c, gemm_r, flash_r));
    if (want_gemm) {
        if (!same_bits(c, got, gemm_r))
            fail_msg("%s T %d: the backend did not take the gemm path",
                     cuda_precision_name(prec), c->T);
    } else if (!same_bits(c, got, flash_r)) {
        fail_msg("%s T %d: the backend did not take the flash kernels",
                 cuda_precision_name(prec), c->T);
    }
    for (int i = 0; i < 4; i++) {
        free(got[i]);
        free(gemm_r[i]);
        free(flash_r[i]);
    }
    free(q);
    free(k);
    free(v);
    free(dout);
}

static void test_backend_dispatch(void **state) {
    (void)state;
    const attn_case at = {2, ATTN_GEMM_MIN_T, 4, 2, 16, {ATTN_GEMM_MIN_T, 20, 0}};
    const attn_case above = {2, 90, 4, 4, 16, {90, 45, 0}};
    const attn_case below = {2, ATTN_GEMM_MIN_T - 1, 4, 2, 16, {ATTN_GEMM_MIN_T - 1, 9, 0}};
    check_dispatch(CUDA_BF16, &at, true);
    check_dispatch(CUDA_BF16, &above, true);
    check_dispatch(CUDA_FP16, &above, true);
    check_dispatch(CUDA_BF16, &below, false);
    check_dispatch(CUDA_FP32, &above, false);
}

static int report_worst(void **state) {
    (void)state;
    fprintf(stderr, "worst relative error: vs rounded %.3g (tol %g), bf16 vs fp32 %.3g (tol %g), "
                    "fp16 vs fp32 %.3g (tol %g)\n",
            worst_seen[0], ROUNDED_TOL, worst_seen[1], BF16_TOL, worst_seen[2], FP16_TOL);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan),
        cmocka_unit_test(test_gemm_strided_batched),
        cmocka_unit_test(test_attention_bf16),
        cmocka_unit_test(test_attention_fp16),
        cmocka_unit_test(test_attention_one_head_chunks),
        cmocka_unit_test(test_backend_dispatch),
    };
    return cmocka_run_group_tests(tests, NULL, report_worst);
}
