/* migrate.h - applies the numbered SQL files of migrations/ in order, each in
 * its own transaction, recording them in schema_migrations with a checksum.
 * Serialised across servers by a session advisory lock, so two servers that
 * start at once apply each file once. */
#ifndef STRATA_MIGRATE_H
#define STRATA_MIGRATE_H

#include <libpq-fe.h>
#include <stddef.h>

/* Applies every pending migration in dir on conn. Logs and, when
 * report is non-zero, prints to stdout each file applied. Returns the number
 * applied (>= 0), or -1 with err naming the file and the reason (a failed
 * file leaves nothing behind; a changed, already-applied file is fatal). */
int migrate_apply(PGconn *conn, const char *dir, int report, char *err, size_t errlen);

/* True when name has the form NNNN_lowercase_name.sql. */
int migrate_valid_name(const char *name);

#endif
