/* schedule.h - learning-rate schedules of train jobs, with Hugging Face
 * transformers' formulas (optimization.py; the names are TrainingArguments'
 * lr_scheduler_type values).
 *
 * Step convention (torch's LambdaLR as the Trainer drives it): the optimizer
 * step that follows k completed steps (k = 0 for the first) uses
 * lr = base_lr * lambda(k); lambda(0) is used by the first step, so with
 * warmup the first step has lr 0. With W warmup steps and N total steps:
 *
 *   constant              lambda(k) = 1 (warmup ignored, as HF's
 *                         get_constant_schedule)
 *   constant_with_warmup  k < W: k / max(1, W); else 1
 *   linear                k < W: k / max(1, W);
 *                         else max(0, (N - k) / max(1, N - W))
 *   cosine                k < W: k / max(1, W); else, with
 *                         progress = (k - W) / max(1, N - W),
 *                         max(0, 0.5 * (1 + cos(pi * 0.5 * 2 * progress)))
 *                         (num_cycles 0.5: one half cosine from 1 to 0)
 *
 * Everything in double, as Python computes it. */
#ifndef STRATA_SCHEDULE_H
#define STRATA_SCHEDULE_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    SCHED_CONSTANT = 0,
    SCHED_CONSTANT_WITH_WARMUP = 1,
    SCHED_LINEAR = 2,
    SCHED_COSINE = 3,
} sched_kind;

typedef struct {
    sched_kind kind;
    int64_t warmup_steps; /* >= 0 */
    int64_t total_steps;  /* >= 1: optimizer steps of the whole run */
} sched;

/* Parses "constant", "constant_with_warmup", "linear" or "cosine". Returns 0,
 * or -1 with err listing the accepted names. */
int sched_parse_kind(const char *name, sched_kind *out, char *err, size_t errlen);

/* The name sched_parse_kind accepts for kind. */
const char *sched_kind_name(sched_kind kind);

/* HF TrainingArguments.get_warmup_steps: warmup_steps when > 0, else
 * ceil(total_steps * warmup_ratio) computed in double (so a ratio of 0.07 of
 * 100 steps gives 8, as in Python, since 100 * 0.07 = 7.000000000000001).
 * Returns 0 and *out, or -1 with err for a negative count, a ratio outside
 * [0, 1] or total_steps < 1. */
int sched_warmup_steps(int64_t warmup_steps, double warmup_ratio, int64_t total_steps,
                       int64_t *out, char *err, size_t errlen);

/* Checks s (kind known, warmup_steps >= 0, total_steps >= 1). Returns 0 or -1. */
int sched_check(const sched *s, char *err, size_t errlen);

/* lambda(completed): the multiplier of base_lr for the optimizer step that
 * follows `completed` (>= 0) steps. s must pass sched_check. */
double sched_lambda(const sched *s, int64_t completed);

/* base_lr * sched_lambda(s, completed). */
double sched_lr(const sched *s, double base_lr, int64_t completed);

#endif
