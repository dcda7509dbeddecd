/* test_client.c - the worker's HTTP client and the agent's pure helpers.
 *
 * The transfer tests run the real client against a small libmicrohttpd
 * server started in the test on a free port, so headers, streaming
 * upload/download, checksum checks, error classification and aborts are
 * exercised over real sockets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "worker/agent.h"
#include "worker/runner.h"
#include "worker/client.h"

/* ---- pure helpers ---- */

static void test_normalize_base(void **state) {
    (void)state;
    char out[128], err[ERR_LEN];
    assert_int_equal(client_normalize_base("http://127.0.0.1:8080//", out, sizeof out, err,
                                           sizeof err), 0);
    assert_string_equal(out, "http://127.0.0.1:8080");
    assert_int_equal(client_normalize_base("https://strata.lab/base/", out, sizeof out, err,
                                           sizeof err), 0);
    assert_string_equal(out, "https://strata.lab/base");
    assert_int_equal(client_normalize_base("ftp://x", out, sizeof out, err, sizeof err), -1);
    assert_non_null(strstr(err, "http://"));
    assert_int_equal(client_normalize_base("http://", out, sizeof out, err, sizeof err), -1);
    assert_int_equal(client_normalize_base("http:///x", out, sizeof out, err, sizeof err), -1);
    assert_int_equal(client_normalize_base("http://a b", out, sizeof out, err, sizeof err), -1);
    assert_int_equal(client_normalize_base("http://h/?q=1", out, sizeof out, err, sizeof err), -1);
    assert_int_equal(client_normalize_base("http://host:1", out, 8, err, sizeof err), -1);
}

static void test_build_url(void **state) {
    (void)state;
    char out[64];
    assert_int_equal(client_build_url("http://h:1", "/api/v1/jobs/7", out, sizeof out), 0);
    assert_string_equal(out, "http://h:1/api/v1/jobs/7");
    assert_int_equal(client_build_url("http://h:1", "api/v1", out, sizeof out), -1);
    assert_int_equal(client_build_url("http://h:1", "/0123456789012345678901234567890123456789"
                                                    "0123456789012345678901234567890123456789",
                                      out, sizeof out), -1);
}

static void test_escape(void **state) {
    (void)state;
    char out[64];
    assert_int_equal(client_escape("hidden_states_3.npy", out, sizeof out), 0);
    assert_string_equal(out, "hidden_states_3.npy");
    assert_int_equal(client_escape("a b&c=d/é", out, sizeof out), 0);
    assert_string_equal(out, "a%20b%26c%3Dd%2F%C3%A9");
    assert_int_equal(client_escape("abc", out, 4), 0);
    assert_int_equal(client_escape("abcd", out, 4), -1);
    assert_int_equal(client_escape(" ", out, 3), -1);
}

static void test_parse_time(void **state) {
    (void)state;
    double t;
    assert_int_equal(client_parse_time("2026-11-28T10:00:00Z", &t), 0);
    assert_true(t == 1795860000.0);
    assert_int_equal(client_parse_time("2026-11-28T10:00:00.250000Z", &t), 0);
    assert_true(t > 1795860000.249 && t < 1795860000.251);
    assert_int_equal(client_parse_time("2026-11-28T12:30:00+02:30", &t), 0);
    assert_true(t == 1795860000.0);
    assert_int_equal(client_parse_time("2026-11-28 09:00:00-01", &t), 0);
    assert_true(t == 1795860000.0);
    assert_int_equal(client_parse_time("2026-11-28T10:00:00", &t), -1);
    assert_int_equal(client_parse_time("2026-13-28T10:00:00Z", &t), -1);
    assert_int_equal(client_parse_time("2026-11-28T10:00:00Zjunk", &t), -1);
    assert_int_equal(client_parse_time("2026-11-28T10:00:00.Z", &t), -1);
    assert_int_equal(client_parse_time("", &t), -1);
}

static void test_problem_text(void **state) {
    (void)state;
    char out[256];
    const char *p = "{\"type\":\"about:blank\",\"title\":\"Bad Request\",\"status\":400,"
                    "\"detail\":\"invalid spec\",\"errors\":[{\"field\":\"spec.x\","
                    "\"message\":\"is required\"}]}";
    client_problem_text(400, p, strlen(p), out, sizeof out);
    assert_string_equal(out, "HTTP 400 Bad Request: invalid spec (spec.x is required)");
    client_problem_text(409, "{\"title\":\"Conflict\"}", 20, out, sizeof out);
    assert_string_equal(out, "HTTP 409 Conflict");
    client_problem_text(502, "Bad gateway\nmore", 16, out, sizeof out);
    assert_string_equal(out, "HTTP 502: Bad gateway");
    client_problem_text(500, NULL, 0, out, sizeof out);
    assert_string_equal(out, "HTTP 500");
    const char *multi = "{\"title\":\"Service Unavailable\",\"detail\":\"db down:\\n\\tretry\"}";
    client_problem_text(503, multi, strlen(multi), out, sizeof out);
    assert_string_equal(out, "HTTP 503 Service Unavailable: db down:  retry");
    client_problem_text(400, p, strlen(p), out, 12);
    assert_int_equal(strlen(out), 11);
}

static void test_backoff(void **state) {
    (void)state;
    const double expect[] = {0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0};
    for (unsigned i = 0; i < 8; i++) {
        double d = client_backoff_seconds(i, 0.0);
        assert_true(d > expect[i] - 1e-9 && d < expect[i] + 1e-9);
    }
    assert_true(client_backoff_seconds(1000000, 0.0) == 5.0);
    double j = client_backoff_seconds(3, 0.5);
    assert_true(j > 1.8 - 1e-9 && j < 1.8 + 1e-9);
    assert_true(client_backoff_seconds(9, 0.999) >= 4.0);
    assert_true(client_backoff_seconds(9, 7.0) >= 4.0); /* jitter clamped */
}

static void test_status_transient(void **state) {
    (void)state;
    assert_true(client_status_transient(503));
    assert_true(client_status_transient(502));
    assert_true(client_status_transient(504));
    assert_true(client_status_transient(429));
    assert_false(client_status_transient(500));
    assert_false(client_status_transient(409));
    assert_false(client_status_transient(200));
}

static void test_parse_queues(void **state) {
    (void)state;
    json_t *q = NULL;
    char err[ERR_LEN];
    assert_int_equal(agent_parse_queues("gpu,cpu-big,a.b_c", &q, err, sizeof err), 0);
    assert_int_equal(json_array_size(q), 3);
    assert_string_equal(json_string_value(json_array_get(q, 1)), "cpu-big");
    assert_string_equal(json_string_value(json_array_get(q, 2)), "a.b_c");
    json_decref(q);
    assert_int_equal(agent_parse_queues("default", &q, err, sizeof err), 0);
    assert_int_equal(json_array_size(q), 1);
    json_decref(q);
    assert_int_equal(agent_parse_queues("a,,b", &q, err, sizeof err), -1);
    assert_null(q);
    assert_int_equal(agent_parse_queues("", &q, err, sizeof err), -1);
    assert_int_equal(agent_parse_queues("a,", &q, err, sizeof err), -1);
    assert_int_equal(agent_parse_queues("a b", &q, err, sizeof err), -1);
    assert_non_null(strstr(err, "a b"));
}

static void test_layer_from_name(void **state) {
    (void)state;
    int layer = -1;
    assert_true(runner_layer_from_name("hidden_states_0.npy", &layer));
    assert_int_equal(layer, 0);
    assert_true(runner_layer_from_name("hidden_states_32.npy", &layer));
    assert_int_equal(layer, 32);
    assert_false(runner_layer_from_name("hidden_states_.npy", &layer));
    assert_false(runner_layer_from_name("hidden_states_3.npz", &layer));
    assert_false(runner_layer_from_name("hidden_states_-1.npy", &layer));
    assert_false(runner_layer_from_name("hidden_states_1a.npy", &layer));
    assert_false(runner_layer_from_name("xhidden_states_1.npy", &layer));
    assert_false(runner_layer_from_name("hidden_states_99999999999999.npy", &layer));
    assert_false(runner_layer_from_name("hidden_states_01.npy", &layer));
}

/* ---- transfers against a live test server ---- */

#define FILE_BYTES 100000

typedef struct {
    struct MHD_Daemon *daemon;
    char base[64];
} test_server;

typedef struct {
    util_sha256 *hash;
    size_t size;
} upload_state;

static char file_byte(size_t i) { return (char)('a' + (i * 7 + i / 13) % 26); }

static ssize_t file_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)cls;
    if (pos >= FILE_BYTES) return MHD_CONTENT_READER_END_OF_STREAM;
    size_t n = FILE_BYTES - (size_t)pos < max ? FILE_BYTES - (size_t)pos : max;
    for (size_t i = 0; i < n; i++) buf[i] = file_byte((size_t)pos + i);
    return (ssize_t)n;
}

static ssize_t big_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)cls;
    if (pos > CLIENT_MAX_BODY + 10) return MHD_CONTENT_READER_END_OF_STREAM;
    memset(buf, 'x', max);
    return (ssize_t)max;
}

/* Dribbles one byte every 50 ms for 10 s: a transfer to abort. */
static ssize_t slow_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)cls;
    (void)max;
    if (pos >= 200) return MHD_CONTENT_READER_END_OF_STREAM;
    usleep(50000);
    buf[0] = 'z';
    return 1;
}

static enum MHD_Result send_text(struct MHD_Connection *conn, unsigned status, const char *ctype,
                                 const char *text) {
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_MUST_COPY);
    MHD_add_response_header(r, "Content-Type", ctype);
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_stream(struct MHD_Connection *conn, uint64_t size,
                                   MHD_ContentReaderCallback reader) {
    struct MHD_Response *r = MHD_create_response_from_callback(size, 4096, reader, NULL, NULL);
    enum MHD_Result ret = MHD_queue_response(conn, 200, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_size, void **con_cls) {
    (void)cls;
    (void)version;
    if (strcmp(method, "POST") == 0) {
        upload_state *up = *con_cls;
        if (!up) {
            up = calloc(1, sizeof *up);
            up->hash = util_sha256_new();
            *con_cls = up;
            return MHD_YES;
        }
        if (*upload_size) {
            util_sha256_update(up->hash, upload_data, *upload_size);
            up->size += *upload_size;
            *upload_size = 0;
            return MHD_YES;
        }
        char hex[SHA256_HEX_LEN], body[512];
        util_sha256_final(up->hash, hex);
        up->hash = NULL;
        const char *ctype = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Type");
        const char *worker = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Strata-Worker");
        const char *name = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "name");
        snprintf(body, sizeof body,
                 "{\"url\":\"%s\",\"size\":%zu,\"sha256\":\"%s\",\"ctype\":\"%s\","
                 "\"worker\":\"%s\",\"name\":\"%s\"}",
                 url, up->size, hex, ctype ? ctype : "", worker ? worker : "", name ? name : "");
        return send_text(conn, 201, "application/json", body);
    }
    if (strcmp(url, "/hello") == 0) {
        const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
        const char *worker = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Strata-Worker");
        char body[512];
        snprintf(body, sizeof body, "{\"auth\":\"%s\",\"worker\":\"%s\"}", auth ? auth : "",
                 worker ? worker : "");
        return send_text(conn, 200, "application/json", body);
    }
    if (strcmp(url, "/file") == 0) return send_stream(conn, FILE_BYTES, file_reader);
    if (strcmp(url, "/big") == 0) return send_stream(conn, MHD_SIZE_UNKNOWN, big_reader);
    if (strcmp(url, "/slow") == 0) return send_stream(conn, 200, slow_reader);
    if (strcmp(url, "/notjson") == 0) return send_text(conn, 200, "application/json", "{oops");
    if (strcmp(url, "/busy") == 0)
        return send_text(conn, 503, "application/problem+json",
                         "{\"title\":\"Service Unavailable\",\"status\":503,"
                         "\"detail\":\"database unavailable\"}");
    return send_text(conn, 404, "application/problem+json",
                     "{\"title\":\"Not Found\",\"status\":404,\"detail\":\"no such thing\"}");
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode code) {
    (void)cls;
    (void)conn;
    (void)code;
    upload_state *up = *con_cls;
    if (up) {
        util_sha256_free(up->hash);
        free(up);
        *con_cls = NULL;
    }
}

static int server_setup(void **state) {
    test_server *s = calloc(1, sizeof *s);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK); /* port 0: the kernel picks a free one */
    s->daemon = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
                                     MHD_USE_ERROR_LOG,
                                 0, NULL, NULL, on_request, NULL, MHD_OPTION_NOTIFY_COMPLETED,
                                 on_completed, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
                                 MHD_OPTION_END);
    if (!s->daemon) {
        free(s);
        return -1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    snprintf(s->base, sizeof s->base, "http://127.0.0.1:%u", (unsigned)info->port);
    *state = s;
    return 0;
}

static int server_teardown(void **state) {
    test_server *s = *state;
    MHD_stop_daemon(s->daemon);
    free(s);
    return 0;
}

static void test_json_headers(void **state) {
    test_server *s = *state;
    client c;
    char err[ERR_LEN];
    assert_int_equal(client_init(&c, s->base, "tok123", err, sizeof err), 0);
    long status;
    json_t *out = NULL;
    bool transient;
    assert_int_equal(client_json(&c, "GET", "/hello", NULL, true, 10, &status, &out, &transient,
                                 err, sizeof err), 0);
    assert_int_equal(status, 200);
    assert_string_equal(json_string_value(json_object_get(out, "auth")), "Bearer tok123");
    assert_string_equal(json_string_value(json_object_get(out, "worker")), ""); /* not set yet */
    json_decref(out);
    client_set_worker(&c, 42);
    assert_int_equal(client_json(&c, "GET", "/hello", NULL, true, 10, &status, &out, &transient,
                                 err, sizeof err), 0);
    assert_string_equal(json_string_value(json_object_get(out, "worker")), "42");
    json_decref(out);
    assert_int_equal(client_json(&c, "GET", "/hello", NULL, false, 10, &status, &out, &transient,
                                 err, sizeof err), 0);
    assert_string_equal(json_string_value(json_object_get(out, "worker")), "");
    json_decref(out);

    json_t *body = json_pack("{s:i}", "a", 1);
    assert_int_equal(client_json(&c, "POST", "/api/v1/jobs/9/complete", body, true, 10, &status,
                                 &out, &transient, err, sizeof err), 0);
    assert_int_equal(status, 201);
    assert_int_equal(json_integer_value(json_object_get(out, "size")), 7); /* {"a":1} */
    assert_string_equal(json_string_value(json_object_get(out, "ctype")), "application/json");
    assert_string_equal(json_string_value(json_object_get(out, "worker")), "42");
    json_decref(out);
    json_decref(body);

    /* A non-2xx answer is not an error of the call; err carries the problem. */
    assert_int_equal(client_json(&c, "GET", "/nothing", NULL, false, 10, &status, &out,
                                 &transient, err, sizeof err), 0);
    assert_int_equal(status, 404);
    assert_null(out);
    assert_non_null(strstr(err, "no such thing"));
    /* 2xx that is not JSON: a final error. */
    assert_int_equal(client_json(&c, "GET", "/notjson", NULL, false, 10, &status, &out,
                                 &transient, err, sizeof err), -1);
    assert_false(transient);
    client_cleanup(&c);
}

static void test_transient_failures(void **state) {
    test_server *s = *state;
    client c;
    char err[ERR_LEN];
    long status;
    json_t *out = NULL;
    bool transient = false;
    assert_int_equal(client_init(&c, s->base, "t", err, sizeof err), 0);
    assert_int_equal(client_json(&c, "GET", "/busy", NULL, false, 10, &status, &out, &transient,
                                 err, sizeof err), -1);
    assert_true(transient);
    assert_int_equal(status, 503);
    assert_non_null(strstr(err, "database unavailable"));
    client_cleanup(&c);

    /* Nothing listens on port 1: connection refused is an outage, not a verdict. */
    assert_int_equal(client_init(&c, "http://127.0.0.1:1", "t", err, sizeof err), 0);
    transient = false;
    assert_int_equal(client_json(&c, "GET", "/hello", NULL, false, 10, &status, &out, &transient,
                                 err, sizeof err), -1);
    assert_true(transient);
    assert_int_equal(status, 0);
    client_cleanup(&c);
}

static void test_download(void **state) {
    test_server *s = *state;
    client c;
    char err[ERR_LEN], dir[] = "/tmp/strata-test-client.XXXXXX", path[256], part[300];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/f.bin", dir);
    snprintf(part, sizeof part, "%s.part", path);
    assert_int_equal(client_init(&c, s->base, "t", err, sizeof err), 0);

    char *expect = malloc(FILE_BYTES);
    for (size_t i = 0; i < FILE_BYTES; i++) expect[i] = file_byte(i);
    char sha[SHA256_HEX_LEN];
    util_sha256_hex(expect, FILE_BYTES, sha);

    /* Wrong checksum: flagged corrupt and nothing left behind. */
    client_resp resp;
    client_req req = {.method = "GET", .path = "/file", .download_path = path,
                      .expect_sha256 = "00", .timeout_s = 10};
    assert_int_equal(client_perform(&c, &req, &resp, err, sizeof err), -1);
    assert_true(resp.corrupt);
    client_resp_free(&resp);
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(access(part, F_OK), -1);

    req.expect_sha256 = sha;
    assert_int_equal(client_perform(&c, &req, &resp, err, sizeof err), 0);
    assert_int_equal(resp.status, 200);
    assert_int_equal(resp.body.len, 0); /* the bytes went to the file */
    client_resp_free(&resp);
    char *got = NULL;
    size_t len = 0;
    assert_int_equal(util_read_file(path, FILE_BYTES * 2, &got, &len, err, sizeof err), 0);
    assert_int_equal(len, FILE_BYTES);
    assert_memory_equal(got, expect, FILE_BYTES);
    free(got);
    unlink(path);

    /* An error answer stays in the body and creates no file. */
    req.path = "/missing";
    assert_int_equal(client_perform(&c, &req, &resp, err, sizeof err), 0);
    assert_int_equal(resp.status, 404);
    assert_non_null(strstr(resp.body.data, "no such thing"));
    client_resp_free(&resp);
    assert_int_equal(access(path, F_OK), -1);

    free(expect);
    client_cleanup(&c);
    rmdir(dir);
}

static void test_upload(void **state) {
    test_server *s = *state;
    client c;
    char err[ERR_LEN], path[] = "/tmp/strata-test-upload.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t n = 3 * 1000 * 1000 + 17;
    char *data = malloc(n);
    for (size_t i = 0; i < n; i++) data[i] = file_byte(i * 3);
    assert_int_equal(write(fd, data, n), (ssize_t)n);
    close(fd);
    char sha[SHA256_HEX_LEN];
    util_sha256_hex(data, n, sha);

    assert_int_equal(client_init(&c, s->base, "t", err, sizeof err), 0);
    client_set_worker(&c, 5);
    char name[64], url[128];
    assert_int_equal(client_escape("acts 1.npy", name, sizeof name), 0);
    snprintf(url, sizeof url, "/api/v1/jobs/3/artifacts?name=%s", name);
    client_req req = {.method = "POST", .path = url, .content_type = "application/octet-stream",
                      .upload_path = path, .timeout_s = 30, .worker_header = true};
    client_resp resp;
    assert_int_equal(client_perform(&c, &req, &resp, err, sizeof err), 0);
    assert_int_equal(resp.status, 201);
    json_t *out = json_loads(resp.body.data, 0, NULL);
    assert_non_null(out);
    assert_int_equal(json_integer_value(json_object_get(out, "size")), (json_int_t)n);
    assert_string_equal(json_string_value(json_object_get(out, "sha256")), sha);
    assert_string_equal(json_string_value(json_object_get(out, "name")), "acts 1.npy");
    assert_string_equal(json_string_value(json_object_get(out, "worker")), "5");
    assert_string_equal(json_string_value(json_object_get(out, "ctype")),
                        "application/octet-stream");
    json_decref(out);
    client_resp_free(&resp);

    /* A missing source file is a local, final error. */
    req.upload_path = "/nonexistent/strata";
    assert_int_equal(client_perform(&c, &req, &resp, err, sizeof err), -1);
    assert_false(resp.transient);
    client_resp_free(&resp);

    free(data);
    unlink(path);
    client_cleanup(&c);
}

static void test_oversized_answer(void **state) {
    test_server *s = *state;
    client c;
    char err[ERR_LEN];
    assert_int_equal(client_init(&c, s->base, "t", err, sizeof err), 0);
    client_req req = {.method = "GET", .path = "/big", .timeout_s = 30};
    client_resp resp;
    assert_int_equal(client_perform(&c, &req, &resp, err, sizeof err), -1);
    assert_false(resp.transient);
    assert_non_null(strstr(err, "larger than"));
    client_resp_free(&resp);
    client_cleanup(&c);
}

typedef struct {
    atomic_int *flag;
} abort_arg;

static void *abort_later(void *arg) {
    abort_arg *a = arg;
    usleep(300000);
    atomic_store(a->flag, 1);
    return NULL;
}

static void test_abort(void **state) {
    test_server *s = *state;
    client c;
    char err[ERR_LEN];
    atomic_int flag = 0;
    assert_int_equal(client_init(&c, s->base, "t", err, sizeof err), 0);
    c.abort = &flag;
    pthread_t t;
    abort_arg arg = {&flag};
    pthread_create(&t, NULL, abort_later, &arg);
    double start = util_now_seconds();
    client_req req = {.method = "GET", .path = "/slow", .timeout_s = 60};
    client_resp resp;
    assert_int_equal(client_perform(&c, &req, &resp, err, sizeof err), -1);
    double took = util_now_seconds() - start;
    pthread_join(t, NULL);
    assert_true(resp.aborted);
    assert_false(resp.transient);
    assert_true(took < 3.0); /* the answer would take 10 s */
    client_resp_free(&resp);
    client_cleanup(&c);
}


/* ---- the agent against a scripted protocol server ----
 *
 * A small server that speaks the worker protocol (register, claim,
 * heartbeat, logs, complete, fail, artifacts) and records what the agent
 * sent; each scenario scripts its answers. The real cka runner computes the
 * result from a .npy the server hands out. */

enum scenario { SC_COMPLETE_AFTER_503, SC_CANCEL, SC_LEASE_LOST, SC_SHUTDOWN };

#define NPY_N 20
#define NPY_D 3

typedef struct {
    pthread_mutex_t lock;
    enum scenario scenario;
    unsigned char npy[1024];
    size_t npy_len;
    char npy_sha[SHA256_HEX_LEN];
    int claims, heartbeats, completes, fails, releases, complete_503_left;
    bool job_given;
    bool worker_header_ok; /* every job call carried Strata-Worker: 7 */
    json_t *complete_body, *fail_body, *register_body;
    char logs[4096];
} fake_state;

static fake_state fake = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* A float64 C-order .npy of NPY_N x NPY_D with distinct, non-trivial values. */
static void fake_build_npy(void) {
    char header[128];
    int n = snprintf(header, sizeof header,
                     "{'descr': '<f8', 'fortran_order': False, 'shape': (%d, %d), }", NPY_N,
                     NPY_D);
    size_t total = 10 + (size_t)n + 1;
    size_t pad = (64 - total % 64) % 64;
    size_t hlen = (size_t)n + pad + 1;
    unsigned char *p = fake.npy;
    memcpy(p, "\x93NUMPY\x01\x00", 8);
    p[8] = (unsigned char)(hlen & 0xff);
    p[9] = (unsigned char)(hlen >> 8);
    memcpy(p + 10, header, (size_t)n);
    memset(p + 10 + n, ' ', pad);
    p[10 + (size_t)n + pad] = '\n';
    size_t off = 10 + hlen;
    assert_true(off + sizeof(double) * NPY_N * NPY_D <= sizeof fake.npy);
    for (int i = 0; i < NPY_N; i++)
        for (int j = 0; j < NPY_D; j++) {
            double v = (double)((i * 7 + j * 3) % 11) - 4.5 + 0.25 * j * j;
            memcpy(p + off, &v, sizeof v);
            off += sizeof v;
        }
    fake.npy_len = off;
    util_sha256_hex(fake.npy, fake.npy_len, fake.npy_sha);
}

static ssize_t fake_npy_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    bool slow = cls != NULL;
    if (pos >= fake.npy_len) return MHD_CONTENT_READER_END_OF_STREAM;
    size_t n = fake.npy_len - (size_t)pos;
    if (n > max) n = max;
    if (slow) {
        usleep(50000); /* about 25 s for the whole file: a job to cancel */
        n = 1;
    }
    memcpy(buf, fake.npy + pos, n);
    return (ssize_t)n;
}

typedef struct {
    char data[8192];
    size_t len;
    bool started;
} fake_body;

static bool fake_worker_ok(struct MHD_Connection *conn) {
    const char *w = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Strata-Worker");
    return w && strcmp(w, "7") == 0;
}

static enum MHD_Result fake_request(void *cls, struct MHD_Connection *conn, const char *url,
                                    const char *method, const char *version,
                                    const char *upload_data, size_t *upload_size,
                                    void **con_cls) {
    (void)cls;
    (void)version;
    fake_body *body = *con_cls;
    if (!body) {
        body = calloc(1, sizeof *body);
        *con_cls = body;
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        if (body->len + n >= sizeof body->data) n = sizeof body->data - 1 - body->len;
        memcpy(body->data + body->len, upload_data, n);
        body->len += n;
        *upload_size = 0;
        return MHD_YES;
    }
    body->data[body->len] = '\0';
    bool slow = fake.scenario != SC_COMPLETE_AFTER_503;
    char text[1024];
    pthread_mutex_lock(&fake.lock);
    enum MHD_Result ret;
    if (strcmp(method, "POST") == 0 && strcmp(url, "/api/v1/workers") == 0) {
        fake.register_body = json_loads(body->data, 0, NULL);
        ret = send_text(conn, 201, "application/json", "{\"id\": 7}");
    } else if (strcmp(url, "/api/v1/workers/7/claim") == 0) {
        fake.claims++;
        if (fake.job_given) {
            pthread_mutex_unlock(&fake.lock);
            usleep(200000);
            return send_text(conn, 204, "text/plain", "");
        }
        fake.job_given = true;
        ret = send_text(conn, 200, "application/json",
                        "{\"id\": 11, \"kind\": \"cka\", \"state\": \"running\","
                        " \"spec\": {\"x\": {\"artifact\": 1}, \"y\": {\"artifact\": 1}},"
                        " \"lease_expires_at\": \"2099-01-01T00:00:00Z\"}");
    } else if (strcmp(url, "/api/v1/artifacts/1") == 0) {
        snprintf(text, sizeof text, "{\"id\": 1, \"name\": \"x.npy\", \"size\": %zu, "
                 "\"sha256\": \"%s\"}", fake.npy_len, fake.npy_sha);
        ret = send_text(conn, 200, "application/json", text);
    } else if (strcmp(url, "/api/v1/artifacts/1/content") == 0) {
        struct MHD_Response *r = MHD_create_response_from_callback(
            fake.npy_len, 1024, fake_npy_reader, slow ? &fake : NULL, NULL);
        ret = MHD_queue_response(conn, 200, r);
        MHD_destroy_response(r);
    } else if (strcmp(url, "/api/v1/jobs/11/heartbeat") == 0) {
        fake.heartbeats++;
        if (!fake_worker_ok(conn)) fake.worker_header_ok = false;
        if (fake.scenario == SC_LEASE_LOST)
            ret = send_text(conn, 409, "application/problem+json",
                            "{\"title\": \"Conflict\", \"detail\": \"job 11 is queued\"}");
        else
            ret = send_text(conn, 200, "application/json",
                            fake.scenario == SC_CANCEL
                                ? "{\"lease_expires_at\": \"2099-01-01T00:00:00Z\", "
                                  "\"cancel_requested\": true}"
                                : "{\"lease_expires_at\": \"2099-01-01T00:00:00Z\", "
                                  "\"cancel_requested\": false}");
    } else if (strcmp(url, "/api/v1/jobs/11/logs") == 0) {
        if (!fake_worker_ok(conn)) fake.worker_header_ok = false;
        size_t used = strlen(fake.logs);
        size_t n = body->len < sizeof fake.logs - used - 1 ? body->len : sizeof fake.logs - used - 1;
        memcpy(fake.logs + used, body->data, n);
        fake.logs[used + n] = '\0';
        ret = send_text(conn, 204, "text/plain", "");
    } else if (strcmp(url, "/api/v1/jobs/11/complete") == 0) {
        if (!fake_worker_ok(conn)) fake.worker_header_ok = false;
        fake.completes++;
        if (fake.complete_503_left > 0) {
            fake.complete_503_left--;
            ret = send_text(conn, 503, "application/problem+json",
                            "{\"title\": \"Service Unavailable\", \"detail\": \"database\"}");
        } else {
            json_decref(fake.complete_body);
            fake.complete_body = json_loads(body->data, 0, NULL);
            ret = send_text(conn, 200, "application/json", "{}");
        }
    } else if (strcmp(url, "/api/v1/jobs/11/fail") == 0) {
        if (!fake_worker_ok(conn)) fake.worker_header_ok = false;
        fake.fails++;
        json_decref(fake.fail_body);
        fake.fail_body = json_loads(body->data, 0, NULL);
        ret = send_text(conn, 200, "application/json", "{}");
    } else if (strcmp(url, "/api/v1/jobs/11/release") == 0) {
        if (!fake_worker_ok(conn)) fake.worker_header_ok = false;
        fake.releases++;
        ret = send_text(conn, 200, "application/json", "{}");
    } else {
        ret = send_text(conn, 404, "application/problem+json", "{\"title\": \"Not Found\"}");
    }
    pthread_mutex_unlock(&fake.lock);
    return ret;
}

static void fake_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                           enum MHD_RequestTerminationCode code) {
    (void)cls;
    (void)conn;
    (void)code;
    free(*con_cls);
    *con_cls = NULL;
}

/* Sends two shutdown signals once the job is running (its input still
 * downloading), as a second SIGTERM would. */
static void *fake_signal_twice(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&fake.lock);
        bool given = fake.job_given;
        pthread_mutex_unlock(&fake.lock);
        if (given) break;
        usleep(20000);
    }
    usleep(300000);
    agent_signal();
    usleep(300000);
    agent_signal();
    return NULL;
}

/* Runs the agent against the fake server in scenario sc: with --once, or,
 * with signal_twice, until two shutdown signals sent mid-job. Returns
 * agent_run's status; *seconds gets how long it took. */
static int fake_run_agent(enum scenario sc, int complete_503, bool signal_twice,
                          double *seconds) {
    json_decref(fake.complete_body);
    json_decref(fake.fail_body);
    json_decref(fake.register_body);
    memset(&fake.scenario, 0, sizeof fake - offsetof(fake_state, scenario));
    fake.scenario = sc;
    fake.complete_503_left = complete_503;
    fake.worker_header_ok = true;
    fake_build_npy();

    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct MHD_Daemon *d = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION, 0, NULL, NULL,
        fake_request, NULL, MHD_OPTION_NOTIFY_COMPLETED, fake_completed, NULL,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr, MHD_OPTION_END);
    assert_non_null(d);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    char url[64], dir[] = "/tmp/strata-test-agent.XXXXXX", err[ERR_LEN] = "";
    snprintf(url, sizeof url, "http://127.0.0.1:%u", (unsigned)info->port);
    assert_non_null(mkdtemp(dir));
    agent_config cfg = {.server_url = url, .token = "tok", .name = "t1", .queues = "q1,q2",
                        .heartbeat_s = 1, .wait_s = 1, .work_dir = dir,
                        .remove_work_dir = true, .once = !signal_twice};
    pthread_t signaller;
    if (signal_twice) pthread_create(&signaller, NULL, fake_signal_twice, NULL);
    double start = util_now_seconds();
    int rc = agent_run(&cfg, err, sizeof err);
    *seconds = util_now_seconds() - start;
    if (signal_twice) pthread_join(signaller, NULL);
    MHD_stop_daemon(d);
    assert_int_equal(access(dir, F_OK), -1); /* work dir removed */
    /* Registration carried what the API asks for. */
    assert_string_equal(json_string_value(json_object_get(fake.register_body, "name")), "t1");
    assert_int_equal(json_array_size(json_object_get(fake.register_body, "gpus")), 0);
    assert_string_equal(json_string_value(json_array_get(
                            json_object_get(fake.register_body, "queues"), 1)), "q2");
    assert_true(fake.worker_header_ok);
    return rc;
}

static void test_agent_completes_through_503(void **state) {
    (void)state;
    double took;
    assert_int_equal(fake_run_agent(SC_COMPLETE_AFTER_503, 2, false, &took), 0);
    assert_int_equal(fake.completes, 3); /* two 503s waited out, then accepted */
    assert_int_equal(fake.fails, 0);
    json_t *layers = json_object_get(json_object_get(fake.complete_body, "result"), "layers");
    assert_int_equal(json_array_size(layers), 1);
    json_t *layer = json_array_get(layers, 0);
    /* x against itself: CKA is 1 up to rounding. */
    double cka = json_real_value(json_object_get(layer, "cka"));
    assert_true(cka > 1.0 - 1e-12 && cka < 1.0 + 1e-12);
    assert_int_equal(json_integer_value(json_object_get(layer, "n")), NPY_N);
    assert_true(json_is_null(json_object_get(layer, "layer")));
    assert_non_null(strstr(fake.logs, "cka layer")); /* the runner's line reached the server */
}

static void test_agent_cancel(void **state) {
    (void)state;
    double took;
    assert_int_equal(fake_run_agent(SC_CANCEL, 0, false, &took), 0);
    assert_true(took < 8.0); /* the download alone would take about 25 s */
    assert_true(fake.heartbeats >= 1);
    assert_int_equal(fake.completes, 0);
    assert_int_equal(fake.fails, 1);
    assert_string_equal(json_string_value(json_object_get(fake.fail_body, "error")), "cancelled");
    assert_true(json_is_false(json_object_get(fake.fail_body, "retryable")));
}

static void test_agent_lease_lost(void **state) {
    (void)state;
    double took;
    assert_int_equal(fake_run_agent(SC_LEASE_LOST, 0, false, &took), 0);
    assert_true(took < 8.0);
    assert_true(fake.heartbeats >= 1);
    /* Not ours any more: dropped without a word. */
    assert_int_equal(fake.completes, 0);
    assert_int_equal(fake.fails, 0);
    assert_int_equal(fake.releases, 0);
}

/* Must run last: shutdown signals cannot be taken back. */
static void test_agent_double_signal(void **state) {
    (void)state;
    double took;
    assert_int_equal(fake_run_agent(SC_SHUTDOWN, 0, true, &took), 0);
    assert_true(took < 8.0);
    /* Handed back to the queue, neither completed nor failed. */
    assert_int_equal(fake.releases, 1);
    assert_int_equal(fake.completes, 0);
    assert_int_equal(fake.fails, 0);
    assert_int_equal(fake.claims, 1); /* no claim after the first signal */
}

int main(void) {
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_normalize_base),
        cmocka_unit_test(test_build_url),
        cmocka_unit_test(test_escape),
        cmocka_unit_test(test_parse_time),
        cmocka_unit_test(test_problem_text),
        cmocka_unit_test(test_backoff),
        cmocka_unit_test(test_status_transient),
        cmocka_unit_test(test_parse_queues),
        cmocka_unit_test(test_layer_from_name),
        cmocka_unit_test_setup_teardown(test_json_headers, server_setup, server_teardown),
        cmocka_unit_test_setup_teardown(test_transient_failures, server_setup, server_teardown),
        cmocka_unit_test_setup_teardown(test_download, server_setup, server_teardown),
        cmocka_unit_test_setup_teardown(test_upload, server_setup, server_teardown),
        cmocka_unit_test_setup_teardown(test_oversized_answer, server_setup, server_teardown),
        cmocka_unit_test_setup_teardown(test_abort, server_setup, server_teardown),
        cmocka_unit_test(test_agent_completes_through_503),
        cmocka_unit_test(test_agent_cancel),
        cmocka_unit_test(test_agent_lease_lost),
        cmocka_unit_test(test_agent_double_signal),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    json_decref(fake.complete_body);
    json_decref(fake.fail_body);
    json_decref(fake.register_body);
    curl_global_cleanup();
    return failed;
}
