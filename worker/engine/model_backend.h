/* model_backend.h - a model's weights placed in a backend's memory, so that
 * llama_forward and llama_loss_and_grad can run on a backend whose buffers
 * are not host memory (the CUDA backend).
 *
 * The copy keeps model.h's layout: one allocation of nparams floats with
 * every weight pointer at the same offset as in the host model (a tied head
 * stays tied), so a gradient buffer laid out like params indexes it as it
 * indexes the host model. */
#ifndef STRATA_MODEL_BACKEND_H
#define STRATA_MODEL_BACKEND_H

#include "worker/engine/backend.h"
#include "worker/engine/model.h"

#include <stddef.h>

/* Fills *dev with host's config and weights in be's memory: one be->alloc
 * of host->nparams floats, one upload, every pointer rebased. For a
 * host-memory backend (the CPU one) nothing is copied: *dev shares host's
 * params, so host must outlive dev there. Returns 0, or -1 with err set
 * (a model whose pointers lie outside its params, out of backend memory);
 * *dev is then zeroed. Release with llama_model_free_backend(be, dev), never
 * llama_free. */
int llama_model_to_backend(const backend *be, const llama_model *host, llama_model *dev,
                           char *err, size_t errlen);

/* Releases what llama_model_to_backend made (the backend buffer, unless it
 * was shared with the host model) and zeroes *dev. Safe on a zeroed model. */
void llama_model_free_backend(const backend *be, llama_model *dev);

#endif
