/* attn_gemm.h - attention on the tensor cores for bf16/fp16 jobs: cuBLAS
 * strided-batched products with a fused softmax (attn_gemm.cu), the path
 * the CUDA backend takes for backend.h attention / attention_backward when
 * its precision is bf16 or fp16 and T >= ATTN_GEMM_MIN_T. fp32 jobs and
 * short sequences keep the exact flash kernels of attention.cu.
 *
 * Per sequence b and query head h (kv head g = h / G, G = NH / NKV):
 *   forward   S = Q K^T (16-bit operands, fp32 accumulate and output);
 *             P = softmax(scale S) under the causal + padding mask, in
 *             fp32, stored rounded to 16 bits; O = P V (fp32 output).
 *   backward  S and P again (nothing saved but q, k, v); dV += P^T dO;
 *             dP = dO V^T; dS = P (dP - rowsum(P dP)) stored in 16 bits;
 *             dQ += scale dS K; dK += scale dS^T Q (the G query heads of a
 *             kv head add in turn). Rows at or past the length get P = 0
 *             in the backward, so they add nothing anywhere.
 * q, k, v (and dout) are converted to 16 bits once per call.
 *
 * Scratch: the converted tensors, then S (fp32) and P (16-bit) for a chunk
 * of heads, each (T, ld) with ld = T rounded up to 8 elements (16-byte
 * rows, as the tensor-core kernels want); the backward reuses S for dP
 * and P for dS. The chunk is as many kv heads as fit ATTN_GEMM_SP_CAP
 * bytes, so T = 1024 with 32 heads takes 192 MiB; a single head's S and P
 * over the cap (T past ~9400) is refused and the flash kernels run. */
#ifndef STRATA_CUDA_ATTN_GEMM_H
#define STRATA_CUDA_ATTN_GEMM_H

#include <stdbool.h>
#include <stddef.h>

#include "worker/engine/cuda/gemm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Shortest sequence that takes the cuBLAS path. Below 64 the flash kernels
 * need at most two 32-key tiles per query tile, so their fp32 work is
 * small, while this path pays ~4 launches per (sequence, group member)
 * plus the conversions, and products with a (T, T, HS) shape under 64 are
 * too small for the tensor cores to win back the launch overhead. */
#define ATTN_GEMM_MIN_T 64
/* Bytes of S and P per chunk (the 16-bit copies of q, k, v and dout come
 * on top and scale with the activations, not with T^2). */
#define ATTN_GEMM_SP_CAP ((size_t)512 << 20)
/* Threads per softmax block: a row per block, 8 floats per thread at most
 * on the first pass below 2048 columns. */
#define ATTN_GEMM_ROW_BLOCK_MAX 256u
/* The grid's x limit (rows of a launch). */
#define ATTN_GEMM_GRID_X_MAX 2147483647u
/* Every region of the workspace starts on a 256-byte boundary. */
#define ATTN_GEMM_ALIGN ((size_t)256)

typedef struct {
    int B, T, NH, NKV, HS;
    int group;            /* G = NH / NKV */
    bool backward;
    float scale;          /* 1 / sqrt(HS) */
    size_t ld;            /* row stride of S and P: T rounded up to 8 */
    size_t pair_elems;    /* T * ld: S / P elements per head */
    int chunk_heads;      /* kv heads batched per product (1 .. NKV) */
    /* Workspace layout, byte offsets from its start. */
    size_t off_q, off_k, off_v, off_dout; /* 16-bit copies (off_dout: backward only) */
    size_t off_s, off_p;                  /* fp32 S / dP, 16-bit P / dS */
    size_t ws_bytes;                      /* total */
    /* Row kernels (softmax, dS): one block of row_block threads per row,
     * grid x = rows of the launch (chunk heads * T at most). */
    unsigned row_block;
} attn_gemm_plan;

/* Whether attention with precision of products low (bf16/fp16) and
 * sequence length T should take this path rather than the flash kernels. */
bool attn_gemm_wanted(bool low_precision, int T);

/* Plans the path for q (B, T, NH*HS), k/v (B, T, NKV*HS), forward or
 * backward, with S and P within sp_cap bytes. 0, or -1 with err naming
 * the reason: a size < 1, NH not a multiple of NKV, a single head's S and
 * P over sp_cap, rows of a chunk over the grid, sizes past cuBLAS's int. */
int attn_gemm_plan_make(attn_gemm_plan *plan, int B, int T, int NH, int NKV, int HS,
                        bool backward, size_t sp_cap, char *err, size_t errlen);

/* Threads per row-kernel block for rows of T columns: T/8 rounded up to a
 * warp, between 32 and ATTN_GEMM_ROW_BLOCK_MAX. */
unsigned attn_gemm_row_block(int T);

/* Device workspace, grown on demand and owned by the caller's context. */
typedef struct {
    void *buf;
    size_t bytes;
} attn_gemm_ws;

/* Makes ws at least bytes long (waiting for stream first when it has to
 * replace a buffer queued work may read). 0, or -1 with err when the
 * device is out of memory (ws then empty, nothing enqueued). */
int attn_gemm_reserve(attn_gemm_ws *ws, size_t bytes, void *stream, char *err, size_t errlen);
/* Frees ws's buffer (after the caller's stream is idle) and empties it. */
void attn_gemm_ws_free(attn_gemm_ws *ws);

/* backend.h attention (out overwritten) on plan (forward), with type
 * GEMM_BF16 or GEMM_F16 and ws at least plan->ws_bytes. Enqueues on
 * stream through g (bound to the same stream). 0, or -1 with err (a
 * refused launch or cuBLAS error; work before it may be enqueued). */
int attn_gemm_forward(const attn_gemm_plan *plan, attn_gemm_ws *ws, gemm_ctx *g,
                      gemm_type type, float *out, const float *q, const float *k,
                      const float *v, const int *lengths, void *stream, char *err,
                      size_t errlen);

/* backend.h attention_backward (dq, dk, dv +=) on plan (backward). As
 * attn_gemm_forward otherwise. */
int attn_gemm_backward(const attn_gemm_plan *plan, attn_gemm_ws *ws, gemm_ctx *g,
                       gemm_type type, float *dq, float *dk, float *dv, const float *dout,
                       const float *q, const float *k, const float *v, const int *lengths,
                       void *stream, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
