/* job.c - see job.h. The SQL of the job store is all here, at the top. */
#include "job.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/log.h"
#include "common/util.h"
#include "server/db.h"
#include "server/notify.h"
#include "server/registry.h"

/* --- statements ----------------------------------------------------------- */

static const char JOB_SQL_NOTIFY[] = "SELECT pg_notify('" NOTIFY_CHANNEL "', 'queued')";

/* FOR SHARE keeps a dependency from finishing while its dependent is being
 * inserted; otherwise the finishing transaction could miss the new edge and
 * leave the dependent blocked for ever. */
static const char JOB_SQL_LOCK_DEPS[] =
    "SELECT id, state FROM jobs WHERE id = ANY($1::bigint[]) FOR SHARE";
static const char JOB_SQL_ARTIFACT_EXISTS[] = "SELECT 1 FROM artifacts WHERE id = $1";
static const char JOB_SQL_EXISTS[] = "SELECT 1 FROM jobs WHERE id = $1";
/* A train job's method defaults to "lora", as its spec validation does. */
static const char JOB_SQL_KIND[] =
    "SELECT kind, COALESCE(spec->>'method', 'lora') FROM jobs WHERE id = $1";
static const char JOB_SQL_INSERT[] =
    "INSERT INTO jobs (kind, name, state, spec, priority, max_attempts, resources, owner_id,"
    " error, finished_at)"
    " VALUES ($1, $2, $3, $4::jsonb, $5, $6, jsonb_build_object('gpus', $7::int), $8, $9,"
    " CASE WHEN $3 = 'failed' THEN now() END) RETURNING id";
static const char JOB_SQL_INSERT_DEPS[] =
    "INSERT INTO job_deps (job_id, depends_on)"
    " SELECT DISTINCT $1::bigint, d FROM unnest($2::bigint[]) AS d";
static const char JOB_SQL_DOC[] = "SELECT strata_job_doc(j) FROM jobs j WHERE j.id = $1";
static const char JOB_SQL_OWNER[] = "SELECT owner_id FROM jobs WHERE id = $1";
static const char JOB_SQL_HOLDER[] = "SELECT state, worker_id FROM jobs WHERE id = $1";

static const char JOB_SQL_LIST[] =
    "SELECT strata_job_doc(j), j.id FROM jobs j"
    " WHERE ($1::text IS NULL OR j.state = $1)"
    " AND ($2::text IS NULL OR j.kind = $2)"
    " AND ($3::text IS NULL OR j.owner_id = (SELECT u.id FROM users u WHERE u.name = $3))"
    " AND ($4::bigint IS NULL OR j.id < $4)"
    " ORDER BY j.id DESC LIMIT $5";

static const char JOB_SQL_WORKER_REGISTER[] =
    "INSERT INTO workers (name, hostname, gpus, queues, user_id)"
    " VALUES ($1, $2, $3::jsonb, $4::jsonb, $5)"
    " RETURNING json_build_object('id', id, 'name', name, 'hostname', hostname, 'gpus', gpus,"
    " 'queues', queues, 'registered_at', strata_time(registered_at))";
static const char JOB_SQL_WORKER_SEEN[] =
    "UPDATE workers SET last_seen_at = now() WHERE id = $1"
    " AND (user_id = $2 OR $3::boolean)"
    " RETURNING CASE WHEN jsonb_typeof(gpus) = 'array' THEN jsonb_array_length(gpus) ELSE 0 END";
static const char JOB_SQL_WORKER_OWNER[] = "SELECT user_id FROM workers WHERE id = $1";

/* The scheduler in one statement: highest priority first, then the owner
 * with the fewest running jobs (fair share), then the oldest. SKIP LOCKED
 * lets concurrent claims take different jobs instead of queueing up.
 * A job asking for GPUs goes only to a worker with that many free: its
 * registered count ($3) minus the GPUs of the jobs it is running now; a
 * job asking for none goes to any worker (even one whose GPUs are all
 * busy, or that re-registered with fewer than its running jobs hold). */
static const char JOB_SQL_CLAIM[] =
    "UPDATE jobs SET state = 'running', attempt = attempt + 1, worker_id = $1,"
    " started_at = now(), lease_expires_at = now() + make_interval(secs => $2::int),"
    " progress = NULL, cancel_requested = false"
    " WHERE state = 'queued' AND id = ("
    "  SELECT q.id FROM jobs q"
    "  WHERE q.state = 'queued' AND q.not_before <= now()"
    "  AND (COALESCE((q.resources->>'gpus')::int, 0) = 0"
    "   OR COALESCE((q.resources->>'gpus')::int, 0) <= $3::int - (SELECT"
    "    COALESCE(sum(COALESCE((r.resources->>'gpus')::int, 0)), 0) FROM jobs r"
    "    WHERE r.state = 'running' AND r.worker_id = $1))"
    "  ORDER BY q.priority DESC,"
    "   (SELECT count(*) FROM jobs r WHERE r.owner_id = q.owner_id AND r.state = 'running'),"
    "   q.created_at, q.id"
    "  LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " RETURNING strata_job_doc(jobs), id, attempt";

static const char JOB_SQL_HEARTBEAT[] =
    "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3::int),"
    " progress = COALESCE($4::jsonb, progress)"
    " WHERE id = $1 AND state = 'running' AND worker_id = $2"
    " RETURNING strata_time(lease_expires_at), cancel_requested";
static const char JOB_SQL_TOUCH_WORKER[] = "UPDATE workers SET last_seen_at = now() WHERE id = $1";

static const char JOB_SQL_COMPLETE[] =
    "UPDATE jobs SET state = 'succeeded', result = $3::jsonb, finished_at = now(),"
    " lease_expires_at = NULL, error = NULL"
    " WHERE id = $1 AND state = 'running' AND worker_id = $2 RETURNING id";
static const char JOB_SQL_LOCK_HELD[] =
    "SELECT attempt, max_attempts, cancel_requested FROM jobs"
    " WHERE id = $1 AND state = 'running' AND worker_id = $2 FOR UPDATE";
static const char JOB_SQL_TO_FINISHED[] =
    "UPDATE jobs SET state = $2, error = $3, finished_at = now(), lease_expires_at = NULL"
    " WHERE id = $1";
static const char JOB_SQL_TO_QUEUED_RETRY[] =
    "UPDATE jobs SET state = 'queued', error = $2, worker_id = NULL, lease_expires_at = NULL,"
    " not_before = now() + make_interval(secs => $3::int) WHERE id = $1";
static const char JOB_SQL_RELEASE[] =
    "UPDATE jobs SET state = 'queued', attempt = GREATEST(attempt - 1, 0), worker_id = NULL,"
    " lease_expires_at = NULL, started_at = NULL, progress = NULL, not_before = now()"
    " WHERE id = $1";

static const char JOB_SQL_LOCK_FOR_USER[] =
    "SELECT state, owner_id FROM jobs WHERE id = $1 FOR UPDATE";
static const char JOB_SQL_CANCEL_NOW[] =
    "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = $1";
static const char JOB_SQL_CANCEL_REQUEST[] =
    "UPDATE jobs SET cancel_requested = true WHERE id = $1";
static const char JOB_SQL_RETRY[] =
    "UPDATE jobs SET state = CASE WHEN NOT EXISTS (SELECT 1 FROM job_deps d JOIN jobs p"
    "   ON p.id = d.depends_on WHERE d.job_id = jobs.id AND p.state <> 'succeeded')"
    "  THEN 'queued' ELSE 'blocked' END,"
    " attempt = 0, error = NULL, result = NULL, progress = NULL, worker_id = NULL,"
    " lease_expires_at = NULL, cancel_requested = false, started_at = NULL,"
    " finished_at = NULL, not_before = now() WHERE id = $1 RETURNING state";

/* Dependents are locked before they are examined, so two dependencies that
 * succeed at the same moment serialise here and the later one sees both. */
static const char JOB_SQL_LOCK_DEPENDENTS[] =
    "SELECT j.id FROM jobs j WHERE j.state = 'blocked'"
    " AND j.id IN (SELECT d.job_id FROM job_deps d WHERE d.depends_on = $1)"
    " ORDER BY j.id FOR UPDATE";
static const char JOB_SQL_UNBLOCK[] =
    "UPDATE jobs SET state = 'queued', not_before = now() WHERE state = 'blocked'"
    " AND id IN (SELECT d.job_id FROM job_deps d WHERE d.depends_on = $1)"
    " AND NOT EXISTS (SELECT 1 FROM job_deps d JOIN jobs p ON p.id = d.depends_on"
    "  WHERE d.job_id = jobs.id AND p.state <> 'succeeded')"
    " RETURNING id";
/* Locks, in id order, the blocked jobs below a failed one before they are
 * failed, so two cascades over overlapping jobs queue up instead of
 * deadlocking. */
static const char JOB_SQL_LOCK_DESCENDANTS[] =
    "WITH RECURSIVE down(id) AS ("
    "  SELECT d.job_id FROM job_deps d WHERE d.depends_on = $1"
    "  UNION"
    "  SELECT d.job_id FROM job_deps d JOIN down ON d.depends_on = down.id)"
    " SELECT j.id FROM jobs j WHERE j.id IN (SELECT id FROM down) AND j.state = 'blocked'"
    " ORDER BY j.id FOR UPDATE";
/* A failed or cancelled job fails everything blocked below it, each with the
 * id of the dependency through which the failure reached it. */
static const char JOB_SQL_FAIL_DEPENDENTS[] =
    "WITH RECURSIVE down(id, parent) AS ("
    "  SELECT d.job_id, d.depends_on FROM job_deps d WHERE d.depends_on = $1"
    "  UNION"
    "  SELECT d.job_id, d.depends_on FROM job_deps d JOIN down ON d.depends_on = down.id)"
    " UPDATE jobs SET state = 'failed', finished_at = now(),"
    "  error = 'dependency ' || down.parent || ' failed'"
    " FROM down WHERE jobs.id = down.id AND jobs.state = 'blocked'"
    " RETURNING jobs.id, down.parent";

static const char JOB_SQL_LOGS_ADD[] =
    "INSERT INTO job_logs (job_id, line)"
    " SELECT $1, l FROM regexp_split_to_table($2, E'\\r?\\n') WITH ORDINALITY AS t(l, n)"
    " ORDER BY n";
static const char JOB_SQL_LOGS_GET[] =
    "SELECT COALESCE(string_agg(line || E'\\n', '' ORDER BY id), '') FROM job_logs"
    " WHERE job_id = $1";
static const char JOB_SQL_METRICS_ADD[] =
    "INSERT INTO job_metrics (job_id, name, step, value)"
    " SELECT $1, p->>'name', (p->>'step')::bigint, (p->>'value')::float8"
    " FROM json_array_elements($2::json) AS p";
static const char JOB_SQL_METRICS_GET[] =
    "SELECT json_build_object('series', COALESCE(json_object_agg(name, points), '{}'::json))"
    " FROM ("
    " SELECT name, json_agg(json_build_array(step, value) ORDER BY step, created_at) AS points"
    " FROM job_metrics WHERE job_id = $1 GROUP BY name) s";

/* One statement per transition, so two reapers never both act on a job: the
 * second finds the row no longer running once the first commits. */
static const char JOB_SQL_REAP_CANCEL[] =
    "UPDATE jobs SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL"
    " WHERE state = 'running' AND lease_expires_at < now() AND cancel_requested"
    " RETURNING id";
static const char JOB_SQL_REAP_REQUEUE[] =
    "UPDATE jobs SET state = 'queued', error = 'lease expired on worker ' || worker_id,"
    " worker_id = NULL, lease_expires_at = NULL, not_before = now()"
    " WHERE state = 'running' AND lease_expires_at < now() AND attempt < max_attempts"
    " RETURNING id";
static const char JOB_SQL_REAP_FAIL[] =
    "UPDATE jobs SET state = 'failed', finished_at = now(), lease_expires_at = NULL,"
    " error = 'lease expired on worker ' || worker_id || ' (attempt ' || attempt || ' of '"
    " || max_attempts || ')'"
    " WHERE state = 'running' AND lease_expires_at < now() RETURNING id";

/* --- helpers -------------------------------------------------------------- */

static const char *const job_states[] = {"blocked",   "queued", "running",
                                         "succeeded", "failed", "cancelled"};

bool job_valid_state(const char *state) {
    for (size_t i = 0; i < sizeof job_states / sizeof job_states[0]; i++)
        if (strcmp(state, job_states[i]) == 0) return true;
    return false;
}

int64_t job_retry_delay(int64_t attempt, int64_t base, int64_t max) {
    if (attempt < 1) attempt = 1;
    int64_t delay = base;
    for (int64_t i = 1; i < attempt && delay < max; i++) delay *= 2;
    return delay < max ? delay : max;
}

/* Sets *status from the state of conn after a failed statement. */
static int job_db_error(PGconn *conn, int *status) {
    *status = db_is_down(conn) ? 503 : 500;
    return -1;
}

static void job_id_text(int64_t id, char out[24]) { snprintf(out, 24, "%lld", (long long)id); }

/* Reads the single JSON cell of res. NULL on a malformed document. */
static json_t *job_json_cell(PGresult *res, int row, int col) {
    return json_loads(PQgetvalue(res, row, col), JSON_DECODE_ANY, NULL);
}

/* Copies a JSON cell's text as PostgreSQL wrote it, so numbers keep the
 * digits they were given (re-encoding a double would print 0.8731 as
 * 0.87309999999999999). NULL when out of memory. */
static char *job_text_cell(PGresult *res, int row, int col) {
    return strdup(PQgetvalue(res, row, col));
}

static int job_notify(PGconn *conn, int *status, char *err, size_t errlen) {
    if (db_exec(conn, JOB_SQL_NOTIFY, 0, NULL, NULL, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    return 0;
}

/* Queues the blocked dependents of a job that just succeeded (whose other
 * dependencies all succeeded). Returns the number queued or -1. */
static int job_unblock_dependents(PGconn *conn, int64_t id, int *status, char *err,
                                  size_t errlen) {
    char id_text[24];
    job_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, JOB_SQL_LOCK_DEPENDENTS, 1, params, NULL, NULL, err, errlen) != 0 ||
        db_exec(conn, JOB_SQL_UNBLOCK, 1, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    int n = PQntuples(res);
    for (int i = 0; i < n; i++)
        log_info("job %s: blocked -> queued (dependency %lld succeeded)", PQgetvalue(res, i, 0),
                 (long long)id);
    PQclear(res);
    if (n > 0 && job_notify(conn, status, err, errlen) != 0) return -1;
    return n;
}

/* Fails everything blocked on a job that failed or was cancelled. */
static int job_fail_dependents(PGconn *conn, int64_t id, int *status, char *err,
                               size_t errlen) {
    char id_text[24];
    job_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, JOB_SQL_LOCK_DESCENDANTS, 1, params, NULL, NULL, err, errlen) != 0 ||
        db_exec(conn, JOB_SQL_FAIL_DEPENDENTS, 1, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    for (int i = 0; i < PQntuples(res); i++)
        log_info("job %s: blocked -> failed (dependency %s failed)", PQgetvalue(res, i, 0),
                 PQgetvalue(res, i, 1));
    PQclear(res);
    return 0;
}

int job_exists(PGconn *conn, int64_t id, char *err, size_t errlen) {
    char id_text[24];
    job_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, JOB_SQL_EXISTS, 1, params, &res, NULL, err, errlen) != 0) return -1;
    int found = PQntuples(res) > 0;
    PQclear(res);
    return found;
}

/* After a worker call matched nothing: 404 if the job does not exist, else
 * 409 saying why this worker may not act on it. Always returns -1. */
static int job_not_held(PGconn *conn, int64_t id, int64_t worker_id, int *status, char *err,
                        size_t errlen) {
    char id_text[24];
    job_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, JOB_SQL_HOLDER, 1, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    if (PQntuples(res) == 0) {
        *status = 404;
        err_set(err, errlen, "no job %lld", (long long)id);
    } else if (strcmp(PQgetvalue(res, 0, 0), "running") != 0) {
        *status = 409;
        err_set(err, errlen, "job %lld is %s, not running", (long long)id,
                PQgetvalue(res, 0, 0));
    } else {
        *status = 409;
        err_set(err, errlen, "job %lld is held by worker %s, not by worker %lld", (long long)id,
                PQgetisnull(res, 0, 1) ? "none" : PQgetvalue(res, 0, 1), (long long)worker_id);
    }
    PQclear(res);
    return -1;
}

/* Commits conn's transaction; on failure sets *status (503 when the database
 * is down, else 500) and returns -1, the transaction left for the caller to
 * roll back. */
static int job_commit(PGconn *conn, int *status, char *err, size_t errlen) {
    if (db_commit(conn, err, errlen) != 0) return job_db_error(conn, status);
    return 0;
}

/* Begins a transaction and locks job id if worker_id holds it (params: the
 * two texts JOB_SQL_LOCK_HELD takes). 0 with *res its locked row (attempt,
 * max_attempts, cancel_requested; caller clears it). -1 with *status and err
 * set: 404/409 from job_not_held (the transaction rolled back), 500/503 on a
 * database error (the caller rolls back; *res may be set, caller clears it). */
static int job_begin_held(PGconn *conn, int64_t id, int64_t worker_id, const char *const *params,
                          PGresult **res, int *status, char *err, size_t errlen) {
    if (db_begin(conn, err, errlen) != 0) return job_db_error(conn, status);
    if (db_exec(conn, JOB_SQL_LOCK_HELD, 2, params, res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    if (PQntuples(*res) == 0) {
        db_rollback(conn);
        return job_not_held(conn, id, worker_id, status, err, errlen);
    }
    return 0;
}

int job_get(PGconn *conn, int64_t id, char **doc, int *status, char *err, size_t errlen) {
    char id_text[24];
    job_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    *doc = NULL;
    if (db_exec(conn, JOB_SQL_DOC, 1, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    int rc = -1;
    if (PQntuples(res) == 0) {
        *status = 404;
        err_set(err, errlen, "no job %lld", (long long)id);
    } else if ((*doc = job_text_cell(res, 0, 0)) == NULL) {
        *status = 500;
        err_set(err, errlen, "out of memory");
    } else {
        rc = 0;
    }
    PQclear(res);
    return rc;
}

int job_owner(PGconn *conn, int64_t id, int64_t *owner_id, int *status, char *err,
              size_t errlen) {
    char id_text[24];
    job_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, JOB_SQL_OWNER, 1, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    int rc = 0;
    if (PQntuples(res) == 0) {
        *status = 404;
        rc = err_set(err, errlen, "no job %lld", (long long)id);
    } else {
        *owner_id = db_get_i64(res, 0, 0);
    }
    PQclear(res);
    return rc;
}

/* --- creation ------------------------------------------------------------- */

/* Writes "{1,2,3}" (a bigint[] literal) for ids into b. */
static int job_id_array(buf_t *b, const int64_t *ids, size_t n) {
    if (buf_append(b, "{", 1) != 0) return -1;
    for (size_t i = 0; i < n; i++)
        if (buf_printf(b, "%s%lld", i ? "," : "", (long long)ids[i]) != 0) return -1;
    return buf_append(b, "}", 1);
}

/* Checks that the inputs a spec names ({"artifact": ID}, {"job": ID},
 * {"model": ID}, {"dataset": ID} at its top level) exist, appending
 * "spec.KEY.artifact" / "spec.KEY.job" / ... errors. A job input must be a
 * predict job (only those write hidden_states_{layer} artifacts), except a
 * predict spec's "model" (a train job with method "full", which writes
 * config.json + model.safetensors) and an "adapter" / "adapter_init" (a
 * "lora" train job): anything else would fail on a worker instead of here. */
static int job_check_spec_refs(PGconn *conn, json_t *spec, json_t *errors, int *status,
                               char *err, size_t errlen) {
    const char *key;
    json_t *ref;
    json_object_foreach(spec, key, ref) {
        if (!json_is_object(ref)) continue;
        static const char *const kinds[] = {"artifact", "job", "model", "dataset"};
        for (int k = 0; k < 4; k++) {
            json_t *idv = json_object_get(ref, kinds[k]);
            if (!json_is_integer(idv)) continue;
            char id_text[24], field[160], message[160] = "";
            job_id_text((int64_t)json_integer_value(idv), id_text);
            snprintf(field, sizeof field, "spec.%s.%s", key, kinds[k]);
            if (k >= 2) {
                int found = reg_exists(conn, k == 2 ? REG_MODEL : REG_DATASET,
                                       (int64_t)json_integer_value(idv), err, errlen);
                if (found < 0) return job_db_error(conn, status);
                if (found == 0) snprintf(message, sizeof message, "no %s %s", kinds[k], id_text);
            } else {
                const char *params[] = {id_text};
                PGresult *res = NULL;
                if (db_exec(conn, k == 0 ? JOB_SQL_ARTIFACT_EXISTS : JOB_SQL_KIND, 1, params,
                            &res, NULL, err, errlen) != 0)
                    return job_db_error(conn, status);
                /* A predict's "model" job is a full fine-tuning run, its
                 * "adapter" job a LoRA run; other job inputs are predicts. */
                bool is_model = strcmp(key, "model") == 0;
                bool is_adapter = strcmp(key, "adapter") == 0 || strcmp(key, "adapter_init") == 0;
                const char *want = is_model || is_adapter ? "train" : "predict";
                const char *what = is_model     ? "models"
                                   : is_adapter ? "adapters"
                                                : "per-layer inputs";
                const char *method = is_model ? "full" : is_adapter ? "lora" : NULL;
                if (PQntuples(res) == 0)
                    snprintf(message, sizeof message, "no %s %s", kinds[k], id_text);
                else if (k == 1 && strcmp(PQgetvalue(res, 0, 0), want) != 0)
                    snprintf(message, sizeof message, "job %s is a %s job; %s come from a %s job",
                             id_text, PQgetvalue(res, 0, 0), what, want);
                else if (k == 1 && method && strcmp(PQgetvalue(res, 0, 1), method) != 0)
                    snprintf(message, sizeof message,
                             "job %s is a %s train job; %s come from a \"%s\" train job%s",
                             id_text, PQgetvalue(res, 0, 1), what, method,
                             is_model ? " (name a LoRA job as \"adapter\")" : "");
                PQclear(res);
            }
            if (message[0])
                json_array_append_new(errors,
                                      json_pack("{s:s, s:s}", "field", field, "message", message));
        }
    }
    return 0;
}

int job_create(PGconn *conn, const job_new *in, json_t *errors, int64_t *id_out, char **doc,
               int *status,
               char *err, size_t errlen) {
    buf_t deps;
    buf_init(&deps, 64 + in->ndeps * 24);
    PGresult *res = NULL;
    char *spec_text = NULL;
    int rc = -1;
    const char *state = "queued";
    char error_text[64] = "";
    *doc = NULL;

    if (job_id_array(&deps, in->deps, in->ndeps) != 0) {
        *status = 500;
        err_set(err, errlen, "out of memory");
        goto out;
    }
    spec_text = json_dumps(in->spec, JSON_COMPACT);
    if (!spec_text) {
        *status = 500;
        err_set(err, errlen, "out of memory");
        goto out;
    }
    if (db_begin(conn, err, errlen) != 0) {
        job_db_error(conn, status);
        goto out;
    }
    const char *lock[] = {deps.data};
    if (db_exec(conn, JOB_SQL_LOCK_DEPS, 1, lock, &res, NULL, err, errlen) != 0) {
        job_db_error(conn, status);
        goto out;
    }
    /* Each dependency must exist; the worst state among them decides ours. */
    for (size_t i = 0; i < in->ndeps; i++) {
        const char *dep_state = NULL;
        for (int r = 0; r < PQntuples(res) && !dep_state; r++)
            if (db_get_i64(res, r, 0) == in->deps[i]) dep_state = PQgetvalue(res, r, 1);
        if (!dep_state) {
            char field[48], message[64];
            snprintf(field, sizeof field, "depends_on[%zu]", i);
            snprintf(message, sizeof message, "no job %lld", (long long)in->deps[i]);
            json_array_append_new(errors, json_pack("{s:s, s:s}", "field", field, "message",
                                                    message));
        } else if (strcmp(dep_state, "failed") == 0 || strcmp(dep_state, "cancelled") == 0) {
            state = "failed";
            snprintf(error_text, sizeof error_text, "dependency %lld failed",
                     (long long)in->deps[i]);
        } else if (strcmp(dep_state, "succeeded") != 0 && strcmp(state, "failed") != 0) {
            state = "blocked";
        }
    }
    PQclear(res);
    res = NULL;
    if (job_check_spec_refs(conn, in->spec, errors, status, err, errlen) != 0) goto out;
    if (json_array_size(errors) > 0) {
        *status = 400;
        err_set(err, errlen, "the job names inputs it cannot use (see errors)");
        goto out;
    }

    char priority[16], max_attempts[16], gpus[16], owner[24];
    snprintf(priority, sizeof priority, "%d", in->priority);
    snprintf(max_attempts, sizeof max_attempts, "%d", in->max_attempts);
    snprintf(gpus, sizeof gpus, "%d", in->gpus);
    job_id_text(in->owner_id, owner);
    const char *ins[] = {in->kind, in->name,     spec_text, priority,
                         max_attempts, gpus, owner, error_text[0] ? error_text : NULL};
    const char *params[9] = {ins[0], ins[1], state, ins[2], ins[3], ins[4], ins[5], ins[6],
                             ins[7]};
    if (db_exec(conn, JOB_SQL_INSERT, 9, params, &res, NULL, err, errlen) != 0) {
        job_db_error(conn, status);
        goto out;
    }
    int64_t id = db_get_i64(res, 0, 0);
    *id_out = id;
    char id_text[24];
    job_id_text(id, id_text);
    PQclear(res);
    res = NULL;
    if (in->ndeps > 0) {
        const char *dp[] = {id_text, deps.data};
        if (db_exec(conn, JOB_SQL_INSERT_DEPS, 2, dp, NULL, NULL, err, errlen) != 0) {
            job_db_error(conn, status);
            goto out;
        }
    }
    if (strcmp(state, "queued") == 0 && job_notify(conn, status, err, errlen) != 0) goto out;
    if (job_commit(conn, status, err, errlen) != 0) goto out;
    log_info("job %lld: created %s job as %s (owner %lld)%s%s", (long long)id, in->kind, state,
             (long long)in->owner_id, error_text[0] ? ": " : "", error_text);
    rc = job_get(conn, id, doc, status, err, errlen);
out:
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    PQclear(res);
    free(spec_text);
    buf_free(&deps);
    return rc;
}

/* --- reading -------------------------------------------------------------- */

int job_list(PGconn *conn, const char *state, const char *kind, const char *owner,
             int64_t before_id, int limit, char **items, int64_t *next_id, int *status,
             char *err, size_t errlen) {
    char before[24], lim[16];
    job_id_text(before_id, before);
    /* one more row than asked tells whether there is a next page */
    snprintf(lim, sizeof lim, "%d", limit + 1);
    const char *params[] = {state, kind, owner, before_id > 0 ? before : NULL, lim};
    PGresult *res = NULL;
    *items = NULL;
    *next_id = 0;
    if (db_exec(conn, JOB_SQL_LIST, 5, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    int n = PQntuples(res);
    size_t total = 3;
    for (int i = 0; i < n && i < limit; i++) total += (size_t)PQgetlength(res, i, 0) + 1;
    buf_t b;
    buf_init(&b, total);
    int w = buf_append(&b, "[", 1);
    for (int i = 0; i < n && i < limit && w == 0; i++) {
        if (i > 0) w = buf_append(&b, ",", 1);
        if (w == 0) w = buf_append(&b, PQgetvalue(res, i, 0), (size_t)PQgetlength(res, i, 0));
    }
    if (w == 0) w = buf_append(&b, "]", 1);
    if (n > limit) *next_id = db_get_i64(res, limit - 1, 1);
    PQclear(res);
    if (w != 0) {
        *status = 500;
        return err_set(err, errlen, "out of memory");
    }
    *items = buf_steal(&b);
    return 0;
}

/* --- the worker protocol ------------------------------------------------- */

int job_worker_register(PGconn *conn, int64_t user_id, const char *name, const char *hostname,
                        const char *gpus_json, const char *queues_json, json_t **doc,
                        int *status, char *err, size_t errlen) {
    char uid[24];
    job_id_text(user_id, uid);
    const char *params[] = {name, hostname, gpus_json, queues_json, uid};
    PGresult *res = NULL;
    *doc = NULL;
    if (db_exec(conn, JOB_SQL_WORKER_REGISTER, 5, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    *doc = job_json_cell(res, 0, 0);
    PQclear(res);
    if (!*doc) {
        *status = 500;
        return err_set(err, errlen, "bad worker document from the database");
    }
    log_info("worker %lld registered: %s on %s", (long long)json_integer_value(json_object_get(*doc, "id")),
             name, hostname);
    return 0;
}

int job_worker_seen(PGconn *conn, int64_t worker_id, int64_t user_id, bool is_admin, int *gpus,
                    int *status, char *err, size_t errlen) {
    char id_text[24], user_text[24];
    job_id_text(worker_id, id_text);
    job_id_text(user_id, user_text);
    const char *params[] = {id_text, user_text, is_admin ? "true" : "false"};
    PGresult *res = NULL;
    if (db_exec(conn, JOB_SQL_WORKER_SEEN, 3, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    int rc = 0;
    if (PQntuples(res) == 0) {
        PQclear(res);
        /* Tell "no such worker" (404) from "someone else's worker" (403). */
        return job_worker_check(conn, worker_id, user_id, is_admin, 404, status, err, errlen);
    }
    *gpus = (int)db_get_i64(res, 0, 0);
    PQclear(res);
    return rc;
}

int job_worker_check(PGconn *conn, int64_t worker_id, int64_t user_id, bool is_admin,
                     int missing_status, int *status, char *err, size_t errlen) {
    char id_text[24];
    job_id_text(worker_id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, JOB_SQL_WORKER_OWNER, 1, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    int rc = 0;
    if (PQntuples(res) == 0) {
        *status = missing_status;
        rc = err_set(err, errlen, "no worker %lld", (long long)worker_id);
    } else if (!is_admin && db_get_i64(res, 0, 0) != user_id) {
        *status = 403;
        rc = err_set(err, errlen, "worker %lld was registered with another user's token",
                     (long long)worker_id);
    }
    PQclear(res);
    return rc;
}

int job_claim(PGconn *conn, int64_t worker_id, int gpus, const job_policy *policy,
              char **doc, int *status, char *err, size_t errlen) {
    char wid[24], lease[16], ngpus[16];
    job_id_text(worker_id, wid);
    snprintf(lease, sizeof lease, "%d", policy->lease_s);
    snprintf(ngpus, sizeof ngpus, "%d", gpus);
    const char *params[] = {wid, lease, ngpus};
    PGresult *res = NULL;
    *doc = NULL;
    if (db_exec(conn, JOB_SQL_CLAIM, 3, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    if (PQntuples(res) == 0) {
        PQclear(res);
        return 0;
    }
    *doc = job_text_cell(res, 0, 0);
    log_info("job %s: queued -> running on worker %lld (attempt %s)", PQgetvalue(res, 0, 1),
             (long long)worker_id, PQgetvalue(res, 0, 2));
    PQclear(res);
    if (!*doc) {
        *status = 500;
        return err_set(err, errlen, "out of memory");
    }
    return 1;
}

int job_heartbeat(PGconn *conn, int64_t id, int64_t worker_id, const char *progress_json,
                  const job_policy *policy, json_t **doc, int *status, char *err,
                  size_t errlen) {
    char id_text[24], wid[24], lease[16];
    job_id_text(id, id_text);
    job_id_text(worker_id, wid);
    snprintf(lease, sizeof lease, "%d", policy->lease_s);
    const char *params[] = {id_text, wid, lease, progress_json};
    PGresult *res = NULL;
    *doc = NULL;
    if (db_exec(conn, JOB_SQL_HEARTBEAT, 4, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    if (PQntuples(res) == 0) {
        PQclear(res);
        return job_not_held(conn, id, worker_id, status, err, errlen);
    }
    *doc = json_pack("{s:s, s:b}", "lease_expires_at", PQgetvalue(res, 0, 0),
                     "cancel_requested", strcmp(PQgetvalue(res, 0, 1), "t") == 0);
    PQclear(res);
    const char *wp[] = {wid};
    db_exec(conn, JOB_SQL_TOUCH_WORKER, 1, wp, NULL, NULL, NULL, 0);
    return 0;
}

int job_check_held(PGconn *conn, int64_t id, int64_t worker_id, int *status, char *err,
                   size_t errlen) {
    char id_text[24], wid[24];
    job_id_text(id, id_text);
    job_id_text(worker_id, wid);
    const char *params[] = {id_text, wid};
    PGresult *res = NULL;
    /* outside a transaction FOR UPDATE is released at once: this only reads */
    if (db_exec(conn, JOB_SQL_LOCK_HELD, 2, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    int held = PQntuples(res) > 0;
    PQclear(res);
    return held ? 0 : job_not_held(conn, id, worker_id, status, err, errlen);
}

int job_complete(PGconn *conn, int64_t id, int64_t worker_id, const char *result_json,
                 char **doc, int *status, char *err, size_t errlen) {
    char id_text[24], wid[24];
    job_id_text(id, id_text);
    job_id_text(worker_id, wid);
    const char *params[] = {id_text, wid, result_json};
    PGresult *res = NULL;
    int rc = -1;
    *doc = NULL;
    if (db_begin(conn, err, errlen) != 0) return job_db_error(conn, status);
    if (db_exec(conn, JOB_SQL_COMPLETE, 3, params, &res, NULL, err, errlen) != 0) {
        job_db_error(conn, status);
        goto out;
    }
    if (PQntuples(res) == 0) {
        db_rollback(conn);
        job_not_held(conn, id, worker_id, status, err, errlen);
        goto out;
    }
    if (job_unblock_dependents(conn, id, status, err, errlen) < 0) goto out;
    if (job_commit(conn, status, err, errlen) != 0) goto out;
    log_info("job %lld: running -> succeeded on worker %lld", (long long)id,
             (long long)worker_id);
    rc = job_get(conn, id, doc, status, err, errlen);
out:
    PQclear(res);
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    return rc;
}

int job_fail(PGconn *conn, int64_t id, int64_t worker_id, const char *error, bool retryable,
             const job_policy *policy, char **doc, int *status, char *err, size_t errlen) {
    char id_text[24], wid[24];
    job_id_text(id, id_text);
    job_id_text(worker_id, wid);
    const char *params[] = {id_text, wid};
    PGresult *res = NULL;
    int rc = -1;
    *doc = NULL;
    if (job_begin_held(conn, id, worker_id, params, &res, status, err, errlen) != 0) goto out;
    int64_t attempt = db_get_i64(res, 0, 0), max_attempts = db_get_i64(res, 0, 1);
    bool cancel = strcmp(PQgetvalue(res, 0, 2), "t") == 0;
    PQclear(res);
    res = NULL;
    const char *to;
    if (cancel) {
        to = "cancelled";
    } else if (retryable && attempt < max_attempts) {
        to = "queued";
        char delay[24];
        job_id_text(job_retry_delay(attempt, policy->retry_base_s, policy->retry_max_s), delay);
        const char *rq[] = {id_text, error, delay};
        if (db_exec(conn, JOB_SQL_TO_QUEUED_RETRY, 3, rq, NULL, NULL, err, errlen) != 0 ||
            job_notify(conn, status, err, errlen) != 0) {
            job_db_error(conn, status);
            goto out;
        }
        log_info("job %lld: running -> queued (attempt %lld of %lld failed, retry in %ss): %s",
                 (long long)id, (long long)attempt, (long long)max_attempts, delay, error);
    } else {
        to = "failed";
    }
    if (strcmp(to, "queued") != 0) {
        const char *fp[] = {id_text, to, error};
        if (db_exec(conn, JOB_SQL_TO_FINISHED, 3, fp, NULL, NULL, err, errlen) != 0) {
            job_db_error(conn, status);
            goto out;
        }
        if (job_fail_dependents(conn, id, status, err, errlen) != 0) goto out;
        log_info("job %lld: running -> %s: %s", (long long)id, to, error);
    }
    if (job_commit(conn, status, err, errlen) != 0) goto out;
    rc = job_get(conn, id, doc, status, err, errlen);
out:
    PQclear(res);
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    return rc;
}

int job_release(PGconn *conn, int64_t id, int64_t worker_id, char **doc, int *status,
                char *err, size_t errlen) {
    char id_text[24], wid[24];
    job_id_text(id, id_text);
    job_id_text(worker_id, wid);
    const char *params[] = {id_text, wid};
    PGresult *res = NULL;
    int rc = -1;
    *doc = NULL;
    if (job_begin_held(conn, id, worker_id, params, &res, status, err, errlen) != 0) goto out;
    bool cancel = strcmp(PQgetvalue(res, 0, 2), "t") == 0;
    const char *one[] = {id_text};
    if (cancel) {
        /* a cancel was waiting for the worker: the job ends here */
        const char *fp[] = {id_text, "cancelled", NULL};
        if (db_exec(conn, JOB_SQL_TO_FINISHED, 3, fp, NULL, NULL, err, errlen) != 0 ||
            job_fail_dependents(conn, id, status, err, errlen) != 0) {
            job_db_error(conn, status);
            goto out;
        }
    } else if (db_exec(conn, JOB_SQL_RELEASE, 1, one, NULL, NULL, err, errlen) != 0 ||
               job_notify(conn, status, err, errlen) != 0) {
        job_db_error(conn, status);
        goto out;
    }
    if (job_commit(conn, status, err, errlen) != 0) goto out;
    log_info("job %lld: running -> %s (released by worker %lld)", (long long)id,
             cancel ? "cancelled" : "queued", (long long)worker_id);
    rc = job_get(conn, id, doc, status, err, errlen);
out:
    PQclear(res);
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    return rc;
}

/* Runs one statement on a job the worker holds, inside a transaction that
 * first locks the job, so nothing is written for a job it lost. */
static int job_held_exec(PGconn *conn, int64_t id, int64_t worker_id, const char *sql,
                         const char *payload, int *status, char *err, size_t errlen) {
    char id_text[24], wid[24];
    job_id_text(id, id_text);
    job_id_text(worker_id, wid);
    const char *params[] = {id_text, wid};
    PGresult *res = NULL;
    int rc = -1;
    if (job_begin_held(conn, id, worker_id, params, &res, status, err, errlen) != 0) goto out;
    const char *p2[] = {id_text, payload};
    char sqlstate[6];
    if (db_exec(conn, sql, 2, p2, NULL, sqlstate, err, errlen) != 0) {
        /* bad encoding or a number out of range is the client's doing */
        if (sqlstate[0] == '2' && sqlstate[1] == '2')
            *status = 400;
        else
            job_db_error(conn, status);
        goto out;
    }
    if (job_commit(conn, status, err, errlen) != 0) goto out;
    rc = 0;
out:
    PQclear(res);
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    return rc;
}

int job_logs_add(PGconn *conn, int64_t id, int64_t worker_id, const char *text, int *status,
                 char *err, size_t errlen) {
    return job_held_exec(conn, id, worker_id, JOB_SQL_LOGS_ADD, text, status, err, errlen);
}

int job_metrics_add(PGconn *conn, int64_t id, int64_t worker_id, const char *points_json,
                    int *status, char *err, size_t errlen) {
    return job_held_exec(conn, id, worker_id, JOB_SQL_METRICS_ADD, points_json, status, err,
                         errlen);
}

/* Runs a one-row, one-column read about job id (its logs, its metrics) into
 * *out (caller frees): 404 when the job does not exist. */
static int job_read_text(PGconn *conn, int64_t id, const char *sql, char **out, int *status,
                         char *err, size_t errlen) {
    int found = job_exists(conn, id, err, errlen);
    if (found < 0) return job_db_error(conn, status);
    if (!found) {
        *status = 404;
        return err_set(err, errlen, "no job %lld", (long long)id);
    }
    char id_text[24];
    job_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, sql, 1, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    *out = job_text_cell(res, 0, 0);
    PQclear(res);
    if (!*out) {
        *status = 500;
        return err_set(err, errlen, "out of memory");
    }
    return 0;
}

int job_logs_get(PGconn *conn, int64_t id, char **text, int *status, char *err, size_t errlen) {
    return job_read_text(conn, id, JOB_SQL_LOGS_GET, text, status, err, errlen);
}

int job_metrics_get(PGconn *conn, int64_t id, char **doc, int *status, char *err,
                    size_t errlen) {
    return job_read_text(conn, id, JOB_SQL_METRICS_GET, doc, status, err, errlen);
}

/* --- owner actions -------------------------------------------------------- */

/* Locks job id for a user action: 404 unknown, 403 someone else's job.
 * On success *state (caller's buffer) holds the job's state. */
static int job_lock_for_user(PGconn *conn, int64_t id, int64_t user_id, bool is_admin,
                             char state[16], int *status, char *err, size_t errlen) {
    char id_text[24];
    job_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, JOB_SQL_LOCK_FOR_USER, 1, params, &res, NULL, err, errlen) != 0)
        return job_db_error(conn, status);
    int rc = 0;
    if (PQntuples(res) == 0) {
        *status = 404;
        rc = err_set(err, errlen, "no job %lld", (long long)id);
    } else if (!is_admin && db_get_i64(res, 0, 1) != user_id) {
        *status = 403;
        rc = err_set(err, errlen, "job %lld belongs to another user", (long long)id);
    } else {
        snprintf(state, 16, "%s", PQgetvalue(res, 0, 0));
    }
    PQclear(res);
    return rc;
}

int job_cancel(PGconn *conn, int64_t id, int64_t user_id, bool is_admin, char **doc,
               int *http_status, int *status, char *err, size_t errlen) {
    char state[16], id_text[24];
    job_id_text(id, id_text);
    const char *params[] = {id_text};
    int rc = -1;
    *doc = NULL;
    if (db_begin(conn, err, errlen) != 0) return job_db_error(conn, status);
    if (job_lock_for_user(conn, id, user_id, is_admin, state, status, err, errlen) != 0) goto out;
    if (strcmp(state, "blocked") == 0 || strcmp(state, "queued") == 0) {
        if (db_exec(conn, JOB_SQL_CANCEL_NOW, 1, params, NULL, NULL, err, errlen) != 0) {
            job_db_error(conn, status);
            goto out;
        }
        if (job_fail_dependents(conn, id, status, err, errlen) != 0) goto out;
        *http_status = 200;
        log_info("job %lld: %s -> cancelled", (long long)id, state);
    } else if (strcmp(state, "running") == 0) {
        if (db_exec(conn, JOB_SQL_CANCEL_REQUEST, 1, params, NULL, NULL, err, errlen) != 0) {
            job_db_error(conn, status);
            goto out;
        }
        *http_status = 202;
        log_info("job %lld: cancel requested while running", (long long)id);
    } else {
        *status = 409;
        err_set(err, errlen, "job %lld is already %s", (long long)id, state);
        goto out;
    }
    if (job_commit(conn, status, err, errlen) != 0) goto out;
    rc = job_get(conn, id, doc, status, err, errlen);
out:
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    return rc;
}

int job_retry(PGconn *conn, int64_t id, int64_t user_id, bool is_admin, char **doc,
              int *status, char *err, size_t errlen) {
    char state[16], id_text[24];
    job_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    int rc = -1;
    *doc = NULL;
    if (db_begin(conn, err, errlen) != 0) return job_db_error(conn, status);
    if (job_lock_for_user(conn, id, user_id, is_admin, state, status, err, errlen) != 0) goto out;
    if (strcmp(state, "failed") != 0 && strcmp(state, "cancelled") != 0) {
        *status = 409;
        err_set(err, errlen, "job %lld is %s; only failed or cancelled jobs can be retried",
                (long long)id, state);
        goto out;
    }
    if (db_exec(conn, JOB_SQL_RETRY, 1, params, &res, NULL, err, errlen) != 0) {
        job_db_error(conn, status);
        goto out;
    }
    bool queued = strcmp(PQgetvalue(res, 0, 0), "queued") == 0;
    log_info("job %lld: %s -> %s (retry)", (long long)id, state, PQgetvalue(res, 0, 0));
    if (queued && job_notify(conn, status, err, errlen) != 0) goto out;
    if (job_commit(conn, status, err, errlen) != 0) goto out;
    rc = job_get(conn, id, doc, status, err, errlen);
out:
    PQclear(res);
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    return rc;
}

/* --- the reaper ----------------------------------------------------------- */

/* Runs one reaper transition and, for jobs that ended, fails their blocked
 * dependents, all in one transaction. Returns the number moved or -1. */
static int job_reap_one(PGconn *conn, const char *sql, const char *to, char *err,
                        size_t errlen) {
    PGresult *res = NULL;
    int status = 0, n = -1;
    if (db_begin(conn, err, errlen) != 0) return -1;
    if (db_exec(conn, sql, 0, NULL, &res, NULL, err, errlen) != 0) goto out;
    for (int i = 0; i < PQntuples(res); i++) {
        int64_t id = db_get_i64(res, i, 0);
        log_info("job %lld: running -> %s (lease expired)", (long long)id, to);
        if (strcmp(to, "queued") != 0 && job_fail_dependents(conn, id, &status, err, errlen) != 0)
            goto out;
    }
    if (PQntuples(res) > 0 && strcmp(to, "queued") == 0 &&
        job_notify(conn, &status, err, errlen) != 0)
        goto out;
    if (db_commit(conn, err, errlen) != 0) goto out;
    n = PQntuples(res);
out:
    PQclear(res);
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    return n;
}

int job_reap(PGconn *conn, bool *requeued, char *err, size_t errlen) {
    *requeued = false;
    int cancelled = job_reap_one(conn, JOB_SQL_REAP_CANCEL, "cancelled", err, errlen);
    if (cancelled < 0) return -1;
    int queued = job_reap_one(conn, JOB_SQL_REAP_REQUEUE, "queued", err, errlen);
    if (queued < 0) return -1;
    int failed = job_reap_one(conn, JOB_SQL_REAP_FAIL, "failed", err, errlen);
    if (failed < 0) return -1;
    *requeued = queued > 0;
    return cancelled + queued + failed;
}
