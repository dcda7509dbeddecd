/* schedule.c - Hugging Face's learning-rate schedules; formulas in schedule.h. */
#include "worker/engine/schedule.h"

#include "common/util.h"

#include <math.h>
#include <string.h>

static const char *const sched_names[] = {
    [SCHED_CONSTANT] = "constant",
    [SCHED_CONSTANT_WITH_WARMUP] = "constant_with_warmup",
    [SCHED_LINEAR] = "linear",
    [SCHED_COSINE] = "cosine",
};

#define SCHED_KINDS (sizeof sched_names / sizeof sched_names[0])

int sched_parse_kind(const char *name, sched_kind *out, char *err, size_t errlen) {
    for (size_t i = 0; name && i < SCHED_KINDS; i++) {
        if (strcmp(name, sched_names[i]) == 0) {
            *out = (sched_kind)i;
            return 0;
        }
    }
    return err_set(err, errlen,
                   "lr_scheduler \"%s\" is not one of constant, constant_with_warmup, linear, "
                   "cosine",
                   name ? name : "(null)");
}

const char *sched_kind_name(sched_kind kind) {
    return (size_t)kind < SCHED_KINDS ? sched_names[kind] : "unknown";
}

int sched_warmup_steps(int64_t warmup_steps, double warmup_ratio, int64_t total_steps,
                       int64_t *out, char *err, size_t errlen) {
    if (total_steps < 1)
        return err_set(err, errlen, "total optimizer steps %lld must be >= 1",
                       (long long)total_steps);
    if (warmup_steps < 0)
        return err_set(err, errlen, "warmup_steps %lld must be >= 0", (long long)warmup_steps);
    if (!(warmup_ratio >= 0.0 && warmup_ratio <= 1.0))
        return err_set(err, errlen, "warmup_ratio %g is not in [0, 1]", warmup_ratio);
    if (warmup_steps > 0) {
        *out = warmup_steps;
        return 0;
    }
    /* A product <= total_steps, so the conversion back is exact. */
    *out = (int64_t)ceil((double)total_steps * warmup_ratio);
    return 0;
}

int sched_check(const sched *s, char *err, size_t errlen) {
    if ((size_t)s->kind >= SCHED_KINDS)
        return err_set(err, errlen, "unknown lr_scheduler kind %d", (int)s->kind);
    if (s->warmup_steps < 0)
        return err_set(err, errlen, "warmup_steps %lld must be >= 0",
                       (long long)s->warmup_steps);
    if (s->total_steps < 1)
        return err_set(err, errlen, "total optimizer steps %lld must be >= 1",
                       (long long)s->total_steps);
    return 0;
}

/* HF's max(1, n) in the denominators, as a double. */
static double sched_at_least_one(int64_t n) { return n > 1 ? (double)n : 1.0; }

double sched_lambda(const sched *s, int64_t completed) {
    int64_t k = completed, w = s->warmup_steps, n = s->total_steps;
    if (s->kind == SCHED_CONSTANT) return 1.0;
    if (k < w) return (double)k / sched_at_least_one(w);
    switch (s->kind) {
    case SCHED_CONSTANT_WITH_WARMUP:
        return 1.0;
    case SCHED_LINEAR:
        return fmax(0.0, (double)(n - k) / sched_at_least_one(n - w));
    case SCHED_COSINE: {
        double progress = (double)(k - w) / sched_at_least_one(n - w);
        return fmax(0.0, 0.5 * (1.0 + cos(M_PI * 0.5 * 2.0 * progress)));
    }
    case SCHED_CONSTANT:
        break;
    }
    return 1.0;
}

double sched_lr(const sched *s, double base_lr, int64_t completed) {
    return base_lr * sched_lambda(s, completed);
}
