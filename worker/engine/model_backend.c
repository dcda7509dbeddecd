/* model_backend.c - see model_backend.h. */
#include "worker/engine/model_backend.h"

#include "common/util.h"

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

int llama_model_to_backend(const backend *be, const llama_model *host, llama_model *dev,
                           char *err, size_t errlen) {
    memset(dev, 0, sizeof *dev);
    if (!host->params || host->nparams == 0)
        return err_set(err, errlen, "model has no parameters");
    if (host->nparams != llama_param_count(&host->cfg))
        return err_set(err, errlen, "model holds %zu parameters, its config %zu",
                       host->nparams, llama_param_count(&host->cfg));
    size_t off[MODEL_BACKEND_NPTRS];
    if (model_backend_offsets(host, off, err, errlen) != 0) return -1;
    if (be->host_memory) {
        *dev = *host;
        return 0;
    }
    if (host->nparams > SIZE_MAX / sizeof(float))
        return err_set(err, errlen, "model of %zu parameters does not fit in memory",
                       host->nparams);
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

void llama_model_free_backend(const backend *be, llama_model *dev) {
    if (dev->params && !be->host_memory) be->free_buf(dev->params);
    memset(dev, 0, sizeof *dev);
}
