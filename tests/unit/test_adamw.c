/* test_adamw.c - the optimizer (worker/engine/adamw.c) and the learning-rate
 * schedules (worker/engine/schedule.c) against tests/fixtures/adamw/, written
 * by gen_adamw.py with torch.optim.AdamW, clip_grad_norm_ and LambdaLR.
 *
 * Tolerances:
 * - parameters, exp_avg, exp_avg_sq after every step and the clipped
 *   gradients: max |C - torch| <= 1e-6 * max |torch| over the array
 *   (ADAMW_REL_TOL; both sides float32, differing by a few ulps: torch fuses
 *   one multiply-add, and takes the norm per tensor in float32);
 * - the pre-clip norm: 1e-6 relative;
 * - the learning rate of each step and every schedule lambda: 1e-15
 *   (the same double formulas as Python's);
 * - warmup step counts: exact;
 * - frozen elements (outside the ranges): bit for bit unchanged;
 * - a state saved after some steps and loaded into a new optimizer continues
 *   bit for bit as the uninterrupted run (through a buffer or a FILE). */
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

#include "common/npy.h"
#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/adamw.h"
#include "worker/engine/schedule.h"

#define ADAMW_REL_TOL 1e-6
#define MAX_RANGES 8

static char fixture_dir[PATH_MAX + 64];
static json_t *doc;

/* tests/fixtures/adamw (or $STRATA_FIXTURES/adamw) and its adamw.json. */
static int setup_all(void **state) {
    (void)state;
    tu_fixture_path(fixture_dir, sizeof fixture_dir, "adamw");
    char path[PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/adamw.json", fixture_dir);
    doc = tu_load_json(path);
    return 0;
}

static int teardown_all(void **state) {
    (void)state;
    json_decref(doc);
    return 0;
}

/* Reads fixture name.npy as float32 (caller frees); asserts its shape. */
static float *load(const char *name, size_t rows, size_t cols) {
    char path[PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/%s.npy", fixture_dir, name);
    npy_header h;
    double *d = tu_read_npy(path, &h);
    assert_int_equal(h.rows, rows);
    assert_int_equal(h.cols, cols);
    float *f = malloc(rows * cols * sizeof *f);
    assert_non_null(f);
    for (size_t i = 0; i < rows * cols; i++) f[i] = (float)d[i];
    free(d);
    return f;
}

static double num(json_t *obj, const char *key) {
    json_t *v = json_object_get(obj, key);
    if (!json_is_number(v)) fail_msg("fixture: %s is not a number", key);
    return json_number_value(v);
}

static size_t doc_n(void) { return (size_t)num(doc, "n"); }

/* The fixture's ranges into out; returns how many. */
static size_t doc_ranges(adamw_range *out) {
    json_t *ranges = json_object_get(doc, "ranges");
    size_t i;
    json_t *r;
    assert_true(json_array_size(ranges) <= MAX_RANGES);
    json_array_foreach(ranges, i, r) {
        out[i].offset = (size_t)num(r, "offset");
        out[i].count = (size_t)num(r, "count");
        out[i].decay = json_is_true(json_object_get(r, "decay"));
    }
    return json_array_size(ranges);
}

static bool in_ranges(const adamw_range *ranges, size_t nranges, size_t i) {
    for (size_t r = 0; r < nranges; r++)
        if (i >= ranges[r].offset && i < ranges[r].offset + ranges[r].count) return true;
    return false;
}

static adamw_config case_config(json_t *c) {
    adamw_config cfg = {num(c, "beta1"), num(c, "beta2"), num(c, "eps"), num(c, "weight_decay")};
    return cfg;
}

static sched case_sched(json_t *c) {
    char err[ERR_LEN];
    sched s;
    if (sched_parse_kind(json_string_value(json_object_get(c, "kind")), &s.kind, err,
                         sizeof err) != 0)
        fail_msg("%s", err);
    s.total_steps = (int64_t)num(c, "total");
    if (sched_warmup_steps((int64_t)num(c, "warmup_steps"), num(c, "warmup_ratio"),
                           s.total_steps, &s.warmup_steps, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_int_equal(s.warmup_steps, (int64_t)num(c, "warmup"));
    assert_int_equal(sched_check(&s, err, sizeof err), 0);
    return s;
}

/* Worst |got - want| relative to max |want| over the elements that the mask
 * selects (all when ranges is NULL); fails above ADAMW_REL_TOL. */
static double expect_close(const char *what, int step, const float *got, const float *want,
                           size_t count, const adamw_range *ranges, size_t nranges) {
    double scale = 0.0, worst = 0.0;
    for (size_t i = 0; i < count; i++) {
        if (ranges && !in_ranges(ranges, nranges, i)) continue;
        if (fabs(want[i]) > scale) scale = fabs(want[i]);
        if (!isfinite(got[i])) fail_msg("%s step %d [%zu] = %g", what, step, i, got[i]);
        double d = fabs((double)got[i] - want[i]);
        if (d > worst) worst = d;
    }
    assert_true(scale > 0.0);
    if (worst > ADAMW_REL_TOL * scale)
        fail_msg("%s step %d: max error %g > %g * %g", what, step, worst, ADAMW_REL_TOL, scale);
    return worst / scale;
}

/* Every fixture case: clip, lr, step, then params / m / v against torch. */
static void test_against_torch(void **state) {
    (void)state;
    char err[ERR_LEN], name[256];
    size_t n = doc_n();
    adamw_range ranges[MAX_RANGES];
    size_t nranges = doc_ranges(ranges);
    const char *key;
    json_t *c;
    json_object_foreach(json_object_get(doc, "cases"), key, c) {
        size_t steps = (size_t)num(c, "steps");
        adamw_config cfg = case_config(c);
        sched s = case_sched(c);
        double base_lr = num(c, "lr"), max_norm = num(c, "max_norm");
        adamw *opt = NULL;
        if (adamw_new(&cfg, ranges, nranges, &opt, err, sizeof err) != 0) fail_msg("%s", err);
        size_t trainable = adamw_trainable(opt);
        snprintf(name, sizeof name, "%s_params0", key);
        float *params0 = load(name, n, 1);
        snprintf(name, sizeof name, "%s_grads", key);
        float *grads = load(name, steps, n);
        snprintf(name, sizeof name, "%s_clipped", key);
        float *clipped = load(name, steps, n);
        snprintf(name, sizeof name, "%s_params", key);
        float *after = load(name, steps, n);
        snprintf(name, sizeof name, "%s_m", key);
        float *m = load(name, steps, trainable);
        snprintf(name, sizeof name, "%s_v", key);
        float *v = load(name, steps, trainable);
        float *p = malloc(n * sizeof *p), *g = malloc(n * sizeof *g);
        assert_true(p && g);
        memcpy(p, params0, n * sizeof *p);
        double worst_p = 0.0, worst_m = 0.0, worst_v = 0.0, worst_norm = 0.0;
        for (size_t k = 0; k < steps; k++) {
            int step = (int)k + 1;
            double lr = sched_lr(&s, base_lr, (int64_t)k);
            double want_lr = json_number_value(json_array_get(json_object_get(c, "lrs"), k));
            if (fabs(lr - want_lr) > 1e-15)
                fail_msg("%s step %d: lr %.17g, torch %.17g", key, step, lr, want_lr);
            memcpy(g, grads + k * n, n * sizeof *g);
            double norm = adamw_clip_grad_norm(opt, g, max_norm);
            double want_norm = json_number_value(json_array_get(json_object_get(c, "norms"), k));
            double rel = fabs(norm - want_norm) / want_norm;
            if (rel > ADAMW_REL_TOL)
                fail_msg("%s step %d: norm %.9g, torch %.9g", key, step, norm, want_norm);
            if (rel > worst_norm) worst_norm = rel;
            expect_close("clipped grads", step, g, clipped + k * n, n, ranges, nranges);
            for (size_t i = 0; i < n; i++)
                if (!in_ranges(ranges, nranges, i))
                    assert_memory_equal(&g[i], &grads[k * n + i], sizeof(float));
            adamw_step(opt, p, g, lr);
            assert_int_equal(adamw_steps(opt), step);
            double e = expect_close("params", step, p, after + k * n, n, ranges, nranges);
            if (e > worst_p) worst_p = e;
            e = expect_close("exp_avg", step, adamw_exp_avg(opt), m + k * trainable, trainable,
                             NULL, 0);
            if (e > worst_m) worst_m = e;
            e = expect_close("exp_avg_sq", step, adamw_exp_avg_sq(opt), v + k * trainable,
                             trainable, NULL, 0);
            if (e > worst_v) worst_v = e;
            for (size_t i = 0; i < n; i++)
                if (!in_ranges(ranges, nranges, i))
                    assert_memory_equal(&p[i], &params0[i], sizeof(float));
        }
        fprintf(stderr,
                "  %s: worst rel error params %.2g exp_avg %.2g exp_avg_sq %.2g norm %.2g\n", key,
                worst_p, worst_m, worst_v, worst_norm);
        free(p);
        free(g);
        free(params0);
        free(grads);
        free(clipped);
        free(after);
        free(m);
        free(v);
        adamw_free(opt);
    }
}

static void test_schedule_tables(void **state) {
    (void)state;
    size_t i;
    json_t *t;
    char err[ERR_LEN];
    json_array_foreach(json_object_get(doc, "schedules"), i, t) {
        sched s;
        const char *kind = json_string_value(json_object_get(t, "kind"));
        assert_int_equal(sched_parse_kind(kind, &s.kind, err, sizeof err), 0);
        assert_string_equal(sched_kind_name(s.kind), kind);
        s.warmup_steps = (int64_t)num(t, "warmup");
        s.total_steps = (int64_t)num(t, "total");
        assert_int_equal(sched_check(&s, err, sizeof err), 0);
        size_t k;
        json_t *want;
        json_array_foreach(json_object_get(t, "lambdas"), k, want) {
            double got = sched_lambda(&s, (int64_t)k);
            if (fabs(got - json_number_value(want)) > 1e-15)
                fail_msg("%s w %lld n %lld: lambda(%zu) = %.17g, HF %.17g", kind,
                         (long long)s.warmup_steps, (long long)s.total_steps, k, got,
                         json_number_value(want));
            assert_true(fabs(sched_lr(&s, 3e-4, (int64_t)k) - 3e-4 * got) <= 1e-20);
        }
    }
}

static void test_schedule_shape(void **state) {
    (void)state;
    /* Independent of the fixture: the first warmup step has lr 0, warmup
     * ends at exactly the base lr, cosine is at half way in the middle and
     * reaches 0 at the total. */
    sched s = {SCHED_COSINE, 4, 14};
    assert_true(sched_lambda(&s, 0) == 0.0);
    assert_true(sched_lambda(&s, 2) == 0.5);
    assert_true(sched_lambda(&s, 4) == 1.0);
    assert_true(fabs(sched_lambda(&s, 9) - 0.5) < 1e-15);
    assert_true(fabs(sched_lambda(&s, 14)) < 1e-15);
    s.kind = SCHED_LINEAR;
    assert_true(fabs(sched_lambda(&s, 9) - 0.5) < 1e-15);
    assert_true(sched_lambda(&s, 14) == 0.0);
    assert_true(sched_lambda(&s, 20) == 0.0); /* clamped, never negative */
    s.kind = SCHED_CONSTANT;
    assert_true(sched_lambda(&s, 0) == 1.0); /* HF's constant ignores warmup */
    s.kind = SCHED_CONSTANT_WITH_WARMUP;
    assert_true(sched_lambda(&s, 1) == 0.25);
    assert_true(sched_lambda(&s, 100) == 1.0);
}

static void test_warmup_steps(void **state) {
    (void)state;
    char err[ERR_LEN];
    size_t i;
    json_t *w;
    json_array_foreach(json_object_get(doc, "warmup"), i, w) {
        int64_t got = -1;
        assert_int_equal(sched_warmup_steps((int64_t)num(w, "steps"), num(w, "ratio"),
                                            (int64_t)num(w, "total"), &got, err, sizeof err),
                         0);
        assert_int_equal(got, (int64_t)num(w, "expect"));
    }
    int64_t out = 7;
    assert_int_equal(sched_warmup_steps(-1, 0.0, 10, &out, err, sizeof err), -1);
    assert_non_null(strstr(err, "warmup_steps"));
    assert_int_equal(sched_warmup_steps(0, 1.5, 10, &out, err, sizeof err), -1);
    assert_non_null(strstr(err, "warmup_ratio"));
    assert_int_equal(sched_warmup_steps(0, NAN, 10, &out, err, sizeof err), -1);
    assert_int_equal(sched_warmup_steps(0, 0.1, 0, &out, err, sizeof err), -1);
    assert_int_equal(out, 7);
    sched s = {SCHED_COSINE, 0, 0};
    assert_int_equal(sched_check(&s, err, sizeof err), -1);
    s.total_steps = 3;
    s.warmup_steps = -2;
    assert_int_equal(sched_check(&s, err, sizeof err), -1);
    s.warmup_steps = 0;
    s.kind = (sched_kind)9;
    assert_int_equal(sched_check(&s, err, sizeof err), -1);
    assert_string_equal(sched_kind_name(s.kind), "unknown");
}

static void test_parse_kind(void **state) {
    (void)state;
    char err[ERR_LEN];
    sched_kind k = SCHED_LINEAR;
    assert_int_equal(sched_parse_kind("cosine", &k, err, sizeof err), 0);
    assert_int_equal(k, SCHED_COSINE);
    assert_int_equal(sched_parse_kind("cosine_with_restarts", &k, err, sizeof err), -1);
    assert_non_null(strstr(err, "\"cosine_with_restarts\""));
    assert_int_equal(sched_parse_kind("", &k, err, sizeof err), -1);
    assert_int_equal(sched_parse_kind(NULL, &k, err, sizeof err), -1);
    assert_int_equal(k, SCHED_COSINE);
}

/* Fixture case `key`'s config and gradients, for the tests below. */
typedef struct {
    adamw_config cfg;
    adamw_range ranges[MAX_RANGES];
    size_t nranges, n, steps;
    float *params0, *grads;
    sched s;
    double lr, max_norm;
} trial;

static void trial_load(trial *t, const char *key) {
    char name[256];
    json_t *c = json_object_get(json_object_get(doc, "cases"), key);
    assert_non_null(c);
    t->cfg = case_config(c);
    t->nranges = doc_ranges(t->ranges);
    t->n = doc_n();
    t->steps = (size_t)num(c, "steps");
    t->s = case_sched(c);
    t->lr = num(c, "lr");
    t->max_norm = num(c, "max_norm");
    snprintf(name, sizeof name, "%s_params0", key);
    t->params0 = load(name, t->n, 1);
    snprintf(name, sizeof name, "%s_grads", key);
    t->grads = load(name, t->steps, t->n);
}

static void trial_free(trial *t) {
    free(t->params0);
    free(t->grads);
}

/* Steps [from, to) of trial t on p with opt. */
static void trial_run(const trial *t, adamw *opt, float *p, size_t from, size_t to) {
    float *g = malloc(t->n * sizeof *g);
    assert_non_null(g);
    for (size_t k = from; k < to; k++) {
        memcpy(g, t->grads + k * t->n, t->n * sizeof *g);
        adamw_clip_grad_norm(opt, g, t->max_norm);
        adamw_step(opt, p, g, sched_lr(&t->s, t->lr, adamw_steps(opt)));
    }
    free(g);
}

static void test_state_round_trip(void **state) {
    (void)state;
    char err[ERR_LEN];
    trial t;
    trial_load(&t, "cosine_wd_clip");
    size_t half = t.steps / 2, bytes = t.n * sizeof(float);
    adamw *whole = NULL, *first = NULL, *second = NULL;
    assert_int_equal(adamw_new(&t.cfg, t.ranges, t.nranges, &whole, err, sizeof err), 0);
    assert_int_equal(adamw_new(&t.cfg, t.ranges, t.nranges, &first, err, sizeof err), 0);
    assert_int_equal(adamw_new(&t.cfg, t.ranges, t.nranges, &second, err, sizeof err), 0);
    float *p_whole = malloc(bytes), *p_split = malloc(bytes);
    assert_true(p_whole && p_split);
    memcpy(p_whole, t.params0, bytes);
    memcpy(p_split, t.params0, bytes);
    trial_run(&t, whole, p_whole, 0, t.steps);

    trial_run(&t, first, p_split, 0, half);
    size_t size = adamw_state_size(first);
    size_t trainable = adamw_trainable(first);
    assert_int_equal(size, 64 + t.nranges * 24 + 8 * trainable);
    unsigned char *buf = malloc(size), *again = malloc(size);
    assert_true(buf && again);
    assert_int_equal(adamw_serialize(first, buf, size, err, sizeof err), 0);
    assert_int_equal(adamw_serialize(first, again, size, err, sizeof err), 0);
    assert_memory_equal(buf, again, size);
    assert_int_equal(adamw_serialize(first, buf, size - 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "bytes"));
    assert_int_equal(adamw_serialize(first, buf, size, err, sizeof err), 0);
    assert_memory_equal(buf, "STRAdamW", 8);

    assert_int_equal(adamw_deserialize(second, buf, size, err, sizeof err), 0);
    assert_int_equal(adamw_steps(second), (int64_t)half);
    assert_memory_equal(adamw_exp_avg(second), adamw_exp_avg(first), trainable * sizeof(float));
    assert_memory_equal(adamw_exp_avg_sq(second), adamw_exp_avg_sq(first),
                        trainable * sizeof(float));
    trial_run(&t, second, p_split, half, t.steps);
    assert_int_equal(adamw_steps(second), (int64_t)t.steps);
    assert_memory_equal(p_split, p_whole, bytes);
    assert_memory_equal(adamw_exp_avg(second), adamw_exp_avg(whole), trainable * sizeof(float));
    assert_memory_equal(adamw_exp_avg_sq(second), adamw_exp_avg_sq(whole),
                        trainable * sizeof(float));
    free(buf);
    free(again);
    free(p_whole);
    free(p_split);
    adamw_free(whole);
    adamw_free(first);
    adamw_free(second);
    trial_free(&t);
}

/* A state that does not belong to the optimizer is refused, naming why,
 * and the optimizer keeps its own step and moments. */
static void test_state_refused(void **state) {
    (void)state;
    char err[ERR_LEN];
    trial t;
    trial_load(&t, "constant_betas");
    adamw *opt = NULL, *target = NULL, *other = NULL;
    assert_int_equal(adamw_new(&t.cfg, t.ranges, t.nranges, &opt, err, sizeof err), 0);
    assert_int_equal(adamw_new(&t.cfg, t.ranges, t.nranges, &target, err, sizeof err), 0);
    float *p = malloc(t.n * sizeof *p);
    assert_non_null(p);
    memcpy(p, t.params0, t.n * sizeof *p);
    trial_run(&t, opt, p, 0, 2);
    trial_run(&t, target, p, 2, 3); /* target: step 1 with its own moments */
    size_t trainable = adamw_trainable(opt), size = adamw_state_size(opt);
    float *m_before = malloc(trainable * sizeof(float));
    unsigned char *buf = malloc(size), *bad = malloc(size);
    assert_true(m_before && buf && bad);
    memcpy(m_before, adamw_exp_avg(target), trainable * sizeof(float));
    assert_int_equal(adamw_serialize(opt, buf, size, err, sizeof err), 0);

    struct {
        size_t at;
        unsigned char value;
        const char *why;
    } flips[] = {
        {0, 'X', "magic"},
        {8, 2, "version"},
        {24, 5, "ranges"},         /* nranges 5 */
        {32 + 7, 0x00, "beta1"},   /* top byte of beta1 */
        {56, 0x01, "weight_decay"},
        {64 + 8, 99, "range 0"},   /* count of range 0 */
        {64 + 16, 0, "range 0"},   /* decay flag of range 0 (1 -> 0) */
    };
    for (size_t i = 0; i < sizeof flips / sizeof flips[0]; i++) {
        memcpy(bad, buf, size);
        assert_int_not_equal(bad[flips[i].at], flips[i].value);
        bad[flips[i].at] = flips[i].value;
        err[0] = '\0';
        assert_int_equal(adamw_deserialize(target, bad, size, err, sizeof err), -1);
        if (!strstr(err, flips[i].why)) fail_msg("flip %zu: \"%s\" lacks %s", i, err, flips[i].why);
    }
    assert_int_equal(adamw_deserialize(target, buf, size - 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "bytes"));
    assert_int_equal(adamw_deserialize(target, buf, 10, err, sizeof err), -1);
    assert_int_equal(adamw_steps(target), 1);
    assert_memory_equal(adamw_exp_avg(target), m_before, trainable * sizeof(float));

    /* Same ranges, other config; and one range fewer. */
    adamw_config cfg2 = t.cfg;
    cfg2.eps = 1e-7;
    assert_int_equal(adamw_new(&cfg2, t.ranges, t.nranges, &other, err, sizeof err), 0);
    assert_int_equal(adamw_deserialize(other, buf, size, err, sizeof err), -1);
    assert_non_null(strstr(err, "eps"));
    adamw_free(other);
    assert_int_equal(adamw_new(&t.cfg, t.ranges, t.nranges - 1, &other, err, sizeof err), 0);
    assert_int_equal(adamw_deserialize(other, buf, size, err, sizeof err), -1);
    assert_non_null(strstr(err, "ranges"));
    adamw_free(other);

    free(m_before);
    free(buf);
    free(bad);
    free(p);
    adamw_free(opt);
    adamw_free(target);
    trial_free(&t);
}

/* The file form: the same bytes as adamw_serialize; read back it restores the
 * step and moments; a truncated file, a trailing byte or a foreign header is
 * refused and leaves the optimizer as it was. */
static void test_state_file(void **state) {
    (void)state;
    char err[ERR_LEN];
    trial t;
    trial_load(&t, "linear_ratio_noclip");
    adamw *opt = NULL, *back = NULL;
    assert_int_equal(adamw_new(&t.cfg, t.ranges, t.nranges, &opt, err, sizeof err), 0);
    assert_int_equal(adamw_new(&t.cfg, t.ranges, t.nranges, &back, err, sizeof err), 0);
    float *p = malloc(t.n * sizeof *p);
    assert_non_null(p);
    memcpy(p, t.params0, t.n * sizeof *p);
    trial_run(&t, opt, p, 0, 3);
    size_t size = adamw_state_size(opt), trainable = adamw_trainable(opt);
    unsigned char *want = malloc(size + 1), *got = malloc(size + 1);
    assert_true(want && got);
    assert_int_equal(adamw_serialize(opt, want, size, err, sizeof err), 0);

    FILE *f = tmpfile();
    assert_non_null(f);
    assert_int_equal(adamw_write_file(opt, f, err, sizeof err), 0);
    assert_int_equal(ftell(f), (long)size);
    rewind(f);
    assert_int_equal(fread(got, 1, size + 1, f), size);
    assert_memory_equal(got, want, size);

    /* Refusals first, while back is still at step 0 with zero moments. */
    want[size] = 0x7f;
    FILE *trailing = fmemopen(want, size + 1, "rb");
    assert_non_null(trailing);
    assert_int_equal(adamw_read_file(back, trailing, err, sizeof err), -1);
    assert_non_null(strstr(err, "after"));
    fclose(trailing);
    FILE *shortf = fmemopen(want, size - 1, "rb");
    assert_non_null(shortf);
    assert_int_equal(adamw_read_file(back, shortf, err, sizeof err), -1);
    assert_non_null(strstr(err, "truncated"));
    fclose(shortf);
    FILE *tiny = fmemopen(want, 40, "rb");
    assert_non_null(tiny);
    assert_int_equal(adamw_read_file(back, tiny, err, sizeof err), -1);
    fclose(tiny);
    memcpy(got, want, size);
    got[64] ^= 1; /* range 0's offset */
    FILE *foreign = fmemopen(got, size, "rb");
    assert_non_null(foreign);
    assert_int_equal(adamw_read_file(back, foreign, err, sizeof err), -1);
    assert_non_null(strstr(err, "range 0"));
    fclose(foreign);
    assert_int_equal(adamw_steps(back), 0);
    for (size_t i = 0; i < trainable; i++) assert_true(adamw_exp_avg_sq(back)[i] == 0.0f);

    rewind(f);
    assert_int_equal(adamw_read_file(back, f, err, sizeof err), 0);
    fclose(f);
    assert_int_equal(adamw_steps(back), 3);
    assert_memory_equal(adamw_exp_avg(back), adamw_exp_avg(opt), trainable * sizeof(float));
    assert_memory_equal(adamw_exp_avg_sq(back), adamw_exp_avg_sq(opt), trainable * sizeof(float));

    free(want);
    free(got);
    free(p);
    adamw_free(opt);
    adamw_free(back);
    trial_free(&t);
}

static void test_new_refused(void **state) {
    (void)state;
    char err[ERR_LEN];
    adamw *opt = NULL;
    adamw_config cfg = adamw_default_config();
    assert_true(cfg.beta1 == 0.9 && cfg.beta2 == 0.999 && cfg.eps == 1e-8 &&
                cfg.weight_decay == 0.0);
    adamw_range ok[2] = {{0, 4, true}, {4, 3, false}};
    assert_int_equal(adamw_new(&cfg, ok, 2, &opt, err, sizeof err), 0);
    assert_int_equal(adamw_trainable(opt), 7);
    assert_int_equal(adamw_steps(opt), 0);
    adamw_free(opt);
    opt = NULL;

    adamw_range overlap[2] = {{0, 5, true}, {4, 3, false}};
    assert_int_equal(adamw_new(&cfg, overlap, 2, &opt, err, sizeof err), -1);
    assert_non_null(strstr(err, "overlaps"));
    adamw_range backwards[2] = {{10, 2, true}, {0, 3, false}};
    assert_int_equal(adamw_new(&cfg, backwards, 2, &opt, err, sizeof err), -1);
    adamw_range empty[1] = {{3, 0, true}};
    assert_int_equal(adamw_new(&cfg, empty, 1, &opt, err, sizeof err), -1);
    assert_non_null(strstr(err, "empty"));
    assert_int_equal(adamw_new(&cfg, ok, 0, &opt, err, sizeof err), -1);
    adamw_range huge[1] = {{SIZE_MAX - 2, 5, true}};
    assert_int_equal(adamw_new(&cfg, huge, 1, &opt, err, sizeof err), -1);
    adamw_range too_many[1] = {{0, SIZE_MAX / 2, true}};
    assert_int_equal(adamw_new(&cfg, too_many, 1, &opt, err, sizeof err), -1);

    adamw_config bad = cfg;
    bad.beta1 = 1.0;
    assert_int_equal(adamw_new(&bad, ok, 2, &opt, err, sizeof err), -1);
    assert_non_null(strstr(err, "beta1"));
    bad = cfg;
    bad.beta2 = -0.1;
    assert_int_equal(adamw_new(&bad, ok, 2, &opt, err, sizeof err), -1);
    assert_non_null(strstr(err, "beta2"));
    bad = cfg;
    bad.eps = -1e-8;
    assert_int_equal(adamw_new(&bad, ok, 2, &opt, err, sizeof err), -1);
    bad = cfg;
    bad.weight_decay = NAN;
    assert_int_equal(adamw_new(&bad, ok, 2, &opt, err, sizeof err), -1);
    assert_non_null(strstr(err, "weight_decay"));
    assert_null(opt);
}

static void test_clip_edges(void **state) {
    (void)state;
    char err[ERR_LEN];
    adamw *opt = NULL;
    adamw_config cfg = adamw_default_config();
    adamw_range r[1] = {{1, 2, true}};
    assert_int_equal(adamw_new(&cfg, r, 1, &opt, err, sizeof err), 0);
    float g[4] = {100.0f, 3.0f, 4.0f, -7.0f};
    /* Disabled: the norm of the trainable part only, grads untouched. */
    assert_true(adamw_clip_grad_norm(opt, g, 0.0) == 5.0);
    assert_true(g[1] == 3.0f && g[2] == 4.0f);
    /* Under the limit: untouched. */
    assert_true(adamw_clip_grad_norm(opt, g, 10.0) == 5.0);
    assert_true(g[1] == 3.0f && g[2] == 4.0f);
    /* At the limit, 5 / (5 + 1e-6) < 1: torch scales, by a hair, and so do we. */
    assert_true(adamw_clip_grad_norm(opt, g, 5.0) == 5.0);
    assert_true(g[1] < 3.0f && g[1] > 2.9999f && g[2] < 4.0f);
    g[1] = 3.0f;
    g[2] = 4.0f;
    assert_true(adamw_clip_grad_norm(opt, g, 1.0) == 5.0);
    assert_true(fabs(g[1] - 0.6) < 1e-6 && fabs(g[2] - 0.8) < 1e-6);
    assert_true(g[0] == 100.0f && g[3] == -7.0f);
    assert_true(fabs(adamw_grad_norm(opt, g) - 1.0) < 1e-6);
    /* Non-finite: reported, grads left as they are. */
    g[2] = NAN;
    assert_true(isnan(adamw_clip_grad_norm(opt, g, 1.0)));
    assert_true(fabs(g[1] - 0.6) < 1e-6 && isnan(g[2]));
    g[2] = INFINITY;
    assert_true(isinf(adamw_clip_grad_norm(opt, g, 1.0)));
    assert_true(fabs(g[1] - 0.6) < 1e-6);
    adamw_free(opt);
}

/* wd 0 on a decayed range, lr 0 (a first warmup step): parameters do not
 * move, though the moments do. */
static void test_lr_zero(void **state) {
    (void)state;
    char err[ERR_LEN];
    adamw *opt = NULL;
    adamw_config cfg = adamw_default_config();
    cfg.weight_decay = 0.1;
    adamw_range r[1] = {{0, 3, true}};
    assert_int_equal(adamw_new(&cfg, r, 1, &opt, err, sizeof err), 0);
    float p[3] = {0.5f, -1.25f, 2.0f}, g[3] = {0.3f, -0.2f, 0.1f};
    adamw_step(opt, p, g, 0.0);
    assert_true(p[0] == 0.5f && p[1] == -1.25f && p[2] == 2.0f);
    assert_true(fabs(adamw_exp_avg(opt)[0] - 0.03) < 1e-8);
    assert_true(fabs(adamw_exp_avg_sq(opt)[1] - 0.001 * 0.04) < 1e-10);
    /* Step 2 with lr 0.1: bias-corrected m/sqrt(v) has the sign of g, so
     * each parameter moves by about lr against its gradient (plus decay). */
    adamw_step(opt, p, g, 0.1);
    assert_true(fabs(p[0] - (0.5 * (1 - 0.01) - 0.1)) < 1e-5);
    assert_true(fabs(p[1] - (-1.25 * (1 - 0.01) + 0.1)) < 1e-5);
    adamw_free(opt);
}

/* The pieces a device update is built from (adamw_begin_step's scalars,
 * adamw_range_decay, adamw_clip_coef, adamw_ranges, adamw_moments), used
 * as train.c's GPU path uses them with its own arrays standing for device
 * memory: clipping folded into one gradient scale with an fp16-style
 * unscale of 1/8, two ranges (one decayed), three steps. Parameters and
 * moments equal adamw_step's bit for bit, and the moments imported into the
 * optimizer serialize to the same bytes as the host optimizer's state. */
static void test_device_pieces(void **state) {
    (void)state;
    char err[ERR_LEN];
    adamw_config cfg = adamw_default_config();
    cfg.weight_decay = 0.05;
    adamw_range r[2] = {{1, 5, true}, {8, 4, false}};
    adamw *host = NULL, *dev = NULL;
    assert_int_equal(adamw_new(&cfg, r, 2, &host, err, sizeof err), 0);
    assert_int_equal(adamw_new(&cfg, r, 2, &dev, err, sizeof err), 0);
    enum { N = 13 };
    float p_host[N], p_dev[N], m_dev[9] = {0}, v_dev[9] = {0};
    for (int i = 0; i < N; i++) p_host[i] = p_dev[i] = 0.1f * (float)(i - 6);
    size_t nr = 0;
    const adamw_range *got = adamw_ranges(dev, &nr);
    assert_int_equal(nr, 2);
    assert_true(got[1].offset == 8 && got[1].count == 4 && !got[1].decay);
    const float unscale = 0.125f;
    for (int step = 0; step < 3; step++) {
        double lr = 0.01 * (step + 1), max_norm = step == 1 ? 100.0 : 0.5;
        float g_host[N], g_scaled[N];
        for (int i = 0; i < N; i++) {
            g_scaled[i] = (float)sin(1.7 * i + step) * 8.0f; /* "loss-scaled" by 8 */
            g_host[i] = g_scaled[i] * unscale;               /* exact: a power of two */
        }
        /* host: clip, then step */
        double total = adamw_clip_grad_norm(host, g_host, max_norm);
        adamw_step(host, p_host, g_host, lr);
        /* device: the scaled gradients' squares, the root unscaled in double */
        double sumsq = 0;
        for (size_t k = 0; k < nr; k++)
            for (size_t i = 0; i < got[k].count; i++)
                sumsq += (double)g_scaled[got[k].offset + i] * g_scaled[got[k].offset + i];
        double dev_total = sqrt(sumsq) * (double)unscale;
        assert_true(dev_total == total);
        float coef = adamw_clip_coef(dev_total, max_norm);
        assert_true(step == 1 ? coef == 1.0f : coef < 1.0f);
        float grad_scale = unscale * coef;
        adamw_scalars sc = adamw_begin_step(dev, lr);
        size_t packed = 0;
        for (size_t k = 0; k < nr; k++) {
            float decay = adamw_range_decay(dev, k, &sc);
            assert_true(k == 0 ? decay == (float)(1.0 - lr * 0.05) : decay == 1.0f);
            for (size_t i = 0; i < got[k].count; i++) {
                float *p = &p_dev[got[k].offset + i], *m = &m_dev[packed + i],
                      *v = &v_dev[packed + i];
                float g = g_scaled[got[k].offset + i] * grad_scale;
                float pi = *p * decay;
                *m = *m * sc.beta1 + sc.one_minus_beta1 * g;
                *v = *v * sc.beta2 + (sc.one_minus_beta2 * g) * g;
                float denom = sqrtf(*v) / sc.bias_correction2_sqrt + sc.eps;
                *p = pi + (sc.neg_step_size * *m) / denom;
            }
            packed += got[k].count;
        }
        assert_int_equal(adamw_steps(dev), step + 1);
        assert_memory_equal(p_dev, p_host, sizeof p_dev);
    }
    /* export: the device's moments into the optimizer, then its state */
    float *m, *v;
    adamw_moments(dev, &m, &v);
    memcpy(m, m_dev, sizeof m_dev);
    memcpy(v, v_dev, sizeof v_dev);
    assert_memory_equal(adamw_exp_avg(dev), adamw_exp_avg(host), sizeof m_dev);
    assert_memory_equal(adamw_exp_avg_sq(dev), adamw_exp_avg_sq(host), sizeof v_dev);
    size_t len = adamw_state_size(host);
    assert_int_equal(adamw_state_size(dev), len);
    unsigned char *a = malloc(len), *b = malloc(len);
    assert_true(a && b);
    assert_int_equal(adamw_serialize(host, a, len, err, sizeof err), 0);
    assert_int_equal(adamw_serialize(dev, b, len, err, sizeof err), 0);
    assert_memory_equal(a, b, len);
    free(a);
    free(b);
    adamw_free(host);
    adamw_free(dev);
}

/* adamw_clip_coef: 1 exactly when off, not finite, or at or under the
 * limit; torch's float32 formula otherwise. */
static void test_clip_coef(void **state) {
    (void)state;
    assert_true(adamw_clip_coef(5.0, 0.0) == 1.0f);
    assert_true(adamw_clip_coef(5.0, -1.0) == 1.0f);
    assert_true(adamw_clip_coef(INFINITY, 1.0) == 1.0f);
    assert_true(adamw_clip_coef(NAN, 1.0) == 1.0f);
    assert_true(adamw_clip_coef(5.0, 10.0) == 1.0f);
    assert_true(adamw_clip_coef(0.0, 1.0) == 1.0f);
    assert_true(adamw_clip_coef(5.0, 1.0) == (1.0f / (5.0f + 1e-6f)) * 1.0f);
    float at = adamw_clip_coef(5.0, 5.0);
    assert_true(at < 1.0f && at > 0.9999f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_against_torch),     cmocka_unit_test(test_schedule_tables),
        cmocka_unit_test(test_schedule_shape),    cmocka_unit_test(test_warmup_steps),
        cmocka_unit_test(test_parse_kind),        cmocka_unit_test(test_state_round_trip),
        cmocka_unit_test(test_state_refused),     cmocka_unit_test(test_state_file),
        cmocka_unit_test(test_new_refused),
        cmocka_unit_test(test_clip_edges),        cmocka_unit_test(test_lr_zero),
        cmocka_unit_test(test_device_pieces),     cmocka_unit_test(test_clip_coef),
    };
    return cmocka_run_group_tests(tests, setup_all, teardown_all);
}
