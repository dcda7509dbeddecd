/* kernels.cu - strata's own CUDA kernels (kernels.h), every backend op but
 * the matrix products (gemm.cu) and attention (attention.cu). Each kernel
 * does cpu.c's arithmetic for its op, operation for operation where that
 * matters:
 *   - float products and sums that cpu.c keeps separate are kept separate
 *     here (cuk_mul / cuk_add / cuk_sub: no contraction into FMA), so the
 *     elementwise ops, RoPE and AdamW give cpu.c's bits, apart from expf
 *     (the GPU's, within 2 ulp) against cpu.c's polynomial exp;
 *   - row reductions (RMSNorm's mean of squares, cross-entropy's sum of
 *     exps, sumsq) accumulate in double as cpu.c does, reduced over the
 *     block in a different order than cpu.c's serial one: the double sums
 *     differ in their last bits, so the float results rounded from them
 *     almost always agree exactly and otherwise by one ulp;
 *   - sums over rows into one weight gradient (RMSNorm's dweight,
 *     embedding_backward) use atomicAdd on float, so their order (and last
 *     bits) vary from run to run, as with cuBLAS's split-K products.
 * Launch geometry comes from launch.h's plans, which tests check on the CPU.
 * Elementwise kernels take four floats at a time when every pointer is
 * 16-byte aligned (the kernel's template K), one otherwise. */
#include "worker/engine/cuda/compat.cuh"
#include "worker/engine/cuda/kernels.h"
#include "worker/engine/cuda/launch.h"

#include <math.h>
#include <stdint.h>

/* --- device helpers --------------------------------------------------------- */

/* IEEE float operations that the compiler may not fuse into an FMA, so the
 * device rounds where cpu.c (built with -ffp-contract=off) rounds. */
__device__ __forceinline__ float cuk_mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
__device__ __forceinline__ float cuk_add(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
__device__ __forceinline__ float cuk_sub(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

/* K consecutive floats, aligned so that a load or store of one is a single
 * vector access (ld.global.v4.f32 for K = 4). */
template <int K> struct alignas(sizeof(float) * K) cuk_vec {
    float v[K];
};

template <int K> __device__ __forceinline__ cuk_vec<K> cuk_ld(const float *p) {
    return *reinterpret_cast<const cuk_vec<K> *>(p);
}
template <int K> __device__ __forceinline__ void cuk_st(float *p, const cuk_vec<K> &v) {
    *reinterpret_cast<cuk_vec<K> *>(p) = v;
}

/* Sum over the warp, every lane getting the same total. */
template <class T> __device__ __forceinline__ T cuk_warp_sum(T v) {
    for (int o = CU_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(CU_FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float cuk_warp_max(float v) {
    for (int o = CU_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(CU_FULL_MASK, v, o));
    return v;
}

/* Sum of v over the block (blockDim.x a multiple of 32, as the plans make
 * it), returned to every thread: warps sum, lane 0s park their sums in
 * part (32 entries of the kernel's shared memory), then every warp sums the
 * parked values in the same order, so all threads hold identical bits
 * without a broadcast. The leading barrier lets a kernel call this again
 * with the same part. */
template <class T> __device__ __forceinline__ T cuk_block_sum(T v, T *part) {
    unsigned lane = threadIdx.x % CU_WARP, warp = threadIdx.x / CU_WARP;
    v = cuk_warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    T t = lane < blockDim.x / CU_WARP ? part[lane] : T(0);
    return cuk_warp_sum(t);
}

/* Maximum over the block, as cuk_block_sum. */
__device__ __forceinline__ float cuk_block_max(float v, float *part) {
    unsigned lane = threadIdx.x % CU_WARP, warp = threadIdx.x / CU_WARP;
    v = cuk_warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float t = lane < blockDim.x / CU_WARP ? part[lane] : -INFINITY;
    return cuk_warp_max(t);
}

/* backend.h's backend_mix64 and backend_dropout_keep, for the device (the
 * header's are static inline C, not device code). Same constants, same
 * shifts: the masks agree bit for bit (the tests check it). */
__device__ __forceinline__ uint64_t cuk_mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
__device__ __forceinline__ bool cuk_dropout_keep(uint64_t key, uint64_t i, uint64_t threshold) {
    return (cuk_mix64(key ^ i) >> 11) >= threshold;
}

/* inf and NaN both fail |v| <= FLT_MAX. */
__device__ __forceinline__ bool cuk_finite(float v) { return fabsf(v) <= 3.40282347e38f; }

/* --- elementwise ops ------------------------------------------------------- */

/* The grid-stride loop of launch_elementwise: item u covers elements
 * [u*K, u*K + K); a whole item goes through op.run<K> (vector accesses),
 * the ragged last one element by element. Op holds the pointers and
 * scalars; run<K>(i) does elements i .. i+K-1. */
template <int K, class Op> __global__ void cuk_map_kernel(Op op, size_t n, size_t items) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u < items; u += stride) {
        size_t i = u * K;
        if (i + K <= n) {
            op.template run<K>(i);
        } else {
            for (; i < n; i++) op.template run<1>(i);
        }
    }
}

static cudaStream_t cuk_stream(void *stream) { return (cudaStream_t)stream; }
static dim3 cuk_dim(const unsigned v[3]) { return dim3(v[0], v[1], v[2]); }
static bool cuk_aligned(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Plans and launches op over n elements, four at a time when vec4 (every
 * pointer op touches is 16-byte aligned). -1 with err if the plan refuses
 * n; nothing is enqueued for n = 0. */
template <class Op>
static int cuk_map(const Op &op, size_t n, bool vec4, void *stream, char *err, size_t errlen) {
    launch_plan p;
    if (launch_elementwise(n, vec4 ? 4 : 1, &p, err, errlen) != 0) return -1;
    if (p.grid[0] == 0) return 0;
    if (vec4)
        CU_LAUNCH((cuk_map_kernel<4, Op>), cuk_dim(p.grid), cuk_dim(p.block), p.smem,
                  cuk_stream(stream), op, n, p.items);
    else
        CU_LAUNCH((cuk_map_kernel<1, Op>), cuk_dim(p.grid), cuk_dim(p.block), p.smem,
                  cuk_stream(stream), op, n, p.items);
    return 0;
}

struct cuk_scale_op {
    float *x;
    float a;
    template <int K> __device__ void run(size_t i) const {
        cuk_vec<K> v = cuk_ld<K>(x + i);
        for (int k = 0; k < K; k++) v.v[k] = cuk_mul(v.v[k], a);
        cuk_st<K>(x + i, v);
    }
};

int cuk_scale(float *x, size_t n, float a, void *stream, char *err, size_t errlen) {
    cuk_scale_op op = {x, a};
    return cuk_map(op, n, cuk_aligned(x), stream, err, errlen);
}

struct cuk_residual_op {
    float *x;
    const float *y;
    template <int K> __device__ void run(size_t i) const {
        cuk_vec<K> a = cuk_ld<K>(x + i), b = cuk_ld<K>(y + i);
        for (int k = 0; k < K; k++) a.v[k] = cuk_add(a.v[k], b.v[k]);
        cuk_st<K>(x + i, a);
    }
};

int cuk_residual_add(float *x, const float *y, size_t n, void *stream, char *err,
                     size_t errlen) {
    cuk_residual_op op = {x, y};
    return cuk_map(op, n, cuk_aligned(x) && cuk_aligned(y), stream, err, errlen);
}

/* gate = silu(gate) * up as cpu.c rounds it: (g / (1 + exp(-g))) * u. */
struct cuk_swiglu_op {
    float *gate;
    const float *up;
    template <int K> __device__ void run(size_t i) const {
        cuk_vec<K> g = cuk_ld<K>(gate + i), u = cuk_ld<K>(up + i);
        for (int k = 0; k < K; k++)
            g.v[k] = cuk_mul(g.v[k] / cuk_add(1.0f, expf(-g.v[k])), u.v[k]);
        cuk_st<K>(gate + i, g);
    }
};

int cuk_swiglu(float *gate, const float *up, size_t n, void *stream, char *err, size_t errlen) {
    cuk_swiglu_op op = {gate, up};
    return cuk_map(op, n, cuk_aligned(gate) && cuk_aligned(up), stream, err, errlen);
}

/* With s = sigmoid(g): dup = d (g s), dgate = d u (s (1 + g (1 - s))).
 * Every input is loaded before either output is stored, so dgate may be
 * dout. */
struct cuk_swiglu_bwd_op {
    float *dgate, *dup;
    const float *dout, *gate, *up;
    template <int K> __device__ void run(size_t i) const {
        cuk_vec<K> g = cuk_ld<K>(gate + i), d = cuk_ld<K>(dout + i), u = cuk_ld<K>(up + i);
        cuk_vec<K> dg, du;
        for (int k = 0; k < K; k++) {
            float sg = 1.0f / cuk_add(1.0f, expf(-g.v[k]));
            du.v[k] = cuk_mul(d.v[k], cuk_mul(g.v[k], sg));
            float dsilu = cuk_mul(sg, cuk_add(1.0f, cuk_mul(g.v[k], cuk_sub(1.0f, sg))));
            dg.v[k] = cuk_mul(cuk_mul(d.v[k], u.v[k]), dsilu);
        }
        cuk_st<K>(dup + i, du);
        cuk_st<K>(dgate + i, dg);
    }
};

int cuk_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n, void *stream, char *err, size_t errlen) {
    cuk_swiglu_bwd_op op = {dgate, dup, dout, gate, up};
    bool vec4 = cuk_aligned(dgate) && cuk_aligned(dup) && cuk_aligned(dout) &&
                cuk_aligned(gate) && cuk_aligned(up);
    return cuk_map(op, n, vec4, stream, err, errlen);
}

struct cuk_dropout_op {
    float *out;
    const float *x;
    uint64_t key, threshold;
    float scale;
    bool accumulate;
    template <int K> __device__ void run(size_t i) const {
        cuk_vec<K> v = cuk_ld<K>(x + i), o;
        if (accumulate) o = cuk_ld<K>(out + i);
        for (int k = 0; k < K; k++) {
            float kept = cuk_dropout_keep(key, (uint64_t)(i + (size_t)k), threshold)
                             ? cuk_mul(v.v[k], scale)
                             : 0.0f;
            o.v[k] = accumulate ? cuk_add(o.v[k], kept) : kept;
        }
        cuk_st<K>(out + i, o);
    }
};

int cuk_dropout(float *out, const float *x, size_t n, uint64_t key, uint64_t threshold,
                float scale, bool accumulate, void *stream, char *err, size_t errlen) {
    cuk_dropout_op op = {out, x, key, threshold, scale, accumulate};
    return cuk_map(op, n, cuk_aligned(out) && cuk_aligned(x), stream, err, errlen);
}

/* The 16-bit outputs are stored one by one (two bytes each, adjacent
 * across the warp, so still coalesced). */
struct cuk_bf16_op {
    __nv_bfloat16 *dst;
    const float *src;
    template <int K> __device__ void run(size_t i) const {
        cuk_vec<K> v = cuk_ld<K>(src + i);
        for (int k = 0; k < K; k++) dst[i + (size_t)k] = __float2bfloat16(v.v[k]);
    }
};

int cuk_to_bf16(uint16_t *dst, const float *src, size_t n, void *stream, char *err,
                size_t errlen) {
    cuk_bf16_op op = {reinterpret_cast<__nv_bfloat16 *>(dst), src};
    return cuk_map(op, n, cuk_aligned(src), stream, err, errlen);
}

struct cuk_fp16_op {
    __half *dst;
    const float *src;
    template <int K> __device__ void run(size_t i) const {
        cuk_vec<K> v = cuk_ld<K>(src + i);
        for (int k = 0; k < K; k++) dst[i + (size_t)k] = __float2half(v.v[k]);
    }
};

int cuk_to_fp16(uint16_t *dst, const float *src, size_t n, void *stream, char *err,
                size_t errlen) {
    cuk_fp16_op op = {reinterpret_cast<__half *>(dst), src};
    return cuk_map(op, n, cuk_aligned(src), stream, err, errlen);
}

/* adamw.c's per-element update, operation for operation (kernels.h). */
struct cuk_adamw_op {
    float *p;
    const float *grad;
    float *m, *v;
    float grad_scale, decay_factor, beta1, one_minus_beta1, beta2, one_minus_beta2;
    float neg_step_size, bias_correction2_sqrt, eps;
    template <int K> __device__ void run(size_t i) const {
        cuk_vec<K> pv = cuk_ld<K>(p + i), gv = cuk_ld<K>(grad + i);
        cuk_vec<K> mv = cuk_ld<K>(m + i), vv = cuk_ld<K>(v + i);
        for (int k = 0; k < K; k++) {
            float g = cuk_mul(gv.v[k], grad_scale);
            float pi = cuk_mul(pv.v[k], decay_factor);
            mv.v[k] = cuk_add(cuk_mul(mv.v[k], beta1), cuk_mul(one_minus_beta1, g));
            vv.v[k] = cuk_add(cuk_mul(vv.v[k], beta2), cuk_mul(cuk_mul(one_minus_beta2, g), g));
            float denom = cuk_add(sqrtf(vv.v[k]) / bias_correction2_sqrt, eps);
            pv.v[k] = cuk_add(pi, cuk_mul(neg_step_size, mv.v[k]) / denom);
        }
        cuk_st<K>(p + i, pv);
        cuk_st<K>(m + i, mv);
        cuk_st<K>(v + i, vv);
    }
};

int cuk_adamw(float *p, const float *grad, float *m, float *v, size_t n, float grad_scale,
              float decay_factor, float beta1, float one_minus_beta1, float beta2,
              float one_minus_beta2, float neg_step_size, float bias_correction2_sqrt, float eps,
              void *stream, char *err, size_t errlen) {
    cuk_adamw_op op = {p,     grad,         m,
                       v,     grad_scale,   decay_factor,
                       beta1, one_minus_beta1, beta2,
                       one_minus_beta2, neg_step_size, bias_correction2_sqrt,
                       eps};
    bool vec4 = cuk_aligned(p) && cuk_aligned(grad) && cuk_aligned(m) && cuk_aligned(v);
    return cuk_map(op, n, vec4, stream, err, errlen);
}

/* --- sumsq ----------------------------------------------------------------- */

/* Each thread sums its items' squares in double, the block reduces them,
 * and one atomicAdd per block lands in *sumsq: 4096 double atomics at
 * most (the plan's grid cap), nothing beside a gradient pass. A
 * non-finite element sets *nonfinite (plain stores of the same 1 by any
 * number of threads are benign). */
template <int K>
__global__ void cuk_sumsq_kernel(double *sumsq, int *nonfinite, const float *x, size_t n,
                                 size_t items) {
    __shared__ double part[32];
    size_t stride = (size_t)gridDim.x * blockDim.x;
    double s = 0.0;
    bool bad = false;
    for (size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u < items; u += stride) {
        size_t i = u * K;
        if (i + K <= n) {
            cuk_vec<K> v = cuk_ld<K>(x + i);
            for (int k = 0; k < K; k++) {
                s += (double)v.v[k] * v.v[k];
                bad |= !cuk_finite(v.v[k]);
            }
        } else {
            for (; i < n; i++) {
                s += (double)x[i] * x[i];
                bad |= !cuk_finite(x[i]);
            }
        }
    }
    if (bad) *nonfinite = 1;
    s = cuk_block_sum(s, part);
    if (threadIdx.x == 0) atomicAdd(sumsq, s);
}

int cuk_sumsq(double *sumsq, int *nonfinite, const float *x, size_t n, void *stream, char *err,
              size_t errlen) {
    bool vec4 = cuk_aligned(x);
    launch_plan p;
    if (launch_elementwise(n, vec4 ? 4 : 1, &p, err, errlen) != 0) return -1;
    if (p.grid[0] == 0) return 0;
    if (vec4)
        CU_LAUNCH(cuk_sumsq_kernel<4>, cuk_dim(p.grid), cuk_dim(p.block), p.smem,
                  cuk_stream(stream), sumsq, nonfinite, x, n, p.items);
    else
        CU_LAUNCH(cuk_sumsq_kernel<1>, cuk_dim(p.grid), cuk_dim(p.block), p.smem,
                  cuk_stream(stream), sumsq, nonfinite, x, n, p.items);
    return 0;
}

/* --- rmsnorm ---------------------------------------------------------------- */

/* sum of x^2 over a row of C floats, in double, over the block. Thread t
 * reads items t, t + blockDim.x, ... (K floats each), the mapping every row
 * kernel below uses, so a thread touches the same columns in each pass. */
template <int K>
__device__ __forceinline__ double cuk_row_sumsq(const float *xr, size_t C, double *part) {
    double s = 0.0;
    for (size_t i = (size_t)threadIdx.x * K; i < C; i += (size_t)blockDim.x * K) {
        if (i + K <= C) {
            cuk_vec<K> v = cuk_ld<K>(xr + i);
            for (int k = 0; k < K; k++) s += (double)v.v[k] * v.v[k];
        } else {
            for (size_t j = i; j < C; j++) s += (double)xr[j] * xr[j];
        }
    }
    return cuk_block_sum(s, part);
}

/* 1/sqrt(mean + eps) with the mean rounded to float first, as cpu.c and
 * Hugging Face do. */
__device__ __forceinline__ float cuk_rms_scale(double sumsq, size_t C, float eps) {
    float mean = (float)(sumsq / (double)C);
    return 1.0f / sqrtf(mean + eps);
}

/* One block per row (rows strided by gridDim.x): the mean of squares in
 * double, then out = weight * (x * scale). out may be x: every read of the
 * row precedes the reduction's barriers, every write follows them. */
template <int K>
__global__ void cuk_rmsnorm_kernel(float *out, const float *x, const float *weight, size_t N,
                                   size_t C, float eps) {
    __shared__ double part[32];
    for (size_t row = blockIdx.x; row < N; row += gridDim.x) {
        const float *xr = x + row * C;
        float *outr = out + row * C;
        float scale = cuk_rms_scale(cuk_row_sumsq<K>(xr, C, part), C, eps);
        for (size_t i = (size_t)threadIdx.x * K; i < C; i += (size_t)blockDim.x * K) {
            if (i + K <= C) {
                cuk_vec<K> v = cuk_ld<K>(xr + i), w = cuk_ld<K>(weight + i);
                for (int k = 0; k < K; k++) v.v[k] = cuk_mul(w.v[k], cuk_mul(v.v[k], scale));
                cuk_st<K>(outr + i, v);
            } else {
                for (size_t j = i; j < C; j++) outr[j] = cuk_mul(weight[j], cuk_mul(xr[j], scale));
            }
        }
    }
}

/* Row vector width: four when C is a multiple of 4 and every pointer is
 * 16-byte aligned (then so is every row), else one. */
static bool cuk_rows_vec4(size_t C, const void *a, const void *b, const void *c, const void *d) {
    return C % 4 == 0 && cuk_aligned(a) && cuk_aligned(b) && cuk_aligned(c) && cuk_aligned(d);
}

int cuk_rmsnorm(float *out, const float *x, const float *weight, size_t N, size_t C, float eps,
                void *stream, char *err, size_t errlen) {
    bool vec4 = cuk_rows_vec4(C, out, x, weight, weight);
    launch_plan p;
    if (launch_rmsnorm(N, C, vec4 ? 4 : 1, &p, err, errlen) != 0) return -1;
    if (p.grid[0] == 0) return 0;
    if (vec4)
        CU_LAUNCH(cuk_rmsnorm_kernel<4>, cuk_dim(p.grid), cuk_dim(p.block), p.smem,
                  cuk_stream(stream), out, x, weight, N, C, eps);
    else
        CU_LAUNCH(cuk_rmsnorm_kernel<1>, cuk_dim(p.grid), cuk_dim(p.block), p.smem,
                  cuk_stream(stream), out, x, weight, N, C, eps);
    return 0;
}

/* One element of the backward: dx += r (w dy) - coef x (when dx), and the
 * dweight partial += dy (x r) (when DW). */
template <bool DW>
__device__ __forceinline__ void cuk_rmsnorm_bwd_one(float *dxr, double *partial, size_t j,
                                                    float x, float w, float dy, float r,
                                                    float coef) {
    if (dxr) dxr[j] = cuk_add(dxr[j], cuk_sub(cuk_mul(r, cuk_mul(w, dy)), cuk_mul(coef, x)));
    if (DW) partial[j] += (double)cuk_mul(dy, cuk_mul(x, r));
}

/* Rows strided over the blocks as in the forward. Per row: r from the
 * mean of squares (as the forward rounds it), dot = sum w dy x in double,
 * coef = r^3 dot / C; then dx_j += r w_j dy_j - coef x_j. With DW each
 * block also sums dy (x r) over its rows into C double partials in dynamic
 * shared memory (thread t owns the columns it reads, so no two threads
 * touch one partial) and adds them to dweight with one float atomicAdd per
 * column at the end: dweight's sum is exact within each block's double
 * partial, and the blocks' order of arrival varies the last bits. */
template <int K, bool DW>
__global__ void cuk_rmsnorm_bwd_kernel(float *dx, float *dweight, const float *dout,
                                       const float *x, const float *weight, size_t N, size_t C,
                                       float eps) {
    __shared__ double part[32];
    CU_DYN_SMEM(double, partial);
    size_t first = (size_t)threadIdx.x * K, step = (size_t)blockDim.x * K;
    if (DW)
        for (size_t i = first; i < C; i += step)
            for (size_t j = i; j < i + K && j < C; j++) partial[j] = 0.0;
    for (size_t row = blockIdx.x; row < N; row += gridDim.x) {
        const float *xr = x + row * C, *dy = dout + row * C;
        float *dxr = dx ? dx + row * C : nullptr;
        float r = cuk_rms_scale(cuk_row_sumsq<K>(xr, C, part), C, eps);
        double dot = 0.0;
        for (size_t i = first; i < C; i += step) {
            if (i + K <= C) {
                cuk_vec<K> xv = cuk_ld<K>(xr + i), dv = cuk_ld<K>(dy + i);
                cuk_vec<K> wv = cuk_ld<K>(weight + i);
                for (int k = 0; k < K; k++) dot += (double)wv.v[k] * dv.v[k] * xv.v[k];
            } else {
                for (size_t j = i; j < C; j++) dot += (double)weight[j] * dy[j] * xr[j];
            }
        }
        dot = cuk_block_sum(dot, part);
        float coef = (float)((double)r * r * r * dot / (double)C);
        for (size_t i = first; i < C; i += step) {
            if (i + K <= C) {
                cuk_vec<K> xv = cuk_ld<K>(xr + i), dv = cuk_ld<K>(dy + i);
                cuk_vec<K> wv = cuk_ld<K>(weight + i);
                for (int k = 0; k < K; k++)
                    cuk_rmsnorm_bwd_one<DW>(dxr, partial, i + (size_t)k, xv.v[k], wv.v[k],
                                            dv.v[k], r, coef);
            } else {
                for (size_t j = i; j < C; j++)
                    cuk_rmsnorm_bwd_one<DW>(dxr, partial, j, xr[j], weight[j], dy[j], r, coef);
            }
        }
    }
    if (DW)
        for (size_t i = first; i < C; i += step)
            for (size_t j = i; j < i + K && j < C; j++) atomicAdd(dweight + j, (float)partial[j]);
}

/* Launches one instantiation of the backward, raising its dynamic shared
 * memory limit first when the plan needs more than the default 48 KiB. */
template <int K, bool DW>
static void cuk_rmsnorm_bwd_launch(const launch_plan &p, float *dx, float *dweight,
                                   const float *dout, const float *x, const float *weight,
                                   size_t N, size_t C, float eps, void *stream) {
    void (*kern)(float *, float *, const float *, const float *, const float *, size_t, size_t,
                 float) = cuk_rmsnorm_bwd_kernel<K, DW>;
    if (p.smem_optin)
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)p.smem);
    CU_LAUNCH((cuk_rmsnorm_bwd_kernel<K, DW>), cuk_dim(p.grid), cuk_dim(p.block), p.smem,
              cuk_stream(stream), dx, dweight, dout, x, weight, N, C, eps);
}

int cuk_rmsnorm_backward(float *dx, float *dweight, const float *dout, const float *x,
                         const float *weight, size_t N, size_t C, float eps, void *stream,
                         char *err, size_t errlen) {
    bool dw = dweight != NULL;
    bool vec4 = cuk_rows_vec4(C, dx ? dx : x, dout, x, weight);
    launch_plan p;
    if (launch_rmsnorm_backward(N, C, vec4 ? 4 : 1, dw, &p, err, errlen) != 0) return -1;
    if (p.grid[0] == 0 || (!dx && !dw)) return 0;
    if (vec4 && dw)
        cuk_rmsnorm_bwd_launch<4, true>(p, dx, dweight, dout, x, weight, N, C, eps, stream);
    else if (vec4)
        cuk_rmsnorm_bwd_launch<4, false>(p, dx, dweight, dout, x, weight, N, C, eps, stream);
    else if (dw)
        cuk_rmsnorm_bwd_launch<1, true>(p, dx, dweight, dout, x, weight, N, C, eps, stream);
    else
        cuk_rmsnorm_bwd_launch<1, false>(p, dx, dweight, dout, x, weight, N, C, eps, stream);
    return 0;
}

/* --- rope ------------------------------------------------------------------ */

/* Rows strided over blocks; the block's threads take the row's nheads *
 * HS/2 pairs (i, i + HS/2) of each head, adjacent threads on adjacent i,
 * so both halves are read and written coalesced. sign -1 rotates by
 * -angle (the backward). */
__global__ void cuk_rope_kernel(float *x, const int *pos, size_t N, int nheads, int HS,
                                const float *cs, float sign) {
    size_t half = (size_t)HS / 2, pairs = (size_t)nheads * half;
    for (size_t row = blockIdx.x; row < N; row += gridDim.x) {
        const float *c = cs + (size_t)pos[row] * half * 2;
        float *xr = x + row * (size_t)nheads * (size_t)HS;
        for (size_t q = threadIdx.x; q < pairs; q += blockDim.x) {
            size_t h = q / half, i = q % half;
            float *head = xr + h * (size_t)HS;
            float co = c[2 * i], si = sign * c[2 * i + 1];
            float a = head[i], b = head[i + half];
            head[i] = cuk_sub(cuk_mul(a, co), cuk_mul(b, si));
            head[i + half] = cuk_add(cuk_mul(b, co), cuk_mul(a, si));
        }
    }
}

int cuk_rope_cached(float *x, const int *pos, size_t N, int nheads, int HS, const float *cs,
                    bool inverse, void *stream, char *err, size_t errlen) {
    launch_plan p;
    if (launch_rope(N, nheads, HS, &p, err, errlen) != 0) return -1;
    if (p.grid[0] == 0) return 0;
    CU_LAUNCH(cuk_rope_kernel, cuk_dim(p.grid), cuk_dim(p.block), p.smem, cuk_stream(stream), x,
              pos, N, nheads, HS, cs, inverse ? -1.0f : 1.0f);
    return 0;
}

/* --- embedding ------------------------------------------------------------- */

template <int K>
__global__ void cuk_embedding_kernel(float *out, const int *tokens, const float *table,
                                     size_t N, size_t C) {
    for (size_t row = blockIdx.x; row < N; row += gridDim.x) {
        const float *src = table + (size_t)tokens[row] * C;
        float *dst = out + row * C;
        for (size_t i = (size_t)threadIdx.x * K; i < C; i += (size_t)blockDim.x * K) {
            if (i + K <= C)
                cuk_st<K>(dst + i, cuk_ld<K>(src + i));
            else
                for (size_t j = i; j < C; j++) dst[j] = src[j];
        }
    }
}

int cuk_embedding(float *out, const int *tokens, const float *table, size_t N, size_t C,
                  void *stream, char *err, size_t errlen) {
    bool vec4 = cuk_rows_vec4(C, out, table, table, table);
    launch_plan p;
    if (launch_embedding(N, C, vec4 ? 4 : 1, &p, err, errlen) != 0) return -1;
    if (p.grid[0] == 0) return 0;
    if (vec4)
        CU_LAUNCH(cuk_embedding_kernel<4>, cuk_dim(p.grid), cuk_dim(p.block), p.smem,
                  cuk_stream(stream), out, tokens, table, N, C);
    else
        CU_LAUNCH(cuk_embedding_kernel<1>, cuk_dim(p.grid), cuk_dim(p.block), p.smem,
                  cuk_stream(stream), out, tokens, table, N, C);
    return 0;
}

/* dtable row tokens[n] += dout row n, by float atomicAdd: a token repeated
 * in the batch sums its rows (in an order that varies run to run). */
__global__ void cuk_embedding_bwd_kernel(float *dtable, const float *dout, const int *tokens,
                                         size_t N, size_t C) {
    for (size_t row = blockIdx.x; row < N; row += gridDim.x) {
        float *dst = dtable + (size_t)tokens[row] * C;
        const float *src = dout + row * C;
        for (size_t i = threadIdx.x; i < C; i += blockDim.x) atomicAdd(dst + i, src[i]);
    }
}

int cuk_embedding_backward(float *dtable, const float *dout, const int *tokens, size_t N,
                           size_t C, void *stream, char *err, size_t errlen) {
    launch_plan p;
    if (launch_embedding(N, C, 1, &p, err, errlen) != 0) return -1;
    if (p.grid[0] == 0) return 0;
    CU_LAUNCH(cuk_embedding_bwd_kernel, cuk_dim(p.grid), cuk_dim(p.block), p.smem,
              cuk_stream(stream), dtable, dout, tokens, N, C);
    return 0;
}

/* --- cross-entropy --------------------------------------------------------- */

/* One block per row (strided by gridDim.x). Three passes over the row:
 * max; sum of exp(z - max) in double; z = exp(z - max) * (scale / sum),
 * minus scale at the target (the exps recomputed rather than stored, so
 * the row is written once and no probabilities are kept anywhere). With
 * CACHED the first pass copies the row into dynamic shared memory and the
 * others read it there, so the logits are read from global memory once;
 * thread t keeps to the elements t, t + blockDim.x, ... in every pass,
 * so the cache needs no barrier of its own. A row whose target is
 * negative becomes zeros with loss 0 (the branch is uniform per block). */
template <bool CACHED>
__global__ void cuk_xent_kernel(float *logits, double *row_loss, const int *targets, size_t N,
                                size_t V, float scale) {
    __shared__ float fpart[32];
    __shared__ double dpart[32];
    CU_DYN_SMEM(float, cache);
    for (size_t row = blockIdx.x; row < N; row += gridDim.x) {
        float *z = logits + row * V;
        int target = targets[row];
        if (target < 0) {
            for (size_t i = threadIdx.x; i < V; i += blockDim.x) z[i] = 0.0f;
            if (threadIdx.x == 0) row_loss[row] = 0.0;
            continue;
        }
        float zt = z[target];
        float mx = -INFINITY;
        for (size_t i = threadIdx.x; i < V; i += blockDim.x) {
            float v = z[i];
            if (CACHED) cache[i] = v;
            mx = fmaxf(mx, v);
        }
        mx = cuk_block_max(mx, fpart);
        double sum = 0.0;
        for (size_t i = threadIdx.x; i < V; i += blockDim.x)
            sum += (double)expf((CACHED ? cache[i] : z[i]) - mx);
        sum = cuk_block_sum(sum, dpart);
        if (threadIdx.x == 0) row_loss[row] = log(sum) + (double)mx - (double)zt;
        float mul = (float)((double)scale / sum);
        for (size_t i = threadIdx.x; i < V; i += blockDim.x) {
            float g = cuk_mul(expf((CACHED ? cache[i] : z[i]) - mx), mul);
            z[i] = i == (size_t)target ? cuk_sub(g, scale) : g;
        }
    }
}

int cuk_cross_entropy(float *logits, double *row_loss, const int *targets, size_t N, size_t V,
                      float scale, void *stream, char *err, size_t errlen) {
    launch_plan p;
    if (launch_cross_entropy(N, V, &p, err, errlen) != 0) return -1;
    if (p.grid[0] == 0) return 0;
    if (p.smem > 0) {
        void (*kern)(float *, double *, const int *, size_t, size_t, float) =
            cuk_xent_kernel<true>;
        if (p.smem_optin)
            cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)p.smem);
        CU_LAUNCH(cuk_xent_kernel<true>, cuk_dim(p.grid), cuk_dim(p.block), p.smem,
                  cuk_stream(stream), logits, row_loss, targets, N, V, scale);
    } else {
        CU_LAUNCH(cuk_xent_kernel<false>, cuk_dim(p.grid), cuk_dim(p.block), p.smem,
                  cuk_stream(stream), logits, row_loss, targets, N, V, scale);
    }
    return 0;
}
