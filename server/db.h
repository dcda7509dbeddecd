/* db.h - the PostgreSQL side of the server: a fixed pool of libpq
 * connections, each used by one thread at a time, and helpers that run
 * parameterised statements.
 *
 * A connection that the database dropped (restart, network) is noticed when
 * it is taken from the pool and re-established there, so after an outage the
 * next request works without restarting anything. A request that cannot get a
 * working connection is told so (db_acquire returns NULL) and answers 503. */
#ifndef STRATA_DB_H
#define STRATA_DB_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct db_pool db_pool;

/* Creates a pool of size connections to conninfo. Connections are opened on
 * first use, so this fails only when out of memory (NULL). */
db_pool *db_pool_new(const char *conninfo, int size);
/* Closes every connection and frees the pool (no connection may be in use). */
void db_pool_free(db_pool *pool);

/* Takes a working connection, waiting while all are in use. Returns NULL with
 * err set when the database cannot be reached. Give it back with db_release. */
PGconn *db_acquire(db_pool *pool, char *err, size_t errlen);
/* Returns a connection to the pool, rolling back a transaction left open. */
void db_release(db_pool *pool, PGconn *conn);

/* Opens one connection (which may have failed: check PQstatus), with
 * server notices sent to the debug log. The caller PQfinish()es it. */
PGconn *db_connect(const char *conninfo);

/* Opens one connection, retrying for up to wait_s seconds while the database
 * is not there (logging each wait). Returns NULL with err set on failure;
 * the caller owns (PQfinish) the connection. */
PGconn *db_connect_retry(const char *conninfo, int wait_s, char *err, size_t errlen);

/* Runs sql with n text parameters (NULL entries are SQL NULL). On success
 * returns 0 and *res (the caller PQclear()s it; res may be NULL to discard).
 * On failure returns -1, err holds the database's message and, when
 * sqlstate is non-NULL, it receives the five-character SQLSTATE ("" when the
 * connection itself failed). */
int db_exec(PGconn *conn, const char *sql, int n, const char *const *params, PGresult **res,
            char sqlstate[6], char *err, size_t errlen);

/* Asks the database a trivial question (readiness). Returns 0 or -1. */
int db_ping_exec(PGconn *conn, char *err, size_t errlen);

/* BEGIN / COMMIT / ROLLBACK with the same failure rule. */
int db_begin(PGconn *conn, char *err, size_t errlen);
int db_commit(PGconn *conn, char *err, size_t errlen);
void db_rollback(PGconn *conn);

/* True when conn has lost its server (a failure on it means "503"). */
bool db_is_down(PGconn *conn);

/* Tells the pool the database went away (the listener saw its connection
 * drop): every pooled connection is checked before its next use. */
void db_pool_mark_suspect(db_pool *pool);

/* Reads an int64 from a result cell (0 when NULL or malformed). */
int64_t db_get_i64(const PGresult *res, int row, int col);

#endif
