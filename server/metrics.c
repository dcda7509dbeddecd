/* metrics.c - see metrics.h. */
#include "metrics.h"

#include <stdio.h>

#include "common/util.h"
#include "server/db.h"
#include "server/http.h"

static const char METRICS_SQL_JOBS[] =
    "SELECT s.state, k.kind, count(j.id) FROM"
    " (VALUES ('blocked'), ('queued'), ('running'), ('succeeded'), ('failed'), ('cancelled'))"
    "  AS s(state)"
    " CROSS JOIN (SELECT DISTINCT kind FROM jobs) k"
    " LEFT JOIN jobs j ON j.state = s.state AND j.kind = k.kind"
    " GROUP BY s.state, k.kind ORDER BY k.kind, s.state";
/* Cumulative bucket counts, as a Prometheus histogram wants them. */
static const char METRICS_SQL_DURATIONS[] =
    "SELECT kind, count(*) FILTER (WHERE d <= 1), count(*) FILTER (WHERE d <= 10),"
    " count(*) FILTER (WHERE d <= 60), count(*) FILTER (WHERE d <= 300),"
    " count(*) FILTER (WHERE d <= 1800), count(*) FILTER (WHERE d <= 7200),"
    " count(*) FILTER (WHERE d <= 28800), count(*), COALESCE(sum(d), 0)"
    " FROM (SELECT kind, extract(epoch FROM finished_at - started_at)::float8 AS d FROM jobs"
    "  WHERE finished_at IS NOT NULL AND started_at IS NOT NULL) f GROUP BY kind ORDER BY kind";
static const char METRICS_SQL_WORKERS[] =
    "SELECT count(*) FROM workers"
    " WHERE last_seen_at > now() - make_interval(secs => 2 * $1::int)";

static const char *const metrics_buckets[] = {"1", "10", "60", "300", "1800", "7200", "28800",
                                              "+Inf"};

int metrics_render(PGconn *conn, int lease_s, buf_t *b, char *err, size_t errlen) {
    PGresult *res = NULL;
    int rc = -1, w = 0;
    if (db_exec(conn, METRICS_SQL_JOBS, 0, NULL, &res, NULL, err, errlen) != 0) goto out;
    w |= buf_printf(b, "# HELP strata_jobs Jobs by state and kind.\n# TYPE strata_jobs gauge\n");
    for (int i = 0; i < PQntuples(res) && w == 0; i++)
        w |= buf_printf(b, "strata_jobs{state=\"%s\",kind=\"%s\"} %s\n", PQgetvalue(res, i, 0),
                        PQgetvalue(res, i, 1), PQgetvalue(res, i, 2));
    PQclear(res);
    res = NULL;

    if (db_exec(conn, METRICS_SQL_DURATIONS, 0, NULL, &res, NULL, err, errlen) != 0) goto out;
    w |= buf_printf(b, "# HELP strata_job_duration_seconds Run time of finished jobs.\n"
                       "# TYPE strata_job_duration_seconds histogram\n");
    for (int i = 0; i < PQntuples(res) && w == 0; i++) {
        const char *kind = PQgetvalue(res, i, 0);
        for (int k = 0; k < 8; k++)
            w |= buf_printf(b, "strata_job_duration_seconds_bucket{kind=\"%s\",le=\"%s\"} %s\n",
                            kind, metrics_buckets[k], PQgetvalue(res, i, 1 + k));
        w |= buf_printf(b, "strata_job_duration_seconds_sum{kind=\"%s\"} %s\n", kind,
                        PQgetvalue(res, i, 9));
        w |= buf_printf(b, "strata_job_duration_seconds_count{kind=\"%s\"} %s\n", kind,
                        PQgetvalue(res, i, 8));
    }
    PQclear(res);
    res = NULL;

    char lease[16];
    snprintf(lease, sizeof lease, "%d", lease_s);
    const char *params[] = {lease};
    if (db_exec(conn, METRICS_SQL_WORKERS, 1, params, &res, NULL, err, errlen) != 0) goto out;
    w |= buf_printf(b, "# HELP strata_workers_alive Workers seen within two leases.\n"
                       "# TYPE strata_workers_alive gauge\nstrata_workers_alive %s\n",
                    PQgetvalue(res, 0, 0));
    if (w == 0) w |= http_stats_render(b);
    if (w != 0) {
        err_set(err, errlen, "metrics output too large");
        goto out;
    }
    rc = 0;
out:
    PQclear(res);
    return rc;
}
