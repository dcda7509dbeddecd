/* auth.c - see auth.h. */
#include "auth.h"

#include <stdio.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "server/db.h"

static const char AUTH_SQL_LOOKUP[] =
    "SELECT u.id, u.name, u.role FROM tokens t JOIN users u ON u.id = t.user_id"
    " WHERE t.sha256 = $1";
/* ON CONFLICT ... DO UPDATE with a no-op assignment returns the existing row
 * too, so one statement both creates and finds the user. */
static const char AUTH_SQL_UPSERT_USER[] =
    "INSERT INTO users (name, role) VALUES ($1, $2)"
    " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id, role";
static const char AUTH_SQL_INSERT_TOKEN[] =
    "INSERT INTO tokens (user_id, sha256) VALUES ($1, $2)";
static const char AUTH_SQL_BOOTSTRAP_USER[] =
    "INSERT INTO users (name, role) SELECT 'admin', 'admin'"
    " WHERE NOT EXISTS (SELECT 1 FROM users)"
    " ON CONFLICT (name) DO NOTHING RETURNING id";
static const char AUTH_SQL_LOCK_USERS[] = "LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE";

static const char *const auth_role_names[] = {"admin", "user", "worker"};

int auth_role_parse(const char *text, enum auth_role *role) {
    for (int i = 0; i < 3; i++) {
        if (text && strcmp(text, auth_role_names[i]) == 0) {
            *role = (enum auth_role)i;
            return 0;
        }
    }
    return -1;
}

const char *auth_role_name(enum auth_role role) { return auth_role_names[role]; }

int auth_valid_user_name(const char *name) {
    size_t n = strlen(name);
    if (n == 0 || n > 64 || name[0] == '-' || name[0] == '.') return 0;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

int auth_lookup(PGconn *conn, const char *token, auth_user *user, char *err, size_t errlen) {
    /* The stored hash is of the full token; a malformed token cannot match, so
     * skip the database for it. */
    if (strncmp(token, "st_", 3) != 0 || strlen(token) != AUTH_TOKEN_LEN - 1) return 0;
    char hash[SHA256_HEX_LEN];
    util_sha256_hex(token, strlen(token), hash);
    const char *params[] = {hash};
    PGresult *res = NULL;
    if (db_exec(conn, AUTH_SQL_LOOKUP, 1, params, &res, NULL, err, errlen) != 0) return -1;
    int found = 0;
    if (PQntuples(res) == 1) {
        user->id = db_get_i64(res, 0, 0);
        snprintf(user->name, sizeof user->name, "%s", PQgetvalue(res, 0, 1));
        found = auth_role_parse(PQgetvalue(res, 0, 2), &user->role) == 0;
    }
    PQclear(res);
    return found;
}

/* Makes a fresh token and its hash. */
static int auth_new_token(char token[AUTH_TOKEN_LEN], char hash[SHA256_HEX_LEN], char *err,
                          size_t errlen) {
    char hex[65];
    if (util_random_hex(hex, sizeof hex, 32) != 0)
        return err_set(err, errlen, "no random bytes for a token");
    snprintf(token, AUTH_TOKEN_LEN, "st_%s", hex);
    util_sha256_hex(token, strlen(token), hash);
    return 0;
}

int auth_token_create(PGconn *conn, const char *name, enum auth_role role,
                      char token[AUTH_TOKEN_LEN], int *conflict, char *err, size_t errlen) {
    PGresult *res = NULL;
    char hash[SHA256_HEX_LEN];
    int rc = -1;
    *conflict = 0;
    if (auth_new_token(token, hash, err, errlen) != 0) return -1;
    if (db_begin(conn, err, errlen) != 0) return -1;
    const char *up[] = {name, auth_role_name(role)};
    if (db_exec(conn, AUTH_SQL_UPSERT_USER, 2, up, &res, NULL, err, errlen) != 0) goto out;
    if (strcmp(PQgetvalue(res, 0, 1), auth_role_name(role)) != 0) {
        *conflict = 1;
        err_set(err, errlen, "user %s exists with role %s", name, PQgetvalue(res, 0, 1));
        goto out;
    }
    const char *tok[] = {PQgetvalue(res, 0, 0), hash};
    if (db_exec(conn, AUTH_SQL_INSERT_TOKEN, 2, tok, NULL, NULL, err, errlen) != 0) goto out;
    if (db_commit(conn, err, errlen) != 0) goto out;
    log_info("created a %s token for user %s", auth_role_name(role), name);
    rc = 0;
out:
    PQclear(res);
    if (rc != 0) db_rollback(conn);
    return rc;
}

int auth_bootstrap(PGconn *conn, const char *token_path, char *err, size_t errlen) {
    PGresult *res = NULL;
    char token[AUTH_TOKEN_LEN], hash[SHA256_HEX_LEN];
    int rc = -1;
    if (auth_new_token(token, hash, err, errlen) != 0) return -1;
    if (db_begin(conn, err, errlen) != 0) return -1;
    /* Two servers starting on an empty database must not both bootstrap. */
    if (db_exec(conn, AUTH_SQL_LOCK_USERS, 0, NULL, NULL, NULL, err, errlen) != 0) goto out;
    if (db_exec(conn, AUTH_SQL_BOOTSTRAP_USER, 0, NULL, &res, NULL, err, errlen) != 0) goto out;
    if (PQntuples(res) == 0) {
        rc = 0; /* users exist: nothing to do */
        goto out;
    }
    const char *tok[] = {PQgetvalue(res, 0, 0), hash};
    if (db_exec(conn, AUTH_SQL_INSERT_TOKEN, 2, tok, NULL, NULL, err, errlen) != 0) goto out;
    /* Write the file before committing: if it cannot be written, the database
     * stays empty and the next start tries again. */
    size_t len = strlen(token);
    token[len] = '\n';
    int w = util_write_file_atomic(token_path, token, len + 1, 0600, err, errlen);
    token[len] = '\0';
    if (w != 0) goto out;
    if (db_commit(conn, err, errlen) != 0) goto out;
    log_info("created user admin; its token is in %s", token_path);
    rc = 0;
out:
    PQclear(res);
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    return rc;
}
