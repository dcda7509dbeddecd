/* launch.c - launch plans of kernels.cu (see launch.h). */
#include "worker/engine/cuda/launch.h"

#include "common/util.h"

#include <limits.h>
#include <string.h>

/* Refuses with *plan zeroed, so a caller that ignored the return value
 * still launches nothing. */
static int launch_refuse(launch_plan *plan) {
    memset(plan, 0, sizeof *plan);
    return -1;
}

static size_t launch_div_up(size_t a, size_t b) { return a / b + (a % b != 0); }

static bool launch_vec_ok(unsigned vec) { return vec == 1 || vec == 2 || vec == 4; }

int launch_elementwise(size_t n, unsigned vec, launch_plan *plan, char *err, size_t errlen) {
    memset(plan, 0, sizeof *plan);
    if (!launch_vec_ok(vec)) {
        launch_refuse(plan);
        return err_set(err, errlen, "elementwise launch: vec = %u (1, 2 or 4)", vec);
    }
    if (n > LAUNCH_MAX_ELEMS) {
        launch_refuse(plan);
        return err_set(err, errlen, "elementwise launch: n = %zu exceeds 2^62 elements", n);
    }
    plan->items = launch_div_up(n, vec);
    plan->block[0] = plan->block[1] = plan->block[2] = 1;
    plan->grid[1] = plan->grid[2] = 1;
    if (n == 0) return 0;
    plan->block[0] = LAUNCH_ELEM_BLOCK;
    size_t blocks = launch_div_up(plan->items, LAUNCH_ELEM_BLOCK);
    plan->grid[0] = (unsigned)(blocks < LAUNCH_ELEM_GRID_CAP ? blocks : LAUNCH_ELEM_GRID_CAP);
    return 0;
}

int launch_rows(size_t rows, size_t width, unsigned vec, unsigned max_block, unsigned grid_cap,
                launch_plan *plan, char *err, size_t errlen) {
    memset(plan, 0, sizeof *plan);
    if (!launch_vec_ok(vec)) {
        launch_refuse(plan);
        return err_set(err, errlen, "rows launch: vec = %u (1, 2 or 4)", vec);
    }
    if (max_block < 32 || max_block > LAUNCH_MAX_BLOCK || max_block % 32 != 0) {
        launch_refuse(plan);
        return err_set(err, errlen, "rows launch: max_block = %u (a multiple of 32 up to %u)",
                       max_block, LAUNCH_MAX_BLOCK);
    }
    if (grid_cap < 1 || grid_cap > LAUNCH_MAX_GRID_X) {
        launch_refuse(plan);
        return err_set(err, errlen, "rows launch: grid_cap = %u", grid_cap);
    }
    if (width > LAUNCH_MAX_ELEMS) {
        launch_refuse(plan);
        return err_set(err, errlen, "rows launch: row width %zu exceeds 2^62 elements", width);
    }
    if (width != 0 && rows > LAUNCH_MAX_ELEMS / width) {
        launch_refuse(plan);
        return err_set(err, errlen, "rows launch: %zu rows of %zu exceed 2^62 elements", rows,
                       width);
    }
    plan->items = launch_div_up(width, vec);
    plan->block[0] = plan->block[1] = plan->block[2] = 1;
    plan->grid[1] = plan->grid[2] = 1;
    if (rows == 0 || width == 0) return 0;
    size_t threads = launch_div_up(plan->items, 32) * 32;
    plan->block[0] = (unsigned)(threads < max_block ? threads : max_block);
    plan->grid[0] = (unsigned)(rows < grid_cap ? rows : grid_cap);
    return 0;
}

int launch_rmsnorm(size_t N, size_t C, unsigned vec, launch_plan *plan, char *err,
                   size_t errlen) {
    return launch_rows(N, C, vec, 256, LAUNCH_MAX_GRID_X, plan, err, errlen);
}

int launch_rmsnorm_backward(size_t N, size_t C, unsigned vec, bool dweight, launch_plan *plan,
                            char *err, size_t errlen) {
    if (!dweight) return launch_rows(N, C, vec, 256, LAUNCH_MAX_GRID_X, plan, err, errlen);
    if (C > LAUNCH_SMEM_DYN_OPTIN / sizeof(double)) {
        launch_refuse(plan);
        return err_set(err, errlen,
                       "rmsnorm_backward launch: C = %zu exceeds %zu (dweight partials in "
                       "shared memory)",
                       C, LAUNCH_SMEM_DYN_OPTIN / sizeof(double));
    }
    if (launch_rows(N, C, vec, 256, LAUNCH_RMSNORM_DW_GRID_CAP, plan, err, errlen) != 0)
        return -1;
    if (plan->grid[0] != 0) {
        plan->smem = C * sizeof(double);
        plan->smem_optin = plan->smem > LAUNCH_SMEM_DYN_DEFAULT;
    }
    return 0;
}

int launch_cross_entropy(size_t N, size_t V, launch_plan *plan, char *err, size_t errlen) {
    if (N > 0 && (V == 0 || V > INT_MAX)) {
        launch_refuse(plan);
        return err_set(err, errlen, "cross_entropy launch: V = %zu (1 .. %d)", V, INT_MAX);
    }
    if (launch_rows(N, V, 1, 1024, LAUNCH_MAX_GRID_X, plan, err, errlen) != 0) return -1;
    if (plan->grid[0] != 0 && V <= LAUNCH_SMEM_DYN_OPTIN / sizeof(float)) {
        plan->smem = V * sizeof(float);
        plan->smem_optin = plan->smem > LAUNCH_SMEM_DYN_DEFAULT;
    }
    return 0;
}

int launch_rope(size_t N, int nheads, int HS, launch_plan *plan, char *err, size_t errlen) {
    if (nheads < 1) {
        launch_refuse(plan);
        return err_set(err, errlen, "rope launch: nheads = %d (>= 1)", nheads);
    }
    if (HS < 2 || HS % 2 != 0) {
        launch_refuse(plan);
        return err_set(err, errlen, "rope launch: HS = %d (even, >= 2)", HS);
    }
    return launch_rows(N, (size_t)nheads * (size_t)(HS / 2), 1, 256, LAUNCH_MAX_GRID_X, plan,
                       err, errlen);
}

int launch_embedding(size_t N, size_t C, unsigned vec, launch_plan *plan, char *err,
                     size_t errlen) {
    return launch_rows(N, C, vec, 256, LAUNCH_MAX_GRID_X, plan, err, errlen);
}
