/* http.c - see http.h. */
#include "http.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"

/* The daemon's closure: the shared state and the routing table. */
typedef struct {
    srv_t *srv;
    const http_route *routes;
    size_t nroutes;
} http_ctx;

static http_ctx http_context;

/* --- request counters for /metrics ---------------------------------------- */

#define HTTP_STATS_MAX 512

typedef struct {
    const char *route; /* a pattern from the table (static), or "unmatched" */
    int status;
    uint64_t count;
} http_stat;

static pthread_mutex_t http_stats_lock = PTHREAD_MUTEX_INITIALIZER;
static http_stat http_stats[HTTP_STATS_MAX];
static size_t http_nstats;

/* Counts one answered request. route is a pattern from the static table, so
 * the set of label values stays small whatever paths clients send. */
static void http_stats_count(const char *route, int status) {
    pthread_mutex_lock(&http_stats_lock);
    size_t i;
    for (i = 0; i < http_nstats; i++)
        if (http_stats[i].status == status && strcmp(http_stats[i].route, route) == 0) break;
    if (i == http_nstats && http_nstats < HTTP_STATS_MAX) {
        http_stats[i].route = route;
        http_stats[i].status = status;
        http_stats[i].count = 0;
        http_nstats++;
    }
    if (i < http_nstats) http_stats[i].count++;
    pthread_mutex_unlock(&http_stats_lock);
}

int http_stats_render(buf_t *b) {
    int rc = 0;
    pthread_mutex_lock(&http_stats_lock);
    rc |= buf_printf(b, "# HELP strata_http_requests_total HTTP requests by route and status.\n"
                        "# TYPE strata_http_requests_total counter\n");
    for (size_t i = 0; i < http_nstats && rc == 0; i++)
        rc |= buf_printf(b, "strata_http_requests_total{route=\"%s\",status=\"%d\"} %llu\n",
                         http_stats[i].route, http_stats[i].status,
                         (unsigned long long)http_stats[i].count);
    pthread_mutex_unlock(&http_stats_lock);
    return rc ? -1 : 0;
}

/* --- text ------------------------------------------------------------------ */

size_t http_utf8_clean(const char *in, size_t len, char *out) {
    static const char replacement[] = "\xEF\xBF\xBD";
    const unsigned char *s = (const unsigned char *)in;
    size_t i = 0, o = 0;
    while (i < len) {
        unsigned char c = s[i];
        size_t n = 0;
        uint32_t cp = 0, min = 0;
        if (c < 0x80) {
            out[o++] = (char)c;
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            n = 1, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            n = 2, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            n = 3, cp = c & 0x07, min = 0x10000;
        }
        bool ok = n > 0;
        for (size_t k = 1; ok && k <= n; k++) {
            if (i + k >= len || (s[i + k] & 0xC0) != 0x80)
                ok = false;
            else
                cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        /* overlong forms, surrogates and values past U+10FFFF are invalid too */
        if (ok && (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) ok = false;
        if (ok) {
            memcpy(out + o, s + i, n + 1);
            o += n + 1;
            i += n + 1;
        } else {
            memcpy(out + o, replacement, 3);
            o += 3;
            i++;
        }
    }
    out[o] = '\0';
    return o;
}

/* --- replies ---------------------------------------------------------------- */

/* Queues resp with status, adding the common headers; takes resp. */
static void http_queue(http_req *req, int status, struct MHD_Response *resp,
                       const char *content_type) {
    if (req->responded || !resp) {
        if (resp) MHD_destroy_response(resp);
        if (!req->responded) log_error("out of memory building a response");
        return;
    }
    if (content_type) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    if (req->location[0]) MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, req->location);
    /* an error answered before the body was read leaves unread bytes behind */
    if (!req->first_done || req->pending_status)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    if (MHD_queue_response(req->conn, (unsigned)status, resp) != MHD_YES)
        log_warn("could not queue the %d response to %s %s", status, req->method, req->path);
    MHD_destroy_response(resp);
    req->responded = true;
    req->status = status;
}

void http_reply_text(http_req *req, int status, const char *content_type, const char *text,
                     size_t len) {
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, (void *)text, MHD_RESPMEM_MUST_COPY);
    http_queue(req, status, resp, content_type);
}

void http_reply_json(http_req *req, int status, json_t *doc) {
    char *text = doc ? json_dumps(doc, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    json_decref(doc);
    if (!text) {
        const char *oom = "{\"type\":\"about:blank\",\"title\":\"Internal Server Error\","
                          "\"status\":500,\"detail\":\"out of memory\",\"errors\":[]}";
        http_reply_text(req, 500, "application/problem+json", oom, strlen(oom));
        return;
    }
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    if (!resp) free(text);
    http_queue(req, status, resp, "application/json");
}

void http_reply_json_text(http_req *req, int status, char *text) {
    if (!text) {
        http_reply_problem(req, 500, "out of memory", NULL);
        return;
    }
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    if (!resp) free(text);
    http_queue(req, status, resp, "application/json");
}

void http_reply_problem(http_req *req, int status, const char *detail, json_t *errors) {
    const char *title = MHD_get_reason_phrase_for((unsigned)status);
    /* the detail may quote the request (a path, a name): keep it valid JSON */
    char clean[ERR_LEN * 3 + 1];
    const char *d = detail ? detail : "";
    size_t dlen = strnlen(d, ERR_LEN);
    http_utf8_clean(d, dlen, clean);
    json_t *doc = json_pack("{s:s, s:s, s:i, s:s, s:o}", "type", "about:blank", "title",
                            title && *title ? title : "Error", "status", status, "detail", clean,
                            "errors", errors ? errors : json_array());
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    if (!text) {
        http_reply_text(req, status, "application/problem+json", "{}", 2);
        return;
    }
    if (status >= 500)
        log_warn("%s %s -> %d: %s", req->method, req->path, status, detail ? detail : "");
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    if (!resp) free(text);
    http_queue(req, status, resp, "application/problem+json");
}

void http_reply_field_error(http_req *req, const char *field, const char *fmt, ...) {
    char message[ERR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    char detail[ERR_LEN + 160];
    snprintf(detail, sizeof detail, "%s: %s", field, message);
    json_t *errors = json_pack("[{s:s, s:s}]", "field", field, "message", message);
    http_reply_problem(req, 400, detail, errors);
}

void http_reply_empty(http_req *req, int status) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
    http_queue(req, status, resp, NULL);
}

void http_reply_file(http_req *req, int fd, uint64_t size, const char *content_type) {
    struct MHD_Response *resp = MHD_create_response_from_fd64(size, fd);
    if (!resp) close(fd);
    http_queue(req, 200, resp, content_type);
}

void http_set_location(http_req *req, const char *location) {
    snprintf(req->location, sizeof req->location, "%s", location);
}

PGconn *http_db(http_req *req) {
    if (req->db) return req->db;
    char err[ERR_LEN];
    req->db = db_acquire(req->srv->pool, err, sizeof err);
    if (!req->db) http_reply_problem(req, 503, err, NULL);
    return req->db;
}

void http_db_release(http_req *req) {
    if (!req->db) return;
    db_release(req->srv->pool, req->db);
    req->db = NULL;
}

const char *http_query(http_req *req, const char *key) {
    return MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, key);
}

const char *http_header(http_req *req, const char *name) {
    return MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, name);
}

/* --- routing -------------------------------------------------------------- */

bool http_match(const char *pattern, const char *path, int64_t ids[2]) {
    int nids = 0;
    const char *p = pattern, *u = path;
    while (*p && *u) {
        if (*p != '/' || *u != '/') return false;
        p++;
        u++;
        size_t plen = strcspn(p, "/"), ulen = strcspn(u, "/");
        if (plen == 4 && strncmp(p, "{id}", 4) == 0) {
            char digits[24];
            if (ulen == 0 || ulen >= sizeof digits || nids >= 2) return false;
            memcpy(digits, u, ulen);
            digits[ulen] = '\0';
            /* strtoll alone would also take "+1" and " 1" */
            if (strspn(digits, "0123456789") != ulen || digits[0] == '0' ||
                util_parse_i64(digits, 1, INT64_MAX, &ids[nids]) != 0)
                return false;
            nids++;
        } else if (plen != ulen || strncmp(p, u, plen) != 0) {
            return false;
        }
        p += plen;
        u += ulen;
    }
    return *p == '\0' && *u == '\0';
}

/* Finds the route for method and path. *path_known tells whether some route
 * has this path (so a miss is 405, not 404). */
static const http_route *http_route_find(const char *method, const char *path, int64_t ids[2],
                                         bool *path_known) {
    *path_known = false;
    for (size_t i = 0; i < http_context.nroutes; i++) {
        const http_route *r = &http_context.routes[i];
        int64_t found[2] = {0, 0};
        if (!http_match(r->pattern, path, found)) continue;
        *path_known = true;
        if (strcmp(r->method, method) == 0) {
            ids[0] = found[0];
            ids[1] = found[1];
            return r;
        }
    }
    return NULL;
}

/* Checks the bearer token and the route's roles. Returns 0, or replies. */
static int http_authenticate(http_req *req) {
    const char *auth = http_header(req, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!auth || strncasecmp(auth, "Bearer ", 7) != 0) {
        http_reply_problem(req, 401, "missing bearer token (Authorization: Bearer TOKEN)", NULL);
        return -1;
    }
    const char *token = auth + 7;
    while (*token == ' ') token++;
    PGconn *db = http_db(req);
    if (!db) return -1;
    char err[ERR_LEN];
    int found = auth_lookup(db, token, &req->user, err, sizeof err);
    if (found < 0) {
        http_reply_problem(req, db_is_down(db) ? 503 : 500, err, NULL);
        return -1;
    }
    if (!found) {
        http_reply_problem(req, 401, "invalid token", NULL);
        return -1;
    }
    if (!(req->route->roles & (1u << req->user.role))) {
        char detail[ERR_LEN];
        snprintf(detail, sizeof detail, "role %s may not %s %s", auth_role_name(req->user.role),
                 req->method, req->route->pattern);
        http_reply_problem(req, 403, detail, NULL);
        return -1;
    }
    return 0;
}

/* The first call for a request: route, authenticate, check the announced
 * size, run the route's precheck and open the upload. Any failure replies at
 * once (before the body is read). */
/* The most bytes a route's body may have: uploads and job results have their
 * own limits, everything else STRATA_MAX_BODY. */
static int64_t http_body_limit(const http_req *req) {
    switch (req->route->body) {
    case HTTP_BODY_UPLOAD: return req->srv->cfg->max_upload;
    case HTTP_BODY_RESULT: return req->srv->cfg->max_result;
    default: return req->srv->cfg->max_body;
    }
}

static void http_begin(http_req *req) {
    srv_t *srv = req->srv;
    bool path_known;
    req->route = http_route_find(req->method, req->path, req->ids, &path_known);
    if (!req->route) {
        char detail[700];
        snprintf(detail, sizeof detail, "%s %s", path_known ? "method not allowed for" : "no route",
                 req->path);
        http_reply_problem(req, path_known ? 405 : 404, detail, NULL);
        return;
    }
    if (req->route->roles && http_authenticate(req) != 0) return;
    int64_t limit = http_body_limit(req);
    const char *length = http_header(req, MHD_HTTP_HEADER_CONTENT_LENGTH);
    int64_t announced;
    if (length && util_parse_i64(length, 0, INT64_MAX, &announced) == 0 && announced > limit) {
        char detail[128];
        snprintf(detail, sizeof detail, "body of %lld bytes is over the limit of %lld",
                 (long long)announced, (long long)limit);
        http_reply_problem(req, 413, detail, NULL);
        return;
    }
    if (req->route->precheck && req->route->precheck(req) != 0) return;
    buf_init(&req->body, (size_t)limit);
    if (req->route->body == HTTP_BODY_UPLOAD) {
        char err[ERR_LEN];
        req->upload = art_upload_begin(srv->cfg->tmp_dir, err, sizeof err);
        if (!req->upload) http_reply_problem(req, 500, err, NULL);
    }
    /* A database connection is not held while the body streams in. */
    http_db_release(req);
}

/* Takes one piece of the body. Errors are remembered and answered once the
 * body is over (libmicrohttpd only accepts a reply between requests' data). */
static void http_body_data(http_req *req, const char *data, size_t len) {
    if (req->responded || req->pending_status) return;
    if (req->route->body == HTTP_BODY_UPLOAD) {
        if (art_upload_size(req->upload) + len > (uint64_t)req->srv->cfg->max_upload) {
            req->pending_status = 413;
            snprintf(req->pending_detail, sizeof req->pending_detail,
                     "upload is over the limit of %lld bytes",
                     (long long)req->srv->cfg->max_upload);
            art_upload_abort(req->upload);
            req->upload = NULL;
            return;
        }
        if (art_upload_write(req->upload, data, len, req->pending_detail,
                             sizeof req->pending_detail) != 0) {
            req->pending_status = 500;
            art_upload_abort(req->upload);
            req->upload = NULL;
        }
        return;
    }
    if (buf_append(&req->body, data, len) != 0) {
        req->pending_status = 413;
        snprintf(req->pending_detail, sizeof req->pending_detail,
                 "body is over the limit of %lld bytes", (long long)http_body_limit(req));
    }
}

/* The body is complete: parse it as the route wants and run the handler. */
static void http_finish(http_req *req) {
    if (req->pending_status) {
        http_reply_problem(req, req->pending_status, req->pending_detail, NULL);
        return;
    }
    if ((req->route->body == HTTP_BODY_JSON || req->route->body == HTTP_BODY_RESULT) &&
        req->body.len > 0) {
        json_error_t jerr;
        req->json = json_loadb(req->body.data, req->body.len, JSON_REJECT_DUPLICATES, &jerr);
        if (!req->json) {
            char detail[ERR_LEN];
            snprintf(detail, sizeof detail, "malformed JSON at line %d column %d: %s", jerr.line,
                     jerr.column, jerr.text);
            http_reply_problem(req, 400, detail, NULL);
            return;
        }
        if (!json_is_object(req->json)) {
            http_reply_problem(req, 400, "the body must be a JSON object", NULL);
            return;
        }
    }
    req->route->handler(req);
    if (!req->responded) http_reply_problem(req, 500, "the handler gave no answer", NULL);
}

static enum MHD_Result http_access(void *cls, struct MHD_Connection *conn, const char *url,
                                   const char *method, const char *version,
                                   const char *upload_data, size_t *upload_data_size,
                                   void **con_cls) {
    (void)cls;
    (void)version;
    http_req *req = *con_cls;
    if (!req) {
        req = calloc(1, sizeof *req);
        if (!req) return MHD_NO;
        *con_cls = req;
        req->srv = http_context.srv;
        req->conn = conn;
        req->started = util_now_seconds();
        snprintf(req->method, sizeof req->method, "%s", method);
        snprintf(req->path, sizeof req->path, "%s", url);
        atomic_fetch_add(&req->srv->in_flight, 1);
        if (strlen(url) >= sizeof req->path) {
            http_reply_problem(req, 404, "path too long", NULL);
        } else {
            http_begin(req);
        }
        req->first_done = true;
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        http_body_data(req, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (!req->responded) http_finish(req);
    return MHD_YES;
}

/* Frees what a request held, logs it and counts it. */
static void http_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                           enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)conn;
    http_req *req = *con_cls;
    if (!req) return;
    *con_cls = NULL;
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && req->on_abort) req->on_abort(req);
    http_db_release(req);
    art_upload_abort(req->upload);
    json_decref(req->json);
    buf_free(&req->body);
    int status = req->responded ? req->status : 0;
    http_stats_count(req->route ? req->route->pattern : "unmatched", status);
    log_debug("%s %s -> %d (%.1f ms)%s", req->method, req->path, status,
              (util_now_seconds() - req->started) * 1000.0,
              toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : " (connection ended early)");
    atomic_fetch_sub(&req->srv->in_flight, 1);
    free(req);
}

bool http_client_gone(http_req *req) {
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(req->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!info) return false;
    struct pollfd pfd = {.fd = info->connect_fd, .events = POLLIN | POLLRDHUP};
    if (poll(&pfd, 1, 0) <= 0) return false;
    if (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR)) return true;
    /* Readable without hang-up: a pipelined request (still there) or EOF. */
    char byte;
    ssize_t n = recv(info->connect_fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0;
}

struct MHD_Daemon *http_start(srv_t *srv, const http_route *routes, size_t nroutes, char *err,
                              size_t errlen) {
    http_context.srv = srv;
    http_context.routes = routes;
    http_context.nroutes = nroutes;

    struct sockaddr_in addr4;
    struct sockaddr_in6 addr6;
    struct sockaddr *addr;
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_ITC | MHD_USE_ERROR_LOG;
    memset(&addr4, 0, sizeof addr4);
    memset(&addr6, 0, sizeof addr6);
    if (inet_pton(AF_INET, srv->cfg->bind, &addr4.sin_addr) == 1) {
        addr4.sin_family = AF_INET;
        addr4.sin_port = htons((uint16_t)srv->cfg->port);
        addr = (struct sockaddr *)&addr4;
    } else if (inet_pton(AF_INET6, srv->cfg->bind, &addr6.sin6_addr) == 1) {
        addr6.sin6_family = AF_INET6;
        addr6.sin6_port = htons((uint16_t)srv->cfg->port);
        addr = (struct sockaddr *)&addr6;
        flags |= MHD_USE_IPv6;
    } else {
        err_set(err, errlen, "STRATA_BIND=%s is not an IPv4 or IPv6 address", srv->cfg->bind);
        return NULL;
    }
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, (uint16_t)srv->cfg->port, NULL, NULL, http_access, NULL,
        MHD_OPTION_SOCK_ADDR, addr, MHD_OPTION_NOTIFY_COMPLETED, http_completed, NULL,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120, MHD_OPTION_LISTENING_ADDRESS_REUSE,
        (unsigned)1, MHD_OPTION_END);
    if (!d)
        err_set(err, errlen, "cannot listen on %s:%d: %s", srv->cfg->bind, srv->cfg->port,
                strerror(errno));
    return d;
}
