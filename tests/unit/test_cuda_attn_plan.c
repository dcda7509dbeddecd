/* test_cuda_attn_plan.c - the CUDA attention kernels' launch geometry
 * (worker/engine/cuda/attn_plan.h), checked on the CPU: every (sequence,
 * head, query tile) gets exactly one forward / stats / dq block, every
 * (sequence, query head, key tile) is summed by exactly one dkv block of
 * its kv head, the backward's chunks partition the query pairs and their
 * statistics fit the op's 2*T*T-float scratch, launches stay inside the
 * GPU's limits for huge shapes, and refused shapes say why. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker/engine/cuda/attn_plan.h"

/* The limits a GPU enforces on a launch, and the plan's own promises. */
static void check_launch(const attn_launch *l, unsigned threads) {
    assert_true(l->grid[0] >= 1 && l->grid[0] <= ATTN_GRID_X_MAX);
    assert_true(l->grid[1] >= 1 && l->grid[1] <= ATTN_GRID_Y_MAX);
    assert_int_equal(l->grid[2], 1);
    assert_int_equal(l->block[0], threads);
    assert_int_equal(l->block[1], 1);
    assert_int_equal(l->block[2], 1);
    assert_true(l->block[0] <= 1024);
    assert_true(l->smem <= ATTN_SMEM_OPTIN_MAX);
    assert_int_equal(l->optin, l->smem > ATTN_SMEM_DEFAULT);
}

/* Every forward block decodes to a distinct (b, h, tile) and all of them
 * are reached. */
static void check_forward_cover(const attn_plan *p) {
    size_t n = p->pairs * p->tiles;
    unsigned char *seen = calloc(n, 1);
    assert_non_null(seen);
    check_launch(&p->forward, ATTN_QWARPS * ATTN_WARP);
    assert_int_equal(p->forward.grid[0], p->pairs);
    assert_int_equal(p->forward.grid[1], p->tiles);
    assert_int_equal(p->forward.smem, attn_smem_forward(p->HS));
    for (unsigned by = 0; by < p->forward.grid[1]; by++)
        for (unsigned bx = 0; bx < p->forward.grid[0]; bx++) {
            int b, h;
            unsigned tile;
            attn_block_query(0, bx, by, p->NH, p->tiles, &b, &h, &tile);
            assert_true(b >= 0 && b < p->B && h >= 0 && h < p->NH && tile < p->tiles);
            size_t i = ((size_t)b * (size_t)p->NH + (size_t)h) * p->tiles + tile;
            assert_int_equal(seen[i], 0);
            seen[i] = 1;
        }
    for (size_t i = 0; i < n; i++) assert_int_equal(seen[i], 1);
    /* The last query tile (most keys) is launched first. */
    int b, h;
    unsigned tile;
    attn_block_query(0, 0, 0, p->NH, p->tiles, &b, &h, &tile);
    assert_int_equal(tile, p->tiles - 1);
    free(seen);
}

/* The backward's chunks: query pairs partitioned in order, statistics
 * within scratch, stats/dq blocks once per (pair, tile), and dkv blocks
 * summing each (b, h, key tile) exactly once, from a block of h's kv head. */
static void check_backward_cover(const attn_plan *p) {
    size_t n = p->pairs * p->tiles;
    unsigned char *seen_q = calloc(n, 1), *seen_kv = calloc(n, 1);
    assert_true(seen_q && seen_kv);
    assert_true(p->chunk_pairs >= 1);
    assert_true(2 * p->chunk_pairs * (size_t)p->T <= 2 * (size_t)p->T * (size_t)p->T);
    size_t next = 0;
    for (size_t c = 0; c < p->chunks; c++) {
        attn_chunk ch;
        attn_plan_chunk(p, c, &ch);
        assert_int_equal(ch.pair0, next);
        assert_true(ch.pair1 > ch.pair0 && ch.pair1 - ch.pair0 <= p->chunk_pairs);
        next = ch.pair1;
        check_launch(&ch.stats, ATTN_QWARPS * ATTN_WARP);
        check_launch(&ch.dq, ATTN_QWARPS * ATTN_WARP);
        check_launch(&ch.dkv, ATTN_KWARPS * ATTN_WARP);
        assert_int_equal(ch.stats.smem, attn_smem_forward(p->HS));
        assert_int_equal(ch.dq.smem, attn_smem_dq(p->HS));
        assert_int_equal(ch.dkv.smem, attn_smem_dkv(p->HS));
        assert_int_equal(ch.stats.grid[0], ch.pair1 - ch.pair0);
        assert_int_equal(ch.dq.grid[0], ch.pair1 - ch.pair0);
        assert_int_equal(ch.dkv.grid[0], ch.kv1 - ch.kv0);
        /* stats and dq grids share geometry: one walk checks both */
        assert_memory_equal(ch.stats.grid, ch.dq.grid, sizeof ch.dq.grid);
        for (unsigned by = 0; by < ch.dq.grid[1]; by++)
            for (unsigned bx = 0; bx < ch.dq.grid[0]; bx++) {
                int b, h;
                unsigned tile;
                attn_block_query(ch.pair0, bx, by, p->NH, p->tiles, &b, &h, &tile);
                size_t pair = (size_t)b * (size_t)p->NH + (size_t)h;
                assert_true(pair >= ch.pair0 && pair < ch.pair1 && tile < p->tiles);
                size_t i = pair * p->tiles + tile;
                assert_int_equal(seen_q[i], 0);
                seen_q[i] = 1;
                /* the kernels index statistics by pair - pair0 */
                assert_true((pair - ch.pair0 + 1) * (size_t)p->T <= p->chunk_pairs * (size_t)p->T);
            }
        for (unsigned by = 0; by < ch.dkv.grid[1]; by++)
            for (unsigned bx = 0; bx < ch.dkv.grid[0]; bx++) {
                int b, g, h0, h1;
                unsigned tile;
                attn_block_key(ch.kv0, bx, by, p->NKV, &b, &g, &tile);
                assert_true(b >= 0 && b < p->B && g >= 0 && g < p->NKV && tile < p->tiles);
                attn_chunk_heads(ch.pair0, ch.pair1, b, g, p->NH, p->group, &h0, &h1);
                assert_true(h0 <= h1);
                for (int h = h0; h < h1; h++) {
                    assert_int_equal(h / p->group, g);
                    size_t pair = (size_t)b * (size_t)p->NH + (size_t)h;
                    assert_true(pair >= ch.pair0 && pair < ch.pair1);
                    size_t i = pair * p->tiles + tile;
                    assert_int_equal(seen_kv[i], 0);
                    seen_kv[i] = 1;
                }
            }
        /* the first key tile (most queries) is launched first */
        int b, g;
        unsigned tile;
        attn_block_key(ch.kv0, 0, 0, p->NKV, &b, &g, &tile);
        assert_int_equal(tile, 0);
    }
    assert_int_equal(next, p->pairs);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(seen_q[i], 1);
        assert_int_equal(seen_kv[i], 1);
    }
    free(seen_q);
    free(seen_kv);
}

static void plan_ok(attn_plan *p, int B, int T, int NH, int NKV, int HS) {
    char err[256] = "";
    int rc = attn_plan_make(p, B, T, NH, NKV, HS, err, sizeof err);
    if (rc != 0) fail_msg("B %d T %d NH %d NKV %d HS %d refused: %s", B, T, NH, NKV, HS, err);
    assert_int_equal(p->tiles, ((unsigned)T + ATTN_TILE - 1) / ATTN_TILE);
    assert_int_equal(p->pairs, (size_t)B * (size_t)NH);
    assert_int_equal(p->group, NH / NKV);
    assert_true(p->nv * ATTN_WARP >= HS);
    assert_true(p->nv == 1 || (p->nv / 2) * ATTN_WARP < HS);
    assert_int_equal(p->chunks, (p->pairs + p->chunk_pairs - 1) / p->chunk_pairs);
}

static void test_cover(void **state) {
    (void)state;
    static const int shapes[][5] = {
        /* B, T, NH, NKV, HS */
        {1, 1, 1, 1, 8},     {2, 40, 4, 2, 16},  {3, 33, 4, 4, 64},  {2, 1, 4, 2, 8},
        {3, 3, 4, 2, 64},    {4, 7, 32, 8, 128}, {2, 100, 8, 1, 256}, {5, 64, 6, 3, 40},
        {1, 2, 8, 8, 33},    {7, 31, 12, 4, 96}, {2, 1024, 32, 8, 128},
    };
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int *x = shapes[s];
        attn_plan p;
        plan_ok(&p, x[0], x[1], x[2], x[3], x[4]);
        check_forward_cover(&p);
        check_backward_cover(&p);
    }
}

/* Small T with many heads makes several chunks; whole kv groups per chunk
 * where T allows, partial groups (two chunks per kv head) where it does
 * not. */
static void test_chunks(void **state) {
    (void)state;
    attn_plan p;
    plan_ok(&p, 3, 3, 4, 2, 16);
    assert_int_equal(p.chunk_pairs, 2);
    assert_int_equal(p.chunks, 6);
    plan_ok(&p, 2, 1, 8, 2, 16); /* group 4 > T 1 */
    assert_int_equal(p.chunk_pairs, 1);
    assert_int_equal(p.chunks, 16);
    check_backward_cover(&p);
    plan_ok(&p, 4, 2048, 32, 8, 128); /* LLaMA-like: one chunk */
    assert_int_equal(p.chunks, 1);
    assert_int_equal(p.chunk_pairs, 128);
}

/* Shared memory per head size: no opt-in up to HS 64 for every kernel,
 * opt-in within 227 KiB up to 256. */
static void test_smem(void **state) {
    (void)state;
    for (int hs = 1; hs <= 64; hs++) {
        assert_true(attn_smem_forward(hs) <= ATTN_SMEM_DEFAULT);
        assert_true(attn_smem_dq(hs) <= ATTN_SMEM_DEFAULT);
        assert_true(attn_smem_dkv(hs) <= ATTN_SMEM_DEFAULT);
    }
    assert_true(attn_smem_forward(ATTN_MAX_HS) <= ATTN_SMEM_OPTIN_MAX);
    assert_true(attn_smem_dq(ATTN_MAX_HS) <= ATTN_SMEM_OPTIN_MAX);
    assert_true(attn_smem_dkv(ATTN_MAX_HS) <= ATTN_SMEM_OPTIN_MAX);
    attn_plan p;
    plan_ok(&p, 1, 64, 2, 2, 128);
    assert_true(p.forward.optin);
    assert_int_equal(p.nv, 4);
    plan_ok(&p, 1, 64, 2, 2, 64);
    assert_false(p.forward.optin);
    assert_int_equal(p.nv, 2);
}

/* Huge shapes at the grid's limits are planned without overflow; one past
 * them is refused. */
static void test_limits(void **state) {
    (void)state;
    attn_plan p;
    plan_ok(&p, 1, 4096, 2147483647, 1, 64);
    assert_int_equal(p.forward.grid[0], ATTN_GRID_X_MAX);
    plan_ok(&p, 65536, 32768, 32767, 1, 128); /* B*NH = 2^31 - 2^16 */
    assert_int_equal(p.forward.grid[0], 65536u * 32767u);
    assert_int_equal(p.forward.grid[1], 1024);
    attn_chunk ch;
    attn_plan_chunk(&p, p.chunks - 1, &ch);
    assert_int_equal(ch.pair1, p.pairs);
    assert_true(ch.dkv.grid[0] <= ATTN_GRID_X_MAX);
    plan_ok(&p, 1, (int)(ATTN_GRID_Y_MAX * ATTN_TILE), 1, 1, 128);
    assert_int_equal(p.forward.grid[1], ATTN_GRID_Y_MAX);
    plan_ok(&p, 2, 4096, 32, 8, 128);
    assert_int_equal(p.forward.grid[1], 128);
    assert_int_equal(p.forward.grid[0], 64);

    char err[256];
    assert_int_equal(attn_plan_make(&p, 65536, 64, 32768, 1, 64, err, sizeof err), -1);
    assert_non_null(strstr(err, "B*NH"));
    assert_int_equal(
        attn_plan_make(&p, 1, (int)(ATTN_GRID_Y_MAX * ATTN_TILE) + 1, 1, 1, 64, err, sizeof err),
        -1);
    assert_non_null(strstr(err, "T "));
}

static void refused(int B, int T, int NH, int NKV, int HS, const char *needle) {
    attn_plan p;
    char err[256] = "";
    assert_int_equal(attn_plan_make(&p, B, T, NH, NKV, HS, err, sizeof err), -1);
    if (!strstr(err, needle)) fail_msg("error '%s' does not name '%s'", err, needle);
}

static void test_refusals(void **state) {
    (void)state;
    refused(2, 16, 4, 2, 257, "HS 257");
    refused(2, 16, 4, 2, 512, "HS 512");
    refused(2, 16, 4, 3, 64, "NH 4 is not a multiple of NKV 3");
    refused(0, 16, 4, 2, 64, "B 0");
    refused(2, 0, 4, 2, 64, "T 0");
    refused(2, 16, 0, 2, 64, "NH 0");
    refused(2, 16, 4, 0, 64, "NKV 0");
    refused(2, 16, 4, 2, 0, "HS 0");
    refused(-1, 16, 4, 2, 64, "B -1");
    attn_plan p;
    plan_ok(&p, 2, 16, 4, 2, 256);
    assert_int_equal(p.nv, 8);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cover),  cmocka_unit_test(test_chunks),
        cmocka_unit_test(test_smem),   cmocka_unit_test(test_limits),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
