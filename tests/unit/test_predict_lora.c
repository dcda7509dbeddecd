/* test_predict_lora.c - predict jobs with a LoRA adapter, end to end
 * (worker/predict.c through runner_run, and `strata-worker run` through
 * local_main), against tests/fixtures/lora/chat_qv: a PEFT adapter (q_proj,
 * v_proj, r 4, lora_alpha 8) for the reference "chat" model and the
 * last-token hidden states of tests/fixtures/predict/dataset.json under the
 * vanilla template, computed by gen_lora_chat.py in float64 PyTorch with the
 * adapter unmerged (W x + s B (A x)), one example at a time.
 *
 * Tolerances: prompt ids and pooled positions exact. Hidden states in
 * float32, per layer, max |C - ref| <= 1e-4 * max |ref| (REF_REL_TOL), at
 * batch sizes 1, 4 and 8 (padding in most batches). Without the adapter
 * the embeddings (layer 0) agree within 1e-6 relative and every later layer
 * differs by more than 1e-2 relative (MOVED_REL_MIN): a run that skipped the
 * adapter fails. */
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
#include "worker/local.h"
#include "worker/runner.h"

#define REF_REL_TOL 1e-4
#define SAME_REL_TOL 1e-6
#define MOVED_REL_MIN 1e-2

static char adapter_dir[PATH_MAX];   /* tests/fixtures/lora/chat_qv */
static char dataset_path[PATH_MAX];  /* tests/fixtures/predict/dataset.json */
static char model_dir[PATH_MAX];     /* tests/reference/fixtures/chat */
static json_t *expected;             /* chat_qv/expected.json */
static int n_layers;                 /* hidden-state files: L + 1 */

static int setup(void **state) {
    (void)state;
    tu_fixture_path(adapter_dir, sizeof adapter_dir, "lora/chat_qv");
    tu_fixture_path(dataset_path, sizeof dataset_path, "predict/dataset.json");
    tu_reference_path(model_dir, sizeof model_dir, "chat");
    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/expected.json", adapter_dir);
    expected = tu_load_json(path);
    n_layers = (int)json_array_size(json_object_get(json_object_get(expected, "files"),
                                                    "last_token"));
    assert_int_equal(n_layers, 3);
    assert_int_equal(json_array_size(json_object_get(expected, "examples")), 6);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    json_decref(expected);
    return 0;
}

/* The spec of a float32 vanilla last_token predict job on chat over
 * dataset.json, with the adapter at adapter (NULL: none) and extra fields. */
static void lora_spec(const char *adapter, const char *extra, char *spec, size_t len) {
    char ad[PATH_MAX + 64] = "";
    if (adapter) snprintf(ad, sizeof ad, ", \"adapter\": {\"path\": \"%s\"}", adapter);
    snprintf(spec, len,
             "{\"model\": {\"path\": \"%s\"}, \"dataset\": {\"path\": \"%s\"}, "
             "\"template\": \"vanilla\", \"pool\": \"last_token\", \"dtype\": \"float32\"%s%s}",
             model_dir, dataset_path, ad, extra);
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
    bool cancelled = false;
    int rc = runner_run("predict", spec, &ctx, result, retryable, &cancelled, err, errlen);
    assert_false(cancelled);
    json_decref(spec);
    return rc;
}

/* Reads dir/name as float64 rows (caller frees). */
static double *read_npy(const char *dir, const char *name, npy_header *h) {
    char path[PATH_MAX + 300];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return tu_read_npy(path, h);
}

/* Reads out/hidden_states_{layer}.npy (caller frees). */
static double *read_layer(const char *out, int layer, npy_header *h) {
    char name[64];
    snprintf(name, sizeof name, "hidden_states_%d.npy", layer);
    return read_npy(out, name, h);
}

/* Compares a finished run in out with chat_qv's expected outputs:
 * examples.jsonl's ids and positions exactly, every layer within
 * REF_REL_TOL. */
static void check_against_reference(const char *out) {
    json_t *exs = json_object_get(expected, "examples");
    size_t N = json_array_size(exs);
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/examples.jsonl", out);
    FILE *f = fopen(path, "r");
    if (!f) fail_msg("%s: %s", path, strerror(errno));
    char line[1 << 16];
    size_t i = 0;
    while (fgets(line, sizeof line, f)) {
        json_error_t jerr;
        json_t *got = json_loads(line, 0, &jerr);
        if (!got) fail_msg("%s: %s", path, jerr.text);
        assert_true(i < N);
        json_t *want = json_array_get(exs, i);
        assert_int_equal(json_integer_value(json_object_get(got, "index")), (json_int_t)i);
        if (!json_equal(json_object_get(got, "input_ids"), json_object_get(want, "input_ids")))
            fail_msg("example %zu: input_ids differ", i);
        if (!json_equal(json_object_get(got, "pooled_position"),
                        json_object_get(want, "pooled_position")))
            fail_msg("example %zu: pooled_position differs", i);
        json_decref(got);
        i++;
    }
    fclose(f);
    assert_int_equal(i, N);
    for (int l = 0; l < n_layers; l++) {
        npy_header hg, hr;
        double *got = read_layer(out, l, &hg);
        double *ref = read_npy(adapter_dir,
                               json_string_value(json_array_get(
                                   json_object_get(json_object_get(expected, "files"),
                                                   "last_token"), (size_t)l)),
                               &hr);
        assert_int_equal(hg.dtype, NPY_F32);
        assert_int_equal(hg.rows, N);
        assert_int_equal(hr.rows, N);
        assert_int_equal(hg.cols, hr.cols);
        assert_int_equal(hg.cols, 16);
        double e = tu_rel_err(got, ref, hg.rows * hg.cols, "hidden state");
        if (e > REF_REL_TOL)
            fail_msg("layer %d: relative error %g > %g", l, e, REF_REL_TOL);
        print_message("layer %d: relative error %.2g\n", l, e);
        free(got);
        free(ref);
    }
}

/* With the adapter, at batch sizes 1, 4 and 8, every layer's rows match the
 * unmerged float64 reference. */
static void test_adapter_matches_reference(void **state) {
    (void)state;
    const char *extras[] = {", \"batch_size\": 1", ", \"batch_size\": 4", ", \"batch_size\": 8"};
    for (size_t k = 0; k < sizeof extras / sizeof extras[0]; k++) {
        char spec[PATH_MAX * 4], err[ERR_LEN] = "";
        lora_spec(adapter_dir, extras[k], spec, sizeof spec);
        tu_run run;
        tu_run_begin(&run, "plora");
        json_t *result = NULL;
        bool retryable = false;
        if (run_spec(&run, spec, &result, &retryable, err, sizeof err) != 0)
            fail_msg("%s: %s", extras[k], err);
        assert_int_equal(json_integer_value(json_object_get(result, "examples")), 6);
        assert_int_equal(json_integer_value(json_object_get(result, "hidden_size")), 16);
        assert_int_equal(json_array_size(json_object_get(result, "layers")), (size_t)n_layers);
        assert_int_equal(run.artifacts, n_layers + 1);
        check_against_reference(run.out);
        json_decref(result);
        tu_run_end(&run);
    }
}

/* The same job without the adapter: layer 0 (the embeddings, which q_proj
 * and v_proj never touch) is unchanged; every later layer moved by more
 * than MOVED_REL_MIN. */
static void test_adapter_changes_output(void **state) {
    (void)state;
    tu_run with, without;
    char spec[PATH_MAX * 4], err[ERR_LEN] = "";
    json_t *result = NULL;
    bool retryable = false;
    tu_run_begin(&with, "plora");
    lora_spec(adapter_dir, "", spec, sizeof spec);
    if (run_spec(&with, spec, &result, &retryable, err, sizeof err) != 0) fail_msg("%s", err);
    json_decref(result);
    result = NULL;
    tu_run_begin(&without, "plora");
    lora_spec(NULL, "", spec, sizeof spec);
    if (run_spec(&without, spec, &result, &retryable, err, sizeof err) != 0) fail_msg("%s", err);
    json_decref(result);
    for (int l = 0; l < n_layers; l++) {
        npy_header ha, hb;
        double *a = read_layer(with.out, l, &ha);
        double *b = read_layer(without.out, l, &hb);
        assert_int_equal(ha.rows, hb.rows);
        assert_int_equal(ha.cols, hb.cols);
        double d = tu_rel_err(a, b, ha.rows * ha.cols, "hidden state");
        if (l == 0 && d > SAME_REL_TOL) fail_msg("layer 0 changed by %g", d);
        if (l > 0 && d <= MOVED_REL_MIN)
            fail_msg("layer %d moved only %g (<= %g): adapter not applied?", l, d, MOVED_REL_MIN);
        print_message("layer %d: adapter moves rows by %.3g relative\n", l, d);
        free(a);
        free(b);
    }
    tu_run_end(&with);
    tu_run_end(&without);
}

/* Copies src to dst. */
static void copy_file(const char *src, const char *dst) {
    FILE *in = fopen(src, "rb");
    if (!in) fail_msg("%s: %s", src, strerror(errno));
    FILE *o = fopen(dst, "wb");
    if (!o) fail_msg("%s: %s", dst, strerror(errno));
    char buf[8192];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) assert_int_equal(fwrite(buf, 1, n, o), n);
    assert_int_equal(ferror(in), 0);
    fclose(in);
    assert_int_equal(fclose(o), 0);
}

/* chat_qv's weights with its config rewritten so target_modules also names
 * k_proj, which the file does not hold: the job fails, not retryable,
 * naming the adapter and the missing tensor, and publishes nothing. */
static void test_config_targets_missing_module(void **state) {
    (void)state;
    char dir[PATH_MAX], src[PATH_MAX + 64], dst[PATH_MAX + 64];
    assert_int_equal(tu_mkdtemp(dir, sizeof dir, "test-plora-a"), 0);
    snprintf(src, sizeof src, "%s/adapter_model.safetensors", adapter_dir);
    snprintf(dst, sizeof dst, "%s/adapter_model.safetensors", dir);
    copy_file(src, dst);
    snprintf(src, sizeof src, "%s/adapter_config.json", adapter_dir);
    json_t *cfg = tu_load_json(src);
    json_t *targets = json_object_get(cfg, "target_modules");
    assert_int_equal(json_array_size(targets), 2);
    assert_int_equal(json_array_append_new(targets, json_string("k_proj")), 0);
    snprintf(dst, sizeof dst, "%s/adapter_config.json", dir);
    assert_int_equal(json_dump_file(cfg, dst, JSON_INDENT(2)), 0);
    json_decref(cfg);

    char spec[PATH_MAX * 4], err[ERR_LEN] = "";
    lora_spec(dir, "", spec, sizeof spec);
    tu_run run;
    tu_run_begin(&run, "plora");
    json_t *result = NULL;
    bool retryable = true;
    assert_int_equal(run_spec(&run, spec, &result, &retryable, err, sizeof err), -1);
    assert_null(result);
    assert_false(retryable);
    assert_int_equal(run.artifacts, 0);
    char needle[PATH_MAX + 32];
    snprintf(needle, sizeof needle, "adapter %s", dir);
    if (!strstr(err, needle)) fail_msg("error does not name the adapter: %s", err);
    if (!strstr(err, "layers.0.self_attn.k_proj.lora_A.weight\" is missing"))
        fail_msg("error does not name the missing tensor: %s", err);
    tu_run_end(&run);
    tu_rmtree(dir);
}

/* `strata-worker run --kind predict` with "adapter": {"path"} (local.c's
 * resolvers): exit 0 and the adapted rows in --out. */
static void test_local_cli(void **state) {
    (void)state;
    char spec[PATH_MAX * 4], out[PATH_MAX];
    assert_int_equal(tu_mkdtemp(out, sizeof out, "test-plora-cli"), 0);
    lora_spec(adapter_dir, ", \"batch_size\": 3", spec, sizeof spec);
    char *argv[] = {"run", "--kind", "predict", "--spec", spec, "--out", out, NULL};
    /* the result line goes to stdout: keep the test output readable */
    int saved = tu_stdout_off();
    int status = local_main(7, argv);
    tu_stdout_on(saved);
    assert_int_equal(status, 0);
    check_against_reference(out);
    tu_rmtree(out);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adapter_matches_reference),
        cmocka_unit_test(test_adapter_changes_output),
        cmocka_unit_test(test_config_targets_missing_module),
        cmocka_unit_test(test_local_cli),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
