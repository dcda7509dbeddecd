/* test_ops.c - the CPU backend's ops (worker/engine/cpu.c) against
 * tests/fixtures/ops/, written by gen_ops.py with PyTorch following Hugging
 * Face's LLaMA definitions.
 *
 * Tolerance: for each output tensor, max |C - expected| <= 1e-5 * max
 * |expected| (OPS_REL_TOL): the C side computes in float32 from the same
 * float32 inputs, the reference in float64 (RoPE: float32, as HF does). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/testutil.h"
#include "common/npy.h"
#include "common/util.h"
#include "worker/engine/backend.h"

#define OPS_REL_TOL 1e-5

static char fixture_dir[PATH_MAX + 64];
static json_t *cases;

/* Where this test's fixtures are (testutil.h). */
static void find_fixtures(void) {
    tu_fixture_path(fixture_dir, sizeof fixture_dir, "ops");
}

static int setup_all(void **state) {
    (void)state;
    find_fixtures();
    char path[PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/ops.json", fixture_dir);
    json_error_t jerr;
    cases = json_load_file(path, 0, &jerr);
    if (!cases) fprintf(stderr, "%s: %s\n", path, jerr.text);
    return cases ? 0 : -1;
}

static int teardown_all(void **state) {
    (void)state;
    json_decref(cases);
    return 0;
}

/* Reads fixture name.npy as float32 (caller frees); asserts its element count. */
static float *load(const char *name, size_t expect_count) {
    char path[PATH_MAX + 128], err[ERR_LEN];
    snprintf(path, sizeof path, "%s/%s.npy", fixture_dir, name);
    double *d = NULL;
    npy_header h;
    if (npy_read_f64(path, &d, &h, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
    assert_int_equal(h.rows * h.cols, expect_count);
    float *f = malloc(expect_count * sizeof *f);
    assert_non_null(f);
    for (size_t i = 0; i < expect_count; i++) f[i] = (float)d[i];
    free(d);
    return f;
}

static int case_int(const char *op, const char *key) {
    json_t *v = json_object_get(json_object_get(cases, op), key);
    assert_true(json_is_integer(v));
    return (int)json_integer_value(v);
}

static double case_real(const char *op, const char *key) {
    json_t *v = json_object_get(json_object_get(cases, op), key);
    assert_true(json_is_number(v));
    return json_number_value(v);
}

/* Asserts got is within OPS_REL_TOL of the fixture name (relative to its
 * largest magnitude); every value must be finite. */
static void expect_close(const char *name, const float *got, size_t count) {
    float *want = load(name, count);
    double scale = 0.0, worst = 0.0;
    for (size_t i = 0; i < count; i++)
        if (fabs(want[i]) > scale) scale = fabs(want[i]);
    for (size_t i = 0; i < count; i++) {
        if (!isfinite(got[i])) fail_msg("%s[%zu] = %g is not finite", name, i, got[i]);
        double diff = fabs((double)got[i] - want[i]);
        if (diff > worst) worst = diff;
    }
    if (worst > OPS_REL_TOL * scale)
        fail_msg("%s: max error %g > %g * %g", name, worst, OPS_REL_TOL, scale);
    free(want);
}

static void test_matmul(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    size_t N = (size_t)case_int("matmul", "N"), in = (size_t)case_int("matmul", "in"),
           out = (size_t)case_int("matmul", "out");
    float *x = load("matmul_x", N * in), *w = load("matmul_w", out * in);
    float *y = load("matmul_y0", N * out);
    be->matmul(y, x, w, N, in, out, true);
    expect_close("matmul_acc_expected", y, N * out);
    /* Without accumulate, whatever y held is overwritten. */
    for (size_t i = 0; i < N * out; i++) y[i] = NAN;
    be->matmul(y, x, w, N, in, out, false);
    expect_close("matmul_expected", y, N * out);
    free(x), free(w), free(y);
}

static void test_rmsnorm(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    size_t N = (size_t)case_int("rmsnorm", "N"), C = (size_t)case_int("rmsnorm", "C");
    float eps = (float)case_real("rmsnorm", "eps");
    float *x = load("rmsnorm_x", N * C), *w = load("rmsnorm_w", C);
    float *out = calloc(N * C, sizeof *out);
    assert_non_null(out);
    be->rmsnorm(out, x, w, N, C, eps);
    expect_close("rmsnorm_expected", out, N * C);
    be->rmsnorm(x, x, w, N, C, eps); /* in place */
    expect_close("rmsnorm_expected", x, N * C);
    free(x), free(w), free(out);
}

static void rope_case(const char *name) {
    const backend *be = backend_cpu();
    int N = case_int(name, "N"), nheads = case_int(name, "nheads"), HS = case_int(name, "HS");
    float theta = (float)case_real(name, "theta");
    json_t *jpos = json_object_get(cases, "rope_positions");
    assert_int_equal(json_array_size(jpos), (size_t)N);
    int pos[64];
    assert_true(N <= 64);
    for (int i = 0; i < N; i++) pos[i] = (int)json_integer_value(json_array_get(jpos, (size_t)i));
    size_t count = (size_t)N * (size_t)nheads * (size_t)HS;
    float *x = load("rope_x", count);
    be->rope(x, pos, (size_t)N, nheads, HS, theta);
    char expected[64];
    snprintf(expected, sizeof expected, "%s_expected", name);
    expect_close(expected, x, count);
    free(x);
}

static void test_rope(void **state) {
    (void)state;
    rope_case("rope_t1e4");
    rope_case("rope_t5e5");
}

/* poison_padding: NaN in every padding key and value, which must not reach
 * any row (real or padding) because keys past a length are never read. */
static void attention_case(bool poison_padding) {
    const backend *be = backend_cpu();
    int B = case_int("attention", "B"), T = case_int("attention", "T"),
        NH = case_int("attention", "NH"), NKV = case_int("attention", "NKV"),
        HS = case_int("attention", "HS");
    json_t *jlen = json_object_get(json_object_get(cases, "attention"), "lengths");
    int lengths[16];
    assert_true(B <= 16);
    assert_int_equal(json_array_size(jlen), (size_t)B);
    for (int b = 0; b < B; b++) lengths[b] = (int)json_integer_value(json_array_get(jlen, (size_t)b));
    size_t rows = (size_t)B * (size_t)T, qd = (size_t)NH * (size_t)HS, kvd = (size_t)NKV * (size_t)HS;
    float *q = load("attention_q", rows * qd), *k = load("attention_k", rows * kvd),
          *v = load("attention_v", rows * kvd);
    if (poison_padding)
        for (int b = 0; b < B; b++)
            for (int t = lengths[b]; t < T; t++)
                for (size_t i = 0; i < kvd; i++) {
                    k[((size_t)b * (size_t)T + (size_t)t) * kvd + i] = NAN;
                    v[((size_t)b * (size_t)T + (size_t)t) * kvd + i] = NAN;
                }
    float *out = calloc(rows * qd, sizeof *out), *scratch = calloc((size_t)T * (size_t)T, sizeof *scratch);
    assert_non_null(out);
    assert_non_null(scratch);
    be->attention(out, q, k, v, lengths, B, T, NH, NKV, HS, scratch);
    expect_close("attention_expected", out, rows * qd);
    free(q), free(k), free(v), free(out), free(scratch);
}

static void test_attention(void **state) {
    (void)state;
    attention_case(false);
}

static void test_attention_padding_never_read(void **state) {
    (void)state;
    attention_case(true);
}

static void test_swiglu(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    size_t n = (size_t)case_int("swiglu", "N") * (size_t)case_int("swiglu", "FF");
    float *g = load("swiglu_gate", n), *u = load("swiglu_up", n);
    be->swiglu(g, u, n);
    expect_close("swiglu_expected", g, n);
    free(g), free(u);
}

static void test_embedding(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    size_t V = (size_t)case_int("embedding", "V"), C = (size_t)case_int("embedding", "C");
    json_t *jt = json_object_get(json_object_get(cases, "embedding"), "tokens");
    size_t N = json_array_size(jt);
    int tokens[16];
    assert_true(N > 0 && N <= 16);
    for (size_t i = 0; i < N; i++) tokens[i] = (int)json_integer_value(json_array_get(jt, i));
    float *table = load("embedding_table", V * C), *out = calloc(N * C, sizeof *out);
    assert_non_null(out);
    be->embedding(out, tokens, table, N, C);
    expect_close("embedding_expected", out, N * C);
    free(table), free(out);
}

static void test_residual_add(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    float x[5] = {1.5f, -2.0f, 0.0f, 1e30f, -0.25f};
    const float y[5] = {2.25f, 2.0f, -3.5f, 1e30f, 0.125f};
    const float want[5] = {3.75f, 0.0f, -3.5f, 2e30f, -0.125f};
    be->residual_add(x, y, 5);
    for (int i = 0; i < 5; i++) assert_true(x[i] == want[i]);
}

static void test_alloc_and_copies(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    char err[ERR_LEN];
    assert_string_equal(be->name, "cpu");
    assert_true(be->host_memory);
    float host[33], back[33];
    for (int i = 0; i < 33; i++) host[i] = (float)i * 0.5f - 3.0f;
    float *buf = be->alloc(sizeof host, err, sizeof err);
    assert_non_null(buf);
    assert_int_equal((uintptr_t)buf % 64, 0);
    be->upload(buf, host, sizeof host);
    memset(back, 0, sizeof back);
    be->download(back, buf, sizeof back);
    assert_memory_equal(back, host, sizeof host);
    be->free_buf(buf);
    /* A request no allocator can meet fails with a message, not a crash. */
    err[0] = '\0';
    assert_null(be->alloc(SIZE_MAX - 4096, err, sizeof err));
    assert_non_null(strstr(err, "out of memory"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_padding_never_read),
        cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_residual_add),
        cmocka_unit_test(test_alloc_and_copies),
    };
    return cmocka_run_group_tests(tests, setup_all, teardown_all);
}
