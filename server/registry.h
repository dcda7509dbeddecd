/* registry.h - models and datasets registered with the server, so that jobs
 * name them by id ({"model": {"model": 3}}, {"dataset": {"dataset": 5}}).
 *
 * A model is a folder in Hugging Face layout ("hf") or a llama2c checkpoint
 * ("llama2c"); a dataset is alpaca JSON or Flan JSONL. Either is a path on a
 * filesystem the workers share, or uploaded artifacts. Names are unique per
 * kind. Registrations are never changed after creation.
 *
 * Checking a request (reg_model_check, reg_dataset_check) needs no database:
 * it reports every bad field at once, each naming its field. Creating one
 * then checks what needs the database (artifacts exist, the name is free)
 * and writes everything in one transaction, so a refused request creates
 * nothing.
 *
 * Failure rule for the database functions: as job.h's (-1 with *status 400,
 * 404, 409, 500 or 503 and err a sentence for the client). Documents handed
 * back as char * are JSON text as PostgreSQL wrote it; the caller free()s. */
#ifndef STRATA_REGISTRY_H
#define STRATA_REGISTRY_H

#include <jansson.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum reg_kind { REG_MODEL = 0, REG_DATASET = 1 };

/* Limits on a registration. */
#define REG_MAX_NAME 100    /* bytes of a model or dataset name */
#define REG_MAX_PATH 4096   /* bytes of a path */
#define REG_MAX_FILES 256   /* uploaded files of one hf model */
#define REG_MAX_INFO 65536  /* bytes of dataset_info as compact JSON */

/* A model registration that reg_model_check accepted. Strings point into
 * the request body it came from (borrowed; valid while the body lives);
 * file_names and file_ids are malloc'd arrays (reg_model_new_free). */
typedef struct {
    const char *name;
    const char *format;      /* "hf" or "llama2c" */
    const char *path;        /* NULL unless given by path */
    int64_t file;            /* llama2c by upload: the artifact; else 0 */
    const char **file_names; /* hf by upload: names in the folder */
    int64_t *file_ids;       /* ... and their artifacts */
    size_t nfiles;
    int64_t owner_id;
} reg_model_new;

/* A dataset registration that reg_dataset_check accepted (borrowed strings,
 * as above; dataset_info is a borrowed object or NULL). */
typedef struct {
    const char *name;
    const char *format;      /* "alpaca" or "flan" */
    const char *path;        /* NULL unless given by path */
    int64_t artifact;        /* 0 unless given by upload */
    json_t *dataset_info;
    int64_t owner_id;
} reg_dataset_new;

/* A registration name: 1..REG_MAX_NAME bytes of A-Z a-z 0-9 . _ - /,
 * starting with a letter or digit, no "..", no "//", not ending with '/'. */
bool reg_valid_name(const char *name);

/* A path on a shared filesystem: absolute, at most REG_MAX_PATH bytes, no
 * "." or ".." component, no control characters; len is the string's length
 * (a JSON string may hold NUL). */
bool reg_valid_path(const char *path, size_t len);

/* Checks a POST /api/v1/models body, appending {"field", "message"} errors.
 * Returns 0 with *out filled (free with reg_model_new_free), or -1 (out
 * needs no freeing but freeing it is harmless). */
int reg_model_check(json_t *body, reg_model_new *out, json_t *errors);
void reg_model_new_free(reg_model_new *m);

/* Checks a POST /api/v1/datasets body; as reg_model_check (nothing to free). */
int reg_dataset_check(json_t *body, reg_dataset_new *out, json_t *errors);

/* Registers a checked model / dataset. Artifacts that do not exist are
 * field errors appended to errors (status 400); a taken name is status 409
 * (with a "name" entry in errors). Returns 0 with *id and *doc. */
int reg_model_create(PGconn *conn, const reg_model_new *in, json_t *errors, int64_t *id,
                     char **doc, int *status, char *err, size_t errlen);
int reg_dataset_create(PGconn *conn, const reg_dataset_new *in, json_t *errors, int64_t *id,
                       char **doc, int *status, char *err, size_t errlen);

/* Loads one model or dataset; 404 when there is none. */
int reg_get(PGconn *conn, enum reg_kind kind, int64_t id, char **doc, int *status, char *err,
            size_t errlen);

/* Newest first, ids below before_id when before_id > 0, only the one called
 * name when name is non-NULL. *items is the text of a JSON array; *next_id
 * the cursor id for the next page, or 0. */
int reg_list(PGconn *conn, enum reg_kind kind, const char *name, int64_t before_id, int limit,
             char **items, int64_t *next_id, int *status, char *err, size_t errlen);

/* 1 when a model / dataset id exists, 0 when not, -1 with err on a database
 * error (for checking the references of job specs). */
int reg_exists(PGconn *conn, enum reg_kind kind, int64_t id, char *err, size_t errlen);

/* "model" / "dataset". */
const char *reg_kind_name(enum reg_kind kind);

#endif
