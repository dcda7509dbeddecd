/* util.h - small helpers both programs share: errors, numbers, names, time,
 * hashing and files.
 *
 * Error idiom (as in curl): a function that can fail returns 0 on success and
 * -1 on failure, writing a human-readable reason into a caller-owned buffer
 * (char *err, size_t errlen) when one is given. Callers `goto out`. */
#ifndef STRATA_UTIL_H
#define STRATA_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ERR_LEN 512

/* Formats a reason into err (if non-NULL) and returns -1, so that
 * `return err_set(err, errlen, "...")` reads as one step. */
int err_set(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Prefixes the reason already in err with what was being done ("model x:
 * <reason>"), so errors read outward-in. Returns -1 like err_set. */
int err_prefix(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Strict decimal parse: the whole string must be an integer in [min, max]. */
int util_parse_i64(const char *s, int64_t min, int64_t max, int64_t *out);

/* A plain file name: 1..255 bytes, no '/', not "." or "..", no ".." anywhere,
 * no control characters, no leading '-'. */
bool util_valid_name(const char *name);

/* RFC 3339 UTC time with microseconds, e.g. 2026-11-28T10:00:00.123456Z. */
void util_time_rfc3339(char *out, size_t outlen);
double util_now_seconds(void); /* monotonic clock */

/* SHA-256 over a buffer, as 64 lowercase hex digits plus NUL. */
#define SHA256_HEX_LEN 65
void util_sha256_hex(const void *data, size_t len, char out[SHA256_HEX_LEN]);

/* Streaming SHA-256, so uploads are hashed as they arrive. */
typedef struct util_sha256 util_sha256;
util_sha256 *util_sha256_new(void);
void util_sha256_update(util_sha256 *h, const void *data, size_t len);
void util_sha256_final(util_sha256 *h, char out[SHA256_HEX_LEN]); /* frees h */
void util_sha256_free(util_sha256 *h);

/* Fills out with 2*nbytes hex digits from the kernel's CSPRNG. */
int util_random_hex(char *out, size_t outlen, size_t nbytes);

/* mkdir -p with the given mode for directories it creates. */
int util_mkdirs(const char *path, unsigned mode, char *err, size_t errlen);

/* Writes data to path atomically: temp file in the same directory, fsync,
 * rename, fsync of the directory. Readers see the old file or the new one. */
int util_write_file_atomic(const char *path, const void *data, size_t len, unsigned mode,
                           char *err, size_t errlen);

/* fsyncs the directory that holds path (after a rename into it). */
int util_fsync_parent(const char *path);

/* Reads a whole file of at most max bytes into *out (NUL-terminated, caller frees). */
int util_read_file(const char *path, size_t max, char **out, size_t *len, char *err,
                   size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
