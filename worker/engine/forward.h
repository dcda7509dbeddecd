/* forward.h - the LLaMA forward pass (Hugging Face's LlamaForCausalLM) over a
 * right-padded batch, on any backend (backend.h).
 *
 * Semantics (ARCHITECTURE.md, "Engine semantics"): RMSNorm in fp32 with the
 * config's eps; rotate-half RoPE with rope_theta at positions 0..len-1 of
 * each sequence; grouped-query attention, causal, with keys past a
 * sequence's length masked; SwiGLU MLP down(silu(gate(x)) * up(x)); tied or
 * untied head. An example's results do not depend on what else is in its
 * batch or how far it is padded.
 *
 * Hidden states follow output_hidden_states=True: index 0 is the token
 * embeddings, index i (1 <= i < L) the output of decoder layer i, index L the
 * last layer's output after the final RMSNorm. */
#ifndef STRATA_FORWARD_H
#define STRATA_FORWARD_H

#include "worker/engine/backend.h"
#include "worker/engine/model.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Activations for batches of up to B sequences of up to T tokens, sized once
 * and reused by every llama_forward call. Float buffers are slices of one
 * backend allocation (acts); ints of another (ints). */
typedef struct {
    const backend *be;
    int B, T;                /* capacity */
    int C, FF, NH, NKV, HS, V, L; /* the config the buffers were sized for */
    float *acts;             /* the one float allocation */
    float *x;                /* (B, T, C) residual stream */
    float *xn;               /* (B, T, C) normalised block input; attention output */
    float *q;                /* (B, T, NH*HS) */
    float *k, *v;            /* (B, T, NKV*HS) */
    float *gate, *up;        /* (B, T, FF) */
    float *scores;           /* (T, T) attention scratch */
    float *rope_cs;          /* (T, HS/2, 2) RoPE cos/sin, built once per forward */
    int *ints;               /* the one int allocation (backend memory) */
    int *tokens, *pos;       /* (B, T) */
    int *lengths;            /* (B) */
    int *host_ints;          /* host copy of ints, built then uploaded */
    float *host_hidden;      /* (B, T, C) host staging; only for non-host backends */
    float *dev_logits;       /* (B, T, V) backend logits; only for non-host backends */

    /* Training (llama_state_init_train only; NULL otherwise). Saved by the
     * forward for the backward, per layer l (N = B*T rows): the residual
     * stream entering the layer xs[l] (xs[L]: before the final norm), after
     * its attention block xmid[l], q and k after RoPE, v, the attention
     * output att, the MLP's gate (before silu) and up. The normed inputs
     * and silu(gate)*up are recomputed in the backward instead of saved.
     * Memory: N * (L * (4C + 2*KVD + 2FF) + C) floats saved, plus
     * N * (V + 3C + 2*KVD + 3FF) + 2*T*T of working space (logits turned
     * into their gradient in place, activation gradients, attention
     * scratch). */
    float *train;            /* the one float allocation for all of it */
    float *xs, *xmid, *tq, *tk, *tv, *tatt, *tgate, *tup;
    float *tlogits;          /* (N, V) */
    float *dx, *dxn, *dq, *dk, *dv, *dh, *dup, *h; /* working gradients */
    float *attn_scratch;     /* 2*T*T */
    double *row_loss;        /* (N) backend memory */
    int *targets;            /* (N) backend memory: label of position t+1, or -1 */
    double *host_row_loss;   /* (N) host staging; non-host backends only */
    int *host_targets;       /* (N) host */

    /* LoRA training (allocated by the first llama_lora_loss_and_grad, again
     * only if the rank changes): u = scaling * x A^T of every (layer,
     * projection), (L, 7, N, r), saved for the backward, and its gradient
     * (N, r). */
    float *lora_buf;
    int lora_r;
    float *lora_u, *lora_du;
    /* With LoRA dropout only (else NULL): the dropped-out input of the
     * projection at hand, (N, max in), reused as its gradient in the
     * backward; the masks are regenerated, not stored. */
    float *lora_xd;
} llama_state;

/* Sizes s for cfg on backend be, batches of up to B x T. Returns 0, or -1
 * with err set (dimensions out of range, out of memory); s is then zeroed
 * and needs no llama_state_free. */
int llama_state_init(llama_state *s, const backend *be, const llama_config *cfg, int B, int T,
                     char *err, size_t errlen);

/* llama_state_init plus the training buffers (see llama_state above), for
 * llama_loss_and_grad. Returns 0, or -1 with err set; s is then zeroed. */
int llama_state_init_train(llama_state *s, const backend *be, const llama_config *cfg, int B,
                           int T, char *err, size_t errlen);

/* Releases s's buffers (safe on a zeroed state). */
void llama_state_free(llama_state *s);

/* Called for every hidden-state index layer = 0..L with x (B, T, C) in host
 * memory, valid only during the call. Return 0 to continue, or -1 with err
 * set to stop the forward (llama_forward then returns -1 with that err). */
typedef int (*llama_hook)(void *user, int layer, const float *x, int B, int T, int C, char *err,
                          size_t errlen);

/* Runs the model over tokens (B, T), right-padded: sequence b's tokens are
 * tokens[b*T .. b*T + lengths[b]), 1 <= lengths[b] <= T; what sits in the
 * padding is ignored (ids outside [0, V) are allowed there). B <= s->B,
 * T <= s->T; be and m's config must be the ones s was sized with. Calls hook (if
 * not NULL) for layers 0..L in order, and writes logits (B, T, V) in host
 * memory when logits is not NULL. Rows at padding positions of the hidden
 * states and logits are computed as Hugging Face computes them for a
 * right-padded batch (positions continue past the length, attending to the
 * whole sequence); they never influence real positions. Returns 0, or -1
 * with err set (bad arguments, a token id out of range, the hook's error). */
int llama_forward(const backend *be, const llama_model *m, llama_state *s, const int *tokens,
                  const int *lengths, int B, int T, llama_hook hook, void *user, float *logits,
                  char *err, size_t errlen);

/* The label that marks a position as not scored (Hugging Face's). */
#define LLAMA_IGNORE_INDEX (-100)

/* One forward and backward pass of the causal-LM loss over tokens (B, T),
 * right-padded as for llama_forward, with labels (B, T) unshifted as Hugging
 * Face's LlamaForCausalLM takes them: the logits at position t are scored
 * against labels[b, t+1]; LLAMA_IGNORE_INDEX scores nothing (prompt tokens,
 * padding); the last position scores nothing. Every other label must be a
 * token id in [0, V) at a position below the sequence's length.
 * Each counted token's cross-entropy is multiplied by loss_scale in the
 * gradient (1 / the optimizer step's total counted tokens gives the token
 * mean over all its micro-batches, Hugging Face Trainer's scaling), and the
 * gradient of every parameter is ADDED into grads (m->nparams floats, the
 * layout of m->params: grads + (m->w.X - m->params) is X's gradient; a tied
 * head's and the lookup's contributions both land in embed's). loss_sum gets
 * the sum of the counted tokens' cross-entropies (unscaled) and n_counted
 * their number. s must come from llama_state_init_train. Returns 0, or -1
 * with err set (bad arguments, token or label out of range); grads is then
 * unchanged. */
int llama_loss_and_grad(const backend *be, const llama_model *m, llama_state *s,
                        const int *tokens, const int *labels, const int *lengths, int B, int T,
                        double loss_scale, float *grads, double *loss_sum, long *n_counted,
                        char *err, size_t errlen);

/* The seven projections of a decoder layer LoRA can target, in this order. */
typedef enum {
    LLAMA_PROJ_Q,
    LLAMA_PROJ_K,
    LLAMA_PROJ_V,
    LLAMA_PROJ_O,
    LLAMA_PROJ_GATE,
    LLAMA_PROJ_UP,
    LLAMA_PROJ_DOWN,
    LLAMA_NPROJ
} llama_proj;

/* PEFT's module path of projection p inside a layer ("self_attn.q_proj",
 * "mlp.down_proj", ...), or NULL for a value outside the enum. */
const char *llama_proj_module(llama_proj p);

/* Projection p's (out, in) dimensions for cfg. */
void llama_proj_dims(const llama_config *cfg, llama_proj p, size_t *out, size_t *in);

/* An unmerged LoRA adapter being trained: for each targeted projection p
 * with weight W (out, in), y = x W^T + scaling * (x A^T) B^T, A = lora_A
 * (r, in), B = lora_B (out, r) as PEFT names them, in every layer. The
 * trainable tensors live in one flat buffer params (nparams floats, owned by
 * the caller); a[p] / b[p] point into it at layer 0 and are stacked over
 * layers: layer l's A is a[p] + l * r * in, its B b[p] + l * out * r.
 * Layout: for each targeted p in enum order, A (L, r, in) then B (L, out,
 * r); a gradient buffer with the same layout is indexed by the same offsets
 * (grad + (a[p] - params)). The base model stays frozen and is only read.
 *
 * Dropout (PEFT's lora_dropout, an nn.Dropout in front of lora_A): with
 * dropout p > 0 the adapter's branch reads x_d = x * m / (1 - p) instead of
 * x, m a 0/1 mask drawn per element of the projection's input (N, in) and
 * applied to the gradient too; the base path x W^T is unchanged. The
 * masks are a pure function of (dropout_seed, dropout_counter, layer,
 * projection, element), so a resumed run redraws the same ones; the caller
 * gives each micro-batch its own dropout_counter. llama_dropout_key has the
 * exact formula. llama_lora_bind sets dropout 0 (off). Inference never
 * drops out. */
typedef struct {
    int r;
    float scaling;               /* lora_alpha / r (or / sqrt(r) with rsLoRA) */
    bool target[LLAMA_NPROJ];
    float *params;
    size_t nparams;
    float *a[LLAMA_NPROJ], *b[LLAMA_NPROJ]; /* NULL where not targeted */
    float dropout;               /* p in [0, 1); 0: no dropout */
    uint64_t dropout_seed;       /* the run's seed */
    uint64_t dropout_counter;    /* which micro-batch: a fresh mask per value */
} llama_lora;

/* The dropout key of (layer, projection p) for the micro-batch numbered
 * counter of a run seeded with seed, with mix = backend_mix64 (splitmix64's
 * output function):
 *   key = mix(mix(mix(seed) ^ counter) ^ (layer * LLAMA_NPROJ + p))
 * Element i (row-major over the projection's (N, in) input, N = B * T of
 * the padded batch) is kept iff (mix(key ^ i) >> 11) >= floor(p * 2^53),
 * p the float dropout widened to double; kept elements are multiplied by
 * the float 1 / (1 - p). */
uint64_t llama_dropout_key(uint64_t seed, uint64_t counter, int layer, llama_proj p);

/* Fills mask (n) with the multipliers dropout applies to the first n
 * elements of (layer, proj)'s LoRA input: 1 / (1 - p) where kept, 0 where
 * dropped, for drop probability p in [0, 1) (p 0: all ones). For tests and
 * references; training regenerates the masks itself. */
void llama_dropout_mask(float *mask, float p, uint64_t seed, uint64_t counter, int layer,
                        llama_proj proj, size_t n);

/* Floats an adapter of rank r over targets takes for cfg (0 on overflow or
 * bad arguments). */
size_t llama_lora_count(const llama_config *cfg, int r, const bool target[LLAMA_NPROJ]);

/* Points lo at params (llama_lora_count floats, the caller's) with the
 * layout above. Returns 0, or -1 with err set (r < 1, no target, sizes). */
int llama_lora_bind(llama_lora *lo, const llama_config *cfg, int r, float scaling,
                    const bool target[LLAMA_NPROJ], float *params, char *err, size_t errlen);

/* llama_loss_and_grad with lo's adapter applied unmerged to m's frozen
 * weights: the gradients of lo's A and B tensors are ADDED into lora_grads
 * (lo->nparams floats, lo's layout); no gradient of m's weights is formed
 * and m is not written. Same labels, scaling, loss_sum and n_counted as
 * llama_loss_and_grad. With lo->dropout > 0 the adapter's inputs are
 * dropped out with the masks of (lo->dropout_seed, lo->dropout_counter)
 * (see llama_lora). s must come from llama_state_init_train; the first
 * call (or one with a new rank, or the first with dropout) allocates s's
 * LoRA buffers. Returns 0, or -1 with err set (dropout outside [0, 1) among
 * them); lora_grads is then unchanged. */
int llama_lora_loss_and_grad(const backend *be, const llama_model *m, const llama_lora *lo,
                             llama_state *s, const int *tokens, const int *labels,
                             const int *lengths, int B, int T, double loss_scale,
                             float *lora_grads, double *loss_sum, long *n_counted, char *err,
                             size_t errlen);

#endif
