/* testutil - helpers shared by the unit tests (see testutil.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"
#include "tests/unit/testutil.h"

/* out = <directory of this file>/rel; fails the test if it does not fit. */
static void tu_source_path(char *out, size_t outlen, const char *rel) {
    const char *slash = strrchr(__FILE__, '/');
    int dirlen = slash ? (int)(slash - __FILE__) : 1;
    const char *dir = slash ? __FILE__ : ".";
    int n = snprintf(out, outlen, "%.*s/%s", dirlen, dir, rel);
    if (n < 0 || (size_t)n >= outlen) fail_msg("path too long: %s/%s", dir, rel);
}

void tu_fixture_path(char *out, size_t outlen, const char *rel) {
    const char *env = getenv("STRATA_FIXTURES");
    if (env && *env) {
        int n = snprintf(out, outlen, "%s%s%s", env, *rel ? "/" : "", rel);
        if (n < 0 || (size_t)n >= outlen) fail_msg("path too long: %s/%s", env, rel);
        return;
    }
    char sub[PATH_MAX];
    int n = snprintf(sub, sizeof sub, "../fixtures%s%s", *rel ? "/" : "", rel);
    if (n < 0 || (size_t)n >= sizeof sub) fail_msg("path too long: %s", rel);
    tu_source_path(out, outlen, sub);
}

void tu_reference_path(char *out, size_t outlen, const char *rel) {
    const char *env = getenv("STRATA_REFERENCE");
    if (env && *env) {
        int n = snprintf(out, outlen, "%s%s%s", env, *rel ? "/" : "", rel);
        if (n < 0 || (size_t)n >= outlen) fail_msg("path too long: %s/%s", env, rel);
        return;
    }
    char sub[PATH_MAX];
    int n = snprintf(sub, sizeof sub, "../reference/fixtures%s%s", *rel ? "/" : "", rel);
    if (n < 0 || (size_t)n >= sizeof sub) fail_msg("path too long: %s", rel);
    tu_source_path(out, outlen, sub);
}

int tu_mkdtemp(char *dir, size_t dirlen, const char *tag) {
    int n = snprintf(dir, dirlen, "/tmp/strata-%s-XXXXXX", tag);
    if (n < 0 || (size_t)n >= dirlen) return -1;
    return mkdtemp(dir) ? 0 : -1;
}

/* nftw callback: removes one entry (children come first with FTW_DEPTH). */
static int tu_remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st, (void)type, (void)ftw;
    return remove(path) == 0 ? 0 : -1;
}

int tu_rmtree(const char *dir) {
    return nftw(dir, tu_remove_entry, 16, FTW_DEPTH | FTW_PHYS) == 0 ? 0 : -1;
}

json_t *tu_load_json(const char *path) {
    json_error_t jerr;
    json_t *doc = json_load_file(path, 0, &jerr);
    if (!doc) fail_msg("%s: %s", path, jerr.text);
    return doc;
}

double *tu_read_npy(const char *path, npy_header *h) {
    char err[ERR_LEN];
    double *d = NULL;
    if (npy_read_f64(path, &d, h, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
    return d;
}

double tu_rel_err(const double *got, const double *want, size_t n, const char *what) {
    double scale = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) fail_msg("%s[%zu] = %g is not finite", what, i, got[i]);
        scale = fmax(scale, fabs(want[i]));
        worst = fmax(worst, fabs(got[i] - want[i]));
    }
    if (!(scale > 0.0)) fail_msg("%s: every reference value is zero", what);
    return worst / scale;
}

double tu_rel_err_f(const float *got, const double *want, size_t n, const char *what) {
    double scale = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) fail_msg("%s[%zu] = %g is not finite", what, i, (double)got[i]);
        scale = fmax(scale, fabs(want[i]));
        worst = fmax(worst, fabs((double)got[i] - want[i]));
    }
    if (!(scale > 0.0)) fail_msg("%s: every reference value is zero", what);
    return worst / scale;
}

double tu_rel_err_ff(const float *got, const float *want, size_t n, const char *what) {
    double scale = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) fail_msg("%s[%zu] = %g is not finite", what, i, (double)got[i]);
        scale = fmax(scale, fabs((double)want[i]));
        worst = fmax(worst, fabs((double)got[i] - (double)want[i]));
    }
    if (!(scale > 0.0)) fail_msg("%s: every reference value is zero", what);
    return worst / scale;
}

double tu_rel_or_abs_err_ff(const float *got, const float *want, size_t n, const char *what) {
    double scale = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]) || !isfinite(want[i]))
            fail_msg("%s[%zu]: got %g, want %g", what, i, (double)got[i], (double)want[i]);
        scale = fmax(scale, fabs((double)want[i]));
        worst = fmax(worst, fabs((double)got[i] - (double)want[i]));
    }
    return scale == 0.0 ? worst : worst / scale;
}

float tu_rand_uniform(uint64_t *state) {
    *state += 0x9E3779B97F4A7C15ULL;
    uint64_t z = *state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (float)((double)(z >> 11) * 0x1p-53 * 2.0 - 1.0);
}

float *tu_rand_floats(uint64_t *state, size_t n, float amp) {
    float *x = malloc((n ? n : 1) * sizeof *x);
    assert_non_null(x);
    for (size_t i = 0; i < n; i++) x[i] = amp * tu_rand_uniform(state);
    return x;
}

float *tu_dup_floats(const float *x, size_t n) {
    float *y = malloc((n ? n : 1) * sizeof *y);
    assert_non_null(y);
    if (n) memcpy(y, x, n * sizeof *y);
    return y;
}

void tu_run_begin(tu_run *run, const char *tag) {
    memset(run, 0, sizeof *run);
    char name[64];
    snprintf(name, sizeof name, "test-%s-w", tag);
    if (tu_mkdtemp(run->work, sizeof run->work, name) != 0) fail_msg("mkdtemp %s failed", name);
    snprintf(name, sizeof name, "test-%s-o", tag);
    if (tu_mkdtemp(run->out, sizeof run->out, name) != 0) fail_msg("mkdtemp %s failed", name);
}

void tu_run_end(tu_run *run) {
    tu_rmtree(run->work);
    tu_rmtree(run->out);
}

int tu_resolve_path(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen, char *err,
                    size_t errlen) {
    (void)ctx;
    const char *p = json_string_value(json_object_get(ref, "path"));
    struct stat st;
    if (!p) return err_set(err, errlen, "the test resolves {\"path\"} only");
    if (stat(p, &st) != 0) return err_set(err, errlen, "%s: %s", p, strerror(errno));
    snprintf(path, pathlen, "%s", p);
    return 0;
}

/* resolve_dataset: as tu_resolve_path, the format left to detection. */
static int tu_resolve_dataset(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                              char *format, size_t formatlen, char *err, size_t errlen) {
    snprintf(format, formatlen, "auto");
    return tu_resolve_path(ctx, ref, path, pathlen, err, errlen);
}

/* add_artifact: moves path to the run's output directory as name. */
static int tu_add_artifact(runner_ctx *ctx, const char *name, const char *path, char *err,
                           size_t errlen) {
    tu_run *run = ctx->user;
    char dst[PATH_MAX + 300];
    snprintf(dst, sizeof dst, "%s/%s", run->out, name);
    if (rename(path, dst) != 0) return err_set(err, errlen, "rename %s: %s", path, strerror(errno));
    run->artifacts++;
    return 0;
}

runner_ctx tu_run_ctx(tu_run *run, atomic_int *cancel) {
    runner_ctx ctx = {.resolve_model = tu_resolve_path,
                      .resolve_dataset = tu_resolve_dataset,
                      .resolve_adapter = tu_resolve_path,
                      .add_artifact = tu_add_artifact,
                      .cancel = cancel,
                      .work_dir = run->work,
                      .user = run,
                      .gpu = -1 /* the CPU; GPU tests set their own */};
    return ctx;
}

int tu_stdout_off(void) {
    fflush(stdout);
    int saved = dup(1);
    FILE *devnull = fopen("/dev/null", "w");
    if (saved < 0 || !devnull || dup2(fileno(devnull), 1) < 0) fail_msg("cannot silence stdout");
    fclose(devnull);
    return saved;
}

void tu_stdout_on(int saved) {
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
}

void tu_batch_load(tu_batch *bt, json_t *j) {
    json_t *ids = json_object_get(j, "input_ids"), *labs = json_object_get(j, "labels"),
           *lens = json_object_get(j, "lengths");
    bt->B = (int)json_array_size(lens);
    bt->T = (int)json_integer_value(json_object_get(j, "T"));
    bt->n_counted = (long)json_integer_value(json_object_get(j, "n_counted"));
    assert_true(bt->B > 0 && bt->T > 0);
    size_t n = (size_t)bt->B * (size_t)bt->T;
    bt->tokens = malloc(n * sizeof(int));
    bt->labels = malloc(n * sizeof(int));
    bt->lengths = malloc((size_t)bt->B * sizeof(int));
    assert_true(bt->tokens && bt->labels && bt->lengths);
    for (int b = 0; b < bt->B; b++) {
        bt->lengths[b] = (int)json_integer_value(json_array_get(lens, (size_t)b));
        json_t *ir = json_array_get(ids, (size_t)b), *lr = json_array_get(labs, (size_t)b);
        assert_int_equal(json_array_size(ir), (size_t)bt->T);
        assert_int_equal(json_array_size(lr), (size_t)bt->T);
        for (int t = 0; t < bt->T; t++) {
            bt->tokens[b * bt->T + t] = (int)json_integer_value(json_array_get(ir, (size_t)t));
            bt->labels[b * bt->T + t] = (int)json_integer_value(json_array_get(lr, (size_t)t));
        }
    }
}

void tu_batch_free(tu_batch *bt) {
    free(bt->tokens);
    free(bt->labels);
    free(bt->lengths);
}

json_t *tu_spec_load(const char *tmpl, const char *model_dir, const char *dataset_path) {
    char text[4 * PATH_MAX];
    size_t used = 0;
    for (const char *p = tmpl; *p; p++) {
        if (p[0] == '%' && (p[1] == 'M' || p[1] == 'D')) {
            int n = snprintf(text + used, sizeof text - used, "%s",
                             p[1] == 'M' ? model_dir : dataset_path);
            if (n < 0 || (size_t)n >= sizeof text - used) fail_msg("test spec too long: %s", tmpl);
            used += (size_t)n;
            p++;
        } else {
            if (used + 1 >= sizeof text) fail_msg("test spec too long: %s", tmpl);
            text[used++] = *p == '\'' ? '"' : *p;
        }
    }
    text[used] = '\0';
    json_error_t jerr;
    json_t *spec = json_loads(text, 0, &jerr);
    if (!spec) fail_msg("bad test spec %s: %s", text, jerr.text);
    return spec;
}

/* path = tests/fixtures/cka/name (or under $STRATA_FIXTURES); -1 when it
 * does not fit. */
static int tu_cka_path(char *path, size_t pathlen, const char *name) {
    char dir[PATH_MAX];
    tu_fixture_path(dir, sizeof dir, "cka");
    int len = snprintf(path, pathlen, "%s/%s", dir, name);
    return len > 0 && (size_t)len < pathlen ? 0 : -1;
}

json_t *tu_cka_cases(void) {
    char path[PATH_MAX];
    if (tu_cka_path(path, sizeof path, "expected.json") != 0) fail_msg("cka fixture path too long");
    json_t *root = tu_load_json(path);
    json_t *cases = json_object_get(root, "cases");
    if (!json_is_array(cases)) fail_msg("%s: \"cases\" is not an array", path);
    json_incref(cases);
    json_decref(root);
    return cases;
}

void tu_cka_case_paths(json_t *c, char *xp, char *yp, size_t len) {
    const char *x = json_string_value(json_object_get(c, "x"));
    const char *y = json_string_value(json_object_get(c, "y"));
    if (!x || !y) fail_msg("cka fixture case without \"x\" or \"y\"");
    if (tu_cka_path(xp, len, x) != 0 || tu_cka_path(yp, len, y) != 0)
        fail_msg("cka fixture path too long: %s, %s", x, y);
}

cka_options tu_cka_case_options(json_t *c, cka_space space) {
    const char *kernel = json_string_value(json_object_get(c, "kernel"));
    cka_options opt = {0};
    opt.kernel = kernel && strcmp(kernel, "rbf") == 0 ? CKA_RBF : CKA_LINEAR;
    opt.debiased = json_is_true(json_object_get(c, "debiased"));
    opt.rbf_threshold = json_number_value(json_object_get(c, "rbf_threshold"));
    opt.space = space;
    return opt;
}

double tu_cka_fixture_value(const char *name) {
    json_t *cases = tu_cka_cases();
    size_t i;
    json_t *c;
    double v = NAN;
    json_array_foreach(cases, i, c) {
        const char *cname = json_string_value(json_object_get(c, "name"));
        if (cname && strcmp(cname, name) == 0) v = json_number_value(json_object_get(c, "cka"));
    }
    json_decref(cases);
    if (isnan(v)) fail_msg("no cka fixture case %s", name);
    return v;
}

int tu_cka_resolve_file(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen, char *err,
                        size_t errlen) {
    (void)ctx;
    const char *name = json_string_value(json_object_get(ref, "path"));
    if (!name) return err_set(err, errlen, "no path");
    if (tu_cka_path(path, pathlen, name) != 0) return err_set(err, errlen, "path too long");
    return 0;
}
