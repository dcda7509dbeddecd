/* test_train.c - train jobs through runner_run on the reference chat model
 * (tests/reference/fixtures/chat: C 16, L 2, V 427, tied) and
 * tests/fixtures/predict/dataset.json (6 alpaca examples):
 *   - the first step's loss equals the engine's loss over the same examples
 *     in one batch (1e-6 relative: only the summation order differs);
 *   - full fine-tuning lowers the loss step after step, two runs give the
 *     same losses bit for bit, the output model loads (llama_load_hf) and
 *     equals the last checkpoint, the base model's files stay;
 *   - LoRA trains only the adapter, which predict's loader merges, and
 *     adapter_init continues it;
 *   - from scratch (init, byte-level tokenizer, pretraining): the first loss
 *     is ln(259) within 0.05 (near-uniform logits from std 0.02 weights);
 *   - refusals: LoRA dropout outside [0, 1), a bad adapter_init, a mixture without tasks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/st.h"
#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/backend.h"
#include "worker/engine/dataset.h"
#include "worker/engine/forward.h"
#include "worker/engine/lora.h"
#include "worker/engine/model.h"
#include "worker/engine/sft.h"
#include "worker/engine/tok.h"
#include "worker/runner.h"

static char model_dir[PATH_MAX];
static char dataset_path[PATH_MAX];

static int setup(void **state) {
    (void)state;
    char src[PATH_MAX];
    snprintf(src, sizeof src, "%s", __FILE__);
    char *slash = strrchr(src, '/');
    if (slash)
        *slash = '\0';
    else
        snprintf(src, sizeof src, ".");
    snprintf(model_dir, sizeof model_dir, "%.3000s/../reference/fixtures/chat", src);
    snprintf(dataset_path, sizeof dataset_path, "%.3000s/../fixtures/predict/dataset.json", src);
    return 0;
}

/* Runs spec_text (with %M for the model dir and %D for the dataset) as a
 * train job. Returns runner_run's status; *result on success. */
static int run_train(tu_run *run, const char *spec_text, json_t **result, char *err,
                     size_t errlen) {
    json_t *spec = tu_spec_load(spec_text, model_dir, dataset_path);
    atomic_int cancel;
    atomic_init(&cancel, 0);
    runner_ctx ctx = tu_run_ctx(run, &cancel);
    ctx.resolve_file = tu_resolve_path; /* the init tokenizer, a task map */
    bool retryable = false, cancelled = false;
    int rc = runner_run("train", spec, &ctx, result, &retryable, &cancelled, err, errlen);
    assert_false(cancelled);
    json_decref(spec);
    return rc;
}

static double loss_at(json_t *result, size_t i) {
    json_t *v = json_array_get(json_object_get(result, "losses"), i);
    if (!json_is_real(v)) fail_msg("no loss %zu", i);
    return json_real_value(v);
}

#define FULL_SPEC                                                                                 \
    "{'base_model': {'path': '%M'}, 'dataset': {'path': '%D'}, 'template': 'vanilla', "          \
    "'method': 'full', 'learning_rate': 0.01, 'lr_scheduler': 'constant', 'batch_size': 6, "     \
    "'max_steps': 8, 'save_steps': 4, 'seed': 7}"

/* The loss of the base model over all six examples in one batch, from the
 * engine directly (dataset order, not the loader's). */
static double engine_loss(void) {
    char err[ERR_LEN];
    llama_model m;
    tok_tokenizer *tok = NULL;
    ds_dataset ds;
    sft_set set;
    memset(&set, 0, sizeof set);
    if (llama_load_hf(model_dir, &m, err, sizeof err) != 0) fail_msg("%s", err);
    if (tok_load_dir(model_dir, m.cfg.vocab_size, &tok, err, sizeof err) != 0) fail_msg("%s", err);
    if (ds_load(dataset_path, DS_FORMAT_AUTO, 0, &ds, err, sizeof err) != 0) fail_msg("%s", err);
    sft_opts so = {SFT_MODE_SFT, TMPL_VANILLA, 1024, 1};
    if (sft_build(&ds, NULL, 0, tok, &so, &set, err, sizeof err) != 0) fail_msg("%s", err);
    size_t n = set.n, T = 0;
    for (size_t i = 0; i < n; i++)
        if (set.off[i + 1] - set.off[i] > T) T = set.off[i + 1] - set.off[i];
    int *ids = calloc(n * T, sizeof *ids), *labels = calloc(n * T, sizeof *labels);
    int *lens = calloc(n, sizeof *lens);
    float *grads = calloc(m.nparams, sizeof *grads);
    assert_true(ids && labels && lens && grads);
    for (size_t i = 0; i < n; i++) {
        size_t len = set.off[i + 1] - set.off[i];
        lens[i] = (int)len;
        for (size_t t = 0; t < T; t++) {
            ids[i * T + t] = t < len ? set.input_ids[set.off[i] + t] : 0;
            labels[i * T + t] = t < len ? set.labels[set.off[i] + t] : LLAMA_IGNORE_INDEX;
        }
    }
    llama_state s;
    if (llama_state_init_train(&s, backend_cpu(), &m.cfg, (int)n, (int)T, err, sizeof err) != 0)
        fail_msg("%s", err);
    double loss_sum = 0;
    long counted = 0;
    if (llama_loss_and_grad(backend_cpu(), &m, &s, ids, labels, lens, (int)n, (int)T, 1.0, grads,
                            &loss_sum, &counted, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_int_equal((size_t)counted, set.n_label);
    llama_state_free(&s);
    free(ids);
    free(labels);
    free(lens);
    free(grads);
    sft_set_free(&set);
    ds_free(&ds);
    tok_free(tok);
    llama_free(&m);
    return loss_sum / (double)counted;
}

/* Reads a tensor of a safetensors file as float32 (caller frees). */
static float *read_tensor(const char *path, const char *name, size_t *count) {
    char err[ERR_LEN];
    st_file f;
    if (st_open(path, &f, err, sizeof err) != 0) fail_msg("%s", err);
    const st_tensor *t = st_find(&f, name);
    if (!t) fail_msg("%s: no %s", path, name);
    float *v = malloc(t->count * sizeof *v);
    assert_non_null(v);
    assert_int_equal(st_to_f32(&f, t, v, err, sizeof err), 0);
    *count = t->count;
    st_close(&f);
    return v;
}

static void test_full(void **state) {
    (void)state;
    char err[ERR_LEN];
    tu_run a, b;
    json_t *ra = NULL, *rb = NULL;
    tu_run_begin(&a, "train-full-a");
    tu_run_begin(&b, "train-full-b");
    if (run_train(&a, FULL_SPEC, &ra, err, sizeof err) != 0) fail_msg("%s", err);
    if (run_train(&b, FULL_SPEC, &rb, err, sizeof err) != 0) fail_msg("%s", err);

    /* step 1 sees the base model over all six examples */
    double want = engine_loss(), got = loss_at(ra, 0);
    if (fabs(got - want) > 1e-6 * want) fail_msg("first loss %.9g, engine %.9g", got, want);
    assert_int_equal(json_array_size(json_object_get(ra, "losses")), 8);
    for (size_t i = 1; i < 8; i++)
        if (!(loss_at(ra, i) < loss_at(ra, i - 1)))
            fail_msg("loss %zu: %.6f after %.6f", i, loss_at(ra, i), loss_at(ra, i - 1));
    assert_true(loss_at(ra, 7) < 0.6 * loss_at(ra, 0));
    /* same spec, same machine: the same curve, bit for bit */
    for (size_t i = 0; i < 8; i++) assert_true(loss_at(ra, i) == loss_at(rb, i));
    assert_string_equal(json_string_value(json_object_get(ra, "method")), "full");
    assert_int_equal(json_integer_value(json_object_get(ra, "examples")), 6);
    json_t *ck = json_object_get(ra, "checkpoints");
    assert_int_equal(json_array_size(ck), 2);
    assert_int_equal(json_integer_value(json_array_get(ck, 1)), 8);

    /* the output is a Hugging Face model directory that loads */
    llama_model out, base;
    if (llama_load_hf(a.out, &out, err, sizeof err) != 0) fail_msg("%s", err);
    if (llama_load_hf(model_dir, &base, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(out.nparams, base.nparams);
    assert_true(out.cfg.tie_word_embeddings);
    assert_true(fabsf(out.cfg.rms_norm_eps - base.cfg.rms_norm_eps) == 0.0f);
    size_t moved = 0;
    for (size_t i = 0; i < out.nparams; i++) moved += out.params[i] != base.params[i];
    assert_true(moved > out.nparams / 2);
    /* the last checkpoint holds the same parameters */
    char ckpt[PATH_MAX + 64];
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint-8-model.safetensors", a.out);
    size_t count;
    float *q = read_tensor(ckpt, "model.layers.1.self_attn.q_proj.weight", &count);
    size_t C = (size_t)out.cfg.hidden_size;
    assert_int_equal(count, C * C);
    assert_memory_equal(q, out.w.wq + C * C, count * sizeof *q);
    free(q);
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint-4-trainer_state.json", a.out);
    json_t *st = tu_load_json(ckpt);
    assert_int_equal(json_integer_value(json_object_get(st, "step")), 4);
    assert_int_equal(json_integer_value(json_object_get(st, "epoch")), 4); /* 1 step per epoch */
    assert_int_equal(json_integer_value(json_object_get(st, "cursor")), 0);
    assert_int_equal(json_array_size(json_object_get(st, "losses")), 4);
    json_decref(st);
    snprintf(ckpt, sizeof ckpt, "%s/tokenizer.json", model_dir);
    assert_int_equal(access(ckpt, R_OK), 0); /* copied, not moved */
    snprintf(ckpt, sizeof ckpt, "%s/tokenizer.json", a.out);
    assert_int_equal(access(ckpt, R_OK), 0);
    llama_free(&out);
    llama_free(&base);
    json_decref(ra);
    json_decref(rb);
    tu_run_end(&a);
    tu_run_end(&b);
}

static void test_lora(void **state) {
    (void)state;
    char err[ERR_LEN];
    tu_run a, b;
    json_t *ra = NULL, *rb = NULL;
    tu_run_begin(&a, "train-lora-a");
    tu_run_begin(&b, "train-lora-b");
    if (run_train(&a,
                  "{'base_model': {'path': '%M'}, 'dataset': {'path': '%D'}, "
                  "'template': 'vanilla', 'learning_rate': 0.05, 'lr_scheduler': 'constant', "
                  "'batch_size': 3, 'gradient_accumulation_steps': 2, 'max_steps': 6, "
                  "'save_steps': 0, 'lora': {'r': 4, 'alpha': 8, 'targets': ['q_proj', "
                  "'v_proj', 'down_proj']}}",
                  &ra, err, sizeof err) != 0)
        fail_msg("%s", err);
    double want = engine_loss(); /* B = 0: the adapter starts as a no-op */
    if (fabs(loss_at(ra, 0) - want) > 1e-6 * want)
        fail_msg("first loss %.9g, engine %.9g", loss_at(ra, 0), want);
    for (size_t i = 1; i < 6; i++) assert_true(loss_at(ra, i) < loss_at(ra, i - 1));
    assert_string_equal(json_string_value(json_object_get(ra, "method")), "lora");
    /* r (in + out) per layer and target: q (16+16), v (16+8), down (44+16) */
    assert_int_equal(json_integer_value(json_object_get(ra, "trainable_parameters")),
                     2 * 4 * (32 + 24 + 60));
    assert_int_equal(json_array_size(json_object_get(ra, "checkpoints")), 0);

    /* predict's loader merges the adapter; it moved the weights it targets */
    llama_model m, base;
    if (llama_load_hf(model_dir, &m, err, sizeof err) != 0) fail_msg("%s", err);
    if (llama_load_hf(model_dir, &base, err, sizeof err) != 0) fail_msg("%s", err);
    lora_info info;
    if (lora_apply_info(&m, a.out, &info, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(info.modules, 6);
    assert_int_equal(info.r, 4);
    assert_true(fabsf(info.scaling - 2.0f) == 0.0f);
    size_t C = (size_t)m.cfg.hidden_size;
    assert_memory_equal(m.w.wk, base.w.wk, C * 8 * sizeof(float)); /* k_proj untouched */
    assert_memory_not_equal(m.w.wq, base.w.wq, C * C * sizeof(float));
    llama_free(&m);
    llama_free(&base);

    /* continuing the adapter: the first loss is below the fresh start's */
    char spec[PATH_MAX + 1024];
    snprintf(spec, sizeof spec,
             "{'base_model': {'path': '%%M'}, 'dataset': {'path': '%%D'}, 'template': "
             "'vanilla', 'learning_rate': 0.05, 'batch_size': 6, 'max_steps': 1, "
             "'adapter_init': {'path': '%s'}}",
             a.out);
    if (run_train(&b, spec, &rb, err, sizeof err) != 0) fail_msg("%s", err);
    assert_true(loss_at(rb, 0) < loss_at(ra, 5));
    json_decref(ra);
    json_decref(rb);
    tu_run_end(&a);
    tu_run_end(&b);
}

static void test_init_pretrain(void **state) {
    (void)state;
    char err[ERR_LEN];
    tu_run a;
    json_t *ra = NULL;
    tu_run_begin(&a, "train-init");
    char tokdir[PATH_MAX + 16];
    snprintf(tokdir, sizeof tokdir, "%s/tok", a.work);
    assert_int_equal(mkdir(tokdir, 0755), 0); /* no tokenizer.json: the byte-level one */
    char spec[PATH_MAX + 2048];
    snprintf(spec, sizeof spec,
             "{'base_model': {'init': {'hidden_size': 32, 'intermediate_size': 64, "
             "'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2, "
             "'vocab_size': 259, 'max_position_embeddings': 256}, 'tokenizer': {'path': '%s'}},"
             " 'dataset': {'path': '%%D'}, 'mode': 'pretrain', 'method': 'full', "
             "'learning_rate': 0.01, 'batch_size': 6, 'max_steps': 5, 'save_steps': 0}",
             tokdir);
    if (run_train(&a, spec, &ra, err, sizeof err) != 0) fail_msg("%s", err);
    double first = loss_at(ra, 0);
    if (fabs(first - log(259.0)) > 0.05) fail_msg("first loss %.6f, ln 259 = %.6f", first, log(259.0));
    assert_true(loss_at(ra, 4) < first - 0.1);
    assert_null(json_object_get(ra, "template"));
    llama_model out;
    if (llama_load_hf(a.out, &out, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(out.cfg.bos_token_id, 256);
    assert_int_equal(out.cfg.eos_token_id, 257);
    assert_int_equal(out.cfg.num_key_value_heads, 2);
    llama_free(&out);
    json_decref(ra);
    tu_run_end(&a);
}

static void test_refused(void **state) {
    (void)state;
    char err[ERR_LEN];
    tu_run a;
    json_t *r = NULL;
    tu_run_begin(&a, "train-refused");
    assert_int_equal(run_train(&a,
                               "{'base_model': {'path': '%M'}, 'dataset': {'path': '%D'}, "
                               "'max_steps': 1, 'lora': {'dropout': 1}}",
                               &r, err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "spec.lora.dropout"));
    assert_int_equal(run_train(&a,
                               "{'base_model': {'path': '%M'}, 'dataset': {'path': '%D'}, "
                               "'max_steps': 1, 'adapter_init': {'path': '%D'}}",
                               &r, err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "adapter_init"));
    assert_int_equal(run_train(&a,
                               "{'base_model': {'path': '%M'}, 'dataset': {'path': '%D'}, "
                               "'max_steps': 1, 'mixture': {'cap': 2, 'by': 'task'}}",
                               &r, err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "mixture"));
    assert_null(r);
    assert_int_equal(a.artifacts, 0);
    tu_run_end(&a);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_lora),
        cmocka_unit_test(test_init_pretrain),
        cmocka_unit_test(test_refused),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
