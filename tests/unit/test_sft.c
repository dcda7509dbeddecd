/* test_sft.c - training examples, batches and mixtures against the
 * independent Python rendering in tests/fixtures/sft/gen_sft.py: exact
 * input_ids and labels for every template with and without cuts (chat
 * fixture tokenizer), pretraining examples (byte tokenizer), the epoch
 * orders of the seeded shuffle, batching (padding, grouping, epoch ends),
 * resuming from a data position, step counts, task maps, mixture caps and
 * counts, and the errors. All comparisons are exact (integers). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/dataset.h"
#include "worker/engine/sft.h"
#include "worker/engine/template.h"
#include "worker/engine/tok.h"

static char fix_dir[PATH_MAX];
static char tok_path[PATH_MAX];

static void fix_path(char *out, size_t outlen, const char *name) {
    snprintf(out, outlen, "%.*s/%s", (int)(outlen - 64), fix_dir, name);
}

static json_t *load_expected(void) {
    char p[PATH_MAX];
    fix_path(p, sizeof p, "expected.json");
    return tu_load_json(p);
}

static void load_ds(const char *name, ds_dataset *ds) {
    char p[PATH_MAX], err[ERR_LEN];
    fix_path(p, sizeof p, name);
    if (ds_load(p, DS_FORMAT_AUTO, 0, ds, err, sizeof err)) fail_msg("%s", err);
}

/* Asserts ids[0..n) equal the JSON integer array want. */
static void expect_ids(const int32_t *ids, size_t n, const json_t *want, const char *what,
                       size_t ex) {
    if (json_array_size(want) != n)
        fail_msg("%s example %zu: %zu ids, want %zu", what, ex, n, json_array_size(want));
    for (size_t i = 0; i < n; i++) {
        json_int_t w = json_integer_value(json_array_get(want, i));
        if (ids[i] != (int32_t)w)
            fail_msg("%s example %zu: id %zu is %d, want %lld", what, ex, i, ids[i], (long long)w);
    }
}

static void test_sft_matches_reference(void **state) {
    (void)state;
    json_t *doc = load_expected();
    ds_dataset ds;
    load_ds("sft.json", &ds);
    tok_tokenizer *t = NULL;
    char err[ERR_LEN];
    if (tok_load_hf(tok_path, &t, err, sizeof err)) fail_msg("%s", err);
    json_t *cases = json_object_get(doc, "sft");
    assert_true(json_array_size(cases) >= 7);
    size_t idx;
    json_t *c;
    json_array_foreach(cases, idx, c) {
        sft_opts o = {.mode = SFT_MODE_SFT,
                      .cutoff_len = (size_t)json_integer_value(json_object_get(c, "cutoff_len")),
                      .reserved_label_len = 1};
        const char *name = json_string_value(json_object_get(c, "template"));
        assert_int_equal(tmpl_parse(name, &o.tmpl), 0);
        sft_set s;
        if (sft_build(&ds, NULL, 0, t, &o, &s, err, sizeof err)) fail_msg("%s", err);
        json_t *exs = json_object_get(c, "examples");
        assert_int_equal(s.n, json_array_size(exs));
        char what[64];
        snprintf(what, sizeof what, "%s/%zu", name, o.cutoff_len);
        size_t counted = 0;
        for (size_t i = 0; i < s.n; i++) {
            json_t *e = json_array_get(exs, i);
            size_t len = s.off[i + 1] - s.off[i];
            expect_ids(s.input_ids + s.off[i], len, json_object_get(e, "input_ids"), what, i);
            expect_ids(s.labels + s.off[i], len, json_object_get(e, "labels"), what, i);
            for (size_t j = 1; j < len; j++) counted += s.labels[s.off[i] + j] != SFT_IGNORE;
            assert_true(len <= o.cutoff_len);
        }
        assert_int_equal(s.n_label, counted);
        assert_true(counted > 0);
        /* the small cutoffs shorten every example; 1024 none of them */
        if (o.cutoff_len < 100)
            assert_int_equal(s.n_truncated, s.n);
        else
            assert_int_equal(s.n_truncated, 0);
        sft_set_free(&s);
    }
    /* a subset builds those examples, in the subset's order */
    sft_opts o = {.mode = SFT_MODE_SFT, .tmpl = TMPL_ALPACA, .cutoff_len = 1024,
                  .reserved_label_len = 1};
    size_t sub[] = {7, 2};
    sft_set s;
    if (sft_build(&ds, sub, 2, t, &o, &s, err, sizeof err)) fail_msg("%s", err);
    assert_int_equal(s.n, 2);
    json_t *alp = json_object_get(json_array_get(cases, 2), "examples");
    assert_string_equal(json_string_value(json_object_get(json_array_get(cases, 2), "template")),
                        "alpaca");
    expect_ids(s.input_ids, s.off[1], json_object_get(json_array_get(alp, 7), "input_ids"),
               "subset", 0);
    expect_ids(s.labels + s.off[1], s.off[2] - s.off[1],
               json_object_get(json_array_get(alp, 2), "labels"), "subset", 1);
    sft_set_free(&s);
    tok_free(t);
    ds_free(&ds);
    json_decref(doc);
}

static void test_pretrain_matches_reference(void **state) {
    (void)state;
    json_t *doc = load_expected();
    ds_dataset ds;
    load_ds("sft.json", &ds);
    tok_tokenizer *t = tok_byte_new();
    assert_non_null(t);
    char err[ERR_LEN];
    size_t idx;
    json_t *c;
    json_array_foreach(json_object_get(doc, "pretrain"), idx, c) {
        sft_opts o = {.mode = SFT_MODE_PRETRAIN,
                      .cutoff_len = (size_t)json_integer_value(json_object_get(c, "cutoff_len"))};
        sft_set s;
        if (sft_build(&ds, NULL, 0, t, &o, &s, err, sizeof err)) fail_msg("%s", err);
        json_t *exs = json_object_get(c, "examples");
        size_t counted = 0;
        for (size_t i = 0; i < s.n; i++) {
            size_t len = s.off[i + 1] - s.off[i];
            expect_ids(s.input_ids + s.off[i], len, json_array_get(exs, i), "pretrain", i);
            /* every label counts and equals its input id */
            assert_memory_equal(s.labels + s.off[i], s.input_ids + s.off[i], len * sizeof(int32_t));
            counted += len - 1;
        }
        assert_int_equal(s.n_label, counted);
        sft_set_free(&s);
    }
    assert_int_equal(sft_pad_id(t), TOK_BYTE_PAD);
    tok_free(t);
    ds_free(&ds);
    json_decref(doc);
}

static void test_orders_match_reference(void **state) {
    (void)state;
    json_t *doc = load_expected();
    size_t idx;
    json_t *c;
    json_array_foreach(json_object_get(doc, "orders"), idx, c) {
        uint64_t seed = (uint64_t)json_integer_value(json_object_get(c, "seed"));
        size_t n = (size_t)json_integer_value(json_object_get(c, "n"));
        json_t *eps = json_object_get(c, "epochs");
        size_t *v = malloc(n * sizeof *v);
        assert_non_null(v);
        for (size_t e = 0; e < json_array_size(eps); e++) {
            for (size_t i = 0; i < n; i++) v[i] = i;
            sft_rng r;
            sft_rng_init(&r, seed, e);
            sft_shuffle(&r, v, n);
            json_t *want = json_array_get(eps, e);
            for (size_t i = 0; i < n; i++)
                if (v[i] != (size_t)json_integer_value(json_array_get(want, i)))
                    fail_msg("seed %llu n %zu epoch %zu: position %zu is %zu",
                             (unsigned long long)seed, n, e, i, v[i]);
        }
        free(v);
    }
    json_decref(doc);
    /* below() stays in range, and hits every value of a small range */
    sft_rng r;
    sft_rng_init(&r, 1, 0);
    int seen[5] = {0};
    for (int i = 0; i < 500; i++) {
        uint64_t x = sft_rng_below(&r, 5);
        assert_true(x < 5);
        seen[x]++;
    }
    for (int i = 0; i < 5; i++) assert_true(seen[i] > 50);
}

/* A set of n examples; example i has i % 5 + 1 tokens, ids 1000*i + j, the
 * first token's label ignored. */
static void fake_set(sft_set *s, size_t n) {
    memset(s, 0, sizeof *s);
    s->off = malloc((n + 1) * sizeof *s->off);
    s->input_ids = malloc(n * 5 * sizeof *s->input_ids);
    s->labels = malloc(n * 5 * sizeof *s->labels);
    assert_non_null(s->off);
    assert_non_null(s->input_ids);
    assert_non_null(s->labels);
    s->off[0] = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = i % 5 + 1;
        for (size_t j = 0; j < len; j++) {
            s->input_ids[s->off[i] + j] = (int32_t)(1000 * i + j);
            s->labels[s->off[i] + j] = j == 0 ? SFT_IGNORE : (int32_t)(1000 * i + j);
        }
        s->off[i + 1] = s->off[i] + len;
        s->n_label += len - 1;
    }
    s->n = n;
    s->n_tokens = s->off[n];
}

static void test_loader_batches(void **state) {
    (void)state;
    sft_set s;
    fake_set(&s, 10);
    sft_loader l;
    sft_loader_opts o = {.seed = 42, .batch_size = 3, .grad_accum = 2, .shuffle = true,
                         .pad_id = -7};
    char err[ERR_LEN];
    if (sft_loader_init(&l, &s, &o, err, sizeof err)) fail_msg("%s", err);
    json_t *doc = load_expected();
    json_t *eps = json_object_get(json_array_get(json_object_get(doc, "orders"), 0), "epochs");
    sft_step st;
    memset(&st, 0, sizeof st);
    /* 10 examples, batches of 3, 2 per step: per epoch steps of 3+3 and 3+1 */
    for (size_t e = 0; e < 3; e++) {
        json_t *want = json_array_get(eps, e);
        size_t k = 0, seen_label = 0;
        for (size_t step = 0; step < 2; step++) {
            if (sft_loader_next(&l, &st, err, sizeof err)) fail_msg("%s", err);
            assert_int_equal(st.epoch, e);
            assert_int_equal(st.n_mb, 2);
            size_t lab = 0;
            for (size_t b = 0; b < st.n_mb; b++) {
                sft_batch *mb = &st.mb[b];
                assert_int_equal(mb->rows, step == 1 && b == 1 ? 1 : 3);
                size_t maxlen = 0, bl = 0;
                for (size_t r = 0; r < mb->rows; r++) {
                    size_t ex = (size_t)json_integer_value(json_array_get(want, k++));
                    assert_int_equal(mb->index[r], ex);
                    assert_int_equal(mb->lens[r], ex % 5 + 1);
                    if (mb->lens[r] > maxlen) maxlen = mb->lens[r];
                    for (size_t j = 0; j < mb->seq_len; j++) {
                        int32_t id = mb->input_ids[r * mb->seq_len + j];
                        int32_t lb = mb->labels[r * mb->seq_len + j];
                        if (j < mb->lens[r]) {
                            assert_int_equal(id, (int32_t)(1000 * ex + j));
                            assert_int_equal(lb, j == 0 ? SFT_IGNORE : id);
                        } else {
                            assert_int_equal(id, -7);
                            assert_int_equal(lb, SFT_IGNORE);
                        }
                    }
                    bl += mb->lens[r] - 1;
                }
                assert_int_equal(mb->seq_len, maxlen);
                assert_int_equal(mb->n_label, bl);
                lab += bl;
            }
            assert_int_equal(st.n_label, lab);
            seen_label += lab;
            sft_pos p = sft_loader_pos(&l);
            if (step == 0) {
                assert_int_equal(p.epoch, e);
                assert_int_equal(p.cursor, 6);
            } else {
                assert_int_equal(p.epoch, e + 1);
                assert_int_equal(p.cursor, 0);
            }
        }
        assert_int_equal(k, 10);
        assert_int_equal(seen_label, s.n_label);
    }
    /* without shuffling every epoch is the dataset order */
    sft_loader_free(&l);
    o.shuffle = false;
    o.batch_size = 4;
    o.grad_accum = 8;
    if (sft_loader_init(&l, &s, &o, err, sizeof err)) fail_msg("%s", err);
    for (int e = 0; e < 2; e++) {
        if (sft_loader_next(&l, &st, err, sizeof err)) fail_msg("%s", err);
        assert_int_equal(st.n_mb, 3); /* 4 + 4 + 2: the whole epoch in one step */
        for (size_t b = 0; b < 3; b++)
            for (size_t r = 0; r < st.mb[b].rows; r++) assert_int_equal(st.mb[b].index[r], 4 * b + r);
    }
    sft_step_free(&st);
    sft_loader_free(&l);
    sft_set_free(&s);
    json_decref(doc);
}

/* Runs a loader from pos for n steps, writing each step's example indices
 * (SIZE_MAX between steps) into out. Returns how many entries were written. */
static size_t run_steps(const sft_set *s, const sft_loader_opts *o, sft_pos pos, size_t n,
                        size_t *out) {
    sft_loader l;
    sft_step st;
    memset(&st, 0, sizeof st);
    char err[ERR_LEN];
    if (sft_loader_init(&l, s, o, err, sizeof err)) fail_msg("%s", err);
    if (sft_loader_seek(&l, pos, err, sizeof err)) fail_msg("%s", err);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (sft_loader_next(&l, &st, err, sizeof err)) fail_msg("%s", err);
        for (size_t b = 0; b < st.n_mb; b++)
            for (size_t r = 0; r < st.mb[b].rows; r++) out[k++] = st.mb[b].index[r];
        out[k++] = SIZE_MAX;
    }
    sft_step_free(&st);
    sft_loader_free(&l);
    return k;
}

static void test_loader_determinism_and_resume(void **state) {
    (void)state;
    sft_set s;
    fake_set(&s, 37);
    sft_loader_opts o = {.seed = 7, .batch_size = 4, .grad_accum = 3, .shuffle = true, .pad_id = 0};
    enum { STEPS = 13, CAP = 13 * 40 };
    size_t a[CAP], b[CAP];
    sft_pos zero = {0, 0};
    size_t na = run_steps(&s, &o, zero, STEPS, a);
    size_t nb = run_steps(&s, &o, zero, STEPS, b);
    assert_int_equal(na, nb);
    assert_memory_equal(a, b, na * sizeof a[0]); /* same seed, same sequence */
    o.seed = 8;
    nb = run_steps(&s, &o, zero, STEPS, b);
    assert_int_equal(na, nb);
    assert_true(memcmp(a, b, na * sizeof a[0]) != 0); /* another seed, another order */
    o.seed = 7;
    /* resume after every prefix: the rest matches the uninterrupted run */
    sft_loader l;
    sft_step st;
    memset(&st, 0, sizeof st);
    char err[ERR_LEN];
    if (sft_loader_init(&l, &s, &o, err, sizeof err)) fail_msg("%s", err);
    size_t done = 0; /* entries of a consumed */
    for (size_t k = 1; k < STEPS; k++) {
        if (sft_loader_next(&l, &st, err, sizeof err)) fail_msg("%s", err);
        while (a[done] != SIZE_MAX) done++;
        done++;
        sft_pos p = sft_loader_pos(&l);
        size_t nr = run_steps(&s, &o, p, STEPS - k, b);
        assert_int_equal(nr, na - done);
        assert_memory_equal(b, a + done, nr * sizeof a[0]);
    }
    /* 37 examples, batches of 4 (10 per epoch), 3 per step: 4 steps an epoch */
    size_t spe, total;
    assert_int_equal(sft_plan(37, 4, 3, 3, 0, &spe, &total, err, sizeof err), 0);
    assert_int_equal(spe, 4);
    assert_int_equal(total, 12);
    assert_true(sft_loader_pos(&l).epoch == 3); /* 12 steps done: epoch 3 begins */
    assert_int_equal(sft_loader_pos(&l).cursor, 0);
    /* a position past the dataset is refused */
    sft_pos bad = {0, 38};
    assert_int_equal(sft_loader_seek(&l, bad, err, sizeof err), -1);
    sft_step_free(&st);
    sft_loader_free(&l);
    sft_set_free(&s);
}

static void test_plan(void **state) {
    (void)state;
    char err[ERR_LEN];
    size_t spe = 0, total = 0;
    assert_int_equal(sft_plan(10, 3, 2, 3, 0, &spe, &total, err, sizeof err), 0);
    assert_int_equal(spe, 2);
    assert_int_equal(total, 6);
    assert_int_equal(sft_plan(10, 3, 2, 3, 5, &spe, &total, err, sizeof err), 0);
    assert_int_equal(total, 5); /* max_steps overrides epochs */
    assert_int_equal(sft_plan(1000, 4, 4, 0, 20, &spe, &total, err, sizeof err), 0);
    assert_int_equal(spe, 63);
    assert_int_equal(total, 20);
    assert_int_equal(sft_plan(0, 3, 2, 3, 0, &spe, &total, err, sizeof err), -1);
    assert_non_null(strstr(err, "no examples"));
    assert_int_equal(sft_plan(10, 0, 2, 3, 0, &spe, &total, err, sizeof err), -1);
    assert_int_equal(sft_plan(10, 3, 0, 3, 0, &spe, &total, err, sizeof err), -1);
    assert_int_equal(sft_plan(10, 3, 2, 0, 0, &spe, &total, err, sizeof err), -1);
}

static void test_build_errors(void **state) {
    (void)state;
    char err[ERR_LEN];
    tok_tokenizer *t = tok_byte_new();
    ds_dataset empty = {0};
    sft_opts o = {.mode = SFT_MODE_SFT, .tmpl = TMPL_VANILLA, .cutoff_len = 1024,
                  .reserved_label_len = 1};
    sft_set s;
    assert_int_equal(sft_build(&empty, NULL, 0, t, &o, &s, err, sizeof err), -1);
    assert_non_null(strstr(err, "no examples"));
    assert_null(s.off);
    ds_dataset ds;
    load_ds("sft.json", &ds);
    size_t none[1] = {0};
    assert_int_equal(sft_build(&ds, none, 0, t, &o, &s, err, sizeof err), -1);
    assert_non_null(strstr(err, "no examples"));
    o.cutoff_len = 1;
    assert_int_equal(sft_build(&ds, NULL, 0, t, &o, &s, err, sizeof err), -1);
    assert_non_null(strstr(err, "cutoff_len 1 is too small"));
    o.cutoff_len = 4;
    o.reserved_label_len = 4;
    assert_int_equal(sft_build(&ds, NULL, 0, t, &o, &s, err, sizeof err), -1);
    assert_non_null(strstr(err, "reserved_label_len"));
    o.reserved_label_len = 1;
    size_t oob[1] = {99};
    assert_int_equal(sft_build(&ds, oob, 1, t, &o, &s, err, sizeof err), -1);
    assert_non_null(strstr(err, "out of range"));
    /* the smallest cutoff keeps one prompt and one response token */
    o.cutoff_len = 2;
    assert_int_equal(sft_build(&ds, NULL, 0, t, &o, &s, err, sizeof err), 0);
    for (size_t i = 0; i < s.n; i++) {
        assert_int_equal(s.off[i + 1] - s.off[i], 2);
        assert_int_equal(s.input_ids[s.off[i]], TOK_BYTE_BOS);
        assert_int_equal(s.labels[s.off[i]], SFT_IGNORE);
        assert_true(s.labels[s.off[i] + 1] != SFT_IGNORE);
    }
    sft_set_free(&s);
    o.mode = SFT_MODE_PRETRAIN;
    o.cutoff_len = 1;
    assert_int_equal(sft_build(&ds, NULL, 0, t, &o, &s, err, sizeof err), -1);
    sft_loader l;
    sft_set one;
    fake_set(&one, 1);
    sft_loader_opts lo = {.seed = 1, .batch_size = 0, .grad_accum = 1};
    assert_int_equal(sft_loader_init(&l, &one, &lo, err, sizeof err), -1);
    lo.batch_size = 1;
    lo.grad_accum = 0;
    assert_int_equal(sft_loader_init(&l, &one, &lo, err, sizeof err), -1);
    sft_set_free(&one);
    ds_free(&ds);
    tok_free(t);
}

static void test_taskmap(void **state) {
    (void)state;
    char p[PATH_MAX], err[ERR_LEN];
    fix_path(p, sizeof p, "flan_tasks.tsv");
    sft_taskmap m;
    if (sft_taskmap_load(p, &m, err, sizeof err)) fail_msg("%s", err);
    assert_int_equal(m.n, 69);
    assert_string_equal(sft_taskmap_cluster(&m, "anli_r1"), "nli");
    assert_string_equal(sft_taskmap_cluster(&m, "aeslc"), "summarization");
    assert_null(sft_taskmap_cluster(&m, "no_such_task"));
    assert_null(sft_taskmap_cluster(&m, "task"));
    sft_taskmap_free(&m);

    const char ok[] = "task\tcluster\r\n\nb\tx\na\ty\n";
    assert_int_equal(sft_taskmap_parse("m", ok, strlen(ok), &m, err, sizeof err), 0);
    assert_int_equal(m.n, 2);
    assert_string_equal(m.task[0], "a");
    assert_string_equal(sft_taskmap_cluster(&m, "b"), "x");
    sft_taskmap_free(&m);
    static const struct {
        const char *text, *want;
    } bad[] = {
        {"", "empty"},
        {"a\tb\n", "header"},
        {"task\tcluster\na b\n", "line 2"},
        {"task\tcluster\na\tb\tc\n", "line 2"},
        {"task\tcluster\n\tb\n", "line 2: empty"},
        {"task\tcluster\na\tb\na\tc\n", "listed twice"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        if (sft_taskmap_parse("m", bad[i].text, strlen(bad[i].text), &m, err, sizeof err) != -1)
            fail_msg("case %zu parsed", i);
        if (!strstr(err, bad[i].want)) fail_msg("case %zu: \"%s\" lacks \"%s\"", i, err, bad[i].want);
        assert_int_equal(m.n, 0);
    }
}

static void test_mix_matches_reference(void **state) {
    (void)state;
    json_t *doc = load_expected();
    char p[PATH_MAX], err[ERR_LEN];
    fix_path(p, sizeof p, "flan_tasks.tsv");
    sft_taskmap m;
    if (sft_taskmap_load(p, &m, err, sizeof err)) fail_msg("%s", err);
    ds_dataset ds;
    load_ds("flan.jsonl", &ds);
    assert_int_equal(ds.n, 60);
    size_t idx;
    json_t *c;
    size_t *first_keep = NULL, first_n = 0;
    json_array_foreach(json_object_get(doc, "mix"), idx, c) {
        bool by_task = strcmp(json_string_value(json_object_get(c, "by")), "task") == 0;
        size_t cap = (size_t)json_integer_value(json_object_get(c, "cap"));
        uint64_t seed = (uint64_t)json_integer_value(json_object_get(c, "seed"));
        sft_mix mx;
        if (sft_mix_cap(&ds, by_task ? NULL : &m, by_task ? SFT_CAP_TASK : SFT_CAP_CLUSTER, cap,
                        seed, &mx, err, sizeof err))
            fail_msg("%s", err);
        json_t *keep = json_object_get(c, "keep"), *groups = json_object_get(c, "groups");
        assert_int_equal(mx.n_keep, json_array_size(keep));
        for (size_t i = 0; i < mx.n_keep; i++)
            assert_int_equal(mx.keep[i], (size_t)json_integer_value(json_array_get(keep, i)));
        assert_int_equal(mx.n_groups, json_array_size(groups));
        for (size_t g = 0; g < mx.n_groups; g++) {
            json_t *w = json_array_get(groups, g);
            assert_string_equal(mx.groups[g].name, json_string_value(json_array_get(w, 0)));
            assert_int_equal(mx.groups[g].available, json_integer_value(json_array_get(w, 1)));
            assert_int_equal(mx.groups[g].kept, json_integer_value(json_array_get(w, 2)));
            assert_true(mx.groups[g].kept <= cap);
        }
        if (idx == 0) {
            first_n = mx.n_keep;
            first_keep = malloc(first_n * sizeof *first_keep);
            assert_non_null(first_keep);
            memcpy(first_keep, mx.keep, first_n * sizeof *first_keep);
        } else if (idx == 1) {
            /* the same cap with another seed keeps the same counts, other examples */
            assert_int_equal(mx.n_keep, first_n);
            assert_true(memcmp(mx.keep, first_keep, first_n * sizeof *first_keep) != 0);
        }
        sft_mix_free(&mx);
    }
    free(first_keep);
    /* errors: cap 0, by cluster without a map, a task the map lacks, no task */
    sft_mix mx;
    assert_int_equal(sft_mix_cap(&ds, &m, SFT_CAP_CLUSTER, 0, 1, &mx, err, sizeof err), -1);
    assert_int_equal(sft_mix_cap(&ds, NULL, SFT_CAP_CLUSTER, 5, 1, &mx, err, sizeof err), -1);
    free(ds.items[3].task);
    ds.items[3].task = strdup("not_a_flan_task");
    assert_int_equal(sft_mix_cap(&ds, &m, SFT_CAP_CLUSTER, 5, 1, &mx, err, sizeof err), -1);
    assert_non_null(strstr(err, "example 3: task \"not_a_flan_task\" is not in the task map"));
    free(ds.items[3].task);
    ds.items[3].task = NULL;
    assert_int_equal(sft_mix_cap(&ds, NULL, SFT_CAP_TASK, 5, 1, &mx, err, sizeof err), -1);
    assert_non_null(strstr(err, "example 3 has no task"));
    ds_dataset empty = {0};
    assert_int_equal(sft_mix_cap(&empty, &m, SFT_CAP_CLUSTER, 5, 1, &mx, err, sizeof err), -1);
    ds_free(&ds);
    sft_taskmap_free(&m);
    json_decref(doc);
}

int main(void) {
    tu_fixture_path(fix_dir, sizeof fix_dir, "sft");
    tu_reference_path(tok_path, sizeof tok_path, "tokenizer/tokenizer.json");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sft_matches_reference),
        cmocka_unit_test(test_pretrain_matches_reference),
        cmocka_unit_test(test_orders_match_reference),
        cmocka_unit_test(test_loader_batches),
        cmocka_unit_test(test_loader_determinism_and_resume),
        cmocka_unit_test(test_plan),
        cmocka_unit_test(test_build_errors),
        cmocka_unit_test(test_taskmap),
        cmocka_unit_test(test_mix_matches_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
