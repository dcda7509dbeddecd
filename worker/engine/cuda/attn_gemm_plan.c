/* attn_gemm_plan.c - the pure part of the tensor-core attention path (see
 * attn_gemm.h): when it runs, how its workspace is laid out, how many
 * heads each batched product takes and how the row kernels are launched.
 * Plain C in libworker so that CPU tests check it. */
#include "worker/engine/cuda/attn_gemm.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>

bool attn_gemm_wanted(bool low_precision, int T) { return low_precision && T >= ATTN_GEMM_MIN_T; }

unsigned attn_gemm_row_block(int T) {
    size_t want = T > 0 ? ((size_t)T + 7) / 8 : 1;
    want = (want + 31) / 32 * 32;
    if (want > ATTN_GEMM_ROW_BLOCK_MAX) want = ATTN_GEMM_ROW_BLOCK_MAX;
    return (unsigned)want;
}

/* off rounded up to ATTN_GEMM_ALIGN. */
static size_t attn_gemm_align(size_t off) {
    return (off + ATTN_GEMM_ALIGN - 1) / ATTN_GEMM_ALIGN * ATTN_GEMM_ALIGN;
}

int attn_gemm_plan_make(attn_gemm_plan *plan, int B, int T, int NH, int NKV, int HS,
                        bool backward, size_t sp_cap, char *err, size_t errlen) {
    *plan = (attn_gemm_plan){0};
    if (B < 1 || T < 1 || NH < 1 || NKV < 1 || HS < 1) {
        snprintf(err, errlen,
                 "attention (gemm): every size must be at least 1 (B %d, T %d, NH %d, NKV %d, "
                 "HS %d)",
                 B, T, NH, NKV, HS);
        return -1;
    }
    if (NH % NKV != 0) {
        snprintf(err, errlen, "attention (gemm): NH %d is not a multiple of NKV %d", NH, NKV);
        return -1;
    }
    size_t ld = ((size_t)T + 7) / 8 * 8;
    /* Bytes of one head's S (fp32) and P (16-bit). T < 2^31 keeps this far
     * from overflow (T * ld * 6 < 2^64). */
    size_t pair_elems = (size_t)T * ld;
    size_t per_head = pair_elems * (sizeof(float) + sizeof(uint16_t));
    if (per_head > sp_cap) {
        snprintf(err, errlen,
                 "attention (gemm): T %d needs %zu bytes of scores per head, over the %zu-byte "
                 "cap",
                 T, per_head, sp_cap);
        return -1;
    }
    /* Leading dimensions and batch strides go to cuBLAS as int / long long;
     * row offsets inside q (B*T rows of NH*HS) are computed in size_t. */
    size_t qrow = (size_t)NH * (size_t)HS;
    if (qrow > INT_MAX || ld > INT_MAX) {
        snprintf(err, errlen, "attention (gemm): NH*HS %zu or T %d past cuBLAS's int", qrow, T);
        return -1;
    }
    size_t chunk = sp_cap / per_head;
    if (chunk > (size_t)NKV) chunk = (size_t)NKV;
    if (chunk * (size_t)T > ATTN_GEMM_GRID_X_MAX) chunk = ATTN_GEMM_GRID_X_MAX / (size_t)T;
    size_t nq = (size_t)B * (size_t)T * qrow;
    size_t nkv = (size_t)B * (size_t)T * (size_t)NKV * (size_t)HS;
    if (nq > SIZE_MAX / 8 || pair_elems * chunk > SIZE_MAX / 8) {
        snprintf(err, errlen, "attention (gemm): tensors too large to address");
        return -1;
    }
    plan->B = B;
    plan->T = T;
    plan->NH = NH;
    plan->NKV = NKV;
    plan->HS = HS;
    plan->group = NH / NKV;
    plan->backward = backward;
    plan->scale = 1.0f / sqrtf((float)HS);
    plan->ld = ld;
    plan->pair_elems = pair_elems;
    plan->chunk_heads = (int)chunk;
    size_t off = 0;
    plan->off_q = off;
    off = attn_gemm_align(off + nq * sizeof(uint16_t));
    plan->off_k = off;
    off = attn_gemm_align(off + nkv * sizeof(uint16_t));
    plan->off_v = off;
    off = attn_gemm_align(off + nkv * sizeof(uint16_t));
    plan->off_dout = off;
    if (backward) off = attn_gemm_align(off + nq * sizeof(uint16_t));
    plan->off_s = off;
    off = attn_gemm_align(off + chunk * pair_elems * sizeof(float));
    plan->off_p = off;
    off = attn_gemm_align(off + chunk * pair_elems * sizeof(uint16_t));
    plan->ws_bytes = off;
    plan->row_block = attn_gemm_row_block(T);
    return 0;
}
