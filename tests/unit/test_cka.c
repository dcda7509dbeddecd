/* test_cka.c - the CKA engine against tests/fixtures/cka/expected.json,
 * written by gen_cka.py from independent numpy formulas.
 *
 * Tolerance: 1e-9 relative for every dtype. The reference reads the same
 * stored float16/float32/float64 values converted to float64, so the inputs
 * are identical and only the order of float64 operations differs. Each case
 * runs in feature space and Gram space (linear), and with x and y read side
 * by side into one buffer (the one-dsyrk path). */
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

#include "common/npy.h"
#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/cka.h"
#include "worker/runner.h"

#define CKA_REL_TOL 1e-9

static char fixture_dir[PATH_MAX + 64];

/* The fixture cases (tu_cka_cases), at least 20 of them. */
static json_t *load_cases(void) {
    json_t *cases = tu_cka_cases();
    assert_true(json_array_size(cases) >= 20);
    return cases;
}

/* Runs one case with x and y in separate buffers (joint = false) or side by
 * side in one buffer. Returns cka_compute's code; err/res filled. */
static int run_case(json_t *c, cka_space space, bool joint, cka_result *res, char *err,
                    size_t errlen) {
    char xp[2 * PATH_MAX], yp[2 * PATH_MAX];
    tu_cka_case_paths(c, xp, yp, sizeof xp);
    cka_options opt = tu_cka_case_options(c, space);
    npy_header hx, hy;
    int rc;
    if (!joint) {
        double *x = NULL, *y = NULL;
        assert_int_equal(npy_read_f64(xp, &x, &hx, err, errlen), 0);
        assert_int_equal(npy_read_f64(yp, &y, &hy, err, errlen), 0);
        cka_matrix mx = {x, hx.rows, hx.cols, hx.cols};
        cka_matrix my = {y, hy.rows, hy.cols, hy.cols};
        rc = cka_compute(&mx, &my, &opt, NULL, res, err, errlen);
        free(x);
        free(y);
        return rc;
    }
    assert_int_equal(npy_read_header(xp, &hx, err, errlen), 0);
    assert_int_equal(npy_read_header(yp, &hy, err, errlen), 0);
    assert_int_equal(hx.rows, hy.rows);
    size_t stride = hx.cols + hy.cols;
    double *xy = malloc(hx.rows * stride * sizeof(double));
    assert_non_null(xy);
    assert_int_equal(npy_read_f64_into(xp, &hx, xy, stride, err, errlen), 0);
    assert_int_equal(npy_read_f64_into(yp, &hy, xy + hx.cols, stride, err, errlen), 0);
    cka_matrix mx = {xy, hx.rows, hx.cols, stride};
    cka_matrix my = {xy + hx.cols, hy.rows, hy.cols, stride};
    rc = cka_compute(&mx, &my, &opt, NULL, res, err, errlen);
    free(xy);
    return rc;
}

static void check_value(json_t *c, const cka_result *res, const char *how) {
    const char *name = json_string_value(json_object_get(c, "name"));
    double want = json_number_value(json_object_get(c, "cka"));
    double tol = CKA_REL_TOL * fabs(want);
    if (!(fabs(res->cka - want) <= tol))
        fail_msg("%s (%s): cka %.17g, expected %.17g (diff %.3g)", name, how, res->cka, want,
                 res->cka - want);
    assert_int_equal(res->n, json_integer_value(json_object_get(c, "n")));
    assert_int_equal(res->dropped_rows, json_integer_value(json_object_get(c, "dropped_rows")));
}

static void test_fixture_values(void **state) {
    (void)state;
    json_t *cases = load_cases();
    size_t i, checked = 0;
    json_t *c;
    json_array_foreach(cases, i, c) {
        if (json_object_get(c, "error")) continue;
        char err[ERR_LEN] = "";
        cka_result res;
        const char *name = json_string_value(json_object_get(c, "name"));
        bool linear = strcmp(json_string_value(json_object_get(c, "kernel")), "linear") == 0;
        if (run_case(c, CKA_SPACE_AUTO, false, &res, err, sizeof err) != 0)
            fail_msg("%s: %s", name, err);
        check_value(c, &res, "auto");
        if (linear) {
            assert_int_equal(run_case(c, CKA_SPACE_FEATURE, false, &res, err, sizeof err), 0);
            assert_false(res.gram_space);
            check_value(c, &res, "feature space");
            assert_int_equal(run_case(c, CKA_SPACE_GRAM, false, &res, err, sizeof err), 0);
            assert_true(res.gram_space);
            check_value(c, &res, "gram space");
            assert_int_equal(run_case(c, CKA_SPACE_FEATURE, true, &res, err, sizeof err), 0);
            check_value(c, &res, "feature space, one buffer");
        }
        assert_int_equal(run_case(c, CKA_SPACE_AUTO, true, &res, err, sizeof err), 0);
        check_value(c, &res, "auto, one buffer");
        checked++;
    }
    assert_true(checked >= 15);
    json_decref(cases);
}

static void test_fixture_errors(void **state) {
    (void)state;
    json_t *cases = load_cases();
    size_t i, checked = 0;
    json_t *c;
    json_array_foreach(cases, i, c) {
        json_t *want = json_object_get(c, "error");
        if (!want) continue;
        char err[ERR_LEN] = "";
        cka_result res;
        const char *name = json_string_value(json_object_get(c, "name"));
        if (run_case(c, CKA_SPACE_AUTO, false, &res, err, sizeof err) != -1)
            fail_msg("%s: expected an error, got cka %g", name, res.cka);
        if (!strstr(err, json_string_value(want)))
            fail_msg("%s: error \"%s\" lacks \"%s\"", name, err, json_string_value(want));
        checked++;
    }
    assert_true(checked >= 6);
    json_decref(cases);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The selection-based median equals sorting the full n x n matrix. */
static void test_full_median(void **state) {
    (void)state;
    unsigned seed = 12345;
    for (size_t n = 2; n <= 23; n++) {
        for (int trial = 0; trial < 20; trial++) {
            size_t count = n * (n - 1) / 2;
            double *upper = malloc(count * sizeof(double));
            double *full = malloc(n * n * sizeof(double));
            assert_non_null(upper);
            assert_non_null(full);
            size_t u = 0;
            for (size_t i = 0; i < n; i++) {
                full[i * n + i] = 0.0;
                for (size_t j = i + 1; j < n; j++) {
                    seed = seed * 1103515245u + 12345u;
                    /* few distinct values, so ties are common */
                    double v = (double)((seed >> 16) % (trial % 2 ? 5u : 1000u)) + 0.5;
                    full[i * n + j] = full[j * n + i] = v;
                    upper[u++] = v;
                }
            }
            qsort(full, n * n, sizeof(double), cmp_double);
            double want = n * n % 2 ? full[n * n / 2] : (full[n * n / 2 - 1] + full[n * n / 2]) / 2;
            double got = cka_full_median(upper, n);
            if (got != want) fail_msg("n=%zu trial=%d: median %g, want %g", n, trial, got, want);
            free(upper);
            free(full);
        }
    }
}

static double *random_matrix(size_t rows, size_t cols, unsigned *seed) {
    double *m = malloc(rows * cols * sizeof(double));
    assert_non_null(m);
    for (size_t i = 0; i < rows * cols; i++) {
        *seed = *seed * 1103515245u + 12345u;
        m[i] = ((double)((*seed >> 8) & 0xffff) / 65536.0 - 0.5) * 4.0;
    }
    return m;
}

/* CKA(X, X) = 1, CKA(X, a X Q + b) = CKA(X, X) for an orthogonal Q (a
 * permutation with sign flips), scale a and offset b: linear CKA's
 * invariances. */
static void test_invariances(void **state) {
    (void)state;
    unsigned seed = 7;
    const size_t n = 33, d = 6;
    const int perm[6] = {3, 0, 5, 1, 4, 2};
    for (int debiased = 0; debiased <= 1; debiased++) {
        double *x = random_matrix(n, d, &seed);
        double *y = malloc(n * d * sizeof(double));
        assert_non_null(y);
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < d; j++)
                y[i * d + j] = (j % 2 ? -3.0 : 3.0) * x[i * d + (size_t)perm[j]] + 100.0 * (double)j;
        cka_options opt = {CKA_LINEAR, debiased != 0, 1.0, CKA_SPACE_AUTO};
        cka_matrix mx = {x, n, d, d}, my = {y, n, d, d};
        cka_result res;
        char err[ERR_LEN];
        assert_int_equal(cka_compute(&mx, &my, &opt, NULL, &res, err, sizeof err), 0);
        assert_true(fabs(res.cka - 1.0) < 1e-12);
        free(x);
        free(y);
    }
}

static void test_cancel(void **state) {
    (void)state;
    unsigned seed = 99;
    double *x = random_matrix(20, 4, &seed), *y = random_matrix(20, 3, &seed);
    atomic_int cancel = 1;
    cka_options opt = {CKA_LINEAR, false, 1.0, CKA_SPACE_AUTO};
    cka_matrix mx = {x, 20, 4, 4}, my = {y, 20, 3, 3};
    cka_result res;
    char err[ERR_LEN] = "";
    assert_int_equal(cka_compute(&mx, &my, &opt, &cancel, &res, err, sizeof err), -1);
    assert_string_equal(err, "cancelled");
    free(x);
    free(y);
}

static void test_bad_options(void **state) {
    (void)state;
    unsigned seed = 5;
    double *x = random_matrix(10, 2, &seed), *y = random_matrix(10, 2, &seed);
    cka_matrix mx = {x, 10, 2, 2}, my = {y, 10, 2, 2};
    cka_result res;
    char err[ERR_LEN] = "";
    cka_options opt = {CKA_RBF, false, 0.0, CKA_SPACE_AUTO};
    assert_int_equal(cka_compute(&mx, &my, &opt, NULL, &res, err, sizeof err), -1);
    assert_non_null(strstr(err, "rbf_threshold must be positive"));
    opt.rbf_threshold = 1.0;
    opt.space = CKA_SPACE_FEATURE;
    assert_int_equal(cka_compute(&mx, &my, &opt, NULL, &res, err, sizeof err), -1);
    assert_non_null(strstr(err, "Gram space only"));
    free(x);
    free(y);
}

/* ---- the cka runner, with callbacks that map names to fixture files ---- */

/* {"job": 1}: layers 1, 2 of tall_f64_x (layer 2 is wide_f64_x to tell them
 * apart); {"job": 2}: layers 2, 3 of the y side. */
static int fixture_resolve_layers(runner_ctx *ctx, json_t *ref, runner_layer_file **files,
                                  size_t *n, char *err, size_t errlen) {
    (void)ctx;
    json_int_t job = json_integer_value(json_object_get(ref, "job"));
    if (job != 1 && job != 2) return err_set(err, errlen, "unknown job");
    runner_layer_file *f = calloc(2, sizeof *f);
    assert_non_null(f);
    const char *names[2][2] = {{"tall_f64_x.npy", "wide_f64_x.npy"},
                               {"wide_f64_y.npy", "tall_f64_y.npy"}};
    for (int i = 0; i < 2; i++) {
        f[i].layer = (int)job + i;
        int len = snprintf(f[i].path, sizeof f[i].path, "%s/%s", fixture_dir, names[job - 1][i]);
        assert_true(len > 0 && (size_t)len < sizeof f[i].path);
    }
    *files = f;
    *n = 2;
    return 0;
}

static int progress_calls;
static void count_progress(runner_ctx *ctx, int64_t step, int64_t total, const char *message) {
    (void)ctx;
    (void)message;
    assert_true(step >= 0 && step <= total);
    progress_calls++;
}

static int run_spec(const char *text, json_t **result, bool *retryable, char *err,
                    size_t errlen) {
    json_error_t jerr;
    json_t *spec = json_loads(text, 0, &jerr);
    assert_non_null(spec);
    runner_ctx ctx = {.resolve_file = tu_cka_resolve_file,
                      .resolve_layers = fixture_resolve_layers,
                      .progress = count_progress};
    bool cancelled = false;
    int rc = runner_run("cka", spec, &ctx, result, retryable, &cancelled, err, errlen);
    assert_false(cancelled);
    json_decref(spec);
    return rc;
}

static void test_runner_single(void **state) {
    (void)state;
    json_t *result = NULL;
    bool retryable = true;
    char err[ERR_LEN] = "";
    progress_calls = 0;
    int rc = run_spec("{\"x\": {\"path\": \"nan_rows_x.npy\"}, \"y\": {\"path\": \"nan_rows_y.npy\"},"
                      " \"debiased\": true}",
                      &result, &retryable, err, sizeof err);
    if (rc != 0) fail_msg("%s", err);
    assert_true(progress_calls >= 1);
    assert_string_equal(json_string_value(json_object_get(result, "kernel")), "linear");
    assert_true(json_is_true(json_object_get(result, "debiased")));
    assert_true(json_is_string(json_object_get(result, "blas_core")));
    json_t *layers = json_object_get(result, "layers");
    assert_int_equal(json_array_size(layers), 1);
    json_t *l0 = json_array_get(layers, 0);
    assert_true(json_is_null(json_object_get(l0, "layer")));
    double want = tu_cka_fixture_value("nan_rows_debiased");
    assert_true(fabs(json_real_value(json_object_get(l0, "cka")) - want) <= CKA_REL_TOL * want);
    assert_int_equal(json_integer_value(json_object_get(l0, "n")), 47);
    assert_int_equal(json_integer_value(json_object_get(l0, "dropped_rows")), 3);
    assert_true(json_real_value(json_object_get(l0, "seconds")) >= 0);
    json_decref(result);
}

static void test_runner_layers(void **state) {
    (void)state;
    json_t *result = NULL;
    bool retryable = true;
    char err[ERR_LEN] = "";
    /* Only layer 2 is on both sides: x's is wide_f64_x, y's is wide_f64_y. */
    int rc = run_spec("{\"x\": {\"job\": 1}, \"y\": {\"job\": 2}}", &result, &retryable, err,
                      sizeof err);
    if (rc != 0) fail_msg("%s", err);
    json_t *layers = json_object_get(result, "layers");
    assert_int_equal(json_array_size(layers), 1);
    json_t *l0 = json_array_get(layers, 0);
    assert_int_equal(json_integer_value(json_object_get(l0, "layer")), 2);
    double want = tu_cka_fixture_value("wide_f64");
    assert_true(fabs(json_real_value(json_object_get(l0, "cka")) - want) <= CKA_REL_TOL * want);
    json_decref(result);

    rc = run_spec("{\"x\": {\"job\": 1}, \"y\": {\"job\": 2}, \"layers\": [1]}", &result,
                  &retryable, err, sizeof err);
    assert_int_equal(rc, -1);
    assert_false(retryable);
    assert_string_equal(err, "layer 1 is not in y");
    rc = run_spec("{\"x\": {\"job\": 1}, \"y\": {\"path\": \"tall_f64_y.npy\"}}", &result,
                  &retryable, err, sizeof err);
    assert_int_equal(rc, -1);
    assert_non_null(strstr(err, "both be single matrices or both per-layer"));
}

static void test_runner_errors(void **state) {
    (void)state;
    json_t *result = NULL;
    bool retryable = true;
    char err[ERR_LEN] = "";
    assert_int_equal(run_spec("{\"x\": {\"path\": \"a\"}, \"kernel\": \"poly\"}", &result,
                              &retryable, err, sizeof err),
                     -1);
    assert_false(retryable);
    assert_non_null(strstr(err, "invalid spec:"));
    assert_non_null(strstr(err, "spec.kernel: must be"));
    assert_non_null(strstr(err, "spec.y: is required"));
    retryable = true;
    assert_int_equal(run_spec("{\"x\": {\"path\": \"expected.json\"}, \"y\": {\"path\": "
                              "\"tall_f64_y.npy\"}}",
                              &result, &retryable, err, sizeof err),
                     -1);
    assert_false(retryable);
    assert_non_null(strstr(err, "not an .npy file"));
    retryable = true;
    assert_int_equal(run_spec("{\"x\": {\"path\": \"err_rows_x.npy\"}, \"y\": {\"path\": "
                              "\"err_rows_y.npy\"}}",
                              &result, &retryable, err, sizeof err),
                     -1);
    assert_false(retryable);
    assert_string_equal(err, "x has 20 rows, y has 15");
    assert_int_equal(run_spec("{\"x\": {\"path\": \"missing.npy\"}, \"y\": {\"path\": "
                              "\"err_rows_y.npy\"}}",
                              &result, &retryable, err, sizeof err),
                     -1);
    assert_true(retryable); /* I/O trouble: another attempt may find the file */
    assert_null(result);
}

int main(void) {
    tu_fixture_path(fixture_dir, sizeof fixture_dir, "cka");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixture_values), cmocka_unit_test(test_fixture_errors),
        cmocka_unit_test(test_full_median),    cmocka_unit_test(test_invariances),
        cmocka_unit_test(test_cancel),         cmocka_unit_test(test_bad_options),
        cmocka_unit_test(test_runner_single),  cmocka_unit_test(test_runner_layers),
        cmocka_unit_test(test_runner_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
