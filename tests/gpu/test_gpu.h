/* test_gpu.h - what the pieces of the GPU test program (tests/gpu/) share:
 * the result table, the run's settings and a seeded random generator.
 *
 * test_gpu.c holds main, the table and the op-by-op checks;
 * gpu_models.c the model-level checks (PyTorch reference fixtures, train,
 * predict and CKA jobs, GPU CKA). Every check compares the CUDA backend
 * with the CPU backend (or with a float64 reference) and records one row
 * per compared quantity: its worst error, the tolerance it must meet and
 * how long it took. */
#ifndef STRATA_TESTS_GPU_TEST_GPU_H
#define STRATA_TESTS_GPU_TEST_GPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/engine/backend.h"
#include "worker/engine/cuda/cuda.h"

/* The run's settings, from the command line. */
typedef struct {
    int device;          /* CUDA ordinal under test */
    bool small;          /* emulator-sized shapes (--small, or an emulated device) */
    bool verbose;        /* job logs to stderr */
    const char *only;    /* run only checks whose name starts with this (NULL: all) */
    char device_name[96];
    char tmp[4096];      /* scratch directory for job inputs and outputs */
} gt_config;

extern gt_config gt_cfg;

/* Appends one row to the result table. err is the measured worst error
 * (NAN when the check could not run: note then says why), tol the bound it
 * must stay within; a row passes when err <= tol. note may be NULL. */
void gt_record(const char *check, double err, double tol, double seconds, const char *note);

/* True when the check called name should run (the --only filter). */
bool gt_wanted(const char *name);

/* Seeded generator (splitmix64): the same seed draws the same inputs on
 * every machine, so a failure can be rerun exactly. */
typedef struct {
    uint64_t state;
} gt_rng;

uint64_t gt_next(gt_rng *r);
/* Uniform in [lo, hi). */
float gt_uniform(gt_rng *r, float lo, float hi);
/* n values uniform in [lo, hi) into x. */
void gt_fill(gt_rng *r, float *x, size_t n, float lo, float hi);

/* max |got - want| / max |want| over n values; +inf when got has a value
 * that is not finite, or every want is zero while got is not. */
double gt_rel_err(const float *got, const float *want, size_t n);
double gt_rel_err_d(const double *got, const double *want, size_t n);

/* The model-level checks (gpu_models.c). Each records its own rows. */
void gt_check_reference_forward(const backend *gpu);
void gt_check_reference_backward(const backend *gpu);
void gt_check_forward_precision(int device);
void gt_check_train_jobs(void);
void gt_check_predict_cka_jobs(void);
void gt_check_cka_gpu(void);

#endif
