/* test_forward.c - the LLaMA forward pass (worker/engine/forward.c on the CPU
 * backend) against tests/reference/: tiny Hugging Face-layout models loaded
 * with llama_load_hf (gqa: GQA, untied, F32; tied: BF16; sharded: F16 in two
 * shards; chat: multi-query, tied), each with a right-padded batch from its
 * expected.json, and the reference's float64 PyTorch hidden states (all L+1)
 * and logits at every real position.
 *
 * Tolerances: vs the reference, per file, max |C - ref| <= 1e-4 * max |ref|
 * (REF_REL_TOL, the reference's stated tolerance). Batch invariance (one
 * example alone vs in a padded batch, vs padded further with junk ids):
 * max |a - b| <= 1e-6 * max |a| (BATCH_REL_TOL). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/testutil.h"
#include "common/npy.h"
#include "common/util.h"
#include "worker/engine/backend.h"
#include "worker/engine/forward.h"
#include "worker/engine/model.h"

#define REF_REL_TOL 1e-4
#define BATCH_REL_TOL 1e-6
#define MAX_B 8
#define MAX_LAYERS 8

static char reference_dir[PATH_MAX + 64];

/* Where this test's fixtures are (testutil.h). */
static void find_reference(void) {
    tu_reference_path(reference_dir, sizeof reference_dir, "");
}

/* One reference model with its batch. */
typedef struct {
    llama_model model;
    json_t *expected;
    int B, T, L, C, V;
    int lengths[MAX_B];
    int offsets[MAX_B];
    int *tokens; /* (B, T) */
    int n_tokens;
} ref_case;

static void ref_load(ref_case *rc, const char *name) {
    memset(rc, 0, sizeof *rc);
    char dir[PATH_MAX + 128], path[PATH_MAX + 256], err[ERR_LEN];
    snprintf(dir, sizeof dir, "%s/%s", reference_dir, name);
    if (llama_load_hf(dir, &rc->model, err, sizeof err) != 0) fail_msg("%s: %s", dir, err);
    snprintf(path, sizeof path, "%s/expected.json", dir);
    json_error_t jerr;
    rc->expected = json_load_file(path, 0, &jerr);
    if (!rc->expected) fail_msg("%s: %s", path, jerr.text);
    json_t *batch = json_object_get(rc->expected, "batch");
    json_t *ids = json_object_get(batch, "input_ids"), *lens = json_object_get(batch, "lengths");
    json_t *offs = json_object_get(rc->expected, "offsets");
    rc->T = (int)json_integer_value(json_object_get(batch, "T"));
    rc->B = (int)json_array_size(lens);
    rc->L = (int)json_integer_value(json_object_get(rc->expected, "num_layers"));
    rc->n_tokens = (int)json_integer_value(json_object_get(rc->expected, "n_tokens"));
    rc->C = rc->model.cfg.hidden_size;
    rc->V = rc->model.cfg.vocab_size;
    assert_true(rc->B > 0 && rc->B <= MAX_B && rc->T > 0);
    assert_true(rc->L == rc->model.cfg.num_hidden_layers && rc->L < MAX_LAYERS);
    assert_int_equal(json_array_size(ids), (size_t)rc->B);
    rc->tokens = calloc((size_t)rc->B * (size_t)rc->T, sizeof *rc->tokens);
    assert_non_null(rc->tokens);
    for (int b = 0; b < rc->B; b++) {
        rc->lengths[b] = (int)json_integer_value(json_array_get(lens, (size_t)b));
        rc->offsets[b] = (int)json_integer_value(json_array_get(offs, (size_t)b));
        json_t *row = json_array_get(ids, (size_t)b);
        assert_int_equal(json_array_size(row), (size_t)rc->T);
        for (int t = 0; t < rc->T; t++)
            rc->tokens[b * rc->T + t] = (int)json_integer_value(json_array_get(row, (size_t)t));
    }
}

static void ref_free(ref_case *rc) {
    llama_free(&rc->model);
    json_decref(rc->expected);
    free(rc->tokens);
}

/* Reads reference file name of rc's model as float32 (caller frees). */
static float *ref_read(const char *model, const char *name, size_t rows, size_t cols) {
    char path[PATH_MAX + 256], err[ERR_LEN];
    snprintf(path, sizeof path, "%s/%s/%s", reference_dir, model, name);
    double *d = NULL;
    npy_header h;
    if (npy_read_f64(path, &d, &h, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
    assert_int_equal(h.rows, rows);
    assert_int_equal(h.cols, cols);
    float *f = malloc(rows * cols * sizeof *f);
    assert_non_null(f);
    for (size_t i = 0; i < rows * cols; i++) f[i] = (float)d[i];
    free(d);
    return f;
}

/* The hook's collector: hidden[l] packs each example's real positions,
 * row offsets[b] + t, as the reference files do. */
typedef struct {
    int B, T, C, L;
    const int *lengths, *offsets;
    float *hidden[MAX_LAYERS + 1]; /* (n_tokens, C) each */
    int calls;
    int fail_at; /* layer whose call returns -1, or -1 */
} collector;

static int collect_hook(void *user, int layer, const float *x, int B, int T, int C, char *err,
                        size_t errlen) {
    collector *c = user;
    assert_int_equal(layer, c->calls); /* 0..L in order, once each */
    assert_int_equal(B, c->B);
    assert_int_equal(T, c->T);
    assert_int_equal(C, c->C);
    c->calls++;
    if (layer == c->fail_at) return err_set(err, errlen, "collector refuses layer %d", layer);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < c->lengths[b]; t++)
            memcpy(c->hidden[layer] + (size_t)(c->offsets[b] + t) * (size_t)C,
                   x + ((size_t)b * (size_t)T + (size_t)t) * (size_t)C, (size_t)C * sizeof *x);
    return 0;
}

static void collector_init(collector *c, int B, int T, int C, int L, const int *lengths,
                           const int *offsets, int n_tokens) {
    memset(c, 0, sizeof *c);
    c->B = B, c->T = T, c->C = C, c->L = L;
    c->lengths = lengths, c->offsets = offsets;
    c->fail_at = -1;
    for (int l = 0; l <= L; l++) {
        c->hidden[l] = calloc((size_t)n_tokens * (size_t)C, sizeof(float));
        assert_non_null(c->hidden[l]);
    }
}

static void collector_free(collector *c) {
    for (int l = 0; l <= c->L; l++) free(c->hidden[l]);
}

/* The padded batch against every reference file of model name, on be. */
static void reference_case(const char *name, const backend *be) {
    ref_case rc;
    ref_load(&rc, name);
    llama_state s;
    char err[ERR_LEN];
    if (llama_state_init(&s, be, &rc.model.cfg, rc.B, rc.T, err, sizeof err) != 0)
        fail_msg("state: %s", err);
    collector col;
    collector_init(&col, rc.B, rc.T, rc.C, rc.L, rc.lengths, rc.offsets, rc.n_tokens);
    size_t nlogits = (size_t)rc.B * (size_t)rc.T * (size_t)rc.V;
    float *logits = malloc(nlogits * sizeof *logits);
    assert_non_null(logits);
    if (llama_forward(be, &rc.model, &s, rc.tokens, rc.lengths, rc.B, rc.T, collect_hook, &col,
                      logits, err, sizeof err) != 0)
        fail_msg("forward: %s", err);
    assert_int_equal(col.calls, rc.L + 1);

    for (int l = 0; l <= rc.L; l++) {
        char file[64];
        snprintf(file, sizeof file, "hidden_%d.npy", l);
        float *want = ref_read(name, file, (size_t)rc.n_tokens, (size_t)rc.C);
        double e = tu_rel_err_ff(col.hidden[l], want, (size_t)rc.n_tokens * (size_t)rc.C, file);
        if (e > REF_REL_TOL) fail_msg("%s %s: relative error %g > %g", name, file, e, REF_REL_TOL);
        print_message("%s %s: relative error %.2g\n", name, file, e);
        free(want);
    }
    /* Logits at real positions, packed like the reference. */
    float *packed = malloc((size_t)rc.n_tokens * (size_t)rc.V * sizeof *packed);
    assert_non_null(packed);
    for (int b = 0; b < rc.B; b++)
        for (int t = 0; t < rc.lengths[b]; t++)
            memcpy(packed + (size_t)(rc.offsets[b] + t) * (size_t)rc.V,
                   logits + ((size_t)b * (size_t)rc.T + (size_t)t) * (size_t)rc.V,
                   (size_t)rc.V * sizeof *packed);
    float *want = ref_read(name, "logits.npy", (size_t)rc.n_tokens, (size_t)rc.V);
    double e = tu_rel_err_ff(packed, want, (size_t)rc.n_tokens * (size_t)rc.V, "logits");
    if (e > REF_REL_TOL) fail_msg("%s logits: relative error %g > %g", name, e, REF_REL_TOL);
    print_message("%s logits: relative error %.2g\n", name, e);
    free(want);
    free(packed);
    free(logits);
    collector_free(&col);
    llama_state_free(&s);
    ref_free(&rc);
}

static void test_reference_gqa(void **state) {
    (void)state;
    reference_case("gqa", backend_cpu());
}

static void test_reference_tied(void **state) {
    (void)state;
    reference_case("tied", backend_cpu());
}

static void test_reference_sharded(void **state) {
    (void)state;
    reference_case("sharded", backend_cpu());
}

/* Multi-query attention (NKV 1), tied head, the tokenizer fixture's vocab. */
static void test_reference_chat(void **state) {
    (void)state;
    reference_case("chat", backend_cpu());
}

/* The CPU ops behind a table that says its memory is not the host's, as a
 * GPU backend's is not: forward must then hand the hook and the caller's
 * logits host copies made with download (its staging path). */
static void test_reference_staging_backend(void **state) {
    (void)state;
    backend staged = *backend_cpu();
    staged.name = "cpu-staged";
    staged.host_memory = false;
    reference_case("gqa", &staged);
}

/* Each example run alone at its exact length (B 1, T len), in the reference
 * batch (B 5, T 11), and in a batch of 8 padded to T 16 with junk in the
 * padding (ids out of range, negative) must give the same hidden states and
 * logits at real positions. */
static void test_batch_invariance(void **state) {
    (void)state;
    ref_case rc;
    ref_load(&rc, "gqa");
    const backend *be = backend_cpu();
    char err[ERR_LEN];
    const int B8 = 8, T16 = 16;
    llama_state s;
    if (llama_state_init(&s, be, &rc.model.cfg, B8, T16, err, sizeof err) != 0)
        fail_msg("state: %s", err);
    size_t V = (size_t)rc.V;

    /* Batch of 5 at T 11. */
    collector batch;
    collector_init(&batch, rc.B, rc.T, rc.C, rc.L, rc.lengths, rc.offsets, rc.n_tokens);
    float *logits5 = malloc((size_t)rc.B * (size_t)rc.T * V * sizeof(float));
    assert_non_null(logits5);
    if (llama_forward(be, &rc.model, &s, rc.tokens, rc.lengths, rc.B, rc.T, collect_hook, &batch,
                      logits5, err, sizeof err) != 0)
        fail_msg("forward: %s", err);

    /* Batch of 8 at T 16: the 5 examples in reverse order, then 3 copies
     * of example 2, junk ids in every padding slot. */
    int tokens8[8 * 16], lengths8[8], offsets8[8], src8[8];
    for (int b = 0; b < B8; b++) src8[b] = b < rc.B ? rc.B - 1 - b : 2;
    int n8 = 0;
    for (int b = 0; b < B8; b++) {
        lengths8[b] = rc.lengths[src8[b]];
        offsets8[b] = n8;
        n8 += lengths8[b];
        for (int t = 0; t < T16; t++)
            tokens8[b * T16 + t] = t < lengths8[b] ? rc.tokens[src8[b] * rc.T + t]
                                                    : (t % 2 ? -7 : rc.V + 5 + t);
    }
    collector big;
    collector_init(&big, B8, T16, rc.C, rc.L, lengths8, offsets8, n8);
    float *logits8 = malloc((size_t)B8 * (size_t)T16 * V * sizeof(float));
    assert_non_null(logits8);
    if (llama_forward(be, &rc.model, &s, tokens8, lengths8, B8, T16, collect_hook, &big, logits8,
                      err, sizeof err) != 0)
        fail_msg("forward 8: %s", err);

    double worst = 0.0;
    for (int b = 0; b < B8; b++) {
        int src = src8[b], len = lengths8[b];
        /* The same example alone, reusing the larger state. */
        int off0 = 0;
        collector one;
        collector_init(&one, 1, len, rc.C, rc.L, &len, &off0, len);
        float *logits1 = malloc((size_t)len * V * sizeof(float));
        assert_non_null(logits1);
        if (llama_forward(be, &rc.model, &s, rc.tokens + src * rc.T, &len, 1, len, collect_hook,
                          &one, logits1, err, sizeof err) != 0)
            fail_msg("forward 1: %s", err);
        size_t n = (size_t)len * (size_t)rc.C;
        for (int l = 0; l <= rc.L; l++) {
            const float *in5 = batch.hidden[l] + (size_t)rc.offsets[src] * (size_t)rc.C;
            const float *in8 = big.hidden[l] + (size_t)offsets8[b] * (size_t)rc.C;
            double e5 = tu_rel_err_ff(in5, one.hidden[l], n, "batch 5");
            double e8 = tu_rel_err_ff(in8, one.hidden[l], n, "batch 8");
            if (e5 > BATCH_REL_TOL || e8 > BATCH_REL_TOL)
                fail_msg("example %d layer %d: batch differs from alone by %g / %g", src, l, e5,
                         e8);
            worst = fmax(worst, fmax(e5, e8));
        }
        for (int t = 0; t < len; t++) {
            const float *alone = logits1 + (size_t)t * V;
            double e5 = tu_rel_err_ff(logits5 + ((size_t)src * (size_t)rc.T + (size_t)t) * V,
                                      alone, V, "logits 5");
            double e8 = tu_rel_err_ff(logits8 + ((size_t)b * (size_t)T16 + (size_t)t) * V, alone,
                                      V, "logits 8");
            if (e5 > BATCH_REL_TOL || e8 > BATCH_REL_TOL)
                fail_msg("example %d position %d logits differ by %g / %g", src, t, e5, e8);
            worst = fmax(worst, fmax(e5, e8));
        }
        free(logits1);
        collector_free(&one);
    }
    print_message("batch vs alone: largest relative difference %.2g\n", worst);
    free(logits5);
    free(logits8);
    collector_free(&batch);
    collector_free(&big);
    llama_state_free(&s);
    ref_free(&rc);
}

/* A hook error stops the pass at that layer and is returned as is; bad
 * lengths, token ids at real positions and oversized batches are refused
 * with a message, before any layer runs. */
static void test_errors(void **state) {
    (void)state;
    ref_case rc;
    ref_load(&rc, "gqa");
    const backend *be = backend_cpu();
    char err[ERR_LEN];
    llama_state s;
    if (llama_state_init(&s, be, &rc.model.cfg, rc.B, rc.T, err, sizeof err) != 0)
        fail_msg("state: %s", err);

    collector col;
    collector_init(&col, rc.B, rc.T, rc.C, rc.L, rc.lengths, rc.offsets, rc.n_tokens);
    col.fail_at = 2;
    assert_int_equal(llama_forward(be, &rc.model, &s, rc.tokens, rc.lengths, rc.B, rc.T,
                                   collect_hook, &col, NULL, err, sizeof err),
                     -1);
    assert_string_equal(err, "collector refuses layer 2");
    assert_int_equal(col.calls, 3);

    int lengths[MAX_B];
    memcpy(lengths, rc.lengths, sizeof lengths);
    lengths[1] = 0;
    assert_int_equal(llama_forward(be, &rc.model, &s, rc.tokens, lengths, rc.B, rc.T, NULL, NULL,
                                   NULL, err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "sequence 1 has length 0"));
    lengths[1] = rc.T + 1;
    assert_int_equal(llama_forward(be, &rc.model, &s, rc.tokens, lengths, rc.B, rc.T, NULL, NULL,
                                   NULL, err, sizeof err),
                     -1);

    int saved = rc.tokens[rc.T + 2]; /* example 1 has length 3: position 2 is real */
    rc.tokens[rc.T + 2] = rc.V;
    assert_int_equal(llama_forward(be, &rc.model, &s, rc.tokens, rc.lengths, rc.B, rc.T, NULL,
                                   NULL, NULL, err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "outside vocabulary"));
    rc.tokens[rc.T + 2] = saved;

    assert_int_equal(llama_forward(be, &rc.model, &s, rc.tokens, rc.lengths, rc.B, rc.T + 1, NULL,
                                   NULL, NULL, err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "exceeds"));
    /* Still usable after refusals. */
    assert_int_equal(llama_forward(be, &rc.model, &s, rc.tokens, rc.lengths, rc.B, rc.T, NULL,
                                   NULL, NULL, err, sizeof err),
                     0);

    /* A model whose config differs from the state's is refused. */
    llama_model other = rc.model;
    other.cfg.num_hidden_layers = rc.L - 1;
    assert_int_equal(llama_forward(be, &other, &s, rc.tokens, rc.lengths, rc.B, rc.T, NULL, NULL,
                                   NULL, err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "config"));

    collector_free(&col);
    llama_state_free(&s);
    ref_free(&rc);
}

/* Configs the ops cannot run and impossible batch sizes fail at init. */
static void test_state_init_checks(void **state) {
    (void)state;
    const backend *be = backend_cpu();
    char err[ERR_LEN];
    llama_state s;
    llama_config cfg = {.hidden_size = 64, .intermediate_size = 172, .num_hidden_layers = 3,
                        .num_attention_heads = 4, .num_key_value_heads = 2, .vocab_size = 300,
                        .max_position_embeddings = 64, .rms_norm_eps = 1e-5f,
                        .rope_theta = 10000.0f};
    assert_int_equal(llama_state_init(&s, be, &cfg, 2, 3, err, sizeof err), 0);
    llama_state_free(&s);
    llama_state_free(&s); /* a zeroed state frees cleanly */

    llama_config bad = cfg;
    bad.num_key_value_heads = 3;
    assert_int_equal(llama_state_init(&s, be, &bad, 2, 3, err, sizeof err), -1);
    assert_non_null(strstr(err, "num_key_value_heads"));
    bad = cfg;
    bad.num_attention_heads = 32; /* HS 2: even, fine */
    bad.num_key_value_heads = 32;
    assert_int_equal(llama_state_init(&s, be, &bad, 2, 3, err, sizeof err), 0);
    llama_state_free(&s);
    bad = cfg;
    bad.hidden_size = 60, bad.num_attention_heads = 4, bad.num_key_value_heads = 4; /* HS 15 */
    assert_int_equal(llama_state_init(&s, be, &bad, 2, 3, err, sizeof err), -1);
    assert_non_null(strstr(err, "odd"));
    assert_int_equal(llama_state_init(&s, be, &cfg, 0, 3, err, sizeof err), -1);
    assert_int_equal(llama_state_init(&s, be, &cfg, 1 << 20, 1 << 20, err, sizeof err), -1);
    assert_null(s.acts);
}

int main(void) {
    find_reference();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_gqa),
        cmocka_unit_test(test_reference_tied),
        cmocka_unit_test(test_reference_sharded),
        cmocka_unit_test(test_reference_chat),
        cmocka_unit_test(test_reference_staging_backend),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_state_init_checks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
