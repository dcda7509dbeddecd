/* migrate.c - see migrate.h. */
#include "migrate.h"

#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "server/db.h"

/* Any fixed key works; this one spells "strata" so it is recognisable in
 * pg_locks. */
#define MIGRATE_LOCK_KEY "126943972389985"

static const char MIGRATE_SQL_LOCK[] = "SELECT pg_advisory_lock(" MIGRATE_LOCK_KEY ")";
static const char MIGRATE_SQL_UNLOCK[] = "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")";
static const char MIGRATE_SQL_TABLE[] =
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT now())";
static const char MIGRATE_SQL_GET[] =
    "SELECT name, checksum FROM schema_migrations WHERE version = $1";
static const char MIGRATE_SQL_RECORD[] =
    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)";

/* Migration files are small and trusted; this bound only stops a mistake. */
#define MIGRATE_MAX_FILE (16 * 1024 * 1024)

int migrate_valid_name(const char *name) {
    size_t n = strlen(name);
    if (n < 10 || strcmp(name + n - 4, ".sql") != 0) return 0;
    for (int i = 0; i < 4; i++)
        if (name[i] < '0' || name[i] > '9') return 0;
    if (name[4] != '_') return 0;
    for (size_t i = 5; i < n - 4; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) return 0;
    }
    return 1;
}

static int migrate_cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Lists the valid migration file names in dir, sorted. *names is malloc'd
 * (each entry too); the caller frees them. */
static int migrate_list(const char *dir, char ***names, size_t *count, char *err,
                        size_t errlen) {
    DIR *d = opendir(dir);
    if (!d) return err_set(err, errlen, "cannot open migrations directory %s", dir);
    char **list = NULL;
    size_t n = 0, cap = 0;
    int rc = -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        if (!migrate_valid_name(e->d_name)) {
            log_warn("ignoring %s/%s: migration names look like 0001_name.sql", dir, e->d_name);
            continue;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            char **grown = realloc(list, cap * sizeof *grown);
            if (!grown) goto out;
            list = grown;
        }
        list[n] = strdup(e->d_name);
        if (!list[n]) goto out;
        n++;
    }
    qsort(list, n, sizeof *list, migrate_cmp);
    for (size_t i = 1; i < n; i++) {
        if (strncmp(list[i - 1], list[i], 4) == 0) {
            err_set(err, errlen, "migrations %s and %s share a number", list[i - 1], list[i]);
            goto out;
        }
    }
    rc = 0;
out:
    closedir(d);
    if (rc != 0) {
        if (err && !err[0]) err_set(err, errlen, "out of memory listing migrations");
        for (size_t i = 0; i < n; i++) free(list[i]);
        free(list);
        return -1;
    }
    *names = list;
    *count = n;
    return 0;
}

/* One line for a failed file: the database's message and the line of the
 * file it points at ("column x does not exist (line 12)"). */
static void migrate_describe_error(PGresult *res, const char *sql, char *msg, size_t msglen) {
    const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *position = PQresultErrorField(res, PG_DIAG_STATEMENT_POSITION);
    int64_t pos = 0;
    if (!primary) primary = "unknown error";
    if (!position || util_parse_i64(position, 1, INT64_MAX, &pos) != 0) {
        snprintf(msg, msglen, "%s", primary);
        return;
    }
    /* the position counts characters from 1; lines are what an editor shows */
    long line = 1;
    int64_t chars = 0;
    for (const char *p = sql; *p && chars < pos - 1; p++) {
        if (((unsigned char)*p & 0xC0) != 0x80) chars++;
        if (*p == '\n') line++;
    }
    snprintf(msg, msglen, "%s (line %ld)", primary, line);
}

/* Applies one file unless already recorded. Returns 1 if applied, 0 if it was
 * already there (checksum matching), -1 on error. */
static int migrate_one(PGconn *conn, const char *dir, const char *name, int report, char *err,
                       size_t errlen) {
    char path[PATH_MAX];
    char *sql = NULL;
    size_t len = 0;
    PGresult *res = NULL;
    int rc = -1;
    char msg[ERR_LEN];

    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (util_read_file(path, MIGRATE_MAX_FILE, &sql, &len, msg, sizeof msg) != 0) {
        err_set(err, errlen, "migration %s: %s", name, msg);
        goto out;
    }
    char checksum[SHA256_HEX_LEN];
    util_sha256_hex(sql, len, checksum);
    char version[8];
    snprintf(version, sizeof version, "%.4s", name);
    /* "0010" would read as octal to some parsers; strip zeros by hand */
    int64_t vnum;
    const char *digits = version;
    while (*digits == '0' && digits[1]) digits++;
    if (util_parse_i64(digits, 0, 9999, &vnum) != 0) {
        err_set(err, errlen, "migration %s: bad version", name);
        goto out;
    }
    char vtext[8];
    snprintf(vtext, sizeof vtext, "%lld", (long long)vnum);

    const char *get[] = {vtext};
    if (db_exec(conn, MIGRATE_SQL_GET, 1, get, &res, NULL, msg, sizeof msg) != 0) {
        err_set(err, errlen, "migration %s: %s", name, msg);
        goto out;
    }
    if (PQntuples(res) == 1) {
        const char *stored = PQgetvalue(res, 0, 1);
        if (strcmp(stored, checksum) != 0) {
            err_set(err, errlen,
                    "migration %s was changed after it was applied (checksum %s, recorded %s)",
                    name, checksum, stored);
            goto out;
        }
        rc = 0;
        goto out;
    }
    PQclear(res);
    res = NULL;

    if (db_begin(conn, msg, sizeof msg) != 0) {
        err_set(err, errlen, "migration %s: %s", name, msg);
        goto out;
    }
    /* The file's own SQL may hold several statements, which only the simple
     * query protocol runs; it is trusted code from the source tree. */
    res = PQexec(conn, sql);
    if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK) {
        migrate_describe_error(res, sql, msg, sizeof msg);
        db_rollback(conn);
        err_set(err, errlen, "migration %s failed: %s", name, msg);
        goto out;
    }
    PQclear(res);
    res = NULL;
    const char *rec[] = {vtext, name, checksum};
    if (db_exec(conn, MIGRATE_SQL_RECORD, 3, rec, NULL, NULL, msg, sizeof msg) != 0 ||
        db_commit(conn, msg, sizeof msg) != 0) {
        db_rollback(conn);
        err_set(err, errlen, "migration %s failed: %s", name, msg);
        goto out;
    }
    log_info("applied migration %s", name);
    if (report) printf("applied %s\n", name);
    rc = 1;
out:
    PQclear(res);
    free(sql);
    return rc;
}

int migrate_apply(PGconn *conn, const char *dir, int report, char *err, size_t errlen) {
    char **names = NULL;
    size_t count = 0;
    int applied = 0;
    char msg[ERR_LEN];

    if (migrate_list(dir, &names, &count, err, errlen) != 0) return -1;
    if (db_exec(conn, MIGRATE_SQL_LOCK, 0, NULL, NULL, NULL, msg, sizeof msg) != 0) {
        err_set(err, errlen, "migration lock: %s", msg);
        applied = -1;
        goto out;
    }
    if (db_exec(conn, MIGRATE_SQL_TABLE, 0, NULL, NULL, NULL, msg, sizeof msg) != 0) {
        err_set(err, errlen, "schema_migrations: %s", msg);
        applied = -1;
        goto unlock;
    }
    for (size_t i = 0; i < count; i++) {
        int r = migrate_one(conn, dir, names[i], report, err, errlen);
        if (r < 0) {
            applied = -1;
            goto unlock;
        }
        applied += r;
    }
unlock:
    db_exec(conn, MIGRATE_SQL_UNLOCK, 0, NULL, NULL, NULL, NULL, 0);
out:
    for (size_t i = 0; i < count; i++) free(names[i]);
    free(names);
    return applied;
}
