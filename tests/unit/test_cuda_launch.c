/* test_cuda_launch - the launch plans of worker/engine/cuda/kernels.cu
 * (launch.h), checked on the CPU: every plan within sm_80/sm_90 limits,
 * every element or row covered exactly once by the loops the kernels run
 * over grid * block (simulated here with the kernels' own index
 * arithmetic), huge shapes never overflowing a limit, n = 0 launching
 * nothing, and shapes the kernels cannot run refused with an error naming
 * the dimension. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "worker/engine/cuda/launch.h"

/* The hardware limits every plan must respect. */
static void check_limits(const launch_plan *p) {
    if (p->grid[0] == 0) return; /* nothing launched */
    for (int d = 0; d < 3; d++) {
        assert_true(p->block[d] >= 1);
        assert_true(p->grid[d] >= 1);
    }
    assert_true((uint64_t)p->block[0] * p->block[1] * p->block[2] <= LAUNCH_MAX_BLOCK);
    assert_true(p->grid[0] <= LAUNCH_MAX_GRID_X);
    assert_true(p->grid[1] <= LAUNCH_MAX_GRID_YZ);
    assert_true(p->grid[2] <= LAUNCH_MAX_GRID_YZ);
    /* dynamic plus the kernels' static shared memory within the limits */
    assert_true(p->smem + LAUNCH_SMEM_STATIC_RESERVE <= LAUNCH_SMEM_OPTIN);
    assert_int_equal(p->smem_optin, p->smem + LAUNCH_SMEM_STATIC_RESERVE > LAUNCH_SMEM_DEFAULT);
    /* Every kernel reduces or strides over whole warps. */
    assert_int_equal(p->block[0] % 32, 0);
}

/* Runs launch_elementwise's loop as cuk_map_kernel does and checks that
 * each of the n elements is visited exactly once. */
static void cover_elementwise(size_t n, unsigned vec) {
    launch_plan p;
    char err[256] = "";
    assert_int_equal(launch_elementwise(n, vec, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(p.items, (n + vec - 1) / vec);
    if (n == 0) {
        assert_int_equal(p.grid[0], 0);
        return;
    }
    unsigned char *seen = calloc(n, 1);
    assert_non_null(seen);
    size_t stride = (size_t)p.grid[0] * p.block[0];
    for (size_t t = 0; t < stride; t++)
        for (size_t u = t; u < p.items; u += stride)
            for (size_t i = u * vec; i < u * vec + vec && i < n; i++) seen[i]++;
    for (size_t i = 0; i < n; i++)
        if (seen[i] != 1) fail_msg("n %zu vec %u: element %zu seen %d times", n, vec, i, seen[i]);
    free(seen);
}

static void test_elementwise_coverage(void **state) {
    (void)state;
    const size_t ns[] = {0, 1, 3, 5, 255, 256, 257, 1001, 4096 * 256 - 1, 4096 * 256 + 3,
                         3 * 4096 * 256 + 7};
    for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
        cover_elementwise(ns[k], 1);
        cover_elementwise(ns[k], 4);
    }
    /* Past 4096 * 256 items the grid stays at its cap and threads loop. */
    launch_plan p;
    char err[256];
    assert_int_equal(launch_elementwise(3 * 4096 * 256 + 7, 1, &p, err, sizeof err), 0);
    assert_int_equal(p.grid[0], LAUNCH_ELEM_GRID_CAP);
    assert_int_equal(p.block[0], LAUNCH_ELEM_BLOCK);
    assert_int_equal(launch_elementwise(1001, 4, &p, err, sizeof err), 0);
    assert_int_equal(p.grid[0], 1); /* 251 items */
}

/* Shapes far beyond memory: the plan stays within limits and its loops
 * still reach every item: grid*block threads times the loop's rounds
 * cover items, one round fewer does not. */
static void test_elementwise_huge(void **state) {
    (void)state;
    const size_t ns[] = {(size_t)1 << 40, ((size_t)1 << 40) + 3, (size_t)256000 * 1048576,
                         LAUNCH_MAX_ELEMS};
    for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
        for (unsigned vec = 1; vec <= 4; vec *= 2) {
            launch_plan p;
            char err[256];
            assert_int_equal(launch_elementwise(ns[k], vec, &p, err, sizeof err), 0);
            check_limits(&p);
            assert_int_equal(p.grid[0], LAUNCH_ELEM_GRID_CAP);
            size_t stride = (size_t)p.grid[0] * p.block[0];
            size_t rounds = (p.items + stride - 1) / stride;
            assert_true(rounds * stride >= p.items);
            assert_true((rounds - 1) * stride < p.items);
            /* the kernel's u * K + K stays representable */
            assert_true((p.items - 1) * vec + vec >= ns[k]);
            assert_true(p.items <= SIZE_MAX / vec);
        }
    }
}

static void test_elementwise_refused(void **state) {
    (void)state;
    launch_plan p;
    char err[256] = "";
    assert_int_equal(launch_elementwise(LAUNCH_MAX_ELEMS + 1, 1, &p, err, sizeof err), -1);
    assert_non_null(strstr(err, "n = "));
    assert_int_equal(p.grid[0], 0);
    assert_int_equal(launch_elementwise(SIZE_MAX, 4, &p, err, sizeof err), -1);
    assert_int_equal(launch_elementwise(10, 3, &p, err, sizeof err), -1);
    assert_non_null(strstr(err, "vec = 3"));
    assert_int_equal(launch_elementwise(10, 0, &p, err, sizeof err), -1);
}

/* Runs a rows plan's loops as the row kernels do (rows strided over
 * blocks, items strided over threads, vec elements per item) and checks
 * each of rows * width elements is visited exactly once. */
static void cover_rows(const launch_plan *p, size_t rows, size_t width, unsigned vec) {
    check_limits(p);
    if (rows == 0 || width == 0) {
        assert_int_equal(p->grid[0], 0);
        return;
    }
    assert_int_equal(p->items, (width + vec - 1) / vec);
    unsigned char *seen = calloc(rows * width, 1);
    assert_non_null(seen);
    for (size_t b = 0; b < p->grid[0]; b++)
        for (size_t row = b; row < rows; row += p->grid[0])
            for (size_t t = 0; t < p->block[0]; t++)
                for (size_t i = t * vec; i < width; i += (size_t)p->block[0] * vec)
                    for (size_t j = i; j < i + vec && j < width; j++) seen[row * width + j]++;
    for (size_t e = 0; e < rows * width; e++)
        if (seen[e] != 1)
            fail_msg("rows %zu width %zu vec %u: element (%zu, %zu) seen %d times", rows, width,
                     vec, e / width, e % width, seen[e]);
    free(seen);
}

static void test_rows_coverage(void **state) {
    (void)state;
    const size_t widths[] = {0, 1, 31, 32, 33, 72, 75, 255, 256, 257, 1000, 4100};
    const size_t rows[] = {0, 1, 5, 13};
    const unsigned caps[] = {1, 3, LAUNCH_MAX_GRID_X};
    char err[256];
    for (size_t w = 0; w < sizeof widths / sizeof widths[0]; w++)
        for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++)
            for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++)
                for (unsigned vec = 1; vec <= 4; vec *= 2) {
                    launch_plan p;
                    assert_int_equal(launch_rows(rows[r], widths[w], vec, 256, caps[c], &p, err,
                                                 sizeof err),
                                     0);
                    cover_rows(&p, rows[r], widths[w], vec);
                    if (p.grid[0]) {
                        assert_true(p.block[0] <= 256);
                        assert_true(p.grid[0] <= caps[c]);
                    }
                }
    /* The op plans are rows plans too. */
    launch_plan p;
    assert_int_equal(launch_rmsnorm(5, 72, 4, &p, err, sizeof err), 0);
    assert_int_equal(p.block[0], 32); /* 18 items */
    assert_int_equal(p.grid[0], 5);
    cover_rows(&p, 5, 72, 4);
    assert_int_equal(launch_rmsnorm(5, 75, 1, &p, err, sizeof err), 0);
    assert_int_equal(p.block[0], 96);
    cover_rows(&p, 5, 75, 1);
    assert_int_equal(launch_rmsnorm(3, 4096, 4, &p, err, sizeof err), 0);
    assert_int_equal(p.block[0], 256);
    cover_rows(&p, 3, 4096, 4);
    assert_int_equal(launch_rmsnorm_backward(5, 72, 1, true, &p, err, sizeof err), 0);
    cover_rows(&p, 5, 72, 1);
    assert_int_equal(p.smem, 72 * sizeof(double));
    assert_int_equal(launch_embedding(23, 75, 1, &p, err, sizeof err), 0);
    cover_rows(&p, 23, 75, 1);
    assert_int_equal(launch_cross_entropy(6, 103, &p, err, sizeof err), 0);
    assert_int_equal(p.block[0], 128);
    assert_int_equal(p.smem, 103 * sizeof(float));
    cover_rows(&p, 6, 103, 1);
    assert_int_equal(launch_rope(7, 3, 10, &p, err, sizeof err), 0);
    assert_int_equal(p.items, 15); /* 3 heads x 5 pairs */
    cover_rows(&p, 7, 15, 1);
}

/* N * C near 2^40 and a 256000-entry vocabulary: grids and blocks within
 * limits, rows beyond the grid cap strided. */
static void test_rows_huge(void **state) {
    (void)state;
    launch_plan p;
    char err[256];
    size_t N = (size_t)1 << 28, C = 4096; /* N*C = 2^40 */
    assert_int_equal(launch_rmsnorm(N, C, 4, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(p.grid[0], (unsigned)N);
    assert_int_equal(p.block[0], 256);
    N = (size_t)1 << 36; /* more rows than grid.x can hold */
    assert_int_equal(launch_rmsnorm(N, 16, 1, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(p.grid[0], LAUNCH_MAX_GRID_X);
    assert_int_equal(p.block[0], 32);
    assert_int_equal(launch_rmsnorm_backward(N, 16, 1, false, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(launch_rmsnorm_backward(N, 16, 1, true, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(p.grid[0], LAUNCH_RMSNORM_DW_GRID_CAP);
    assert_int_equal(launch_embedding(N, 16, 4, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(launch_rope(N, 64, 128, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(p.block[0], 256);

    /* Cross-entropy: V = 256000 rows do not fit in shared memory, so they
     * are read from global memory; V = 32000 rows are cached with opt-in;
     * 57856 floats (226 KiB) is the largest cached row. */
    assert_int_equal(launch_cross_entropy((size_t)1 << 22, 256000, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(p.block[0], 1024);
    assert_int_equal(p.smem, 0);
    assert_int_equal(launch_cross_entropy(8192, 32000, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(p.smem, 32000 * sizeof(float));
    assert_true(p.smem_optin);
    assert_int_equal(launch_cross_entropy(4, 57856, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(p.smem, 57856 * 4);
    assert_int_equal(launch_cross_entropy(4, 57857, &p, err, sizeof err), 0);
    assert_int_equal(p.smem, 0);
    assert_int_equal(launch_cross_entropy(4, 4096, &p, err, sizeof err), 0);
    assert_false(p.smem_optin); /* 16 KiB */
    assert_int_equal(launch_cross_entropy((size_t)1 << 36, 256000, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(p.grid[0], LAUNCH_MAX_GRID_X);

    /* rmsnorm_backward's dweight partials: opt-in past 6016 columns, the
     * largest C that fits, and the first that does not. */
    assert_int_equal(launch_rmsnorm_backward(64, 4096, 4, true, &p, err, sizeof err), 0);
    assert_false(p.smem_optin);
    assert_int_equal(launch_rmsnorm_backward(64, 8192, 4, true, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_true(p.smem_optin);
    assert_int_equal(p.smem, 8192 * sizeof(double));
    size_t cmax = 28928; /* 226 KiB of doubles */
    assert_int_equal(launch_rmsnorm_backward(64, cmax, 1, true, &p, err, sizeof err), 0);
    check_limits(&p);
    assert_int_equal(launch_rmsnorm_backward(64, cmax + 1, 1, false, &p, err, sizeof err), 0);
}

static void test_nothing_to_launch(void **state) {
    (void)state;
    launch_plan p;
    char err[256];
    assert_int_equal(launch_elementwise(0, 4, &p, err, sizeof err), 0);
    assert_int_equal(p.grid[0], 0);
    assert_int_equal(launch_rmsnorm(0, 4096, 4, &p, err, sizeof err), 0);
    assert_int_equal(p.grid[0], 0);
    assert_int_equal(launch_rmsnorm(7, 0, 1, &p, err, sizeof err), 0);
    assert_int_equal(p.grid[0], 0);
    assert_int_equal(launch_rmsnorm_backward(0, 8192, 4, true, &p, err, sizeof err), 0);
    assert_int_equal(p.grid[0], 0);
    assert_int_equal(p.smem, 0);
    assert_int_equal(launch_cross_entropy(0, 0, &p, err, sizeof err), 0);
    assert_int_equal(p.grid[0], 0);
    assert_int_equal(launch_cross_entropy(0, 32000, &p, err, sizeof err), 0);
    assert_int_equal(p.grid[0], 0);
    assert_int_equal(p.smem, 0);
    assert_int_equal(launch_rope(0, 4, 64, &p, err, sizeof err), 0);
    assert_int_equal(p.grid[0], 0);
    assert_int_equal(launch_embedding(0, 64, 4, &p, err, sizeof err), 0);
    assert_int_equal(p.grid[0], 0);
}

static void expect_refused(int rc, const launch_plan *p, const char *err, const char *needle) {
    assert_int_equal(rc, -1);
    assert_int_equal(p->grid[0], 0);
    if (!strstr(err, needle)) fail_msg("error \"%s\" does not name \"%s\"", err, needle);
}

static void test_refused_shapes(void **state) {
    (void)state;
    launch_plan p;
    char err[256];
    expect_refused(launch_cross_entropy(3, 0, &p, err, sizeof err), &p, err, "V = 0");
    expect_refused(launch_cross_entropy(3, (size_t)1 << 31, &p, err, sizeof err), &p, err,
                   "V = 2147483648");
    expect_refused(launch_rmsnorm_backward(2, 28929, 1, true, &p, err, sizeof err), &p, err,
                   "C = 28929");
    expect_refused(launch_rope(4, 2, 7, &p, err, sizeof err), &p, err, "HS = 7");
    expect_refused(launch_rope(4, 2, 0, &p, err, sizeof err), &p, err, "HS = 0");
    expect_refused(launch_rope(4, 0, 8, &p, err, sizeof err), &p, err, "nheads = 0");
    expect_refused(launch_rope(0, -1, 8, &p, err, sizeof err), &p, err, "nheads = -1");
    expect_refused(launch_rows(4, 8, 1, 100, 10, &p, err, sizeof err), &p, err,
                   "max_block = 100");
    expect_refused(launch_rows(4, 8, 1, 2048, 10, &p, err, sizeof err), &p, err,
                   "max_block = 2048");
    expect_refused(launch_rows(4, 8, 1, 256, 0, &p, err, sizeof err), &p, err, "grid_cap = 0");
    expect_refused(launch_rows(4, 8, 5, 256, 10, &p, err, sizeof err), &p, err, "vec = 5");
    expect_refused(launch_rows((size_t)1 << 40, (size_t)1 << 30, 1, 256, 10, &p, err,
                               sizeof err),
                   &p, err, "rows");
    expect_refused(launch_embedding(2, LAUNCH_MAX_ELEMS + 1, 1, &p, err, sizeof err), &p, err,
                   "width");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_elementwise_coverage), cmocka_unit_test(test_elementwise_huge),
        cmocka_unit_test(test_elementwise_refused),  cmocka_unit_test(test_rows_coverage),
        cmocka_unit_test(test_rows_huge),            cmocka_unit_test(test_nothing_to_launch),
        cmocka_unit_test(test_refused_shapes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
