/* auth.h - users, roles and API tokens. A token is "st_" followed by 64 hex
 * digits from the kernel's CSPRNG; only its SHA-256 is stored, so a database
 * dump does not hand out credentials. */
#ifndef STRATA_AUTH_H
#define STRATA_AUTH_H

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>

#define AUTH_TOKEN_LEN 68 /* "st_" + 64 hex + NUL */

enum auth_role { AUTH_ADMIN = 0, AUTH_USER = 1, AUTH_WORKER = 2 };

typedef struct {
    int64_t id;
    char name[256];
    enum auth_role role;
} auth_user;

/* Parses "admin" / "user" / "worker". Returns 0, or -1 when unknown. */
int auth_role_parse(const char *text, enum auth_role *role);
const char *auth_role_name(enum auth_role role);

/* Finds the user a token belongs to. Returns 1 and fills *user when found, 0
 * when the token is unknown, -1 with err set on a database error. */
int auth_lookup(PGconn *conn, const char *token, auth_user *user, char *err, size_t errlen);

/* Creates a token for user name with role, creating the user if missing.
 * Returns 0 with token filled; -1 with err set, and *conflict set to 1 when
 * the user exists with another role (a client error, not a server one). */
int auth_token_create(PGconn *conn, const char *name, enum auth_role role,
                      char token[AUTH_TOKEN_LEN], int *conflict, char *err, size_t errlen);

/* On a database without users, creates "admin" with an admin token and writes
 * the token to token_path (mode 0600, atomically). Several servers may race:
 * only the one whose insert wins writes the file. Returns 0 or -1 with err. */
int auth_bootstrap(PGconn *conn, const char *token_path, char *err, size_t errlen);

/* A user name: 1..64 of [A-Za-z0-9._-], not starting with '-' or '.'. */
int auth_valid_user_name(const char *name);

#endif
