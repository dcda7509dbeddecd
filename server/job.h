/* job.h - the job store: every state transition of a job is here, each one
 * a parameterised statement (or a short transaction) on PostgreSQL, so that
 * several servers may share the database.
 *
 * States: blocked -> queued -> running -> succeeded | failed | cancelled, with
 * running -> queued on a retryable failure, a released job or a lapsed lease.
 *
 * Failure rule for every function here: returns -1 with *status set to the
 * HTTP status that describes the problem (400 bad input, 403 not the owner,
 * 404 unknown id, 409 wrong state / not the holder, 500 database error, 503
 * database unavailable) and err set to a sentence for the client. A JSON
 * document handed back (*doc) belongs to the caller: char * documents are
 * JSON text exactly as PostgreSQL wrote it (free()), json_t ones are
 * jansson values (json_decref()). */
#ifndef STRATA_JOB_H
#define STRATA_JOB_H

#include <jansson.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A validated submission. */
typedef struct {
    const char *kind;
    const char *name; /* NULL for none */
    json_t *spec;
    int priority;
    int max_attempts;
    int gpus;
    const int64_t *deps;
    size_t ndeps;
    int64_t owner_id;
} job_new;

/* Scheduling knobs from the configuration. */
typedef struct {
    int lease_s;
    int retry_base_s;
    int retry_max_s;
} job_policy;

/* True for the six state names. */
bool job_valid_state(const char *state);

/* The delay before retry number attempt (1-based): base * 2^(attempt-1),
 * capped at max. */
int64_t job_retry_delay(int64_t attempt, int64_t base, int64_t max);

/* Inserts a job after checking that its dependencies and the inputs its spec
 * names exist (field errors appended to errors, status 400). */
int job_create(PGconn *conn, const job_new *in, json_t *errors, int64_t *id, char **doc,
               int *status, char *err, size_t errlen);

/* Loads one job; 404 when unknown. */
int job_get(PGconn *conn, int64_t id, char **doc, int *status, char *err, size_t errlen);
/* True (1) when the job exists, 0 when not, -1 on error. */
int job_exists(PGconn *conn, int64_t id, char *err, size_t errlen);
/* The owner's user id of job id (404 when unknown). */
int job_owner(PGconn *conn, int64_t id, int64_t *owner_id, int *status, char *err,
              size_t errlen);

/* Newest first, ids below before_id when before_id > 0. Filters may be NULL.
 * *items is the text of a JSON array; *next_id is the cursor id for the next page, or 0. */
int job_list(PGconn *conn, const char *state, const char *kind, const char *owner,
             int64_t before_id, int limit, char **items, int64_t *next_id, int *status,
             char *err, size_t errlen);

/* Registers a worker owned by user_id. gpus_json and queues_json are JSON
 * arrays. Returns 0 with *doc ({"id", "name", ...}). */
int job_worker_register(PGconn *conn, int64_t user_id, const char *name, const char *hostname,
                        const char *gpus_json, const char *queues_json, json_t **doc,
                        int *status, char *err, size_t errlen);
/* Records that worker_id is alive; *gpus receives its registered GPU count.
 * 404 when the worker is unknown, 403 when it was registered by another user
 * (admins may act for any worker). */
int job_worker_seen(PGconn *conn, int64_t worker_id, int64_t user_id, bool is_admin, int *gpus,
                    int *status, char *err, size_t errlen);
/* Checks that worker_id exists (else missing_status) and was registered by
 * user_id (else 403; admins pass). Returns 0 or -1 with *status and err set. */
int job_worker_check(PGconn *conn, int64_t worker_id, int64_t user_id, bool is_admin,
                     int missing_status, int *status, char *err, size_t errlen);
/* Claims the best queued job for a worker with gpus GPUs. Returns 1 with *doc
 * (the job, lease_expires_at set), 0 when there is none, -1 on error. */
int job_claim(PGconn *conn, int64_t worker_id, int gpus, const job_policy *policy,
              char **doc, int *status, char *err, size_t errlen);

/* Worker calls; each requires the job to be running and held by worker_id
 * (404 unknown job, 409 otherwise). */
int job_heartbeat(PGconn *conn, int64_t id, int64_t worker_id, const char *progress_json,
                  const job_policy *policy, json_t **doc, int *status, char *err,
                  size_t errlen);
int job_complete(PGconn *conn, int64_t id, int64_t worker_id, const char *result_json,
                 char **doc, int *status, char *err, size_t errlen);
int job_fail(PGconn *conn, int64_t id, int64_t worker_id, const char *error, bool retryable,
             const job_policy *policy, char **doc, int *status, char *err, size_t errlen);
int job_release(PGconn *conn, int64_t id, int64_t worker_id, char **doc, int *status,
                char *err, size_t errlen);
/* Checks (without changing anything) that worker_id holds job id. */
int job_check_held(PGconn *conn, int64_t id, int64_t worker_id, int *status, char *err,
                   size_t errlen);
/* Appends the lines of text (split at newlines) to the job's log. */
int job_logs_add(PGconn *conn, int64_t id, int64_t worker_id, const char *text, int *status,
                 char *err, size_t errlen);
/* The whole log, one line per record; *text is malloc'd (caller frees). */
int job_logs_get(PGconn *conn, int64_t id, char **text, int *status, char *err, size_t errlen);
/* Stores metric points; points_json is a validated JSON array of
 * {"name", "step", "value"}. */
int job_metrics_add(PGconn *conn, int64_t id, int64_t worker_id, const char *points_json,
                    int *status, char *err, size_t errlen);
/* {"series": {name: [[step, value], ...]}} ordered by step. */
int job_metrics_get(PGconn *conn, int64_t id, char **doc, int *status, char *err,
                    size_t errlen);

/* Owner or admin actions. *http_status is 200, or 202 for a cancel that
 * waits for the running job's worker. */
int job_cancel(PGconn *conn, int64_t id, int64_t user_id, bool is_admin, char **doc,
               int *http_status, int *status, char *err, size_t errlen);
int job_retry(PGconn *conn, int64_t id, int64_t user_id, bool is_admin, char **doc,
              int *status, char *err, size_t errlen);

/* The reaper's pass: running jobs whose lease lapsed are cancelled (cancel
 * requested), requeued (attempts left) or failed. Returns the number of jobs
 * moved, or -1 with err. *requeued tells whether any job was queued. */
int job_reap(PGconn *conn, bool *requeued, char *err, size_t errlen);

#endif
