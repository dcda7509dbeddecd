/* launch.h - the launch geometry of kernels.cu's kernels, as pure functions
 * of the shapes (plain C, compiled by gcc into libworker, callable from the
 * .cu launchers and from CPU-side tests), so that the grid, block and
 * shared-memory sizes every launcher uses are checked on machines without a
 * GPU: every element or row covered exactly once, no hardware limit ever
 * exceeded, shapes a kernel cannot run refused before anything is enqueued.
 *
 * Two kinds of plan:
 *   elementwise: a 1-D grid-stride loop over work items (an item is vec
 *     consecutive elements), block LAUNCH_ELEM_BLOCK, grid capped at
 *     LAUNCH_ELEM_GRID_CAP; item u is handled by thread
 *     u mod (grid * block) in loop round u / (grid * block).
 *   rows: blocks stride over rows (row r by block r mod grid.x), the
 *     block's threads stride over the row's items (a multiple of 32
 *     threads, so warp reductions see whole warps); grid.x capped at
 *     LAUNCH_MAX_GRID_X or a per-kernel cap.
 * A plan with grid[0] == 0 means there is nothing to do (n = 0, N = 0):
 * the launcher enqueues nothing and succeeds.
 *
 * Every function returns 0 with *plan filled, or -1 with err naming the
 * dimension it refuses (and *plan zeroed). */
#ifndef STRATA_CUDA_LAUNCH_H
#define STRATA_CUDA_LAUNCH_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Hardware limits of sm_80 / sm_90 that plans stay within. */
#define LAUNCH_MAX_BLOCK 1024u
#define LAUNCH_MAX_GRID_X 2147483647u
#define LAUNCH_MAX_GRID_YZ 65535u
#define LAUNCH_SMEM_DEFAULT ((size_t)48 * 1024)
#define LAUNCH_SMEM_OPTIN ((size_t)227 * 1024)
/* Static shared memory the kernels declare beside the dynamic (reduction
 * scratch: at most 32 doubles + 32 floats); the limits above bound the
 * sum, so dynamic plans stay this much below them. */
#define LAUNCH_SMEM_STATIC_RESERVE ((size_t)1024)
#define LAUNCH_SMEM_DYN_DEFAULT (LAUNCH_SMEM_DEFAULT - LAUNCH_SMEM_STATIC_RESERVE)
#define LAUNCH_SMEM_DYN_OPTIN (LAUNCH_SMEM_OPTIN - LAUNCH_SMEM_STATIC_RESERVE)

/* Elementwise kernels: 256 threads, at most 4096 blocks (about 8 waves of
 * resident blocks on a 132-SM GPU; past that each thread loops instead,
 * which amortises its index arithmetic). */
#define LAUNCH_ELEM_BLOCK 256u
#define LAUNCH_ELEM_GRID_CAP 4096u
/* Largest element count any plan accepts: item and stride arithmetic in
 * size_t then never overflows (2^62 floats is far beyond any device). */
#define LAUNCH_MAX_ELEMS ((size_t)1 << 62)
/* rmsnorm_backward with dweight: each block keeps C double partial sums
 * of dweight in shared memory over its rows and adds them to dweight with
 * one atomicAdd per column at its end, so fewer blocks mean fewer
 * atomics; 1024 blocks still fill an H200 several times over. */
#define LAUNCH_RMSNORM_DW_GRID_CAP 1024u

typedef struct {
    unsigned grid[3];  /* grid[0] == 0: nothing to launch */
    unsigned block[3];
    size_t smem;       /* dynamic shared memory, bytes */
    bool smem_optin;   /* smem > LAUNCH_SMEM_DYN_DEFAULT: raise the kernel's limit first */
    size_t items;      /* work items the plan's loops cover (elementwise: ceil(n / vec);
                          rows: items per row) */
} launch_plan;

/* Grid-stride plan over n elements taken vec (1, 2 or 4) at a time. */
int launch_elementwise(size_t n, unsigned vec, launch_plan *plan, char *err, size_t errlen);

/* Rows plan: rows rows of width elements, vec (1, 2 or 4) elements per item,
 * blocks of at most max_block threads (a multiple of 32, <= 1024), at most
 * grid_cap blocks (1 .. LAUNCH_MAX_GRID_X). The block is the row's items
 * rounded up to a warp, capped at max_block. width 0 plans no launch. */
int launch_rows(size_t rows, size_t width, unsigned vec, unsigned max_block, unsigned grid_cap,
                launch_plan *plan, char *err, size_t errlen);

/* rmsnorm forward: one block per row, up to 256 threads. */
int launch_rmsnorm(size_t N, size_t C, unsigned vec, launch_plan *plan, char *err,
                   size_t errlen);

/* rmsnorm_backward: as the forward; with dweight, at most
 * LAUNCH_RMSNORM_DW_GRID_CAP blocks and C doubles of shared memory per
 * block (opt-in past LAUNCH_SMEM_DYN_DEFAULT; C past LAUNCH_SMEM_DYN_OPTIN / 8
 * is refused). */
int launch_rmsnorm_backward(size_t N, size_t C, unsigned vec, bool dweight, launch_plan *plan,
                            char *err, size_t errlen);

/* cross_entropy: one block per row, up to 1024 threads; the row is kept in
 * shared memory (V floats) when it fits in LAUNCH_SMEM_DYN_OPTIN, so logits
 * are read from global memory once. V must be in [1, INT_MAX] (targets are
 * ints) when N > 0. */
int launch_cross_entropy(size_t N, size_t V, launch_plan *plan, char *err, size_t errlen);

/* rope_cached: rows of nheads * HS/2 rotated pairs, up to 256 threads.
 * nheads >= 1, HS even and >= 2. */
int launch_rope(size_t N, int nheads, int HS, launch_plan *plan, char *err, size_t errlen);

/* embedding and embedding_backward: rows of C / vec items, up to 256
 * threads. */
int launch_embedding(size_t N, size_t C, unsigned vec, launch_plan *plan, char *err,
                     size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
