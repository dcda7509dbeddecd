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

/* llama_model_to_backend for a model that will not be trained (predict;
 * the base model under LoRA), placed to take the least device memory:
 *   - a host-memory backend (CPU): *dev shares host's params, as above;
 *   - the CUDA backend in fp32: exactly llama_model_to_backend;
 *   - the CUDA backend in bf16/fp16 (this thread's context): the seven
 *     projections (wq wk wv wo w_gate w_up w_down) and an untied lm_head
 *     exist on the device only in that precision (cuda.h's frozen weights:
 *     their pointers in *dev are keys that only matmul may be given), while
 *     the embedding table and the norm weights, which the embedding and
 *     rmsnorm ops read, stay fp32. A tied lm_head stays the fp32 table,
 *     which also gets a registered low-precision copy for the head's
 *     product (V*C*2 bytes, a few percent of a 7B model; converting it at
 *     every forward would need as much scratch).
 * In the last case dev->params holds only the fp32 tensors, packed as
 * embed, attn_norm, mlp_norm, final_norm, and dev->nparams counts them, so
 * no gradient buffer laid out like host->params can index dev: use it only
 * where no gradient of the model's weights is formed (grads NULL). The
 * caller need not register dev's weights (bf16/fp16 are covered; fp32 has
 * nothing to register). Returns 0, or -1 with err set (as
 * llama_model_to_backend; "out of GPU memory" when the device is full);
 * *dev is then zeroed and nothing is kept. Release with
 * llama_model_free_backend. */
int llama_model_to_backend_frozen(const backend *be, const llama_model *host, llama_model *dev,
                                  char *err, size_t errlen);

/* Releases what llama_model_to_backend or llama_model_to_backend_frozen
 * made (the backend buffer, unless it was shared with the host model, and
 * the frozen tensors, on the thread that made them) and zeroes *dev. Safe
 * on a zeroed model. */
void llama_model_free_backend(const backend *be, llama_model *dev);

#endif
