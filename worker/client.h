/* client.h - the worker's HTTP client for the strata API (libcurl).
 *
 * One client wraps one CURL easy handle, so connections are kept alive between
 * calls; a handle belongs to one thread at a time (libcurl easy handles are not
 * shared between threads), so the agent keeps one client per thread.
 * curl_global_init must have been called once, in main, before client_init.
 *
 * Every call is bounded: connect timeout 5 s, a total timeout chosen per call,
 * response bodies capped at CLIENT_MAX_BODY. Downloads and uploads stream
 * between the socket and a file and never hold the file in memory.
 *
 * Failures fall in two classes. A transient one (the server is down, the
 * connection dropped, 502/503/504/429) may succeed later: the caller retries
 * with client_backoff_seconds. Anything else (4xx, a local file error, an
 * oversized answer, an abort) is final. A client logs the start and the end of
 * an outage once each, not once per attempt. */
#ifndef STRATA_CLIENT_H
#define STRATA_CLIENT_H

#include <curl/curl.h>
#include <jansson.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/util.h"

#define CLIENT_MAX_BODY ((size_t)16 << 20) /* largest JSON/text answer we accept */
#define CLIENT_CONNECT_TIMEOUT_S 5L
#define CLIENT_CALL_TIMEOUT_S 60L          /* ordinary JSON calls */
#define CLIENT_TRANSFER_TIMEOUT_S 86400L   /* file transfers; stalls end sooner */
#define CLIENT_BACKOFF_MAX_S 5.0

typedef struct {
    CURL *curl;
    char base_url[1024];  /* without a trailing slash */
    char auth_header[1100]; /* "Authorization: Bearer TOKEN" */
    char worker_header[64]; /* "Strata-Worker: ID", or "" before registration */
    /* While *abort is non-zero, transfers stop within about a second
     * (xferinfo callback). NULL: never aborted. Set per call by the caller. */
    atomic_int *abort;
    /* Outage bookkeeping, so an outage is logged once. */
    bool in_outage;
    double outage_since;
} client;

/* One request. Exactly one body source: body/body_len, upload_path, or none. */
typedef struct {
    const char *method;       /* "GET" or "POST" */
    const char *path;         /* "/api/v1/..." with any query, already escaped */
    const char *content_type; /* of the body; NULL when there is none */
    const void *body;
    size_t body_len;
    const char *upload_path;  /* stream this file as the body */
    const char *download_path; /* on 2xx, stream the answer into this file */
    const char *expect_sha256; /* with download_path: verify (hex), NULL to skip */
    long timeout_s;           /* total; 0 means CLIENT_CALL_TIMEOUT_S */
    bool worker_header;       /* send Strata-Worker */
} client_req;

typedef struct {
    long status;      /* HTTP status; 0 when no answer arrived */
    bool transient;   /* failure that a later retry may fix */
    bool aborted;     /* stopped because *client.abort was set */
    bool corrupt;     /* download's SHA-256 differed from expect_sha256 */
    buf_t body;       /* answer body (not for successful downloads); caller frees */
} client_resp;

/* Sets up c for the server at base_url (http:// or https://) with token.
 * Returns 0, or -1 with err set (bad URL, token too long, curl init failed).
 * Release with client_cleanup. */
int client_init(client *c, const char *base_url, const char *token, char *err, size_t errlen);
void client_cleanup(client *c);

/* Records the worker id sent in Strata-Worker on calls that ask for it. */
void client_set_worker(client *c, int64_t worker_id);

/* Joins the base URL and path ("/api/v1/...") into out. Returns 0, or -1 when
 * out is too small or path does not start with '/'. */
int client_build_url(const char *base_url, const char *path, char *out, size_t outlen);

/* Normalises a server URL into out: requires http:// or https:// and a host,
 * drops trailing slashes. Returns 0, or -1 with err set. */
int client_normalize_base(const char *url, char *out, size_t outlen, char *err, size_t errlen);

/* URL-escapes s (RFC 3986 unreserved characters kept) into out. Returns 0, or
 * -1 when out is too small. */
int client_escape(const char *s, char *out, size_t outlen);

/* Performs req. Returns 0 when the server answered with a status that is not
 * transient (the caller checks resp->status, 2xx or not); -1 otherwise, with
 * err set and resp->transient / resp->aborted telling why. resp->body holds
 * the answer in both cases; the caller frees it with client_resp_free. */
int client_perform(client *c, const client_req *req, client_resp *resp, char *err,
                   size_t errlen);
void client_resp_free(client_resp *resp);

/* A JSON call: sends body (may be NULL: no body) and, on a 2xx answer with a
 * JSON body, sets *out (caller owns; NULL for an empty answer). Returns as
 * client_perform; *status gets the HTTP status. A non-2xx answer returns 0
 * with *out NULL and err holding the problem's text. A 2xx answer that is not
 * valid JSON returns -1 (not transient). */
int client_json(client *c, const char *method, const char *path, json_t *body,
                bool worker_header, long timeout_s, long *status, json_t **out,
                bool *transient, char *err, size_t errlen);

/* Writes a one-line description of an error answer into out: the
 * problem+json "title: detail" when there is one, else the first bytes of the
 * body, else "HTTP status". */
void client_problem_text(long status, const char *body, size_t body_len, char *out,
                         size_t outlen);

/* Whether an HTTP status means "try again later". */
bool client_status_transient(long status);

/* Seconds to wait before retry number attempt (0-based): 0.25 s doubling up
 * to CLIENT_BACKOFF_MAX_S; jitter in [0, 1) spreads it by up to -20 %, so
 * workers that lost the same server do not return in lockstep. */
double client_backoff_seconds(unsigned attempt, double jitter);

/* Parses an RFC 3339 time ("2026-11-28T10:00:00.123456Z" or with an offset
 * such as "+00:00") into seconds since the epoch. Returns 0, or -1. */
int client_parse_time(const char *s, double *epoch);

#endif
