/* metrics.h - the Prometheus text exposition served at /metrics: jobs by
 * state and kind, finished-job durations, live workers and HTTP requests. */
#ifndef STRATA_METRICS_H
#define STRATA_METRICS_H

#include <libpq-fe.h>
#include <stddef.h>

#include "common/buf.h"

/* Appends the exposition to b. lease_s defines "alive" (seen within two
 * leases). Returns 0, or -1 with err (database error or b full). */
int metrics_render(PGconn *conn, int lease_s, buf_t *b, char *err, size_t errlen);

#endif
