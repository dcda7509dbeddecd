/* art.h - the artifact store: files kept by SHA-256 under
 * $STRATA_HOME/artifacts/ab/abcdef..., metadata in the artifacts table.
 *
 * Uploads are streamed into a temporary file in artifacts/tmp while being
 * hashed, never held in memory; the finished file is fsynced and renamed into
 * place, so a crash never leaves a half file visible, and identical content
 * is stored once. */
#ifndef STRATA_ART_H
#define STRATA_ART_H

#include <jansson.h>
#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>

typedef struct art_upload art_upload;

/* Opens a temporary file in tmp_dir for an upload. Returns NULL with err set. */
art_upload *art_upload_begin(const char *tmp_dir, char *err, size_t errlen);
/* Appends bytes (hashing them). Returns 0, or -1 with err set on a write error. */
int art_upload_write(art_upload *up, const void *data, size_t len, char *err, size_t errlen);
/* Bytes received so far. */
uint64_t art_upload_size(const art_upload *up);
/* Discards the upload and its temporary file; up is freed. NULL is fine. */
void art_upload_abort(art_upload *up);

/* Completes an upload called name (already validated) for owner_id, attached
 * to job_id when > 0 (replacing that job's earlier artifact of the same
 * name). Classifies it (a .npy name must hold a valid .npy: 400 otherwise),
 * moves it into the store and records it. On success returns 0 with *doc (the
 * artifact object; caller owns it). On failure returns -1 with *status (400,
 * 500, 503) and err. Frees up either way. conn must not be in a transaction. */
int art_upload_finish(art_upload *up, const char *artifacts_dir, PGconn *conn, const char *name,
                      int64_t owner_id, int64_t job_id, json_t **doc, int *status, char *err,
                      size_t errlen);

/* Loads artifact id. Returns 1 with *doc (caller owns) and, when path is
 * non-NULL, the stored file's path; 0 when there is no such artifact; -1 with
 * err on a database error. */
int art_get(PGconn *conn, const char *artifacts_dir, int64_t id, json_t **doc, char *path,
            size_t pathlen, char *err, size_t errlen);

/* The artifacts of job id, oldest first, as a JSON array (caller owns).
 * Returns 0 or -1 with err. */
int art_list_for_job(PGconn *conn, int64_t job_id, json_t **items, char *err, size_t errlen);

#endif
