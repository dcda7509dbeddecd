/* api.c - see api.h. Handlers check the request completely before they
 * change anything, then call the job, artifact and auth modules. */
#include "api.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/spec.h"
#include "server/metrics.h"
#include "server/registry.h"

#define API_MAX_NAME 200
#define API_MAX_DEPS 1000
#define API_MAX_ERROR 10000
#define API_MAX_POINTS 100000

/* --- small helpers ------------------------------------------------------- */

/* Replies with the problem a job_* / art_* function reported. */
static void api_fail(http_req *req, int status, const char *err) {
    http_reply_problem(req, status, err, NULL);
}

int api_cursor_parse(const char *cursor, int64_t *id) {
    size_t n = strlen(cursor);
    if (n == 0 || n > 15) return -1;
    int64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        char c = cursor[i];
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else
            return -1;
        v = v * 16 + d;
    }
    if (v <= 0) return -1;
    *id = v;
    return 0;
}

void api_cursor_format(int64_t id, char *out, size_t outlen) {
    snprintf(out, outlen, "%llx", (unsigned long long)id);
}

/* The Strata-Worker header as a worker id; replies 409 when absent or bad. */
static int api_worker_header(http_req *req, int64_t *worker_id) {
    const char *v = http_header(req, "Strata-Worker");
    if (!v || util_parse_i64(v, 1, INT64_MAX, worker_id) != 0) {
        http_reply_problem(req, 409,
                           "this call needs the Strata-Worker header with the worker's id", NULL);
        return -1;
    }
    /* A worker token speaks only for the workers it registered. */
    PGconn *db = http_db(req);
    if (!db) return -1;
    int status = 500;
    char err[ERR_LEN];
    if (job_worker_check(db, *worker_id, req->user.id, req->user.role == AUTH_ADMIN, 409, &status,
                         err, sizeof err) != 0) {
        api_fail(req, status, err);
        return -1;
    }
    return 0;
}

/* True when s is valid UTF-8 (query strings arrive as raw bytes; the
 * database would refuse anything else with a server error). */
static bool api_valid_utf8(const char *s) {
    size_t len = strlen(s);
    char *clean = malloc(len * 3 + 1);
    if (!clean) return false;
    bool same = http_utf8_clean(s, len, clean) == len && memcmp(clean, s, len) == 0;
    free(clean);
    return same;
}

/* Characters (not bytes) in a UTF-8 string, as a length limit means them. */
static size_t api_utf8_chars(const char *s) {
    size_t n = 0;
    for (; *s; s++)
        if (((unsigned char)*s & 0xC0) != 0x80) n++;
    return n;
}

/* Dumps v (or NULL for a missing/null v) as compact JSON; caller frees. */
static char *api_dump(json_t *v) {
    if (!v || json_is_null(v)) return NULL;
    return json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
}

/* Answers a call after the job_ function it ran returned rc: on failure the
 * status and err that function set; else ok_status with doc (a JSON text the
 * reply takes; a NULL doc answers 500 out of memory), or an empty 204 when
 * ok_status is 204. wake: the change may let a waiting claim find work (a
 * job ended, was requeued or unblocked dependents). */
static void api_reply_job(http_req *req, int rc, int status, const char *err, int ok_status,
                          char *doc, bool wake) {
    if (rc != 0) {
        api_fail(req, status, err);
        return;
    }
    if (wake) notify_wake_all(req->srv->hub);
    if (ok_status == 204)
        http_reply_empty(req, 204);
    else
        http_reply_json_text(req, ok_status, doc);
}

/* --- health and metrics --------------------------------------------------- */

static void api_healthz(http_req *req) {
    http_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

/* 200 when the database answers SELECT 1, else 503 (not problem+json: this
 * is for load balancers, outside /api/v1). */
static void api_readyz(http_req *req) {
    char err[ERR_LEN];
    PGconn *db = db_acquire(req->srv->pool, err, sizeof err);
    if (db) {
        int ok = db_ping_exec(db, err, sizeof err) == 0;
        db_release(req->srv->pool, db);
        if (ok) {
            http_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
            return;
        }
    }
    http_reply_json(req, 503, json_pack("{s:s, s:s}", "status", "unavailable", "detail", err));
}

/* The Prometheus exposition; 503 while the database is away. */
static void api_metrics(http_req *req) {
    PGconn *db = http_db(req);
    if (!db) return;
    buf_t b;
    buf_init(&b, 16 * 1024 * 1024);
    char err[ERR_LEN];
    if (metrics_render(db, req->srv->cfg->lease_s, &b, err, sizeof err) != 0) {
        buf_free(&b);
        http_reply_problem(req, db_is_down(db) ? 503 : 500, err, NULL);
        return;
    }
    http_reply_text(req, 200, "text/plain; version=0.0.4", b.data ? b.data : "", b.len);
    buf_free(&b);
}

/* --- tokens ------------------------------------------------------------------ */

static void api_tokens_create(http_req *req) {
    json_t *body = req->json;
    const char *key;
    json_t *value;
    json_t *errors = json_array();
    const char *user = NULL;
    enum auth_role role = AUTH_USER;
    json_object_foreach(body, key, value) {
        if (strcmp(key, "user") != 0 && strcmp(key, "role") != 0)
            spec_error(errors, key, "unknown field");
    }
    json_t *u = body ? json_object_get(body, "user") : NULL;
    json_t *r = body ? json_object_get(body, "role") : NULL;
    if (!json_is_string(u) || !auth_valid_user_name(json_string_value(u)))
        spec_error(errors, "user", "must be a user name (1-64 of A-Z a-z 0-9 . _ -)");
    else
        user = json_string_value(u);
    if (!json_is_string(r) || auth_role_parse(json_string_value(r), &role) != 0)
        spec_error(errors, "role", "must be \"admin\", \"user\" or \"worker\"");
    if (json_array_size(errors) > 0) {
        http_reply_problem(req, 400, "invalid token request", errors);
        return;
    }
    json_decref(errors);
    PGconn *db = http_db(req);
    if (!db) return;
    char token[AUTH_TOKEN_LEN], err[ERR_LEN];
    int conflict = 0;
    if (auth_token_create(db, user, role, token, &conflict, err, sizeof err) != 0) {
        if (conflict)
            http_reply_field_error(req, "role", "%s", err);
        else
            http_reply_problem(req, db_is_down(db) ? 503 : 500, err, NULL);
        return;
    }
    http_reply_json(req, 201, json_pack("{s:s, s:s, s:s}", "token", token, "user", user, "role",
                                        auth_role_name(role)));
}

/* --- jobs: submission and reading ------------------------------------------ */

/* Checks an integer field in [min, max]; appends an error otherwise. */
static void api_int_field(json_t *v, const char *field, int min, int max, int *out,
                          json_t *errors) {
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max) {
        spec_error(errors, field, "must be an integer from %d to %d", min, max);
        return;
    }
    *out = (int)json_integer_value(v);
}

/* POST /api/v1/jobs: every field is checked (all errors reported at once,
 * each naming its field) before anything is written; then the job module
 * checks what needs the database (dependencies, referenced inputs). */
static void api_jobs_create(http_req *req) {
    json_t *body = req->json;
    json_t *errors = json_array();
    json_t *empty_spec = json_object();
    int64_t *deps = NULL;
    job_new in = {.priority = 0, .max_attempts = 3, .gpus = 0, .owner_id = req->user.id};
    if (!body) {
        spec_error(errors, "kind", "is required");
        goto reply;
    }
    const char *key;
    json_t *value;
    json_object_foreach(body, key, value) {
        if (strcmp(key, "kind") && strcmp(key, "name") && strcmp(key, "spec") &&
            strcmp(key, "priority") && strcmp(key, "max_attempts") &&
            strcmp(key, "depends_on") && strcmp(key, "resources"))
            spec_error(errors, key, "unknown field");
    }
    json_t *kind = json_object_get(body, "kind");
    if (!kind)
        spec_error(errors, "kind", "is required");
    else if (!json_is_string(kind) || json_string_length(kind) == 0)
        spec_error(errors, "kind", "must be a job kind such as \"cka\"");
    else
        in.kind = json_string_value(kind);

    json_t *name = json_object_get(body, "name");
    if (name && !json_is_null(name)) {
        if (!json_is_string(name) || api_utf8_chars(json_string_value(name)) > API_MAX_NAME ||
            memchr(json_string_value(name), '\0', json_string_length(name)))
            spec_error(errors, "name", "must be a string of at most %d characters or null",
                       API_MAX_NAME);
        else
            in.name = json_string_value(name);
    }
    json_t *v;
    if ((v = json_object_get(body, "priority")) != NULL)
        api_int_field(v, "priority", -1000, 1000, &in.priority, errors);
    if ((v = json_object_get(body, "max_attempts")) != NULL)
        api_int_field(v, "max_attempts", 1, 100, &in.max_attempts, errors);

    json_t *resources = json_object_get(body, "resources");
    if (resources) {
        if (!json_is_object(resources)) {
            spec_error(errors, "resources", "must be an object such as {\"gpus\": 0}");
        } else {
            json_object_foreach(resources, key, value) {
                char field[300];
                snprintf(field, sizeof field, "resources.%s", key);
                if (strcmp(key, "gpus") == 0)
                    api_int_field(value, "resources.gpus", 0, 64, &in.gpus, errors);
                else
                    spec_error(errors, field, "unknown field");
            }
        }
    }

    json_t *dep_list = json_object_get(body, "depends_on");
    if (dep_list) {
        if (!json_is_array(dep_list) || json_array_size(dep_list) > API_MAX_DEPS) {
            spec_error(errors, "depends_on", "must be an array of at most %d job ids",
                       API_MAX_DEPS);
        } else if (json_array_size(dep_list) > 0) {
            deps = calloc(json_array_size(dep_list), sizeof *deps);
            if (!deps) {
                http_reply_problem(req, 500, "out of memory", errors);
                errors = NULL;
                goto out;
            }
            size_t i;
            json_array_foreach(dep_list, i, value) {
                char field[48];
                snprintf(field, sizeof field, "depends_on[%zu]", i);
                if (!json_is_integer(value) || json_integer_value(value) <= 0)
                    spec_error(errors, field, "must be a job id");
                else
                    deps[in.ndeps++] = (int64_t)json_integer_value(value);
            }
        }
    }
    in.deps = deps;

    json_t *spec = json_object_get(body, "spec");
    in.spec = spec ? spec : empty_spec;
    /* spec_known_kind lists only the kinds workers run, so a kind that
     * spec_validate might learn first is still refused here. */
    if (in.kind && !spec_known_kind(in.kind))
        spec_error(errors, "kind", "unknown job kind \"%s\" (this server runs: " SPEC_KINDS ")",
                   in.kind);
    else if (in.kind)
        spec_validate(in.kind, in.spec, SPEC_SERVER, errors);

reply:
    if (json_array_size(errors) > 0) {
        http_reply_problem(req, 400, "invalid job", errors);
        errors = NULL;
        goto out;
    }
    PGconn *db = http_db(req);
    if (!db) goto out;
    char *doc = NULL;
    int64_t id = 0;
    int status = 500;
    char err[ERR_LEN];
    if (job_create(db, &in, errors, &id, &doc, &status, err, sizeof err) != 0) {
        http_reply_problem(req, status, err, status == 400 ? errors : NULL);
        if (status == 400) errors = NULL;
        goto out;
    }
    char location[64];
    snprintf(location, sizeof location, "/api/v1/jobs/%lld", (long long)id);
    http_set_location(req, location);
    http_reply_json_text(req, 201, doc);
out:
    json_decref(errors);
    json_decref(empty_spec);
    free(deps);
}

/* Reads ?limit= (1..500, default 50) and ?cursor= (an id this server issued)
 * for a paged list. Returns 0, or -1 having replied 400 naming the field. */
static int api_page_params(http_req *req, int64_t *limit, int64_t *before) {
    const char *limit_text = http_query(req, "limit");
    const char *cursor = http_query(req, "cursor");
    *limit = 50;
    *before = 0;
    if (limit_text && util_parse_i64(limit_text, 1, 500, limit) != 0) {
        http_reply_field_error(req, "limit", "must be an integer from 1 to 500");
        return -1;
    }
    if (cursor && api_cursor_parse(cursor, before) != 0) {
        http_reply_field_error(req, "cursor", "is not a cursor this server issued");
        return -1;
    }
    return 0;
}

/* GET /api/v1/jobs: filters and paging parameters are checked first; the
 * cursor is the hex id of the last job of the previous page. */
static void api_jobs_list(http_req *req) {
    const char *state = http_query(req, "state");
    const char *kind = http_query(req, "kind");
    const char *owner = http_query(req, "owner");
    int64_t limit = 50, before = 0;
    if (state && !job_valid_state(state)) {
        http_reply_field_error(req, "state",
                               "must be one of blocked, queued, running, succeeded, failed, "
                               "cancelled");
        return;
    }
    if (kind && !spec_known_kind(kind)) {
        http_reply_field_error(req, "kind", "must be a job kind this server runs (" SPEC_KINDS ")");
        return;
    }
    if (owner && (strlen(owner) > 100 || !api_valid_utf8(owner))) {
        http_reply_field_error(req, "owner", "must be a user name of at most 100 characters");
        return;
    }
    if (api_page_params(req, &limit, &before) != 0) return;
    PGconn *db = http_db(req);
    if (!db) return;
    char *items = NULL;
    int64_t next = 0;
    int status = 500;
    char err[ERR_LEN];
    if (job_list(db, state, kind, owner, before, (int)limit, &items, &next, &status, err,
                 sizeof err) != 0) {
        api_fail(req, status, err);
        return;
    }
    char next_text[24];
    api_cursor_format(next, next_text, sizeof next_text);
    buf_t b;
    buf_init(&b, strlen(items) + 64);
    int w = buf_printf(&b, "{\"items\":%s,\"next_cursor\":", items);
    if (w == 0) w = next > 0 ? buf_printf(&b, "\"%s\"}", next_text) : buf_printf(&b, "null}");
    free(items);
    http_reply_json_text(req, 200, w == 0 ? buf_steal(&b) : NULL);
}

static void api_job_get(http_req *req) {
    PGconn *db = http_db(req);
    if (!db) return;
    char *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    int rc = job_get(db, req->ids[0], &doc, &status, err, sizeof err);
    api_reply_job(req, rc, status, err, 200, doc, false);
}

static void api_job_cancel(http_req *req) {
    PGconn *db = http_db(req);
    if (!db) return;
    char *doc = NULL;
    int status = 500, http_status = 200;
    char err[ERR_LEN];
    int rc = job_cancel(db, req->ids[0], req->user.id, req->user.role == AUTH_ADMIN, &doc,
                        &http_status, &status, err, sizeof err);
    api_reply_job(req, rc, status, err, http_status, doc, false);
}

static void api_job_retry(http_req *req) {
    PGconn *db = http_db(req);
    if (!db) return;
    char *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    int rc = job_retry(db, req->ids[0], req->user.id, req->user.role == AUTH_ADMIN, &doc,
                       &status, err, sizeof err);
    api_reply_job(req, rc, status, err, 200, doc, true);
}

/* The artifacts a job uploaded; 404 when the job does not exist. */
static void api_job_artifacts_list(http_req *req) {
    PGconn *db = http_db(req);
    if (!db) return;
    char err[ERR_LEN];
    int found = job_exists(db, req->ids[0], err, sizeof err);
    if (found <= 0) {
        if (found == 0) snprintf(err, sizeof err, "no job %lld", (long long)req->ids[0]);
        api_fail(req, found == 0 ? 404 : (db_is_down(db) ? 503 : 500), err);
        return;
    }
    json_t *items = NULL;
    if (art_list_for_job(db, req->ids[0], &items, err, sizeof err) != 0) {
        api_fail(req, db_is_down(db) ? 503 : 500, err);
        return;
    }
    http_reply_json(req, 200, json_pack("{s:o}", "items", items));
}

static void api_job_logs_get(http_req *req) {
    PGconn *db = http_db(req);
    if (!db) return;
    char *text = NULL;
    int status = 500;
    char err[ERR_LEN];
    if (job_logs_get(db, req->ids[0], &text, &status, err, sizeof err) != 0) {
        api_fail(req, status, err);
        return;
    }
    http_reply_text(req, 200, "text/plain; charset=utf-8", text, strlen(text));
    free(text);
}

static void api_job_metrics_get(http_req *req) {
    PGconn *db = http_db(req);
    if (!db) return;
    char *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    int rc = job_metrics_get(db, req->ids[0], &doc, &status, err, sizeof err);
    api_reply_job(req, rc, status, err, 200, doc, false);
}

/* --- the worker protocol -------------------------------------------------- */

static void api_workers_register(http_req *req) {
    json_t *body = req->json;
    json_t *errors = json_array();
    json_t *name = body ? json_object_get(body, "name") : NULL;
    json_t *host = body ? json_object_get(body, "hostname") : NULL;
    json_t *gpus = body ? json_object_get(body, "gpus") : NULL;
    json_t *queues = body ? json_object_get(body, "queues") : NULL;
    if (name && (!json_is_string(name) || json_string_length(name) == 0 ||
                 json_string_length(name) > API_MAX_NAME))
        spec_error(errors, "name", "must be a non-empty string of at most %d characters",
                   API_MAX_NAME);
    if (host && !json_is_null(host) &&
        (!json_is_string(host) || json_string_length(host) > API_MAX_NAME))
        spec_error(errors, "hostname", "must be a string of at most %d characters",
                   API_MAX_NAME);
    if (gpus && !json_is_null(gpus) && (!json_is_array(gpus) || json_array_size(gpus) > 64))
        spec_error(errors, "gpus", "must be an array of at most 64 GPUs");
    if (queues && !json_is_null(queues) &&
        (!json_is_array(queues) || json_array_size(queues) > 100))
        spec_error(errors, "queues", "must be an array of at most 100 queue names");
    if (json_array_size(errors) > 0) {
        http_reply_problem(req, 400, "invalid worker registration", errors);
        return;
    }
    json_decref(errors);
    PGconn *db = http_db(req);
    if (!db) return;
    char *gpus_text = json_is_array(gpus) ? api_dump(gpus) : NULL;
    char *queues_text = json_is_array(queues) ? api_dump(queues) : NULL;
    json_t *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    int rc = job_worker_register(db, req->user.id, json_is_string(name) ? json_string_value(name)
                                                                        : "worker",
                                 json_is_string(host) ? json_string_value(host) : "",
                                 gpus_text ? gpus_text : "[]", queues_text ? queues_text : "[]",
                                 &doc, &status, err, sizeof err);
    free(gpus_text);
    free(queues_text);
    if (rc != 0) {
        api_fail(req, status, err);
        return;
    }
    http_reply_json(req, 201, doc);
}

/* A claimed job whose reply never reached the worker goes back to the queue
 * at once (without counting the attempt) instead of waiting for its lease. */
static void api_claim_abort(http_req *req) {
    int64_t job_id = req->abort_arg;
    PGconn *db = http_db(req);
    if (!db || job_id <= 0) return;
    char *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    if (job_release(db, job_id, req->ids[0], &doc, &status, err, sizeof err) == 0)
        log_info("job %lld released: worker %lld left before receiving it", (long long)job_id,
                 (long long)req->ids[0]);
    else
        log_warn("job %lld: release after an undelivered claim failed: %s", (long long)job_id,
                 err);
    free(doc);
}

/* Long-polls for work: tries to claim, and while nothing fits sleeps until a
 * NOTIFY (or a second passes), holding no database connection meanwhile. A
 * worker that hung up is not handed a job it would never read. */
static void api_worker_claim(http_req *req) {
    srv_t *srv = req->srv;
    const char *wait_text = http_query(req, "wait");
    int64_t wait_s = 0;
    if (wait_text && util_parse_i64(wait_text, 0, 60, &wait_s) != 0) {
        http_reply_field_error(req, "wait", "must be an integer from 0 to 60 (seconds)");
        return;
    }
    double deadline = util_now_seconds() + (double)wait_s;
    char err[ERR_LEN];
    int status = 500, gpus = 0;
    PGconn *db = http_db(req);
    if (!db) return;
    if (job_worker_seen(db, req->ids[0], req->user.id, req->user.role == AUTH_ADMIN, &gpus,
                        &status, err, sizeof err) != 0) {
        api_fail(req, status, err);
        return;
    }
    for (;;) {
        if (http_client_gone(req)) break;
        if (!(db = http_db(req))) return;
        char *doc = NULL;
        int got = job_claim(db, req->ids[0], gpus, &srv->policy, &doc, &status, err, sizeof err);
        if (got < 0) {
            api_fail(req, status, err);
            return;
        }
        if (got > 0) {
            json_t *job = json_loads(doc, 0, NULL);
            req->abort_arg = json_integer_value(json_object_get(job, "id"));
            json_decref(job);
            req->on_abort = api_claim_abort;
            http_reply_json_text(req, 200, doc);
            return;
        }
        http_db_release(req);
        double left = deadline - util_now_seconds();
        if (left <= 0 || atomic_load(&srv->stopping)) break;
        int ms = left > 1.0 ? 1000 : (int)(left * 1000.0) + 1;
        if (!notify_wait(srv->hub, ms)) break;
    }
    http_reply_empty(req, 204);
}

/* Reads the optional body member key of a worker call: absent, null or an
 * object. 0 with *text its compact JSON (NULL when absent or null; caller
 * frees); -1 after answering 400 for field key with message. */
static int api_optional_object(http_req *req, const char *key, const char *message,
                               char **text) {
    json_t *v = req->json ? json_object_get(req->json, key) : NULL;
    *text = NULL;
    if (v && !json_is_null(v) && !json_is_object(v)) {
        http_reply_field_error(req, key, "%s", message);
        return -1;
    }
    *text = api_dump(v);
    return 0;
}

/* Renews the lease and stores progress; the answer tells the worker whether
 * a cancel is waiting. */
static void api_job_heartbeat(http_req *req) {
    int64_t worker_id;
    if (api_worker_header(req, &worker_id) != 0) return;
    char *progress_text;
    if (api_optional_object(req, "progress",
                            "must be an object {\"step\", \"total\", \"message\"}",
                            &progress_text) != 0)
        return;
    PGconn *db = http_db(req);
    if (!db) {
        free(progress_text);
        return;
    }
    json_t *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    int rc = job_heartbeat(db, req->ids[0], worker_id, progress_text, &req->srv->policy, &doc,
                           &status, err, sizeof err);
    free(progress_text);
    if (rc != 0) {
        api_fail(req, status, err);
        return;
    }
    http_reply_json(req, 200, doc);
}

/* Ends the job as succeeded with its result; dependents may become queued,
 * so waiting claims are woken. */
static void api_job_complete(http_req *req) {
    int64_t worker_id;
    if (api_worker_header(req, &worker_id) != 0) return;
    char *result_text;
    if (api_optional_object(req, "result", "must be an object", &result_text) != 0) return;
    PGconn *db = http_db(req);
    if (!db) {
        free(result_text);
        return;
    }
    char *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    int rc = job_complete(db, req->ids[0], worker_id, result_text, &doc, &status, err,
                          sizeof err);
    free(result_text);
    api_reply_job(req, rc, status, err, 200, doc, true);
}

/* A failed attempt: requeued with backoff, failed, or cancelled (see
 * job_fail). */
static void api_job_fail(http_req *req) {
    int64_t worker_id;
    if (api_worker_header(req, &worker_id) != 0) return;
    json_t *error = req->json ? json_object_get(req->json, "error") : NULL;
    json_t *retryable = req->json ? json_object_get(req->json, "retryable") : NULL;
    if (!json_is_string(error) || json_string_length(error) == 0 ||
        json_string_length(error) > API_MAX_ERROR) {
        http_reply_field_error(req, "error", "must be a non-empty string of at most %d characters",
                               API_MAX_ERROR);
        return;
    }
    if (retryable && !json_is_boolean(retryable)) {
        http_reply_field_error(req, "retryable", "must be true or false");
        return;
    }
    if (memchr(json_string_value(error), '\0', json_string_length(error))) {
        http_reply_field_error(req, "error", "must not contain NUL characters");
        return;
    }
    PGconn *db = http_db(req);
    if (!db) return;
    char *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    int rc = job_fail(db, req->ids[0], worker_id, json_string_value(error),
                      json_is_true(retryable), &req->srv->policy, &doc, &status, err, sizeof err);
    api_reply_job(req, rc, status, err, 200, doc, false);
}

/* The worker is shutting down: the job goes back to the queue without
 * counting the attempt. */
static void api_job_release(http_req *req) {
    int64_t worker_id;
    if (api_worker_header(req, &worker_id) != 0) return;
    PGconn *db = http_db(req);
    if (!db) return;
    char *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    int rc = job_release(db, req->ids[0], worker_id, &doc, &status, err, sizeof err);
    api_reply_job(req, rc, status, err, 200, doc, true);
}

/* Appends log lines (any content type). A trailing newline does not make an
 * empty line; bytes that are not UTF-8 become U+FFFD instead of losing the
 * line. */
static void api_job_logs_add(http_req *req) {
    int64_t worker_id;
    if (api_worker_header(req, &worker_id) != 0) return;
    const char *text = req->body.data ? req->body.data : "";
    size_t len = req->body.len;
    if (memchr(text, '\0', len)) {
        http_reply_problem(req, 400, "log text must not contain NUL bytes", NULL);
        return;
    }
    /* a final newline ends the last line; it does not start an empty one */
    if (len > 0 && text[len - 1] == '\n') len--;
    if (len > 0 && text[len - 1] == '\r') len--;
    /* Programs print what they like; a stray byte must not lose the line. */
    char *clean = malloc(len * 3 + 1);
    if (!clean) {
        http_reply_problem(req, 500, "out of memory", NULL);
        return;
    }
    http_utf8_clean(text, len, clean);
    PGconn *db = http_db(req);
    if (!db) {
        free(clean);
        return;
    }
    int status = 500;
    char err[ERR_LEN];
    int rc = len == 0 ? job_check_held(db, req->ids[0], worker_id, &status, err, sizeof err)
                      : job_logs_add(db, req->ids[0], worker_id, clean, &status, err, sizeof err);
    free(clean);
    api_reply_job(req, rc, status, err, 204, NULL, false);
}

/* Stores metric points after checking every one (first 20 errors named). */
static void api_job_metrics_add(http_req *req) {
    int64_t worker_id;
    if (api_worker_header(req, &worker_id) != 0) return;
    json_t *points = req->json ? json_object_get(req->json, "points") : NULL;
    json_t *errors = json_array();
    if (!json_is_array(points) || json_array_size(points) > API_MAX_POINTS) {
        spec_error(errors, "points", "must be an array of at most %d points", API_MAX_POINTS);
    } else {
        size_t i;
        json_t *p;
        json_array_foreach(points, i, p) {
            char field[64];
            json_t *name = json_object_get(p, "name");
            json_t *step = json_object_get(p, "step");
            json_t *value = json_object_get(p, "value");
            if (!json_is_object(p)) {
                snprintf(field, sizeof field, "points[%zu]", i);
                spec_error(errors, field, "must be an object {\"name\", \"step\", \"value\"}");
                continue;
            }
            if (!json_is_string(name) || json_string_length(name) == 0 ||
                json_string_length(name) > API_MAX_NAME) {
                snprintf(field, sizeof field, "points[%zu].name", i);
                spec_error(errors, field, "must be a non-empty string");
            }
            if (!json_is_integer(step) || json_integer_value(step) < 0) {
                snprintf(field, sizeof field, "points[%zu].step", i);
                spec_error(errors, field, "must be an integer >= 0");
            }
            if (!json_is_number(value) || !isfinite(json_number_value(value))) {
                snprintf(field, sizeof field, "points[%zu].value", i);
                spec_error(errors, field, "must be a finite number");
            }
            if (json_array_size(errors) >= 20) break;
        }
    }
    if (json_array_size(errors) > 0) {
        http_reply_problem(req, 400, "invalid metric points", errors);
        return;
    }
    json_decref(errors);
    char *text = api_dump(points);
    PGconn *db = http_db(req);
    if (!db || !text) {
        if (!text && db) http_reply_problem(req, 500, "out of memory", NULL);
        free(text);
        return;
    }
    int status = 500;
    char err[ERR_LEN];
    int rc = job_metrics_add(db, req->ids[0], worker_id, text, &status, err, sizeof err);
    free(text);
    api_reply_job(req, rc, status, err, 204, NULL, false);
}

/* --- artifacts ------------------------------------------------------------ */

/* Before an upload is read: its name must be valid. */
static int api_upload_precheck(http_req *req) {
    const char *name = http_query(req, "name");
    if (!name) {
        http_reply_field_error(req, "name", "is required (?name=FILE)");
        return -1;
    }
    if (!util_valid_name(name) || !api_valid_utf8(name)) {
        http_reply_field_error(req, "name",
                               "must be a plain UTF-8 file name (no '/', no '..', no control "
                               "characters, not starting with '-')");
        return -1;
    }
    return 0;
}

/* Before a job's upload is read: a valid name, and the job held by the worker. */
static int api_job_upload_precheck(http_req *req) {
    int64_t worker_id;
    if (api_upload_precheck(req) != 0 || api_worker_header(req, &worker_id) != 0) return -1;
    PGconn *db = http_db(req);
    if (!db) return -1;
    int status = 500;
    char err[ERR_LEN];
    if (job_check_held(db, req->ids[0], worker_id, &status, err, sizeof err) != 0) {
        api_fail(req, status, err);
        return -1;
    }
    return 0;
}

/* Stores the finished upload, attached to job_id when > 0. */
static void api_store_upload(http_req *req, int64_t owner_id, int64_t job_id) {
    PGconn *db = http_db(req);
    if (!db) return;
    json_t *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    art_upload *up = req->upload;
    req->upload = NULL;
    if (art_upload_finish(up, req->srv->cfg->artifacts_dir, db, http_query(req, "name"),
                          owner_id, job_id, &doc, &status, err, sizeof err) != 0) {
        if (status == 400)
            http_reply_field_error(req, "name", "%s", err);
        else
            api_fail(req, status, err);
        return;
    }
    http_reply_json(req, 201, doc);
}

static void api_artifact_upload(http_req *req) { api_store_upload(req, req->user.id, 0); }

/* A job's output: owned by the job's owner, replacing an earlier upload of
 * the same name for that job. */
static void api_job_artifact_upload(http_req *req) {
    int64_t worker_id, owner_id = 0;
    if (api_worker_header(req, &worker_id) != 0) return;
    PGconn *db = http_db(req);
    if (!db) return;
    int status = 500;
    char err[ERR_LEN];
    /* the lease may have lapsed while the bytes arrived */
    if (job_check_held(db, req->ids[0], worker_id, &status, err, sizeof err) != 0 ||
        job_owner(db, req->ids[0], &owner_id, &status, err, sizeof err) != 0) {
        api_fail(req, status, err);
        return;
    }
    api_store_upload(req, owner_id, req->ids[0]);
}

/* Artifact metadata; 404 for an unknown id. */
static void api_artifact_get(http_req *req) {
    PGconn *db = http_db(req);
    if (!db) return;
    json_t *doc = NULL;
    char err[ERR_LEN];
    int found = art_get(db, req->srv->cfg->artifacts_dir, req->ids[0], &doc, NULL, 0, err,
                        sizeof err);
    if (found <= 0) {
        if (found == 0) snprintf(err, sizeof err, "no artifact %lld", (long long)req->ids[0]);
        api_fail(req, found == 0 ? 404 : (db_is_down(db) ? 503 : 500), err);
        return;
    }
    http_reply_json(req, 200, doc);
}

/* Streams the stored file from disk (never read into memory); the database
 * connection is given back before the transfer starts. */
static void api_artifact_content(http_req *req) {
    PGconn *db = http_db(req);
    if (!db) return;
    json_t *doc = NULL;
    char err[ERR_LEN], path[PATH_MAX];
    int found = art_get(db, req->srv->cfg->artifacts_dir, req->ids[0], &doc, path, sizeof path,
                        err, sizeof err);
    if (found <= 0) {
        if (found == 0) snprintf(err, sizeof err, "no artifact %lld", (long long)req->ids[0]);
        api_fail(req, found == 0 ? 404 : (db_is_down(db) ? 503 : 500), err);
        return;
    }
    json_decref(doc);
    http_db_release(req);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        snprintf(err, sizeof err, "artifact %lld: stored file is missing: %s",
                 (long long)req->ids[0], strerror(errno));
        if (fd >= 0) close(fd);
        api_fail(req, 500, err);
        return;
    }
    http_reply_file(req, fd, (uint64_t)st.st_size, "application/octet-stream");
}

/* --- models and datasets ---------------------------------------------------- */

/* Replies with a page of a list: {"items": [...], "next_cursor": "hex" | null}.
 * Takes items (JSON array text). */
static void api_reply_page(http_req *req, char *items, int64_t next) {
    char next_text[24];
    api_cursor_format(next, next_text, sizeof next_text);
    buf_t b;
    buf_init(&b, strlen(items) + 64);
    int w = buf_printf(&b, "{\"items\":%s,\"next_cursor\":", items);
    if (w == 0) w = next > 0 ? buf_printf(&b, "\"%s\"}", next_text) : buf_printf(&b, "null}");
    free(items);
    http_reply_json_text(req, 200, w == 0 ? buf_steal(&b) : NULL);
}

/* The answer to a registration: 201 with Location, or the problem (field
 * errors go with 400 and 409, which name the field at fault). */
static void api_reg_created(http_req *req, enum reg_kind kind, int rc, int64_t id, char *doc,
                            int status, const char *err, json_t **errors) {
    if (rc != 0) {
        bool fields = status == 400 || status == 409;
        http_reply_problem(req, status, err, fields ? *errors : NULL);
        if (fields) *errors = NULL;
        return;
    }
    char location[64];
    snprintf(location, sizeof location, "/api/v1/%ss/%lld", reg_kind_name(kind), (long long)id);
    http_set_location(req, location);
    http_reply_json_text(req, 201, doc);
}

/* POST /api/v1/models: a model folder (hf) or checkpoint (llama2c) by path
 * or by uploaded artifacts. */
static void api_models_create(http_req *req) {
    json_t *errors = json_array();
    reg_model_new in = {.owner_id = req->user.id};
    if (reg_model_check(req->json, &in, errors) != 0) {
        http_reply_problem(req, 400, "invalid model", errors);
        reg_model_new_free(&in);
        return;
    }
    PGconn *db = http_db(req);
    if (db) {
        char *doc = NULL;
        int64_t id = 0;
        int status = 500;
        char err[ERR_LEN];
        int rc = reg_model_create(db, &in, errors, &id, &doc, &status, err, sizeof err);
        api_reg_created(req, REG_MODEL, rc, id, doc, status, err, &errors);
    }
    json_decref(errors);
    reg_model_new_free(&in);
}

/* POST /api/v1/datasets: alpaca JSON or Flan JSONL by path or artifact. */
static void api_datasets_create(http_req *req) {
    json_t *errors = json_array();
    reg_dataset_new in = {.owner_id = req->user.id};
    if (reg_dataset_check(req->json, &in, errors) != 0) {
        http_reply_problem(req, 400, "invalid dataset", errors);
        return;
    }
    PGconn *db = http_db(req);
    if (db) {
        char *doc = NULL;
        int64_t id = 0;
        int status = 500;
        char err[ERR_LEN];
        int rc = reg_dataset_create(db, &in, errors, &id, &doc, &status, err, sizeof err);
        api_reg_created(req, REG_DATASET, rc, id, doc, status, err, &errors);
    }
    json_decref(errors);
}

/* GET /api/v1/models and /api/v1/datasets: paged like jobs, with an exact
 * ?name= filter to look one up by name. */
static void api_reg_list(http_req *req, enum reg_kind kind) {
    const char *name = http_query(req, "name");
    int64_t limit = 50, before = 0;
    if (name && (strlen(name) > REG_MAX_NAME || !api_valid_utf8(name))) {
        http_reply_field_error(req, "name", "must be a name of at most %d characters",
                               REG_MAX_NAME);
        return;
    }
    if (api_page_params(req, &limit, &before) != 0) return;
    PGconn *db = http_db(req);
    if (!db) return;
    char *items = NULL;
    int64_t next = 0;
    int status = 500;
    char err[ERR_LEN];
    if (reg_list(db, kind, name, before, (int)limit, &items, &next, &status, err, sizeof err) !=
        0) {
        api_fail(req, status, err);
        return;
    }
    api_reply_page(req, items, next);
}

static void api_models_list(http_req *req) { api_reg_list(req, REG_MODEL); }
static void api_datasets_list(http_req *req) { api_reg_list(req, REG_DATASET); }

/* One model or dataset; 404 for an unknown id. */
static void api_reg_get(http_req *req, enum reg_kind kind) {
    PGconn *db = http_db(req);
    if (!db) return;
    char *doc = NULL;
    int status = 500;
    char err[ERR_LEN];
    if (reg_get(db, kind, req->ids[0], &doc, &status, err, sizeof err) != 0) {
        api_fail(req, status, err);
        return;
    }
    http_reply_json_text(req, 200, doc);
}

static void api_model_get(http_req *req) { api_reg_get(req, REG_MODEL); }
static void api_dataset_get(http_req *req) { api_reg_get(req, REG_DATASET); }

/* --- the table -------------------------------------------------------------- */

#define RW (HTTP_ADMIN | HTTP_USER)
#define WK (HTTP_ADMIN | HTTP_WORKER)

const http_route api_routes[] = {
    {"GET", "/healthz", 0, HTTP_BODY_NONE, api_healthz, NULL},
    {"GET", "/readyz", 0, HTTP_BODY_NONE, api_readyz, NULL},
    {"GET", "/metrics", 0, HTTP_BODY_NONE, api_metrics, NULL},
    {"POST", "/api/v1/tokens", HTTP_ADMIN, HTTP_BODY_JSON, api_tokens_create, NULL},
    {"POST", "/api/v1/jobs", RW, HTTP_BODY_JSON, api_jobs_create, NULL},
    {"GET", "/api/v1/jobs", RW, HTTP_BODY_NONE, api_jobs_list, NULL},
    {"GET", "/api/v1/jobs/{id}", HTTP_ANYONE, HTTP_BODY_NONE, api_job_get, NULL},
    {"POST", "/api/v1/jobs/{id}/cancel", RW, HTTP_BODY_NONE, api_job_cancel, NULL},
    {"POST", "/api/v1/jobs/{id}/retry", RW, HTTP_BODY_NONE, api_job_retry, NULL},
    {"GET", "/api/v1/jobs/{id}/artifacts", HTTP_ANYONE, HTTP_BODY_NONE, api_job_artifacts_list,
     NULL},
    {"POST", "/api/v1/jobs/{id}/artifacts", WK, HTTP_BODY_UPLOAD, api_job_artifact_upload,
     api_job_upload_precheck},
    {"GET", "/api/v1/jobs/{id}/logs", RW, HTTP_BODY_NONE, api_job_logs_get, NULL},
    {"POST", "/api/v1/jobs/{id}/logs", WK, HTTP_BODY_TEXT, api_job_logs_add, NULL},
    {"GET", "/api/v1/jobs/{id}/metrics", RW, HTTP_BODY_NONE, api_job_metrics_get, NULL},
    {"POST", "/api/v1/jobs/{id}/metrics", WK, HTTP_BODY_JSON, api_job_metrics_add, NULL},
    {"POST", "/api/v1/jobs/{id}/heartbeat", WK, HTTP_BODY_JSON, api_job_heartbeat, NULL},
    {"POST", "/api/v1/jobs/{id}/complete", WK, HTTP_BODY_RESULT, api_job_complete, NULL},
    {"POST", "/api/v1/jobs/{id}/fail", WK, HTTP_BODY_JSON, api_job_fail, NULL},
    {"POST", "/api/v1/jobs/{id}/release", WK, HTTP_BODY_JSON, api_job_release, NULL},
    {"POST", "/api/v1/workers", WK, HTTP_BODY_JSON, api_workers_register, NULL},
    {"POST", "/api/v1/workers/{id}/claim", WK, HTTP_BODY_NONE, api_worker_claim, NULL},
    {"POST", "/api/v1/artifacts", RW, HTTP_BODY_UPLOAD, api_artifact_upload,
     api_upload_precheck},
    {"GET", "/api/v1/artifacts/{id}", HTTP_ANYONE, HTTP_BODY_NONE, api_artifact_get, NULL},
    {"GET", "/api/v1/artifacts/{id}/content", HTTP_ANYONE, HTTP_BODY_NONE, api_artifact_content,
     NULL},
    {"POST", "/api/v1/models", RW, HTTP_BODY_JSON, api_models_create, NULL},
    {"GET", "/api/v1/models", HTTP_ANYONE, HTTP_BODY_NONE, api_models_list, NULL},
    {"GET", "/api/v1/models/{id}", HTTP_ANYONE, HTTP_BODY_NONE, api_model_get, NULL},
    {"POST", "/api/v1/datasets", RW, HTTP_BODY_JSON, api_datasets_create, NULL},
    {"GET", "/api/v1/datasets", HTTP_ANYONE, HTTP_BODY_NONE, api_datasets_list, NULL},
    {"GET", "/api/v1/datasets/{id}", HTTP_ANYONE, HTTP_BODY_NONE, api_dataset_get, NULL},
};

const size_t api_nroutes = sizeof api_routes / sizeof api_routes[0];
