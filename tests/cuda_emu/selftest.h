/* selftest.h - kernels that exercise every feature of the CUDA emulator
 * (selftest.cc, compiled with -DSTRATA_CUDA_EMU), callable from the C test
 * tests/unit/test_cudaemu_emu.c. Every pointer argument is host memory: the
 * functions copy through cudaMalloc'd buffers themselves. They return 0, or
 * -1 with err naming the failed CUDA call. The emu_st_die_* functions make
 * a launch the GPU would refuse or hang on and are expected to abort. */
#ifndef STRATA_CUDA_EMU_SELFTEST_H
#define STRATA_CUDA_EMU_SELFTEST_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Block reduction in static shared memory with __syncthreads: block b sums
 * x[b*block .. b*block+block) (missing elements count 0) into
 * block_sums[b] (grid = ceil(n / block) floats), and every block
 * atomicAdds its sum as a double into *total. block is a power of two. */
int emu_st_block_sum(const float *x, size_t n, unsigned block, float *block_sums, double *total,
                     char *err, size_t errlen);

/* One block of nthreads (a multiple of 32) threads; per thread t (lane l
 * of its warp):
 *   xor_sum[t]  = the warp's sum of x by a __shfl_xor_sync butterfly
 *   down_sum[t] = the __shfl_down_sync tree (the warp's sum at lane 0)
 *   down16[t]   = __shfl_down_sync(x[t], 16) (x[t] itself for l >= 16)
 *   ixor[t]     = __shfl_xor_sync(int 3 * t, 5)
 *   udown[t]    = __shfl_down_sync(unsigned 7 * t, 1)
 *   dxor[t]     = __shfl_xor_sync(double x[t] * 1e10 + t, 31)
 *   synced[t]   = x of lane (l + 1) % 32 written to shared memory before
 *                 a __syncwarp. */
int emu_st_warp(const float *x, unsigned nthreads, float *xor_sum, float *down_sum,
                float *down16, int *ixor, unsigned *udown, double *dxor, float *synced,
                char *err, size_t errlen);

/* A (gx, gy, gz) grid of (bx, by, bz) blocks: the thread with linear id
 * id = (((bz_ * gy + by_) * gx + bx_) * (bx * by * bz) + (tz * by + ty) * bx + tx)
 * adds 1 to count[id] and writes its blockIdx and threadIdx to
 * idx[6 * id .. 6 * id + 6); *dims_wrong counts threads that saw blockDim and
 * gridDim different from the launch's. count and idx have one (six) entries
 * per thread of the grid. */
int emu_st_indices(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned *count, unsigned *idx, unsigned *dims_wrong, char *err,
                   size_t errlen);

/* Dynamic shared memory: per block of `block` threads over n floats,
 * first_read[i] = the block's dynamic shared memory at thread i's slot
 * before anything wrote it, out[i] = x of the mirrored thread of the same
 * block (block - 1 - t, elements past n reading 0). */
int emu_st_dyn_smem(const float *x, size_t n, unsigned block, float *out, float *first_read,
                    char *err, size_t errlen);

/* In a kernel: bf[i] = __float2bfloat16(x[i]) bits, h[i] = __float2half
 * bits, bf_back / h_back = those widened back to float. */
int emu_st_convert(const float *x, size_t n, uint16_t *bf, uint16_t *h, float *bf_back,
                   float *h_back, char *err, size_t errlen);

/* A block of nthreads where threads >= live return at once and the rest sum
 * their x[t] through shared memory across several __syncthreads: returns the
 * sum (seen by thread 0) in *sum. nthreads <= 1024. */
int emu_st_partial_exit(const float *x, unsigned nthreads, unsigned live, float *sum,
                        char *err, size_t errlen);

/* Dynamic shared memory over 48 KiB after cudaFuncSetAttribute opted in:
 * a block of 256 threads fills smem_bytes of it and sums it back; *sum is
 * the result (smem_bytes / 4 ones). */
int emu_st_big_smem(size_t smem_bytes, double *sum, char *err, size_t errlen);

/* A block of nthreads threads (a multiple of 32, <= 1024): thread t
 * writes x[t] to dynamic shared memory and then reads the slot of thread
 * t - 1 (thread 0: its own): out[t] = x[t - 1], out[0] = x[0]. With
 * with_barrier 0 there is no __syncthreads between the write and the
 * read: a race a GPU may lose, which the forward schedule hides (thread
 * t - 1 always runs first) and reverse or shuffle expose (NaN, the
 * poison, or a wrong value in out). */
int emu_st_neighbour(const float *x, unsigned nthreads, int with_barrier, float *out, char *err,
                     size_t errlen);

/* A block of nthreads threads (a multiple of 32, <= 1024) sums x twice
 * through one shared array of per-warp partials: sum1[t] = the sum of x,
 * sum2[t] = the sum of 2x, in every thread. With with_barrier 0 the second
 * sum's partials are written without the barrier that keeps them from
 * overwriting what a slower warp has still to read of the first: forward
 * keeps warps in lockstep and passes; reverse (and shuffle, when a later
 * warp runs first) lets a warp run ahead, and some threads see a wrong
 * sum1. */
int emu_st_two_sums(const float *x, unsigned nthreads, int with_barrier, float *sum1,
                    float *sum2, char *err, size_t errlen);

/* The schedule's orders, seen from inside a kernel: a grid of nblocks
 * blocks of nthreads threads, where block_rank[b] is the position at
 * which block b started (0 first) and rank0 / rank1[b * nthreads + t]
 * the position at which thread t of block b ran its part before / after
 * a __syncthreads, among its block's threads. */
int emu_st_order(unsigned nblocks, unsigned nthreads, unsigned *block_rank, unsigned *rank0,
                 unsigned *rank1, char *err, size_t errlen);

/* The emulator's schedule (tests/cuda_emu/README.md): sets it by name
 * ("forward", "reverse", "shuffle") and seed for the launches that follow
 * (returns 0, or -1 for an unknown name); gets its name and seed; reloads
 * it from STRATA_EMU_SCHEDULE / STRATA_EMU_SEED (aborting on a value it
 * does not know). */
int emu_st_schedule_set(const char *name, uint64_t seed);
const char *emu_st_schedule_get(uint64_t *seed);
void emu_st_schedule_reload(void);

/* The cudart subset: allocation, copies and their pointer checks, memory
 * limits (STRATA_EMU_MEMORY), streams, devices, properties, errors. Returns
 * the number of failed checks and names the first in what. */
int emu_st_cudart(char *what, size_t whatlen);

/* Each aborts the process (run them in a child). */
void emu_st_die_block_too_big(void);   /* 1025 threads */
void emu_st_die_zero_grid(void);       /* grid.y == 0 */
void emu_st_die_smem_too_big(void);    /* 232449 bytes of dynamic smem */
void emu_st_die_smem_no_optin(void);   /* 64 KiB without cudaFuncSetAttribute */
void emu_st_die_deadlock(void);        /* half a warp shuffles, the rest waits at a barrier */
void emu_st_die_divergent_bar(void);   /* __syncthreads in both branches of a divergent if */
void emu_st_die_shfl_exited(void);     /* a lane exits, the others shuffle */
void emu_st_die_partial_warp(void);    /* full-mask shuffle in a 16-thread block */
/* A thread allocates more stack than it has: faults (SIGSEGV, or ASan's
 * stack-overflow report) rather than writing over another thread's stack. */
void emu_st_die_stack_overflow(void);

#ifdef __cplusplus
}
#endif

#endif
