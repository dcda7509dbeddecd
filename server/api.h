/* api.h - the HTTP API's routes (paths, roles, body kinds) and their
 * handlers: the strata v1 contract of docs/API.md plus health and metrics. */
#ifndef STRATA_API_H
#define STRATA_API_H

#include <stddef.h>

#include "server/http.h"

extern const http_route api_routes[];
extern const size_t api_nroutes;

/* Parses a list cursor (lowercase hex of a job id). Returns 0 with *id, or
 * -1 when malformed. */
int api_cursor_parse(const char *cursor, int64_t *id);
/* Writes the cursor for id into out. */
void api_cursor_format(int64_t id, char *out, size_t outlen);

#endif
