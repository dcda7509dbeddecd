/* buf.h - growable byte buffers with a hard maximum.
 *
 * Every buffer that holds untrusted data (request bodies, parsed files) is a
 * buf_t created with the largest size it may ever reach. Appending past that
 * maximum fails with -1 and frees the buffer, so an attacker-chosen size never
 * reaches malloc unchecked. The data is always NUL-terminated for convenience
 * (the terminator is not counted in len). */
#ifndef STRATA_BUF_H
#define STRATA_BUF_H

#include <stddef.h>

typedef struct {
    char *data;   /* NULL until the first append */
    size_t len;   /* bytes in use */
    size_t cap;   /* bytes allocated (excluding the terminator) */
    size_t max;   /* appending beyond this fails */
} buf_t;

void buf_init(buf_t *b, size_t max);
/* Appends n bytes. Returns 0, or -1 (buffer freed) when over max or out of memory. */
int buf_append(buf_t *b, const void *data, size_t n);
/* printf-style append with the same failure rule. */
int buf_printf(buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Hands the data to the caller (who frees it) and resets the buffer. */
char *buf_steal(buf_t *b);
void buf_reset(buf_t *b);
void buf_free(buf_t *b);

#endif
