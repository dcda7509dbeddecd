/* agent.c - see agent.h.
 *
 * Threads: the agent runs one slot per GPU (one slot without GPUs, or with
 * --once). Each slot claims jobs and runs them on its own thread (slot 0 on
 * the main thread, which alone takes the signals; the engine calls the
 * runner_ctx callbacks from the slot's thread); while a job runs, a
 * heartbeat thread of its own renews the lease, sends progress and batched
 * log lines, and turns a cancel request, a lost lease or a second shutdown
 * signal into ctx->cancel. Each thread has its own client (libcurl handles
 * are not shared between threads).
 *
 * GPUs are assigned here, not by the server: slot i's home GPU is i. A
 * gpus:0 job computes on its slot's home GPU when it is free, else on the
 * CPU; a gpus:g job reserves g GPUs, its home GPU first, and computes on the
 * first. A slot whose home GPU is reserved by another slot's job does not
 * claim until it is back (a job that a long-poll under way brings meanwhile
 * is released back to the queue), so the server's count of free GPUs
 * (registered minus the gpus of running jobs) and this one agree but for
 * the instants around a job's end. */
#include "agent.h"

#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/log.h"
#include "common/util.h"
#include "worker/client.h"
#include "worker/engine/cuda/cuda.h"
#include "worker/runner.h"
#include "worker/train.h"

#define AGENT_LOG_FLUSH_BYTES ((size_t)64 << 10) /* wake the flusher past this */
#define AGENT_METRIC_FLUSH 1000  /* metric points: wake the flusher past this */
#define AGENT_METRIC_MAX 50000   /* pending points kept while the server is away */
#define AGENT_LOG_MAX_BYTES ((size_t)1 << 20)    /* pending lines kept in an outage */
#define AGENT_HEARTBEAT_TIMEOUT_S 15L
#define AGENT_FINISH_GRACE_S 10.0 /* least time the final report is retried */
#define AGENT_RELEASE_BUDGET_S 10.0
#define AGENT_CORRUPT_RETRIES 3

/* Shutdown signals seen: 1 = stop claiming, 2 = also cancel the running job. */
static atomic_int agent_signals;

void agent_signal(void) { atomic_fetch_add(&agent_signals, 1); }

/* Why a job was asked to stop; the first reason wins. */
enum agent_stop_reason {
    AGENT_RUNNING = 0,
    AGENT_CANCEL_REQUESTED = 1, /* a user cancelled it: report "cancelled" */
    AGENT_LEASE_LOST = 2,       /* not ours any more: report nothing */
    AGENT_SHUTDOWN = 3,         /* second signal: release it */
};

typedef struct {
    const agent_config *cfg;
    json_t *queues;
    char hostname[256];
    json_t *gpus; /* the registration's "gpus": [{"index", "name", "memory_gb"}] */
    int ngpus;    /* how many; also the number of slots when > 0 (without --once) */

    pthread_mutex_t reg_lock; /* guards worker_id: any slot may register again */
    int64_t worker_id;

    pthread_mutex_t gpu_lock; /* guards gpu_owner */
    pthread_cond_t gpu_freed; /* broadcast whenever a job gives GPUs back */
    int64_t gpu_owner[CUDA_MAX_DEVICES]; /* id of the job holding GPU i; 0: free */

    atomic_int fatal;         /* a slot met a fatal answer: every slot stops claiming */
} agent;

/* One claim loop with its two clients: the slot's thread runs the claims,
 * the job and its reports; the job's heartbeat thread uses beat_client. */
typedef struct {
    agent *a;
    int index;           /* the slot's number, and its home GPU when a->ngpus > 0 */
    client main_client;  /* the slot's own thread */
    client beat_client;  /* its jobs' heartbeat thread */
    bool main_ok, beat_ok;
    int64_t worker_id;   /* the registration its clients announce */
    int rc;              /* the loop's outcome (agent_slot_loop) */
    char err[ERR_LEN];
} agent_slot;

/* One running job, shared between its slot's and its heartbeat thread. */
typedef struct {
    agent *a;
    agent_slot *slot;
    int64_t id;
    const char *kind;
    char work_dir[PATH_MAX];
    atomic_int cancel;     /* ctx->cancel */
    atomic_int reason;     /* enum agent_stop_reason */
    atomic_int beat_abort; /* stops an in-flight heartbeat when the job ends */
    bool input_permanent;  /* an input failed in a way no retry fixes (main thread) */

    pthread_mutex_t lock; /* guards everything below */
    pthread_cond_t wake;
    bool done;
    bool has_progress;
    bool progress_sent; /* the server has the latest progress */
    int64_t step, total;
    char message[512];
    double lease_expires; /* wall clock, seconds since the epoch */
    buf_t logs;           /* pending log lines */
    size_t dropped_lines;
    json_t *metrics;      /* pending metric points ({"name", "step", "value"}) */
    size_t dropped_points;

    pthread_mutex_t flush_lock; /* keeps log batches in order */
} agent_job;

/* A stop condition for retry loops: give up once *flag >= threshold. */
typedef struct {
    atomic_int *flag;
    int threshold;
} agent_stop;

static double agent_wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static bool agent_stopped(agent_stop stop) {
    return stop.flag && atomic_load(stop.flag) >= stop.threshold;
}

/* Sleeps for seconds, waking early when stop triggers. */
static void agent_sleep(double seconds, agent_stop stop) {
    double end = util_now_seconds() + seconds;
    for (;;) {
        if (agent_stopped(stop)) return;
        double left = end - util_now_seconds();
        if (left <= 0) return;
        if (left > 0.1) left = 0.1;
        struct timespec ts = {0, (long)(left * 1e9)};
        nanosleep(&ts, NULL);
    }
}

static double agent_jitter(void) { return (double)(rand() % 1000) / 1000.0; }

int agent_parse_queues(const char *list, json_t **out, char *err, size_t errlen) {
    *out = NULL;
    json_t *queues = json_array();
    if (!queues) return err_set(err, errlen, "out of memory");
    const char *p = list;
    for (;;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == 0 || n > 64) {
            json_decref(queues);
            return err_set(err, errlen, "queue names must be 1 to 64 characters (in \"%s\")", list);
        }
        for (size_t i = 0; i < n; i++) {
            char ch = p[i];
            bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                      (ch >= '0' && ch <= '9') || ch == '_' || ch == '-' || ch == '.';
            if (!ok) {
                json_decref(queues);
                return err_set(err, errlen, "queue name \"%.*s\" may only hold letters, digits, "
                                            "'_', '-' and '.'", (int)n, p);
            }
        }
        json_array_append_new(queues, json_stringn(p, n));
        if (!end) break;
        p = end + 1;
    }
    *out = queues;
    return 0;
}

/* A JSON call retried through outages (transient failures) until stop
 * triggers or the wall-clock deadline (0: none) passes. Returns 0 with the
 * final status in *status and the answer in *out (caller owns, NULL unless
 * 2xx with a body), or -1 with err set (gave up, or a local failure). */
static int agent_call(client *c, const char *method, const char *path, json_t *body,
                      bool worker_header, long timeout_s, agent_stop stop, double deadline,
                      long *status, json_t **out, char *err, size_t errlen) {
    for (unsigned attempt = 0;; attempt++) {
        bool transient = false;
        if (client_json(c, method, path, body, worker_header, timeout_s, status, out, &transient,
                        err, errlen) == 0)
            return 0;
        if (!transient) return -1;
        if (agent_stopped(stop)) return -1;
        if (deadline > 0 && agent_wall_now() >= deadline) return -1;
        agent_sleep(client_backoff_seconds(attempt, agent_jitter()), stop);
        if (agent_stopped(stop)) return -1;
    }
}

/* A file transfer (client_perform) retried like agent_call; a download whose
 * checksum does not match is retried a few times, then reported. Returns 0
 * with *status set, or -1 with err set. resp's body is freed here; on a
 * non-2xx answer err holds the problem text. */
static int agent_transfer(client *c, const client_req *req, agent_stop stop, long *status,
                          json_t **out, char *err, size_t errlen) {
    unsigned corrupt = 0;
    if (out) *out = NULL;
    for (unsigned attempt = 0;; attempt++) {
        client_resp resp;
        int rc = client_perform(c, req, &resp, err, errlen);
        *status = resp.status;
        if (rc == 0) {
            if (resp.status < 200 || resp.status >= 300) {
                char problem[512];
                client_problem_text(resp.status, resp.body.data, resp.body.len, problem,
                                    sizeof problem);
                err_set(err, errlen, "%s %s: %s", req->method, req->path, problem);
            } else if (out && resp.body.len > 0) {
                json_error_t jerr;
                *out = json_loadb(resp.body.data, resp.body.len, 0, &jerr);
            }
            client_resp_free(&resp);
            return 0;
        }
        bool again = resp.transient || (resp.corrupt && ++corrupt < AGENT_CORRUPT_RETRIES);
        client_resp_free(&resp);
        if (!again || agent_stopped(stop)) return -1;
        agent_sleep(client_backoff_seconds(attempt, agent_jitter()), stop);
        if (agent_stopped(stop)) return -1;
    }
}

/* Marks the job as stopping for reason (if none was recorded yet) and tells
 * the engine through ctx->cancel. */
static void agent_job_stop(agent_job *job, enum agent_stop_reason reason) {
    int expected = AGENT_RUNNING;
    atomic_compare_exchange_strong(&job->reason, &expected, (int)reason);
    atomic_store(&job->cancel, 1);
}

/* ---- runner_ctx callbacks (main thread) ---- */

static agent_stop agent_job_stop_cond(agent_job *job) {
    return (agent_stop){.flag = &job->cancel, .threshold = 1};
}

/* Reads a positive integer id from ref[key]. */
static int agent_ref_id(json_t *ref, const char *key, int64_t *id, char *err, size_t errlen) {
    json_t *v = json_object_get(ref, key);
    if (!json_is_integer(v) || json_integer_value(v) <= 0)
        return err_set(err, errlen, "input reference must be {\"%s\": ID}", key);
    *id = (int64_t)json_integer_value(v);
    return 0;
}

/* Downloads artifact id (whose SHA-256 is sha256) to path unless a previous
 * call of this job already did. Returns 0, or -1 with err set. */
static int agent_download(agent_job *job, int64_t artifact_id, const char *sha256,
                          const char *path, char *err, size_t errlen) {
    struct stat st;
    if (stat(path, &st) == 0) return 0; /* same input named twice: already verified */
    char url[128];
    snprintf(url, sizeof url, "/api/v1/artifacts/%lld/content", (long long)artifact_id);
    client_req req = {.method = "GET",
                      .path = url,
                      .download_path = path,
                      .expect_sha256 = sha256,
                      .timeout_s = CLIENT_TRANSFER_TIMEOUT_S};
    long status = 0;
    if (agent_transfer(&job->slot->main_client, &req, agent_job_stop_cond(job), &status, NULL, err,
                       errlen) != 0)
        return -1;
    if (status < 200 || status >= 300) return -1;
    return 0;
}

/* GETs a JSON document (an artifact's, model's or dataset's metadata) at
 * url. Returns 0 with *doc (caller owns), or -1 with err set; a 404 (the
 * thing does not exist: retrying cannot help) also sets job->input_permanent. */
static int agent_get_doc(agent_job *job, const char *url, json_t **doc, char *err,
                         size_t errlen) {
    long status = 0;
    *doc = NULL;
    if (agent_call(&job->slot->main_client, "GET", url, NULL, false, CLIENT_CALL_TIMEOUT_S,
                   agent_job_stop_cond(job), 0, &status, doc, err, errlen) != 0)
        return -1;
    if (status == 404) job->input_permanent = true;
    if (status != 200 || !json_is_object(*doc)) {
        if (status == 200) err_set(err, errlen, "GET %s: the answer is not a JSON object", url);
        json_decref(*doc);
        *doc = NULL;
        return -1;
    }
    return 0;
}

/* Reads artifact id's metadata: its sha256 (for checking the download) and,
 * when name is non-NULL, its own name ("" when that is not a safe file
 * name). Returns 0, or -1 with err set. */
static int agent_artifact_meta(agent_job *job, int64_t id, char sha256[SHA256_HEX_LEN],
                               char *name, size_t namelen, char *err, size_t errlen) {
    json_t *meta = NULL;
    char url[128];
    snprintf(url, sizeof url, "/api/v1/artifacts/%lld", (long long)id);
    if (agent_get_doc(job, url, &meta, err, errlen) != 0) return -1;
    int rc = -1;
    const char *sum = json_string_value(json_object_get(meta, "sha256"));
    const char *own = json_string_value(json_object_get(meta, "name"));
    if (!sum || strlen(sum) != SHA256_HEX_LEN - 1) {
        err_set(err, errlen, "artifact %lld: metadata has no sha256", (long long)id);
        goto out;
    }
    snprintf(sha256, SHA256_HEX_LEN, "%s", sum);
    if (name) snprintf(name, namelen, "%s", own && util_valid_name(own) ? own : "");
    rc = 0;
out:
    json_decref(meta);
    return rc;
}

/* Downloads artifact id to path, checked against its recorded sha256.
 * Returns 0, or -1 with err set. */
static int agent_fetch_artifact(agent_job *job, int64_t id, const char *path, char *err,
                                size_t errlen) {
    char sha256[SHA256_HEX_LEN];
    if (agent_artifact_meta(job, id, sha256, NULL, 0, err, errlen) != 0) return -1;
    return agent_download(job, id, sha256, path, err, errlen);
}

static int agent_resolve_file(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                              char *err, size_t errlen) {
    agent_job *job = ctx->user;
    int64_t id;
    if (agent_ref_id(ref, "artifact", &id, err, errlen) != 0) return -1;
    char sha256[SHA256_HEX_LEN], name[256];
    if (agent_artifact_meta(job, id, sha256, name, sizeof name, err, errlen) != 0) return -1;
    /* Keep the artifact's own name (its suffix tells the format) when safe. */
    int n = snprintf(path, pathlen, "%s/artifact-%lld-%s", job->work_dir, (long long)id,
                     name[0] ? name : "data");
    if (n < 0 || (size_t)n >= pathlen) return err_set(err, errlen, "work directory path too long");
    return agent_download(job, id, sha256, path, err, errlen);
}

typedef struct {
    int layer;
    int64_t artifact;
    char sha256[SHA256_HEX_LEN];
} agent_layer_ref;

static int agent_layer_cmp(const void *pa, const void *pb) {
    const agent_layer_ref *a = pa, *b = pb;
    return (a->layer > b->layer) - (a->layer < b->layer);
}

/* Adds the hidden_states_{N}.npy items of one page of a job's artifact list
 * to refs. A layer uploaded twice (a retried predict job) keeps the newest. */
static int agent_collect_layers(json_t *items, agent_layer_ref **refs, size_t *n, size_t *cap,
                                char *err, size_t errlen) {
    size_t i;
    json_t *item;
    json_array_foreach(items, i, item) {
        const char *name = json_string_value(json_object_get(item, "name"));
        const char *sha256 = json_string_value(json_object_get(item, "sha256"));
        json_t *idv = json_object_get(item, "id");
        int layer;
        if (!name || !runner_layer_from_name(name, &layer)) continue;
        if (!json_is_integer(idv) || !sha256 || strlen(sha256) != SHA256_HEX_LEN - 1)
            return err_set(err, errlen, "artifact %s: listing lacks id or sha256", name);
        int64_t id = (int64_t)json_integer_value(idv);
        size_t k;
        for (k = 0; k < *n; k++)
            if ((*refs)[k].layer == layer) break;
        if (k == *n) {
            if (*n == *cap) {
                size_t ncap = *cap ? *cap * 2 : 64;
                agent_layer_ref *p = realloc(*refs, ncap * sizeof *p);
                if (!p) return err_set(err, errlen, "out of memory");
                *refs = p;
                *cap = ncap;
            }
            (*n)++;
        } else if ((*refs)[k].artifact > id) {
            continue;
        }
        (*refs)[k].layer = layer;
        (*refs)[k].artifact = id;
        snprintf((*refs)[k].sha256, sizeof (*refs)[k].sha256, "%s", sha256);
    }
    return 0;
}

/* Called with each page of a job's artifact list (the "items" array). */
typedef int (*agent_page_fn)(json_t *items, void *state, char *err, size_t errlen);

/* Walks every page of job source's artifact list, calling visit on each.
 * Returns 0, or -1 with err set (the listing failed or visit did). */
static int agent_list_job_artifacts(agent_job *job, int64_t source, agent_page_fn visit,
                                    void *state, char *err, size_t errlen) {
    json_t *page = NULL;
    char cursor[512] = "";
    int rc = -1;
    for (;;) {
        char url[2048], escaped[1600] = "";
        long status = 0;
        if (cursor[0] && client_escape(cursor, escaped, sizeof escaped) != 0) {
            err_set(err, errlen, "job %lld: artifact list cursor too long", (long long)source);
            goto out;
        }
        snprintf(url, sizeof url, "/api/v1/jobs/%lld/artifacts?limit=500%s%s", (long long)source,
                 cursor[0] ? "&cursor=" : "", escaped);
        json_decref(page);
        page = NULL;
        if (agent_call(&job->slot->main_client, "GET", url, NULL, false, CLIENT_CALL_TIMEOUT_S,
                       agent_job_stop_cond(job), 0, &status, &page, err, errlen) != 0)
            goto out;
        if (status == 404) job->input_permanent = true;
        if (status != 200) goto out;
        json_t *items = json_object_get(page, "items");
        if (!json_is_array(items)) {
            err_set(err, errlen, "job %lld: artifact list has no items", (long long)source);
            goto out;
        }
        if (visit(items, state, err, errlen) != 0) goto out;
        const char *next = json_string_value(json_object_get(page, "next_cursor"));
        if (!next || !*next) break;
        if (strlen(next) >= sizeof cursor) {
            err_set(err, errlen, "job %lld: artifact list cursor too long", (long long)source);
            goto out;
        }
        snprintf(cursor, sizeof cursor, "%s", next);
    }
    rc = 0;
out:
    json_decref(page);
    return rc;
}

typedef struct {
    agent_layer_ref *refs;
    size_t n, cap;
} agent_layer_set;

static int agent_layer_page(json_t *items, void *state, char *err, size_t errlen) {
    agent_layer_set *set = state;
    return agent_collect_layers(items, &set->refs, &set->n, &set->cap, err, errlen);
}

static int agent_resolve_layers(runner_ctx *ctx, json_t *ref, runner_layer_file **files,
                                size_t *nfiles, char *err, size_t errlen) {
    agent_job *job = ctx->user;
    int rc = -1;
    agent_layer_set set = {0};
    runner_layer_file *out = NULL;
    int64_t source;
    *files = NULL;
    *nfiles = 0;
    if (agent_ref_id(ref, "job", &source, err, errlen) != 0) return -1;

    if (agent_list_job_artifacts(job, source, agent_layer_page, &set, err, errlen) != 0) goto out;
    size_t n = set.n;
    agent_layer_ref *refs = set.refs;
    if (n == 0) {
        err_set(err, errlen, "job %lld has no hidden_states_{layer}.npy artifacts",
                (long long)source);
        goto out;
    }
    qsort(refs, n, sizeof *refs, agent_layer_cmp);
    out = calloc(n, sizeof *out);
    if (!out) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        out[i].layer = refs[i].layer;
        int len = snprintf(out[i].path, sizeof out[i].path, "%s/job-%lld-hidden_states_%d.npy",
                           job->work_dir, (long long)source, refs[i].layer);
        if (len < 0 || (size_t)len >= sizeof out[i].path) {
            err_set(err, errlen, "work directory path too long");
            goto out;
        }
        if (agent_download(job, refs[i].artifact, refs[i].sha256, out[i].path, err, errlen) != 0)
            goto out;
    }
    *files = out;
    *nfiles = n;
    out = NULL;
    rc = 0;
out:
    free(out);
    free(set.refs);
    return rc;
}

/* Writes dir/name into path; -1 with err when it does not fit. */
static int agent_join(char *path, size_t pathlen, const char *dir, const char *name, char *err,
                      size_t errlen) {
    int n = snprintf(path, pathlen, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= pathlen) return err_set(err, errlen, "work directory path too long");
    return 0;
}

/* A registration given by path: the path must exist on this worker, as a
 * directory (want_dir) or a regular file. Missing is permanent: the
 * registration promised a filesystem every worker shares, and this one does
 * not see it, so no retry here will. */
static int agent_shared_path(agent_job *job, const char *what, const char *path, bool want_dir,
                             char *err, size_t errlen) {
    struct stat st;
    if (stat(path, &st) != 0) {
        job->input_permanent = true;
        return err_set(err, errlen, "%s: %s: %s on this worker (registered by path: it must be "
                       "on a filesystem every worker shares)", what, path, strerror(errno));
    }
    if (want_dir ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) {
        job->input_permanent = true;
        return err_set(err, errlen, "%s: %s is not a %s", what, path,
                       want_dir ? "directory" : "regular file");
    }
    return 0;
}

/* The newest artifact of each of up to AGENT_MAX_NAMED names in a job's
 * artifact list (ids[k] stays 0 for a name the job does not have). */
#define AGENT_MAX_NAMED 5
typedef struct {
    const char *const *names;
    size_t n;
    int64_t ids[AGENT_MAX_NAMED];
    char sha256[AGENT_MAX_NAMED][SHA256_HEX_LEN];
} agent_named_refs;

/* Keeps the newest artifact of each wanted name on one page. */
static int agent_named_page(json_t *items, void *state, char *err, size_t errlen) {
    agent_named_refs *refs = state;
    size_t i;
    json_t *item;
    json_array_foreach(items, i, item) {
        const char *name = json_string_value(json_object_get(item, "name"));
        const char *sha256 = json_string_value(json_object_get(item, "sha256"));
        json_t *idv = json_object_get(item, "id");
        for (size_t k = 0; k < refs->n && name; k++) {
            if (strcmp(name, refs->names[k]) != 0) continue;
            if (!json_is_integer(idv) || !sha256 || strlen(sha256) != SHA256_HEX_LEN - 1)
                return err_set(err, errlen, "artifact %s: listing lacks id or sha256", name);
            int64_t id = (int64_t)json_integer_value(idv);
            if (id < refs->ids[k]) continue;
            refs->ids[k] = id;
            snprintf(refs->sha256[k], SHA256_HEX_LEN, "%s", sha256);
        }
    }
    return 0;
}

/* Downloads every artifact refs found into dir (created) under its name.
 * Returns 0, or -1 with err set. */
static int agent_fetch_named(agent_job *job, const agent_named_refs *refs, const char *dir,
                             char *err, size_t errlen) {
    if (util_mkdirs(dir, 0700, err, errlen) != 0) return -1;
    for (size_t k = 0; k < refs->n; k++) {
        if (refs->ids[k] == 0) continue;
        char file_path[PATH_MAX];
        if (agent_join(file_path, sizeof file_path, dir, refs->names[k], err, errlen) != 0)
            return -1;
        if (agent_download(job, refs->ids[k], refs->sha256[k], file_path, err, errlen) != 0)
            return -1;
    }
    return 0;
}

/* The two files of a PEFT adapter, as a train job publishes them. */
static const char *const agent_adapter_files[] = {"adapter_config.json",
                                                  "adapter_model.safetensors"};

/* A full fine-tuning job's Hugging Face checkpoint: the first two are
 * required, the tokenizer's files are taken when the job has them. */
static const char *const agent_full_files[] = {"config.json", "model.safetensors",
                                               "tokenizer.json", "tokenizer_config.json",
                                               "special_tokens_map.json"};
#define AGENT_FULL_REQUIRED 2
_Static_assert(sizeof agent_full_files / sizeof agent_full_files[0] <= AGENT_MAX_NAMED,
               "agent_named_refs holds AGENT_MAX_NAMED names");

/* {"job": ID} (a full fine-tuning train job; the server has checked the
 * kind and method): downloads the newest config.json, model.safetensors and
 * whichever tokenizer files the job published into work_dir/model-job-ID/.
 * A job without the first two (a LoRA job) is a permanent input error. */
static int agent_resolve_model_job(agent_job *job, json_t *ref, char *path, size_t pathlen,
                                   char *err, size_t errlen) {
    int64_t source;
    if (agent_ref_id(ref, "job", &source, err, errlen) != 0) return -1;
    agent_named_refs refs = {.names = agent_full_files,
                             .n = sizeof agent_full_files / sizeof agent_full_files[0]};
    if (agent_list_job_artifacts(job, source, agent_named_page, &refs, err, errlen) != 0)
        return -1;
    for (size_t k = 0; k < AGENT_FULL_REQUIRED; k++)
        if (refs.ids[k] == 0) {
            job->input_permanent = true;
            return err_set(err, errlen, "job %lld has no %s artifact, so it is not a model (a "
                           "full fine-tuning train job writes one when it succeeds: list it in "
                           "depends_on; a LoRA train job writes an adapter: name it as "
                           "\"adapter\": {\"job\": %lld} with its base model)",
                           (long long)source, agent_full_files[k], (long long)source);
        }
    int n = snprintf(path, pathlen, "%s/model-job-%lld", job->work_dir, (long long)source);
    if (n < 0 || (size_t)n >= pathlen) return err_set(err, errlen, "work directory path too long");
    return agent_fetch_named(job, &refs, path, err, errlen);
}

/* {"model": ID}: GETs the registration, then uses its path as it is, or
 * downloads its files ("files": into work_dir/model-ID/ under their names;
 * "file", llama2c: to work_dir/model-ID.bin). Nothing is cached across jobs:
 * the work directory goes with the job. */
static int agent_resolve_model(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                               char *err, size_t errlen) {
    agent_job *job = ctx->user;
    int64_t id;
    json_t *doc = NULL;
    int rc = -1;
    char url[128], what[64];
    if (json_object_get(ref, "job"))
        return agent_resolve_model_job(job, ref, path, pathlen, err, errlen);
    if (agent_ref_id(ref, "model", &id, err, errlen) != 0) return -1;
    snprintf(url, sizeof url, "/api/v1/models/%lld", (long long)id);
    snprintf(what, sizeof what, "model %lld", (long long)id);
    if (agent_get_doc(job, url, &doc, err, errlen) != 0) goto out;

    const char *format = json_string_value(json_object_get(doc, "format"));
    const char *shared = json_string_value(json_object_get(doc, "path"));
    json_t *files = json_object_get(doc, "files");
    json_t *file = json_object_get(doc, "file");
    bool hf = format && strcmp(format, "hf") == 0;
    bool l2c = format && strcmp(format, "llama2c") == 0;
    job->input_permanent = true; /* until the downloads: a bad document stays bad */
    if (!hf && !l2c) {
        err_set(err, errlen, "%s: unknown format \"%s\"", what, format ? format : "");
        goto out;
    }
    if (shared) {
        if (agent_shared_path(job, what, shared, hf, err, errlen) != 0) goto out;
        if (strlen(shared) >= pathlen) {
            err_set(err, errlen, "%s: path too long", what);
            goto out;
        }
        snprintf(path, pathlen, "%s", shared);
        rc = 0;
        goto out;
    }
    if (hf && json_is_object(files) && json_object_size(files) > 0) {
        char dir[PATH_MAX];
        snprintf(what, sizeof what, "model-%lld", (long long)id);
        if (agent_join(dir, sizeof dir, job->work_dir, what, err, errlen) != 0) goto out;
        snprintf(what, sizeof what, "model %lld", (long long)id);
        const char *name;
        json_t *idv;
        json_object_foreach(files, name, idv) {
            if (!util_valid_name(name) || !json_is_integer(idv) || json_integer_value(idv) <= 0) {
                err_set(err, errlen, "%s: bad file entry \"%s\"", what, name);
                goto out;
            }
        }
        if (util_mkdirs(dir, 0700, err, errlen) != 0) {
            job->input_permanent = false;
            goto out;
        }
        job->input_permanent = false;
        json_object_foreach(files, name, idv) {
            char file_path[PATH_MAX];
            if (agent_join(file_path, sizeof file_path, dir, name, err, errlen) != 0) goto out;
            if (agent_fetch_artifact(job, (int64_t)json_integer_value(idv), file_path, err,
                                     errlen) != 0) {
                char reason[ERR_LEN];
                snprintf(reason, sizeof reason, "%s", err);
                err_set(err, errlen, "%s: %s: %s", what, name, reason);
                goto out;
            }
        }
        if (strlen(dir) >= pathlen) {
            err_set(err, errlen, "work directory path too long");
            goto out;
        }
        snprintf(path, pathlen, "%s", dir);
        rc = 0;
        goto out;
    }
    if (l2c && json_is_integer(file) && json_integer_value(file) > 0) {
        job->input_permanent = false;
        int n = snprintf(path, pathlen, "%s/model-%lld.bin", job->work_dir, (long long)id);
        if (n < 0 || (size_t)n >= pathlen) {
            err_set(err, errlen, "work directory path too long");
            goto out;
        }
        if (agent_fetch_artifact(job, (int64_t)json_integer_value(file), path, err, errlen) != 0) {
            char reason[ERR_LEN];
            snprintf(reason, sizeof reason, "%s", err);
            err_set(err, errlen, "%s: %s", what, reason);
            goto out;
        }
        rc = 0;
        goto out;
    }
    err_set(err, errlen, "%s: the registration has no %s", what,
            hf ? "\"path\" or \"files\"" : "\"path\" or \"file\"");
out:
    json_decref(doc);
    return rc;
}

/* LLaMA-Factory's default alpaca columns; a registration that maps a column
 * elsewhere cannot be honoured through the runner interface (which carries a
 * file and a format, not a column map), so it is refused rather than read
 * with the wrong fields. */
static int agent_check_columns(json_t *info, const char *what, char *err, size_t errlen) {
    static const char *const keys[] = {"prompt", "query", "response", "system"};
    static const char *const defaults[] = {"instruction", "input", "output", "system"};
    json_t *columns = json_object_get(info, "columns");
    if (!json_is_object(columns)) return 0;
    const char *key;
    json_t *v;
    json_object_foreach(columns, key, v) {
        const char *want = NULL;
        for (size_t i = 0; i < 4; i++)
            if (strcmp(key, keys[i]) == 0) want = defaults[i];
        const char *got = json_string_value(v);
        if (!want || !got || strcmp(got, want) != 0)
            return err_set(err, errlen, "%s: dataset_info maps column \"%s\" to \"%s\"; this "
                           "worker reads only the default alpaca columns (instruction, input, "
                           "output, system)", what, key, got ? got : "?");
    }
    return 0;
}

/* {"dataset": ID}: GETs the registration; its path is used as it is, an
 * uploaded artifact is downloaded to work_dir/dataset-ID.json (alpaca) or
 * .jsonl (flan). format receives the registration's format. */
static int agent_resolve_dataset(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                                 char *format, size_t formatlen, char *err, size_t errlen) {
    agent_job *job = ctx->user;
    int64_t id;
    json_t *doc = NULL;
    int rc = -1;
    char url[128], what[64];
    if (agent_ref_id(ref, "dataset", &id, err, errlen) != 0) return -1;
    snprintf(url, sizeof url, "/api/v1/datasets/%lld", (long long)id);
    snprintf(what, sizeof what, "dataset %lld", (long long)id);
    if (agent_get_doc(job, url, &doc, err, errlen) != 0) goto out;

    const char *fmt = json_string_value(json_object_get(doc, "format"));
    const char *shared = json_string_value(json_object_get(doc, "path"));
    json_t *artifact = json_object_get(doc, "artifact");
    job->input_permanent = true;
    if (!fmt || (strcmp(fmt, "alpaca") != 0 && strcmp(fmt, "flan") != 0)) {
        err_set(err, errlen, "%s: unknown format \"%s\"", what, fmt ? fmt : "");
        goto out;
    }
    if (strlen(fmt) >= formatlen) {
        err_set(err, errlen, "%s: format buffer too small", what);
        goto out;
    }
    if (agent_check_columns(json_object_get(doc, "dataset_info"), what, err, errlen) != 0)
        goto out;
    if (shared) {
        if (agent_shared_path(job, what, shared, false, err, errlen) != 0) goto out;
        if (strlen(shared) >= pathlen) {
            err_set(err, errlen, "%s: path too long", what);
            goto out;
        }
        snprintf(path, pathlen, "%s", shared);
    } else if (json_is_integer(artifact) && json_integer_value(artifact) > 0) {
        job->input_permanent = false;
        int n = snprintf(path, pathlen, "%s/dataset-%lld.%s", job->work_dir, (long long)id,
                         strcmp(fmt, "flan") == 0 ? "jsonl" : "json");
        if (n < 0 || (size_t)n >= pathlen) {
            err_set(err, errlen, "work directory path too long");
            goto out;
        }
        if (agent_fetch_artifact(job, (int64_t)json_integer_value(artifact), path, err,
                                 errlen) != 0) {
            char reason[ERR_LEN];
            snprintf(reason, sizeof reason, "%s", err);
            err_set(err, errlen, "%s: %s", what, reason);
            goto out;
        }
    } else {
        err_set(err, errlen, "%s: the registration has no \"path\" or \"artifact\"", what);
        goto out;
    }
    snprintf(format, formatlen, "%s", fmt);
    rc = 0;
out:
    json_decref(doc);
    return rc;
}

/* {"job": ID} (a train job; the server has checked the kind): downloads its
 * adapter_config.json and adapter_model.safetensors into
 * work_dir/adapter-job-ID/. {"artifact": ID} is refused: an adapter is two
 * files, and one artifact cannot carry them; adapters come from train jobs,
 * or from a local path with `strata-worker run`. */
static int agent_resolve_adapter(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                                 char *err, size_t errlen) {
    agent_job *job = ctx->user;
    if (json_object_get(ref, "artifact")) {
        job->input_permanent = true;
        return err_set(err, errlen, "an adapter cannot be one artifact (a PEFT adapter is "
                       "adapter_config.json plus adapter_model.safetensors): name the train job "
                       "that wrote it ({\"job\": ID}), or run locally with {\"path\": DIR}");
    }
    int64_t source;
    if (agent_ref_id(ref, "job", &source, err, errlen) != 0) return -1;
    agent_named_refs refs = {.names = agent_adapter_files, .n = 2};
    if (agent_list_job_artifacts(job, source, agent_named_page, &refs, err, errlen) != 0)
        return -1;
    for (size_t k = 0; k < refs.n; k++)
        if (refs.ids[k] == 0) {
            job->input_permanent = true;
            return err_set(err, errlen, "job %lld has no %s artifact", (long long)source,
                           agent_adapter_files[k]);
        }
    int n = snprintf(path, pathlen, "%s/adapter-job-%lld", job->work_dir, (long long)source);
    if (n < 0 || (size_t)n >= pathlen) return err_set(err, errlen, "work directory path too long");
    return agent_fetch_named(job, &refs, path, err, errlen);
}

/* One checkpoint artifact of the job itself (checkpoint-{step}-{rest}). */
typedef struct {
    int64_t id, step;
    char name[256];
    char sha256[SHA256_HEX_LEN];
} agent_ckpt_file;

typedef struct {
    agent_ckpt_file *files;
    size_t n, cap;
} agent_ckpt_set;

/* Collects the checkpoint artifacts of a page of the job's own list. */
static int agent_ckpt_page(json_t *items, void *state, char *err, size_t errlen) {
    agent_ckpt_set *set = state;
    size_t i;
    json_t *item;
    json_array_foreach(items, i, item) {
        const char *name = json_string_value(json_object_get(item, "name"));
        const char *sha256 = json_string_value(json_object_get(item, "sha256"));
        json_t *idv = json_object_get(item, "id");
        int64_t step;
        const char *rest;
        if (!name || strlen(name) >= sizeof set->files[0].name ||
            !train_checkpoint_name(name, &step, &rest))
            continue;
        if (!json_is_integer(idv) || !sha256 || strlen(sha256) != SHA256_HEX_LEN - 1)
            return err_set(err, errlen, "artifact %s: listing lacks id or sha256", name);
        if (set->n == set->cap) {
            size_t cap = set->cap ? 2 * set->cap : 16;
            agent_ckpt_file *grown = realloc(set->files, cap * sizeof *grown);
            if (!grown) return err_set(err, errlen, "out of memory");
            set->files = grown;
            set->cap = cap;
        }
        agent_ckpt_file *f = &set->files[set->n++];
        f->id = (int64_t)json_integer_value(idv);
        f->step = step;
        snprintf(f->name, sizeof f->name, "%s", name);
        snprintf(f->sha256, sizeof f->sha256, "%s", sha256);
    }
    return 0;
}

/* The latest checkpoint an earlier attempt of this job uploaded: lists the
 * job's own artifacts, takes the highest step that has its
 * trainer_state.json (written last, so the set is complete), and downloads
 * that step's files (the newest artifact of each name: a later attempt may
 * have uploaded the same name again) into work_dir/checkpoint-{step}/.
 * *step 0 when there is none. */
static int agent_resolve_checkpoint(runner_ctx *ctx, char *dir, size_t dirlen, int64_t *step,
                                    char *err, size_t errlen) {
    agent_job *job = ctx->user;
    agent_ckpt_set set = {NULL, 0, 0};
    int rc = -1;
    *step = 0;
    if (agent_list_job_artifacts(job, job->id, agent_ckpt_page, &set, err, errlen) != 0)
        goto out;
    int64_t best = 0;
    for (size_t i = 0; i < set.n; i++) {
        const char *rest = NULL;
        int64_t s;
        if (train_checkpoint_name(set.files[i].name, &s, &rest) &&
            strcmp(rest, "trainer_state.json") == 0 && s > best)
            best = s;
    }
    if (best == 0) {
        rc = 0;
        goto out;
    }
    int n = snprintf(dir, dirlen, "%s/checkpoint-%lld", job->work_dir, (long long)best);
    if (n < 0 || (size_t)n >= dirlen) {
        err_set(err, errlen, "work directory path too long");
        goto out;
    }
    if (util_mkdirs(dir, 0700, err, errlen) != 0) goto out;
    for (size_t i = 0; i < set.n; i++) {
        const agent_ckpt_file *f = &set.files[i];
        bool newest = f->step == best;
        for (size_t j = 0; j < set.n && newest; j++)
            if (j != i && strcmp(set.files[j].name, f->name) == 0 && set.files[j].id > f->id)
                newest = false;
        if (!newest) continue;
        char path[PATH_MAX];
        if (agent_join(path, sizeof path, dir, f->name, err, errlen) != 0 ||
            agent_download(job, f->id, f->sha256, path, err, errlen) != 0)
            goto out;
    }
    log_info("job %lld: resuming from checkpoint %lld", (long long)job->id, (long long)best);
    *step = best;
    rc = 0;
out:
    free(set.files);
    return rc;
}

static void agent_progress(runner_ctx *ctx, int64_t step, int64_t total, const char *message) {
    agent_job *job = ctx->user;
    pthread_mutex_lock(&job->lock);
    job->has_progress = true;
    job->progress_sent = false;
    job->step = step;
    job->total = total;
    snprintf(job->message, sizeof job->message, "%s", message ? message : "");
    pthread_mutex_unlock(&job->lock);
}

/* Appends one line to the job's pending log (sent with the next flush). */
static void agent_job_log(agent_job *job, const char *line) {
    log_debug("job %lld: %s", (long long)job->id, line);
    size_t n = strlen(line);
    pthread_mutex_lock(&job->lock);
    if (job->logs.len + n + 1 > job->logs.max) {
        job->dropped_lines++; /* the server has been away too long to keep everything */
    } else {
        /* buf_append frees the buffer on failure, which only loses pending lines. */
        if (buf_append(&job->logs, line, n) != 0 || buf_append(&job->logs, "\n", 1) != 0)
            job->dropped_lines++;
        if (job->logs.len >= AGENT_LOG_FLUSH_BYTES) pthread_cond_signal(&job->wake);
    }
    pthread_mutex_unlock(&job->lock);
}

/* agent_job_log with a printf format (lines past 1 KiB are cut). */
static void agent_job_logf(agent_job *job, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void agent_job_logf(agent_job *job, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    agent_job_log(job, line);
}

static void agent_log_line(runner_ctx *ctx, const char *line) {
    agent_job_log(ctx->user, line);
}

static int agent_add_artifact(runner_ctx *ctx, const char *name, const char *path, char *err,
                              size_t errlen) {
    agent_job *job = ctx->user;
    if (!util_valid_name(name)) return err_set(err, errlen, "invalid artifact name \"%s\"", name);
    char escaped[800], url[1024];
    if (client_escape(name, escaped, sizeof escaped) != 0)
        return err_set(err, errlen, "artifact name too long");
    snprintf(url, sizeof url, "/api/v1/jobs/%lld/artifacts?name=%s", (long long)job->id, escaped);
    client_req req = {.method = "POST",
                      .path = url,
                      .content_type = "application/octet-stream",
                      .upload_path = path,
                      .timeout_s = CLIENT_TRANSFER_TIMEOUT_S,
                      .worker_header = true};
    long status = 0;
    json_t *answer = NULL;
    if (agent_transfer(&job->slot->main_client, &req, agent_job_stop_cond(job), &status, &answer,
                       err, errlen) != 0)
        return -1;
    json_decref(answer);
    if (status == 409) {
        agent_job_stop(job, AGENT_LEASE_LOST);
        return -1;
    }
    if (status != 200 && status != 201) return -1;
    log_info("job %lld: uploaded %s", (long long)job->id, name);
    return 0;
}

/* Queues one metric point for the next flush (with the heartbeat, or sooner
 * when many are pending). Past AGENT_METRIC_MAX pending points (a long
 * outage) new points are counted and dropped. */
static void agent_metric(runner_ctx *ctx, const char *name, int64_t step, double value) {
    agent_job *job = ctx->user;
    json_t *point = isfinite(value)
                        ? json_pack("{s:s, s:I, s:f}", "name", name, "step", (json_int_t)step,
                                    "value", value)
                        : NULL;
    pthread_mutex_lock(&job->lock);
    if (point && (!job->metrics || json_array_size(job->metrics) >= AGENT_METRIC_MAX)) {
        json_decref(point);
        point = NULL;
    }
    /* json_array_append_new releases the point when it fails */
    if (!point || json_array_append_new(job->metrics, point) != 0) {
        job->dropped_points++;
    } else if (json_array_size(job->metrics) >= AGENT_METRIC_FLUSH) {
        pthread_cond_signal(&job->wake);
    }
    pthread_mutex_unlock(&job->lock);
}

/* Posts the pending metric points with client c, in order. Points the server
 * could not take because it is away go back in front of newer ones; returns
 * -1 then, 0 otherwise (sent, nothing to send, or refused for good). */
static int agent_flush_metrics(agent_job *job, client *c) {
    pthread_mutex_lock(&job->flush_lock);
    pthread_mutex_lock(&job->lock);
    json_t *batch = job->metrics;
    job->metrics = json_array();
    size_t dropped = job->dropped_points;
    job->dropped_points = 0;
    pthread_mutex_unlock(&job->lock);
    bool transient = false;
    if (dropped > 0)
        log_warn("job %lld: %zu metric points dropped", (long long)job->id, dropped);
    if (!batch || json_array_size(batch) == 0) goto out;

    char url[128], err[ERR_LEN];
    snprintf(url, sizeof url, "/api/v1/jobs/%lld/metrics", (long long)job->id);
    json_t *body = json_pack("{s:O}", "points", batch), *answer = NULL;
    long status = 0;
    /* Not cut short when the job ends (see agent_flush_logs). */
    atomic_int *abort_flag = c->abort;
    c->abort = NULL;
    int rc = body ? client_json(c, "POST", url, body, true, CLIENT_CALL_TIMEOUT_S, &status,
                                &answer, &transient, err, sizeof err)
                  : err_set(err, sizeof err, "out of memory");
    c->abort = abort_flag;
    json_decref(body);
    json_decref(answer);
    if (rc == 0 && status == 409) agent_job_stop(job, AGENT_LEASE_LOST);
    else if (rc == 0 && (status < 200 || status >= 300))
        log_warn("job %lld: metric points rejected (HTTP %ld)", (long long)job->id, status);
    else if (rc != 0 && !transient)
        log_warn("job %lld: sending metric points: %s", (long long)job->id, err);
    if (rc != 0 && transient) {
        pthread_mutex_lock(&job->lock);
        size_t newer = job->metrics ? json_array_size(job->metrics) : 0;
        if (job->metrics && json_array_size(batch) + newer <= AGENT_METRIC_MAX &&
            json_array_extend(batch, job->metrics) == 0) {
            json_decref(job->metrics);
            job->metrics = json_incref(batch);
        } else {
            job->dropped_points += json_array_size(batch);
        }
        pthread_mutex_unlock(&job->lock);
    }
out:
    json_decref(batch);
    pthread_mutex_unlock(&job->flush_lock);
    return transient ? -1 : 0;
}

/* ---- heartbeat thread ---- */

/* Posts the pending log lines with client c. Lines that could not be sent
 * because the server is away are put back in front of newer ones; returns
 * -1 then, 0 otherwise (sent, nothing to send, or refused for good). */
static int agent_flush_logs(agent_job *job, client *c) {
    pthread_mutex_lock(&job->flush_lock);
    buf_t batch;
    pthread_mutex_lock(&job->lock);
    batch = job->logs;
    buf_init(&job->logs, AGENT_LOG_MAX_BYTES);
    size_t dropped = job->dropped_lines;
    job->dropped_lines = 0;
    pthread_mutex_unlock(&job->lock);

    if (dropped > 0) {
        buf_t note;
        buf_init(&note, AGENT_LOG_MAX_BYTES + 128);
        if (buf_printf(&note, "[strata-worker: %zu log lines dropped]\n", dropped) == 0 &&
            buf_append(&note, batch.data ? batch.data : "", batch.len) == 0) {
            buf_free(&batch);
            batch = note;
        } else {
            buf_free(&note);
        }
    }
    bool transient = false;
    if (batch.len == 0) goto out;

    char url[128], err[ERR_LEN];
    snprintf(url, sizeof url, "/api/v1/jobs/%lld/logs", (long long)job->id);
    client_req req = {.method = "POST",
                      .path = url,
                      .content_type = "text/plain; charset=utf-8",
                      .body = batch.data,
                      /* "a\nb" is two lines; a final newline would read as a third, empty one */
                      .body_len = batch.data[batch.len - 1] == '\n' ? batch.len - 1 : batch.len,
                      .timeout_s = CLIENT_CALL_TIMEOUT_S,
                      .worker_header = true};
    client_resp resp;
    /* A post cut short as the job ends may still have reached the server,
     * and sending its lines again in the final flush would store them
     * twice: let it finish (it has its own timeout) instead. */
    atomic_int *abort_flag = c->abort;
    c->abort = NULL;
    int rc = client_perform(c, &req, &resp, err, sizeof err);
    c->abort = abort_flag;
    /* A post that met an outage keeps its lines for the next flush. */
    transient = rc != 0 && (resp.transient || resp.aborted);
    if (rc == 0 && resp.status == 409) agent_job_stop(job, AGENT_LEASE_LOST);
    else if (rc == 0 && (resp.status < 200 || resp.status >= 300)) {
        char problem[512];
        client_problem_text(resp.status, resp.body.data, resp.body.len, problem, sizeof problem);
        log_warn("job %lld: log lines rejected: %s", (long long)job->id, problem);
    } else if (rc != 0 && !transient) {
        log_warn("job %lld: sending log lines: %s", (long long)job->id, err);
    }
    client_resp_free(&resp);
    if (transient) {
        /* Put the batch back in front, as far as the cap allows. */
        pthread_mutex_lock(&job->lock);
        buf_t merged;
        buf_init(&merged, AGENT_LOG_MAX_BYTES);
        if (buf_append(&merged, batch.data, batch.len) == 0 &&
            buf_append(&merged, job->logs.data ? job->logs.data : "", job->logs.len) == 0) {
            buf_free(&job->logs);
            job->logs = merged;
        } else {
            buf_free(&merged);
            job->dropped_lines++;
        }
        pthread_mutex_unlock(&job->lock);
    }
out:
    buf_free(&batch);
    pthread_mutex_unlock(&job->flush_lock);
    return transient ? -1 : 0;
}

/* One heartbeat: renews the lease, sends progress, learns of a cancel. */
static void agent_heartbeat(agent_job *job) {
    client *c = &job->slot->beat_client;
    json_t *body = json_object(), *answer = NULL;
    pthread_mutex_lock(&job->lock);
    if (job->has_progress)
        json_object_set_new(body, "progress",
                            json_pack("{s:I, s:I, s:s}", "step", (json_int_t)job->step, "total",
                                      (json_int_t)job->total, "message", job->message));
    int64_t sent_step = job->step, sent_total = job->total;
    pthread_mutex_unlock(&job->lock);

    char url[128], err[ERR_LEN];
    long status = 0;
    bool transient = false;
    snprintf(url, sizeof url, "/api/v1/jobs/%lld/heartbeat", (long long)job->id);
    int rc = client_json(c, "POST", url, body, true, AGENT_HEARTBEAT_TIMEOUT_S, &status, &answer,
                         &transient, err, sizeof err);
    if (rc != 0) {
        if (!transient && !atomic_load(&job->beat_abort))
            log_warn("job %lld: heartbeat: %s", (long long)job->id, err);
        goto out;
    }
    if (status == 409 || status == 404) {
        log_warn("job %lld: lease lost (%s); dropping the job", (long long)job->id, err);
        agent_job_stop(job, AGENT_LEASE_LOST);
        goto out;
    }
    if (status != 200) {
        log_warn("job %lld: heartbeat: %s", (long long)job->id, err);
        goto out;
    }
    pthread_mutex_lock(&job->lock);
    if (job->step == sent_step && job->total == sent_total) job->progress_sent = true;
    pthread_mutex_unlock(&job->lock);
    double expires;
    const char *lease = json_string_value(json_object_get(answer, "lease_expires_at"));
    if (lease && client_parse_time(lease, &expires) == 0) {
        pthread_mutex_lock(&job->lock);
        job->lease_expires = expires;
        pthread_mutex_unlock(&job->lock);
    }
    if (json_is_true(json_object_get(answer, "cancel_requested")) &&
        atomic_load(&job->reason) == AGENT_RUNNING) {
        log_info("job %lld: cancel requested", (long long)job->id);
        agent_job_stop(job, AGENT_CANCEL_REQUESTED);
    }
out:
    json_decref(body);
    json_decref(answer);
}

/* Heartbeat thread body: wakes every 200 ms to notice a second signal, sends
 * a heartbeat every heartbeat_s seconds, flushes logs with each heartbeat or
 * as soon as a large batch is pending. */
static void *agent_beat_main(void *arg) {
    agent_job *job = arg;
    double period = job->a->cfg->heartbeat_s;
    double next_beat = util_now_seconds() + period;
    int seen_signals = atomic_load(&agent_signals);
    pthread_mutex_lock(&job->lock);
    while (!job->done) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 200 * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&job->wake, &job->lock, &until);
        if (job->done) break;
        bool big_batch = job->logs.len >= AGENT_LOG_FLUSH_BYTES ||
                         json_array_size(job->metrics) >= AGENT_METRIC_FLUSH;
        pthread_mutex_unlock(&job->lock);

        int signals = atomic_load(&agent_signals);
        if (signals != seen_signals) {
            seen_signals = signals;
            if (signals == 1)
                log_info("shutdown requested: finishing job %lld first (signal again to "
                         "cancel it and hand it back)", (long long)job->id);
            else if (signals >= 2) {
                log_info("second shutdown signal: cancelling job %lld", (long long)job->id);
                agent_job_stop(job, AGENT_SHUTDOWN);
            }
        }
        bool beat_due = util_now_seconds() >= next_beat;
        if (big_batch || beat_due) {
            agent_flush_logs(job, &job->slot->beat_client);
            agent_flush_metrics(job, &job->slot->beat_client);
        }
        if (beat_due) {
            agent_heartbeat(job);
            next_beat = util_now_seconds() + period;
        }
        pthread_mutex_lock(&job->lock);
    }
    pthread_mutex_unlock(&job->lock);
    return NULL;
}

/* ---- job lifecycle ---- */

static int agent_rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)ftw;
    int rc = (flag == FTW_DP) ? rmdir(path) : unlink(path);
    if (rc != 0 && errno != ENOENT) log_warn("remove %s: %s", path, strerror(errno));
    return 0;
}

/* Removes a directory tree (no symlinks followed). */
static void agent_remove_tree(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return;
    nftw(path, agent_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Sends a final report (complete/fail/release) about job id, retried
 * through outages until the lease would have lapsed (lease_expires, wall
 * clock; at least AGENT_FINISH_GRACE_S from now) or, unless this is the
 * release itself, a second signal. budget_s > 0 replaces the lease deadline
 * (a release on the way out should not hold the exit for long). Returns 0
 * when the server accepted it, -1 otherwise (logged). */
static int agent_report(client *c, int64_t id, double lease_expires, const char *action,
                        json_t *body, double budget_s) {
    char url[128], err[ERR_LEN] = "";
    long status = 0;
    json_t *answer = NULL;
    snprintf(url, sizeof url, "/api/v1/jobs/%lld/%s", (long long)id, action);
    double deadline = lease_expires;
    double floor = agent_wall_now() + (budget_s > 0 ? budget_s : AGENT_FINISH_GRACE_S);
    if (budget_s > 0 || deadline < floor) deadline = floor;
    bool release = strcmp(action, "release") == 0;
    agent_stop stop = {.flag = &agent_signals, .threshold = release ? INT_MAX : 2};
    int rc = agent_call(c, "POST", url, body, true, CLIENT_CALL_TIMEOUT_S, stop, deadline,
                        &status, &answer, err, sizeof err);
    json_decref(answer);
    if (rc != 0) {
        log_error("job %lld: could not %s it: %s", (long long)id, action, err);
        return -1;
    }
    if (status == 409 || status == 404) {
        log_warn("job %lld: no longer ours, %s not recorded (%s)", (long long)id, action, err);
        return -1;
    }
    if (status < 200 || status >= 300) {
        log_error("job %lld: %s rejected: %s", (long long)id, action, err);
        return -1;
    }
    return 0;
}

/* The job's lease deadline as last renewed. */
static double agent_job_lease(agent_job *job) {
    pthread_mutex_lock(&job->lock);
    double t = job->lease_expires;
    pthread_mutex_unlock(&job->lock);
    return t;
}

/* ---- the GPU pool ---- */

/* Waits up to seconds for a broadcast of gpu_freed. Caller holds
 * a->gpu_lock. */
static void agent_gpu_wait(agent *a, double seconds) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    long ns = until.tv_nsec + (long)(seconds * 1e9);
    until.tv_sec += ns / 1000000000L;
    until.tv_nsec = ns % 1000000000L;
    pthread_cond_timedwait(&a->gpu_freed, &a->gpu_lock, &until);
}

/* The job holding the slot's home GPU, or 0 when it is free (or the
 * worker has no GPU). */
static int64_t agent_gpu_home_owner(agent_slot *slot) {
    agent *a = slot->a;
    if (a->ngpus == 0) return 0;
    pthread_mutex_lock(&a->gpu_lock);
    int64_t owner = a->gpu_owner[slot->index];
    pthread_mutex_unlock(&a->gpu_lock);
    return owner;
}

/* Holds the slot's claims while another slot's job has its home GPU
 * reserved: a claim now would be answered by the server's count, which
 * does not know which GPU is lent, and the job would land on another
 * slot's GPU or wait. Returns when the GPU is free or stop triggers. */
static void agent_gpu_wait_home(agent_slot *slot, agent_stop stop) {
    agent *a = slot->a;
    if (a->ngpus == 0) return;
    bool logged = false;
    pthread_mutex_lock(&a->gpu_lock);
    while (a->gpu_owner[slot->index] != 0 && !agent_stopped(stop) && !atomic_load(&a->fatal)) {
        if (!logged)
            log_info("slot %d: GPU %d is reserved by job %lld; claiming when it is back",
                     slot->index, slot->index, (long long)a->gpu_owner[slot->index]);
        logged = true;
        agent_gpu_wait(a, 0.2);
    }
    pthread_mutex_unlock(&a->gpu_lock);
}

/* Reserves the GPUs job asks for (want) in the pool, the slot's home GPU
 * first, then the free ones in order, into held (*nheld of them). want 0:
 * the home GPU when it is free, else none (the job runs on the CPU). When
 * fewer than want are free (another slot's job is giving them back), waits
 * for them, logging that once in the job's log; the heartbeats keep running
 * meanwhile. Returns 0, or -1 when the job was stopped while waiting. */
static int agent_gpu_take(agent_job *job, int want, int *held, int *nheld) {
    agent *a = job->a;
    int home = job->slot->index;
    bool logged = false;
    *nheld = 0;
    if (a->ngpus == 0) return 0;
    pthread_mutex_lock(&a->gpu_lock);
    if (want == 0) {
        if (a->gpu_owner[home] == 0) {
            a->gpu_owner[home] = job->id;
            held[(*nheld)++] = home;
        } else {
            agent_job_logf(job, "GPU %d is reserved for job %lld; this job runs on the CPU",
                           home, (long long)a->gpu_owner[home]);
        }
        pthread_mutex_unlock(&a->gpu_lock);
        return 0;
    }
    for (;;) {
        int nfree = 0;
        for (int i = 0; i < a->ngpus; i++)
            if (a->gpu_owner[i] == 0) nfree++;
        if (nfree >= want) break;
        if (atomic_load(&job->cancel)) {
            pthread_mutex_unlock(&a->gpu_lock);
            return -1;
        }
        if (!logged) {
            agent_job_logf(job, "waiting for %d free GPU%s (%d free now; jobs ending on this "
                           "worker give theirs back)", want, want == 1 ? "" : "s", nfree);
            log_info("job %lld: waiting for %d free GPUs (%d free)", (long long)job->id, want,
                     nfree);
            logged = true;
        }
        agent_gpu_wait(a, 0.2);
    }
    if (a->gpu_owner[home] == 0) held[(*nheld)++] = home;
    for (int i = 0; i < a->ngpus && *nheld < want; i++)
        if (i != home && a->gpu_owner[i] == 0) held[(*nheld)++] = i;
    for (int k = 0; k < *nheld; k++) a->gpu_owner[held[k]] = job->id;
    pthread_mutex_unlock(&a->gpu_lock);
    return 0;
}

/* Gives the job's GPUs back to the pool and wakes the slots waiting for
 * them. */
static void agent_gpu_give_back(agent *a, const int *held, int nheld) {
    if (nheld == 0) return;
    pthread_mutex_lock(&a->gpu_lock);
    for (int k = 0; k < nheld; k++) a->gpu_owner[held[k]] = 0;
    pthread_cond_broadcast(&a->gpu_freed);
    pthread_mutex_unlock(&a->gpu_lock);
}

/* Writes "a,b,c" (the GPUs held) into out. */
static void agent_gpu_list(const int *held, int nheld, char *out, size_t outlen) {
    size_t used = 0;
    out[0] = '\0';
    for (int k = 0; k < nheld && used < outlen; k++) {
        int w = snprintf(out + used, outlen - used, "%s%d", k ? "," : "", held[k]);
        if (w < 0) break;
        used += (size_t)w;
    }
}

/* Runs one claimed job end to end on slot's thread, with the GPUs it
 * reserves in the pool, and reports its outcome. */
static void agent_run_job(agent_slot *slot, json_t *claimed) {
    agent *a = slot->a;
    agent_job job;
    memset(&job, 0, sizeof job);
    job.a = a;
    job.slot = slot;
    json_t *idv = json_object_get(claimed, "id");
    job.kind = json_string_value(json_object_get(claimed, "kind"));
    json_t *spec = json_object_get(claimed, "spec");
    if (!json_is_integer(idv) || !job.kind || !json_is_object(spec)) {
        log_error("claimed job lacks id, kind or spec; ignoring it (the lease will lapse)");
        return;
    }
    job.id = (int64_t)json_integer_value(idv);
    pthread_mutex_init(&job.lock, NULL);
    pthread_mutex_init(&job.flush_lock, NULL);
    pthread_cond_init(&job.wake, NULL);
    buf_init(&job.logs, AGENT_LOG_MAX_BYTES);
    job.metrics = json_array();
    double expires;
    const char *lease = json_string_value(json_object_get(claimed, "lease_expires_at"));
    job.lease_expires = (lease && client_parse_time(lease, &expires) == 0)
                            ? expires
                            : agent_wall_now() + 3.0 * a->cfg->heartbeat_s;

    double started = util_now_seconds();
    log_info("job %lld (%s) started", (long long)job.id, job.kind);

    char err[ERR_LEN] = "";
    json_t *result = NULL;
    bool retryable = false, cancelled = false, beat_started = false;
    int rc = -1;
    pthread_t beat;
    int held[CUDA_MAX_DEVICES], nheld = 0;

    int n = snprintf(job.work_dir, sizeof job.work_dir, "%s/job-%lld", a->cfg->work_dir,
                     (long long)job.id);
    if (n < 0 || (size_t)n >= sizeof job.work_dir) {
        err_set(err, sizeof err, "work directory path too long");
        retryable = true;
        goto report;
    }
    agent_remove_tree(job.work_dir); /* leftovers of an earlier, killed attempt */
    if (util_mkdirs(job.work_dir, 0700, err, sizeof err) != 0) {
        retryable = true;
        goto report;
    }

    /* Signals go to the main thread only; the heartbeat thread polls the count. */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    slot->beat_client.abort = &job.beat_abort;
    beat_started = pthread_create(&beat, NULL, agent_beat_main, &job) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!beat_started) {
        err_set(err, sizeof err, "cannot start the heartbeat thread");
        retryable = true;
        goto report;
    }

    if (!runner_supports(job.kind)) {
        err_set(err, sizeof err, "this worker cannot run %s jobs", job.kind);
        retryable = true; /* another worker may */
        goto report;
    }
    /* The server hands a job that asks for GPUs only to a worker that has
     * them free; one reaching a worker without enough is a bug no retry on
     * the same terms fixes. */
    json_t *want = json_object_get(json_object_get(claimed, "resources"), "gpus");
    int gpus_wanted = json_is_integer(want) ? (int)json_integer_value(want) : 0;
    if (gpus_wanted > a->ngpus) {
        err_set(err, sizeof err, "this job needs %d GPU%s and this worker has %d", gpus_wanted,
                gpus_wanted == 1 ? "" : "s", a->ngpus);
        goto report;
    }
    if (agent_gpu_take(&job, gpus_wanted < 0 ? 0 : gpus_wanted, held, &nheld) != 0) {
        err_set(err, sizeof err, "stopped while waiting for a free GPU");
        cancelled = true;
        goto report;
    }
    if (nheld > 1) {
        /* Spreading one job over several GPUs needs data parallelism
         * (NCCL), which the engine does not have: the others stay reserved
         * so that nothing else lands on them. */
        char list[256];
        agent_gpu_list(held, nheld, list, sizeof list);
        agent_job_logf(&job, "job asked for %d GPUs: reserved GPUs %s; the engine runs on GPU %d",
                       gpus_wanted, list, held[0]);
    }
    runner_ctx ctx = {.resolve_file = agent_resolve_file,
                      .resolve_layers = agent_resolve_layers,
                      .resolve_model = agent_resolve_model,
                      .resolve_dataset = agent_resolve_dataset,
                      .resolve_adapter = agent_resolve_adapter,
                      .progress = agent_progress,
                      .log = agent_log_line,
                      .add_artifact = agent_add_artifact,
                      .metric = agent_metric,
                      .resolve_checkpoint = agent_resolve_checkpoint,
                      .cancel = &job.cancel,
                      .work_dir = job.work_dir,
                      .user = &job,
                      /* the first GPU reserved; -1 (the CPU) when none is */
                      .gpu = nheld > 0 ? held[0] : -1,
                      .gpu_required = gpus_wanted > 0};
    slot->main_client.abort = &job.cancel; /* transfers stop when the job does */
    rc = runner_run(job.kind, spec, &ctx, &result, &retryable, &cancelled, err, sizeof err);
    slot->main_client.abort = NULL;
    /* Runners cannot tell a missing shared path or registration from an
     * outage; the resolvers could, and no other worker would do better. */
    if (rc != 0 && job.input_permanent) retryable = false;

report:
    if (beat_started) {
        pthread_mutex_lock(&job.lock);
        job.done = true;
        pthread_cond_signal(&job.wake);
        pthread_mutex_unlock(&job.lock);
        atomic_store(&job.beat_abort, 1);
        pthread_join(beat, NULL);
    }
    slot->beat_client.abort = NULL;

    /* A job shorter than a heartbeat period would otherwise leave no
     * progress at all: send the last one before the outcome. */
    if (rc == 0 && job.has_progress && !job.progress_sent &&
        atomic_load(&job.reason) == AGENT_RUNNING)
        agent_heartbeat(&job);

    int reason = atomic_load(&job.reason);
    const char *outcome;
    if (reason == AGENT_LEASE_LOST) {
        outcome = "dropped (lease lost)";
    } else {
        /* The last lines (often the error) matter most: wait out an outage
         * for them as for the final report. */
        double deadline = agent_job_lease(&job);
        if (deadline < agent_wall_now() + AGENT_FINISH_GRACE_S)
            deadline = agent_wall_now() + AGENT_FINISH_GRACE_S;
        agent_stop stop = {.flag = &agent_signals, .threshold = 2};
        for (unsigned attempt = 0;; attempt++) {
            int logs_rc = agent_flush_logs(&job, &slot->main_client);
            if (agent_flush_metrics(&job, &slot->main_client) == 0 && logs_rc == 0) break;
            if (agent_stopped(stop) || agent_wall_now() >= deadline) break;
            agent_sleep(client_backoff_seconds(attempt, agent_jitter()), stop);
        }
        client *c = &slot->main_client;
        if (rc == 0) {
            json_t *body = json_pack("{s:o}", "result", result ? json_incref(result) : json_null());
            outcome = agent_report(c, job.id, agent_job_lease(&job), "complete", body, 0) == 0
                          ? "succeeded"
                          : "succeeded (not recorded)";
            json_decref(body);
        } else if (reason == AGENT_SHUTDOWN) {
            json_t *body = json_object();
            outcome = agent_report(c, job.id, 0, "release", body, AGENT_RELEASE_BUDGET_S) == 0
                          ? "released (shutdown)"
                          : "abandoned (shutdown)";
            json_decref(body);
        } else if (reason == AGENT_CANCEL_REQUESTED || cancelled) {
            json_t *body = json_pack("{s:s, s:b}", "error", "cancelled", "retryable", 0);
            agent_report(c, job.id, agent_job_lease(&job), "fail", body, 0);
            json_decref(body);
            outcome = "cancelled";
        } else {
            log_warn("job %lld failed: %s", (long long)job.id, err);
            json_t *body = json_pack("{s:s, s:b}", "error", err[0] ? err : "unknown error",
                                     "retryable", retryable ? 1 : 0);
            agent_report(c, job.id, agent_job_lease(&job), "fail", body, 0);
            json_decref(body);
            outcome = "failed";
        }
    }
    log_info("job %lld (%s) %s in %.1f s", (long long)job.id, job.kind, outcome,
             util_now_seconds() - started);
    /* After the report, so that the server, too, counts them free by the
     * time another slot claims for them. */
    agent_gpu_give_back(a, held, nheld);

    json_decref(result);
    agent_remove_tree(job.work_dir);
    buf_free(&job.logs);
    json_decref(job.metrics);
    pthread_cond_destroy(&job.wake);
    pthread_mutex_destroy(&job.flush_lock);
    pthread_mutex_destroy(&job.lock);
}

/* ---- registration and the claim loop ---- */

/* Asks CUDA once for this worker's GPUs, logs them in one line ("GPU 0:
 * NVIDIA H200, 139.8 GiB (sm_90); GPU 1: ..." or "no GPU: why; jobs run on
 * the CPU") and builds the registration's "gpus" array in a->gpus. Returns
 * 0, or -1 with err set when out of memory. */
static int agent_find_gpus(agent *a, char *err, size_t errlen) {
    static cuda_device_info devs[CUDA_MAX_DEVICES];
    char why[ERR_LEN] = "";
    int n = cuda_devices(devs, CUDA_MAX_DEVICES, why, sizeof why);
    a->gpus = json_array();
    if (!a->gpus) return err_set(err, errlen, "out of memory");
    if (n <= 0) {
        a->ngpus = 0;
        log_info("no GPU: %s; jobs run on the CPU", why[0] ? why : "none found");
        return 0;
    }
    char line[2048];
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        /* memory_gb to 0.1 GiB, as the log line shows it */
        double gb = round(devs[i].memory_gb * 10.0) / 10.0;
        json_t *g = json_pack("{s:i, s:s, s:f}", "index", devs[i].index, "name", devs[i].name,
                              "memory_gb", gb);
        if (!g || json_array_append_new(a->gpus, g) != 0)
            return err_set(err, errlen, "out of memory");
        if (used < sizeof line) {
            int w = snprintf(line + used, sizeof line - used, "%sGPU %d: %s, %.1f GiB (sm_%d%d)",
                             i ? "; " : "", devs[i].index, devs[i].name, gb, devs[i].major,
                             devs[i].minor);
            if (w > 0) used += (size_t)w;
        }
    }
    a->ngpus = n;
    log_info("%s", line);
    return 0;
}

/* Registers with the server through c, waiting out outages, and records
 * the id in a->worker_id (the caller holds a->reg_lock). Returns 0, 1 when
 * a signal ended the wait, or -1 with err set when the server refused us. */
static int agent_register(agent *a, client *c, char *err, size_t errlen) {
    json_t *body = json_pack("{s:s, s:s, s:O, s:O}", "name",
                             a->cfg->name ? a->cfg->name : a->hostname, "hostname", a->hostname,
                             "gpus", a->gpus, "queues", a->queues);
    json_t *answer = NULL;
    long status = 0;
    int rc = -1;
    agent_stop stop = {.flag = &agent_signals, .threshold = 1};
    c->abort = &agent_signals;
    if (agent_call(c, "POST", "/api/v1/workers", body, false, CLIENT_CALL_TIMEOUT_S, stop, 0,
                   &status, &answer, err, errlen) != 0) {
        rc = agent_stopped(stop) ? 1 : -1;
        goto out;
    }
    if (status != 200 && status != 201) {
        char reason[ERR_LEN];
        snprintf(reason, sizeof reason, "%s", err);
        err_set(err, errlen, "registration refused: %s", reason);
        goto out;
    }
    json_t *idv = json_object_get(answer, "id");
    if (!json_is_integer(idv) || json_integer_value(idv) <= 0) {
        err_set(err, errlen, "registration answer has no id");
        goto out;
    }
    a->worker_id = (int64_t)json_integer_value(idv);
    log_info("registered with %s as worker %lld", c->base_url, (long long)a->worker_id);
    rc = 0;
out:
    c->abort = NULL;
    json_decref(body);
    json_decref(answer);
    return rc;
}

/* Points the slot's clients at the agent's registration, which another
 * slot may have renewed. */
static void agent_slot_sync(agent_slot *slot) {
    agent *a = slot->a;
    pthread_mutex_lock(&a->reg_lock);
    int64_t id = a->worker_id;
    pthread_mutex_unlock(&a->reg_lock);
    if (id == slot->worker_id) return;
    slot->worker_id = id;
    client_set_worker(&slot->main_client, id);
    client_set_worker(&slot->beat_client, id);
}

/* The server does not know the slot's registration (e.g. a fresh
 * database): registers again, unless another slot already has. Returns as
 * agent_register. */
static int agent_reregister(agent_slot *slot, char *err, size_t errlen) {
    agent *a = slot->a;
    int rc = 0;
    pthread_mutex_lock(&a->reg_lock);
    if (a->worker_id == slot->worker_id) {
        log_warn("server does not know worker %lld any more; registering again",
                 (long long)slot->worker_id);
        rc = agent_register(a, &slot->main_client, err, errlen);
    }
    pthread_mutex_unlock(&a->reg_lock);
    if (rc == 0) agent_slot_sync(slot);
    return rc;
}

/* One slot's claim loop: claims and runs jobs until a signal, a fatal
 * answer to another slot, or one job with --once. Returns 0, or -1 with err
 * set on a fatal answer (bad token, registration refused), which also stops
 * the other slots' claims. */
static int agent_slot_loop(agent_slot *slot, char *err, size_t errlen) {
    agent *a = slot->a;
    agent_stop stop = {.flag = &agent_signals, .threshold = 1};
    unsigned failures = 0;
    char url[128];
    for (;;) {
        agent_gpu_wait_home(slot, stop);
        if (agent_stopped(stop) || atomic_load(&a->fatal)) return 0;
        agent_slot_sync(slot);
        json_t *job = NULL;
        long status = 0;
        bool transient = false;
        snprintf(url, sizeof url, "/api/v1/workers/%lld/claim?wait=%d",
                 (long long)slot->worker_id, a->cfg->wait_s);
        slot->main_client.abort = &agent_signals; /* a signal ends the long-poll at once */
        int rc = client_json(&slot->main_client, "POST", url, NULL, false, a->cfg->wait_s + 15L,
                             &status, &job, &transient, err, errlen);
        slot->main_client.abort = NULL;
        if (agent_stopped(stop)) {
            /* A job handed out just as the signal came: give it straight back
             * (a job handed out as the poll was abandoned lapses instead). */
            json_t *idv = json_object_get(job, "id");
            if (rc == 0 && status == 200 && json_is_integer(idv)) {
                json_t *body = json_object();
                if (agent_report(&slot->main_client, (int64_t)json_integer_value(idv), 0,
                                 "release", body, AGENT_RELEASE_BUDGET_S) == 0)
                    log_info("job %lld released unstarted (shutdown)",
                             (long long)json_integer_value(idv));
                json_decref(body);
            }
            json_decref(job);
            return 0;
        }
        if (rc != 0 || (status != 200 && status != 204)) {
            json_decref(job);
            if (rc == 0 && (status == 401 || status == 403)) {
                atomic_store(&a->fatal, 1);
                return -1; /* err says why: a bad or revoked token */
            }
            if (rc == 0 && status == 404) {
                /* The server forgot us (e.g. a fresh database): register again. */
                int r = agent_reregister(slot, err, errlen);
                if (r < 0) atomic_store(&a->fatal, 1);
                if (r != 0) return r > 0 ? 0 : -1;
                continue;
            }
            if (!transient) log_warn("claim: %s", err);
            agent_sleep(client_backoff_seconds(failures++, agent_jitter()), stop);
            continue;
        }
        failures = 0;
        if (status == 204 || !job) {
            json_decref(job);
            continue;
        }
        json_t *idv = json_object_get(job, "id");
        int64_t lender = agent_gpu_home_owner(slot);
        if (lender != 0 && json_is_integer(idv)) {
            /* The poll was under way when another slot's job took the home
             * GPU: this slot does not claim until it is back, so the job
             * goes back to the queue, for another worker or for us later. */
            json_t *body = json_object();
            if (agent_report(&slot->main_client, (int64_t)json_integer_value(idv), 0, "release",
                             body, AGENT_RELEASE_BUDGET_S) == 0)
                log_info("job %lld released unstarted: GPU %d is reserved by job %lld",
                         (long long)json_integer_value(idv), slot->index, (long long)lender);
            json_decref(body);
            json_decref(job);
            continue;
        }
        agent_run_job(slot, job);
        json_decref(job);
        if (a->cfg->once) return 0;
    }
}

/* Body of the threads of slots 1..n-1 (slot 0 runs on the main thread). */
static void *agent_slot_main(void *arg) {
    agent_slot *slot = arg;
    slot->rc = agent_slot_loop(slot, slot->err, sizeof slot->err);
    return NULL;
}

int agent_run(const agent_config *cfg, char *err, size_t errlen) {
    agent a;
    memset(&a, 0, sizeof a);
    a.cfg = cfg;
    pthread_mutex_init(&a.reg_lock, NULL);
    pthread_mutex_init(&a.gpu_lock, NULL);
    pthread_cond_init(&a.gpu_freed, NULL);
    int rc = -1, nslots = 0, started = 0;
    agent_slot *slots = NULL;
    pthread_t threads[CUDA_MAX_DEVICES];
    srand((unsigned)getpid() ^ (unsigned)time(NULL));

    if (cfg->heartbeat_s < 1 || cfg->wait_s < 1 || cfg->wait_s > 60) {
        err_set(err, errlen, "heartbeat must be >= 1 s and wait 1..60 s");
        goto out;
    }
    if (agent_parse_queues(cfg->queues ? cfg->queues : "default", &a.queues, err, errlen) != 0)
        goto out;
    if (gethostname(a.hostname, sizeof a.hostname) != 0)
        snprintf(a.hostname, sizeof a.hostname, "unknown");
    a.hostname[sizeof a.hostname - 1] = '\0';
    if (util_mkdirs(cfg->work_dir, 0700, err, errlen) != 0) goto out;
    if (agent_find_gpus(&a, err, errlen) != 0) goto out;

    /* One job per GPU; --once means one job in all, so one slot. */
    int want_slots = cfg->once || a.ngpus == 0 ? 1 : a.ngpus;
    slots = calloc((size_t)want_slots, sizeof *slots);
    if (!slots) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    nslots = want_slots;
    for (int i = 0; i < nslots; i++) {
        agent_slot *slot = &slots[i];
        slot->a = &a;
        slot->index = i;
        if (client_init(&slot->main_client, cfg->server_url, cfg->token, err, errlen) != 0)
            goto out;
        slot->main_ok = true;
        if (client_init(&slot->beat_client, cfg->server_url, cfg->token, err, errlen) != 0)
            goto out;
        slot->beat_ok = true;
    }

    pthread_mutex_lock(&a.reg_lock);
    int r = agent_register(&a, &slots[0].main_client, err, errlen);
    pthread_mutex_unlock(&a.reg_lock);
    if (r != 0) {
        rc = r > 0 ? 0 : -1;
        goto out;
    }
    if (nslots > 1) log_info("running up to %d jobs at once, one per GPU", nslots);

    /* Signals go to the main thread only; the others poll the count. */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    for (started = 1; started < nslots; started++)
        if (pthread_create(&threads[started], NULL, agent_slot_main, &slots[started]) != 0)
            break;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (started < nslots) {
        atomic_store(&a.fatal, 1);
        slots[0].rc = err_set(slots[0].err, sizeof slots[0].err,
                              "cannot start the thread of job slot %d", started);
    } else {
        slots[0].rc = agent_slot_loop(&slots[0], slots[0].err, sizeof slots[0].err);
    }
    for (int i = 1; i < started; i++) pthread_join(threads[i], NULL);
    rc = 0;
    for (int i = 0; i < started && rc == 0; i++) {
        if (slots[i].rc == 0) continue;
        snprintf(err, errlen, "%s", slots[i].err);
        rc = -1;
    }
    if (rc == 0) log_info("worker %lld stopped", (long long)a.worker_id);
out:
    if (cfg->remove_work_dir && cfg->work_dir) agent_remove_tree(cfg->work_dir);
    for (int i = 0; i < nslots; i++) {
        if (slots[i].beat_ok) client_cleanup(&slots[i].beat_client);
        if (slots[i].main_ok) client_cleanup(&slots[i].main_client);
    }
    free(slots);
    json_decref(a.queues);
    json_decref(a.gpus);
    pthread_cond_destroy(&a.gpu_freed);
    pthread_mutex_destroy(&a.gpu_lock);
    pthread_mutex_destroy(&a.reg_lock);
    return rc;
}
