/* attn_plan.h - launch geometry of the CUDA attention kernels
 * (attention.cu), as plain C so that CPU-side tests check it and the
 * kernels decode their block indices with the same inline functions.
 *
 * Tiling (all fp32): a tile is ATTN_TILE query rows or keys.
 *   forward  one block per (sequence b, query head h, query tile): the
 *            query tile sits in shared memory, key/value tiles stream
 *            through it with an online softmax; nothing T x T is stored.
 *   backward per chunk of (b, h) query pairs (the chunk's row statistics
 *            must fit the op's 2*T*T-float scratch):
 *            stats  the forward again per (pair, query tile), writing each
 *                   live row's logsumexp L and D = rowsum(dO * O) to scratch;
 *            dq     per (pair, query tile): P = exp(S - L) recomputed per
 *                   key tile, dS = P * (dP - D), dq += scale dS K;
 *            dkv    per (b, kv head, key tile), looping over the chunk's
 *                   query heads of that kv head and the query tiles at or
 *                   after the key tile: dv += P^T dO, dk += scale dS^T Q.
 *   Separate dq and dkv kernels (no atomics) keep the backward
 *   deterministic: every gradient element is summed by one thread in a
 *   fixed order, and chunks run in order on the stream.
 *
 * Grid: x walks the pairs (up to 2^31 - 1), y the tiles (up to 65535, so
 * T <= 65535 * ATTN_TILE). Query tiles run last-first (blockIdx.y 0 is the
 * last tile, the one with the most keys) so the long blocks start first;
 * key tiles of dkv run first-first for the same reason. */
#ifndef STRATA_CUDA_ATTN_PLAN_H
#define STRATA_CUDA_ATTN_PLAN_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__CUDACC__)
#define ATTN_HD __host__ __device__ static inline
#else
#define ATTN_HD static inline
#endif

#define ATTN_TILE 32         /* query rows / keys per tile (one per warp lane) */
#define ATTN_WARP 32
#define ATTN_QWARPS 4        /* forward, stats, dq: 4 warps of 8 query rows */
#define ATTN_QROWS 8
#define ATTN_KWARPS 8        /* dkv: 8 warps of 4 keys */
#define ATTN_KROWS 4
#define ATTN_MAX_HS 256      /* 8 head dimensions per lane */
#define ATTN_SMEM_DEFAULT 49152u           /* without opting in */
#define ATTN_SMEM_OPTIN_MAX 232448u        /* 227 KiB, sm_80 / sm_90 */
#define ATTN_GRID_X_MAX 2147483647u
#define ATTN_GRID_Y_MAX 65535u

/* One kernel launch: grid, block (threads) and dynamic shared bytes;
 * optin when smem is over ATTN_SMEM_DEFAULT (the launcher must raise the
 * kernel's cudaFuncAttributeMaxDynamicSharedMemorySize first). */
typedef struct {
    unsigned grid[3];
    unsigned block[3];
    size_t smem;
    bool optin;
} attn_launch;

typedef struct {
    int B, T, NH, NKV, HS;
    int group;          /* NH / NKV query heads per kv head */
    int nv;             /* head dimensions per lane, rounded up to 1, 2, 4 or 8 */
    unsigned tiles;     /* ceil(T / ATTN_TILE) */
    size_t pairs;       /* B * NH query (sequence, head) pairs */
    size_t chunk_pairs; /* query pairs per backward chunk */
    size_t chunks;      /* ceil(pairs / chunk_pairs) */
    attn_launch forward;
} attn_plan;

/* One backward chunk: query pairs [pair0, pair1), the kv pairs
 * [kv0, kv1) they read (kv pair = pair / group), and the three launches.
 * Statistics of pair p, row t live at scratch[(p - pair0) * T + t] (L) and
 * scratch[chunk_pairs * T + (p - pair0) * T + t] (D). */
typedef struct {
    size_t pair0, pair1, kv0, kv1;
    attn_launch stats, dq, dkv;
} attn_chunk;

/* Plans attention for q (B, T, NH*HS), k/v (B, T, NKV*HS). 0, or -1 with
 * err naming the dimension when the shape is refused: any size < 1, NH not
 * a multiple of NKV, HS > ATTN_MAX_HS, B*NH over the grid's x, T over
 * 65535 tiles, or shared memory past the opt-in limit. */
int attn_plan_make(attn_plan *plan, int B, int T, int NH, int NKV, int HS, char *err,
                   size_t errlen);

/* Chunk c (< plan->chunks) of the backward. */
void attn_plan_chunk(const attn_plan *plan, size_t c, attn_chunk *out);

/* Dynamic shared bytes of each kernel for head size HS. */
size_t attn_smem_forward(int HS);
size_t attn_smem_dq(int HS);
size_t attn_smem_dkv(int HS);

/* Query block (bx, by) of a forward / stats / dq grid whose x starts at
 * query pair pair0: sequence *b, query head *h, query tile *tile. */
ATTN_HD void attn_block_query(size_t pair0, unsigned bx, unsigned by, int NH, unsigned tiles,
                              int *b, int *h, unsigned *tile) {
    size_t pair = pair0 + bx;
    *b = (int)(pair / (size_t)NH);
    *h = (int)(pair % (size_t)NH);
    *tile = tiles - 1u - by;
}

/* Key block (bx, by) of a dkv grid whose x starts at kv pair kv0:
 * sequence *b, kv head *g, key tile *tile. */
ATTN_HD void attn_block_key(size_t kv0, unsigned bx, unsigned by, int NKV, int *b, int *g,
                            unsigned *tile) {
    size_t kv = kv0 + bx;
    *b = (int)(kv / (size_t)NKV);
    *g = (int)(kv % (size_t)NKV);
    *tile = by;
}

/* The query heads [*h0, *h1) of kv head g of sequence b that lie in the
 * chunk's query pairs [pair0, pair1) (possibly empty). */
ATTN_HD void attn_chunk_heads(size_t pair0, size_t pair1, int b, int g, int NH, int group,
                              int *h0, int *h1) {
    size_t first = (size_t)b * (size_t)NH + (size_t)g * (size_t)group;
    size_t lo = first > pair0 ? first : pair0;
    size_t hi = first + (size_t)group < pair1 ? first + (size_t)group : pair1;
    if (hi < lo) hi = lo;
    *h0 = (int)(lo - (size_t)b * (size_t)NH);
    *h1 = (int)(hi - (size_t)b * (size_t)NH);
}

#ifdef __cplusplus
}
#endif

#endif
