/* model.c - see model.h: config.json, the one parameter allocation, and the
 * Hugging Face safetensors loader. (llama2.c checkpoints: llama2c.c.) */
#include "worker/engine/model.h"

#include "common/st.h"
#include "common/util.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Largest config.json / index file read (real ones are a few KB / MB). */
#define LLAMA_CONFIG_MAX (1u << 20)
#define LLAMA_INDEX_MAX (64u << 20)

/* One stacked weight: per layer (or once) a rows x cols matrix, or a vector
 * of rows when cols is 0. name is the full name for a global tensor and the
 * part after "model.layers.{i}." for a per-layer one. */
typedef struct {
    const char *name;
    bool per_layer;
    size_t rows, cols;
    float *base;
} llama_slot;

enum { LLAMA_MAX_SLOTS = 12 };

/* The per-layer names, in model.h's order. */
static const char *const llama_layer_names[] = {
    "input_layernorm.weight",  "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",    "mlp.up_proj.weight",      "mlp.down_proj.weight",
};

/* Fills slots with every tensor m's config expects, pointing into m->params.
 * Returns their number (12 untied, 11 tied). */
static size_t llama_slots(const llama_model *m, llama_slot slots[LLAMA_MAX_SLOTS]) {
    const llama_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, FF = (size_t)c->intermediate_size;
    size_t HS = C / (size_t)c->num_attention_heads;
    size_t Q = (size_t)c->num_attention_heads * HS, KV = (size_t)c->num_key_value_heads * HS;
    size_t V = (size_t)c->vocab_size;
    const llama_weights *w = &m->w;
    size_t n = 0;
    slots[n++] = (llama_slot){"model.embed_tokens.weight", false, V, C, w->embed};
    slots[n++] = (llama_slot){llama_layer_names[0], true, C, 0, w->attn_norm};
    slots[n++] = (llama_slot){llama_layer_names[1], true, Q, C, w->wq};
    slots[n++] = (llama_slot){llama_layer_names[2], true, KV, C, w->wk};
    slots[n++] = (llama_slot){llama_layer_names[3], true, KV, C, w->wv};
    slots[n++] = (llama_slot){llama_layer_names[4], true, C, Q, w->wo};
    slots[n++] = (llama_slot){llama_layer_names[5], true, C, 0, w->mlp_norm};
    slots[n++] = (llama_slot){llama_layer_names[6], true, FF, C, w->w_gate};
    slots[n++] = (llama_slot){llama_layer_names[7], true, FF, C, w->w_up};
    slots[n++] = (llama_slot){llama_layer_names[8], true, C, FF, w->w_down};
    slots[n++] = (llama_slot){"model.norm.weight", false, C, 0, w->final_norm};
    if (!c->tie_word_embeddings)
        slots[n++] = (llama_slot){"lm_head.weight", false, V, C, w->lm_head};
    return n;
}

/* acc += a * b * k, overflow-checked. Returns 0 or -1. */
static int llama_add_product(size_t *acc, size_t a, size_t b, size_t k) {
    size_t p;
    if (__builtin_mul_overflow(a, b, &p) || __builtin_mul_overflow(p, k, &p) ||
        __builtin_add_overflow(*acc, p, acc))
        return -1;
    return 0;
}

/* The float count of a config's parameters. Returns 0 or -1 on overflow. */
static int llama_count_checked(const llama_config *c, size_t *out) {
    if (c->hidden_size <= 0 || c->num_attention_heads <= 0 || c->num_key_value_heads <= 0 ||
        c->intermediate_size <= 0 || c->num_hidden_layers <= 0 || c->vocab_size <= 0)
        return -1;
    size_t C = (size_t)c->hidden_size, FF = (size_t)c->intermediate_size;
    size_t L = (size_t)c->num_hidden_layers, V = (size_t)c->vocab_size;
    size_t HS = C / (size_t)c->num_attention_heads;
    size_t Q = (size_t)c->num_attention_heads * HS, KV = (size_t)c->num_key_value_heads * HS;
    size_t n = 0;
    if (llama_add_product(&n, V, C, 1) != 0) return -1;               /* embed */
    if (llama_add_product(&n, L, C, 2) != 0) return -1;               /* norms */
    if (llama_add_product(&n, L, Q * C, 2) != 0) return -1;           /* wq, wo */
    if (llama_add_product(&n, L, KV * C, 2) != 0) return -1;          /* wk, wv */
    if (llama_add_product(&n, L, FF * C, 3) != 0) return -1;          /* gate, up, down */
    if (llama_add_product(&n, C, 1, 1) != 0) return -1;               /* final norm */
    if (!c->tie_word_embeddings && llama_add_product(&n, V, C, 1) != 0) return -1;
    if (n > SIZE_MAX / sizeof(float)) return -1;
    *out = n;
    return 0;
}

size_t llama_param_count(const llama_config *cfg) {
    size_t n = 0;
    return llama_count_checked(cfg, &n) == 0 ? n : 0;
}

/* Range checks every field; err names the first bad one. Returns 0 or -1. */
static int llama_config_check(const llama_config *c, char *err, size_t errlen) {
    struct {
        const char *name;
        int value, min, max;
    } ints[] = {
        {"hidden_size", c->hidden_size, 1, 1 << 16},
        {"intermediate_size", c->intermediate_size, 1, 1 << 20},
        {"num_hidden_layers", c->num_hidden_layers, 1, 1024},
        {"num_attention_heads", c->num_attention_heads, 1, 1 << 12},
        {"num_key_value_heads", c->num_key_value_heads, 1, 1 << 12},
        {"vocab_size", c->vocab_size, 1, 1 << 24},
        {"max_position_embeddings", c->max_position_embeddings, 1, 1 << 24},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (ints[i].value < ints[i].min || ints[i].value > ints[i].max)
            return err_set(err, errlen, "%s = %d is out of range [%d, %d]", ints[i].name,
                           ints[i].value, ints[i].min, ints[i].max);
    if (c->hidden_size % c->num_attention_heads != 0)
        return err_set(err, errlen,
                       "hidden_size = %d is not divisible by num_attention_heads = %d",
                       c->hidden_size, c->num_attention_heads);
    if ((c->hidden_size / c->num_attention_heads) % 2 != 0)
        return err_set(err, errlen,
                       "head size hidden_size / num_attention_heads = %d is odd (RoPE rotates "
                       "pairs)",
                       c->hidden_size / c->num_attention_heads);
    if (c->num_attention_heads % c->num_key_value_heads != 0)
        return err_set(err, errlen,
                       "num_attention_heads = %d is not divisible by num_key_value_heads = %d",
                       c->num_attention_heads, c->num_key_value_heads);
    if (!isfinite(c->rms_norm_eps) || c->rms_norm_eps <= 0 || c->rms_norm_eps >= 1)
        return err_set(err, errlen, "rms_norm_eps = %g is out of range (0, 1)",
                       (double)c->rms_norm_eps);
    if (!isfinite(c->rope_theta) || c->rope_theta <= 0)
        return err_set(err, errlen, "rope_theta = %g must be positive and finite",
                       (double)c->rope_theta);
    struct {
        const char *name;
        int value;
    } ids[] = {{"bos_token_id", c->bos_token_id},
               {"eos_token_id", c->eos_token_id},
               {"pad_token_id", c->pad_token_id}};
    for (size_t i = 0; i < 3; i++)
        if (ids[i].value < -1 || ids[i].value >= c->vocab_size)
            return err_set(err, errlen, "%s = %d is outside the vocabulary (vocab_size = %d)",
                           ids[i].name, ids[i].value, c->vocab_size);
    size_t n;
    if (llama_count_checked(c, &n) != 0)
        return err_set(err, errlen, "the parameter count overflows memory sizes");
    return 0;
}

/* Reads an integer field into *out: dflt when absent or null. Returns 0, or
 * -1 when it is not an integer or does not fit an int. */
static int llama_json_int(json_t *root, const char *field, int dflt, int *out, const char *path,
                          char *err, size_t errlen) {
    json_t *v = json_object_get(root, field);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < INT_MIN || json_integer_value(v) > INT_MAX)
        return err_set(err, errlen, "%s: %s must be an integer", path, field);
    *out = (int)json_integer_value(v);
    return 0;
}

static int llama_json_float(json_t *root, const char *field, float dflt, float *out,
                            const char *path, char *err, size_t errlen) {
    json_t *v = json_object_get(root, field);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_number(v)) return err_set(err, errlen, "%s: %s must be a number", path, field);
    *out = (float)json_number_value(v);
    return 0;
}

/* A token id field: an integer, null/absent (-1), or a list whose first
 * element is used (configs of later LLaMAs list several EOS ids). Negative
 * ids mean none. */
static int llama_json_token(json_t *root, const char *field, int *out, const char *path,
                            char *err, size_t errlen) {
    json_t *v = json_object_get(root, field);
    if (json_is_array(v)) v = json_array_size(v) ? json_array_get(v, 0) : NULL;
    if (!v || json_is_null(v)) {
        *out = -1;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) > INT_MAX)
        return err_set(err, errlen, "%s: %s must be an integer", path, field);
    json_int_t id = json_integer_value(v);
    *out = id < 0 ? -1 : (int)id;
    return 0;
}

/* Rejects what LlamaConfig allows but strata's forward pass does not compute,
 * so such a model fails at load instead of producing wrong activations. */
static int llama_config_unsupported(json_t *root, const llama_config *c, const char *path,
                                    char *err, size_t errlen) {
    json_t *v = json_object_get(root, "model_type");
    if (v && !json_is_null(v) && (!json_is_string(v) || strcmp(json_string_value(v), "llama")))
        return err_set(err, errlen, "%s: model_type %s is not supported (only \"llama\")", path,
                       json_is_string(v) ? json_string_value(v) : "(not a string)");
    v = json_object_get(root, "rope_scaling");
    if (v && !json_is_null(v))
        return err_set(err, errlen, "%s: rope_scaling is not supported (must be null or absent)",
                       path);
    v = json_object_get(root, "hidden_act");
    if (v && !json_is_null(v) && (!json_is_string(v) || strcmp(json_string_value(v), "silu")))
        return err_set(err, errlen, "%s: hidden_act must be \"silu\"", path);
    static const char *const biases[] = {"attention_bias", "mlp_bias"};
    for (size_t i = 0; i < 2; i++) {
        v = json_object_get(root, biases[i]);
        if (v && !json_is_null(v) && !json_is_false(v))
            return err_set(err, errlen, "%s: %s is not supported (must be false)", path,
                           biases[i]);
    }
    v = json_object_get(root, "head_dim");
    if (v && !json_is_null(v) && c->num_attention_heads > 0 &&
        (!json_is_integer(v) ||
         json_integer_value(v) != c->hidden_size / c->num_attention_heads))
        return err_set(err, errlen,
                       "%s: head_dim must equal hidden_size / num_attention_heads (%d)", path,
                       c->hidden_size / c->num_attention_heads);
    return 0;
}

int llama_config_load(const char *path, llama_config *cfg, char *err, size_t errlen) {
    char *text = NULL;
    size_t len = 0;
    json_t *root = NULL;
    int rc = -1;
    llama_config c;
    memset(&c, 0, sizeof c);
    if (util_read_file(path, LLAMA_CONFIG_MAX, &text, &len, err, errlen) != 0) goto out;
    json_error_t jerr;
    root = json_loadb(text, len, 0, &jerr);
    if (!root || !json_is_object(root)) {
        err_set(err, errlen, "%s: not a JSON object%s%s", path, root ? "" : ": ",
                root ? "" : jerr.text);
        goto out;
    }
    /* Defaults are LlamaConfig's. */
    if (llama_json_int(root, "hidden_size", 4096, &c.hidden_size, path, err, errlen) ||
        llama_json_int(root, "intermediate_size", 11008, &c.intermediate_size, path, err,
                       errlen) ||
        llama_json_int(root, "num_hidden_layers", 32, &c.num_hidden_layers, path, err, errlen) ||
        llama_json_int(root, "num_attention_heads", 32, &c.num_attention_heads, path, err,
                       errlen) ||
        llama_json_int(root, "vocab_size", 32000, &c.vocab_size, path, err, errlen) ||
        llama_json_int(root, "max_position_embeddings", 2048, &c.max_position_embeddings, path,
                       err, errlen) ||
        llama_json_int(root, "num_key_value_heads", c.num_attention_heads,
                       &c.num_key_value_heads, path, err, errlen) ||
        llama_json_float(root, "rms_norm_eps", 1e-6f, &c.rms_norm_eps, path, err, errlen) ||
        llama_json_float(root, "rope_theta", 10000.0f, &c.rope_theta, path, err, errlen) ||
        llama_json_token(root, "bos_token_id", &c.bos_token_id, path, err, errlen) ||
        llama_json_token(root, "eos_token_id", &c.eos_token_id, path, err, errlen) ||
        llama_json_token(root, "pad_token_id", &c.pad_token_id, path, err, errlen))
        goto out;
    json_t *tie = json_object_get(root, "tie_word_embeddings");
    if (tie && !json_is_null(tie) && !json_is_boolean(tie)) {
        err_set(err, errlen, "%s: tie_word_embeddings must be true or false", path);
        goto out;
    }
    c.tie_word_embeddings = json_is_true(tie);
    if (llama_config_unsupported(root, &c, path, err, errlen) != 0) goto out;
    char why[ERR_LEN];
    if (llama_config_check(&c, why, sizeof why) != 0) {
        err_set(err, errlen, "%s: %s", path, why);
        goto out;
    }
    *cfg = c;
    rc = 0;
out:
    json_decref(root);
    free(text);
    return rc;
}

int llama_alloc(llama_model *m, const llama_config *cfg, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    if (llama_config_check(cfg, err, errlen) != 0) return -1;
    size_t n = llama_param_count(cfg);
    void *p = NULL;
    /* 64-byte alignment: a cache line, and what wide SIMD loads prefer. */
    if (posix_memalign(&p, 64, n * sizeof(float)) != 0)
        return err_set(err, errlen, "out of memory for %zu parameters (%zu MiB)", n,
                       n * sizeof(float) >> 20);
    m->cfg = *cfg;
    m->params = p;
    m->nparams = n;
    size_t C = (size_t)cfg->hidden_size, FF = (size_t)cfg->intermediate_size;
    size_t L = (size_t)cfg->num_hidden_layers, V = (size_t)cfg->vocab_size;
    size_t HS = C / (size_t)cfg->num_attention_heads;
    size_t Q = (size_t)cfg->num_attention_heads * HS, KV = (size_t)cfg->num_key_value_heads * HS;
    float *q = m->params;
    llama_weights *w = &m->w;
    w->embed = q;      q += V * C;
    w->attn_norm = q;  q += L * C;
    w->wq = q;         q += L * Q * C;
    w->wk = q;         q += L * KV * C;
    w->wv = q;         q += L * KV * C;
    w->wo = q;         q += L * C * Q;
    w->mlp_norm = q;   q += L * C;
    w->w_gate = q;     q += L * FF * C;
    w->w_up = q;       q += L * FF * C;
    w->w_down = q;     q += L * C * FF;
    w->final_norm = q; q += C;
    if (cfg->tie_word_embeddings) {
        w->lm_head = w->embed;
    } else {
        w->lm_head = q;
        q += V * C;
    }
    return 0;
}

void llama_free(llama_model *m) {
    if (!m) return;
    free(m->params);
    memset(m, 0, sizeof *m);
}

/* --- Hugging Face loader ------------------------------------------------ */

typedef struct {
    llama_model *m;
    llama_slot slots[LLAMA_MAX_SLOTS];
    size_t nslots;
    bool *seen; /* nslots x L */
} llama_hf_load;

/* Maps a tensor name to (slot, layer). Returns 1 when found, 0 for a rotary
 * inv_freq buffer (older exports save it; it is recomputed from rope_theta),
 * -1 for a name the model does not have. */
static int llama_hf_lookup(const llama_hf_load *ld, const char *name, size_t *slot,
                           size_t *layer) {
    static const char prefix[] = "model.layers.";
    *layer = 0;
    if (strncmp(name, prefix, sizeof prefix - 1) == 0) {
        const char *p = name + sizeof prefix - 1;
        size_t i = 0, digits = 0;
        /* No sign, no leading zero, at most 6 digits: one spelling per layer. */
        while (p[digits] >= '0' && p[digits] <= '9' && digits < 7) {
            i = i * 10 + (size_t)(p[digits] - '0');
            digits++;
        }
        if (digits == 0 || digits > 6 || (digits > 1 && p[0] == '0') || p[digits] != '.')
            return -1;
        const char *rest = p + digits + 1;
        if (strcmp(rest, "self_attn.rotary_emb.inv_freq") == 0) return 0;
        if (i >= (size_t)ld->m->cfg.num_hidden_layers) return -1;
        for (size_t s = 0; s < ld->nslots; s++)
            if (ld->slots[s].per_layer && strcmp(ld->slots[s].name, rest) == 0) {
                *slot = s;
                *layer = i;
                return 1;
            }
        return -1;
    }
    for (size_t s = 0; s < ld->nslots; s++)
        if (!ld->slots[s].per_layer && strcmp(ld->slots[s].name, name) == 0) {
            *slot = s;
            return 1;
        }
    return -1;
}

static void llama_format_shape(char *out, size_t outlen, const size_t *dims, int ndim) {
    size_t used = 0;
    out[0] = '\0';
    for (int i = 0; i < ndim && used < outlen; i++) {
        int n = snprintf(out + used, outlen - used, "%s%zu", i ? ", " : "", dims[i]);
        if (n < 0) return;
        used += (size_t)n;
    }
}

/* Checks one tensor of f against the model and converts it into place, then
 * lets its pages go. Returns 0 or -1 with err naming the file and tensor. */
static int llama_hf_take(llama_hf_load *ld, const st_file *f, const st_tensor *t, char *err,
                         size_t errlen) {
    size_t s, layer;
    int found = llama_hf_lookup(ld, t->name, &s, &layer);
    if (found == 0) {
        st_release(f, t);
        return 0;
    }
    if (found < 0) {
        if (strcmp(t->name, "lm_head.weight") == 0)
            return err_set(err, errlen,
                           "%s: tensor lm_head.weight present but config.json has "
                           "tie_word_embeddings true",
                           f->label);
        return err_set(err, errlen, "%s: unexpected tensor %s for this config", f->label,
                       t->name);
    }
    const llama_slot *sl = &ld->slots[s];
    size_t L = (size_t)ld->m->cfg.num_hidden_layers;
    bool *seen = &ld->seen[s * L + layer];
    if (*seen) return err_set(err, errlen, "%s: tensor %s appears twice", f->label, t->name);
    if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
        return err_set(err, errlen, "%s: tensor %s has dtype %s (expected F32, F16 or BF16)",
                       f->label, t->name, st_dtype_name(t->dtype));
    size_t want[2] = {sl->rows, sl->cols};
    int want_ndim = sl->cols ? 2 : 1;
    if (t->ndim != want_ndim || t->shape[0] != want[0] || (want_ndim == 2 && t->shape[1] != want[1])) {
        char got_s[128], want_s[64];
        llama_format_shape(got_s, sizeof got_s, t->shape, t->ndim);
        llama_format_shape(want_s, sizeof want_s, want, want_ndim);
        return err_set(err, errlen, "%s: tensor %s has shape [%s], config.json expects [%s]",
                       f->label, t->name, got_s, want_s);
    }
    size_t per = sl->rows * (sl->cols ? sl->cols : 1);
    if (st_to_f32(f, t, sl->base + layer * per, err, errlen) != 0) return -1;
    st_release(f, t);
    *seen = true;
    return 0;
}

/* Takes every tensor of one file. */
static int llama_hf_take_file(llama_hf_load *ld, const st_file *f, char *err, size_t errlen) {
    for (size_t i = 0; i < f->ntensors; i++)
        if (llama_hf_take(ld, f, &f->tensors[i], err, errlen) != 0) return -1;
    return 0;
}

static int llama_path(char *out, size_t outlen, const char *dir, const char *name, char *err,
                      size_t errlen) {
    int n = snprintf(out, outlen, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= outlen) return err_set(err, errlen, "path too long: %s", dir);
    return 0;
}

/* Loads a sharded checkpoint: the index's weight_map names every tensor's
 * shard; each shard is opened once, and must hold exactly the tensors the
 * index gives it. */
static int llama_hf_load_sharded(llama_hf_load *ld, const char *dir, const char *index_path,
                                 char *err, size_t errlen) {
    char *text = NULL;
    size_t len = 0;
    json_t *root = NULL, *done = NULL;
    st_file f;
    memset(&f, 0, sizeof f);
    int rc = -1;
    if (util_read_file(index_path, LLAMA_INDEX_MAX, &text, &len, err, errlen) != 0) goto out;
    json_error_t jerr;
    root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    json_t *map = root ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(map)) {
        err_set(err, errlen, "%s: no weight_map object%s%s", index_path, root ? "" : ": ",
                root ? "" : jerr.text);
        goto out;
    }
    done = json_object(); /* shard names already loaded */
    if (!done) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    const char *name;
    json_t *shard;
    json_object_foreach(map, name, shard) {
        if (!json_is_string(shard) || !util_valid_name(json_string_value(shard))) {
            err_set(err, errlen, "%s: tensor %s: shard is not a plain file name", index_path,
                    name);
            goto out;
        }
        const char *shard_name = json_string_value(shard);
        if (json_object_get(done, shard_name)) continue;
        char path[PATH_MAX];
        if (llama_path(path, sizeof path, dir, shard_name, err, errlen) != 0) goto out;
        if (st_open(path, &f, err, errlen) != 0) goto out;
        size_t listed = 0;
        const char *other;
        json_t *other_shard;
        json_object_foreach(map, other, other_shard) {
            if (json_is_string(other_shard) &&
                strcmp(json_string_value(other_shard), shard_name) == 0)
                listed++;
        }
        for (size_t i = 0; i < f.ntensors; i++) {
            json_t *where = json_object_get(map, f.tensors[i].name);
            if (!where || !json_is_string(where) ||
                strcmp(json_string_value(where), shard_name) != 0) {
                err_set(err, errlen, "%s: tensor %s is in this shard but %s does not place it "
                        "here", path, f.tensors[i].name, index_path);
                goto out;
            }
        }
        /* Every tensor here is listed for this shard and names are unique, so
         * equal counts mean the index lists nothing the shard lacks. */
        if (listed != f.ntensors) {
            const char *absent = "?";
            json_object_foreach(map, other, other_shard) {
                if (json_is_string(other_shard) &&
                    strcmp(json_string_value(other_shard), shard_name) == 0 &&
                    !st_find(&f, other)) {
                    absent = other;
                    break;
                }
            }
            err_set(err, errlen, "%s: %s lists tensor %s for this shard, which does not hold it",
                    path, index_path, absent);
            goto out;
        }
        if (llama_hf_take_file(ld, &f, err, errlen) != 0) goto out;
        st_close(&f);
        if (json_object_set_new(done, shard_name, json_true()) != 0) {
            err_set(err, errlen, "out of memory");
            goto out;
        }
    }
    rc = 0;
out:
    st_close(&f);
    json_decref(done);
    json_decref(root);
    free(text);
    return rc;
}

int llama_load_hf(const char *dir, llama_model *m, char *err, size_t errlen) {
    llama_hf_load ld;
    memset(&ld, 0, sizeof ld);
    memset(m, 0, sizeof *m);
    st_file f;
    memset(&f, 0, sizeof f);
    llama_config cfg;
    char path[PATH_MAX];
    int rc = -1;
    if (llama_path(path, sizeof path, dir, "config.json", err, errlen) != 0) goto out;
    if (llama_config_load(path, &cfg, err, errlen) != 0) goto out;
    if (llama_alloc(m, &cfg, err, errlen) != 0) goto out;
    ld.m = m;
    ld.nslots = llama_slots(m, ld.slots);
    size_t L = (size_t)cfg.num_hidden_layers;
    ld.seen = calloc(ld.nslots * L, sizeof *ld.seen);
    if (!ld.seen) {
        err_set(err, errlen, "out of memory");
        goto out;
    }

    if (llama_path(path, sizeof path, dir, "model.safetensors", err, errlen) != 0) goto out;
    if (access(path, F_OK) == 0) {
        if (st_open(path, &f, err, errlen) != 0) goto out;
        if (llama_hf_take_file(&ld, &f, err, errlen) != 0) goto out;
    } else {
        if (llama_path(path, sizeof path, dir, "model.safetensors.index.json", err, errlen) != 0)
            goto out;
        if (access(path, F_OK) != 0) {
            err_set(err, errlen, "%s: neither model.safetensors nor "
                    "model.safetensors.index.json", dir);
            goto out;
        }
        if (llama_hf_load_sharded(&ld, dir, path, err, errlen) != 0) goto out;
    }

    for (size_t s = 0; s < ld.nslots; s++)
        for (size_t i = 0; i < (ld.slots[s].per_layer ? L : 1); i++)
            if (!ld.seen[s * L + i]) {
                if (ld.slots[s].per_layer)
                    err_set(err, errlen, "%s: missing tensor model.layers.%zu.%s", dir, i,
                            ld.slots[s].name);
                else
                    err_set(err, errlen, "%s: missing tensor %s%s", dir, ld.slots[s].name,
                            strcmp(ld.slots[s].name, "lm_head.weight") == 0
                                ? " (config.json has tie_word_embeddings false)"
                                : "");
                goto out;
            }
    rc = 0;
out:
    st_close(&f);
    free(ld.seen);
    if (rc != 0) llama_free(m);
    return rc;
}
