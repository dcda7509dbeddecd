/* model_backend.c - see model_backend.h. */
#include "worker/engine/model_backend.h"

#include "common/util.h"
#include "worker/engine/cuda/cuda.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

/* The addresses of w's weight pointers, in one list, so they are checked
 * and rebased alike. */
#define MODEL_BACKEND_NPTRS 12
static void model_backend_ptrs(llama_weights *w, float **out[MODEL_BACKEND_NPTRS]) {
    float **list[MODEL_BACKEND_NPTRS] = {&w->embed,    &w->attn_norm, &w->wq,       &w->wk,
                                         &w->wv,       &w->wo,        &w->mlp_norm, &w->w_gate,
                                         &w->w_up,     &w->w_down,    &w->final_norm,
                                         &w->lm_head};
    memcpy(out, list, sizeof list);
}

/* Offsets of each weight pointer of m into m->params, checked to lie inside
 * it. Returns 0, or -1 with err naming the first pointer outside. */
static int model_backend_offsets(const llama_model *m, size_t off[MODEL_BACKEND_NPTRS],
                                 char *err, size_t errlen) {
    llama_weights w = m->w;
    float **ptrs[MODEL_BACKEND_NPTRS];
    model_backend_ptrs(&w, ptrs);
    uintptr_t base = (uintptr_t)m->params;
    for (int i = 0; i < MODEL_BACKEND_NPTRS; i++) {
        uintptr_t p = (uintptr_t)*ptrs[i];
        if (!*ptrs[i] || p < base || (p - base) % sizeof(float) != 0 ||
            (p - base) / sizeof(float) >= m->nparams)
            return err_set(err, errlen, "weight %d of the model lies outside its parameters", i);
        off[i] = (p - base) / sizeof(float);
    }
    return 0;
}

/* The checks every placement makes: parameters present, as many as the
 * config says, every pointer inside them (off filled with the offsets).
 * Returns 0, or -1 with err set. */
static int model_backend_check(const llama_model *host, size_t off[MODEL_BACKEND_NPTRS],
                               char *err, size_t errlen) {
    if (!host->params || host->nparams == 0)
        return err_set(err, errlen, "model has no parameters");
    if (host->nparams != llama_param_count(&host->cfg))
        return err_set(err, errlen, "model holds %zu parameters, its config %zu",
                       host->nparams, llama_param_count(&host->cfg));
    if (model_backend_offsets(host, off, err, errlen) != 0) return -1;
    if (host->nparams > SIZE_MAX / sizeof(float))
        return err_set(err, errlen, "model of %zu parameters does not fit in memory",
                       host->nparams);
    return 0;
}

int llama_model_to_backend(const backend *be, const llama_model *host, llama_model *dev,
                           char *err, size_t errlen) {
    memset(dev, 0, sizeof *dev);
    size_t off[MODEL_BACKEND_NPTRS];
    if (model_backend_check(host, off, err, errlen) != 0) return -1;
    if (be->host_memory) {
        *dev = *host;
        return 0;
    }
    size_t bytes = host->nparams * sizeof(float);
    float *params = be->alloc(bytes, err, errlen);
    if (!params) return err_prefix(err, errlen, "model weights (%zu bytes)", bytes);
    be->upload(params, host->params, bytes);
    dev->cfg = host->cfg;
    dev->params = params;
    dev->nparams = host->nparams;
    float **dst[MODEL_BACKEND_NPTRS];
    model_backend_ptrs(&dev->w, dst);
    /* Same offsets, so a head tied to the embedding stays the same pointer. */
    for (int i = 0; i < MODEL_BACKEND_NPTRS; i++) *dst[i] = params + off[i];
    return 0;
}

/* Floats of each tensor, in model_backend_ptrs' order (the lm_head entry
 * counts V*C even when tied). */
static void model_backend_sizes(const llama_config *c, size_t n[MODEL_BACKEND_NPTRS]) {
    size_t C = (size_t)c->hidden_size, FF = (size_t)c->intermediate_size;
    size_t L = (size_t)c->num_hidden_layers, V = (size_t)c->vocab_size;
    size_t HS = C / (size_t)c->num_attention_heads;
    size_t QD = (size_t)c->num_attention_heads * HS, KVD = (size_t)c->num_key_value_heads * HS;
    size_t list[MODEL_BACKEND_NPTRS] = {V * C,      L * C,      L * QD * C, L * KVD * C,
                                        L * KVD * C, L * C * QD, L * C,      L * FF * C,
                                        L * FF * C, L * C * FF, C,          V * C};
    memcpy(n, list, sizeof list);
}

/* model_backend_ptrs' indices of the tensors that stay fp32 in a frozen
 * placement (embed, attn_norm, mlp_norm, final_norm, in params' order) and
 * of those that become frozen keys (the projections, then lm_head). */
static const int model_backend_fp32[] = {0, 1, 6, 10};
static const int model_backend_keys[] = {2, 3, 4, 5, 7, 8, 9, 11};
#define MODEL_BACKEND_NFP32 (sizeof model_backend_fp32 / sizeof model_backend_fp32[0])
#define MODEL_BACKEND_NKEYS (sizeof model_backend_keys / sizeof model_backend_keys[0])

/* Whether dev's projections lie outside its params: a frozen placement
 * (or a partial one being undone). */
static bool model_backend_is_frozen(const llama_model *dev) {
    uintptr_t p = (uintptr_t)dev->w.wq, base = (uintptr_t)dev->params;
    return p < base || (p - base) / sizeof(float) >= dev->nparams;
}

int llama_model_to_backend_frozen(const backend *be, const llama_model *host, llama_model *dev,
                                  char *err, size_t errlen) {
    if (be->host_memory || !cuda_backend_low_precision())
        return llama_model_to_backend(be, host, dev, err, errlen);
    memset(dev, 0, sizeof *dev);
    size_t off[MODEL_BACKEND_NPTRS], n[MODEL_BACKEND_NPTRS];
    if (model_backend_check(host, off, err, errlen) != 0) return -1;
    model_backend_sizes(&host->cfg, n);
    bool tied = host->w.lm_head == host->w.embed;
    size_t small = 0;
    for (size_t i = 0; i < MODEL_BACKEND_NFP32; i++) small += n[model_backend_fp32[i]];
    float *params = be->alloc(small * sizeof(float), err, errlen);
    if (!params)
        return err_prefix(err, errlen, "model embedding and norms (%zu bytes)",
                          small * sizeof(float));
    dev->cfg = host->cfg;
    dev->params = params;
    dev->nparams = small;
    llama_weights hw = host->w;
    float **src[MODEL_BACKEND_NPTRS], **dst[MODEL_BACKEND_NPTRS];
    model_backend_ptrs(&hw, src);
    model_backend_ptrs(&dev->w, dst);
    size_t at = 0;
    for (size_t i = 0; i < MODEL_BACKEND_NFP32; i++) {
        int t = model_backend_fp32[i];
        *dst[t] = params + at;
        be->upload(*dst[t], *src[t], n[t] * sizeof(float));
        at += n[t];
    }
    for (size_t i = 0; i < MODEL_BACKEND_NKEYS; i++) {
        int t = model_backend_keys[i];
        if (t == 11 && tied) break;
        const float *key = NULL;
        if (cuda_backend_upload_frozen(*src[t], n[t], &key, err, errlen) != 0) {
            err_prefix(err, errlen, "frozen weight %d (%zu weights)", t, n[t]);
            goto fail;
        }
        /* A key stands for the tensor; only matmul reads through it. */
        *dst[t] = (float *)key;
    }
    if (tied) {
        dev->w.lm_head = dev->w.embed;
        if (cuda_backend_register_weights(dev->w.embed, n[0], err, errlen) != 0) {
            err_prefix(err, errlen, "low-precision copy of the tied head");
            goto fail;
        }
    }
    /* The fp32 uploads report their failures here. */
    if (cuda_backend_sync(err, errlen) != 0) goto fail;
    return 0;
fail:
    llama_model_free_backend(be, dev);
    return -1;
}

void llama_model_free_backend(const backend *be, llama_model *dev) {
    if (dev->params && !be->host_memory) {
        if (model_backend_is_frozen(dev)) {
            float **p[MODEL_BACKEND_NPTRS];
            model_backend_ptrs(&dev->w, p);
            /* A tied head (the fp32 table) or a key not made yet is ignored. */
            for (size_t i = 0; i < MODEL_BACKEND_NKEYS; i++)
                cuda_backend_free_frozen(*p[model_backend_keys[i]]);
        }
        be->free_buf(dev->params);
    }
    memset(dev, 0, sizeof *dev);
}
