/* db.c - see db.h. */
#include "db.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"

static const char DB_SQL_PING[] = "SELECT 1";
static const char DB_SQL_BEGIN[] = "BEGIN";
static const char DB_SQL_COMMIT[] = "COMMIT";
static const char DB_SQL_ROLLBACK[] = "ROLLBACK";

/* libpq's messages span lines ("...\n\tIs the server running...?\n"); a log
 * record and a problem detail are one line, so fold them. */
static void db_flatten(char *msg) {
    char *w = msg;
    for (const char *r = msg; *r; r++) {
        if (*r == '\n' || *r == '\t' || *r == '\r') {
            if (w > msg && w[-1] != ' ') *w++ = ' ';
        } else {
            *w++ = *r;
        }
    }
    while (w > msg && w[-1] == ' ') w--;
    *w = '\0';
}

typedef struct {
    PGconn *conn;
    bool busy;
    unsigned epoch; /* pool epoch when the connection was last known good */
} db_slot;

struct db_pool {
    pthread_mutex_t lock;
    pthread_cond_t freed;
    char *conninfo;
    int size;
    unsigned epoch; /* bumped when the database is known to have gone away */
    db_slot *slots;
};

/* Server notices ("relation already exists, skipping") are routine: they go
 * to the debug log instead of stderr. */
static void db_notice(void *arg, const char *message) {
    (void)arg;
    size_t n = strlen(message);
    while (n > 0 && message[n - 1] == '\n') n--;
    log_debug("database: %.*s", (int)n, message);
}

PGconn *db_connect(const char *conninfo) {
    PGconn *conn = PQconnectdb(conninfo);
    if (conn) PQsetNoticeProcessor(conn, db_notice, NULL);
    return conn;
}

db_pool *db_pool_new(const char *conninfo, int size) {
    db_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->conninfo = strdup(conninfo);
    pool->slots = calloc((size_t)size, sizeof *pool->slots);
    if (!pool->conninfo || !pool->slots) {
        free(pool->conninfo);
        free(pool->slots);
        free(pool);
        return NULL;
    }
    pool->size = size;
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->freed, NULL);
    return pool;
}

void db_pool_free(db_pool *pool) {
    if (!pool) return;
    for (int i = 0; i < pool->size; i++)
        if (pool->slots[i].conn) PQfinish(pool->slots[i].conn);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->freed);
    free(pool->slots);
    free(pool->conninfo);
    free(pool);
}

void db_pool_mark_suspect(db_pool *pool) {
    pthread_mutex_lock(&pool->lock);
    pool->epoch++;
    pthread_mutex_unlock(&pool->lock);
}

/* An idle connection has nothing to read. If its socket is readable the
 * server has said something unprompted, which in practice is "terminating
 * connection" before a restart: consume it so libpq notices the loss. */
static bool db_idle_conn_ok(PGconn *conn) {
    if (PQstatus(conn) != CONNECTION_OK) return false;
    struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLIN};
    if (pfd.fd < 0) return false;
    int r = poll(&pfd, 1, 0);
    if (r > 0) {
        if (!PQconsumeInput(conn)) return false;
        PGnotify *n;
        while ((n = PQnotifies(conn)) != NULL) PQfreemem(n);
    }
    return PQstatus(conn) == CONNECTION_OK;
}

/* A suspect connection (the database restarted since it was last used) is
 * asked a trivial question before a request relies on it. */
static bool db_ping(PGconn *conn) {
    PGresult *res = PQexec(conn, DB_SQL_PING);
    bool ok = PQresultStatus(res) == PGRES_TUPLES_OK;
    PQclear(res);
    return ok && PQstatus(conn) == CONNECTION_OK;
}

PGconn *db_acquire(db_pool *pool, char *err, size_t errlen) {
    pthread_mutex_lock(&pool->lock);
    db_slot *slot = NULL;
    for (;;) {
        for (int i = 0; i < pool->size && !slot; i++)
            if (!pool->slots[i].busy) slot = &pool->slots[i];
        if (slot) break;
        pthread_cond_wait(&pool->freed, &pool->lock);
    }
    slot->busy = true;
    unsigned epoch = pool->epoch;
    pthread_mutex_unlock(&pool->lock);

    bool ok;
    if (!slot->conn) {
        slot->conn = db_connect(pool->conninfo);
        ok = PQstatus(slot->conn) == CONNECTION_OK;
    } else {
        ok = db_idle_conn_ok(slot->conn);
        if (ok && slot->epoch != epoch) ok = db_ping(slot->conn);
        if (!ok) {
            log_warn("database connection lost; reconnecting");
            PQreset(slot->conn);
            ok = PQstatus(slot->conn) == CONNECTION_OK;
        }
    }
    if (!ok) {
        err_set(err, errlen, "database unavailable: %s", PQerrorMessage(slot->conn));
        if (err) db_flatten(err);
        pthread_mutex_lock(&pool->lock);
        slot->busy = false;
        pthread_cond_signal(&pool->freed);
        pthread_mutex_unlock(&pool->lock);
        return NULL;
    }
    slot->epoch = epoch;
    return slot->conn;
}

void db_release(db_pool *pool, PGconn *conn) {
    if (!conn) return;
    PGTransactionStatusType ts = PQtransactionStatus(conn);
    if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR) db_rollback(conn);
    pthread_mutex_lock(&pool->lock);
    for (int i = 0; i < pool->size; i++) {
        if (pool->slots[i].conn == conn) {
            pool->slots[i].busy = false;
            /* A failure on this connection means the others are suspect too. */
            if (PQstatus(conn) != CONNECTION_OK) pool->epoch++;
            break;
        }
    }
    pthread_cond_signal(&pool->freed);
    pthread_mutex_unlock(&pool->lock);
}

PGconn *db_connect_retry(const char *conninfo, int wait_s, char *err, size_t errlen) {
    double deadline = util_now_seconds() + wait_s;
    for (;;) {
        PGconn *conn = db_connect(conninfo);
        if (PQstatus(conn) == CONNECTION_OK) return conn;
        char msg[ERR_LEN];
        snprintf(msg, sizeof msg, "%s", PQerrorMessage(conn));
        db_flatten(msg);
        PQfinish(conn);
        if (util_now_seconds() >= deadline) {
            err_set(err, errlen, "cannot connect to the database: %s", msg);
            return NULL;
        }
        log_info("waiting for the database (%s)", msg);
        sleep(1);
    }
}

int db_ping_exec(PGconn *conn, char *err, size_t errlen) {
    return db_exec(conn, DB_SQL_PING, 0, NULL, NULL, NULL, err, errlen);
}

bool db_is_down(PGconn *conn) { return !conn || PQstatus(conn) != CONNECTION_OK; }

int db_exec(PGconn *conn, const char *sql, int n, const char *const *params, PGresult **res,
            char sqlstate[6], char *err, size_t errlen) {
    if (res) *res = NULL;
    if (sqlstate) sqlstate[0] = '\0';
    PGresult *r = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) {
        if (res)
            *res = r;
        else
            PQclear(r);
        return 0;
    }
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    if (sqlstate && state) snprintf(sqlstate, 6, "%s", state);
    const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    err_set(err, errlen, "%s", primary ? primary : PQerrorMessage(conn));
    if (err) db_flatten(err);
    PQclear(r);
    return -1;
}

int db_begin(PGconn *conn, char *err, size_t errlen) {
    return db_exec(conn, DB_SQL_BEGIN, 0, NULL, NULL, NULL, err, errlen);
}

int db_commit(PGconn *conn, char *err, size_t errlen) {
    return db_exec(conn, DB_SQL_COMMIT, 0, NULL, NULL, NULL, err, errlen);
}

void db_rollback(PGconn *conn) {
    PGresult *r = PQexec(conn, DB_SQL_ROLLBACK);
    PQclear(r);
}

int64_t db_get_i64(const PGresult *res, int row, int col) {
    if (PQgetisnull(res, row, col)) return 0;
    int64_t v = 0;
    if (util_parse_i64(PQgetvalue(res, row, col), INT64_MIN, INT64_MAX, &v) != 0) return 0;
    return v;
}
