/* test_cudaemu_attention.c - the CUDA attention kernels (attention.cu), run
 * on the CPU by the emulator (tests/cuda_emu), against the CPU backend's
 * attention and attention_backward (cpu.c) on the same random inputs.
 *
 * Shapes: B 2..3, T 1..40 and 100 with lengths 1, T and values between (so
 * padding rows, partial tiles and several key tiles all occur), NH 4 over
 * NKV 2 (grouped) and NKV 4, HS 8, 16, 40, 64 and 256 (every per-lane width
 * the kernels instantiate). Small T with many heads also splits the
 * backward into several chunks (attn_plan.h).
 *
 * Tolerance: for each output tensor, max |cuda - cpu| <= 1e-5 * max |cpu|
 * (ATTN_REL_TOL): both compute in fp32 and differ only in summation order
 * and in how the softmax is normalised (online rescaling, logsumexp). The
 * backward runs twice: from zero gradients (the gradients themselves), and
 * from random gradients to check that dq, dk and dv accumulate (+=), rows
 * past the length included (they must keep their initial values). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/testutil.h"
#include "worker/engine/backend.h"
#include "worker/engine/cuda/kernels.h"

#define ATTN_REL_TOL 1e-5

/* xorshift64* in [-amp, amp), never exactly zero in practice. */
static float rnd(uint64_t *s, float amp) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    uint64_t x = *s * 2685821657736338717ull;
    return amp * ((float)(x >> 40) / (float)(1u << 24) * 2.0f - 1.0f);
}

/* Not tu_rand_floats: another generator (xorshift64*, 24-bit floats) whose
 * inputs the tolerance was measured on. */
static float *rnd_array(size_t n, uint64_t *s, float amp) {
    float *a = malloc(n * sizeof *a);
    assert_non_null(a);
    for (size_t i = 0; i < n; i++) a[i] = rnd(s, amp);
    return a;
}

/* Relative to max |want|, except that an all-zero want (dq when every row
 * has a single live key, so the softmax is constant: exactly zero on the
 * CPU, rounding-level on the GPU, whose D = dO.O is summed in another order
 * than dP) is compared absolutely, against the inputs' scale of 1. */
static void expect_close(const float *got, const float *want, size_t n, const char *what,
                         const char *shape) {
    double e = tu_rel_or_abs_err_ff(got, want, n, what);
    if (e > ATTN_REL_TOL) fail_msg("%s (%s): relative error %.3g > %g", what, shape, e, ATTN_REL_TOL);
}

typedef struct {
    int B, T, NH, NKV, HS;
    int lengths[3];
    float amp; /* of q and k: larger gives peakier softmax rows */
} attn_case;

/* One case: forward, backward from zero, backward accumulating, each
 * emulated kernel against the CPU backend. */
static void run_case(const attn_case *c, uint64_t seed) {
    const backend *cpu = backend_cpu();
    char shape[128], err[256] = "";
    snprintf(shape, sizeof shape, "B %d T %d NH %d NKV %d HS %d len %d,%d,%d", c->B, c->T, c->NH,
             c->NKV, c->HS, c->lengths[0], c->lengths[1], c->B > 2 ? c->lengths[2] : 0);
    size_t T = (size_t)c->T;
    size_t nq = (size_t)c->B * T * (size_t)c->NH * (size_t)c->HS;
    size_t nkv = (size_t)c->B * T * (size_t)c->NKV * (size_t)c->HS;
    uint64_t s = seed;
    float *q = rnd_array(nq, &s, c->amp), *k = rnd_array(nkv, &s, c->amp);
    float *v = rnd_array(nkv, &s, 1.0f), *dout = rnd_array(nq, &s, 1.0f);
    float *scratch = malloc(2 * T * T * sizeof *scratch);
    assert_non_null(scratch);
    /* what sits in scratch must not matter */
    for (size_t i = 0; i < 2 * T * T; i++) scratch[i] = NAN;

    float *want = rnd_array(nq, &s, 1.0f), *got = rnd_array(nq, &s, 1.0f);
    cpu->attention(want, q, k, v, c->lengths, c->B, c->T, c->NH, c->NKV, c->HS, scratch);
    for (size_t i = 0; i < 2 * T * T; i++) scratch[i] = NAN;
    if (cuk_attention(got, q, k, v, c->lengths, c->B, c->T, c->NH, c->NKV, c->HS, scratch, NULL,
                      err, sizeof err))
        fail_msg("cuk_attention (%s): %s", shape, err);
    expect_close(got, want, nq, "attention out", shape);

    for (int pass = 0; pass < 2; pass++) {
        /* pass 0 from zero, pass 1 from random gradients */
        float *dq0 = pass ? rnd_array(nq, &s, 1.0f) : calloc(nq, sizeof(float));
        float *dk0 = pass ? rnd_array(nkv, &s, 1.0f) : calloc(nkv, sizeof(float));
        float *dv0 = pass ? rnd_array(nkv, &s, 1.0f) : calloc(nkv, sizeof(float));
        assert_true(dq0 && dk0 && dv0);
        float *dq_w = tu_dup_floats(dq0, nq), *dk_w = tu_dup_floats(dk0, nkv);
        float *dv_w = tu_dup_floats(dv0, nkv);
        float *dq_g = tu_dup_floats(dq0, nq), *dk_g = tu_dup_floats(dk0, nkv);
        float *dv_g = tu_dup_floats(dv0, nkv);
        cpu->attention_backward(dq_w, dk_w, dv_w, dout, q, k, v, c->lengths, c->B, c->T, c->NH,
                                c->NKV, c->HS, scratch);
        for (size_t i = 0; i < 2 * T * T; i++) scratch[i] = NAN;
        if (cuk_attention_backward(dq_g, dk_g, dv_g, dout, q, k, v, c->lengths, c->B, c->T,
                                   c->NH, c->NKV, c->HS, scratch, NULL, err, sizeof err))
            fail_msg("cuk_attention_backward (%s): %s", shape, err);
        expect_close(dq_g, dq_w, nq, pass ? "dq (accumulated)" : "dq", shape);
        expect_close(dk_g, dk_w, nkv, pass ? "dk (accumulated)" : "dk", shape);
        expect_close(dv_g, dv_w, nkv, pass ? "dv (accumulated)" : "dv", shape);
        /* Rows past the length are skipped: their dq keeps its value, and
         * keys past the length get no gradient. */
        size_t qrow = (size_t)c->NH * (size_t)c->HS, kvrow = (size_t)c->NKV * (size_t)c->HS;
        for (int b = 0; b < c->B; b++)
            for (size_t t = (size_t)c->lengths[b]; t < T; t++) {
                size_t qo = ((size_t)b * T + t) * qrow, ko = ((size_t)b * T + t) * kvrow;
                assert_memory_equal(dq_g + qo, dq0 + qo, qrow * sizeof(float));
                assert_memory_equal(dk_g + ko, dk0 + ko, kvrow * sizeof(float));
                assert_memory_equal(dv_g + ko, dv0 + ko, kvrow * sizeof(float));
            }
        free(dq0);
        free(dk0);
        free(dv0);
        free(dq_w);
        free(dk_w);
        free(dv_w);
        free(dq_g);
        free(dk_g);
        free(dv_g);
    }
    free(q);
    free(k);
    free(v);
    free(dout);
    free(scratch);
    free(want);
    free(got);
}

static void test_grouped(void **state) {
    (void)state;
    static const attn_case cases[] = {
        {2, 40, 4, 2, 16, {40, 17, 0}, 1.0f}, {3, 40, 4, 2, 8, {1, 40, 23}, 1.0f},
        {2, 33, 4, 2, 64, {33, 32, 0}, 1.5f}, {3, 5, 4, 2, 16, {5, 1, 3}, 1.0f},
        {2, 1, 4, 2, 8, {1, 1, 0}, 1.0f},     {3, 38, 4, 2, 40, {2, 38, 31}, 2.0f},
        /* four tiles: masks across tile edges, dkv over several query tiles */
        {2, 100, 4, 2, 16, {100, 67, 0}, 2.0f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], 11 + i);
}

static void test_mha(void **state) {
    (void)state;
    static const attn_case cases[] = {
        {2, 40, 4, 4, 16, {40, 1, 0}, 1.0f}, {3, 35, 4, 4, 64, {9, 35, 34}, 1.0f},
        {2, 12, 4, 4, 8, {12, 6, 0}, 3.0f},  {3, 2, 4, 4, 16, {2, 1, 2}, 1.0f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], 101 + i);
}

/* LLaMA-sized heads: 128 and 256 dimensions (shared memory opted in). */
static void test_wide_heads(void **state) {
    (void)state;
    static const attn_case cases[] = {
        {2, 36, 4, 2, 128, {36, 20, 0}, 1.0f},
        {2, 34, 4, 4, 256, {3, 34, 0}, 1.0f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], 201 + i);
}

/* Refused shapes return -1 with a reason and write nothing. */
static void test_refusals(void **state) {
    (void)state;
    float out[4] = {1.0f, 2.0f, 3.0f, 4.0f}, in[4] = {0};
    int len[1] = {1};
    char err[256] = "";
    assert_int_equal(cuk_attention(out, in, in, in, len, 1, 1, 1, 1, 300, NULL, NULL, err,
                                   sizeof err),
                     -1);
    assert_non_null(strstr(err, "HS 300"));
    assert_int_equal(cuk_attention_backward(out, out, out, in, in, in, in, len, 1, 1, 3, 2, 4,
                                            NULL, NULL, err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "NKV 2"));
    assert_true(out[0] == 1.0f && out[3] == 4.0f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grouped),
        cmocka_unit_test(test_mha),
        cmocka_unit_test(test_wide_heads),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
