/* lora.c - PEFT LoRA adapters checked against a model and merged into its
 * float32 weights (see lora.h for the format and the rules). */
#include "worker/engine/lora.h"

#include "common/log.h"
#include "common/st.h"
#include "common/util.h"

#include <cblas.h>
#include <jansson.h>
#include <math.h>
#include <regex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LORA_CONFIG_MAX (1u << 20)
#define LORA_R_MAX 65536
#define LORA_NMOD 7
#define LORA_NAME_MAX 256

/* The seven projections an adapter may target, in PEFT's names. */
typedef enum {
    LORA_Q,
    LORA_K,
    LORA_V,
    LORA_O,
    LORA_GATE,
    LORA_UP,
    LORA_DOWN,
} lora_module;

static const char *const lora_mod_name[LORA_NMOD] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
};
static const char *const lora_mod_parent[LORA_NMOD] = {
    "self_attn", "self_attn", "self_attn", "self_attn", "mlp", "mlp", "mlp",
};

#define LORA_SUPPORTED "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"

/* The adapter's settings and, per (layer, module), whether it is targeted
 * and the two tensors found for it. */
typedef struct {
    int r;
    double alpha;
    bool rslora;
    int L;
    bool *want;                /* (L, LORA_NMOD) */
    const st_tensor **tensors; /* (L, LORA_NMOD, 2): lora_A, lora_B */
} lora_plan;

/* The stacked weight of module mod in m, with its per-layer shape. */
static float *lora_weight(llama_model *m, lora_module mod, int layer, int *out, int *in) {
    const llama_config *c = &m->cfg;
    int hs = c->hidden_size / c->num_attention_heads;
    int q = c->num_attention_heads * hs, kv = c->num_key_value_heads * hs;
    float *base = NULL;
    switch (mod) {
    case LORA_Q: *out = q; *in = c->hidden_size; base = m->w.wq; break;
    case LORA_K: *out = kv; *in = c->hidden_size; base = m->w.wk; break;
    case LORA_V: *out = kv; *in = c->hidden_size; base = m->w.wv; break;
    case LORA_O: *out = c->hidden_size; *in = q; base = m->w.wo; break;
    case LORA_GATE: *out = c->intermediate_size; *in = c->hidden_size; base = m->w.w_gate; break;
    case LORA_UP: *out = c->intermediate_size; *in = c->hidden_size; base = m->w.w_up; break;
    case LORA_DOWN: *out = c->hidden_size; *in = c->intermediate_size; base = m->w.w_down; break;
    }
    return base + (size_t)layer * (size_t)*out * (size_t)*in;
}

/* The module named name (a bare name or "parent.name", as PEFT's suffix
 * match allows), or -1. */
static int lora_module_by_name(const char *name) {
    for (int i = 0; i < LORA_NMOD; i++) {
        char dotted[64];
        snprintf(dotted, sizeof dotted, "%s.%s", lora_mod_parent[i], lora_mod_name[i]);
        if (!strcmp(name, lora_mod_name[i]) || !strcmp(name, dotted)) return i;
    }
    return -1;
}

/* 0 when field is absent, null, false, an empty array or an empty object;
 * otherwise -1 with err saying the field is not supported. */
static int lora_require_empty(json_t *root, const char *field, const char *path, char *err,
                              size_t errlen) {
    json_t *v = json_object_get(root, field);
    if (!v || json_is_null(v) || json_is_false(v)) return 0;
    if (json_is_array(v) && json_array_size(v) == 0) return 0;
    if (json_is_object(v) && json_object_size(v) == 0) return 0;
    return err_set(err, errlen, "%s: %s is set; strata does not support it", path, field);
}

/* A boolean field that must be absent, null or false. */
static int lora_require_false(json_t *root, const char *field, const char *path, char *err,
                              size_t errlen) {
    json_t *v = json_object_get(root, field);
    if (!v || json_is_null(v) || json_is_false(v)) return 0;
    if (json_is_true(v))
        return err_set(err, errlen, "%s: %s true is not supported", path, field);
    return err_set(err, errlen, "%s: %s must be a boolean", path, field);
}

/* Marks in layers[0..L) the layers of layers_to_transform (all when it is
 * absent or null). Returns 0, or -1 with err naming the field. */
static int lora_layers(json_t *root, int L, bool *layers, bool *given, const char *path,
                       char *err, size_t errlen) {
    json_t *v = json_object_get(root, "layers_to_transform");
    *given = v && !json_is_null(v);
    for (int i = 0; i < L; i++) layers[i] = !*given;
    if (!*given) return 0;
    json_t *pat = json_object_get(root, "layers_pattern");
    if (json_is_array(pat) && json_array_size(pat) == 1) pat = json_array_get(pat, 0);
    if (pat && !json_is_null(pat) && !(json_is_string(pat) && !strcmp(json_string_value(pat), "layers")))
        return err_set(err, errlen, "%s: layers_pattern must be \"layers\" for a LLaMA model",
                       path);
    size_t n = json_is_array(v) ? json_array_size(v) : 1;
    if (n == 0) return err_set(err, errlen, "%s: layers_to_transform is an empty list", path);
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_is_array(v) ? json_array_get(v, i) : v;
        if (!json_is_integer(e))
            return err_set(err, errlen, "%s: layers_to_transform must be an integer or a list of "
                           "integers", path);
        json_int_t layer = json_integer_value(e);
        if (layer < 0 || layer >= L)
            return err_set(err, errlen, "%s: layers_to_transform: layer %lld is out of range (the "
                           "model has %d layers)", path, (long long)layer, L);
        layers[layer] = true;
    }
    return 0;
}

/* Fills plan->want from target_modules as a regular expression PEFT
 * full-matches against module names. Returns 0 or -1 with err set. */
static int lora_targets_regex(lora_plan *plan, const char *pattern, const char *path, char *err,
                              size_t errlen) {
    size_t plen = strlen(pattern);
    char *anchored = malloc(plen + 5);
    if (!anchored) return err_set(err, errlen, "%s: out of memory", path);
    snprintf(anchored, plen + 5, "^(%s)$", pattern);
    regex_t re;
    int rc = regcomp(&re, anchored, REG_EXTENDED | REG_NOSUB);
    free(anchored);
    if (rc != 0)
        return err_set(err, errlen, "%s: target_modules \"%s\" is not a regular expression strata "
                       "can read (POSIX extended)", path, pattern);
    /* Other linear or embedding modules of a LLaMA model that PEFT could adapt. */
    static const char *const others[] = {"lm_head", "model.embed_tokens"};
    int out = 0;
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        if (regexec(&re, others[i], 0, NULL, 0) == 0) {
            out = err_set(err, errlen, "%s: target_modules \"%s\" matches %s, which strata does not "
                          "support (supported: %s)", path, pattern, others[i], LORA_SUPPORTED);
            goto out;
        }
    }
    for (int l = 0; l < plan->L; l++) {
        for (int k = 0; k < LORA_NMOD; k++) {
            char name[LORA_NAME_MAX];
            snprintf(name, sizeof name, "model.layers.%d.%s.%s", l, lora_mod_parent[k],
                     lora_mod_name[k]);
            plan->want[l * LORA_NMOD + k] = regexec(&re, name, 0, NULL, 0) == 0;
        }
    }
out:
    regfree(&re);
    return out;
}

/* Fills plan->want from target_modules and layers_to_transform. Returns 0,
 * or -1 with err naming the field. */
static int lora_targets(lora_plan *plan, json_t *root, const char *path, char *err,
                        size_t errlen) {
    json_t *tm = json_object_get(root, "target_modules");
    bool *layers = calloc((size_t)plan->L, sizeof *layers);
    int rc = -1;
    if (!layers) return err_set(err, errlen, "%s: out of memory", path);
    bool given = false;
    if (lora_layers(root, plan->L, layers, &given, path, err, errlen) != 0) goto out;
    if (json_is_string(tm) && strcmp(json_string_value(tm), "all-linear") != 0) {
        if (given) {
            err_set(err, errlen, "%s: layers_to_transform with a regular-expression "
                    "target_modules is not supported (PEFT ignores it)", path);
            goto out;
        }
        rc = lora_targets_regex(plan, json_string_value(tm), path, err, errlen);
        goto out;
    }
    bool mods[LORA_NMOD] = {false};
    if (json_is_string(tm)) {
        for (int k = 0; k < LORA_NMOD; k++) mods[k] = true;
    } else if (json_is_array(tm) && json_array_size(tm) > 0) {
        for (size_t i = 0; i < json_array_size(tm); i++) {
            json_t *e = json_array_get(tm, i);
            if (!json_is_string(e)) {
                err_set(err, errlen, "%s: target_modules[%zu] is not a string", path, i);
                goto out;
            }
            int k = lora_module_by_name(json_string_value(e));
            if (k < 0) {
                err_set(err, errlen, "%s: target_modules: \"%s\" is not supported (supported: %s)",
                        path, json_string_value(e), LORA_SUPPORTED);
                goto out;
            }
            mods[k] = true;
        }
    } else {
        err_set(err, errlen, "%s: target_modules must be a non-empty list of module names or a "
                "string", path);
        goto out;
    }
    for (int l = 0; l < plan->L; l++)
        for (int k = 0; k < LORA_NMOD; k++) plan->want[l * LORA_NMOD + k] = layers[l] && mods[k];
    rc = 0;
out:
    free(layers);
    return rc;
}

/* Reads and checks adapter_config.json into plan (want already allocated).
 * Returns 0, or -1 with err naming the file and field. */
static int lora_config_load(lora_plan *plan, const char *path, char *err, size_t errlen) {
    char *text = NULL;
    size_t len = 0;
    json_t *root = NULL;
    int rc = -1;
    if (util_read_file(path, LORA_CONFIG_MAX, &text, &len, err, errlen) != 0) goto out;
    json_error_t jerr;
    root = json_loadb(text, len, 0, &jerr);
    if (!root || !json_is_object(root)) {
        err_set(err, errlen, "%s: not a JSON object (line %d: %s)", path, jerr.line,
                root ? "top level is not an object" : jerr.text);
        goto out;
    }
    json_t *v = json_object_get(root, "peft_type");
    if (v && !json_is_null(v) && !(json_is_string(v) && !strcmp(json_string_value(v), "LORA"))) {
        err_set(err, errlen, "%s: peft_type is %s, not LORA", path,
                json_is_string(v) ? json_string_value(v) : "(not a string)");
        goto out;
    }
    v = json_object_get(root, "r");
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > LORA_R_MAX) {
        err_set(err, errlen, "%s: r must be an integer in [1, %d]", path, LORA_R_MAX);
        goto out;
    }
    plan->r = (int)json_integer_value(v);
    v = json_object_get(root, "lora_alpha");
    if (!json_is_number(v) || !isfinite(json_number_value(v))) {
        err_set(err, errlen, "%s: lora_alpha must be a number", path);
        goto out;
    }
    plan->alpha = json_number_value(v);
    v = json_object_get(root, "use_rslora");
    if (v && !json_is_null(v) && !json_is_boolean(v)) {
        err_set(err, errlen, "%s: use_rslora must be a boolean", path);
        goto out;
    }
    plan->rslora = json_is_true(v);
    v = json_object_get(root, "bias");
    if (v && !json_is_null(v) && !(json_is_string(v) && !strcmp(json_string_value(v), "none"))) {
        err_set(err, errlen, "%s: bias is %s; only \"none\" is supported", path,
                json_is_string(v) ? json_string_value(v) : "(not a string)");
        goto out;
    }
    if (lora_require_false(root, "fan_in_fan_out", path, err, errlen) ||
        lora_require_false(root, "use_dora", path, err, errlen) ||
        lora_require_false(root, "lora_bias", path, err, errlen) ||
        lora_require_empty(root, "modules_to_save", path, err, errlen) ||
        lora_require_empty(root, "rank_pattern", path, err, errlen) ||
        lora_require_empty(root, "alpha_pattern", path, err, errlen) ||
        lora_require_empty(root, "exclude_modules", path, err, errlen) ||
        lora_require_empty(root, "target_parameters", path, err, errlen) ||
        lora_require_empty(root, "trainable_token_indices", path, err, errlen) ||
        lora_require_empty(root, "layer_replication", path, err, errlen))
        goto out;
    if (lora_targets(plan, root, path, err, errlen) != 0) goto out;
    rc = 0;
out:
    json_decref(root);
    free(text);
    return rc;
}

/* Parses a PEFT tensor name into layer, module and which (0 = lora_A,
 * 1 = lora_B). Returns 0, or -1 when name is not of that form. */
static int lora_parse_name(const char *name, int *layer, int *mod, int *which) {
    static const char prefix[] = "base_model.model.model.layers.";
    if (strncmp(name, prefix, sizeof prefix - 1) != 0) return -1;
    const char *p = name + sizeof prefix - 1;
    long n = 0;
    if (*p < '0' || *p > '9' || (*p == '0' && p[1] != '.')) return -1;
    for (; *p >= '0' && *p <= '9'; p++) {
        n = n * 10 + (*p - '0');
        if (n > INT32_MAX) return -1;
    }
    if (*p++ != '.') return -1;
    for (int k = 0; k < LORA_NMOD; k++) {
        char tail[LORA_NAME_MAX];
        for (int w = 0; w < 2; w++) {
            snprintf(tail, sizeof tail, "%s.%s.lora_%c.weight", lora_mod_parent[k],
                     lora_mod_name[k], w ? 'B' : 'A');
            if (!strcmp(p, tail)) {
                *layer = (int)n;
                *mod = k;
                *which = w;
                return 0;
            }
        }
    }
    return -1;
}

/* Checks every tensor of f against plan and m's shapes, and that each
 * targeted pair has both tensors; records them in plan->tensors. Returns 0,
 * or -1 with err naming the file and tensor. */
static int lora_check_tensors(lora_plan *plan, llama_model *m, const st_file *f, const char *path,
                              char *err, size_t errlen) {
    for (size_t i = 0; i < f->ntensors; i++) {
        const st_tensor *t = &f->tensors[i];
        int layer, k, which;
        if (lora_parse_name(t->name, &layer, &k, &which) != 0)
            return err_set(err, errlen, "%s: tensor \"%s\" is not a LoRA weight of a supported "
                           "module (expected base_model.model.model.layers.{i}.{self_attn|mlp}."
                           "{module}.lora_{A|B}.weight; modules: %s)", path, t->name,
                           LORA_SUPPORTED);
        if (layer >= plan->L)
            return err_set(err, errlen, "%s: tensor \"%s\": layer %d is out of range (the model has "
                           "%d layers)", path, t->name, layer, plan->L);
        if (!plan->want[layer * LORA_NMOD + k])
            return err_set(err, errlen, "%s: tensor \"%s\": layer %d %s is not targeted by "
                           "adapter_config.json (target_modules / layers_to_transform)", path,
                           t->name, layer, lora_mod_name[k]);
        if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
            return err_set(err, errlen, "%s: tensor \"%s\" has dtype %s; F32, F16 or BF16 expected",
                           path, t->name, st_dtype_name(t->dtype));
        int out, in;
        (void)lora_weight(m, (lora_module)k, layer, &out, &in);
        size_t want0 = which ? (size_t)out : (size_t)plan->r;
        size_t want1 = which ? (size_t)plan->r : (size_t)in;
        if (t->ndim != 2 || t->shape[0] != want0 || t->shape[1] != want1) {
            char got[64] = "";
            if (t->ndim == 2)
                snprintf(got, sizeof got, "(%zu, %zu)", t->shape[0], t->shape[1]);
            else
                snprintf(got, sizeof got, "%d dimensions", t->ndim);
            return err_set(err, errlen, "%s: tensor \"%s\" has shape %s; (%zu, %zu) expected for "
                           "r %d (%s)", path, t->name, got, want0, want1, plan->r,
                           which ? "lora_B is (out, r)" : "lora_A is (r, in)");
        }
        plan->tensors[(layer * LORA_NMOD + k) * 2 + which] = t;
    }
    for (int l = 0; l < plan->L; l++) {
        for (int k = 0; k < LORA_NMOD; k++) {
            if (!plan->want[l * LORA_NMOD + k]) continue;
            for (int w = 0; w < 2; w++) {
                if (plan->tensors[(l * LORA_NMOD + k) * 2 + w]) continue;
                return err_set(err, errlen, "%s: tensor \"base_model.model.model.layers.%d.%s.%s."
                               "lora_%c.weight\" is missing (adapter_config.json targets it)", path,
                               l, lora_mod_parent[k], lora_mod_name[k], w ? 'B' : 'A');
            }
        }
    }
    return 0;
}

/* Merges every recorded pair: W += scaling * B A. The scratch buffers are
 * allocated before the first weight changes, so a failure leaves m as it
 * was. Returns the number of modules merged, or -1 with err set. */
static int lora_merge(lora_plan *plan, llama_model *m, const st_file *f, float scaling,
                      const char *path, char *err, size_t errlen) {
    size_t max_a = 0, max_b = 0;
    for (int l = 0; l < plan->L; l++) {
        for (int k = 0; k < LORA_NMOD; k++) {
            if (!plan->want[l * LORA_NMOD + k]) continue;
            const st_tensor *a = plan->tensors[(l * LORA_NMOD + k) * 2];
            const st_tensor *b = plan->tensors[(l * LORA_NMOD + k) * 2 + 1];
            if (a->count > max_a) max_a = a->count;
            if (b->count > max_b) max_b = b->count;
        }
    }
    float *abuf = malloc((max_a ? max_a : 1) * sizeof *abuf);
    float *bbuf = malloc((max_b ? max_b : 1) * sizeof *bbuf);
    int merged = -1;
    if (!abuf || !bbuf) {
        err_set(err, errlen, "%s: out of memory for the adapter's tensors", path);
        goto out;
    }
    merged = 0;
    for (int l = 0; l < plan->L; l++) {
        for (int k = 0; k < LORA_NMOD; k++) {
            if (!plan->want[l * LORA_NMOD + k]) continue;
            const st_tensor *a = plan->tensors[(l * LORA_NMOD + k) * 2];
            const st_tensor *b = plan->tensors[(l * LORA_NMOD + k) * 2 + 1];
            /* Cannot fail: the dtypes were checked before anything changed. */
            if (st_to_f32(f, a, abuf, err, errlen) != 0 || st_to_f32(f, b, bbuf, err, errlen) != 0) {
                merged = -1;
                goto out;
            }
            int out_dim, in_dim;
            float *w = lora_weight(m, (lora_module)k, l, &out_dim, &in_dim);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, out_dim, in_dim, plan->r,
                        scaling, bbuf, plan->r, abuf, in_dim, 1.0f, w, in_dim);
            merged++;
        }
    }
out:
    free(abuf);
    free(bbuf);
    return merged;
}

int lora_apply_info(llama_model *m, const char *adapter_dir, lora_info *info, char *err,
                    size_t errlen) {
    lora_plan plan;
    memset(&plan, 0, sizeof plan);
    st_file f;
    memset(&f, 0, sizeof f);
    int rc = -1;
    char cfg_path[4096], st_path[4096];
    if (snprintf(cfg_path, sizeof cfg_path, "%s/adapter_config.json", adapter_dir) >=
            (int)sizeof cfg_path ||
        snprintf(st_path, sizeof st_path, "%s/adapter_model.safetensors", adapter_dir) >=
            (int)sizeof st_path)
        return err_set(err, errlen, "%s: adapter path too long", adapter_dir);
    plan.L = m->cfg.num_hidden_layers;
    if (plan.L < 1 || !m->params) return err_set(err, errlen, "%s: no model loaded", adapter_dir);
    plan.want = calloc((size_t)plan.L * LORA_NMOD, sizeof *plan.want);
    plan.tensors = calloc((size_t)plan.L * LORA_NMOD * 2, sizeof *plan.tensors);
    if (!plan.want || !plan.tensors) {
        err_set(err, errlen, "%s: out of memory", adapter_dir);
        goto out;
    }
    if (lora_config_load(&plan, cfg_path, err, errlen) != 0) goto out;
    int targeted = 0;
    for (int i = 0; i < plan.L * LORA_NMOD; i++) targeted += plan.want[i];
    if (targeted == 0) {
        err_set(err, errlen, "%s: target_modules matches no module of the model", cfg_path);
        goto out;
    }
    if (st_open(st_path, &f, err, errlen) != 0) goto out;
    if (lora_check_tensors(&plan, m, &f, st_path, err, errlen) != 0) goto out;
    float scaling = (float)(plan.rslora ? plan.alpha / sqrt((double)plan.r)
                                        : plan.alpha / (double)plan.r);
    int merged = lora_merge(&plan, m, &f, scaling, st_path, err, errlen);
    if (merged < 0) goto out;
    log_info("lora: merged %s: %d modules, r %d, lora_alpha %g%s, scaling %g", adapter_dir, merged,
             plan.r, plan.alpha, plan.rslora ? " (rslora)" : "", (double)scaling);
    if (info) {
        info->modules = merged;
        info->r = plan.r;
        info->alpha = plan.alpha;
        info->rslora = plan.rslora;
        info->scaling = scaling;
    }
    rc = 0;
out:
    st_close(&f);
    free(plan.want);
    free(plan.tensors);
    return rc;
}

int lora_apply(llama_model *m, const char *adapter_dir, char *err, size_t errlen) {
    return lora_apply_info(m, adapter_dir, NULL, err, errlen);
}
