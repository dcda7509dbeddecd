/* http.h - the HTTP layer on libmicrohttpd: one thread per connection, so a
 * request waiting on the database (or long-polling for work) never stalls
 * another; routing by path pattern; authentication; bounded request bodies;
 * streamed uploads; problem+json errors.
 *
 * A handler runs once the whole body has arrived and answers with exactly
 * one http_reply_* call. Everything a request holds (its database
 * connection, body, upload) is released when the request completes. */
#ifndef STRATA_HTTP_H
#define STRATA_HTTP_H

#include <jansson.h>
#include <microhttpd.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/util.h"
#include "server/art.h"
#include "server/auth.h"
#include "server/server.h"

enum http_body {
    HTTP_BODY_NONE,   /* ignored (still bounded by STRATA_MAX_BODY) */
    HTTP_BODY_JSON,   /* parsed into req->json (NULL when empty) */
    HTTP_BODY_RESULT, /* JSON too, bounded by STRATA_MAX_RESULT: a long train job's
                         result carries every step's loss */
    HTTP_BODY_TEXT,   /* kept in req->body */
    HTTP_BODY_UPLOAD  /* streamed into req->upload, bounded by STRATA_MAX_UPLOAD */
};

/* Roles allowed on a route; 0 means no token is needed. */
#define HTTP_ADMIN (1u << AUTH_ADMIN)
#define HTTP_USER (1u << AUTH_USER)
#define HTTP_WORKER (1u << AUTH_WORKER)
#define HTTP_ANYONE (HTTP_ADMIN | HTTP_USER | HTTP_WORKER)

typedef struct http_req http_req;

typedef struct {
    const char *method;
    const char *pattern; /* "/api/v1/jobs/{id}/heartbeat": {id} is a positive integer */
    unsigned roles;
    enum http_body body;
    void (*handler)(http_req *req);
    /* Optional check before the body is read (e.g. an upload's name), so a
     * doomed upload is refused before it is written. Returns 0 or replies. */
    int (*precheck)(http_req *req);
} http_route;

struct http_req {
    srv_t *srv;
    struct MHD_Connection *conn;
    const http_route *route;
    int64_t ids[2];   /* the {id} segments, in order */
    auth_user user;   /* valid when the route needs a token */
    json_t *json;     /* HTTP_BODY_JSON */
    buf_t body;       /* HTTP_BODY_TEXT */
    art_upload *upload;
    PGconn *db;       /* from http_db, released at completion */
    int pending_status; /* an error found while the body was arriving */
    char pending_detail[ERR_LEN];
    bool first_done;
    bool responded;
    int status;
    char method[16];
    char path[512];
    double started;
    char location[128];
    /* Called when the connection ended before the reply was delivered, with
     * the request's database connection still available (a claim uses it to
     * give back a job its worker never received). */
    void (*on_abort)(http_req *req);
    int64_t abort_arg;
};

/* Starts the daemon on cfg's bind address and port with routes. Returns NULL
 * with err set on failure. */
struct MHD_Daemon *http_start(srv_t *srv, const http_route *routes, size_t nroutes, char *err,
                              size_t errlen);

/* Replies. Each takes ownership of the JSON it is given. */
void http_reply_json(http_req *req, int status, json_t *doc);
/* Sends JSON text as it is (malloc'd; the reply takes it). */
void http_reply_json_text(http_req *req, int status, char *text);
void http_reply_problem(http_req *req, int status, const char *detail, json_t *errors);
void http_reply_text(http_req *req, int status, const char *content_type, const char *text,
                     size_t len);
void http_reply_empty(http_req *req, int status);
/* Streams size bytes of the open file fd (the response owns and closes it). */
void http_reply_file(http_req *req, int fd, uint64_t size, const char *content_type);
/* Adds a header to the next reply (only Location is needed so far). */
void http_set_location(http_req *req, const char *location);

/* A field error: replies 400 with one {"field", "message"} entry. */
void http_reply_field_error(http_req *req, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The request's database connection, acquired on first use. On failure it
 * replies 503 and returns NULL (the handler just returns). */
PGconn *http_db(http_req *req);
/* Gives the connection back early (long polls must not hold one while idle). */
void http_db_release(http_req *req);

/* True when the client has closed its end of the connection (a worker that
 * gave up a long poll); checked before handing out work it would never read. */
bool http_client_gone(http_req *req);

const char *http_query(http_req *req, const char *key);
const char *http_header(http_req *req, const char *name);

/* Copies len bytes of in to out as valid UTF-8, each invalid byte replaced
 * by U+FFFD; out must hold 3 * len + 1 bytes. Returns the length written
 * (out is NUL-terminated). */
size_t http_utf8_clean(const char *in, size_t len, char *out);

/* Matches a request path against a route pattern segment by segment; each
 * "{id}" takes a positive decimal integer (no sign, no leading zero, no
 * overflow) into ids, in order (at most two). Returns true on a match. */
bool http_match(const char *pattern, const char *path, int64_t ids[2]);

/* Renders strata_http_requests_total into b. Returns 0 or -1 (b full). */
int http_stats_render(buf_t *b);

#endif
