/* art.c - see art.h. */
#include "art.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/npy.h"
#include "common/util.h"
#include "server/db.h"

/* A job's artifact of the same name is replaced in place (same id), so a
 * retried attempt's upload supersedes the earlier attempt's. */
static const char ART_SQL_INSERT[] =
    "INSERT INTO artifacts (name, kind, size, sha256, job_id, meta, owner_id)"
    " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7)"
    " ON CONFLICT (job_id, name) WHERE job_id IS NOT NULL DO UPDATE SET"
    " kind = EXCLUDED.kind, size = EXCLUDED.size, sha256 = EXCLUDED.sha256,"
    " meta = EXCLUDED.meta, owner_id = EXCLUDED.owner_id, created_at = now()"
    " RETURNING strata_artifact_doc(artifacts)";
static const char ART_SQL_GET[] =
    "SELECT strata_artifact_doc(a), a.sha256 FROM artifacts a WHERE a.id = $1";
static const char ART_SQL_LIST_JOB[] =
    "SELECT COALESCE(json_agg(strata_artifact_doc(a) ORDER BY a.id), '[]'::json)"
    " FROM artifacts a WHERE a.job_id = $1";

struct art_upload {
    int fd;
    char tmp_path[PATH_MAX];
    util_sha256 *hash;
    uint64_t size;
};

art_upload *art_upload_begin(const char *tmp_dir, char *err, size_t errlen) {
    art_upload *up = calloc(1, sizeof *up);
    if (!up) {
        err_set(err, errlen, "out of memory");
        return NULL;
    }
    up->fd = -1;
    if (util_mkdirs(tmp_dir, 0755, err, errlen) != 0) goto fail;
    int n = snprintf(up->tmp_path, sizeof up->tmp_path, "%s/upload.XXXXXX", tmp_dir);
    if (n < 0 || (size_t)n >= sizeof up->tmp_path) {
        err_set(err, errlen, "temporary path too long");
        goto fail;
    }
    up->fd = mkstemp(up->tmp_path);
    if (up->fd < 0) {
        err_set(err, errlen, "create %s: %s", up->tmp_path, strerror(errno));
        goto fail;
    }
    up->hash = util_sha256_new();
    if (!up->hash) {
        err_set(err, errlen, "out of memory");
        goto fail;
    }
    return up;
fail:
    art_upload_abort(up);
    return NULL;
}

int art_upload_write(art_upload *up, const void *data, size_t len, char *err, size_t errlen) {
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(up->fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            return err_set(err, errlen, "write %s: %s", up->tmp_path, strerror(errno));
        }
        p += w;
        left -= (size_t)w;
    }
    util_sha256_update(up->hash, data, len);
    up->size += len;
    return 0;
}

uint64_t art_upload_size(const art_upload *up) { return up->size; }

void art_upload_abort(art_upload *up) {
    if (!up) return;
    if (up->fd >= 0) {
        close(up->fd);
        unlink(up->tmp_path);
    }
    util_sha256_free(up->hash);
    free(up);
}

static int art_store_path(const char *artifacts_dir, const char *sha, char *path,
                          size_t pathlen) {
    int n = snprintf(path, pathlen, "%s/%.2s/%s", artifacts_dir, sha, sha);
    return (n < 0 || (size_t)n >= pathlen) ? -1 : 0;
}

/* Builds kind and meta for the upload. A name ending in .npy must hold a
 * valid .npy (its header and its exact size); anything else is a plain file.
 * Returns 0, or -1 with err (a client error). *meta is the caller's. */
static int art_classify(art_upload *up, const char *name, const char **kind, json_t **meta,
                        char *err, size_t errlen) {
    size_t n = strlen(name);
    if (n < 4 || strcmp(name + n - 4, ".npy") != 0) {
        *kind = "file";
        *meta = json_object();
        return 0;
    }
    npy_header h;
    char why[ERR_LEN];
    if (npy_read_header_fd(up->fd, &h, why, sizeof why) != 0)
        return err_set(err, errlen, "%s is not a valid .npy file: %s", name, why);
    json_t *shape = h.ndim == 1 ? json_pack("[I]", (json_int_t)h.rows)
                                : json_pack("[I, I]", (json_int_t)h.rows, (json_int_t)h.cols);
    *kind = "npy";
    *meta = json_pack("{s:s, s:o}", "dtype", npy_dtype_name(h.dtype), "shape", shape);
    return 0;
}

/* Moves the finished temporary file to its content address, unless the same
 * content is already there. Returns 0 or -1 with err. */
static int art_store(art_upload *up, const char *artifacts_dir, const char *sha, char *err,
                     size_t errlen) {
    char path[PATH_MAX], dir[PATH_MAX];
    if (art_store_path(artifacts_dir, sha, path, sizeof path) != 0)
        return err_set(err, errlen, "artifact path too long");
    snprintf(dir, sizeof dir, "%s/%.2s", artifacts_dir, sha);
    if (util_mkdirs(dir, 0755, err, errlen) != 0) return -1;
    struct stat st;
    if (stat(path, &st) == 0 && (uint64_t)st.st_size == up->size) return 0;
    if (fchmod(up->fd, 0644) != 0 || fsync(up->fd) != 0)
        return err_set(err, errlen, "fsync %s: %s", up->tmp_path, strerror(errno));
    if (rename(up->tmp_path, path) != 0)
        return err_set(err, errlen, "rename to %s: %s", path, strerror(errno));
    /* The temporary name is gone; nothing left to unlink on abort. */
    up->tmp_path[0] = '\0';
    util_fsync_parent(path);
    return 0;
}

int art_upload_finish(art_upload *up, const char *artifacts_dir, PGconn *conn, const char *name,
                      int64_t owner_id, int64_t job_id, json_t **doc, int *status, char *err,
                      size_t errlen) {
    json_t *meta = NULL;
    char *meta_text = NULL;
    PGresult *res = NULL;
    int rc = -1;
    const char *kind = NULL;
    char sha[SHA256_HEX_LEN];

    *doc = NULL;
    util_sha256_final(up->hash, sha);
    up->hash = NULL;
    if (art_classify(up, name, &kind, &meta, err, errlen) != 0) {
        *status = 400;
        goto out;
    }
    meta_text = json_dumps(meta, JSON_COMPACT);
    if (!meta_text) {
        *status = 500;
        err_set(err, errlen, "out of memory");
        goto out;
    }
    if (art_store(up, artifacts_dir, sha, err, errlen) != 0) {
        *status = 500;
        goto out;
    }
    char size_text[24], job_text[24], owner_text[24];
    snprintf(size_text, sizeof size_text, "%llu", (unsigned long long)up->size);
    snprintf(job_text, sizeof job_text, "%lld", (long long)job_id);
    snprintf(owner_text, sizeof owner_text, "%lld", (long long)owner_id);
    const char *params[] = {name, kind, size_text, sha, job_id > 0 ? job_text : NULL,
                            meta_text, owner_text};
    if (db_exec(conn, ART_SQL_INSERT, 7, params, &res, NULL, err, errlen) != 0) {
        *status = db_is_down(conn) ? 503 : 500;
        goto out;
    }
    *doc = json_loads(PQgetvalue(res, 0, 0), 0, NULL);
    if (!*doc) {
        *status = 500;
        err_set(err, errlen, "bad artifact document from the database");
        goto out;
    }
    log_info("artifact %lld %s (%s, %llu bytes, sha256 %s)%s",
             (long long)json_integer_value(json_object_get(*doc, "id")), name, kind,
             (unsigned long long)up->size, sha, job_id > 0 ? " for a job" : "");
    rc = 0;
out:
    PQclear(res);
    free(meta_text);
    json_decref(meta);
    if (up->tmp_path[0] == '\0') {
        /* already renamed into the store: only close */
        close(up->fd);
        up->fd = -1;
    }
    art_upload_abort(up);
    return rc;
}

int art_get(PGconn *conn, const char *artifacts_dir, int64_t id, json_t **doc, char *path,
            size_t pathlen, char *err, size_t errlen) {
    char id_text[24];
    snprintf(id_text, sizeof id_text, "%lld", (long long)id);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, ART_SQL_GET, 1, params, &res, NULL, err, errlen) != 0) return -1;
    int found = 0;
    if (PQntuples(res) == 1) {
        *doc = json_loads(PQgetvalue(res, 0, 0), 0, NULL);
        if (!*doc) {
            PQclear(res);
            return err_set(err, errlen, "bad artifact document from the database");
        }
        if (path && art_store_path(artifacts_dir, PQgetvalue(res, 0, 1), path, pathlen) != 0) {
            json_decref(*doc);
            *doc = NULL;
            PQclear(res);
            return err_set(err, errlen, "artifact path too long");
        }
        found = 1;
    }
    PQclear(res);
    return found;
}

int art_list_for_job(PGconn *conn, int64_t job_id, json_t **items, char *err, size_t errlen) {
    char id_text[24];
    snprintf(id_text, sizeof id_text, "%lld", (long long)job_id);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, ART_SQL_LIST_JOB, 1, params, &res, NULL, err, errlen) != 0) return -1;
    *items = json_loads(PQgetvalue(res, 0, 0), 0, NULL);
    PQclear(res);
    if (!*items) return err_set(err, errlen, "bad artifact list from the database");
    return 0;
}
