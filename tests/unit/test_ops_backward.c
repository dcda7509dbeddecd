/* test_ops_backward.c - the CPU backend's backward ops (worker/engine/cpu.c)
 * against tests/fixtures/ops_backward/, written by gen_ops_backward.py with
 * PyTorch autograd in float64 from the same float32 inputs.
 *
 * Tolerance: for each gradient, max |C - expected| <= 1e-5 * max |expected|
 * (OPS_REL_TOL). Ops documented to accumulate start from a non-zero buffer
 * (PRESET in every element) and must end at PRESET + expected. */
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
#define PRESET 0.25f

static char fixture_dir[PATH_MAX + 64];
static json_t *meta;

/* Where this test's fixtures are (testutil.h). */
static void find_fixtures(void) {
    tu_fixture_path(fixture_dir, sizeof fixture_dir, "ops_backward");
}

static int setup_all(void **state) {
    (void)state;
    find_fixtures();
    char path[PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/ops_backward.json", fixture_dir);
    json_error_t jerr;
    meta = json_load_file(path, 0, &jerr);
    if (!meta) {
        fprintf(stderr, "%s: %s\n", path, jerr.text);
        return -1;
    }
    return 0;
}

static int teardown_all(void **state) {
    (void)state;
    json_decref(meta);
    return 0;
}

/* Fixture name.npy as rows x cols float32 (caller frees). */
static float *load(const char *name, size_t rows, size_t cols) {
    char path[PATH_MAX + 256], err[ERR_LEN];
    snprintf(path, sizeof path, "%s/%s.npy", fixture_dir, name);
    double *d = NULL;
    npy_header h;
    if (npy_read_f64(path, &d, &h, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
    if (h.rows != rows || h.cols != cols)
        fail_msg("%s: shape %zu x %zu, want %zu x %zu", name, h.rows, h.cols, rows, cols);
    float *f = malloc(rows * cols * sizeof *f);
    assert_non_null(f);
    for (size_t i = 0; i < rows * cols; i++) f[i] = (float)d[i];
    free(d);
    return f;
}

/* Asserts max |got - (offset + want)| <= OPS_REL_TOL * max |want|. */
static void check(const char *what, const float *got, const float *want, size_t n,
                  float offset) {
    double scale = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) fail_msg("%s[%zu] = %g", what, i, got[i]);
        if (fabs(want[i]) > scale) scale = fabs(want[i]);
        double d = fabs((double)got[i] - offset - want[i]);
        if (d > worst) worst = d;
    }
    assert_true(scale > 0.0);
    if (worst > OPS_REL_TOL * scale)
        fail_msg("%s: max error %g, %g relative (tolerance %g)", what, worst, worst / scale,
                 OPS_REL_TOL);
}

static float *filled(size_t n, float value) {
    float *f = malloc(n * sizeof *f);
    assert_non_null(f);
    for (size_t i = 0; i < n; i++) f[i] = value;
    return f;
}

static int geti(const char *op, const char *key) {
    return (int)json_integer_value(json_object_get(json_object_get(meta, op), key));
}

static double getd(const char *op, const char *key) {
    return json_number_value(json_object_get(json_object_get(meta, op), key));
}

static void get_ints(const char *op, const char *key, int *out, size_t n) {
    json_t *a = json_object_get(json_object_get(meta, op), key);
    assert_int_equal(json_array_size(a), n);
    for (size_t i = 0; i < n; i++) out[i] = (int)json_integer_value(json_array_get(a, i));
}

static void test_matmul_backward(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    size_t N = (size_t)geti("matmul", "N"), in = (size_t)geti("matmul", "in"),
           out = (size_t)geti("matmul", "out");
    float *x = load("matmul_x", N, in), *w = load("matmul_w", out, in),
          *dy = load("matmul_dy", N, out);
    float *edx = load("matmul_dx", N, in), *edw = load("matmul_dw", out, in);
    float *dx = filled(N * in, PRESET), *dw = filled(out * in, PRESET);
    be->matmul_backward(dx, dw, dy, x, w, N, in, out, true);
    check("dx (accumulated)", dx, edx, N * in, PRESET);
    check("dw", dw, edw, out * in, PRESET);
    /* Overwrite mode for dx, and a frozen weight (dw NULL). */
    be->matmul_backward(dx, NULL, dy, x, w, N, in, out, false);
    check("dx", dx, edx, N * in, 0.0f);
    free(x), free(w), free(dy), free(edx), free(edw), free(dx), free(dw);
}

static void test_rmsnorm_backward(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    size_t N = (size_t)geti("rmsnorm", "N"), C = (size_t)geti("rmsnorm", "C");
    float eps = (float)getd("rmsnorm", "eps");
    float *x = load("rmsnorm_x", N, C), *w = load("rmsnorm_w", C, 1),
          *dy = load("rmsnorm_dy", N, C);
    float *edx = load("rmsnorm_dx", N, C), *edw = load("rmsnorm_dw", C, 1);
    float *dx = filled(N * C, PRESET), *dw = filled(C, PRESET);
    be->rmsnorm_backward(dx, dw, dy, x, w, N, C, eps);
    check("dx", dx, edx, N * C, PRESET);
    check("dweight", dw, edw, C, PRESET);
    free(x), free(w), free(dy), free(edx), free(edw), free(dx), free(dw);
}

static void test_rope_backward(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    size_t N = (size_t)geti("rope", "N");
    int nh = geti("rope", "nheads"), HS = geti("rope", "HS");
    float theta = (float)getd("rope", "theta");
    int pos[16];
    assert_true(N <= 16);
    get_ints("rope", "pos", pos, N);
    float *dx = load("rope_dy", N, (size_t)(nh * HS)), *edx = load("rope_dx", N, (size_t)(nh * HS));
    float *cs = malloc(16 * (size_t)HS * sizeof *cs);
    assert_non_null(cs);
    be->rope_table(cs, 16, HS, theta);
    be->rope_backward_cached(dx, pos, N, nh, HS, cs);
    check("rope dx", dx, edx, N * (size_t)(nh * HS), 0.0f);
    /* Backward of the rotation undoes the forward rotation. */
    float *copy = malloc(N * (size_t)(nh * HS) * sizeof *copy);
    assert_non_null(copy);
    memcpy(copy, dx, N * (size_t)(nh * HS) * sizeof *copy);
    be->rope_cached(copy, pos, N, nh, HS, cs);
    be->rope_backward_cached(copy, pos, N, nh, HS, cs);
    for (size_t i = 0; i < N * (size_t)(nh * HS); i++) assert_true(fabsf(copy[i] - dx[i]) < 1e-5f);
    free(dx), free(edx), free(cs), free(copy);
}

static void test_attention_backward(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    int B = geti("attention", "B"), T = geti("attention", "T"), NH = geti("attention", "NH"),
        NKV = geti("attention", "NKV"), HS = geti("attention", "HS");
    int lengths[8];
    assert_true(B <= 8);
    get_ints("attention", "lengths", lengths, (size_t)B);
    size_t rows = (size_t)B * (size_t)T, qd = (size_t)(NH * HS), kvd = (size_t)(NKV * HS);
    float *q = load("attention_q", rows, qd), *k = load("attention_k", rows, kvd),
          *v = load("attention_v", rows, kvd), *dy = load("attention_dy", rows, qd);
    float *edq = load("attention_dq", rows, qd), *edk = load("attention_dk", rows, kvd),
          *edv = load("attention_dv", rows, kvd);
    float *dq = filled(rows * qd, PRESET), *dk = filled(rows * kvd, PRESET),
          *dv = filled(rows * kvd, PRESET);
    float *scratch = malloc(2 * (size_t)T * (size_t)T * sizeof *scratch);
    assert_non_null(scratch);
    be->attention_backward(dq, dk, dv, dy, q, k, v, lengths, B, T, NH, NKV, HS, scratch);
    check("dq", dq, edq, rows * qd, PRESET);
    check("dk", dk, edk, rows * kvd, PRESET);
    check("dv", dv, edv, rows * kvd, PRESET);
    free(q), free(k), free(v), free(dy), free(edq), free(edk), free(edv);
    free(dq), free(dk), free(dv), free(scratch);
}

static void test_swiglu_backward(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    size_t n = (size_t)geti("swiglu", "n");
    float *g = load("swiglu_gate", n, 1), *u = load("swiglu_up", n, 1),
          *dy = load("swiglu_dy", n, 1);
    float *edg = load("swiglu_dgate", n, 1), *edu = load("swiglu_dup", n, 1);
    float *dg = filled(n, PRESET), *du = filled(n, PRESET);
    be->swiglu_backward(dg, du, dy, g, u, n);
    check("dgate", dg, edg, n, 0.0f);
    check("dup", du, edu, n, 0.0f);
    /* dgate may alias dout. */
    be->swiglu_backward(dy, du, dy, g, u, n);
    check("dgate in place", dy, edg, n, 0.0f);
    free(g), free(u), free(dy), free(edg), free(edu), free(dg), free(du);
}

static void test_embedding_backward(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    size_t V = (size_t)geti("embedding", "V"), C = (size_t)geti("embedding", "C");
    int tokens[16];
    size_t N = json_array_size(json_object_get(json_object_get(meta, "embedding"), "tokens"));
    assert_true(N <= 16);
    get_ints("embedding", "tokens", tokens, N);
    float *dy = load("embedding_dy", N, C), *edt = load("embedding_dtable", V, C);
    float *dt = filled(V * C, PRESET);
    be->embedding_backward(dt, dy, tokens, N, C);
    check("dtable", dt, edt, V * C, PRESET);
    free(dy), free(edt), free(dt);
}

static void test_cross_entropy(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    size_t N = (size_t)geti("cross_entropy", "N"), V = (size_t)geti("cross_entropy", "V");
    float scale = (float)getd("cross_entropy", "scale");
    int targets[16];
    assert_true(N <= 16);
    get_ints("cross_entropy", "targets", targets, N);
    float *z = load("xent_z", N, V), *edz = load("xent_dz", N, V), *eloss = load("xent_loss", N, 1);
    double loss[16];
    be->cross_entropy(z, loss, targets, N, V, scale);
    check("dlogits", z, edz, N * V, 0.0f);
    for (size_t n = 0; n < N; n++) {
        if (targets[n] < 0) {
            assert_true(loss[n] == 0.0);
            for (size_t j = 0; j < V; j++) assert_true(z[n * V + j] == 0.0f);
        } else if (fabs(loss[n] - eloss[n]) > 1e-5 * fabs(eloss[n])) {
            fail_msg("row %zu loss %.9g, want %.9g", n, loss[n], (double)eloss[n]);
        }
    }
    free(z), free(edz), free(eloss);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_backward),    cmocka_unit_test(test_rmsnorm_backward),
        cmocka_unit_test(test_rope_backward),      cmocka_unit_test(test_attention_backward),
        cmocka_unit_test(test_swiglu_backward),    cmocka_unit_test(test_embedding_backward),
        cmocka_unit_test(test_cross_entropy),
    };
    return cmocka_run_group_tests(tests, setup_all, teardown_all);
}
