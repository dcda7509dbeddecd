/* selftest.cc - kernels that exercise the CUDA emulator feature by feature,
 * written as strata's kernels are (through compat.cuh), with host wrappers
 * that move data through device memory (selftest.h says what each
 * computes; the test computes the expected values on its own). */
#include "worker/engine/cuda/compat.cuh"

#include "tests/cuda_emu/selftest.h"

#include <stdio.h>
#include <stdlib.h>

namespace {

/* Sets err from a failed CUDA call; -1. */
int st_fail(cudaError_t e, const char *what, char *err, size_t errlen)
{
    snprintf(err, errlen, "%s: %s", what, cudaGetErrorString(e));
    return -1;
}

#define ST_CHECK(call)                                    \
    do {                                                  \
        cudaError_t st_e_ = (call);                       \
        if (st_e_ != cudaSuccess) {                       \
            rc = st_fail(st_e_, #call, err, errlen);      \
            goto out;                                     \
        }                                                 \
    } while (0)

/* Device copy of n host elements (NULL host: left as cudaMalloc gives it). */
template <class T> cudaError_t st_upload(T **dev, const T *host, size_t n)
{
    cudaError_t e = cudaMalloc(reinterpret_cast<void **>(dev), n * sizeof(T));
    if (e != cudaSuccess || host == nullptr)
        return e;
    return cudaMemcpy(*dev, host, n * sizeof(T), cudaMemcpyHostToDevice);
}

template <class T> cudaError_t st_download(T *host, const T *dev, size_t n)
{
    return cudaMemcpy(host, dev, n * sizeof(T), cudaMemcpyDeviceToHost);
}

template <unsigned BLOCK>
__global__ void st_block_sum_kernel(const float *__restrict__ x, size_t n, float *block_sums,
                                    double *total)
{
    __shared__ float part[BLOCK];
    size_t i = (size_t)blockIdx.x * BLOCK + threadIdx.x;
    part[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (unsigned half = BLOCK / 2; half > 0; half /= 2) {
        if (threadIdx.x < half)
            part[threadIdx.x] += part[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        block_sums[blockIdx.x] = part[0];
        atomicAdd(total, (double)part[0]);
    }
}

__global__ void st_warp_kernel(const float *x, float *xor_sum, float *down_sum, float *down16,
                               int *ixor, unsigned *udown, double *dxor, float *synced)
{
    __shared__ float stage[1024];
    unsigned t = threadIdx.x;
    unsigned lane = t % CU_WARP;
    float v = x[t];
    float s = v;
    for (int m = 16; m > 0; m /= 2)
        s += __shfl_xor_sync(CU_FULL_MASK, s, m);
    xor_sum[t] = s;
    float d = v;
    for (unsigned off = 16; off > 0; off /= 2)
        d += __shfl_down_sync(CU_FULL_MASK, d, off);
    down_sum[t] = d;
    down16[t] = __shfl_down_sync(CU_FULL_MASK, v, 16);
    ixor[t] = __shfl_xor_sync(CU_FULL_MASK, (int)(3 * t), 5);
    udown[t] = __shfl_down_sync(CU_FULL_MASK, 7u * t, 1);
    dxor[t] = __shfl_xor_sync(CU_FULL_MASK, (double)v * 1e10 + t, 31);
    stage[t] = v;
    __syncwarp();
    synced[t] = stage[t - lane + (lane + 1) % CU_WARP];
}

__global__ void st_indices_kernel(unsigned *count, unsigned *idx, unsigned *dims_wrong, dim3 grid,
                                  dim3 block)
{
    unsigned per_block = blockDim.x * blockDim.y * blockDim.z;
    size_t b = ((size_t)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    size_t id = b * per_block + (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    atomicAdd(&count[id], 1u);
    unsigned *r = idx + 6 * id;
    r[0] = blockIdx.x;
    r[1] = blockIdx.y;
    r[2] = blockIdx.z;
    r[3] = threadIdx.x;
    r[4] = threadIdx.y;
    r[5] = threadIdx.z;
    if (blockDim.x != block.x || blockDim.y != block.y || blockDim.z != block.z ||
        gridDim.x != grid.x || gridDim.y != grid.y || gridDim.z != grid.z)
        atomicAdd(dims_wrong, 1u);
}

__global__ void st_dyn_smem_kernel(const float *x, size_t n, float *out, float *first_read)
{
    CU_DYN_SMEM(float, s);
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    float before = s[threadIdx.x];
    s[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    if (i < n) {
        first_read[i] = before;
        out[i] = s[blockDim.x - 1 - threadIdx.x];
    }
}

__global__ void st_convert_kernel(const float *x, size_t n, uint16_t *bf, uint16_t *h,
                                  float *bf_back, float *h_back)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    __nv_bfloat16 b = __float2bfloat16(x[i]);
    __half hv = __float2half(x[i]);
    bf[i] = __bfloat16_as_ushort(b);
    h[i] = __half_as_ushort(hv);
    bf_back[i] = __bfloat162float(b);
    h_back[i] = __half2float(hv);
}

__global__ void st_partial_exit_kernel(const float *x, unsigned live, float *sum)
{
    __shared__ float part[1024];
    if (threadIdx.x >= live)
        return;
    part[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    /* Sequential halving over the live prefix, with a barrier per round. */
    for (unsigned width = live; width > 1;) {
        unsigned half = (width + 1) / 2;
        if (threadIdx.x + half < width)
            part[threadIdx.x] += part[threadIdx.x + half];
        __syncthreads();
        width = half;
    }
    if (threadIdx.x == 0)
        *sum = part[0];
}

__global__ void st_big_smem_kernel(size_t nfloats, double *sum)
{
    CU_DYN_SMEM(float, s);
    for (size_t i = threadIdx.x; i < nfloats; i += blockDim.x)
        s[i] = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) {
        double acc = 0;
        for (size_t i = 0; i < nfloats; i++)
            acc += s[i];
        *sum = acc;
    }
}

/* Deliberately racy without the barrier (selftest.h): the read of the
 * neighbour's slot is only ordered after its write by __syncthreads. */
__global__ void st_neighbour_kernel(const float *x, int with_barrier, float *out)
{
    CU_DYN_SMEM(float, s);
    unsigned t = threadIdx.x;
    s[t] = x[t];
    if (with_barrier)
        __syncthreads();
    out[t] = s[t == 0 ? 0 : t - 1];
}

/* The block's sum of v in every thread through part (one float per warp),
 * without a barrier before part is written: called twice, a fast warp's
 * second write can land before a slow warp's first read (selftest.h). */
__device__ float st_racy_block_sum(float v, float *part, int with_barrier)
{
    unsigned lane = threadIdx.x % CU_WARP, warp = threadIdx.x / CU_WARP;
    for (int m = 16; m > 0; m /= 2)
        v += __shfl_xor_sync(CU_FULL_MASK, v, m);
    if (with_barrier)
        __syncthreads();
    if (lane == 0)
        part[warp] = v;
    __syncthreads();
    float t = lane < blockDim.x / CU_WARP ? part[lane] : 0.0f;
    for (int m = 16; m > 0; m /= 2)
        t += __shfl_xor_sync(CU_FULL_MASK, t, m);
    return t;
}

__global__ void st_two_sums_kernel(const float *x, int with_barrier, float *sum1, float *sum2)
{
    __shared__ float part[32];
    float v = x[threadIdx.x];
    float a = st_racy_block_sum(v, part, with_barrier);
    float b = st_racy_block_sum(2.0f * v, part, with_barrier);
    sum1[threadIdx.x] = a;
    sum2[threadIdx.x] = b;
}

/* Tickets from per-block counters show the order in which threads ran (a
 * valid kernel on a GPU, where the tickets are whatever the hardware
 * does): tick[0] counts blocks, tick[1 + 2b] and tick[2 + 2b] block b's
 * threads before and after the barrier. */
__global__ void st_order_kernel(unsigned *tick, unsigned *block_rank, unsigned *rank0,
                                unsigned *rank1)
{
    unsigned b = blockIdx.x;
    unsigned id = b * blockDim.x + threadIdx.x;
    unsigned r0 = atomicAdd(&tick[1 + 2 * b], 1u);
    if (r0 == 0)
        block_rank[b] = atomicAdd(&tick[0], 1u);
    rank0[id] = r0;
    __syncthreads();
    rank1[id] = atomicAdd(&tick[2 + 2 * b], 1u);
}

__global__ void st_nop_kernel(int *p)
{
    if (p != nullptr && threadIdx.x == 0)
        *p = 1;
}

/* Launched without arguments; counts its threads in a global. */
__device__ unsigned st_noarg_threads;
__global__ void st_noarg_kernel()
{
    atomicAdd(&st_noarg_threads, 1u);
}

/* A local array past the end of the thread's stack. */
__global__ void st_stack_overflow_kernel(size_t bytes, int *out)
{
    volatile unsigned char *big = static_cast<volatile unsigned char *>(__builtin_alloca(bytes));
    big[0] = 1;
    *out = big[0];
}

__global__ void st_deadlock_kernel(float *out)
{
    float v = (float)threadIdx.x;
    if (threadIdx.x < 16)
        v = __shfl_xor_sync(CU_FULL_MASK, v, 1);
    else
        __syncthreads();
    out[threadIdx.x] = v;
}

__global__ void st_divergent_bar_kernel(float *out)
{
    __shared__ float s[64];
    s[threadIdx.x] = 1.0f;
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
        out[threadIdx.x] = s[threadIdx.x + 1];
    } else {
        __syncthreads();
        out[threadIdx.x] = s[threadIdx.x - 1];
    }
}

__global__ void st_shfl_exited_kernel(float *out)
{
    if (threadIdx.x == 7)
        return;
    out[threadIdx.x] = __shfl_xor_sync(CU_FULL_MASK, 1.0f, 1);
}

__global__ void st_partial_warp_kernel(float *out)
{
    out[threadIdx.x] = __shfl_down_sync(CU_FULL_MASK, 1.0f, 1);
}

} /* namespace */

extern "C" int emu_st_block_sum(const float *x, size_t n, unsigned block, float *block_sums,
                                double *total, char *err, size_t errlen)
{
    int rc = 0;
    unsigned grid = (unsigned)((n + block - 1) / block);
    float *dx = nullptr, *dsums = nullptr;
    double *dtotal = nullptr;
    const double zero = 0;
    ST_CHECK(st_upload(&dx, x, n));
    ST_CHECK(st_upload(&dsums, (const float *)nullptr, grid));
    ST_CHECK(st_upload(&dtotal, &zero, 1));
    switch (block) {
    case 32: CU_LAUNCH(st_block_sum_kernel<32>, grid, 32, 0, 0, dx, n, dsums, dtotal); break;
    case 256: CU_LAUNCH(st_block_sum_kernel<256>, grid, 256, 0, 0, dx, n, dsums, dtotal); break;
    case 1024:
        CU_LAUNCH(st_block_sum_kernel<1024>, grid, 1024, 0, 0, dx, n, dsums, dtotal);
        break;
    default: snprintf(err, errlen, "block %u not instantiated", block); rc = -1; goto out;
    }
    ST_CHECK(cudaGetLastError());
    ST_CHECK(st_download(block_sums, dsums, grid));
    ST_CHECK(st_download(total, dtotal, 1));
out:
    cudaFree(dx);
    cudaFree(dsums);
    cudaFree(dtotal);
    return rc;
}

extern "C" int emu_st_warp(const float *x, unsigned nthreads, float *xor_sum, float *down_sum,
                           float *down16, int *ixor, unsigned *udown, double *dxor,
                           float *synced, char *err, size_t errlen)
{
    int rc = 0;
    float *dx = nullptr, *dxs = nullptr, *dds = nullptr, *dd16 = nullptr, *dsy = nullptr;
    int *dix = nullptr;
    unsigned *dud = nullptr;
    double *ddx = nullptr;
    cudaStream_t stream = nullptr;
    ST_CHECK(cudaStreamCreate(&stream));
    ST_CHECK(st_upload(&dx, x, nthreads));
    ST_CHECK(st_upload(&dxs, (const float *)nullptr, nthreads));
    ST_CHECK(st_upload(&dds, (const float *)nullptr, nthreads));
    ST_CHECK(st_upload(&dd16, (const float *)nullptr, nthreads));
    ST_CHECK(st_upload(&dsy, (const float *)nullptr, nthreads));
    ST_CHECK(st_upload(&dix, (const int *)nullptr, nthreads));
    ST_CHECK(st_upload(&dud, (const unsigned *)nullptr, nthreads));
    ST_CHECK(st_upload(&ddx, (const double *)nullptr, nthreads));
    CU_LAUNCH(st_warp_kernel, 1, nthreads, 0, stream, dx, dxs, dds, dd16, dix, dud, ddx, dsy);
    ST_CHECK(cudaGetLastError());
    ST_CHECK(cudaStreamSynchronize(stream));
    ST_CHECK(st_download(xor_sum, dxs, nthreads));
    ST_CHECK(st_download(down_sum, dds, nthreads));
    ST_CHECK(st_download(down16, dd16, nthreads));
    ST_CHECK(st_download(synced, dsy, nthreads));
    ST_CHECK(st_download(ixor, dix, nthreads));
    ST_CHECK(st_download(udown, dud, nthreads));
    ST_CHECK(st_download(dxor, ddx, nthreads));
out:
    cudaFree(dx);
    cudaFree(dxs);
    cudaFree(dds);
    cudaFree(dd16);
    cudaFree(dsy);
    cudaFree(dix);
    cudaFree(dud);
    cudaFree(ddx);
    if (stream != nullptr)
        cudaStreamDestroy(stream);
    return rc;
}

extern "C" int emu_st_indices(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                              unsigned bz, unsigned *count, unsigned *idx, unsigned *dims_wrong,
                              char *err, size_t errlen)
{
    int rc = 0;
    size_t total = (size_t)gx * gy * gz * bx * by * bz;
    unsigned *dcount = nullptr, *didx = nullptr, *dwrong = nullptr;
    const unsigned zero = 0;
    dim3 grid(gx, gy, gz), block(bx, by, bz);
    ST_CHECK(cudaMalloc(&dcount, total * sizeof(unsigned)));
    ST_CHECK(cudaMemsetAsync(dcount, 0, total * sizeof(unsigned), 0));
    ST_CHECK(st_upload(&didx, (const unsigned *)nullptr, 6 * total));
    ST_CHECK(st_upload(&dwrong, &zero, 1));
    CU_LAUNCH(st_indices_kernel, grid, block, 0, 0, dcount, didx, dwrong, grid, block);
    ST_CHECK(cudaGetLastError());
    ST_CHECK(cudaDeviceSynchronize());
    ST_CHECK(st_download(count, dcount, total));
    ST_CHECK(st_download(idx, didx, 6 * total));
    ST_CHECK(st_download(dims_wrong, dwrong, 1));
out:
    cudaFree(dcount);
    cudaFree(didx);
    cudaFree(dwrong);
    return rc;
}

extern "C" int emu_st_dyn_smem(const float *x, size_t n, unsigned block, float *out,
                               float *first_read, char *err, size_t errlen)
{
    int rc = 0;
    unsigned grid = (unsigned)((n + block - 1) / block);
    float *dx = nullptr, *dout = nullptr, *dfirst = nullptr;
    ST_CHECK(st_upload(&dx, x, n));
    ST_CHECK(st_upload(&dout, (const float *)nullptr, n));
    ST_CHECK(st_upload(&dfirst, (const float *)nullptr, n));
    CU_LAUNCH(st_dyn_smem_kernel, grid, block, block * sizeof(float), 0, dx, n, dout, dfirst);
    ST_CHECK(cudaGetLastError());
    ST_CHECK(st_download(out, dout, n));
    ST_CHECK(st_download(first_read, dfirst, n));
out:
    cudaFree(dx);
    cudaFree(dout);
    cudaFree(dfirst);
    return rc;
}

extern "C" int emu_st_convert(const float *x, size_t n, uint16_t *bf, uint16_t *h,
                              float *bf_back, float *h_back, char *err, size_t errlen)
{
    int rc = 0;
    float *dx = nullptr, *dbb = nullptr, *dhb = nullptr;
    uint16_t *dbf = nullptr, *dh = nullptr;
    ST_CHECK(st_upload(&dx, x, n));
    ST_CHECK(st_upload(&dbf, (const uint16_t *)nullptr, n));
    ST_CHECK(st_upload(&dh, (const uint16_t *)nullptr, n));
    ST_CHECK(st_upload(&dbb, (const float *)nullptr, n));
    ST_CHECK(st_upload(&dhb, (const float *)nullptr, n));
    CU_LAUNCH(st_convert_kernel, (unsigned)((n + 127) / 128), 128, 0, 0, dx, n, dbf, dh, dbb,
              dhb);
    ST_CHECK(cudaGetLastError());
    ST_CHECK(st_download(bf, dbf, n));
    ST_CHECK(st_download(h, dh, n));
    ST_CHECK(st_download(bf_back, dbb, n));
    ST_CHECK(st_download(h_back, dhb, n));
out:
    cudaFree(dx);
    cudaFree(dbf);
    cudaFree(dh);
    cudaFree(dbb);
    cudaFree(dhb);
    return rc;
}

extern "C" int emu_st_neighbour(const float *x, unsigned nthreads, int with_barrier,
                                float *out, char *err, size_t errlen)
{
    int rc = 0;
    float *dx = nullptr, *dout = nullptr;
    ST_CHECK(st_upload(&dx, x, nthreads));
    ST_CHECK(st_upload(&dout, (const float *)nullptr, nthreads));
    CU_LAUNCH(st_neighbour_kernel, 1, nthreads, nthreads * sizeof(float), 0, dx, with_barrier,
              dout);
    ST_CHECK(cudaGetLastError());
    ST_CHECK(st_download(out, dout, nthreads));
out:
    cudaFree(dx);
    cudaFree(dout);
    return rc;
}

extern "C" int emu_st_two_sums(const float *x, unsigned nthreads, int with_barrier,
                               float *sum1, float *sum2, char *err, size_t errlen)
{
    int rc = 0;
    float *dx = nullptr, *ds1 = nullptr, *ds2 = nullptr;
    ST_CHECK(st_upload(&dx, x, nthreads));
    ST_CHECK(st_upload(&ds1, (const float *)nullptr, nthreads));
    ST_CHECK(st_upload(&ds2, (const float *)nullptr, nthreads));
    CU_LAUNCH(st_two_sums_kernel, 1, nthreads, 0, 0, dx, with_barrier, ds1, ds2);
    ST_CHECK(cudaGetLastError());
    ST_CHECK(st_download(sum1, ds1, nthreads));
    ST_CHECK(st_download(sum2, ds2, nthreads));
out:
    cudaFree(dx);
    cudaFree(ds1);
    cudaFree(ds2);
    return rc;
}

extern "C" int emu_st_order(unsigned nblocks, unsigned nthreads, unsigned *block_rank,
                            unsigned *rank0, unsigned *rank1, char *err, size_t errlen)
{
    int rc = 0;
    size_t total = (size_t)nblocks * nthreads;
    unsigned *dtick = nullptr, *dblock = nullptr, *dr0 = nullptr, *dr1 = nullptr;
    ST_CHECK(cudaMalloc(&dtick, (1 + 2 * (size_t)nblocks) * sizeof(unsigned)));
    ST_CHECK(cudaMemset(dtick, 0, (1 + 2 * (size_t)nblocks) * sizeof(unsigned)));
    ST_CHECK(st_upload(&dblock, (const unsigned *)nullptr, nblocks));
    ST_CHECK(st_upload(&dr0, (const unsigned *)nullptr, total));
    ST_CHECK(st_upload(&dr1, (const unsigned *)nullptr, total));
    CU_LAUNCH(st_order_kernel, nblocks, nthreads, 0, 0, dtick, dblock, dr0, dr1);
    ST_CHECK(cudaGetLastError());
    ST_CHECK(st_download(block_rank, dblock, nblocks));
    ST_CHECK(st_download(rank0, dr0, total));
    ST_CHECK(st_download(rank1, dr1, total));
out:
    cudaFree(dtick);
    cudaFree(dblock);
    cudaFree(dr0);
    cudaFree(dr1);
    return rc;
}

extern "C" int emu_st_schedule_set(const char *name, uint64_t seed)
{
    strata_emu::schedule_kind kind;
    if (!strata_emu::schedule_parse(name, &kind))
        return -1;
    strata_emu::schedule_set(kind, seed);
    return 0;
}

extern "C" const char *emu_st_schedule_get(uint64_t *seed)
{
    return strata_emu::schedule_name(strata_emu::schedule_get(seed));
}

extern "C" void emu_st_schedule_reload(void) { strata_emu::schedule_reload(); }

extern "C" int emu_st_partial_exit(const float *x, unsigned nthreads, unsigned live, float *sum,
                                   char *err, size_t errlen)
{
    int rc = 0;
    float *dx = nullptr, *dsum = nullptr;
    ST_CHECK(st_upload(&dx, x, nthreads));
    ST_CHECK(st_upload(&dsum, (const float *)nullptr, 1));
    CU_LAUNCH(st_partial_exit_kernel, 1, nthreads, 0, 0, dx, live, dsum);
    ST_CHECK(cudaGetLastError());
    ST_CHECK(st_download(sum, dsum, 1));
out:
    cudaFree(dx);
    cudaFree(dsum);
    return rc;
}

extern "C" int emu_st_big_smem(size_t smem_bytes, double *sum, char *err, size_t errlen)
{
    int rc = 0;
    double *dsum = nullptr;
    ST_CHECK(cudaFuncSetAttribute(st_big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  (int)smem_bytes));
    ST_CHECK(st_upload(&dsum, (const double *)nullptr, 1));
    CU_LAUNCH(st_big_smem_kernel, 1, 256, smem_bytes, 0, smem_bytes / sizeof(float), dsum);
    ST_CHECK(cudaGetLastError());
    ST_CHECK(st_download(sum, dsum, 1));
out:
    cudaFree(dsum);
    return rc;
}

/* --- cudart checks ------------------------------------------------------------ */
namespace {

struct st_checker {
    int failed = 0;
    char *what;
    size_t whatlen;
    void expect(bool ok, const char *name)
    {
        if (!ok && failed++ == 0)
            snprintf(what, whatlen, "%s", name);
    }
};

} /* namespace */

extern "C" int emu_st_cudart(char *what, size_t whatlen)
{
    st_checker c;
    c.what = what;
    c.whatlen = whatlen;
    snprintf(what, whatlen, "%s", "all passed");
    cudaGetLastError();

    int n = -1, dev = -1, version = 0;
    c.expect(cudaGetDeviceCount(&n) == cudaSuccess && n == 1, "one device by default");
    c.expect(cudaSetDevice(0) == cudaSuccess, "cudaSetDevice(0)");
    c.expect(cudaGetDevice(&dev) == cudaSuccess && dev == 0, "cudaGetDevice");
    c.expect(cudaSetDevice(1) == cudaErrorInvalidDevice, "cudaSetDevice(1) invalid");
    c.expect(cudaPeekAtLastError() == cudaErrorInvalidDevice, "peek keeps the last error");
    c.expect(cudaPeekAtLastError() == cudaErrorInvalidDevice, "peek does not reset");
    c.expect(cudaGetLastError() == cudaErrorInvalidDevice, "get returns the last error");
    c.expect(cudaGetLastError() == cudaSuccess, "get resets it");
    c.expect(cudaDriverGetVersion(&version) == cudaSuccess && version == 13000, "driver version");
    c.expect(cudaRuntimeGetVersion(&version) == cudaSuccess && version == 13000,
             "runtime version");

    cudaDeviceProp prop;
    c.expect(cudaGetDeviceProperties(&prop, 0) == cudaSuccess, "properties");
    c.expect(strcmp(prop.name, "strata CUDA emulator") == 0, "property name");
    c.expect(prop.major == 9 && prop.minor == 0, "compute capability 9.0");
    c.expect(prop.multiProcessorCount == 4, "4 multiprocessors");
    c.expect(prop.sharedMemPerBlockOptin == 232448, "shared memory opt-in");
    c.expect(prop.totalGlobalMem == (size_t)8 << 30, "8 GiB by default");
    c.expect(cudaGetDeviceProperties(&prop, 3) == cudaErrorInvalidDevice, "properties of dev 3");

    size_t free0 = 0, total = 0;
    c.expect(cudaMemGetInfo(&free0, &total) == cudaSuccess && total == (size_t)8 << 30 &&
                 free0 <= total,
             "cudaMemGetInfo");
    float *d = nullptr, *d2 = nullptr;
    c.expect(cudaMalloc(&d, 1000 * sizeof(float)) == cudaSuccess && d != nullptr, "cudaMalloc");
    c.expect(((uintptr_t)d & 255) == 0, "256-byte alignment");
    size_t free1 = 0;
    cudaMemGetInfo(&free1, &total);
    c.expect(free1 == free0 - 4000, "cudaMalloc counted in cudaMemGetInfo");
    c.expect(cudaMalloc(&d2, 1000 * sizeof(float)) == cudaSuccess && d2 != nullptr && d2 != d,
             "second cudaMalloc");
    float host[1000], back[1000];
    for (int i = 0; i < 1000; i++)
        host[i] = (float)i * 0.5f;
    c.expect(cudaMemcpy(d, host, sizeof host, cudaMemcpyHostToDevice) == cudaSuccess, "H2D");
    c.expect(cudaMemcpy(d2, d, sizeof host, cudaMemcpyDeviceToDevice) == cudaSuccess, "D2D");
    memset(back, 0, sizeof back);
    c.expect(cudaMemcpy(back, d2, sizeof back, cudaMemcpyDeviceToHost) == cudaSuccess, "D2H");
    c.expect(memcmp(back, host, sizeof host) == 0, "round trip through device memory");
    c.expect(cudaMemcpy(host, back, sizeof host, cudaMemcpyHostToDevice) == cudaErrorInvalidValue,
             "H2D to a host pointer refused");
    c.expect(cudaGetLastError() == cudaErrorInvalidValue, "the refusal is the last error");
    c.expect(cudaMemcpy(back, host, sizeof host, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue,
             "D2H from a host pointer refused");
    c.expect(cudaMemcpy(d, d2, sizeof host + 4, cudaMemcpyDeviceToDevice) ==
                 cudaErrorInvalidValue,
             "copy past the end of an allocation refused");
    c.expect(cudaMemcpy(d + 1, d2, sizeof host - 4, cudaMemcpyDeviceToDevice) == cudaSuccess,
             "copy inside an allocation");
    c.expect(cudaMemcpy(back, host, sizeof host, cudaMemcpyHostToHost) == cudaSuccess, "H2H");
    c.expect(cudaMemcpy(back, host, sizeof host, (cudaMemcpyKind)7) == cudaErrorInvalidValue,
             "bad copy kind");
    c.expect(cudaMemsetAsync(d, 0, 1000 * sizeof(float), 0) == cudaSuccess, "memset");
    cudaMemcpy(back, d, sizeof back, cudaMemcpyDeviceToHost);
    c.expect(back[0] == 0.0f && back[999] == 0.0f, "memset zeroes");
    c.expect(cudaMemsetAsync(host, 0, 4, 0) == cudaErrorInvalidValue, "memset of host memory");
    c.expect(cudaFree(host) == cudaErrorInvalidValue, "cudaFree of a host pointer");
    c.expect(cudaFree(d) == cudaSuccess && cudaFree(d2) == cudaSuccess, "cudaFree");
    c.expect(cudaFree(nullptr) == cudaSuccess, "cudaFree(NULL)");
    cudaMemGetInfo(&free1, &total);
    c.expect(free1 == free0, "cudaFree returns the memory");
    cudaGetLastError();

    void *big = nullptr;
    setenv("STRATA_EMU_MEMORY", "1000000", 1);
    c.expect(cudaMalloc(&big, 1000001) == cudaErrorMemoryAllocation && big == nullptr,
             "over STRATA_EMU_MEMORY");
    c.expect(cudaGetLastError() == cudaErrorMemoryAllocation, "out of memory recorded");
    void *a = nullptr, *b = nullptr;
    c.expect(cudaMalloc(&a, 600000) == cudaSuccess, "under the limit");
    c.expect(cudaMalloc(&b, 600000) == cudaErrorMemoryAllocation, "cumulative limit");
    c.expect(cudaGetDeviceProperties(&prop, 0) == cudaSuccess && prop.totalGlobalMem == 1000000,
             "totalGlobalMem follows STRATA_EMU_MEMORY");
    cudaFree(a);
    unsetenv("STRATA_EMU_MEMORY");
    cudaGetLastError();

    void *zero = &zero;
    c.expect(cudaMalloc(&zero, 0) == cudaSuccess && zero == nullptr, "cudaMalloc(0) gives NULL");
    void *pinned = nullptr;
    c.expect(cudaMallocHost(&pinned, 64) == cudaSuccess && pinned != nullptr, "cudaMallocHost");
    c.expect(cudaFreeHost(pinned) == cudaSuccess, "cudaFreeHost");
    c.expect(cudaFreeHost(host) == cudaErrorInvalidValue, "cudaFreeHost of a stack pointer");
    cudaGetLastError();

    cudaStream_t s1 = nullptr, s2 = nullptr;
    c.expect(cudaStreamCreate(&s1) == cudaSuccess && s1 != nullptr, "stream create");
    c.expect(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking) == cudaSuccess &&
                 s2 != nullptr && s2 != s1,
             "distinct streams");
    c.expect(cudaStreamSynchronize(s1) == cudaSuccess && cudaStreamSynchronize(0) == cudaSuccess,
             "stream synchronize");
    c.expect(cudaDeviceSynchronize() == cudaSuccess, "device synchronize");
    int *flag = nullptr, one = 0;
    c.expect(cudaMalloc(&flag, sizeof(int)) == cudaSuccess, "flag");
    CU_LAUNCH(st_nop_kernel, 1, 32, 0, s2, flag);
    c.expect(cudaMemcpyAsync(&one, flag, sizeof one, cudaMemcpyDeviceToHost, s2) == cudaSuccess &&
                 one == 1,
             "launch on a created stream");
    cudaFree(flag);
    c.expect(cudaStreamDestroy(s1) == cudaSuccess, "stream destroy");
    c.expect(cudaStreamSynchronize(s1) == cudaErrorInvalidResourceHandle,
             "destroyed stream refused");
    c.expect(cudaStreamDestroy(s2) == cudaSuccess, "second stream destroy");
    cudaGetLastError();

    st_noarg_threads = 0;
    CU_LAUNCH(st_noarg_kernel, dim3(2, 3), dim3(32, 2), 0, 0);
    c.expect(st_noarg_threads == 384, "a launch without arguments");

    c.expect(cudaFuncSetAttribute(st_nop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  232449) == cudaErrorInvalidValue,
             "opt-in over 227 KiB refused");
    c.expect(strcmp(cudaGetErrorString(cudaErrorMemoryAllocation), "out of memory") == 0,
             "error string");
    cudaGetLastError();

    setenv("STRATA_EMU_DEVICES", "0", 1);
    c.expect(cudaGetDeviceCount(&n) == cudaErrorNoDevice && n == 0, "STRATA_EMU_DEVICES=0");
    c.expect(cudaSetDevice(0) == cudaErrorNoDevice, "no device to set");
    setenv("STRATA_EMU_DEVICES", "2", 1);
    c.expect(cudaGetDeviceCount(&n) == cudaSuccess && n == 2, "STRATA_EMU_DEVICES=2");
    c.expect(cudaSetDevice(1) == cudaSuccess, "second device");
    c.expect(cudaGetDevice(&dev) == cudaSuccess && dev == 1, "device 1 current");
    cudaSetDevice(0);
    unsetenv("STRATA_EMU_DEVICES");
    cudaGetLastError();
    return c.failed;
}

/* --- launches that must abort ---------------------------------------------------- */
extern "C" void emu_st_die_block_too_big(void)
{
    CU_LAUNCH(st_nop_kernel, 1, 1025, 0, 0, (int *)nullptr);
}

extern "C" void emu_st_die_zero_grid(void)
{
    CU_LAUNCH(st_nop_kernel, dim3(1, 0, 1), 32, 0, 0, (int *)nullptr);
}

extern "C" void emu_st_die_smem_too_big(void)
{
    cudaFuncSetAttribute(st_big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         232448);
    CU_LAUNCH(st_big_smem_kernel, 1, 32, 232449, 0, (size_t)1, (double *)nullptr);
}

extern "C" void emu_st_die_smem_no_optin(void)
{
    CU_LAUNCH(st_big_smem_kernel, 1, 32, 65536, 0, (size_t)1, (double *)nullptr);
}

extern "C" void emu_st_die_stack_overflow(void)
{
    static int out;
    CU_LAUNCH(st_stack_overflow_kernel, 1, 32, 0, 0, strata_emu::fiber_stack_bytes() + 64 * 1024,
              &out);
}

extern "C" void emu_st_die_deadlock(void)
{
    float out[64];
    CU_LAUNCH(st_deadlock_kernel, 1, 64, 0, 0, out);
}

extern "C" void emu_st_die_divergent_bar(void)
{
    float out[64];
    CU_LAUNCH(st_divergent_bar_kernel, 1, 64, 0, 0, out);
}

extern "C" void emu_st_die_shfl_exited(void)
{
    float out[32];
    CU_LAUNCH(st_shfl_exited_kernel, 1, 32, 0, 0, out);
}

extern "C" void emu_st_die_partial_warp(void)
{
    float out[16];
    CU_LAUNCH(st_partial_warp_kernel, 1, 16, 0, 0, out);
}
