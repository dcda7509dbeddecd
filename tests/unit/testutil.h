/* testutil - what several unit tests share: where the fixtures are, per-test
 * temporary directories, loading JSON and .npy fixtures, relative-error
 * comparisons, and a scratch/output directory pair with runner callbacks for
 * tests that run a job through runner_run.
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

#include "common/npy.h"
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

#endif
