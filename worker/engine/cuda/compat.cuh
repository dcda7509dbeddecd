/* compat.cuh - the CUDA subset strata's kernels and backend are written in,
 * so that the same .cu files compile two ways:
 *
 *   nvcc (sm_80, sm_90): the real thing, linked into strata-worker;
 *   g++ -x c++ -DSTRATA_CUDA_EMU: every kernel runs on the CPU under the
 *     emulator in tests/cuda_emu/emu.h (a grid of blocks, each block's
 *     threads as cooperative fibers), so `make test` checks the kernels'
 *     indexing, reductions and masking against the CPU backend on machines
 *     without a GPU.
 *
 * What a kernel may use (the emulator implements exactly this):
 *   threadIdx, blockIdx, blockDim, gridDim (.x .y .z, unsigned);
 *   __global__, __device__, __host__, __forceinline__, __restrict__;
 *   static __shared__ arrays inside a kernel, and dynamic shared memory
 *     declared with CU_DYN_SMEM(type, name) (never `extern __shared__`);
 *   __syncthreads();
 *   __shfl_xor_sync(CU_FULL_MASK, v, lane_mask) and __shfl_down_sync with
 *     the full mask only, called by every lane of the warp (warpSize 32);
 *   atomicAdd on float and double in global or shared memory;
 *   __nv_bfloat16 / __half with __float2bfloat16, __bfloat162float,
 *     __float2half, __half2float;
 *   the float maths functions of <math.h> (expf, logf, sqrtf, rsqrtf,
 *     fmaxf, sinf, cosf, ...) and __expf, plus double versions;
 *   templates and ordinary C++ inside kernels.
 * Launch kernels only through CU_LAUNCH. Host code (the backend) may use the
 * cudart calls the emulator provides: cudaMalloc, cudaFree, cudaMallocHost,
 * cudaFreeHost, cudaMemcpy, cudaMemcpyAsync, cudaMemsetAsync,
 * cudaStreamCreate, cudaStreamDestroy, cudaStreamSynchronize,
 * cudaDeviceSynchronize, cudaSetDevice, cudaGetDevice, cudaGetDeviceCount,
 * cudaGetDeviceProperties (name, totalGlobalMem, major, minor,
 * multiProcessorCount, sharedMemPerBlockOptin), cudaMemGetInfo,
 * cudaGetLastError, cudaPeekAtLastError, cudaGetErrorString,
 * cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, n),
 * cudaDriverGetVersion, cudaRuntimeGetVersion. Matrix products go through
 * gemm.h, never cuBLAS directly, because the emulator replaces that file. */
#ifndef STRATA_CUDA_COMPAT_CUH
#define STRATA_CUDA_COMPAT_CUH

#ifdef STRATA_CUDA_EMU
#include "tests/cuda_emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

/* CU_LAUNCH(kernel, grid, block, smem_bytes, stream, args...) */
#define CU_LAUNCH(kernel, grid, block, smem, stream, ...) \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
/* Dynamic shared memory as a typed pointer named name. */
#define CU_DYN_SMEM(type, name)                                   \
    extern __shared__ __align__(16) unsigned char cu_dyn_smem_[]; \
    type *name = reinterpret_cast<type *>(cu_dyn_smem_)
#endif

#define CU_FULL_MASK 0xffffffffu
#define CU_WARP 32

#endif
