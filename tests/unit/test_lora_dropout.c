/* test_lora_dropout - LoRA dropout in training (llama_lora's dropout fields,
 * llama_dropout_key / llama_dropout_mask) against the PyTorch reference of
 * tests/fixtures/lora_dropout/gen_lora_dropout.py, which re-implements the
 * counter-based masks: the gqa reference model, the sft_gqa batch, an
 * adapter on all seven projections, p = 0.1. Tolerances: loss within 1e-4
 * relative, every lora_A / lora_B gradient within 1e-4 of its largest
 * reference value (max abs error / max abs ref); the masks themselves
 * exactly (kept counts of every layer and projection, one full list of
 * dropped elements). And as a train job (the reference chat model,
 * tests/fixtures/predict/dataset.json, LoRA on all projections, dropout 0.1,
 * gradient accumulation 2): cancelled after a checkpoint and resumed, it
 * ends with the uninterrupted run's losses bit for bit (tolerance 0), and
 * its losses differ from dropout 0's. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/npy.h"
#include "common/st.h"
#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/backend.h"
#include "worker/engine/forward.h"
#include "worker/engine/model.h"
#include "worker/runner.h"
#include "worker/train.h"

#define REF_REL_TOL 1e-4

/* Everything the tests share, loaded once. */
typedef struct {
    char dir[PATH_MAX];
    json_t *expected;
    llama_model model;
    int B, T;
    long n_counted;
    int *tokens, *labels, *lengths;
    int r;
    float scaling, p;
    uint64_t seed, counter;
    bool target[LLAMA_NPROJ];
    size_t nparams;
    float *adapter; /* the fixture's adapter in llama_lora's layout */
} dropout_fixture;

static dropout_fixture fx;

/* PEFT's tensor name of layer l's projection p, A or B. */
static void peft_name(char *out, size_t len, int l, llama_proj p, bool is_b) {
    snprintf(out, len, "base_model.model.model.layers.%d.%s.lora_%s.weight", l,
             llama_proj_module(p), is_b ? "B" : "A");
}

/* Binds lo over params with the fixture's rank, scaling and targets
 * (dropout off, as llama_lora_bind leaves it). */
static void bind(llama_lora *lo, float *params) {
    char err[ERR_LEN];
    if (llama_lora_bind(lo, &fx.model.cfg, fx.r, fx.scaling, fx.target, params, err,
                        sizeof err) != 0)
        fail_msg("%s", err);
}

/* Reads the adapter's safetensors into fx.adapter (llama_lora's layout). */
static void load_adapter(void) {
    const llama_config *cfg = &fx.model.cfg;
    fx.nparams = llama_lora_count(cfg, fx.r, fx.target);
    assert_true(fx.nparams > 0);
    fx.adapter = calloc(fx.nparams, sizeof *fx.adapter);
    assert_non_null(fx.adapter);
    llama_lora lo;
    bind(&lo, fx.adapter);
    char path[PATH_MAX + 64], name[160], err[ERR_LEN];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", fx.dir);
    st_file sf;
    if (st_open(path, &sf, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
    for (int l = 0; l < cfg->num_hidden_layers; l++)
        for (int p = 0; p < LLAMA_NPROJ; p++) {
            size_t out, in;
            llama_proj_dims(cfg, (llama_proj)p, &out, &in);
            for (int isb = 0; isb < 2; isb++) {
                peft_name(name, sizeof name, l, (llama_proj)p, isb);
                const st_tensor *t = st_find(&sf, name);
                if (!t) fail_msg("%s: no %s", path, name);
                assert_int_equal(t->count, (size_t)fx.r * (isb ? out : in));
                float *dst = isb ? lo.b[p] + (size_t)l * out * (size_t)fx.r
                                 : lo.a[p] + (size_t)l * (size_t)fx.r * in;
                if (st_to_f32(&sf, t, dst, err, sizeof err) != 0) fail_msg("%s", err);
            }
        }
    st_close(&sf);
}

/* Loads tests/fixtures/lora_dropout: expected.json, its model, batch and
 * adapter. */
static int setup_all(void **state) {
    (void)state;
    memset(&fx, 0, sizeof fx);
    tu_fixture_path(fx.dir, sizeof fx.dir, "lora_dropout");
    char path[PATH_MAX + 64], err[ERR_LEN];
    snprintf(path, sizeof path, "%s/expected.json", fx.dir);
    fx.expected = tu_load_json(path);
    snprintf(path, sizeof path, "%s/%s", fx.dir,
             json_string_value(json_object_get(fx.expected, "model_dir")));
    if (llama_load_hf(path, &fx.model, err, sizeof err) != 0) fail_msg("%s: %s", path, err);

    json_t *bj = json_object_get(fx.expected, "batch");
    json_t *ids = json_object_get(bj, "input_ids"), *labs = json_object_get(bj, "labels"),
           *lens = json_object_get(bj, "lengths");
    fx.B = (int)json_array_size(lens);
    fx.T = (int)json_integer_value(json_object_get(bj, "T"));
    fx.n_counted = (long)json_integer_value(json_object_get(bj, "n_counted"));
    assert_true(fx.B > 0 && fx.T > 0 && fx.n_counted > 0);
    size_t n = (size_t)fx.B * (size_t)fx.T;
    fx.tokens = malloc(n * sizeof(int));
    fx.labels = malloc(n * sizeof(int));
    fx.lengths = malloc((size_t)fx.B * sizeof(int));
    assert_true(fx.tokens && fx.labels && fx.lengths);
    for (int b = 0; b < fx.B; b++) {
        fx.lengths[b] = (int)json_integer_value(json_array_get(lens, (size_t)b));
        json_t *ir = json_array_get(ids, (size_t)b), *lr = json_array_get(labs, (size_t)b);
        assert_int_equal(json_array_size(ir), (size_t)fx.T);
        for (int t = 0; t < fx.T; t++) {
            fx.tokens[b * fx.T + t] = (int)json_integer_value(json_array_get(ir, (size_t)t));
            fx.labels[b * fx.T + t] = (int)json_integer_value(json_array_get(lr, (size_t)t));
        }
    }

    json_t *lj = json_object_get(fx.expected, "lora");
    fx.r = (int)json_integer_value(json_object_get(lj, "r"));
    fx.scaling = (float)(json_number_value(json_object_get(lj, "alpha")) / fx.r);
    json_t *targets = json_object_get(lj, "targets");
    assert_int_equal(json_array_size(targets), LLAMA_NPROJ);
    for (int p = 0; p < LLAMA_NPROJ; p++) {
        const char *want = json_string_value(json_array_get(targets, (size_t)p));
        const char *mod = llama_proj_module((llama_proj)p);
        assert_non_null(want);
        assert_string_equal(strchr(mod, '.') + 1, want);
        fx.target[p] = true;
    }
    fx.p = (float)json_number_value(json_object_get(fx.expected, "dropout"));
    fx.seed = (uint64_t)json_integer_value(json_object_get(fx.expected, "seed"));
    fx.counter = (uint64_t)json_integer_value(json_object_get(fx.expected, "counter"));
    assert_true(fx.p > 0.0f && fx.p < 1.0f);
    load_adapter();
    return 0;
}

static int teardown_all(void **state) {
    (void)state;
    json_decref(fx.expected);
    llama_free(&fx.model);
    free(fx.tokens);
    free(fx.labels);
    free(fx.lengths);
    free(fx.adapter);
    return 0;
}

/* One llama_lora_loss_and_grad over the fixture batch with a fresh state
 * (as a restarted worker has): a copy of the fixture adapter with dropout
 * p, seed and counter; grads (fx.nparams, zeroed here) gets the gradient.
 * Returns the mean loss. */
static double run(float p, uint64_t seed, uint64_t counter, float *grads) {
    float *params = malloc(fx.nparams * sizeof *params);
    assert_non_null(params);
    memcpy(params, fx.adapter, fx.nparams * sizeof *params);
    llama_lora lo;
    bind(&lo, params);
    lo.dropout = p;
    lo.dropout_seed = seed;
    lo.dropout_counter = counter;
    memset(grads, 0, fx.nparams * sizeof *grads);
    const backend *be = backend_cpu();
    llama_state s;
    char err[ERR_LEN];
    if (llama_state_init_train(&s, be, &fx.model.cfg, fx.B, fx.T, err, sizeof err) != 0)
        fail_msg("%s", err);
    double sum = 0.0;
    long counted = 0;
    if (llama_lora_loss_and_grad(be, &fx.model, &lo, &s, fx.tokens, fx.labels, fx.lengths, fx.B,
                                 fx.T, 1.0 / (double)fx.n_counted, grads, &sum, &counted, err,
                                 sizeof err) != 0)
        fail_msg("%s", err);
    assert_int_equal(counted, fx.n_counted);
    /* The adapter is only read. */
    assert_memory_equal(params, fx.adapter, fx.nparams * sizeof *params);
    llama_state_free(&s);
    free(params);
    return sum / (double)counted;
}

/* p = 0.1: loss and all 42 lora_A / lora_B gradients against PyTorch
 * float64 with the same masks; the base model is never written. */
static void test_matches_reference(void **state) {
    (void)state;
    float *before = malloc(fx.model.nparams * sizeof *before);
    float *grads = malloc(fx.nparams * sizeof *grads);
    assert_true(before && grads);
    memcpy(before, fx.model.params, fx.model.nparams * sizeof *before);
    double loss = run(fx.p, fx.seed, fx.counter, grads);
    assert_memory_equal(before, fx.model.params, fx.model.nparams * sizeof *before);
    double want = json_number_value(json_object_get(fx.expected, "loss"));
    double lrel = fabs(loss - want) / fabs(want);
    printf("lora_dropout p %.2f: loss %.9g ref %.9g rel %.2g\n", (double)fx.p, loss, want, lrel);
    assert_true(lrel <= REF_REL_TOL);
    /* The dropout loss must differ from the p = 0 one by far more than the
     * tolerance, or the comparison above would not show masks are applied. */
    double p0 = json_number_value(json_object_get(fx.expected, "loss_p0"));
    assert_true(fabs(want - p0) > 10.0 * REF_REL_TOL * fabs(want));

    llama_lora lo;
    bind(&lo, fx.adapter);
    const llama_config *cfg = &fx.model.cfg;
    json_t *map = json_object_get(fx.expected, "grads");
    char name[160], path[PATH_MAX + 256];
    double worst = 0.0;
    size_t checked = 0;
    for (int l = 0; l < cfg->num_hidden_layers; l++)
        for (int p = 0; p < LLAMA_NPROJ; p++) {
            size_t out, in;
            llama_proj_dims(cfg, (llama_proj)p, &out, &in);
            for (int isb = 0; isb < 2; isb++) {
                peft_name(name, sizeof name, l, (llama_proj)p, isb);
                const char *file = json_string_value(json_object_get(map, name));
                if (!file) fail_msg("expected.json has no gradient for %s", name);
                snprintf(path, sizeof path, "%s/%s", fx.dir, file);
                npy_header h;
                double *ref = tu_read_npy(path, &h);
                size_t cnt = (size_t)fx.r * (isb ? out : in);
                assert_int_equal(h.rows * h.cols, cnt);
                const float *pt = isb ? lo.b[p] + (size_t)l * out * (size_t)fx.r
                                      : lo.a[p] + (size_t)l * (size_t)fx.r * in;
                double e = tu_rel_err_f(grads + (pt - lo.params), ref, cnt, name);
                if (e > REF_REL_TOL) fail_msg("%s: gradient error %g relative", name, e);
                if (e > worst) worst = e;
                free(ref);
                checked++;
            }
        }
    assert_int_equal(checked, (size_t)cfg->num_hidden_layers * LLAMA_NPROJ * 2);
    printf("lora_dropout: %zu gradients, worst %.2g relative\n", checked, worst);
    free(grads);
    free(before);
}

/* The masks bit for bit: every (layer, projection)'s kept count over the
 * batch's (B*T, in) input, and layer 2 down_proj's full list of dropped
 * elements, as the Python re-implementation draws them. */
static void test_masks_match_reference(void **state) {
    (void)state;
    const llama_config *cfg = &fx.model.cfg;
    size_t N = (size_t)fx.B * (size_t)fx.T;
    json_t *kept = json_object_get(fx.expected, "kept");
    float scale = 1.0f / (1.0f - fx.p);
    for (int l = 0; l < cfg->num_hidden_layers; l++)
        for (int p = 0; p < LLAMA_NPROJ; p++) {
            size_t out, in;
            llama_proj_dims(cfg, (llama_proj)p, &out, &in);
            float *m = malloc(N * in * sizeof *m);
            assert_non_null(m);
            llama_dropout_mask(m, fx.p, fx.seed, fx.counter, l, (llama_proj)p, N * in);
            long n = 0;
            for (size_t i = 0; i < N * in; i++) {
                assert_true(m[i] == 0.0f || m[i] == scale);
                n += m[i] != 0.0f;
            }
            char key[32];
            snprintf(key, sizeof key, "%d.%d", l, p);
            json_t *want = json_object_get(kept, key);
            assert_true(json_is_integer(want));
            assert_int_equal(n, (long)json_integer_value(want));
            if (l == 2 && p == LLAMA_PROJ_DOWN) {
                json_t *dropped = json_object_get(fx.expected, "dropped_layer2_down");
                assert_int_equal(json_array_size(dropped), N * in - (size_t)n);
                size_t k = 0;
                for (size_t i = 0; i < N * in; i++) {
                    if (m[i] != 0.0f) continue;
                    assert_int_equal((size_t)json_integer_value(json_array_get(dropped, k)), i);
                    k++;
                }
            }
            free(m);
        }
}

/* p = 0 is the no-dropout path exactly (whatever the seed and counter),
 * and matches the reference's p = 0 loss. */
static void test_p0_is_no_dropout(void **state) {
    (void)state;
    float *g0 = malloc(fx.nparams * sizeof *g0), *g1 = malloc(fx.nparams * sizeof *g1);
    assert_true(g0 && g1);
    double plain = run(0.0f, 0, 0, g0);
    double p0 = run(0.0f, fx.seed, fx.counter, g1);
    assert_true(plain == p0);
    assert_memory_equal(g0, g1, fx.nparams * sizeof *g0);
    double want = json_number_value(json_object_get(fx.expected, "loss_p0"));
    assert_true(fabs(p0 - want) <= REF_REL_TOL * fabs(want));
    /* And dropout does change the gradient. */
    (void)run(fx.p, fx.seed, fx.counter, g1);
    assert_memory_not_equal(g0, g1, fx.nparams * sizeof *g0);
    free(g0);
    free(g1);
}

/* Over 2^20 elements the kept fraction is within 0.003 of 1 - p (over 9
 * standard deviations) and the mask's mean within 0.005 of 1 (inverted
 * dropout keeps the expectation); p = 0 keeps all at 1. */
static void test_mask_mean(void **state) {
    (void)state;
    size_t n = (size_t)1 << 20;
    float *m = malloc(n * sizeof *m);
    assert_non_null(m);
    const float ps[] = {0.1f, 0.5f, 0.0f};
    for (size_t k = 0; k < sizeof ps / sizeof ps[0]; k++) {
        llama_dropout_mask(m, ps[k], 42, 3, 1, LLAMA_PROJ_V, n);
        double sum = 0.0;
        size_t kept = 0;
        for (size_t i = 0; i < n; i++) {
            sum += m[i];
            kept += m[i] != 0.0f;
        }
        double frac = (double)kept / (double)n, mean = sum / (double)n;
        printf("p %.1f: kept %.5f mean %.5f\n", (double)ps[k], frac, mean);
        assert_true(fabs(frac - (1.0 - ps[k])) < 0.003);
        assert_true(fabs(mean - 1.0) < 0.005);
        if (ps[k] == 0.0f) assert_true(kept == n && sum == (double)n);
    }
    free(m);
}

/* Masks are a pure function of (seed, counter, layer, projection): the
 * same inputs redraw the same mask (a resumed run), each of them changed
 * draws another. */
static void test_masks_deterministic(void **state) {
    (void)state;
    size_t n = 4096;
    float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    assert_true(a && b);
    llama_dropout_mask(a, 0.1f, 7, 11, 2, LLAMA_PROJ_UP, n);
    llama_dropout_mask(b, 0.1f, 7, 11, 2, LLAMA_PROJ_UP, n);
    assert_memory_equal(a, b, n * sizeof *a);
    assert_true(llama_dropout_key(7, 11, 2, LLAMA_PROJ_UP) ==
                llama_dropout_key(7, 11, 2, LLAMA_PROJ_UP));
    const struct {
        uint64_t seed, counter;
        int layer;
        llama_proj p;
    } other[] = {{8, 11, 2, LLAMA_PROJ_UP},
                 {7, 12, 2, LLAMA_PROJ_UP},
                 {7, 11, 1, LLAMA_PROJ_UP},
                 {7, 11, 2, LLAMA_PROJ_GATE}};
    for (size_t k = 0; k < sizeof other / sizeof other[0]; k++) {
        llama_dropout_mask(b, 0.1f, other[k].seed, other[k].counter, other[k].layer, other[k].p,
                           n);
        assert_memory_not_equal(a, b, n * sizeof *a);
    }
    free(a);
    free(b);
}

/* A resumed run (a fresh state and adapter copy, same seed and counter)
 * gets bit-identical loss and gradients; the next micro-batch's counter
 * gets other masks and so another loss. */
static void test_resume_reproduces(void **state) {
    (void)state;
    float *g0 = malloc(fx.nparams * sizeof *g0), *g1 = malloc(fx.nparams * sizeof *g1);
    assert_true(g0 && g1);
    double l0 = run(fx.p, fx.seed, fx.counter, g0);
    double l1 = run(fx.p, fx.seed, fx.counter, g1);
    assert_true(l0 == l1);
    assert_memory_equal(g0, g1, fx.nparams * sizeof *g0);
    double l2 = run(fx.p, fx.seed, fx.counter + 1, g1);
    assert_true(l2 != l0);
    assert_memory_not_equal(g0, g1, fx.nparams * sizeof *g0);
    free(g0);
    free(g1);
}

/* Dropout outside [0, 1) is refused and the gradient buffer left alone. */
static void test_bad_dropout_refused(void **state) {
    (void)state;
    float *params = malloc(fx.nparams * sizeof *params);
    float *grads = calloc(fx.nparams, sizeof *grads);
    assert_true(params && grads);
    memcpy(params, fx.adapter, fx.nparams * sizeof *params);
    const backend *be = backend_cpu();
    llama_state s;
    char err[ERR_LEN];
    if (llama_state_init_train(&s, be, &fx.model.cfg, fx.B, fx.T, err, sizeof err) != 0)
        fail_msg("%s", err);
    const float bad[] = {1.0f, -0.1f, 1.5f, NAN};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        llama_lora lo;
        bind(&lo, params);
        lo.dropout = bad[k];
        double sum = 0.0;
        long counted = 0;
        err[0] = '\0';
        assert_int_equal(llama_lora_loss_and_grad(be, &fx.model, &lo, &s, fx.tokens, fx.labels,
                                                  fx.lengths, fx.B, fx.T, 1.0, grads, &sum,
                                                  &counted, err, sizeof err),
                         -1);
        assert_non_null(strstr(err, "dropout"));
    }
    for (size_t i = 0; i < fx.nparams; i++) assert_true(grads[i] == 0.0f);
    llama_state_free(&s);
    free(params);
    free(grads);
}

/* What the callbacks of the train job in progress see (one at a time). */
static const char *job_resume_dir; /* NULL: no checkpoint */
static int64_t job_cancel_after;   /* cancel once this step is reported; 0 never */
static atomic_int *job_cancel;

static int job_resolve_checkpoint(runner_ctx *ctx, char *dir, size_t dirlen, int64_t *step,
                                  char *err, size_t errlen) {
    (void)ctx;
    *step = 0;
    if (!job_resume_dir) return 0;
    if (train_find_checkpoint(job_resume_dir, step, err, errlen) != 0) return -1;
    snprintf(dir, dirlen, "%s", job_resume_dir);
    return 0;
}

static void job_progress(runner_ctx *ctx, int64_t step, int64_t total, const char *message) {
    (void)ctx;
    (void)total;
    (void)message;
    if (job_cancel_after > 0 && step == job_cancel_after) atomic_store(job_cancel, 1);
}

/* Runs a 6-step LoRA train job with dropout (a number, as JSON text) in r.
 * Returns runner_run's status; *result on success, *cancelled as told. */
static int run_job(tu_run *r, const char *dropout, json_t **result, bool *cancelled, char *err,
                   size_t errlen) {
    char model[PATH_MAX], data[PATH_MAX], text[3 * PATH_MAX];
    tu_reference_path(model, sizeof model, "chat");
    tu_fixture_path(data, sizeof data, "predict/dataset.json");
    snprintf(text, sizeof text,
             "{'base_model': {'path': '%s'}, 'dataset': {'path': '%s'}, 'template': 'vanilla', "
             "'method': 'lora', 'lora': {'r': 4, 'alpha': 8, 'dropout': %s, 'targets': "
             "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']}, "
             "'learning_rate': 0.01, 'batch_size': 1, 'gradient_accumulation_steps': 2, "
             "'max_steps': 6, 'save_steps': 2, 'seed': 5}",
             model, data, dropout);
    for (char *c = text; *c; c++)
        if (*c == '\'') *c = '"';
    json_error_t jerr;
    json_t *spec = json_loads(text, 0, &jerr);
    if (!spec) fail_msg("bad test spec: %s", jerr.text);
    atomic_int cancel;
    atomic_init(&cancel, 0);
    job_cancel = &cancel;
    runner_ctx ctx = tu_run_ctx(r, &cancel);
    ctx.resolve_checkpoint = job_resolve_checkpoint;
    ctx.progress = job_progress;
    bool retryable = false;
    *cancelled = false;
    int rc = runner_run("train", spec, &ctx, result, &retryable, cancelled, err, errlen);
    json_decref(spec);
    return rc;
}

static double loss_at(json_t *result, size_t i) {
    json_t *v = json_array_get(json_object_get(result, "losses"), i);
    if (!json_is_number(v)) fail_msg("no losses[%zu]", i);
    return json_number_value(v);
}

/* A train job with dropout resumed from its step-2 checkpoint (cancelled
 * during step 4) redraws the masks of the uninterrupted run: equal losses
 * bit for bit. Dropout 0 gives other losses from step 1 on. */
static void test_job_resume(void **state) {
    (void)state;
    char err[ERR_LEN] = "";
    tu_run a, b, c, z;
    json_t *ra = NULL, *rb = NULL, *rc = NULL, *rz = NULL;
    bool cancelled = false;
    job_resume_dir = NULL;
    job_cancel_after = 0;
    tu_run_begin(&a, "dropout-a");
    if (run_job(&a, "0.1", &ra, &cancelled, err, sizeof err) != 0) fail_msg("A: %s", err);
    assert_int_equal(json_array_size(json_object_get(ra, "losses")), 6);

    tu_run_begin(&b, "dropout-b");
    job_cancel_after = 3;
    assert_int_equal(run_job(&b, "0.1", &rb, &cancelled, err, sizeof err), -1);
    assert_true(cancelled);
    int64_t latest = 0;
    if (train_find_checkpoint(b.out, &latest, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(latest, 2);

    tu_run_begin(&c, "dropout-c");
    job_resume_dir = b.out;
    job_cancel_after = 0;
    if (run_job(&c, "0.1", &rc, &cancelled, err, sizeof err) != 0) fail_msg("C: %s", err);
    assert_int_equal(json_integer_value(json_object_get(rc, "resumed_from")), 2);
    for (size_t i = 0; i < 6; i++)
        if (loss_at(rc, i) != loss_at(ra, i))
            fail_msg("losses[%zu]: resumed %.9g, uninterrupted %.9g", i, loss_at(rc, i),
                     loss_at(ra, i));

    tu_run_begin(&z, "dropout-z");
    job_resume_dir = NULL;
    if (run_job(&z, "0", &rz, &cancelled, err, sizeof err) != 0) fail_msg("Z: %s", err);
    /* Step 1 starts from the same adapter (B zero, so the forward equals
     * the base model's either way): the first loss agrees, and dropout's
     * effect shows from step 2 on. */
    assert_true(loss_at(rz, 0) == loss_at(ra, 0));
    for (size_t i = 1; i < 6; i++) assert_true(loss_at(rz, i) != loss_at(ra, i));
    printf("job losses with dropout 0.1 / 0:");
    for (size_t i = 0; i < 6; i++) printf(" %.6f/%.6f", loss_at(ra, i), loss_at(rz, i));
    printf("\n");
    json_decref(ra);
    json_decref(rc);
    json_decref(rz);
    tu_run_end(&a);
    tu_run_end(&b);
    tu_run_end(&c);
    tu_run_end(&z);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_reference),
        cmocka_unit_test(test_masks_match_reference),
        cmocka_unit_test(test_p0_is_no_dropout),
        cmocka_unit_test(test_mask_mean),
        cmocka_unit_test(test_masks_deterministic),
        cmocka_unit_test(test_resume_reproduces),
        cmocka_unit_test(test_bad_dropout_refused),
        cmocka_unit_test(test_job_resume),
    };
    return cmocka_run_group_tests(tests, setup_all, teardown_all);
}
