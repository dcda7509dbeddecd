/* test_backward.c - llama_loss_and_grad (worker/engine/forward.c on the CPU
 * backend) against tests/reference/train/fixtures/ (gen_train.py: float64
 * PyTorch autograd of Hugging Face's LlamaForCausalLM loss):
 *   - sft_gqa (all 30 gradients), sft_tied (tied head: lookup + head in one
 *     gradient), pretrain: loss |c - ref| / |ref| <= 1e-4 and every saved
 *     gradient max |c - ref| / max |ref| <= 1e-4 (REF_REL_TOL, the fixtures'
 *     stated tolerance);
 *   - padding: the sft_gqa batch padded 3 columns further with junk ids
 *     gives the same loss and gradients (<= 1e-6 relative, BATCH_REL_TOL);
 *   - accumulation: adamw_full's micro-batches 0 and 1 through two calls with
 *     loss_scale = 1 / (their counted tokens together) equal one call over
 *     both as one batch (<= 1e-5 relative: different sgemm shapes, so
 *     different float32 summation orders);
 *   - finite differences in C on a tiny random model (central, h = 1e-2 on
 *     float32 losses summed in double): |fd - g| <= 2e-3 + 2e-2 |g| on the
 *     largest-gradient entry of every tensor;
 *   - bad labels are refused and leave grads untouched;
 *   - LoRA (lora_gqa: lora_init's adapter, r 4, alpha 8, q_proj and v_proj,
 *     unmerged on frozen gqa): loss and all 12 A/B gradients within 1e-4,
 *     base weights bit-for-bit unchanged. */
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
#include "common/st.h"
#include "common/util.h"
#include "worker/engine/backend.h"
#include "worker/engine/forward.h"
#include "worker/engine/model.h"

#define REF_REL_TOL 1e-4
#define BATCH_REL_TOL 1e-6
#define ACCUM_REL_TOL 1e-5

static char train_dir[PATH_MAX + 64];

/* Where this test's fixtures are (testutil.h). */
static void find_fixtures(void) {
    tu_reference_path(train_dir, sizeof train_dir, "../train/fixtures");
}

/* A fixture directory: its expected.json and its model. */
typedef struct {
    char dir[PATH_MAX + 128];
    json_t *expected;
    llama_model model;
} fixture;

static void fixture_load(fixture *f, const char *name) {
    memset(f, 0, sizeof *f);
    char path[PATH_MAX + 300], err[ERR_LEN];
    snprintf(f->dir, sizeof f->dir, "%s/%s", train_dir, name);
    snprintf(path, sizeof path, "%s/expected.json", f->dir);
    json_error_t jerr;
    f->expected = json_load_file(path, 0, &jerr);
    if (!f->expected) fail_msg("%s: %s", path, jerr.text);
    const char *md = json_string_value(json_object_get(f->expected, "model_dir"));
    assert_non_null(md);
    snprintf(path, sizeof path, "%s/%s", f->dir, md);
    if (llama_load_hf(path, &f->model, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
}

static void fixture_free(fixture *f) {
    json_decref(f->expected);
    llama_free(&f->model);
}

/* The gradient of Hugging Face tensor name inside grads (layout of
 * m->params), with its float count in *n. */
static float *grad_of(const llama_model *m, float *grads, const char *name, size_t *n) {
    const llama_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, FF = (size_t)c->intermediate_size;
    size_t QD = C, KVD = C / (size_t)c->num_attention_heads * (size_t)c->num_key_value_heads;
    size_t V = (size_t)c->vocab_size;
    const llama_weights *w = &m->w;
    const float *p = NULL;
    int layer = -1, used = 0;
    char rest[128];
    if (strcmp(name, "model.embed_tokens.weight") == 0) {
        p = w->embed, *n = V * C;
    } else if (strcmp(name, "lm_head.weight") == 0) {
        p = w->lm_head, *n = V * C;
    } else if (strcmp(name, "model.norm.weight") == 0) {
        p = w->final_norm, *n = C;
    } else if (sscanf(name, "model.layers.%d.%n", &layer, &used) == 1 && used > 0) {
        snprintf(rest, sizeof rest, "%s", name + used);
        size_t l = (size_t)layer;
        if (strcmp(rest, "input_layernorm.weight") == 0) p = w->attn_norm + l * C, *n = C;
        else if (strcmp(rest, "post_attention_layernorm.weight") == 0)
            p = w->mlp_norm + l * C, *n = C;
        else if (strcmp(rest, "self_attn.q_proj.weight") == 0) p = w->wq + l * QD * C, *n = QD * C;
        else if (strcmp(rest, "self_attn.k_proj.weight") == 0)
            p = w->wk + l * KVD * C, *n = KVD * C;
        else if (strcmp(rest, "self_attn.v_proj.weight") == 0)
            p = w->wv + l * KVD * C, *n = KVD * C;
        else if (strcmp(rest, "self_attn.o_proj.weight") == 0) p = w->wo + l * C * QD, *n = C * QD;
        else if (strcmp(rest, "mlp.gate_proj.weight") == 0)
            p = w->w_gate + l * FF * C, *n = FF * C;
        else if (strcmp(rest, "mlp.up_proj.weight") == 0) p = w->w_up + l * FF * C, *n = FF * C;
        else if (strcmp(rest, "mlp.down_proj.weight") == 0)
            p = w->w_down + l * C * FF, *n = C * FF;
    }
    if (!p) fail_msg("unknown tensor %s", name);
    return grads + (p - m->params);
}

/* Runs llama_loss_and_grad over bt with scale 1/n_counted into grads
 * (added to); returns the mean loss. */
static double run(const llama_model *m, const tu_batch *bt, int cap_T, double scale, float *grads) {
    llama_state s;
    char err[ERR_LEN];
    const backend *be = backend_cpu();
    if (llama_state_init_train(&s, be, &m->cfg, bt->B, cap_T, err, sizeof err) != 0)
        fail_msg("%s", err);
    double sum = 0.0;
    long counted = 0;
    if (llama_loss_and_grad(be, m, &s, bt->tokens, bt->labels, bt->lengths, bt->B, bt->T, scale,
                            grads, &sum, &counted, err, sizeof err) != 0)
        fail_msg("%s", err);
    llama_state_free(&s);
    assert_true(counted > 0);
    if (bt->n_counted) assert_int_equal(counted, bt->n_counted);
    return sum / (double)counted;
}

/* A reference case: loss and every gradient the fixture saved. */
static void check_reference(const char *name) {
    fixture f;
    fixture_load(&f, name);
    tu_batch bt;
    tu_batch_load(&bt, json_object_get(f.expected, "batch"));
    float *grads = calloc(f.model.nparams, sizeof *grads);
    assert_non_null(grads);
    double loss = run(&f.model, &bt, bt.T, 1.0 / (double)bt.n_counted, grads);
    double want = json_number_value(json_object_get(f.expected, "loss"));
    double lrel = fabs(loss - want) / fabs(want);
    printf("%s: loss %.9g ref %.9g rel %.2g\n", name, loss, want, lrel);
    assert_true(lrel <= REF_REL_TOL);
    json_t *map = json_object_get(f.expected, "grads");
    const char *tname;
    json_t *file;
    double worst = 0.0;
    size_t checked = 0;
    json_object_foreach(map, tname, file) {
        char path[PATH_MAX + 400], err[ERR_LEN];
        snprintf(path, sizeof path, "%s/%s", f.dir, json_string_value(file));
        double *ref = NULL;
        npy_header h;
        if (npy_read_f64(path, &ref, &h, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
        size_t n = 0;
        float *g = grad_of(&f.model, grads, tname, &n);
        assert_int_equal(h.rows * h.cols, n);
        float *want_f = malloc(n * sizeof *want_f);
        assert_non_null(want_f);
        for (size_t i = 0; i < n; i++) want_f[i] = (float)ref[i];
        double e = tu_rel_err_ff(g, want_f, n, tname);
        if (e > REF_REL_TOL) fail_msg("%s %s: gradient error %g relative", name, tname, e);
        if (e > worst) worst = e;
        checked++;
        free(ref);
        free(want_f);
    }
    printf("%s: %zu gradients, worst %.2g relative\n", name, checked, worst);
    assert_true(checked > 0);
    free(grads);
    tu_batch_free(&bt);
    fixture_free(&f);
}

static void test_sft_gqa(void **state) {
    (void)state;
    check_reference("sft_gqa");
}

static void test_sft_tied(void **state) {
    (void)state;
    check_reference("sft_tied");
}

static void test_pretrain(void **state) {
    (void)state;
    check_reference("pretrain");
}

/* max |a - b| / max |a| over the whole parameter layout. */
static double whole_rel(const float *a, const float *b, size_t n) {
    double scale = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (fabs(a[i]) > scale) scale = fabs(a[i]);
        double d = fabs((double)a[i] - b[i]);
        if (d > worst) worst = d;
    }
    assert_true(scale > 0.0);
    return worst / scale;
}

static void test_padding_invariance(void **state) {
    (void)state;
    fixture f;
    fixture_load(&f, "sft_gqa");
    tu_batch bt;
    tu_batch_load(&bt, json_object_get(f.expected, "batch"));
    size_t np = f.model.nparams;
    float *g1 = calloc(np, sizeof *g1), *g2 = calloc(np, sizeof *g2);
    assert_true(g1 && g2);
    double scale = 1.0 / (double)bt.n_counted;
    double l1 = run(&f.model, &bt, bt.T, scale, g1);
    tu_batch wide = bt;
    wide.T = bt.T + 3;
    size_t n = (size_t)bt.B * (size_t)wide.T;
    wide.tokens = malloc(n * sizeof(int));
    wide.labels = malloc(n * sizeof(int));
    assert_true(wide.tokens && wide.labels);
    for (int b = 0; b < bt.B; b++)
        for (int t = 0; t < wide.T; t++) {
            size_t i = (size_t)b * (size_t)wide.T + (size_t)t;
            bool real = t < bt.T;
            /* Junk in the padding, an out-of-vocabulary id included. */
            wide.tokens[i] = real && t < bt.lengths[b] ? bt.tokens[b * bt.T + t]
                                                       : (t % 2 ? 123 : 99999);
            wide.labels[i] = real ? bt.labels[b * bt.T + t] : LLAMA_IGNORE_INDEX;
        }
    double l2 = run(&f.model, &wide, wide.T, scale, g2);
    assert_true(fabs(l1 - l2) <= BATCH_REL_TOL * fabs(l1));
    double e = whole_rel(g1, g2, np);
    printf("padding: loss %.9g vs %.9g, grads %.2g relative\n", l1, l2, e);
    assert_true(e <= BATCH_REL_TOL);
    free(wide.tokens);
    free(wide.labels);
    free(g1);
    free(g2);
    tu_batch_free(&bt);
    fixture_free(&f);
}

static void test_accumulation(void **state) {
    (void)state;
    fixture f;
    fixture_load(&f, "adamw_full");
    json_t *mbs = json_object_get(f.expected, "micro_batches");
    tu_batch a, b;
    tu_batch_load(&a, json_array_get(mbs, 0));
    tu_batch_load(&b, json_array_get(mbs, 1));
    long total = a.n_counted + b.n_counted;
    size_t np = f.model.nparams;
    float *g1 = calloc(np, sizeof *g1), *g2 = calloc(np, sizeof *g2);
    assert_true(g1 && g2);
    double la = run(&f.model, &a, a.T, 1.0 / (double)total, g1);
    double lb = run(&f.model, &b, b.T, 1.0 / (double)total, g1);
    /* micro_loss: each micro-batch's own mean. */
    double wa = json_number_value(json_array_get(json_object_get(f.expected, "micro_loss"), 0));
    double wb = json_number_value(json_array_get(json_object_get(f.expected, "micro_loss"), 1));
    assert_true(fabs(la - wa) <= REF_REL_TOL * wa && fabs(lb - wb) <= REF_REL_TOL * wb);

    tu_batch both = {.B = a.B + b.B, .T = a.T > b.T ? a.T : b.T, .n_counted = total};
    size_t n = (size_t)both.B * (size_t)both.T;
    both.tokens = malloc(n * sizeof(int));
    both.labels = malloc(n * sizeof(int));
    both.lengths = malloc((size_t)both.B * sizeof(int));
    assert_true(both.tokens && both.labels && both.lengths);
    for (int r = 0; r < both.B; r++) {
        const tu_batch *src = r < a.B ? &a : &b;
        int sr = r < a.B ? r : r - a.B;
        both.lengths[r] = src->lengths[sr];
        for (int t = 0; t < both.T; t++) {
            size_t i = (size_t)r * (size_t)both.T + (size_t)t;
            bool in = t < src->T;
            both.tokens[i] = in ? src->tokens[sr * src->T + t] : 0;
            both.labels[i] = in ? src->labels[sr * src->T + t] : LLAMA_IGNORE_INDEX;
        }
    }
    double lboth = run(&f.model, &both, both.T, 1.0 / (double)total, g2);
    double mix = (la * (double)a.n_counted + lb * (double)b.n_counted) / (double)total;
    double step = json_number_value(json_array_get(json_object_get(f.expected, "step_loss"), 0));
    assert_true(fabs(lboth - mix) <= ACCUM_REL_TOL * mix);
    assert_true(fabs(lboth - step) <= REF_REL_TOL * step);
    double e = whole_rel(g2, g1, np);
    printf("accumulation: step loss %.9g (ref %.9g), grads %.2g relative\n", lboth, step, e);
    assert_true(e <= ACCUM_REL_TOL);
    tu_batch_free(&a);
    tu_batch_free(&b);
    tu_batch_free(&both);
    free(g1);
    free(g2);
    fixture_free(&f);
}

/* Uniform in [-a, a) from a 64-bit LCG (fixed seed: reproducible). */
static float lcg_uniform(uint64_t *st, float a) {
    *st = *st * 6364136223846793005ULL + 1442695040888963407ULL;
    return a * (2.0f * (float)((*st >> 40) & 0xFFFFFF) / 16777216.0f - 1.0f);
}

static void test_finite_differences(void **state) {
    (void)state;
    llama_config cfg = {.hidden_size = 8, .intermediate_size = 12, .num_hidden_layers = 2,
                        .num_attention_heads = 4, .num_key_value_heads = 2, .vocab_size = 13,
                        .max_position_embeddings = 16, .rms_norm_eps = 1e-6f,
                        .rope_theta = 10000.0f, .tie_word_embeddings = false,
                        .bos_token_id = 1, .eos_token_id = 2, .pad_token_id = 0};
    llama_model m;
    char err[ERR_LEN];
    if (llama_alloc(&m, &cfg, err, sizeof err) != 0) fail_msg("%s", err);
    uint64_t seed = 42;
    for (size_t i = 0; i < m.nparams; i++) m.params[i] = lcg_uniform(&seed, 0.6f);
    for (size_t i = 0; i < (size_t)cfg.hidden_size; i++) m.w.final_norm[i] += 1.0f;
    int tokens[2 * 6] = {1, 5, 7, 3, 9, 2, 1, 4, 11, 12, 0, 0};
    int labels[2 * 6] = {-100, -100, 7, 3, 9, 2, -100, 4, 11, 12, -100, -100};
    int lengths[2] = {6, 4};
    tu_batch bt = {.B = 2, .T = 6, .tokens = tokens, .labels = labels, .lengths = lengths};
    float *g = calloc(m.nparams, sizeof *g);
    assert_non_null(g);
    double base = run(&m, &bt, 6, 1.0, g); /* scale 1: gradient of the loss SUM */
    (void)base;
    /* Probe the largest entry of each tensor's region. */
    const float *regions[] = {m.w.embed, m.w.attn_norm, m.w.wq, m.w.wk, m.w.wv, m.w.wo,
                              m.w.mlp_norm, m.w.w_gate, m.w.w_up, m.w.w_down, m.w.final_norm,
                              m.w.lm_head};
    size_t nreg = sizeof regions / sizeof regions[0];
    for (size_t r = 0; r < nreg; r++) {
        size_t start = (size_t)(regions[r] - m.params);
        size_t end = r + 1 < nreg ? (size_t)(regions[r + 1] - m.params) : m.nparams;
        size_t best = start;
        for (size_t i = start; i < end; i++)
            if (fabsf(g[i]) > fabsf(g[best])) best = i;
        float keep = m.params[best];
        const float h = 1e-2f;
        double sums[2];
        for (int side = 0; side < 2; side++) {
            m.params[best] = keep + (side ? -h : h);
            llama_state s;
            double sum;
            long cnt;
            if (llama_state_init_train(&s, backend_cpu(), &cfg, 2, 6, err, sizeof err) != 0 ||
                llama_loss_and_grad(backend_cpu(), &m, &s, tokens, labels, lengths, 2, 6, 1.0,
                                    NULL, &sum, &cnt, err, sizeof err) != 0)
                fail_msg("%s", err);
            llama_state_free(&s);
            sums[side] = sum;
        }
        m.params[best] = keep;
        double fd = (sums[0] - sums[1]) / (2.0 * h);
        if (fabs(fd - g[best]) > 2e-3 + 2e-2 * fabs(g[best]))
            fail_msg("tensor %zu entry %zu: analytic %g, finite difference %g", r, best - start,
                     (double)g[best], fd);
    }
    free(g);
    llama_free(&m);
}

static void test_bad_labels(void **state) {
    (void)state;
    fixture f;
    fixture_load(&f, "sft_gqa");
    tu_batch bt;
    tu_batch_load(&bt, json_object_get(f.expected, "batch"));
    llama_state s;
    char err[ERR_LEN];
    const backend *be = backend_cpu();
    if (llama_state_init_train(&s, be, &f.model.cfg, bt.B, bt.T, err, sizeof err) != 0)
        fail_msg("%s", err);
    float *g = calloc(f.model.nparams, sizeof *g);
    assert_non_null(g);
    double sum = -1.0;
    long cnt = -1;
    int bad[] = {-5, 300, 17};
    /* Out of vocabulary, negative, and a real label on a padding position. */
    size_t where[] = {4, 5, (size_t)2 * (size_t)bt.T + (size_t)bt.T - 1};
    for (size_t k = 0; k < 3; k++) {
        int keep = bt.labels[where[k]];
        bt.labels[where[k]] = bad[k];
        assert_int_equal(llama_loss_and_grad(be, &f.model, &s, bt.tokens, bt.labels, bt.lengths,
                                             bt.B, bt.T, 1.0, g, &sum, &cnt, err, sizeof err),
                         -1);
        assert_non_null(strstr(err, "label"));
        bt.labels[where[k]] = keep;
    }
    for (size_t i = 0; i < f.model.nparams; i++) assert_true(g[i] == 0.0f);
    /* A state without training buffers is refused. */
    llama_state inf;
    if (llama_state_init(&inf, be, &f.model.cfg, bt.B, bt.T, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_int_equal(llama_loss_and_grad(be, &f.model, &inf, bt.tokens, bt.labels, bt.lengths,
                                         bt.B, bt.T, 1.0, g, &sum, &cnt, err, sizeof err),
                     -1);
    llama_state_free(&inf);
    llama_state_free(&s);
    free(g);
    tu_batch_free(&bt);
    fixture_free(&f);
}

/* PEFT's tensor name of layer l's projection p, A or B. */
static void peft_name(char *out, size_t len, int l, llama_proj p, bool is_b) {
    snprintf(out, len, "base_model.model.model.layers.%d.%s.lora_%s.weight", l,
             llama_proj_module(p), is_b ? "B" : "A");
}

static void test_lora_gqa(void **state) {
    (void)state;
    fixture f;
    fixture_load(&f, "lora_gqa");
    /* Its batch is sft_gqa's ("the batch of ../sft_gqa/expected.json"). */
    assert_true(json_is_string(json_object_get(f.expected, "batch")));
    fixture sft;
    fixture_load(&sft, "sft_gqa");
    tu_batch bt;
    tu_batch_load(&bt, json_object_get(sft.expected, "batch"));
    fixture_free(&sft);
    json_t *cfgj = json_object_get(f.expected, "lora");
    int r = (int)json_integer_value(json_object_get(cfgj, "r"));
    double alpha = json_number_value(json_object_get(cfgj, "alpha"));
    bool target[LLAMA_NPROJ] = {false};
    target[LLAMA_PROJ_Q] = target[LLAMA_PROJ_V] = true;
    const llama_config *cfg = &f.model.cfg;
    size_t n = llama_lora_count(cfg, r, target);
    assert_true(n > 0);
    float *params = calloc(n, sizeof *params), *grads = calloc(n, sizeof *grads);
    assert_true(params && grads);
    llama_lora lo;
    char err[ERR_LEN], path[PATH_MAX + 400], name[160];
    if (llama_lora_bind(&lo, cfg, r, (float)(alpha / r), target, params, err, sizeof err) != 0)
        fail_msg("%s", err);
    snprintf(path, sizeof path, "%s/%s/adapter_model.safetensors", f.dir,
             json_string_value(json_object_get(f.expected, "adapter_dir")));
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
                assert_int_equal(t->count, (size_t)r * (isb ? out : in));
                float *dst = isb ? lo.b[p] + (size_t)l * out * (size_t)r
                                 : lo.a[p] + (size_t)l * (size_t)r * in;
                if (st_to_f32(&sf, t, dst, err, sizeof err) != 0) fail_msg("%s", err);
            }
        }
    st_close(&sf);

    float *before = malloc(f.model.nparams * sizeof *before);
    assert_non_null(before);
    memcpy(before, f.model.params, f.model.nparams * sizeof *before);
    llama_state s;
    const backend *be = backend_cpu();
    if (llama_state_init_train(&s, be, cfg, bt.B, bt.T, err, sizeof err) != 0) fail_msg("%s", err);
    double sum = 0.0;
    long counted = 0;
    if (llama_lora_loss_and_grad(be, &f.model, &lo, &s, bt.tokens, bt.labels, bt.lengths, bt.B,
                                 bt.T, 1.0 / (double)bt.n_counted, grads, &sum, &counted, err,
                                 sizeof err) != 0)
        fail_msg("%s", err);
    assert_int_equal(counted, bt.n_counted);
    double loss = sum / (double)counted;
    double want = json_number_value(json_object_get(f.expected, "loss"));
    printf("lora_gqa: loss %.9g ref %.9g\n", loss, want);
    assert_true(fabs(loss - want) <= REF_REL_TOL * fabs(want));
    assert_memory_equal(before, f.model.params, f.model.nparams * sizeof *before);

    json_t *map = json_object_get(f.expected, "grads");
    size_t checked = 0;
    double worst = 0.0;
    for (int l = 0; l < cfg->num_hidden_layers; l++)
        for (int p = 0; p < LLAMA_NPROJ; p++) {
            if (!target[p]) continue;
            size_t out, in;
            llama_proj_dims(cfg, (llama_proj)p, &out, &in);
            for (int isb = 0; isb < 2; isb++) {
                peft_name(name, sizeof name, l, (llama_proj)p, isb);
                const char *file = json_string_value(json_object_get(map, name));
                if (!file) fail_msg("expected.json has no gradient for %s", name);
                snprintf(path, sizeof path, "%s/%s", f.dir, file);
                double *ref = NULL;
                npy_header h;
                if (npy_read_f64(path, &ref, &h, err, sizeof err) != 0)
                    fail_msg("%s: %s", path, err);
                size_t cnt = (size_t)r * (isb ? out : in);
                assert_int_equal(h.rows * h.cols, cnt);
                const float *pt = isb ? lo.b[p] + (size_t)l * out * (size_t)r
                                      : lo.a[p] + (size_t)l * (size_t)r * in;
                const float *g = grads + (pt - lo.params);
                float *wf = malloc(cnt * sizeof *wf);
                assert_non_null(wf);
                for (size_t i = 0; i < cnt; i++) wf[i] = (float)ref[i];
                double e = tu_rel_err_ff(g, wf, cnt, name);
                if (e > REF_REL_TOL) fail_msg("%s: gradient error %g relative", name, e);
                if (e > worst) worst = e;
                checked++;
                free(wf);
                free(ref);
            }
        }
    assert_int_equal(checked, json_object_size(map));
    printf("lora_gqa: %zu gradients, worst %.2g relative\n", checked, worst);
    llama_state_free(&s);
    free(before);
    free(params);
    free(grads);
    tu_batch_free(&bt);
    fixture_free(&f);
}

int main(void) {
    find_fixtures();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sft_gqa),
        cmocka_unit_test(test_sft_tied),
        cmocka_unit_test(test_pretrain),
        cmocka_unit_test(test_padding_invariance),
        cmocka_unit_test(test_accumulation),
        cmocka_unit_test(test_finite_differences),
        cmocka_unit_test(test_bad_labels),
        cmocka_unit_test(test_lora_gqa),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
