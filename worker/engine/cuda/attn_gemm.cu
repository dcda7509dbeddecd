/* attn_gemm.cu - attention for bf16/fp16 jobs as cuBLAS strided-batched
 * products around two fused row kernels (softmax, and its backward's
 * dS = P (dP - rowsum(P dP))); attn_gemm.h gives the maths, the scratch
 * layout and when the backend takes this path. The plan (attn_gemm_plan.c)
 * is plain C and tested on the CPU; these kernels are tested under the
 * emulator against a CPU computation that rounds where this path rounds.
 *
 * Batching. Products batch heads whose operands sit at constant strides.
 * With grouped-query attention query head h reads kv head h / G, which is
 * not linear in h when G > 1; but for a fixed group member j the heads
 * h = g G + j (g = 0 .. NKV-1) are: their queries are G*HS floats apart in
 * a row of q and their keys and values HS apart in a row of k and v. So
 * the loops run over sequences b and members j, and each product batches
 * up to plan->chunk_heads consecutive kv heads g (all NKV of them unless
 * S and P would pass the scratch cap). Sequences cannot join the batch:
 * their offset (T rows) and a head's (HS columns) are different strides.
 * Every call on the stream runs in order, so the G members' additions to
 * dk and dv happen one after another, deterministically. */
#include "worker/engine/cuda/compat.cuh"

#include "common/util.h"

#include "worker/engine/cuda/attn_gemm.h"
#include "worker/engine/cuda/kernels.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>

namespace {

/* 16-bit element access, one overload per format. */
__device__ __forceinline__ float ag_load(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ float ag_load(const __half *p) { return __half2float(*p); }
__device__ __forceinline__ void ag_store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void ag_store(__half *p, float v) { *p = __float2half(v); }

/* The block's maximum (MAX) or sum of v, in every thread. red holds one
 * float per warp; the trailing barrier lets the caller reuse it at once.
 * blockDim.x is a multiple of 32 (attn_gemm_row_block). */
template <bool MAX>
__device__ float ag_block_reduce(float v, float *red) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(CU_FULL_MASK, v, o);
        v = MAX ? fmaxf(v, w) : v + w;
    }
    const int warp = (int)threadIdx.x / CU_WARP, lane = (int)threadIdx.x % CU_WARP;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    const int nwarps = (int)blockDim.x / CU_WARP;
    float r = red[0];
    for (int w = 1; w < nwarps; w++) r = MAX ? fmaxf(r, red[w]) : r + red[w];
    __syncthreads();
    return r;
}

/* Keys row t may attend to: t + 1 below the length; the whole length for
 * padding rows in the forward (backend.h), none in the backward (those rows
 * take no gradient). The length is clamped to [1, T] so that a bad value
 * cannot send the kernel outside the row. */
__device__ __forceinline__ int ag_live(const int *lengths, int b, int T, int t, bool backward) {
    int len = lengths[b];
    len = len < 1 ? 1 : len > T ? T : len;
    if (t < len) return t + 1;
    return backward ? 0 : len;
}

/* One row of a chunk per block (grid x = heads * T): P = softmax of the
 * already scaled scores S over the row's live keys, in fp32, stored as
 * LOW; columns past the live ones get 0. */
template <typename LOW>
__global__ void ag_softmax_kernel(const float *S, LOW *P, size_t ld, size_t pair_elems, int T,
                                  const int *lengths, int b, bool backward) {
    __shared__ float red[ATTN_GEMM_ROW_BLOCK_MAX / CU_WARP];
    const size_t head = blockIdx.x / (unsigned)T;
    const int t = (int)(blockIdx.x % (unsigned)T);
    const float *s = S + head * pair_elems + (size_t)t * ld;
    LOW *p = P + head * pair_elems + (size_t)t * ld;
    const int live = ag_live(lengths, b, T, t, backward);
    const int tid = (int)threadIdx.x, nt = (int)blockDim.x;
    if (live == 0) {
        for (int j = tid; j < T; j += nt) ag_store(p + j, 0.0f);
        return;
    }
    float m = -INFINITY;
    for (int j = tid; j < live; j += nt) m = fmaxf(m, s[j]);
    m = ag_block_reduce<true>(m, red);
    float sum = 0.0f;
    for (int j = tid; j < live; j += nt) sum += expf(s[j] - m);
    sum = ag_block_reduce<false>(sum, red);
    const float inv = 1.0f / sum;
    for (int j = tid; j < T; j += nt) ag_store(p + j, j < live ? expf(s[j] - m) * inv : 0.0f);
}

/* The backward's row kernel, in place on P (grid as the softmax's): with
 * D = rowsum(P dP) over the live keys, P becomes dS = P (dP - D) in LOW;
 * rows with no live keys (past the length) stay zero. */
template <typename LOW>
__global__ void ag_dsoftmax_kernel(const float *dP, LOW *P, size_t ld, size_t pair_elems, int T,
                                   const int *lengths, int b) {
    __shared__ float red[ATTN_GEMM_ROW_BLOCK_MAX / CU_WARP];
    const size_t head = blockIdx.x / (unsigned)T;
    const int t = (int)(blockIdx.x % (unsigned)T);
    const float *dp = dP + head * pair_elems + (size_t)t * ld;
    LOW *p = P + head * pair_elems + (size_t)t * ld;
    const int live = ag_live(lengths, b, T, t, true);
    const int tid = (int)threadIdx.x, nt = (int)blockDim.x;
    if (live == 0) return; /* the softmax kernel zeroed the row */
    float d = 0.0f;
    for (int j = tid; j < live; j += nt) d += ag_load(p + j) * dp[j];
    d = ag_block_reduce<false>(d, red);
    for (int j = tid; j < T; j += nt)
        ag_store(p + j, j < live ? ag_load(p + j) * (dp[j] - d) : 0.0f);
}

/* A launch's error, if any, as -1 with err naming what. */
int ag_check_launch(const char *what, char *err, size_t errlen) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return 0;
    return err_set(err, errlen, "attention (gemm) %s: %s", what, cudaGetErrorString(e));
}

/* One row-kernel launch over nh heads of sequence b (type picks LOW). */
int ag_launch_softmax(const attn_gemm_plan *p, gemm_type type, const float *S, uint16_t *P,
                      int nh, const int *lengths, int b, bool backward, cudaStream_t st,
                      char *err, size_t errlen) {
    dim3 grid((unsigned)((size_t)nh * (size_t)p->T)), block(p->row_block);
    if (type == GEMM_F16)
        CU_LAUNCH((ag_softmax_kernel<__half>), grid, block, 0, st, S,
                  reinterpret_cast<__half *>(P), p->ld, p->pair_elems, p->T, lengths, b,
                  backward);
    else
        CU_LAUNCH((ag_softmax_kernel<__nv_bfloat16>), grid, block, 0, st, S,
                  reinterpret_cast<__nv_bfloat16 *>(P), p->ld, p->pair_elems, p->T, lengths, b,
                  backward);
    return ag_check_launch("softmax", err, errlen);
}

int ag_launch_dsoftmax(const attn_gemm_plan *p, gemm_type type, const float *dP, uint16_t *P,
                       int nh, const int *lengths, int b, cudaStream_t st, char *err,
                       size_t errlen) {
    dim3 grid((unsigned)((size_t)nh * (size_t)p->T)), block(p->row_block);
    if (type == GEMM_F16)
        CU_LAUNCH((ag_dsoftmax_kernel<__half>), grid, block, 0, st, dP,
                  reinterpret_cast<__half *>(P), p->ld, p->pair_elems, p->T, lengths, b);
    else
        CU_LAUNCH((ag_dsoftmax_kernel<__nv_bfloat16>), grid, block, 0, st, dP,
                  reinterpret_cast<__nv_bfloat16 *>(P), p->ld, p->pair_elems, p->T, lengths, b);
    return ag_check_launch("softmax backward", err, errlen);
}

/* dst (n) = src (n) in type's 16-bit format, on stream. */
int ag_convert(gemm_type type, uint16_t *dst, const float *src, size_t n, void *stream,
               char *err, size_t errlen) {
    int rc = type == GEMM_F16 ? cuk_to_fp16(dst, src, n, stream, err, errlen)
                              : cuk_to_bf16(dst, src, n, stream, err, errlen);
    if (rc != 0) return -1;
    return ag_check_launch("conversion", err, errlen);
}

/* The workspace's regions, typed. */
struct ag_regions {
    uint16_t *q, *k, *v, *dout, *p;
    float *s;
};

ag_regions ag_regions_of(const attn_gemm_plan *p, attn_gemm_ws *ws) {
    char *base = static_cast<char *>(ws->buf);
    ag_regions r;
    r.q = reinterpret_cast<uint16_t *>(base + p->off_q);
    r.k = reinterpret_cast<uint16_t *>(base + p->off_k);
    r.v = reinterpret_cast<uint16_t *>(base + p->off_v);
    r.dout = reinterpret_cast<uint16_t *>(base + p->off_dout);
    r.s = reinterpret_cast<float *>(base + p->off_s);
    r.p = reinterpret_cast<uint16_t *>(base + p->off_p);
    return r;
}

/* Shared checks of both directions: a BF16/FP16 type, a big enough
 * workspace. */
int ag_check(const attn_gemm_plan *p, const attn_gemm_ws *ws, gemm_type type, bool backward,
             char *err, size_t errlen) {
    if (type != GEMM_BF16 && type != GEMM_F16)
        return err_set(err, errlen, "attention (gemm): operands must be bf16 or fp16");
    if (backward && !p->backward)
        return err_set(err, errlen, "attention (gemm): the plan is for the forward only");
    if (!ws->buf || ws->bytes < p->ws_bytes)
        return err_set(err, errlen, "attention (gemm): workspace of %zu bytes, %zu needed",
                      ws->bytes, p->ws_bytes);
    return 0;
}

} // namespace

int attn_gemm_reserve(attn_gemm_ws *ws, size_t bytes, void *stream, char *err, size_t errlen) {
    if (ws->buf && ws->bytes >= bytes) return 0;
    if (ws->buf) {
        /* Queued products may still read the old buffer. */
        cudaError_t e = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            return err_set(err, errlen, "attention (gemm) scratch: %s", cudaGetErrorString(e));
        }
        cudaFree(ws->buf);
        ws->buf = NULL;
        ws->bytes = 0;
    }
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        (void)cudaGetLastError();
        return err_set(err, errlen, "out of GPU memory for %zu bytes of attention scratch", bytes);
    }
    ws->buf = p;
    ws->bytes = bytes;
    return 0;
}

void attn_gemm_ws_free(attn_gemm_ws *ws) {
    if (ws->buf) cudaFree(ws->buf);
    ws->buf = NULL;
    ws->bytes = 0;
}

int attn_gemm_forward(const attn_gemm_plan *p, attn_gemm_ws *ws, gemm_ctx *g, gemm_type type,
                      float *out, const float *q, const float *k, const float *v,
                      const int *lengths, void *stream, char *err, size_t errlen) {
    if (ag_check(p, ws, type, false, err, errlen) != 0) return -1;
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    const size_t T = (size_t)p->T, HS = (size_t)p->HS, G = (size_t)p->group;
    const size_t qrow = (size_t)p->NH * HS, kvrow = (size_t)p->NKV * HS;
    const size_t nq = (size_t)p->B * T * qrow, nkv = (size_t)p->B * T * kvrow;
    ag_regions r = ag_regions_of(p, ws);
    if (ag_convert(type, r.q, q, nq, stream, err, errlen) != 0 ||
        ag_convert(type, r.k, k, nkv, stream, err, errlen) != 0 ||
        ag_convert(type, r.v, v, nkv, stream, err, errlen) != 0)
        return -1;
    for (size_t b = 0; b < (size_t)p->B; b++)
        for (size_t j = 0; j < G; j++)
            for (int g0 = 0; g0 < p->NKV; g0 += p->chunk_heads) {
                int nh = p->NKV - g0 < p->chunk_heads ? p->NKV - g0 : p->chunk_heads;
                size_t qo = b * T * qrow + ((size_t)g0 * G + j) * HS;
                size_t ko = b * T * kvrow + (size_t)g0 * HS;
                /* S = scale Q K^T: the scale rides on alpha, as cpu.c's sgemm. */
                if (gemm_run_strided_batched(g, type, false, true, T, T, HS, p->scale, r.q + qo,
                                             qrow, G * HS, r.k + ko, kvrow, HS, 0.0f, r.s, p->ld,
                                             p->pair_elems, (size_t)nh, err, errlen) != 0 ||
                    ag_launch_softmax(p, type, r.s, r.p, nh, lengths, (int)b, false, st, err,
                                      errlen) != 0 ||
                    gemm_run_strided_batched(g, type, false, false, T, HS, T, 1.0f, r.p, p->ld,
                                             p->pair_elems, r.v + ko, kvrow, HS, 0.0f, out + qo,
                                             qrow, G * HS, (size_t)nh, err, errlen) != 0)
                    return -1;
            }
    return 0;
}

int attn_gemm_backward(const attn_gemm_plan *p, attn_gemm_ws *ws, gemm_ctx *g, gemm_type type,
                       float *dq, float *dk, float *dv, const float *dout, const float *q,
                       const float *k, const float *v, const int *lengths, void *stream,
                       char *err, size_t errlen) {
    if (ag_check(p, ws, type, true, err, errlen) != 0) return -1;
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    const size_t T = (size_t)p->T, HS = (size_t)p->HS, G = (size_t)p->group;
    const size_t qrow = (size_t)p->NH * HS, kvrow = (size_t)p->NKV * HS;
    const size_t nq = (size_t)p->B * T * qrow, nkv = (size_t)p->B * T * kvrow;
    const size_t pe = p->pair_elems, ld = p->ld;
    ag_regions r = ag_regions_of(p, ws);
    if (ag_convert(type, r.q, q, nq, stream, err, errlen) != 0 ||
        ag_convert(type, r.k, k, nkv, stream, err, errlen) != 0 ||
        ag_convert(type, r.v, v, nkv, stream, err, errlen) != 0 ||
        ag_convert(type, r.dout, dout, nq, stream, err, errlen) != 0)
        return -1;
    for (size_t b = 0; b < (size_t)p->B; b++)
        for (size_t j = 0; j < G; j++)
            for (int g0 = 0; g0 < p->NKV; g0 += p->chunk_heads) {
                size_t nh = (size_t)(p->NKV - g0 < p->chunk_heads ? p->NKV - g0 : p->chunk_heads);
                size_t qo = b * T * qrow + ((size_t)g0 * G + j) * HS;
                size_t ko = b * T * kvrow + (size_t)g0 * HS;
                /* P as the forward has it, but zero on rows past the length. */
                if (gemm_run_strided_batched(g, type, false, true, T, T, HS, p->scale, r.q + qo,
                                             qrow, G * HS, r.k + ko, kvrow, HS, 0.0f, r.s, ld, pe,
                                             nh, err, errlen) != 0 ||
                    ag_launch_softmax(p, type, r.s, r.p, (int)nh, lengths, (int)b, true, st, err,
                                      errlen) != 0)
                    return -1;
                /* dV += P^T dO, before P becomes dS. */
                if (gemm_run_strided_batched(g, type, true, false, T, HS, T, 1.0f, r.p, ld, pe,
                                             r.dout + qo, qrow, G * HS, 1.0f, dv + ko, kvrow, HS,
                                             nh, err, errlen) != 0)
                    return -1;
                /* dP = dO V^T into S's place; then dS over P. */
                if (gemm_run_strided_batched(g, type, false, true, T, T, HS, 1.0f, r.dout + qo,
                                             qrow, G * HS, r.v + ko, kvrow, HS, 0.0f, r.s, ld, pe,
                                             nh, err, errlen) != 0 ||
                    ag_launch_dsoftmax(p, type, r.s, r.p, (int)nh, lengths, (int)b, st, err,
                                       errlen) != 0)
                    return -1;
                /* dQ += scale dS K; dK += scale dS^T Q. */
                if (gemm_run_strided_batched(g, type, false, false, T, HS, T, p->scale, r.p, ld,
                                             pe, r.k + ko, kvrow, HS, 1.0f, dq + qo, qrow,
                                             G * HS, nh, err, errlen) != 0 ||
                    gemm_run_strided_batched(g, type, true, false, T, HS, T, p->scale, r.p, ld,
                                             pe, r.q + qo, qrow, G * HS, 1.0f, dk + ko, kvrow,
                                             HS, nh, err, errlen) != 0)
                    return -1;
            }
    return 0;
}
