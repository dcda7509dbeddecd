/* test_train_steps.c - five AdamW optimizer steps of the whole engine against
 * PyTorch: tests/reference/train/fixtures/adamw_full (full fine-tuning of
 * gqa) and adamw_lora (lora_init's adapter on frozen gqa), 2 micro-batches of
 * B = 2 per step, cosine with 2 warmup steps, wd 0.01, clipping at 1.0.
 *
 * The step is assembled from the engine's pieces the way worker/train.c's
 * train_loop assembles it (train.c exposes no one-step function): gradients
 * zeroed, llama_loss_and_grad / llama_lora_loss_and_grad per micro-batch with
 * loss_scale = 1 / (the step's counted tokens), adamw_clip_grad_norm, lr =
 * learning_rate * sched_lambda(k), adamw_step; the optimizer's ranges as
 * train_make_optimizer builds them (every parameter of the full model, norm
 * weights without decay; the whole adapter with decay), and the test checks
 * that this is the decay split the fixture's no_weight_decay names.
 *
 * Asserted with the fixtures' stated tolerances (expected.json "tolerance"):
 *   - every micro-batch's counted tokens exactly, its loss and each step's
 *     loss |c - ref| / |ref| <= 1e-4;
 *   - each step's pre-clip grad norm relative <= 1e-4, and the post-clip norm
 *     equals grad_norm * clip_coef (relative 1e-4: the clip branch is taken
 *     in the full run at every step, never in the LoRA run);
 *   - each step's lr |c - ref| <= 1e-12 * learning_rate (lr 0 at step 0);
 *   - every saved final tensor: ||(c - p0) - (ref - p0)||_2 / ||ref - p0||_2
 *     <= 1e-3 and max |c - ref| <= 0.05 * learning_rate; frozen base weights
 *     of the LoRA run bit-for-bit unchanged;
 *   - eval_loss_after (micro-batches 0 and 1 with the final parameters)
 *     relative <= 1e-4. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/testutil.h"
#include "common/npy.h"
#include "common/st.h"
#include "common/util.h"
#include "worker/engine/adamw.h"
#include "worker/engine/backend.h"
#include "worker/engine/forward.h"
#include "worker/engine/model.h"
#include "worker/engine/schedule.h"

#define MAX_MB 16
#define MAX_TENSORS 64

static char train_dir[PATH_MAX + 64];

/* Where this test's fixtures are (testutil.h). */
static void find_fixtures(void) {
    tu_reference_path(train_dir, sizeof train_dir, "../train/fixtures");
}

/* A named trained tensor: its offset in the trained buffer, its float count,
 * whether it is decayed. */
typedef struct {
    char name[128];
    size_t offset, count;
    bool decay;
} tensor;

/* One run: the fixture, the model, what is trained (the model's params, or a
 * LoRA adapter's) and its tensors by name. */
typedef struct {
    char dir[PATH_MAX + 128];
    json_t *expected;
    llama_model model;
    bool is_lora;
    llama_lora lora;
    float *train;     /* trained buffer (model.params or lora.params) */
    size_t ntrain;
    tensor tensors[MAX_TENSORS];
    size_t ntensors;
    tu_batch mb[MAX_MB];
    size_t nmb;
    int max_T, max_B;
} run_t;

static void add_tensor(run_t *r, const char *name, const float *p, size_t count, bool decay) {
    assert_true(r->ntensors < MAX_TENSORS);
    tensor *t = &r->tensors[r->ntensors++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->offset = (size_t)(p - r->train);
    t->count = count;
    t->decay = decay;
}

/* Every tensor of the full model in Hugging Face's names, norm weights
 * without decay (train.c's train_tensors rule). */
static void list_full_tensors(run_t *r) {
    const llama_model *m = &r->model;
    const llama_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, FF = (size_t)c->intermediate_size;
    size_t V = (size_t)c->vocab_size, HS = C / (size_t)c->num_attention_heads;
    size_t Q = (size_t)c->num_attention_heads * HS, KV = (size_t)c->num_key_value_heads * HS;
    const llama_weights *w = &m->w;
    const struct {
        const char *name;
        const float *base;
        size_t count;
        bool decay;
    } per[] = {
        {"input_layernorm.weight", w->attn_norm, C, false},
        {"self_attn.q_proj.weight", w->wq, Q * C, true},
        {"self_attn.k_proj.weight", w->wk, KV * C, true},
        {"self_attn.v_proj.weight", w->wv, KV * C, true},
        {"self_attn.o_proj.weight", w->wo, C * Q, true},
        {"post_attention_layernorm.weight", w->mlp_norm, C, false},
        {"mlp.gate_proj.weight", w->w_gate, FF * C, true},
        {"mlp.up_proj.weight", w->w_up, FF * C, true},
        {"mlp.down_proj.weight", w->w_down, C * FF, true},
    };
    char name[128];
    add_tensor(r, "model.embed_tokens.weight", w->embed, V * C, true);
    for (int l = 0; l < c->num_hidden_layers; l++)
        for (size_t k = 0; k < sizeof per / sizeof per[0]; k++) {
            snprintf(name, sizeof name, "model.layers.%d.%s", l, per[k].name);
            add_tensor(r, name, per[k].base + (size_t)l * per[k].count, per[k].count,
                       per[k].decay);
        }
    add_tensor(r, "model.norm.weight", w->final_norm, C, false);
    assert_false(c->tie_word_embeddings);
    add_tensor(r, "lm_head.weight", w->lm_head, V * C, true);
}

/* PEFT's tensor name of layer l's projection p, A or B. */
static void peft_name(char *out, size_t len, int l, llama_proj p, bool is_b) {
    snprintf(out, len, "base_model.model.model.layers.%d.%s.lora_%s.weight", l,
             llama_proj_module(p), is_b ? "B" : "A");
}

/* Binds r->lora (q_proj and v_proj, the fixture's r and alpha) to a new
 * buffer, reads the initial adapter from adapter_dir and lists its tensors
 * (all decayed). */
static void load_lora(run_t *r) {
    char path[PATH_MAX + 400], err[ERR_LEN], name[160];
    snprintf(path, sizeof path, "%s/%s/adapter_config.json", r->dir,
             json_string_value(json_object_get(r->expected, "adapter_dir")));
    json_error_t jerr;
    json_t *cfgj = json_load_file(path, 0, &jerr);
    if (!cfgj) fail_msg("%s: %s", path, jerr.text);
    int rank = (int)json_integer_value(json_object_get(cfgj, "r"));
    double alpha = json_number_value(json_object_get(cfgj, "lora_alpha"));
    json_decref(cfgj);
    assert_int_equal(rank, 4);
    assert_true(alpha == 8.0);
    bool target[LLAMA_NPROJ] = {false};
    target[LLAMA_PROJ_Q] = target[LLAMA_PROJ_V] = true;
    const llama_config *cfg = &r->model.cfg;
    size_t n = llama_lora_count(cfg, rank, target);
    assert_true(n > 0);
    float *params = calloc(n, sizeof *params);
    assert_non_null(params);
    if (llama_lora_bind(&r->lora, cfg, rank, (float)(alpha / rank), target, params, err,
                        sizeof err) != 0)
        fail_msg("%s", err);
    r->train = params;
    r->ntrain = n;
    snprintf(path, sizeof path, "%s/%s/adapter_model.safetensors", r->dir,
             json_string_value(json_object_get(r->expected, "adapter_dir")));
    st_file sf;
    if (st_open(path, &sf, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
    for (int l = 0; l < cfg->num_hidden_layers; l++)
        for (int p = 0; p < LLAMA_NPROJ; p++) {
            if (!target[p]) continue;
            size_t out, in;
            llama_proj_dims(cfg, (llama_proj)p, &out, &in);
            for (int isb = 0; isb < 2; isb++) {
                peft_name(name, sizeof name, l, (llama_proj)p, isb);
                const st_tensor *t = st_find(&sf, name);
                if (!t) fail_msg("%s: no %s", path, name);
                size_t cnt = (size_t)rank * (isb ? out : in);
                assert_int_equal(t->count, cnt);
                float *dst = isb ? r->lora.b[p] + (size_t)l * cnt : r->lora.a[p] + (size_t)l * cnt;
                if (st_to_f32(&sf, t, dst, err, sizeof err) != 0) fail_msg("%s", err);
                add_tensor(r, name, dst, cnt, true);
            }
        }
    st_close(&sf);
}

static void run_load(run_t *r, const char *name) {
    memset(r, 0, sizeof *r);
    char path[PATH_MAX + 300], err[ERR_LEN];
    snprintf(r->dir, sizeof r->dir, "%s/%s", train_dir, name);
    snprintf(path, sizeof path, "%s/expected.json", r->dir);
    json_error_t jerr;
    r->expected = json_load_file(path, 0, &jerr);
    if (!r->expected) fail_msg("%s: %s", path, jerr.text);
    const char *md = json_string_value(json_object_get(r->expected, "model_dir"));
    assert_non_null(md);
    snprintf(path, sizeof path, "%s/%s", r->dir, md);
    if (llama_load_hf(path, &r->model, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
    r->is_lora = strcmp(json_string_value(json_object_get(r->expected, "method")), "lora") == 0;
    if (r->is_lora) {
        load_lora(r);
    } else {
        r->train = r->model.params;
        r->ntrain = r->model.nparams;
        list_full_tensors(r);
    }
    json_t *mbs = json_object_get(r->expected, "micro_batches");
    r->nmb = json_array_size(mbs);
    assert_true(r->nmb > 0 && r->nmb <= MAX_MB);
    for (size_t i = 0; i < r->nmb; i++) {
        tu_batch_load(&r->mb[i], json_array_get(mbs, i));
        assert_true(r->mb[i].n_counted > 0);
        if (r->mb[i].T > r->max_T) r->max_T = r->mb[i].T;
        if (r->mb[i].B > r->max_B) r->max_B = r->mb[i].B;
    }
}

static void run_free(run_t *r) {
    for (size_t i = 0; i < r->nmb; i++) tu_batch_free(&r->mb[i]);
    if (r->is_lora) free(r->train);
    llama_free(&r->model);
    json_decref(r->expected);
}

/* The tensor named name, or fails the test. */
static const tensor *find_tensor(const run_t *r, const char *name) {
    for (size_t i = 0; i < r->ntensors; i++)
        if (strcmp(r->tensors[i].name, name) == 0) return &r->tensors[i];
    fail_msg("no trained tensor %s", name);
    return NULL;
}

/* The fixture's decay split must be the one the engine's ranges use: the
 * tensors of no_weight_decay, and only they, are undecayed. */
static void check_decay_groups(const run_t *r) {
    json_t *nwd = json_object_get(r->expected, "no_weight_decay");
    assert_true(json_is_array(nwd));
    size_t undecayed = 0;
    for (size_t i = 0; i < r->ntensors; i++) undecayed += !r->tensors[i].decay;
    assert_int_equal(json_array_size(nwd), undecayed);
    for (size_t i = 0; i < json_array_size(nwd); i++) {
        const tensor *t = find_tensor(r, json_string_value(json_array_get(nwd, i)));
        assert_false(t->decay);
    }
}

static int cmp_range(const void *a, const void *b) {
    const adamw_range *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* The optimizer over r's tensors, sorted by offset, adjacent tensors with the
 * same decay merged (train_make_optimizer's construction); they must cover the
 * trained buffer exactly. */
static adamw *make_optimizer(const run_t *r) {
    json_t *hp = json_object_get(r->expected, "hyperparameters");
    adamw_config cfg = adamw_default_config();
    cfg.beta1 = json_number_value(json_object_get(hp, "adam_beta1"));
    cfg.beta2 = json_number_value(json_object_get(hp, "adam_beta2"));
    cfg.eps = json_number_value(json_object_get(hp, "adam_epsilon"));
    cfg.weight_decay = json_number_value(json_object_get(hp, "weight_decay"));
    adamw_range rg[MAX_TENSORS];
    for (size_t i = 0; i < r->ntensors; i++)
        rg[i] = (adamw_range){r->tensors[i].offset, r->tensors[i].count, r->tensors[i].decay};
    qsort(rg, r->ntensors, sizeof rg[0], cmp_range);
    size_t m = 0, covered = 0;
    for (size_t i = 0; i < r->ntensors; i++) {
        assert_int_equal(rg[i].offset, covered);
        covered += rg[i].count;
        if (m > 0 && rg[m - 1].decay == rg[i].decay)
            rg[m - 1].count += rg[i].count;
        else
            rg[m++] = rg[i];
    }
    assert_int_equal(covered, r->ntrain);
    adamw *opt = NULL;
    char err[ERR_LEN];
    if (adamw_new(&cfg, rg, m, &opt, err, sizeof err) != 0) fail_msg("%s", err);
    return opt;
}

/* Forward + backward of micro-batch bt into grads with loss_scale scale;
 * returns its CE sum, its counted tokens in *counted. */
static double micro_step(run_t *r, llama_state *s, const tu_batch *bt, double scale, float *grads,
                         long *counted) {
    const backend *be = backend_cpu();
    char err[ERR_LEN];
    double sum = 0.0;
    int rc = r->is_lora ? llama_lora_loss_and_grad(be, &r->model, &r->lora, s, bt->tokens,
                                                   bt->labels, bt->lengths, bt->B, bt->T, scale,
                                                   grads, &sum, counted, err, sizeof err)
                        : llama_loss_and_grad(be, &r->model, s, bt->tokens, bt->labels,
                                              bt->lengths, bt->B, bt->T, scale, grads, &sum,
                                              counted, err, sizeof err);
    if (rc != 0) fail_msg("%s", err);
    return sum;
}

static double list_num(const run_t *r, const char *key, size_t i) {
    json_t *a = json_object_get(r->expected, key);
    if (i >= json_array_size(a)) fail_msg("expected.json %s has no entry %zu", key, i);
    return json_number_value(json_array_get(a, i));
}

static double tol(const run_t *r, const char *key) {
    json_t *v = json_object_get(json_object_get(r->expected, "tolerance"), key);
    if (!json_is_number(v)) fail_msg("expected.json has no tolerance %s", key);
    return json_number_value(v);
}

static void check_rel(const char *what, size_t k, double got, double want, double rel) {
    double e = fabs(got - want) / fabs(want);
    if (!(e <= rel)) fail_msg("%s[%zu]: %.10g vs reference %.10g (%.3g relative > %g)", what, k,
                              got, want, e, rel);
}

/* Compares the final tensors the fixture saved with r's, as updates from p0
 * (the trained buffer before the first step). */
static void check_finals(const run_t *r, const float *p0, double lr_base) {
    json_t *map = json_object_get(r->expected, "final_params");
    assert_true(json_object_size(map) > 0);
    if (json_is_true(json_object_get(r->expected, "all_trained_params_saved")))
        assert_int_equal(json_object_size(map), r->ntensors);
    double l2_tol = tol(r, "final_update_l2_rel"),
           max_tol = tol(r, "final_param_max_abs_err_over_lr") * lr_base;
    double worst_l2 = 0.0, worst_max = 0.0;
    const char *key;
    json_t *val;
    json_object_foreach(map, key, val) {
        const tensor *t = find_tensor(r, key);
        char path[PATH_MAX + 400], err[ERR_LEN];
        snprintf(path, sizeof path, "%s/%s", r->dir, json_string_value(val));
        double *ref = NULL;
        npy_header h;
        if (npy_read_f64(path, &ref, &h, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
        assert_int_equal(h.rows * h.cols, t->count);
        const float *c = r->train + t->offset, *c0 = p0 + t->offset;
        double diff2 = 0.0, upd2 = 0.0, maxd = 0.0;
        for (size_t i = 0; i < t->count; i++) {
            if (!isfinite(c[i])) fail_msg("%s[%zu] is not finite", key, i);
            double d = (double)c[i] - ref[i], u = ref[i] - (double)c0[i];
            diff2 += d * d;
            upd2 += u * u;
            if (fabs(d) > maxd) maxd = fabs(d);
        }
        assert_true(upd2 > 0.0);
        double l2 = sqrt(diff2 / upd2);
        if (!(l2 <= l2_tol)) fail_msg("%s: update L2 error %.3g relative > %g", key, l2, l2_tol);
        if (!(maxd <= max_tol))
            fail_msg("%s: max |c - ref| %.3g > %.3g (%.3g lr)", key, maxd, max_tol,
                     maxd / lr_base);
        if (l2 > worst_l2) worst_l2 = l2;
        if (maxd > worst_max) worst_max = maxd;
        free(ref);
    }
    printf("%s: %zu final tensors, update L2 error <= %.2g, max |c - ref| <= %.2g lr\n",
           r->is_lora ? "adamw_lora" : "adamw_full", json_object_size(map), worst_l2,
           worst_max / lr_base);
}

/* Runs the fixture's optimizer steps and checks them (see the top). */
static void check_steps(const char *name) {
    run_t r;
    run_load(&r, name);
    check_decay_groups(&r);
    json_t *hp = json_object_get(r.expected, "hyperparameters");
    double lr_base = json_number_value(json_object_get(hp, "learning_rate"));
    double max_norm = json_number_value(json_object_get(hp, "max_grad_norm"));
    size_t accum = (size_t)json_integer_value(json_object_get(hp, "gradient_accumulation_steps"));
    int64_t steps = json_integer_value(json_object_get(hp, "max_steps"));
    assert_true(accum > 0 && steps > 0 && (size_t)steps * accum == r.nmb);
    char err[ERR_LEN];
    sched sch = {SCHED_COSINE, json_integer_value(json_object_get(hp, "warmup_steps")), steps};
    assert_string_equal(json_string_value(json_object_get(hp, "lr_scheduler")), "cosine");
    if (sched_check(&sch, err, sizeof err) != 0) fail_msg("%s", err);

    adamw *opt = make_optimizer(&r);
    assert_int_equal(adamw_trainable(opt), r.ntrain);
    float *grads = calloc(r.ntrain, sizeof *grads), *p0 = malloc(r.ntrain * sizeof *p0);
    float *base0 = malloc(r.model.nparams * sizeof *base0);
    assert_true(grads && p0 && base0);
    memcpy(p0, r.train, r.ntrain * sizeof *p0);
    memcpy(base0, r.model.params, r.model.nparams * sizeof *base0);
    llama_state s;
    if (llama_state_init_train(&s, backend_cpu(), &r.model.cfg, r.max_B, r.max_T, err,
                               sizeof err) != 0)
        fail_msg("%s", err);

    double lr_tol = tol(&r, "lr_rel") * lr_base, loss_tol = tol(&r, "step_loss_rel"),
           micro_tol = tol(&r, "micro_loss_rel"), norm_tol = tol(&r, "grad_norm_rel");
    int clipped = 0;
    for (int64_t k = 0; k < steps; k++) {
        size_t first = (size_t)k * accum;
        long n_step = 0;
        for (size_t i = 0; i < accum; i++) {
            long want = (long)list_num(&r, "micro_counted", first + i);
            assert_int_equal(r.mb[first + i].n_counted, want);
            n_step += want;
        }
        memset(grads, 0, r.ntrain * sizeof *grads);
        double sum = 0.0, scale = 1.0 / (double)n_step;
        long counted = 0;
        for (size_t i = 0; i < accum; i++) {
            long nc = 0;
            double ms = micro_step(&r, &s, &r.mb[first + i], scale, grads, &nc);
            assert_int_equal(nc, r.mb[first + i].n_counted);
            check_rel("micro_loss", first + i, ms / (double)nc,
                      list_num(&r, "micro_loss", first + i), micro_tol);
            sum += ms;
            counted += nc;
        }
        assert_int_equal(counted, n_step);
        double loss = sum / (double)counted;
        check_rel("step_loss", (size_t)k, loss, list_num(&r, "step_loss", (size_t)k), loss_tol);

        double norm = adamw_clip_grad_norm(opt, grads, max_norm);
        double want_norm = list_num(&r, "grad_norm", (size_t)k);
        double coef = list_num(&r, "clip_coef", (size_t)k);
        check_rel("grad_norm", (size_t)k, norm, want_norm, norm_tol);
        check_rel("clipped grad_norm", (size_t)k, adamw_grad_norm(opt, grads), want_norm * coef,
                  norm_tol);
        clipped += coef < 1.0;

        double lr = sched_lr(&sch, lr_base, k), want_lr = list_num(&r, "lr", (size_t)k);
        if (!(fabs(lr - want_lr) <= lr_tol))
            fail_msg("lr[%lld]: %.17g vs reference %.17g", (long long)k, lr, want_lr);
        adamw_step(opt, r.train, grads, lr);
        printf("%s step %lld: loss %.9f (ref %.9f), grad norm %.7f (ref %.7f), lr %g\n", name,
               (long long)k, loss, list_num(&r, "step_loss", (size_t)k), norm, want_norm, lr);
    }
    assert_int_equal(adamw_steps(opt), steps);
    /* Both clipping branches are covered between the two fixtures. */
    if (r.is_lora)
        assert_int_equal(clipped, 0);
    else
        assert_int_equal(clipped, steps);

    if (r.is_lora)
        assert_memory_equal(base0, r.model.params, r.model.nparams * sizeof *base0);
    check_finals(&r, p0, lr_base);

    /* The loss of the first step's micro-batches with the final parameters. */
    memset(grads, 0, r.ntrain * sizeof *grads);
    double sum = 0.0;
    long counted = 0;
    for (size_t i = 0; i < accum; i++) {
        long nc = 0;
        sum += micro_step(&r, &s, &r.mb[i], 1.0, grads, &nc);
        counted += nc;
    }
    check_rel("eval_loss_after", 0, sum / (double)counted,
              json_number_value(json_object_get(r.expected, "eval_loss_after")),
              tol(&r, "eval_loss_after_rel"));

    llama_state_free(&s);
    adamw_free(opt);
    free(grads);
    free(p0);
    free(base0);
    run_free(&r);
}

static void test_adamw_full(void **state) {
    (void)state;
    check_steps("adamw_full");
}

static void test_adamw_lora(void **state) {
    (void)state;
    check_steps("adamw_lora");
}

int main(void) {
    find_fixtures();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adamw_full),
        cmocka_unit_test(test_adamw_lora),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
