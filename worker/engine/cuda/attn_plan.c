/* attn_plan.c - launch geometry of the CUDA attention kernels (see
 * attn_plan.h): which shapes they run, how many blocks of how many threads,
 * how much shared memory, and how the backward is cut into chunks whose row
 * statistics fit the op's scratch. */
#include "worker/engine/cuda/attn_plan.h"

#include <stdio.h>

size_t attn_smem_forward(int HS) {
    size_t hs = (size_t)HS, t = ATTN_TILE;
    /* q tile, k tile (rows padded by one float so that lanes reading one
     * column of different rows hit different banks), v tile, probabilities */
    return (t * hs + t * (hs + 1) + t * hs + t * t) * sizeof(float);
}

size_t attn_smem_dq(int HS) {
    size_t hs = (size_t)HS, t = ATTN_TILE;
    /* q and dO tiles (rows read broadcast), padded k and v tiles, dS */
    return (2 * t * hs + 2 * t * (hs + 1) + t * t) * sizeof(float);
}

size_t attn_smem_dkv(int HS) {
    size_t hs = (size_t)HS, t = ATTN_TILE;
    /* k and v tiles (broadcast), padded q and dO tiles, P and dS, L and D */
    return (2 * t * hs + 2 * t * (hs + 1) + 2 * t * t + 2 * t) * sizeof(float);
}

/* grid (x, y) of block threads with smem dynamic bytes. */
static attn_launch attn_make_launch(size_t x, unsigned y, unsigned threads, size_t smem) {
    attn_launch l = {{(unsigned)x, y, 1u}, {threads, 1u, 1u}, smem, smem > ATTN_SMEM_DEFAULT};
    return l;
}

int attn_plan_make(attn_plan *plan, int B, int T, int NH, int NKV, int HS, char *err,
                   size_t errlen) {
    if (B < 1 || T < 1 || NH < 1 || NKV < 1 || HS < 1) {
        snprintf(err, errlen,
                 "attention: every size must be at least 1 (B %d, T %d, NH %d, NKV %d, HS %d)",
                 B, T, NH, NKV, HS);
        return -1;
    }
    if (NH % NKV != 0) {
        snprintf(err, errlen, "attention: NH %d is not a multiple of NKV %d", NH, NKV);
        return -1;
    }
    if (HS > ATTN_MAX_HS) {
        snprintf(err, errlen, "attention: head size HS %d is over the kernels' %d", HS,
                 ATTN_MAX_HS);
        return -1;
    }
    size_t pairs = (size_t)B * (size_t)NH;
    if (pairs > ATTN_GRID_X_MAX) {
        snprintf(err, errlen, "attention: B*NH %zu is over the grid's %u", pairs,
                 ATTN_GRID_X_MAX);
        return -1;
    }
    size_t tiles = ((size_t)T + ATTN_TILE - 1) / ATTN_TILE;
    if (tiles > ATTN_GRID_Y_MAX) {
        snprintf(err, errlen, "attention: T %d is over the kernels' %u", T,
                 ATTN_GRID_Y_MAX * ATTN_TILE);
        return -1;
    }
    size_t most = attn_smem_dkv(HS);
    if (attn_smem_dq(HS) > most) most = attn_smem_dq(HS);
    if (attn_smem_forward(HS) > most) most = attn_smem_forward(HS);
    if (most > ATTN_SMEM_OPTIN_MAX) {
        snprintf(err, errlen, "attention: HS %d needs %zu bytes of shared memory, over %u", HS,
                 most, ATTN_SMEM_OPTIN_MAX);
        return -1;
    }
    plan->B = B;
    plan->T = T;
    plan->NH = NH;
    plan->NKV = NKV;
    plan->HS = HS;
    plan->group = NH / NKV;
    int per_lane = (HS + ATTN_WARP - 1) / ATTN_WARP;
    plan->nv = per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : 8;
    plan->tiles = (unsigned)tiles;
    plan->pairs = pairs;
    /* The scratch holds 2*T*T floats and a pair's statistics 2*T, so T
     * pairs per chunk; whole kv groups where that allows, so that no dkv
     * block is split over two chunks. */
    size_t chunk = (size_t)T;
    if (chunk >= (size_t)plan->group) chunk -= chunk % (size_t)plan->group;
    if (chunk > pairs) chunk = pairs;
    plan->chunk_pairs = chunk;
    plan->chunks = (pairs + chunk - 1) / chunk;
    plan->forward = attn_make_launch(pairs, plan->tiles, ATTN_QWARPS * ATTN_WARP,
                                     attn_smem_forward(HS));
    return 0;
}

void attn_plan_chunk(const attn_plan *plan, size_t c, attn_chunk *out) {
    size_t group = (size_t)plan->group;
    out->pair0 = c * plan->chunk_pairs;
    out->pair1 = out->pair0 + plan->chunk_pairs;
    if (out->pair1 > plan->pairs) out->pair1 = plan->pairs;
    out->kv0 = out->pair0 / group;
    out->kv1 = (out->pair1 - 1) / group + 1;
    size_t n = out->pair1 - out->pair0;
    out->stats = attn_make_launch(n, plan->tiles, ATTN_QWARPS * ATTN_WARP,
                                  attn_smem_forward(plan->HS));
    out->dq = attn_make_launch(n, plan->tiles, ATTN_QWARPS * ATTN_WARP, attn_smem_dq(plan->HS));
    out->dkv = attn_make_launch(out->kv1 - out->kv0, plan->tiles, ATTN_KWARPS * ATTN_WARP,
                                attn_smem_dkv(plan->HS));
}
