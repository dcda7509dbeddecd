/* test_train_resume.c - a train job stopped after a checkpoint and resumed
 * from it ends as the uninterrupted run does, on the reference chat model
 * (tests/reference/fixtures/chat) and tests/fixtures/predict/dataset.json (6
 * examples; batch 2, so 3 steps per epoch and the checkpoint of step 4 sits
 * mid-epoch, cursor 2 of epoch 1):
 *   - run A: 8 steps, cosine schedule with warmup, checkpoints every 2;
 *   - run B: the same spec, cancelled during step 6 (after the checkpoint of
 *     step 4, with step 5 done and not saved);
 *   - run C: the same spec resumed from B's latest checkpoint (4): its losses,
 *     learning rates and gradient norms equal A's bit for bit (tolerance 0:
 *     the same arithmetic in the same order on restored float32 state), and
 *     so do its final model / adapter files; result "resumed_from" is 4;
 *   - the metric callback sees each step's loss once, for the steps run;
 *   - a checkpoint of another seed is refused by name;
 *   - train_checkpoint_name / train_find_checkpoint parse and find sets.
 * Both methods: full fine-tuning and LoRA (q_proj, v_proj). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/runner.h"
#include "worker/train.h"

static char model_dir[PATH_MAX];
static char dataset_path[PATH_MAX];

/* What the callbacks of the run in progress see (one run at a time). */
static const char *resume_dir;  /* NULL: no checkpoint */
static int64_t cancel_after;    /* cancel once this step is reported; 0 never */
static atomic_int *run_cancel;
static double metric_loss[16];
static int metric_count[16];

static int setup(void **state) {
    (void)state;
    tu_reference_path(model_dir, sizeof model_dir, "chat");
    tu_fixture_path(dataset_path, sizeof dataset_path, "predict/dataset.json");
    return 0;
}

static int resolve_checkpoint(runner_ctx *ctx, char *dir, size_t dirlen, int64_t *step,
                              char *err, size_t errlen) {
    (void)ctx;
    *step = 0;
    if (!resume_dir) return 0;
    if (train_find_checkpoint(resume_dir, step, err, errlen) != 0) return -1;
    snprintf(dir, dirlen, "%s", resume_dir);
    return 0;
}

static void progress(runner_ctx *ctx, int64_t step, int64_t total, const char *message) {
    (void)ctx;
    (void)total;
    (void)message;
    if (cancel_after > 0 && step == cancel_after) atomic_store(run_cancel, 1);
}

static void metric(runner_ctx *ctx, const char *name, int64_t step, double value) {
    (void)ctx;
    if (strcmp(name, "loss") != 0) return;
    assert_true(step >= 1 && step < 16);
    metric_loss[step] = value;
    metric_count[step]++;
}

/* Runs the spec (single quotes for double) with method and seed filled in.
 * Returns runner_run's status; *result on success, *cancelled as told. */
static int run(tu_run *r, const char *method, int seed, json_t **result, bool *cancelled,
               char *err, size_t errlen) {
    char text[3 * PATH_MAX];
    snprintf(text, sizeof text,
             "{'base_model': {'path': '%s'}, 'dataset': {'path': '%s'}, 'template': 'vanilla', "
             "'method': '%s', 'learning_rate': 0.01, 'lr_scheduler': 'cosine', "
             "'warmup_steps': 2, 'batch_size': 2, 'max_steps': 8, 'save_steps': 2, "
             "'weight_decay': 0.1, 'seed': %d}",
             model_dir, dataset_path, method, seed);
    for (char *p = text; *p; p++)
        if (*p == '\'') *p = '"';
    json_error_t jerr;
    json_t *spec = json_loads(text, 0, &jerr);
    if (!spec) fail_msg("bad test spec: %s", jerr.text);
    atomic_int cancel;
    atomic_init(&cancel, 0);
    run_cancel = &cancel;
    runner_ctx ctx = tu_run_ctx(r, &cancel);
    ctx.resolve_checkpoint = resolve_checkpoint;
    ctx.progress = progress;
    ctx.metric = metric;
    memset(metric_count, 0, sizeof metric_count);
    bool retryable = false;
    *cancelled = false;
    int rc = runner_run("train", spec, &ctx, result, &retryable, cancelled, err, errlen);
    json_decref(spec);
    return rc;
}

static double series_at(json_t *result, const char *key, size_t i) {
    json_t *v = json_array_get(json_object_get(result, key), i);
    if (!json_is_number(v)) fail_msg("no %s[%zu]", key, i);
    return json_number_value(v);
}

/* Fails unless the files a/name and b/name hold the same bytes. */
static void assert_same_file(const char *a, const char *b, const char *name) {
    char pa[PATH_MAX], pb[PATH_MAX], err[ERR_LEN];
    char *da = NULL, *db = NULL;
    size_t la = 0, lb = 0;
    snprintf(pa, sizeof pa, "%s/%s", a, name);
    snprintf(pb, sizeof pb, "%s/%s", b, name);
    if (util_read_file(pa, (size_t)1 << 28, &da, &la, err, sizeof err) != 0) fail_msg("%s", err);
    if (util_read_file(pb, (size_t)1 << 28, &db, &lb, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(la, lb);
    assert_memory_equal(da, db, la);
    free(da);
    free(db);
}

static void check_resume(const char *method, const char *weights) {
    char err[ERR_LEN] = "";
    tu_run a, b, c;
    json_t *ra = NULL, *rb = NULL, *rc = NULL;
    bool cancelled = false;

    tu_run_begin(&a, "resume-a");
    resume_dir = NULL;
    cancel_after = 0;
    if (run(&a, method, 11, &ra, &cancelled, err, sizeof err) != 0) fail_msg("A: %s", err);
    assert_int_equal(json_array_size(json_object_get(ra, "losses")), 8);
    assert_int_equal(json_integer_value(json_object_get(ra, "resumed_from")), 0);
    for (int k = 1; k <= 8; k++) {
        assert_int_equal(metric_count[k], 1);
        assert_true(metric_loss[k] == series_at(ra, "losses", (size_t)k - 1));
    }

    tu_run_begin(&b, "resume-b");
    cancel_after = 5;
    assert_int_equal(run(&b, method, 11, &rb, &cancelled, err, sizeof err), -1);
    assert_true(cancelled);
    assert_null(rb);
    int64_t latest = 0;
    if (train_find_checkpoint(b.out, &latest, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(latest, 4);

    tu_run_begin(&c, "resume-c");
    resume_dir = b.out;
    cancel_after = 0;
    if (run(&c, method, 11, &rc, &cancelled, err, sizeof err) != 0) fail_msg("C: %s", err);
    assert_int_equal(json_integer_value(json_object_get(rc, "resumed_from")), 4);
    static const char *const keys[] = {"losses", "learning_rates", "grad_norms"};
    for (size_t k = 0; k < 3; k++) {
        assert_int_equal(json_array_size(json_object_get(rc, keys[k])), 8);
        for (size_t i = 0; i < 8; i++)
            if (series_at(rc, keys[k], i) != series_at(ra, keys[k], i))
                fail_msg("%s %s[%zu]: resumed %.9g, uninterrupted %.9g", method, keys[k], i,
                         series_at(rc, keys[k], i), series_at(ra, keys[k], i));
    }
    /* only steps 5..8 ran in C */
    for (int k = 1; k <= 8; k++) assert_int_equal(metric_count[k], k > 4 ? 1 : 0);
    assert_true(json_equal(json_object_get(rc, "checkpoints"), json_object_get(ra, "checkpoints")));
    assert_same_file(a.out, c.out, weights);
    assert_same_file(a.out, c.out, "checkpoint-8-optimizer.bin");

    /* a checkpoint of another seed is not continued */
    json_t *rd = NULL;
    tu_run d;
    tu_run_begin(&d, "resume-d");
    resume_dir = b.out;
    assert_int_equal(run(&d, method, 12, &rd, &cancelled, err, sizeof err), -1);
    assert_false(cancelled);
    assert_non_null(strstr(err, "another seed"));
    resume_dir = NULL;

    json_decref(ra);
    json_decref(rc);
    tu_run_end(&a);
    tu_run_end(&b);
    tu_run_end(&c);
    tu_run_end(&d);
}

static void test_resume_full(void **state) {
    (void)state;
    check_resume("full", "model.safetensors");
}

static void test_resume_lora(void **state) {
    (void)state;
    check_resume("lora", "adapter_model.safetensors");
}

static void test_checkpoint_names(void **state) {
    (void)state;
    int64_t step = 0;
    const char *rest = NULL;
    assert_true(train_checkpoint_name("checkpoint-12-optimizer.bin", &step, &rest));
    assert_int_equal(step, 12);
    assert_string_equal(rest, "optimizer.bin");
    assert_true(train_checkpoint_name("checkpoint-3-trainer_state.json", &step, &rest));
    assert_int_equal(step, 3);
    assert_false(train_checkpoint_name("checkpoint-012-optimizer.bin", &step, &rest));
    assert_false(train_checkpoint_name("checkpoint-0-optimizer.bin", &step, &rest));
    assert_false(train_checkpoint_name("checkpoint--optimizer.bin", &step, &rest));
    assert_false(train_checkpoint_name("checkpoint-4-", &step, &rest));
    assert_false(train_checkpoint_name("checkpoint-4x-a", &step, &rest));
    assert_false(train_checkpoint_name("model.safetensors", &step, &rest));
    assert_false(train_checkpoint_name("checkpoint-1234567890123456789-a", &step, &rest));

    tu_run r;
    char err[ERR_LEN], path[PATH_MAX + 64];
    tu_run_begin(&r, "ckname");
    assert_int_equal(train_find_checkpoint(r.out, &step, err, sizeof err), 0);
    assert_int_equal(step, 0);
    /* a set without its trainer state (written last) does not count */
    static const char *const names[] = {"checkpoint-2-trainer_state.json",
                                        "checkpoint-10-trainer_state.json",
                                        "checkpoint-12-optimizer.bin", "checkpoint-9-x"};
    for (size_t i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", r.out, names[i]);
        if (util_write_file_atomic(path, "{}", 2, 0644, err, sizeof err) != 0)
            fail_msg("%s", err);
    }
    assert_int_equal(train_find_checkpoint(r.out, &step, err, sizeof err), 0);
    assert_int_equal(step, 10);
    tu_run_end(&r);
    assert_int_equal(train_find_checkpoint(r.out, &step, err, sizeof err), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_checkpoint_names),
        cmocka_unit_test(test_resume_full),
        cmocka_unit_test(test_resume_lora),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
