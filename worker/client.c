/* client.c - see client.h. */
#include "client.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"

/* Outage state is process-wide: the agent's threads talk to the same server,
 * and one "server unreachable" line per outage is what an operator wants, not
 * one per thread. */
static pthread_mutex_t client_outage_lock = PTHREAD_MUTEX_INITIALIZER;
static bool client_outage_on;
static double client_outage_start;

/* A transfer's state, shared by the libcurl callbacks of one request. */
typedef struct {
    client *c;
    client_resp *resp;
    const client_req *req;
    FILE *out;           /* download target (temp file), NULL otherwise */
    util_sha256 *hash;   /* of the downloaded bytes */
    int to_file;         /* -1 undecided, 0 body to buffer, 1 body to file */
    bool overflow;       /* answer larger than CLIENT_MAX_BODY */
    int file_errno;      /* local write failure */
    FILE *in;            /* upload source */
} client_xfer;

bool client_status_transient(long status) {
    return status == 429 || status == 502 || status == 503 || status == 504;
}

double client_backoff_seconds(unsigned attempt, double jitter) {
    double delay = 0.25;
    for (unsigned i = 0; i < attempt && delay < CLIENT_BACKOFF_MAX_S; i++) delay *= 2.0;
    if (delay > CLIENT_BACKOFF_MAX_S) delay = CLIENT_BACKOFF_MAX_S;
    if (jitter < 0.0) jitter = 0.0;
    if (jitter >= 1.0) jitter = 0.999999;
    return delay * (1.0 - 0.2 * jitter);
}

int client_normalize_base(const char *url, char *out, size_t outlen, char *err, size_t errlen) {
    if (!url || !*url) return err_set(err, errlen, "the server URL is empty");
    size_t scheme;
    if (strncmp(url, "http://", 7) == 0)
        scheme = 7;
    else if (strncmp(url, "https://", 8) == 0)
        scheme = 8;
    else
        return err_set(err, errlen, "server URL %s must start with http:// or https://", url);
    size_t n = strlen(url);
    while (n > scheme && url[n - 1] == '/') n--;
    if (n == scheme || url[scheme] == '/')
        return err_set(err, errlen, "server URL %s has no host", url);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)url[i];
        if (ch <= 0x20 || ch == 0x7f || ch == '?' || ch == '#')
            return err_set(err, errlen, "server URL %s contains a space, control character, "
                                        "query or fragment", url);
    }
    if (n >= outlen) return err_set(err, errlen, "server URL is too long");
    memcpy(out, url, n);
    out[n] = '\0';
    return 0;
}

int client_build_url(const char *base_url, const char *path, char *out, size_t outlen) {
    if (!path || path[0] != '/') return -1;
    int n = snprintf(out, outlen, "%s%s", base_url, path);
    if (n < 0 || (size_t)n >= outlen) return -1;
    return 0;
}

int client_escape(const char *s, char *out, size_t outlen) {
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        bool keep = (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
                    (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_' || *p == '~';
        size_t need = keep ? 1 : 3;
        if (o + need >= outlen) return -1;
        if (keep) {
            out[o++] = (char)*p;
        } else {
            out[o++] = '%';
            out[o++] = hex[*p >> 4];
            out[o++] = hex[*p & 15];
        }
    }
    if (o >= outlen) return -1;
    out[o] = '\0';
    return 0;
}

/* Reads exactly n decimal digits at *p into *v and advances *p. */
static int client_digits(const char **p, int n, int *v) {
    int x = 0;
    for (int i = 0; i < n; i++) {
        char ch = (*p)[i];
        if (ch < '0' || ch > '9') return -1;
        x = x * 10 + (ch - '0');
    }
    *p += n;
    *v = x;
    return 0;
}

int client_parse_time(const char *s, double *epoch) {
    if (!s) return -1;
    const char *p = s;
    int year, mon, day, hour, min, sec;
    if (client_digits(&p, 4, &year) || *p++ != '-' || client_digits(&p, 2, &mon) ||
        *p++ != '-' || client_digits(&p, 2, &day))
        return -1;
    if (*p != 'T' && *p != 't' && *p != ' ') return -1;
    p++;
    if (client_digits(&p, 2, &hour) || *p++ != ':' || client_digits(&p, 2, &min) ||
        *p++ != ':' || client_digits(&p, 2, &sec))
        return -1;
    if (mon < 1 || mon > 12 || day < 1 || day > 31 || hour > 23 || min > 59 || sec > 60)
        return -1;
    double frac = 0.0;
    if (*p == '.') {
        p++;
        double scale = 0.1;
        if (*p < '0' || *p > '9') return -1;
        while (*p >= '0' && *p <= '9') {
            frac += (*p - '0') * scale;
            scale /= 10.0;
            p++;
        }
    }
    int offset = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int sign = *p == '-' ? -1 : 1;
        int oh, om = 0;
        p++;
        if (client_digits(&p, 2, &oh)) return -1;
        if (*p == ':') p++;
        if (*p && client_digits(&p, 2, &om)) return -1;
        if (oh > 23 || om > 59) return -1;
        offset = sign * (oh * 3600 + om * 60);
    } else {
        return -1;
    }
    if (*p != '\0') return -1;
    struct tm tm = {0};
    tm.tm_year = year - 1900;
    tm.tm_mon = mon - 1;
    tm.tm_mday = day;
    tm.tm_hour = hour;
    tm.tm_min = min;
    tm.tm_sec = sec;
    time_t t = timegm(&tm);
    if (t == (time_t)-1) return -1;
    *epoch = (double)t - offset + frac;
    return 0;
}

/* Appends printf-style text at *used in out, never past outlen. */
static void client_append(char *out, size_t outlen, size_t *used, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void client_append(char *out, size_t outlen, size_t *used, const char *fmt, ...) {
    if (*used + 1 >= outlen) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out + *used, outlen - *used, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    *used += (size_t)n;
    if (*used >= outlen) *used = outlen - 1;
}

void client_problem_text(long status, const char *body, size_t body_len, char *out,
                         size_t outlen) {
    if (outlen == 0) return;
    out[0] = '\0';
    size_t used = 0;
    client_append(out, outlen, &used, "HTTP %ld", status);
    if (!body || body_len == 0) return;
    json_error_t jerr;
    json_t *root = json_loadb(body, body_len, 0, &jerr);
    const char *title = json_string_value(json_object_get(root, "title"));
    const char *detail = json_string_value(json_object_get(root, "detail"));
    if (title || detail) {
        if (title) client_append(out, outlen, &used, " %s", title);
        if (detail) client_append(out, outlen, &used, ": %s", detail);
        /* The first field error is what a user needs to fix a bad request. */
        json_t *first = json_array_get(json_object_get(root, "errors"), 0);
        const char *field = json_string_value(json_object_get(first, "field"));
        const char *message = json_string_value(json_object_get(first, "message"));
        if (field) client_append(out, outlen, &used, " (%s %s)", field, message ? message : "");
    } else {
        /* Not a problem document: the body's first line is the best clue. */
        size_t n = 0;
        while (n < body_len && n < 200 && body[n] != '\n' && body[n] != '\r') n++;
        client_append(out, outlen, &used, ": %.*s", (int)n, body);
    }
    json_decref(root);
    /* Keep it one line: it ends up inside a log record (libpq's messages,
     * passed on in "detail", span lines). */
    for (char *p = out; *p; p++)
        if ((unsigned char)*p < 0x20) *p = ' ';
}

int client_init(client *c, const char *base_url, const char *token, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    if (client_normalize_base(base_url, c->base_url, sizeof c->base_url, err, errlen) != 0)
        return -1;
    if (!token || !*token) return err_set(err, errlen, "the API token is empty");
    for (const char *p = token; *p; p++)
        if ((unsigned char)*p <= 0x20 || *p == 0x7f)
            return err_set(err, errlen, "the API token contains whitespace or control characters");
    int n = snprintf(c->auth_header, sizeof c->auth_header, "Authorization: Bearer %s", token);
    if (n < 0 || (size_t)n >= sizeof c->auth_header)
        return err_set(err, errlen, "the API token is too long");
    c->curl = curl_easy_init();
    if (!c->curl) return err_set(err, errlen, "curl_easy_init failed");
    return 0;
}

void client_cleanup(client *c) {
    if (c->curl) curl_easy_cleanup(c->curl);
    c->curl = NULL;
}

void client_set_worker(client *c, int64_t worker_id) {
    snprintf(c->worker_header, sizeof c->worker_header, "Strata-Worker: %lld",
             (long long)worker_id);
}

void client_resp_free(client_resp *resp) { buf_free(&resp->body); }

static size_t client_on_write(char *data, size_t size, size_t nmemb, void *userdata) {
    client_xfer *x = userdata;
    size_t n = size * nmemb;
    if (x->to_file < 0) {
        /* Body bytes only arrive for the final answer, so its status is known:
         * only a successful answer goes to the file, an error stays readable. */
        long status = 0;
        curl_easy_getinfo(x->c->curl, CURLINFO_RESPONSE_CODE, &status);
        x->to_file = (x->out && status >= 200 && status < 300) ? 1 : 0;
    }
    if (x->to_file == 1) {
        if (fwrite(data, 1, n, x->out) != n) {
            x->file_errno = errno ? errno : EIO;
            return 0;
        }
        util_sha256_update(x->hash, data, n);
        return n;
    }
    if (buf_append(&x->resp->body, data, n) != 0) {
        x->overflow = true;
        return 0;
    }
    return n;
}

static size_t client_on_read(char *data, size_t size, size_t nmemb, void *userdata) {
    client_xfer *x = userdata;
    size_t n = fread(data, 1, size * nmemb, x->in);
    if (n == 0 && ferror(x->in)) {
        x->file_errno = errno ? errno : EIO;
        return CURL_READFUNC_ABORT;
    }
    return n;
}

/* libcurl rewinds the upload when it has to resend it (e.g. a reused
 * connection that the server had closed). */
static int client_on_seek(void *userdata, curl_off_t offset, int origin) {
    client_xfer *x = userdata;
    if (fseeko(x->in, (off_t)offset, origin) != 0) return CURL_SEEKFUNC_CANTSEEK;
    return CURL_SEEKFUNC_OK;
}

static int client_on_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow,
                              curl_off_t ultotal, curl_off_t ulnow) {
    (void)dltotal;
    (void)dlnow;
    (void)ultotal;
    (void)ulnow;
    client_xfer *x = userdata;
    return (x->c->abort && atomic_load(x->c->abort)) ? 1 : 0;
}

static void client_outage_begin(const client *c, const char *why) {
    pthread_mutex_lock(&client_outage_lock);
    if (!client_outage_on) {
        client_outage_on = true;
        client_outage_start = util_now_seconds();
        log_warn("server %s unavailable (%s); retrying until it is back", c->base_url, why);
    }
    pthread_mutex_unlock(&client_outage_lock);
}

static void client_outage_end(const client *c) {
    pthread_mutex_lock(&client_outage_lock);
    if (client_outage_on) {
        client_outage_on = false;
        log_info("server %s is back after %.1f s", c->base_url,
                 util_now_seconds() - client_outage_start);
    }
    pthread_mutex_unlock(&client_outage_lock);
}

/* Whether a libcurl failure is about the network or the server (retry) as
 * opposed to our own request or machine (do not). */
static bool client_code_transient(CURLcode code) {
    switch (code) {
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
    case CURLE_NOT_BUILT_IN:
    case CURLE_OUT_OF_MEMORY:
    case CURLE_BAD_FUNCTION_ARGUMENT:
    case CURLE_ABORTED_BY_CALLBACK:
    case CURLE_WRITE_ERROR:
    case CURLE_READ_ERROR:
    case CURLE_FILESIZE_EXCEEDED:
        return false;
    default:
        return true;
    }
}

/* Builds the header list for req. Returns NULL when out of memory. */
static struct curl_slist *client_headers(const client *c, const client_req *req) {
    struct curl_slist *h = NULL, *next;
    char ctype[256];
    if (req->content_type)
        snprintf(ctype, sizeof ctype, "Content-Type: %s", req->content_type);
    else
        snprintf(ctype, sizeof ctype, "Content-Type:"); /* no default form type */
    const char *lines[] = {c->auth_header, "Accept: application/json, application/problem+json, */*",
                           "Expect:", ctype,
                           (req->worker_header && c->worker_header[0]) ? c->worker_header : NULL};
    for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++) {
        if (!lines[i]) continue;
        next = curl_slist_append(h, lines[i]);
        if (!next) {
            curl_slist_free_all(h);
            return NULL;
        }
        h = next;
    }
    return h;
}

/* Opens the download's temp file next to its destination. */
static int client_open_download(const char *path, char *tmp, size_t tmplen, FILE **out,
                                char *err, size_t errlen) {
    int n = snprintf(tmp, tmplen, "%s.part", path);
    if (n < 0 || (size_t)n >= tmplen) return err_set(err, errlen, "path too long: %s", path);
    *out = fopen(tmp, "wb");
    if (!*out) return err_set(err, errlen, "create %s: %s", tmp, strerror(errno));
    return 0;
}

int client_perform(client *c, const client_req *req, client_resp *resp, char *err,
                   size_t errlen) {
    int rc = -1;
    struct curl_slist *headers = NULL;
    client_xfer x = {.c = c, .resp = resp, .req = req, .to_file = -1};
    char url[4096], tmp[4200] = "";
    char curl_err[CURL_ERROR_SIZE] = "";
    resp->status = 0;
    resp->transient = false;
    resp->aborted = false;
    resp->corrupt = false;
    buf_init(&resp->body, CLIENT_MAX_BODY);

    if (client_build_url(c->base_url, req->path, url, sizeof url) != 0) {
        err_set(err, errlen, "bad request path %s", req->path);
        goto out;
    }
    headers = client_headers(c, req);
    if (!headers) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    if (req->download_path) {
        if (client_open_download(req->download_path, tmp, sizeof tmp, &x.out, err, errlen) != 0)
            goto out;
        x.hash = util_sha256_new();
        if (!x.hash) {
            err_set(err, errlen, "out of memory");
            goto out;
        }
    }

    CURL *h = c->curl;
    /* reset keeps the connection cache, so keep-alive survives it. */
    curl_easy_reset(h);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, CLIENT_CONNECT_TIMEOUT_S);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, req->timeout_s > 0 ? req->timeout_s : CLIENT_CALL_TIMEOUT_S);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, curl_err);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, client_on_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &x);
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, client_on_progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, &x);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "strata-worker/1");
    if (req->upload_path || req->download_path) {
        /* A big transfer may take long; a stalled one should not. */
        curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
        curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, 120L);
    }

    if (req->upload_path) {
        x.in = fopen(req->upload_path, "rb");
        struct stat st;
        if (!x.in || fstat(fileno(x.in), &st) != 0) {
            err_set(err, errlen, "open %s: %s", req->upload_path, strerror(errno));
            goto out;
        }
        curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, req->method);
        curl_easy_setopt(h, CURLOPT_READFUNCTION, client_on_read);
        curl_easy_setopt(h, CURLOPT_READDATA, &x);
        curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, client_on_seek);
        curl_easy_setopt(h, CURLOPT_SEEKDATA, &x);
        curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)st.st_size);
    } else if (strcmp(req->method, "GET") == 0) {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    } else {
        curl_easy_setopt(h, CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, req->body ? (const char *)req->body : "");
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(req->body ? req->body_len : 0));
        if (strcmp(req->method, "POST") != 0)
            curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, req->method);
    }

    CURLcode code = curl_easy_perform(h);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &resp->status);
    if (code != CURLE_OK) {
        if (x.overflow)
            err_set(err, errlen, "%s %s: answer larger than %zu bytes", req->method, req->path,
                    CLIENT_MAX_BODY);
        else if (x.file_errno)
            err_set(err, errlen, "%s %s: local file: %s", req->method, req->path,
                    strerror(x.file_errno));
        else if (code == CURLE_ABORTED_BY_CALLBACK) {
            resp->aborted = true;
            err_set(err, errlen, "%s %s: aborted", req->method, req->path);
        } else {
            resp->transient = client_code_transient(code);
            err_set(err, errlen, "%s %s: %s", req->method, req->path,
                    curl_err[0] ? curl_err : curl_easy_strerror(code));
        }
        if (resp->transient) client_outage_begin(c, err);
        goto out;
    }
    if (client_status_transient(resp->status)) {
        char problem[512];
        client_problem_text(resp->status, resp->body.data, resp->body.len, problem, sizeof problem);
        err_set(err, errlen, "%s %s: %s", req->method, req->path, problem);
        resp->transient = true;
        client_outage_begin(c, err);
        goto out;
    }
    client_outage_end(c);

    if (x.out) {
        bool ok = resp->status >= 200 && resp->status < 300;
        FILE *f = x.out;
        x.out = NULL;
        if (fclose(f) != 0 && ok) {
            err_set(err, errlen, "write %s: %s", tmp, strerror(errno));
            goto out;
        }
        if (ok) {
            char got[SHA256_HEX_LEN];
            util_sha256 *hash = x.hash;
            x.hash = NULL;
            util_sha256_final(hash, got);
            if (req->expect_sha256 && strcmp(got, req->expect_sha256) != 0) {
                resp->corrupt = true;
                err_set(err, errlen, "%s: SHA-256 %s does not match the artifact's %s",
                        req->path, got, req->expect_sha256);
                goto out;
            }
            if (rename(tmp, req->download_path) != 0) {
                err_set(err, errlen, "rename %s: %s", tmp, strerror(errno));
                goto out;
            }
            tmp[0] = '\0';
        }
    }
    rc = 0;
out:
    if (x.out) fclose(x.out);
    if (tmp[0]) unlink(tmp);
    util_sha256_free(x.hash);
    if (x.in) fclose(x.in);
    curl_slist_free_all(headers);
    if (c->curl) {
        /* Do not leave pointers to this stack frame in the handle. */
        curl_easy_setopt(c->curl, CURLOPT_ERRORBUFFER, NULL);
        curl_easy_setopt(c->curl, CURLOPT_HTTPHEADER, NULL);
    }
    return rc;
}

int client_json(client *c, const char *method, const char *path, json_t *body,
                bool worker_header, long timeout_s, long *status, json_t **out,
                bool *transient, char *err, size_t errlen) {
    int rc = -1;
    char *text = NULL;
    client_resp resp = {0};
    *out = NULL;
    *status = 0;
    if (transient) *transient = false;
    if (body) {
        text = json_dumps(body, JSON_COMPACT);
        if (!text) return err_set(err, errlen, "cannot encode the request body");
    }
    client_req req = {.method = method,
                      .path = path,
                      .content_type = text ? "application/json" : NULL,
                      .body = text,
                      .body_len = text ? strlen(text) : 0,
                      .timeout_s = timeout_s,
                      .worker_header = worker_header};
    if (client_perform(c, &req, &resp, err, errlen) != 0) {
        *status = resp.status;
        if (transient) *transient = resp.transient;
        goto out;
    }
    *status = resp.status;
    if (resp.status < 200 || resp.status >= 300) {
        char problem[512];
        client_problem_text(resp.status, resp.body.data, resp.body.len, problem, sizeof problem);
        err_set(err, errlen, "%s %s: %s", method, path, problem);
        rc = 0;
        goto out;
    }
    if (resp.body.len > 0) {
        json_error_t jerr;
        *out = json_loadb(resp.body.data, resp.body.len, 0, &jerr);
        if (!*out) {
            err_set(err, errlen, "%s %s: answer is not JSON: %s", method, path, jerr.text);
            goto out;
        }
    }
    rc = 0;
out:
    free(text);
    client_resp_free(&resp);
    return rc;
}
