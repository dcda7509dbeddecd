/* backend.h - the ops the LLaMA engine runs on, as a table of function
 * pointers, so a CUDA backend slots in beside the CPU one without #ifdefs in
 * the model code.
 *
 * Every float pointer an op takes is a buffer from the same backend's alloc
 * (for the CPU backend: plain host memory); the model's weights must live in
 * memory the backend addresses too. upload/download move bytes between host
 * memory and such buffers. Ops do not fail: their callers check shapes and
 * token ids first.
 *
 * Shapes use the engine's letters: N rows (B*T flattened), C = hidden size,
 * FF = MLP width, NH / NKV query / key-value heads, HS = head size,
 * V = vocabulary. Row-major throughout; weights in Hugging Face's [out, in]
 * layout (y = x W^T).
 *
 * The backward of each op sits next to it. Backward ops accumulate (+=)
 * into the gradients of weights; what they do with activation gradients
 * (add or overwrite) is stated per op. Padding rows carry zero upstream
 * gradient in training (nothing downstream reads them), so their
 * contributions vanish. */
#ifndef STRATA_BACKEND_H
#define STRATA_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct backend {
    const char *name; /* "cpu" */
    /* True when alloc's buffers are plain host memory (the CPU backend), so
     * callers may read them without download. */
    bool host_memory;

    /* bytes of backend memory, or NULL with err set; release with free_buf. */
    void *(*alloc)(size_t bytes, char *err, size_t errlen);
    void (*free_buf)(void *buf);
    /* host -> backend and backend -> host copies of bytes. */
    void (*upload)(void *dst, const void *src, size_t bytes);
    void (*download)(void *dst, const void *src, size_t bytes);

    /* x (n) = 0; dst (n) = src (n) (no overlap). */
    void (*zero)(float *x, size_t n);
    void (*copy)(float *dst, const float *src, size_t n);
    /* x (n) *= a. */
    void (*scale)(float *x, size_t n, float a);

    /* out (N, out_dim) = x (N, in_dim) W^T with W (out_dim, in_dim);
     * with accumulate, out += x W^T instead (a residual connection fused
     * into the projection). out must not overlap x or W. */
    void (*matmul)(float *out, const float *x, const float *w, size_t N, size_t in_dim,
                   size_t out_dim, bool accumulate);

    /* Backward of matmul given dy (N, out_dim): dx (N, in_dim) = dy W, or
     * += with accumulate_dx; dw (out_dim, in_dim) += dy^T x. Either of dx
     * and dw may be NULL (frozen weight; input needing no gradient). */
    void (*matmul_backward)(float *dx, float *dw, const float *dy, const float *x,
                            const float *w, size_t N, size_t in_dim, size_t out_dim,
                            bool accumulate_dx);

    /* out (N, C) = x / sqrt(mean(x^2) + eps) * weight (C), per row, in fp32
     * (the mean accumulated in double). out may equal x. */
    void (*rmsnorm)(float *out, const float *x, const float *weight, size_t N, size_t C,
                    float eps);

    /* Backward of rmsnorm given dout (N, C) and the forward's input x:
     * dx (N, C) += d/dx, dweight (C) += d/dweight (NULL: frozen). dx must
     * not overlap dout or x. */
    void (*rmsnorm_backward)(float *dx, float *dweight, const float *dout, const float *x,
                             const float *weight, size_t N, size_t C, float eps);

    /* In place on x (N, nheads * HS): rotate-half RoPE for each row at its
     * position pos[n] (N ints): pairs (i, i + HS/2) are rotated by
     * pos * theta^(-2i/HS), the angle computed in fp32 as Hugging Face does.
     * HS is even. */
    void (*rope)(float *x, const int *pos, size_t N, int nheads, int HS, float theta);
    /* The same rotation split in two, so the angles are computed once per
     * forward instead of per layer: rope_table fills cs (npos, HS/2, 2)
     * with the cos and sin of pos * theta^(-2i/HS) for pos in 0..npos-1,
     * rounded as rope rounds them; rope_cached then rotates as rope does,
     * reading angles from cs (every pos[n] < npos). The results equal
     * rope's. */
    void (*rope_table)(float *cs, int npos, int HS, float theta);
    void (*rope_cached)(float *x, const int *pos, size_t N, int nheads, int HS, const float *cs);
    /* Backward of rope_cached, in place on the gradient dx: the rotation is
     * orthogonal, so its backward is the inverse rotation (angle -pos). */
    void (*rope_backward_cached)(float *dx, const int *pos, size_t N, int nheads, int HS,
                                 const float *cs);

    /* Causal self-attention with a padding mask over a right-padded batch:
     * q (B, T, NH*HS), k and v (B, T, NKV*HS) -> out (B, T, NH*HS). Query
     * head h reads key-value head h / (NH/NKV). Row t of sequence b attends
     * to keys j <= t with j < lengths[b] (1 <= lengths[b] <= T), so padding
     * never reaches a real position; padding rows attend to the whole
     * sequence, as Hugging Face's mask has them. Scores are scaled by
     * 1/sqrt(HS); softmax in fp32. scratch holds T*T floats. */
    void (*attention)(float *out, const float *q, const float *k, const float *v,
                      const int *lengths, int B, int T, int NH, int NKV, int HS, float *scratch);

    /* Backward of attention given dout (B, T, NH*HS) and the forward's
     * q, k, v (after RoPE): dq, dk, dv (same shapes as q, k, v) += their
     * gradients; dk and dv of a key-value head sum over the query heads
     * that read it. The probabilities are recomputed block by block from
     * q and k (nothing of the forward is saved beyond q, k, v: no T x T
     * per head). Query rows past a sequence's length are skipped (their
     * dout is zero in training). scratch holds 2*T*T floats. */
    void (*attention_backward)(float *dq, float *dk, float *dv, const float *dout,
                               const float *q, const float *k, const float *v,
                               const int *lengths, int B, int T, int NH, int NKV, int HS,
                               float *scratch);

    /* gate (n) = silu(gate) * up, in place: the SwiGLU MLP's middle. */
    void (*swiglu)(float *gate, const float *up, size_t n);
    /* Backward of swiglu given dout (n) and the forward's inputs gate (before
     * the in-place update) and up: dgate = dout * up * silu'(gate) and
     * dup = dout * silu(gate), both overwritten. dgate may equal dout. */
    void (*swiglu_backward)(float *dgate, float *dup, const float *dout, const float *gate,
                            const float *up, size_t n);

    /* out (N, C) = table (V, C) rows tokens[n]; every token is in [0, V). */
    void (*embedding)(float *out, const int *tokens, const float *table, size_t N, size_t C);
    /* Backward of embedding: dtable row tokens[n] += dout row n (a token
     * repeated in the batch sums its rows). */
    void (*embedding_backward)(float *dtable, const float *dout, const int *tokens, size_t N,
                               size_t C);

    /* Fused softmax cross-entropy over logits (N, V), in place: row n with
     * targets[n] in [0, V) gets row_loss[n] = logsumexp(row) - row[target]
     * (in double) and becomes (softmax(row) - onehot(target)) * scale, the
     * gradient of scale * loss; a row with targets[n] < 0 scores nothing:
     * row_loss[n] = 0 and the row becomes zeros. Softmax once per row, no
     * second (N, V) buffer. */
    void (*cross_entropy)(float *logits, double *row_loss, const int *targets, size_t N,
                          size_t V, float scale);

    /* x (n) += y (n). Also the backward of a residual connection: the
     * gradient passes to both branches unchanged. */
    void (*residual_add)(float *x, const float *y, size_t n);

    /* Inverted dropout with a counter-based mask: element i of x (n) is kept
     * iff backend_dropout_keep(key, i, threshold) (see there and forward.h's
     * llama_dropout_key), out[i] = x[i] * scale when kept and 0 otherwise;
     * with accumulate, out[i] += that instead. The same (key, threshold)
     * gives the same mask, so the backward applies it to the gradient
     * without storing it. out may equal x unless accumulating. */
    void (*dropout)(float *out, const float *x, size_t n, uint64_t key, uint64_t threshold,
                    float scale, bool accumulate);
} backend;

/* splitmix64's output function (Steele, Lea and Flood): z + the golden
 * gamma, then two xor-shift-multiply rounds. Every backend must hash
 * dropout masks with exactly this, so they agree with each other and with
 * the PyTorch reference that re-implements it. */
static inline uint64_t backend_mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Whether dropout keeps element i under key: the top 53 bits of
 * backend_mix64(key ^ i) as an integer are >= threshold (floor(p * 2^53)
 * for drop probability p), so an element survives with probability 1 - p. */
static inline bool backend_dropout_keep(uint64_t key, uint64_t i, uint64_t threshold) {
    return (backend_mix64(key ^ i) >> 11) >= threshold;
}

/* The CPU backend: OpenBLAS sgemm for the matrix products, every op split
 * over a process-wide pool of as many threads as OpenBLAS is configured for
 * (read once, on first use), with OpenBLAS held to one thread inside each
 * share. A static table; ops may be called from several threads at once
 * (one runs on the pool, the others alone on their own thread). */
const backend *backend_cpu(void);

#endif
