/* testutil - what several unit tests share: where the fixtures are, per-test
 * temporary directories, loading JSON and .npy fixtures, relative-error
 * comparisons, reproducible random floats, a scratch/output directory pair
 * with runner callbacks for tests that run a job through runner_run, job
 * specs written as templates, and the CKA fixture cases.
 *
 * Every tu_ function that can fail fails the running cmocka test (fail_msg)
 * with a message naming the path or value, except tu_mkdtemp and tu_rmtree,
 * which return 0 / -1 so that setup and teardown fixtures can return them. */
#ifndef STRATA_TESTS_UNIT_TESTUTIL_H
#define STRATA_TESTS_UNIT_TESTUTIL_H

#include <jansson.h>
#include <limits.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "common/npy.h"
#include "worker/engine/cka.h"
#include "worker/runner.h"

/* out = $STRATA_FIXTURES/rel when that is set, else tests/fixtures/rel found
 * from this source file (tests run from the repository root, where __FILE__
 * is relative); rel "" gives the directory itself. Fails the test if out is
 * too small. */
void tu_fixture_path(char *out, size_t outlen, const char *rel);

/* out = $STRATA_REFERENCE/rel when that is set, else
 * tests/reference/fixtures/rel (the PyTorch reference fixtures), found as
 * tu_fixture_path finds tests/fixtures. */
void tu_reference_path(char *out, size_t outlen, const char *rel);

/* Makes /tmp/strata-<tag>-XXXXXX in dir (dirlen bytes). 0, or -1 if the name
 * does not fit or mkdtemp fails. */
int tu_mkdtemp(char *dir, size_t dirlen, const char *tag);

/* Removes dir and everything below it (links are removed, not followed).
 * 0, or -1 if anything could not be removed. */
int tu_rmtree(const char *dir);

/* Parses the JSON file at path; fails the test naming path and the parse
 * error. Caller owns the returned reference. */
json_t *tu_load_json(const char *path);

/* Reads the .npy file at path as float64 rows (any stored dtype) into a
 * malloc'd array the caller frees; *h gets its header. Fails the test naming
 * path and the reader's error. */
double *tu_read_npy(const char *path, npy_header *h);

/* max |got - want| / max |want| over n values. Fails the test, naming
 * what[i], on a non-finite got value, and when every want is zero. */
double tu_rel_err(const double *got, const double *want, size_t n, const char *what);

/* tu_rel_err for float32 results against float64 references. */
double tu_rel_err_f(const float *got, const double *want, size_t n, const char *what);

/* tu_rel_err for float32 results against float32 references. */
double tu_rel_err_ff(const float *got, const float *want, size_t n, const char *what);

/* max |got - want| / max |want| over n floats, or max |got - want| when
 * every want is zero (for outputs that may legitimately be all zero, judged
 * then on the inputs' scale of about 1). Fails the test, naming what[i], on
 * a non-finite got or want value. */
double tu_rel_or_abs_err_ff(const float *got, const float *want, size_t n, const char *what);

/* The next splitmix64 draw from *state (advanced), as a float uniform in
 * [-1, 1): the same sequence for the same seed on every run. (The double
 * below 1 is rounded to float, so 1.0f itself can come out.) */
float tu_rand_uniform(uint64_t *state);

/* n floats amp * tu_rand_uniform(state), drawn in order, in a malloc'd
 * array (at least one element) the caller frees; fails the test when out of
 * memory. */
float *tu_rand_floats(uint64_t *state, size_t n, float amp);

/* A malloc'd copy of x's n floats (at least one element) the caller frees;
 * fails the test when out of memory. */
float *tu_dup_floats(const float *x, size_t n);

/* A job run in a test: scratch (work) and output (out) directories of its
 * own; artifacts counts what the job added. */
typedef struct {
    char work[PATH_MAX];
    char out[PATH_MAX];
    int artifacts;
} tu_run;

/* Makes run's directories /tmp/strata-test-<tag>-w-XXXXXX and -o-XXXXXX;
 * fails the test if either cannot be made. */
void tu_run_begin(tu_run *run, const char *tag);

/* Removes both of run's directories with all they hold. */
void tu_run_end(tu_run *run);

/* A runner context for run: models, datasets (format "auto") and adapters
 * resolved from {"path": ...} references that must exist, artifacts moved
 * into run->out; cancel as given, no progress callback, user = run, on the
 * CPU (gpu -1). */
runner_ctx tu_run_ctx(tu_run *run, atomic_int *cancel);

/* A runner_ctx resolve_file (or resolve_model / resolve_adapter) for
 * references {"path": p} where p exists: copies p into path. 0, or -1 with
 * err when there is no "path" or it does not exist. */
int tu_resolve_path(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen, char *err,
                    size_t errlen);

/* Parses a job spec written as a template: each ' becomes ", %M becomes
 * model_dir and %D dataset_path (so specs read as C strings without
 * escapes). Fails the test when the result is too long or not JSON. Caller
 * owns the returned reference. */
json_t *tu_spec_load(const char *tmpl, const char *model_dir, const char *dataset_path);

/* Sends stdout to /dev/null (flushing what is buffered) and returns the
 * descriptor tu_stdout_on needs to restore it; fails the test if it cannot.
 * For code under test that prints result lines the test output should not
 * carry. */
int tu_stdout_off(void);

/* Restores the stdout that tu_stdout_off(saved) silenced. */
void tu_stdout_on(int saved);

/* A right-padded token batch from a JSON object {"input_ids": [[...]],
 * "labels": [[...]], "lengths": [...], "T", "n_counted"} (the training
 * reference fixtures' layout). Rows are b*T + t. */
typedef struct {
    int B, T;
    int *tokens, *labels, *lengths;
    long n_counted;
} tu_batch;

/* Fills bt from j (fails the test on a malformed batch); free with
 * tu_batch_free. */
void tu_batch_load(tu_batch *bt, json_t *j);
void tu_batch_free(tu_batch *bt);

/* The "cases" array of the CKA fixtures (tests/fixtures/cka/expected.json;
 * fails the test when it is not an array). Caller owns the reference. */
json_t *tu_cka_cases(void);

/* Fixture case c's x and y .npy paths into xp and yp (len bytes each);
 * fails the test when they do not fit. */
void tu_cka_case_paths(json_t *c, char *xp, char *yp, size_t len);

/* Fixture case c's kernel, debiasing and rbf threshold, in space space. */
cka_options tu_cka_case_options(json_t *c, cka_space space);

/* The expected "cka" of the fixture case named name; fails the test when
 * there is no such case. */
double tu_cka_fixture_value(const char *name);

/* A runner_ctx resolve_file for {"path": name}: the CKA fixture file name.
 * 0, or -1 with err when there is no "path" or the path does not fit. */
int tu_cka_resolve_file(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen, char *err,
                        size_t errlen);

#endif
