/* attention.cu - causal, padding-masked, grouped-query attention on the GPU
 * (backend.h attention / attention_backward), flash-style in fp32: tiles
 * of 32 queries and 32 keys in shared memory, an online softmax, and no
 * T x T matrix in global memory. attn_plan.h gives the geometry and the
 * reasons for it; cpu.c is the reference these kernels are tested against.
 *
 * Inside a block a warp owns R consecutive rows (query rows, or keys in the
 * dkv kernel) and its 32 lanes the 32 columns of the other tile: a lane
 * computes the dot products of its column with the warp's R rows, reading
 * the rows as shared-memory broadcasts and its column from a tile whose
 * rows are padded by one float (no bank conflicts). For the products that
 * follow (P V and the like) lane l owns head dimensions l, l + 32, ...
 * (NV of them, a template parameter) in registers. */
#include "worker/engine/cuda/compat.cuh"

#include "worker/engine/cuda/attn_plan.h"
#include "worker/engine/cuda/kernels.h"

#include <math.h>
#include <stdio.h>

namespace {

struct attn_args {
    const float *q, *k, *v, *dout;
    const int *lengths;
    float *out;     /* forward: the output; backward: dq */
    float *dk, *dv; /* backward */
    float *stat_l;  /* stats: logsumexp per live row of the chunk */
    float *stat_d;  /* stats: rowsum(dO * O) */
    size_t pair0, pair1;
    int T, NH, NKV, HS, group;
    unsigned tiles;
    float scale;
};

__device__ __forceinline__ float attn_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(CU_FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float attn_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(CU_FULL_MASK, v, o);
    return v;
}

/* The sequence's length clamped to [1, T], so that a bad length cannot
 * send a kernel outside the tensors. */
__device__ __forceinline__ int attn_len(const int *lengths, int b, int T) {
    int len = lengths[b];
    return len < 1 ? 1 : len > T ? T : len;
}

/* dst (rows, ld) = rows of HS floats from src (row stride src_stride);
 * rows at or past nvalid are zero, so that products over a partial tile
 * never read what an earlier tile (or uninitialised memory) left there. */
__device__ void attn_load_rows(float *dst, int ld, const float *src, size_t src_stride,
                               int rows, int nvalid, int HS) {
    int n = rows * HS;
    for (int e = (int)threadIdx.x; e < n; e += (int)blockDim.x) {
        int r = e / HS, d = e - r * HS;
        dst[r * ld + d] = r < nvalid ? src[(size_t)r * src_stride + (size_t)d] : 0.0f;
    }
}

/* Forward over one query tile (block: ATTN_QWARPS warps of ATTN_QROWS
 * rows). With STATS (the backward's first pass) it writes each live row's
 * logsumexp and rowsum(dO * O) instead of the output, and skips blocks
 * whose rows are all padding. Row t attends to keys j < live(t):
 * t + 1 below the length, the whole length for padding rows. */
template <int NV, bool STATS>
__global__ void attn_forward_kernel(attn_args a) {
    constexpr int R = ATTN_QROWS, QT = ATTN_TILE, KT = ATTN_TILE;
    CU_DYN_SMEM(float, smem);
    const int HS = a.HS, ld = HS + 1, T = a.T;
    float *qs = smem;            /* (QT, HS) */
    float *ks = qs + QT * HS;    /* (KT, HS + 1) */
    float *vs = ks + KT * ld;    /* (KT, HS) */
    float *ps = vs + KT * HS;    /* (QT, KT) */
    int b, h;
    unsigned tile;
    attn_block_query(a.pair0, blockIdx.x, blockIdx.y, a.NH, a.tiles, &b, &h, &tile);
    const int len = attn_len(a.lengths, b, T), t0 = (int)tile * QT;
    if (STATS && t0 >= len) return;
    const int rows = T - t0 < QT ? T - t0 : QT;
    const int kend = t0 + QT < len ? t0 + QT : len;
    const size_t qstride = (size_t)a.NH * (size_t)HS, kvstride = (size_t)a.NKV * (size_t)HS;
    const size_t qoff = ((size_t)b * (size_t)T + (size_t)t0) * qstride + (size_t)h * (size_t)HS;
    const size_t kvoff = (size_t)b * (size_t)T * kvstride + (size_t)(h / a.group) * (size_t)HS;
    const int warp = (int)threadIdx.x / ATTN_WARP, lane = (int)threadIdx.x % ATTN_WARP;
    const int row0 = warp * R;

    attn_load_rows(qs, HS, a.q + qoff, qstride, QT, rows, HS);
    float m[R], l[R], acc[R][NV];
    int live[R];
    for (int r = 0; r < R; r++) {
        int t = t0 + row0 + r;
        live[r] = t >= T ? 0 : t < len ? t + 1 : len;
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int i = 0; i < NV; i++) acc[r][i] = 0.0f;
    }
    for (int j0 = 0; j0 < kend; j0 += KT) {
        const int nk = kend - j0 < KT ? kend - j0 : KT;
        __syncthreads(); /* the previous tile's readers are done */
        attn_load_rows(ks, ld, a.k + kvoff + (size_t)j0 * kvstride, kvstride, KT, nk, HS);
        attn_load_rows(vs, HS, a.v + kvoff + (size_t)j0 * kvstride, kvstride, KT, nk, HS);
        __syncthreads();
        float s[R];
        for (int r = 0; r < R; r++) s[r] = 0.0f;
        const float *kcol = ks + lane * ld, *qrow = qs + row0 * HS;
        for (int d = 0; d < HS; d++) {
            float kd = kcol[d];
            for (int r = 0; r < R; r++) s[r] += qrow[r * HS + d] * kd;
        }
        const int j = j0 + lane;
        for (int r = 0; r < R; r++) {
            float sv = j < live[r] ? s[r] * a.scale : -INFINITY;
            float tmax = attn_warp_max(sv);
            float p = 0.0f;
            /* tmax is the same in every lane: the branch is warp-uniform. */
            if (tmax != -INFINITY) {
                float mnew = fmaxf(m[r], tmax);
                float corr = expf(m[r] - mnew);
                p = j < live[r] ? expf(sv - mnew) : 0.0f;
                l[r] = l[r] * corr + attn_warp_sum(p);
                for (int i = 0; i < NV; i++) acc[r][i] *= corr;
                m[r] = mnew;
            }
            ps[(row0 + r) * KT + lane] = p;
        }
        __syncthreads();
        for (int jj = 0; jj < nk; jj++) {
            float vv[NV];
            for (int i = 0; i < NV; i++) {
                int d = lane + ATTN_WARP * i;
                vv[i] = d < HS ? vs[jj * HS + d] : 0.0f;
            }
            for (int r = 0; r < R; r++) {
                float p = ps[(row0 + r) * KT + jj];
                for (int i = 0; i < NV; i++) acc[r][i] += p * vv[i];
            }
        }
    }
    for (int r = 0; r < R; r++) {
        int t = t0 + row0 + r;
        if (t >= T) break;
        float inv = 1.0f / l[r];
        size_t o = qoff + (size_t)(row0 + r) * qstride;
        if (!STATS) {
            for (int i = 0; i < NV; i++) {
                int d = lane + ATTN_WARP * i;
                if (d < HS) a.out[o + (size_t)d] = acc[r][i] * inv;
            }
            continue;
        }
        if (t >= len) break; /* rows past the length get no gradient */
        float dot = 0.0f;
        for (int i = 0; i < NV; i++) {
            int d = lane + ATTN_WARP * i;
            if (d < HS) dot += a.dout[o + (size_t)d] * (acc[r][i] * inv);
        }
        dot = attn_warp_sum(dot);
        if (lane == 0) {
            size_t si = ((size_t)b * (size_t)a.NH + (size_t)h - a.pair0) * (size_t)T + (size_t)t;
            a.stat_l[si] = m[r] + logf(l[r]);
            a.stat_d[si] = dot;
        }
    }
}

/* dq of one query tile: per key tile P = exp(scale q.k - L) on live keys,
 * dP = dO.v, dS = P (dP - D), acc += dS K; then dq += scale acc. Rows at or
 * past the length are skipped. */
template <int NV>
__global__ void attn_dq_kernel(attn_args a) {
    constexpr int R = ATTN_QROWS, QT = ATTN_TILE, KT = ATTN_TILE;
    CU_DYN_SMEM(float, smem);
    const int HS = a.HS, ld = HS + 1, T = a.T;
    float *qs = smem;            /* (QT, HS) */
    float *dos = qs + QT * HS;   /* (QT, HS) */
    float *ks = dos + QT * HS;   /* (KT, HS + 1) */
    float *vs = ks + KT * ld;    /* (KT, HS + 1) */
    float *dss = vs + KT * ld;   /* (QT, KT) */
    int b, h;
    unsigned tile;
    attn_block_query(a.pair0, blockIdx.x, blockIdx.y, a.NH, a.tiles, &b, &h, &tile);
    const int len = attn_len(a.lengths, b, T), t0 = (int)tile * QT;
    if (t0 >= len) return;
    const int rows = len - t0 < QT ? len - t0 : QT;
    const int kend = t0 + rows;
    const size_t qstride = (size_t)a.NH * (size_t)HS, kvstride = (size_t)a.NKV * (size_t)HS;
    const size_t qoff = ((size_t)b * (size_t)T + (size_t)t0) * qstride + (size_t)h * (size_t)HS;
    const size_t kvoff = (size_t)b * (size_t)T * kvstride + (size_t)(h / a.group) * (size_t)HS;
    const size_t sbase = ((size_t)b * (size_t)a.NH + (size_t)h - a.pair0) * (size_t)T;
    const int warp = (int)threadIdx.x / ATTN_WARP, lane = (int)threadIdx.x % ATTN_WARP;
    const int row0 = warp * R;

    attn_load_rows(qs, HS, a.q + qoff, qstride, QT, rows, HS);
    attn_load_rows(dos, HS, a.dout + qoff, qstride, QT, rows, HS);
    float lse[R], dsum[R], acc[R][NV];
    int live[R];
    for (int r = 0; r < R; r++) {
        int t = t0 + row0 + r;
        live[r] = t < len ? t + 1 : 0;
        lse[r] = t < len ? a.stat_l[sbase + (size_t)t] : 0.0f;
        dsum[r] = t < len ? a.stat_d[sbase + (size_t)t] : 0.0f;
        for (int i = 0; i < NV; i++) acc[r][i] = 0.0f;
    }
    for (int j0 = 0; j0 < kend; j0 += KT) {
        const int nk = kend - j0 < KT ? kend - j0 : KT;
        __syncthreads();
        attn_load_rows(ks, ld, a.k + kvoff + (size_t)j0 * kvstride, kvstride, KT, nk, HS);
        attn_load_rows(vs, ld, a.v + kvoff + (size_t)j0 * kvstride, kvstride, KT, nk, HS);
        __syncthreads();
        float s[R], dp[R];
        for (int r = 0; r < R; r++) s[r] = dp[r] = 0.0f;
        const float *kcol = ks + lane * ld, *vcol = vs + lane * ld;
        const float *qrow = qs + row0 * HS, *dorow = dos + row0 * HS;
        for (int d = 0; d < HS; d++) {
            float kd = kcol[d], vd = vcol[d];
            for (int r = 0; r < R; r++) {
                s[r] += qrow[r * HS + d] * kd;
                dp[r] += dorow[r * HS + d] * vd;
            }
        }
        const int j = j0 + lane;
        for (int r = 0; r < R; r++) {
            float p = j < live[r] ? expf(s[r] * a.scale - lse[r]) : 0.0f;
            dss[(row0 + r) * KT + lane] = p * (dp[r] - dsum[r]);
        }
        __syncthreads();
        for (int jj = 0; jj < nk; jj++) {
            float kv[NV];
            for (int i = 0; i < NV; i++) {
                int d = lane + ATTN_WARP * i;
                kv[i] = d < HS ? ks[jj * ld + d] : 0.0f;
            }
            for (int r = 0; r < R; r++) {
                float ds = dss[(row0 + r) * KT + jj];
                for (int i = 0; i < NV; i++) acc[r][i] += ds * kv[i];
            }
        }
    }
    for (int r = 0; r < R; r++) {
        if (t0 + row0 + r >= len) break;
        size_t o = qoff + (size_t)(row0 + r) * qstride;
        for (int i = 0; i < NV; i++) {
            int d = lane + ATTN_WARP * i;
            if (d < HS) a.out[o + (size_t)d] += a.scale * acc[r][i];
        }
    }
}

/* dk and dv of one key tile of kv head g: over the chunk's query heads of
 * the group and the live query rows i >= the tile's first key, P and dS as
 * in attn_dq_kernel, then dv += P^T dO and dk += scale dS^T Q. A warp owns
 * ATTN_KROWS keys; lanes are query rows. */
template <int NV>
__global__ void attn_dkv_kernel(attn_args a) {
    constexpr int R = ATTN_KROWS, QT = ATTN_TILE, KT = ATTN_TILE;
    CU_DYN_SMEM(float, smem);
    const int HS = a.HS, ld = HS + 1, T = a.T;
    float *ks = smem;            /* (KT, HS) */
    float *vs = ks + KT * HS;    /* (KT, HS) */
    float *qs = vs + KT * HS;    /* (QT, HS + 1) */
    float *dos = qs + QT * ld;   /* (QT, HS + 1) */
    float *ps = dos + QT * ld;   /* (KT, QT) */
    float *dss = ps + KT * QT;   /* (KT, QT) */
    float *ls = dss + KT * QT;   /* (QT) */
    float *dsums = ls + QT;      /* (QT) */
    int b, g;
    unsigned tile;
    attn_block_key(a.pair0 / (size_t)a.group, blockIdx.x, blockIdx.y, a.NKV, &b, &g, &tile);
    const int len = attn_len(a.lengths, b, T), j0 = (int)tile * KT;
    if (j0 >= len) return; /* no live row reads these keys */
    const int nk = len - j0 < KT ? len - j0 : KT;
    const size_t qstride = (size_t)a.NH * (size_t)HS, kvstride = (size_t)a.NKV * (size_t)HS;
    const size_t kvoff = ((size_t)b * (size_t)T + (size_t)j0) * kvstride + (size_t)g * (size_t)HS;
    const int warp = (int)threadIdx.x / ATTN_WARP, lane = (int)threadIdx.x % ATTN_WARP;
    const int row0 = warp * R;
    int h0, h1;
    attn_chunk_heads(a.pair0, a.pair1, b, g, a.NH, a.group, &h0, &h1);

    attn_load_rows(ks, HS, a.k + kvoff, kvstride, KT, nk, HS);
    attn_load_rows(vs, HS, a.v + kvoff, kvstride, KT, nk, HS);
    float dk[R][NV], dv[R][NV];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < NV; i++) dk[r][i] = dv[r][i] = 0.0f;
    for (int h = h0; h < h1; h++) {
        const size_t qbase = (size_t)b * (size_t)T * qstride + (size_t)h * (size_t)HS;
        const size_t sbase = ((size_t)b * (size_t)a.NH + (size_t)h - a.pair0) * (size_t)T;
        for (int i0 = j0; i0 < len; i0 += QT) {
            const int nq = len - i0 < QT ? len - i0 : QT;
            __syncthreads();
            attn_load_rows(qs, ld, a.q + qbase + (size_t)i0 * qstride, qstride, QT, nq, HS);
            attn_load_rows(dos, ld, a.dout + qbase + (size_t)i0 * qstride, qstride, QT, nq, HS);
            if (threadIdx.x < (unsigned)QT) {
                int x = (int)threadIdx.x;
                ls[x] = x < nq ? a.stat_l[sbase + (size_t)(i0 + x)] : 0.0f;
                dsums[x] = x < nq ? a.stat_d[sbase + (size_t)(i0 + x)] : 0.0f;
            }
            __syncthreads();
            float s[R], dp[R];
            for (int r = 0; r < R; r++) s[r] = dp[r] = 0.0f;
            const float *qcol = qs + lane * ld, *docol = dos + lane * ld;
            const float *krow = ks + row0 * HS, *vrow = vs + row0 * HS;
            for (int d = 0; d < HS; d++) {
                float qd = qcol[d], od = docol[d];
                for (int r = 0; r < R; r++) {
                    s[r] += krow[r * HS + d] * qd;
                    dp[r] += vrow[r * HS + d] * od;
                }
            }
            const int i = i0 + lane;
            for (int r = 0; r < R; r++) {
                int j = j0 + row0 + r;
                /* i < len and j <= i also give j < len */
                float p = i < len && j <= i ? expf(s[r] * a.scale - ls[lane]) : 0.0f;
                ps[(row0 + r) * QT + lane] = p;
                dss[(row0 + r) * QT + lane] = p * (dp[r] - dsums[lane]);
            }
            __syncthreads();
            for (int ii = 0; ii < nq; ii++) {
                float qv[NV], ov[NV];
                for (int x = 0; x < NV; x++) {
                    int d = lane + ATTN_WARP * x;
                    qv[x] = d < HS ? qs[ii * ld + d] : 0.0f;
                    ov[x] = d < HS ? dos[ii * ld + d] : 0.0f;
                }
                for (int r = 0; r < R; r++) {
                    float p = ps[(row0 + r) * QT + ii], ds = dss[(row0 + r) * QT + ii];
                    for (int x = 0; x < NV; x++) {
                        dv[r][x] += p * ov[x];
                        dk[r][x] += ds * qv[x];
                    }
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        if (row0 + r >= nk) break;
        size_t o = kvoff + (size_t)(row0 + r) * kvstride;
        for (int x = 0; x < NV; x++) {
            int d = lane + ATTN_WARP * x;
            if (d < HS) {
                a.dk[o + (size_t)d] += a.scale * dk[r][x];
                a.dv[o + (size_t)d] += dv[r][x];
            }
        }
    }
}

/* Readies kernel for launch's geometry, raising its shared-memory limit
 * first when the launch needs more than the default. 1 when there is
 * something to launch, 0 for an empty grid, -1 with err when the limit
 * cannot be raised (nothing launched). */
int attn_prepare(const void *kernel, const attn_launch *launch, char *err, size_t errlen) {
    if (launch->grid[0] == 0 || launch->grid[1] == 0) return 0;
    if (launch->optin) {
        cudaError_t rc = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              (int)launch->smem);
        if (rc != cudaSuccess) {
            snprintf(err, errlen, "attention: cannot raise shared memory to %zu bytes: %s",
                     launch->smem, cudaGetErrorString(rc));
            return -1;
        }
    }
    return 1;
}

/* attn_launch's geometry as CUDA's dim3. */
dim3 attn_grid(const attn_launch &l) { return dim3(l.grid[0], l.grid[1], l.grid[2]); }
dim3 attn_block(const attn_launch &l) { return dim3(l.block[0], l.block[1], l.block[2]); }

/* CU_LAUNCH needs the kernel's name (the emulator wraps it in a lambda),
 * so each launch site names its kernel twice: to prepare and to launch. */
#define ATTN_LAUNCH(kernel, launch, stream, args, err, errlen)                                  \
    do {                                                                                       \
        int attn_rc_ = attn_prepare(reinterpret_cast<const void *>(kernel), &(launch), err,    \
                                    errlen);                                                   \
        if (attn_rc_ < 0) return -1;                                                           \
        if (attn_rc_ > 0)                                                                      \
            CU_LAUNCH(kernel, attn_grid(launch), attn_block(launch), (launch).smem, stream,    \
                      args);                                                                   \
    } while (0)

/* The arguments every attention kernel shares; the caller fills in the
 * outputs, dout and the statistics' place. */
attn_args attn_make_args(const attn_plan &p, const float *q, const float *k, const float *v,
                         const int *lengths) {
    attn_args a = {};
    a.q = q;
    a.k = k;
    a.v = v;
    a.lengths = lengths;
    a.T = p.T;
    a.NH = p.NH;
    a.NKV = p.NKV;
    a.HS = p.HS;
    a.group = p.group;
    a.tiles = p.tiles;
    a.scale = 1.0f / sqrtf((float)p.HS);
    return a;
}

/* The forward for NV head dimensions per lane: one launch, no scratch. */
template <int NV>
int attn_forward_nv(const attn_plan &p, attn_args a, cudaStream_t stream, char *err,
                    size_t errlen) {
    ATTN_LAUNCH((attn_forward_kernel<NV, false>), p.forward, stream, a, err, errlen);
    return 0;
}

/* The backward's chunks in order, each as statistics, then dq, then dk/dv
 * (stream order makes each wait for the one before). 0, or -1 with err if
 * a kernel's shared memory cannot be raised: all three are readied before
 * the first launch (every chunk needs the same), so nothing is enqueued. */
template <int NV>
int attn_backward_nv(const attn_plan &p, attn_args a, cudaStream_t stream, char *err,
                     size_t errlen) {
    attn_chunk first;
    attn_plan_chunk(&p, 0, &first);
    if (attn_prepare(reinterpret_cast<const void *>(attn_forward_kernel<NV, true>), &first.stats,
                     err, errlen) < 0 ||
        attn_prepare(reinterpret_cast<const void *>(attn_dq_kernel<NV>), &first.dq, err,
                     errlen) < 0 ||
        attn_prepare(reinterpret_cast<const void *>(attn_dkv_kernel<NV>), &first.dkv, err,
                     errlen) < 0)
        return -1;
    for (size_t c = 0; c < p.chunks; c++) {
        attn_chunk ch;
        attn_plan_chunk(&p, c, &ch);
        a.pair0 = ch.pair0;
        a.pair1 = ch.pair1;
        ATTN_LAUNCH((attn_forward_kernel<NV, true>), ch.stats, stream, a, err, errlen);
        ATTN_LAUNCH(attn_dq_kernel<NV>, ch.dq, stream, a, err, errlen);
        ATTN_LAUNCH(attn_dkv_kernel<NV>, ch.dkv, stream, a, err, errlen);
    }
    return 0;
}

} /* namespace */

extern "C" int cuk_attention(float *out, const float *q, const float *k, const float *v,
                             const int *lengths, int B, int T, int NH, int NKV, int HS,
                             float *scratch, void *stream, char *err, size_t errlen) {
    (void)scratch; /* the forward keeps everything in shared memory */
    attn_plan p;
    if (attn_plan_make(&p, B, T, NH, NKV, HS, err, errlen)) return -1;
    attn_args a = attn_make_args(p, q, k, v, lengths);
    a.out = out;
    a.pair1 = p.pairs;
    cudaStream_t s = (cudaStream_t)stream;
    switch (p.nv) {
    case 1: return attn_forward_nv<1>(p, a, s, err, errlen);
    case 2: return attn_forward_nv<2>(p, a, s, err, errlen);
    case 4: return attn_forward_nv<4>(p, a, s, err, errlen);
    default: return attn_forward_nv<8>(p, a, s, err, errlen);
    }
}

extern "C" int cuk_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                      const float *q, const float *k, const float *v,
                                      const int *lengths, int B, int T, int NH, int NKV, int HS,
                                      float *scratch, void *stream, char *err, size_t errlen) {
    attn_plan p;
    if (attn_plan_make(&p, B, T, NH, NKV, HS, err, errlen)) return -1;
    attn_args a = attn_make_args(p, q, k, v, lengths);
    a.dout = dout;
    a.out = dq;
    a.dk = dk;
    a.dv = dv;
    a.stat_l = scratch;
    a.stat_d = scratch + p.chunk_pairs * (size_t)T;
    cudaStream_t s = (cudaStream_t)stream;
    switch (p.nv) {
    case 1: return attn_backward_nv<1>(p, a, s, err, errlen);
    case 2: return attn_backward_nv<2>(p, a, s, err, errlen);
    case 4: return attn_backward_nv<4>(p, a, s, err, errlen);
    default: return attn_backward_nv<8>(p, a, s, err, errlen);
    }
}
