/* test_predict.c - predict jobs end to end (worker/predict.c through
 * runner_run), against tests/fixtures/predict/expected.json: prompts rendered
 * and tokenized independently in Python (gen_predict.py, with the reference
 * tokenizer) and pooled hidden states from the float64 PyTorch reference run
 * one example at a time on tests/reference/fixtures/chat.
 *
 * Tolerances: prompt ids, pooled positions, truncation flags, labels and
 * generated text exact. Hidden states in float32, per layer,
 * max |C - ref| <= 1e-4 * max |ref| (REF_REL_TOL). In float16 (the default
 * dtype), per value |C - ref| <= 2^-11 |ref| (half's rounding) + 1e-4 max |ref|
 * + 2^-24 (half's smallest step). Batch sizes 1, 3 and 8 give the same rows
 * within 1e-6 * max |row| (BATCH_REL_TOL): padding does not leak. Greedy ids
 * on the gqa reference model match its expected.json exactly. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/npy.h"
#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/backend.h"
#include "worker/engine/model.h"
#include "worker/engine/tok.h"
#include "worker/local.h"
#include "worker/predict.h"
#include "worker/runner.h"

#define REF_REL_TOL 1e-4
#define BATCH_REL_TOL 1e-6

static char fixture_dir[PATH_MAX];   /* tests/fixtures/predict */
static char reference_dir[PATH_MAX]; /* tests/reference/fixtures */
static json_t *expected;

static int setup(void **state) {
    (void)state;
    tu_fixture_path(fixture_dir, sizeof fixture_dir, "predict");
    tu_reference_path(reference_dir, sizeof reference_dir, "");
    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/expected.json", fixture_dir);
    expected = tu_load_json(path);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    json_decref(expected);
    return 0;
}


static int64_t progress_last, progress_total;

static void test_progress(runner_ctx *ctx, int64_t step, int64_t total, const char *message) {
    (void)ctx;
    (void)message;
    assert_true(step >= progress_last && step <= total);
    progress_last = step;
    progress_total = total;
}

/* Runs spec (JSON text) as a predict job. Returns runner_run's status;
 * *result on success (caller frees), err/retryable on failure. */
static int run_spec(tu_run *run, const char *spec_text, json_t **result, bool *retryable,
                    char *err, size_t errlen) {
    json_error_t jerr;
    json_t *spec = json_loads(spec_text, 0, &jerr);
    if (!spec) fail_msg("bad test spec %s: %s", spec_text, jerr.text);
    atomic_int cancel;
    atomic_init(&cancel, 0);
    runner_ctx ctx = tu_run_ctx(run, &cancel);
    ctx.progress = test_progress;
    bool cancelled = false;
    progress_last = progress_total = 0;
    int rc = runner_run("predict", spec, &ctx, result, retryable, &cancelled, err, errlen);
    assert_false(cancelled);
    json_decref(spec);
    return rc;
}

/* Reads out/hidden_states_{layer}.npy as float64 (caller frees). */
static double *read_layer(const tu_run *run, int layer, npy_header *h) {
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/hidden_states_%d.npy", run->out, layer);
    return tu_read_npy(path, h);
}

/* Reads a .jsonl artifact as an array of its lines. */
static json_t *read_jsonl(const tu_run *run, const char *name) {
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", run->out, name);
    FILE *f = fopen(path, "r");
    if (!f) fail_msg("%s: %s", path, strerror(errno));
    json_t *lines = json_array();
    char line[1 << 16];
    while (fgets(line, sizeof line, f)) {
        json_error_t jerr;
        json_t *v = json_loads(line, 0, &jerr);
        if (!v) fail_msg("%s: %s", path, jerr.text);
        json_array_append_new(lines, v);
    }
    fclose(f);
    return lines;
}

/* Compares one expected case with a finished run: examples.jsonl exactly,
 * every layer's rows within the tolerance of the dtype. */
static void check_case(const tu_run *run, json_t *c, bool f16) {
    json_t *exs = json_object_get(c, "examples"), *hidden = json_object_get(c, "hidden");
    size_t N = json_array_size(exs);
    json_t *lines = read_jsonl(run, "examples.jsonl");
    assert_int_equal(json_array_size(lines), N);
    for (size_t i = 0; i < N; i++) {
        json_t *want = json_array_get(exs, i), *got = json_array_get(lines, i);
        assert_int_equal(json_integer_value(json_object_get(got, "index")), (json_int_t)i);
        if (!json_equal(json_object_get(got, "input_ids"), json_object_get(want, "input_ids")))
            fail_msg("example %zu: input_ids differ", i);
        if (!json_equal(json_object_get(got, "pooled_position"),
                        json_object_get(want, "pooled_position")))
            fail_msg("example %zu: pooled_position differs", i);
        assert_int_equal(json_is_true(json_object_get(got, "truncated")),
                         json_is_true(json_object_get(want, "truncated")));
    }
    json_decref(lines);
    for (size_t l = 0; l < json_array_size(hidden); l++) {
        json_t *rows = json_array_get(hidden, l);
        npy_header h;
        double *got = read_layer(run, (int)l, &h);
        size_t C = json_array_size(json_array_get(rows, 0));
        assert_int_equal(h.dtype, f16 ? NPY_F16 : NPY_F32);
        assert_int_equal(h.rows, N);
        assert_int_equal(h.cols, C);
        double scale = 0.0, worst = 0.0;
        for (size_t i = 0; i < N; i++)
            for (size_t k = 0; k < C; k++) {
                double w = json_real_value(json_array_get(json_array_get(rows, i), k));
                if (fabs(w) > scale) scale = fabs(w);
            }
        assert_true(scale > 0.0);
        for (size_t i = 0; i < N; i++)
            for (size_t k = 0; k < C; k++) {
                double w = json_real_value(json_array_get(json_array_get(rows, i), k));
                double d = fabs(got[i * C + k] - w);
                if (!isfinite(got[i * C + k])) fail_msg("layer %zu row %zu not finite", l, i);
                if (f16 && d > ldexp(fabs(w), -11) + REF_REL_TOL * scale + ldexp(1.0, -24))
                    fail_msg("layer %zu row %zu col %zu: %g vs %g beyond float16 rounding", l, i,
                             k, got[i * C + k], w);
                if (d > worst) worst = d;
            }
        if (!f16 && worst / scale > REF_REL_TOL)
            fail_msg("layer %zu: relative error %g > %g", l, worst / scale, REF_REL_TOL);
        free(got);
    }
}

/* The spec of an expected case, with extra fields appended. */
static void case_spec(json_t *c, const char *model, const char *extra, char *spec, size_t len) {
    char ms[64] = "";
    json_int_t max = json_integer_value(json_object_get(c, "max_samples"));
    if (max > 0) snprintf(ms, sizeof ms, ", \"max_samples\": %lld", (long long)max);
    snprintf(spec, len,
             "{\"model\": {\"path\": \"%s/%s\"}, \"dataset\": {\"path\": \"%s/%s\"}, "
             "\"template\": \"%s\", \"pool\": \"%s\"%s%s}",
             reference_dir, model, fixture_dir,
             json_string_value(json_object_get(c, "dataset")),
             json_string_value(json_object_get(c, "template")),
             json_string_value(json_object_get(c, "pool")), ms, extra);
}

/* Every expected case (templates llama2 with truncation, alpaca with
 * max_samples, default with mean_after_system, vanilla, a Flan file) in
 * float32: ids exact, hidden states within 1e-4. */
static void test_cases_float32(void **state) {
    (void)state;
    json_t *cases = json_object_get(expected, "cases");
    assert_true(json_array_size(cases) >= 5);
    for (size_t i = 0; i < json_array_size(cases); i++) {
        json_t *c = json_array_get(cases, i);
        char spec[PATH_MAX * 3], err[ERR_LEN];
        case_spec(c, "chat", ", \"dtype\": \"float32\"", spec, sizeof spec);
        tu_run run;
        tu_run_begin(&run, "predict");
        json_t *result = NULL;
        bool retryable = false;
        if (run_spec(&run, spec, &result, &retryable, err, sizeof err) != 0)
            fail_msg("case %zu: %s", i, err);
        size_t N = json_array_size(json_object_get(c, "examples"));
        assert_int_equal(json_integer_value(json_object_get(result, "examples")), (json_int_t)N);
        assert_int_equal(json_integer_value(json_object_get(result, "hidden_size")), 16);
        assert_int_equal(json_array_size(json_object_get(result, "layers")), 3);
        assert_string_equal(json_string_value(json_object_get(result, "dtype")), "float32");
        assert_string_equal(json_string_value(json_object_get(result, "pool")),
                            json_string_value(json_object_get(c, "pool")));
        assert_int_equal(json_array_size(json_object_get(result, "artifacts")), 4);
        assert_int_equal(run.artifacts, 4);
        assert_int_equal(progress_last, (int64_t)N);
        assert_int_equal(progress_total, (int64_t)N);
        check_case(&run, c, false);
        json_decref(result);
        tu_run_end(&run);
    }
}

/* The default dtype is float16, within half's rounding of the reference. */
static void test_default_float16(void **state) {
    (void)state;
    json_t *c = json_array_get(json_object_get(expected, "cases"), 1); /* vanilla mean */
    char spec[PATH_MAX * 3], err[ERR_LEN];
    case_spec(c, "chat", "", spec, sizeof spec);
    tu_run run;
    tu_run_begin(&run, "predict");
    json_t *result = NULL;
    bool retryable;
    if (run_spec(&run, spec, &result, &retryable, err, sizeof err) != 0) fail_msg("%s", err);
    assert_string_equal(json_string_value(json_object_get(result, "dtype")), "float16");
    check_case(&run, c, true);
    json_decref(result);
    tu_run_end(&run);
}

/* Runs case c with a batch size and layer list; returns layer's rows. */
static double *run_rows(json_t *c, const char *extra, int layer, size_t *n) {
    char spec[PATH_MAX * 3], err[ERR_LEN];
    case_spec(c, "chat", extra, spec, sizeof spec);
    tu_run run;
    tu_run_begin(&run, "predict");
    json_t *result = NULL;
    bool retryable;
    if (run_spec(&run, spec, &result, &retryable, err, sizeof err) != 0) fail_msg("%s", err);
    npy_header h;
    double *rows = read_layer(&run, layer, &h);
    *n = h.rows * h.cols;
    json_decref(result);
    tu_run_end(&run);
    return rows;
}

/* Batch sizes 1, 3 and 8 (mixed lengths, so padding in most batches) give
 * the same rows for each example; so does a llama2.c export of the same
 * model, with the tokenizer beside it. */
static void test_batch_invariance(void **state) {
    (void)state;
    json_t *c = json_array_get(json_object_get(expected, "cases"), 1);
    const char *extras[] = {", \"dtype\": \"float32\", \"batch_size\": 1",
                            ", \"dtype\": \"float32\", \"batch_size\": 3",
                            ", \"dtype\": \"float32\", \"batch_size\": 8"};
    for (int layer = 0; layer <= 2; layer++) {
        size_t n0, n;
        double *base = run_rows(c, extras[0], layer, &n0);
        double scale = 0.0;
        for (size_t i = 0; i < n0; i++) scale = fmax(scale, fabs(base[i]));
        for (int k = 1; k < 3; k++) {
            double *other = run_rows(c, extras[k], layer, &n);
            assert_int_equal(n, n0);
            for (size_t i = 0; i < n; i++)
                if (fabs(other[i] - base[i]) > BATCH_REL_TOL * scale)
                    fail_msg("layer %d value %zu: batch %s differs: %g vs %g", layer, i,
                             extras[k], other[i], base[i]);
            free(other);
        }
        free(base);
    }
}

/* A llama2.c export (chat/llama2c.bin, its tokenizer.json beside it) gives
 * the reference's rows too; one without a tokenizer is refused clearly. */
static void test_llama2c(void **state) {
    (void)state;
    json_t *c = json_array_get(json_object_get(expected, "cases"), 0);
    char spec[PATH_MAX * 3], err[ERR_LEN];
    case_spec(c, "chat/llama2c_v1.bin", ", \"dtype\": \"float32\"", spec, sizeof spec);
    tu_run run;
    tu_run_begin(&run, "predict");
    json_t *result = NULL;
    bool retryable;
    if (run_spec(&run, spec, &result, &retryable, err, sizeof err) != 0) fail_msg("%s", err);
    check_case(&run, c, false);
    json_decref(result);
    tu_run_end(&run);

    case_spec(c, "gqa/llama2c.bin", "", spec, sizeof spec);
    tu_run_begin(&run, "predict");
    result = NULL;
    assert_int_equal(run_spec(&run, spec, &result, &retryable, err, sizeof err), -1);
    assert_null(result);
    assert_false(retryable);
    if (!strstr(err, "needs a tokenizer.json")) fail_msg("unexpected error: %s", err);
    tu_run_end(&run);
}

/* layers [2, 0]: only those files, listed ascending; a layer past L is an
 * error naming the range; max_samples cuts the dataset. */
static void test_layers_and_max_samples(void **state) {
    (void)state;
    json_t *c = json_array_get(json_object_get(expected, "cases"), 0);
    char spec[PATH_MAX * 3], err[ERR_LEN];
    case_spec(c, "chat", ", \"layers\": [2, 0], \"max_samples\": 2, \"dtype\": \"float32\"", spec,
              sizeof spec);
    tu_run run;
    tu_run_begin(&run, "predict");
    json_t *result = NULL;
    bool retryable;
    if (run_spec(&run, spec, &result, &retryable, err, sizeof err) != 0) fail_msg("%s", err);
    json_t *layers = json_object_get(result, "layers");
    assert_int_equal(json_array_size(layers), 2);
    assert_int_equal(json_integer_value(json_array_get(layers, 0)), 0);
    assert_int_equal(json_integer_value(json_array_get(layers, 1)), 2);
    assert_int_equal(json_integer_value(json_object_get(result, "examples")), 2);
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/hidden_states_1.npy", run.out);
    assert_int_not_equal(access(path, F_OK), 0);
    npy_header h;
    double *rows = read_layer(&run, 2, &h);
    assert_int_equal(h.rows, 2);
    json_t *want = json_array_get(json_array_get(json_object_get(c, "hidden"), 2), 1);
    for (size_t k = 0; k < h.cols; k++)
        assert_true(fabs(rows[h.cols + k] - json_real_value(json_array_get(want, k))) < 1e-4);
    free(rows);
    json_decref(result);
    tu_run_end(&run);

    case_spec(c, "chat", ", \"layers\": [3]", spec, sizeof spec);
    tu_run_begin(&run, "predict");
    result = NULL;
    assert_int_equal(run_spec(&run, spec, &result, &retryable, err, sizeof err), -1);
    assert_false(retryable);
    if (!strstr(err, "hidden states 0..2")) fail_msg("unexpected error: %s", err);
    tu_run_end(&run);
}

/* generate: generated_predictions.jsonl holds the dataset's responses and
 * the greedy continuations the reference decodes. */
static void test_generate(void **state) {
    (void)state;
    json_t *g = json_object_get(expected, "greedy");
    json_t *preds = json_object_get(g, "predictions");
    char spec[PATH_MAX * 3], err[ERR_LEN], extra[128];
    snprintf(extra, sizeof extra, ", \"generate\": {\"max_new_tokens\": %lld}, \"batch_size\": 4",
             (long long)json_integer_value(json_object_get(g, "max_new_tokens")));
    json_t *c = json_array_get(json_object_get(expected, "cases"), 0); /* vanilla, dataset.json */
    case_spec(c, "chat", extra, spec, sizeof spec);
    tu_run run;
    tu_run_begin(&run, "predict");
    json_t *result = NULL;
    bool retryable;
    if (run_spec(&run, spec, &result, &retryable, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(json_array_size(json_object_get(result, "artifacts")), 5);
    json_t *lines = read_jsonl(&run, "generated_predictions.jsonl");
    assert_int_equal(json_array_size(lines), json_array_size(preds));
    for (size_t i = 0; i < json_array_size(preds); i++) {
        json_t *want = json_array_get(preds, i), *got = json_array_get(lines, i);
        assert_string_equal(json_string_value(json_object_get(got, "label")),
                            json_string_value(json_object_get(want, "label")));
        assert_string_equal(json_string_value(json_object_get(got, "predict")),
                            json_string_value(json_object_get(want, "predict")));
    }
    json_decref(lines);
    json_decref(result);
    tu_run_end(&run);
}

/* predict_greedy at the id level on gqa (untied, GQA, varied continuations,
 * some stopping at EOS): the reference's new ids, in batches of 2. */
static void test_greedy_gqa(void **state) {
    (void)state;
    char dir[PATH_MAX + 16], path[PATH_MAX + 64], err[ERR_LEN];
    snprintf(dir, sizeof dir, "%s/gqa", reference_dir);
    snprintf(path, sizeof path, "%s/expected.json", dir);
    json_t *ref = tu_load_json(path);
    llama_model m;
    if (llama_load_hf(dir, &m, err, sizeof err) != 0) fail_msg("%s", err);
    json_t *batch = json_object_get(ref, "batch"), *greedy = json_object_get(ref, "greedy");
    json_t *ids = json_object_get(batch, "input_ids"), *lens = json_object_get(batch, "lengths");
    size_t n = json_array_size(lens);
    assert_int_equal(json_array_size(greedy), n);
    tok_ids prompts[8], out[8];
    assert_true(n <= 8);
    for (size_t i = 0; i < n; i++) {
        tok_ids_init(&prompts[i], 1024);
        json_t *row = json_array_get(ids, i);
        for (json_int_t t = 0; t < json_integer_value(json_array_get(lens, i)); t++)
            assert_int_equal(
                tok_ids_push(&prompts[i], (int32_t)json_integer_value(json_array_get(row, (size_t)t))),
                0);
    }
    if (predict_greedy(backend_cpu(), &m, prompts, n, 2, 8, m.cfg.eos_token_id,
                       (size_t)m.cfg.max_position_embeddings, NULL, out, err, sizeof err) != 0)
        fail_msg("%s", err);
    for (size_t i = 0; i < n; i++) {
        json_t *want = json_object_get(json_array_get(greedy, i), "new_ids");
        assert_int_equal(out[i].len, json_array_size(want));
        for (size_t k = 0; k < out[i].len; k++)
            assert_int_equal(out[i].v[k], json_integer_value(json_array_get(want, k)));
        tok_ids_free(&out[i]);
        tok_ids_free(&prompts[i]);
    }
    llama_free(&m);
    json_decref(ref);
}

/* Bad inputs fail with a message naming what is wrong, not retryable. */
static void test_errors(void **state) {
    (void)state;
    struct {
        const char *model;   /* under tests/reference/fixtures */
        const char *dataset; /* under tests/fixtures/predict */
        const char *extra;   /* more spec fields */
        const char *needle;  /* the error must contain it */
    } cases[] = {
        {"nope", "dataset.json", "", "nope"},
        {"chat", "missing.json", "", "missing.json"},
        {"chat", "dataset.json", ", \"template\": \"chatml\"", "spec.template"},
        {"chat", "dataset.json", ", \"format\": \"flan\"", "dataset.json"},
        {"chat", "dataset.json", ", \"adapter\": {\"path\": \"/nonexistent-adapter\"}",
         "nonexistent-adapter"},
        {"chat", "dataset.json", ", \"pool\": \"mean_after_system\", \"template\": \"llama2\"",
         "after the system part"},
        {"gqa", "dataset.json", "", "tokenizer"},
        /* an adapter for another model (gqa's) is refused, naming it */
        {"chat", "dataset.json", ", \"adapter\": {\"path\": \"tests/fixtures/lora/qv\"}",
         "adapter tests/fixtures/lora/qv"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char spec[PATH_MAX * 3], err[ERR_LEN] = "";
        snprintf(spec, sizeof spec,
                 "{\"model\": {\"path\": \"%s/%s\"}, \"dataset\": {\"path\": \"%s/%s\"}%s}",
                 reference_dir, cases[i].model, fixture_dir, cases[i].dataset, cases[i].extra);
        tu_run run;
        tu_run_begin(&run, "predict");
        json_t *result = NULL;
        bool retryable = false;
        int rc = run_spec(&run, spec, &result, &retryable, err, sizeof err);
        if (rc == 0) fail_msg("case %zu succeeded: %s", i, spec);
        assert_null(result);
        if (!strstr(err, cases[i].needle))
            fail_msg("case %zu: error \"%s\" does not name \"%s\"", i, err, cases[i].needle);
        assert_int_equal(run.artifacts, 0);
        tu_run_end(&run);
    }
}

/* A job cancelled before it starts stops between batches, writes nothing
 * and says so. */
static void test_cancel(void **state) {
    (void)state;
    char spec[PATH_MAX * 3], err[ERR_LEN] = "";
    case_spec(json_array_get(json_object_get(expected, "cases"), 0), "chat", "", spec,
              sizeof spec);
    json_t *js = json_loads(spec, 0, NULL);
    assert_non_null(js);
    tu_run run;
    tu_run_begin(&run, "predict");
    atomic_int cancel;
    atomic_init(&cancel, 1);
    runner_ctx ctx = tu_run_ctx(&run, &cancel);
    json_t *result = NULL;
    bool retryable = true, cancelled = false;
    assert_int_equal(runner_run("predict", js, &ctx, &result, &retryable, &cancelled, err,
                                sizeof err),
                     -1);
    assert_true(cancelled);
    assert_null(result);
    assert_int_equal(run.artifacts, 0);
    json_decref(js);
    tu_run_end(&run);
}

/* `strata-worker run --kind predict` (local_main with local.c's path
 * resolvers): exit 0 and the artifacts in --out; a missing model exits 2. */
static void test_local_cli(void **state) {
    (void)state;
    char spec[PATH_MAX * 3], out[PATH_MAX];
    assert_int_equal(tu_mkdtemp(out, sizeof out, "test-predict-cli"), 0);
    snprintf(spec, sizeof spec,
             "{\"model\": {\"path\": \"%s/chat\"}, \"dataset\": {\"path\": \"%s/flan.jsonl\"}, "
             "\"template\": \"vanilla\", \"dtype\": \"float32\"}",
             reference_dir, fixture_dir);
    char *argv[] = {"run", "--kind", "predict", "--spec", spec, "--out", out, NULL};
    /* the result line goes to stdout: keep the test output readable */
    int saved = tu_stdout_off();
    int status = local_main(7, argv);
    tu_stdout_on(saved);
    assert_int_equal(status, 0);
    tu_run run;
    memset(&run, 0, sizeof run);
    snprintf(run.out, sizeof run.out, "%s", out);
    check_case(&run, json_array_get(json_object_get(expected, "cases"), 5), false);
    tu_rmtree(out);

    snprintf(spec, sizeof spec,
             "{\"model\": {\"path\": \"%s/absent\"}, \"dataset\": {\"path\": \"%s/flan.jsonl\"}}",
             reference_dir, fixture_dir);
    char *argv2[] = {"run", "--kind", "predict", "--spec", spec, NULL};
    assert_int_equal(local_main(5, argv2), 2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cases_float32),
        cmocka_unit_test(test_default_float16),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_llama2c),
        cmocka_unit_test(test_layers_and_max_samples),
        cmocka_unit_test(test_generate),
        cmocka_unit_test(test_greedy_gqa),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_local_cli),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
