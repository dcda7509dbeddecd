/* util.c - see util.h. */
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int err_set(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int err_prefix(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return -1;
    char inner[ERR_LEN], prefix[ERR_LEN];
    snprintf(inner, sizeof inner, "%s", err);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    return err_set(err, errlen, "%s: %s", prefix, inner);
}

int util_parse_i64(const char *s, int64_t min, int64_t max, int64_t *out) {
    /* strtoll would skip leading blanks and a '+': "limit= 10" is not a number. */
    if (!s || !(*s == '-' || (*s >= '0' && *s <= '9'))) return -1;
    errno = 0;
    char *end = NULL;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0') return -1;
    if (v < min || v > max) return -1;
    *out = (int64_t)v;
    return 0;
}

bool util_valid_name(const char *name) {
    if (!name) return false;
    size_t n = strlen(name);
    if (n == 0 || n > 255) return false;
    if (name[0] == '-' || strcmp(name, ".") == 0) return false;
    if (strstr(name, "..")) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c == '/' || c == '\\' || c < 0x20 || c == 0x7f) return false;
    }
    return true;
}

void util_time_rfc3339(char *out, size_t outlen) {
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(out, outlen, "%04d-%02d-%02dT%02d:%02d:%02d.%06ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000);
}

double util_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void util_hex(const unsigned char *in, size_t n, char *out) {
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

struct util_sha256 {
    EVP_MD_CTX *ctx;
};

util_sha256 *util_sha256_new(void) {
    util_sha256 *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    h->ctx = EVP_MD_CTX_new();
    if (!h->ctx || EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL) != 1) {
        util_sha256_free(h);
        return NULL;
    }
    return h;
}

void util_sha256_update(util_sha256 *h, const void *data, size_t len) {
    EVP_DigestUpdate(h->ctx, data, len);
}

void util_sha256_final(util_sha256 *h, char out[SHA256_HEX_LEN]) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_DigestFinal_ex(h->ctx, md, &n);
    util_hex(md, n, out);
    util_sha256_free(h);
}

void util_sha256_free(util_sha256 *h) {
    if (!h) return;
    EVP_MD_CTX_free(h->ctx);
    free(h);
}

void util_sha256_hex(const void *data, size_t len, char out[SHA256_HEX_LEN]) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_Digest(data, len, md, &n, EVP_sha256(), NULL);
    util_hex(md, n, out);
}

int util_random_hex(char *out, size_t outlen, size_t nbytes) {
    unsigned char raw[64];
    if (nbytes > sizeof raw || outlen < 2 * nbytes + 1) return -1;
    size_t got = 0;
    while (got < nbytes) {
        ssize_t r = getrandom(raw + got, nbytes - got, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        got += (size_t)r;
    }
    util_hex(raw, nbytes, out);
    return 0;
}

int util_mkdirs(const char *path, unsigned mode, char *err, size_t errlen) {
    char tmp[PATH_MAX];
    int n = snprintf(tmp, sizeof tmp, "%s", path);
    if (n < 0 || (size_t)n >= sizeof tmp) return err_set(err, errlen, "path too long: %s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(tmp, (mode_t)mode) != 0 && errno != EEXIST)
            return err_set(err, errlen, "mkdir %s: %s", tmp, strerror(errno));
        *p = '/';
    }
    if (mkdir(tmp, (mode_t)mode) != 0 && errno != EEXIST)
        return err_set(err, errlen, "mkdir %s: %s", tmp, strerror(errno));
    return 0;
}

int util_fsync_parent(const char *path) {
    char tmp[PATH_MAX];
    int n = snprintf(tmp, sizeof tmp, "%s", path);
    if (n < 0 || (size_t)n >= sizeof tmp) return -1;
    int fd = open(dirname(tmp), O_RDONLY | O_DIRECTORY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int util_write_file_atomic(const char *path, const void *data, size_t len, unsigned mode,
                           char *err, size_t errlen) {
    char tmp[PATH_MAX];
    int n = snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path);
    if (n < 0 || (size_t)n >= sizeof tmp) return err_set(err, errlen, "path too long: %s", path);
    int fd = mkstemp(tmp);
    if (fd < 0) return err_set(err, errlen, "create %s: %s", tmp, strerror(errno));
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            goto fail;
        }
        p += w;
        left -= (size_t)w;
    }
    if (fchmod(fd, (mode_t)mode) != 0 || fsync(fd) != 0) goto fail;
    if (close(fd) != 0) {
        fd = -1;
        goto fail;
    }
    fd = -1;
    if (rename(tmp, path) != 0) goto fail;
    util_fsync_parent(path);
    return 0;
fail:;
    int saved = errno;
    if (fd >= 0) close(fd);
    unlink(tmp);
    return err_set(err, errlen, "write %s: %s", path, strerror(saved));
}

int util_read_file(const char *path, size_t max, char **out, size_t *len, char *err,
                   size_t errlen) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return err_set(err, errlen, "open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return err_set(err, errlen, "%s is not a regular file", path);
    }
    if ((uint64_t)st.st_size > max) {
        close(fd);
        return err_set(err, errlen, "%s is larger than %zu bytes", path, max);
    }
    size_t size = (size_t)st.st_size;
    char *data = malloc(size + 1);
    if (!data) {
        close(fd);
        return err_set(err, errlen, "out of memory reading %s", path);
    }
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, data + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            int saved = r < 0 ? errno : EIO;
            free(data);
            close(fd);
            return err_set(err, errlen, "read %s: %s", path, strerror(saved));
        }
        got += (size_t)r;
    }
    close(fd);
    data[size] = '\0';
    *out = data;
    if (len) *len = size;
    return 0;
}
