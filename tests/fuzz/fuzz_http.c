/* fuzz_http.c - fuzz target for what the server does with request paths,
 * query values and names before any database is involved.
 *
 * Routing itself (http_route_find) is static in server/http.c, so this drives
 * the public pieces it is made of: http_match against every pattern of the
 * real route table (api_routes), and against a pattern taken from the input;
 * list cursors (api_cursor_parse); the UTF-8 cleaning of logged text
 * (http_utf8_clean); and the name and number checks applied to path
 * segments, query values and upload names (util_valid_name, util_parse_i64,
 * auth_valid_user_name, auth_role_parse, job_valid_state,
 * migrate_valid_name).
 *
 * The input is split at its first newline: the part before is the path (and
 * query value, name, cursor), the part after is a route pattern. Checked
 * beyond "no crash": a matched path is exactly its pattern with the ids
 * written back in decimal; a cursor round-trips; cleaned text is valid UTF-8,
 * stable, and equal to its input when that was valid; names accepted obey the
 * rules their headers state. */
#include "tests/fuzz/fuzz.h"

#include <jansson.h>
#include <stdbool.h>
#include <string.h>

#include "common/util.h"
#include "server/api.h"
#include "server/auth.h"
#include "server/http.h"
#include "server/job.h"
#include "server/migrate.h"

/* True when p, inside pattern, is an "{id}" segment (what http_match reads
 * as an id; "{id}" inside a longer segment is literal text). */
static bool fuzz_http_is_id(const char *pattern, const char *p) {
    return strncmp(p, "{id}", 4) == 0 && p > pattern && p[-1] == '/' &&
           (p[4] == '/' || p[4] == '\0');
}

/* Writes pattern with each "{id}" segment replaced by the next id in decimal
 * into out (malloc'd, caller frees). Returns NULL when there are more than
 * two. */
static char *fuzz_http_expand(const char *pattern, const int64_t ids[2]) {
    size_t cap = strlen(pattern) + 2 * 21 + 1, o = 0;
    char *out = malloc(cap);
    FUZZ_CHECK(out != NULL);
    int used = 0;
    for (const char *p = pattern; *p;) {
        if (fuzz_http_is_id(pattern, p)) {
            if (used == 2) {
                free(out);
                return NULL;
            }
            int n = snprintf(out + o, cap - o, "%lld", (long long)ids[used++]);
            FUZZ_CHECK(n > 0 && (size_t)n < cap - o);
            o += (size_t)n;
            p += 4;
        } else {
            out[o++] = *p++;
        }
    }
    out[o] = '\0';
    return out;
}

/* A match must be the pattern with its ids (positive, decimal, no sign, no
 * leading zero) written back: nothing else may match. */
static void fuzz_http_match(const char *pattern, const char *path) {
    int64_t ids[2] = {0, 0};
    if (!http_match(pattern, path, ids)) return;
    char *expect = fuzz_http_expand(pattern, ids);
    FUZZ_CHECK(expect != NULL);
    FUZZ_CHECK(strcmp(expect, path) == 0);
    for (const char *p = strstr(pattern, "{id}"), *q = NULL; p; p = strstr(p + 4, "{id}"))
        if (fuzz_http_is_id(pattern, p)) {
            FUZZ_CHECK(ids[q ? 1 : 0] > 0);
            q = p;
        }
    free(expect);
}

static void fuzz_http_cursor(const char *text) {
    int64_t id = 0;
    if (api_cursor_parse(text, &id) != 0) return;
    FUZZ_CHECK(id > 0);
    char formatted[32], *end = NULL;
    api_cursor_format(id, formatted, sizeof formatted);
    int64_t back = 0;
    FUZZ_CHECK(api_cursor_parse(formatted, &back) == 0 && back == id);
    /* The text was that id in lowercase hex, perhaps with leading zeros. */
    FUZZ_CHECK((int64_t)strtoll(text, &end, 16) == id && *end == '\0');
    FUZZ_CHECK(strspn(text, "0123456789abcdef") == strlen(text));
}

static void fuzz_http_utf8(const uint8_t *data, size_t size) {
    char *once = malloc(3 * size + 1), *twice = NULL;
    FUZZ_CHECK(once != NULL);
    size_t n = http_utf8_clean((const char *)data, size, once);
    FUZZ_CHECK(n <= 3 * size && once[n] == '\0');
    /* jansson's own UTF-8 validator is the reference (it allows NUL in
     * strings made with json_stringn). */
    json_t *s = json_stringn(once, n);
    FUZZ_CHECK(s != NULL);
    json_decref(s);
    json_t *input = json_stringn((const char *)data, size);
    if (input) FUZZ_CHECK(n == size && memcmp(once, data, size) == 0);
    json_decref(input);
    twice = malloc(3 * n + 1);
    FUZZ_CHECK(twice != NULL);
    FUZZ_CHECK(http_utf8_clean(once, n, twice) == n && memcmp(once, twice, n) == 0);
    free(once);
    free(twice);
}

static void fuzz_http_names(const char *text) {
    size_t n = strlen(text);
    if (util_valid_name(text)) {
        FUZZ_CHECK(n >= 1 && n <= 255 && text[0] != '-');
        FUZZ_CHECK(strcmp(text, ".") != 0 && strstr(text, "..") == NULL);
        for (size_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)text[i];
            FUZZ_CHECK(c != '/' && c >= 0x20 && c != 0x7f);
        }
    }
    if (auth_valid_user_name(text)) FUZZ_CHECK(n >= 1 && n <= 64 && text[0] != '-');
    enum auth_role role;
    if (auth_role_parse(text, &role) == 0) FUZZ_CHECK(strcmp(auth_role_name(role), text) == 0);
    if (job_valid_state(text)) FUZZ_CHECK(n > 0);
    if (migrate_valid_name(text)) FUZZ_CHECK(n >= 10 && text[4] == '_');

    /* The ranges the API uses: ids, limits, priorities. */
    static const int64_t ranges[][2] = {{1, INT64_MAX}, {1, 1000}, {-1000, 1000},
                                        {INT64_MIN, INT64_MAX}};
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) {
        int64_t v = 0;
        if (util_parse_i64(text, ranges[i][0], ranges[i][1], &v) != 0) continue;
        FUZZ_CHECK(v >= ranges[i][0] && v <= ranges[i][1]);
        char *end = NULL;
        FUZZ_CHECK(strtoll(text, &end, 10) == v && *end == '\0');
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_http_utf8(data, size);

    /* C strings stop at a NUL, as the ones libmicrohttpd hands over do. */
    char *text = malloc(size + 1);
    FUZZ_CHECK(text != NULL);
    memcpy(text, data, size);
    text[size] = '\0';
    char *pattern = strchr(text, '\n');
    if (pattern) *pattern++ = '\0';

    for (size_t i = 0; i < api_nroutes; i++) fuzz_http_match(api_routes[i].pattern, text);
    if (pattern) fuzz_http_match(pattern, text);
    fuzz_http_cursor(text);
    fuzz_http_names(text);
    free(text);
    return 0;
}
