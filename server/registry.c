/* registry.c - see registry.h. Requests are checked field by field first
 * (every error reported, each naming its field); the database part only
 * checks what needs it (artifacts exist, the name is free) inside the
 * transaction that writes the registration. */
#include "registry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/log.h"
#include "common/spec.h"
#include "common/util.h"
#include "server/db.h"

static const char REG_SQL_MISSING_ARTIFACTS[] =
    "SELECT x FROM unnest($1::bigint[]) AS x"
    " WHERE NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.id = x)";
static const char REG_SQL_MODEL_INSERT[] =
    "INSERT INTO models (name, format, path, artifact_id, owner_id)"
    " VALUES ($1, $2, $3, $4, $5) RETURNING id";
static const char REG_SQL_MODEL_FILE_INSERT[] =
    "INSERT INTO model_files (model_id, name, artifact_id) VALUES ($1, $2, $3)";
static const char REG_SQL_DATASET_INSERT[] =
    "INSERT INTO datasets (name, format, path, artifact_id, dataset_info, owner_id)"
    " VALUES ($1, $2, $3, $4, $5::jsonb, $6) RETURNING id";

/* Indexed by enum reg_kind. */
static const char *const REG_SQL_GET[] = {
    "SELECT strata_model_doc(m) FROM models m WHERE m.id = $1",
    "SELECT strata_dataset_doc(d) FROM datasets d WHERE d.id = $1",
};
static const char *const REG_SQL_LIST[] = {
    "SELECT strata_model_doc(m), m.id FROM models m"
    " WHERE ($1::text IS NULL OR m.name = $1) AND ($2::bigint IS NULL OR m.id < $2)"
    " ORDER BY m.id DESC LIMIT $3",
    "SELECT strata_dataset_doc(d), d.id FROM datasets d"
    " WHERE ($1::text IS NULL OR d.name = $1) AND ($2::bigint IS NULL OR d.id < $2)"
    " ORDER BY d.id DESC LIMIT $3",
};
static const char *const REG_SQL_EXISTS[] = {
    "SELECT 1 FROM models WHERE id = $1",
    "SELECT 1 FROM datasets WHERE id = $1",
};

/* The columns of a LLaMA-Factory alpaca dataset_info entry. */
static const char *const REG_ALPACA_COLUMNS[] = {"prompt", "query", "response", "system",
                                                 "history", NULL};

const char *reg_kind_name(enum reg_kind kind) {
    return kind == REG_MODEL ? "model" : "dataset";
}

static int reg_db_error(PGconn *conn, int *status) {
    *status = db_is_down(conn) ? 503 : 500;
    return -1;
}

static void reg_id_text(int64_t id, char out[24]) { snprintf(out, 24, "%lld", (long long)id); }

/* --- checking requests ------------------------------------------------------ */

bool reg_valid_name(const char *name) {
    size_t n = strlen(name);
    if (n == 0 || n > REG_MAX_NAME) return false;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (i == 0 && !alnum) return false;
        if (!alnum && c != '.' && c != '_' && c != '-' && c != '/') return false;
    }
    /* '/' lets names read like Hugging Face's ("meta-llama/Llama-2-7b");
     * they must not look like relative paths. */
    return !strstr(name, "..") && !strstr(name, "//") && name[n - 1] != '/';
}

bool reg_valid_path(const char *path, size_t len) {
    if (len == 0 || len > REG_MAX_PATH || strlen(path) != len || path[0] != '/') return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)path[i];
        if (c < 0x20 || c == 0x7f) return false;
    }
    /* Every component is checked: "." and ".." would let a registration
     * name a different place than it appears to. */
    const char *p = path;
    while (*p) {
        while (*p == '/') p++;
        const char *end = strchr(p, '/');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.')) return false;
        p += n;
    }
    return true;
}

/* The registration's "name". */
static void reg_check_name(json_t *body, const char **out, json_t *errors) {
    json_t *v = json_object_get(body, "name");
    if (!v)
        spec_error(errors, "name", "is required");
    else if (!json_is_string(v) || !reg_valid_name(json_string_value(v)) ||
             strlen(json_string_value(v)) != json_string_length(v))
        spec_error(errors, "name",
                   "must be 1-%d of A-Z a-z 0-9 . _ - / starting with a letter or digit (no "
                   "\"..\", \"//\" or trailing \"/\")",
                   REG_MAX_NAME);
    else
        *out = json_string_value(v);
}

/* A "path" field; suffix, when non-NULL, is the file ending it needs. */
static void reg_check_path(json_t *v, const char *suffix, const char **out, json_t *errors) {
    if (!json_is_string(v) || !reg_valid_path(json_string_value(v), json_string_length(v))) {
        spec_error(errors, "path",
                   "must be an absolute path of at most %d bytes on a filesystem the workers "
                   "share (no \".\" or \"..\" components, no control characters)",
                   REG_MAX_PATH);
        return;
    }
    const char *s = json_string_value(v);
    size_t n = strlen(s), k = suffix ? strlen(suffix) : 0;
    if (suffix && (n <= k + 1 || strcmp(s + n - k, suffix) != 0 || s[n - k - 1] == '/')) {
        spec_error(errors, "path", "must name a %s file", suffix);
        return;
    }
    *out = s;
}

static bool reg_is_id(json_t *v) { return json_is_integer(v) && json_integer_value(v) > 0; }

/* An hf model's "files": {"config.json": ID, ...}, with the files a loader
 * cannot do without. */
static void reg_check_files(json_t *files, reg_model_new *out, json_t *errors) {
    if (!json_is_object(files) || json_object_size(files) == 0 ||
        json_object_size(files) > REG_MAX_FILES) {
        spec_error(errors, "files",
                   "must be an object of 1-%d entries {\"FILE NAME\": ARTIFACT_ID}, such as "
                   "{\"config.json\": 3, \"model.safetensors\": 4, \"tokenizer.json\": 5}",
                   REG_MAX_FILES);
        return;
    }
    size_t n = json_object_size(files);
    out->file_names = calloc(n, sizeof *out->file_names);
    out->file_ids = calloc(n, sizeof *out->file_ids);
    if (!out->file_names || !out->file_ids) {
        spec_error(errors, "files", "too large for this server (out of memory)");
        return;
    }
    const char *key;
    json_t *value;
    size_t before = json_array_size(errors);
    json_object_foreach(files, key, value) {
        char field[300];
        snprintf(field, sizeof field, "files.%s", key);
        if (!util_valid_name(key)) {
            spec_error(errors, field,
                       "is not a plain file name (no '/', no '..', no control characters, not "
                       "starting with '-')");
            continue;
        }
        if (!reg_is_id(value)) {
            spec_error(errors, field, "must be an artifact id (a positive integer)");
            continue;
        }
        out->file_names[out->nfiles] = key;
        out->file_ids[out->nfiles] = (int64_t)json_integer_value(value);
        out->nfiles++;
    }
    if (json_array_size(errors) > before) return;
    if (!json_object_get(files, "config.json"))
        spec_error(errors, "files", "must include config.json");
    if (!json_object_get(files, "model.safetensors") &&
        !json_object_get(files, "model.safetensors.index.json"))
        spec_error(errors, "files",
                   "must include model.safetensors or model.safetensors.index.json (with its "
                   "shards)");
}

void reg_model_new_free(reg_model_new *m) {
    if (!m) return;
    free(m->file_names);
    free(m->file_ids);
    m->file_names = NULL;
    m->file_ids = NULL;
    m->nfiles = 0;
}

int reg_model_check(json_t *body, reg_model_new *out, json_t *errors) {
    size_t before = json_array_size(errors);
    int64_t owner = out->owner_id;
    memset(out, 0, sizeof *out);
    out->owner_id = owner;
    out->format = "hf";
    const char *key;
    json_t *value;
    json_object_foreach(body, key, value) {
        if (strcmp(key, "name") && strcmp(key, "format") && strcmp(key, "path") &&
            strcmp(key, "files") && strcmp(key, "file"))
            spec_error(errors, key, "unknown field");
    }
    reg_check_name(body, &out->name, errors);
    json_t *format = json_object_get(body, "format");
    bool format_ok = true;
    if (format) {
        if (json_is_string(format) && (strcmp(json_string_value(format), "hf") == 0 ||
                                       strcmp(json_string_value(format), "llama2c") == 0)) {
            out->format = json_string_value(format);
        } else {
            spec_error(errors, "format", "must be \"hf\" (default) or \"llama2c\"");
            format_ok = false;
        }
    }
    bool hf = strcmp(out->format, "hf") == 0;
    json_t *path = json_object_get(body, "path");
    json_t *files = json_object_get(body, "files");
    json_t *file = json_object_get(body, "file");
    int sources = (path != NULL) + (files != NULL) + (file != NULL);
    if (sources == 0) {
        spec_error(errors, "path",
                   "is required unless the model is uploaded (\"files\" for an hf model, "
                   "\"file\" for a llama2c one)");
    } else if (sources > 1) {
        spec_error(errors, path ? "path" : "files",
                   "give exactly one of \"path\", \"files\" (hf) or \"file\" (llama2c)");
    } else if (format_ok) {
        if (path) reg_check_path(path, hf ? NULL : ".bin", &out->path, errors);
        if (files && !hf)
            spec_error(errors, "files",
                       "is for hf models; a llama2c model gives \"file\" or \"path\"");
        else if (files)
            reg_check_files(files, out, errors);
        if (file && hf)
            spec_error(errors, "file",
                       "is for llama2c models (\"format\": \"llama2c\"); an hf model gives "
                       "\"files\" or \"path\"");
        else if (file && !reg_is_id(file))
            spec_error(errors, "file", "must be an artifact id (a positive integer)");
        else if (file)
            out->file = (int64_t)json_integer_value(file);
    }
    return json_array_size(errors) > before ? -1 : 0;
}

/* LLaMA-Factory's per-dataset entry: only what an alpaca dataset uses is
 * checked; other keys of the entry (file_name, tags, ...) are kept as given. */
static void reg_check_dataset_info(json_t *info, json_t *errors) {
    if (!json_is_object(info)) {
        spec_error(errors, "dataset_info",
                   "must be an object (the dataset's entry of a LLaMA-Factory "
                   "dataset_info.json), such as {\"columns\": {\"prompt\": \"instruction\"}}");
        return;
    }
    char *text = json_dumps(info, JSON_COMPACT);
    size_t len = text ? strlen(text) : 0;
    free(text);
    if (!text || len > REG_MAX_INFO) {
        spec_error(errors, "dataset_info", "must be at most %d bytes as compact JSON",
                   REG_MAX_INFO);
        return;
    }
    json_t *formatting = json_object_get(info, "formatting");
    if (formatting && (!json_is_string(formatting) ||
                       strcmp(json_string_value(formatting), "alpaca") != 0))
        spec_error(errors, "dataset_info.formatting", "must be \"alpaca\" (the only one supported)");
    json_t *file_name = json_object_get(info, "file_name");
    if (file_name && !json_is_string(file_name))
        spec_error(errors, "dataset_info.file_name", "must be a string");
    json_t *columns = json_object_get(info, "columns");
    if (!columns) return;
    if (!json_is_object(columns)) {
        spec_error(errors, "dataset_info.columns",
                   "must be an object mapping prompt, query, response, system, history to "
                   "record keys");
        return;
    }
    const char *key;
    json_t *value;
    json_object_foreach(columns, key, value) {
        char field[300];
        snprintf(field, sizeof field, "dataset_info.columns.%s", key);
        size_t i = 0;
        while (REG_ALPACA_COLUMNS[i] && strcmp(REG_ALPACA_COLUMNS[i], key) != 0) i++;
        if (!REG_ALPACA_COLUMNS[i])
            spec_error(errors, field,
                       "unknown column (alpaca columns: prompt, query, response, system, "
                       "history)");
        else if (!json_is_string(value) || json_string_length(value) == 0 ||
                 strlen(json_string_value(value)) != json_string_length(value))
            spec_error(errors, field, "must be the name of a key in the records");
    }
}

int reg_dataset_check(json_t *body, reg_dataset_new *out, json_t *errors) {
    size_t before = json_array_size(errors);
    int64_t owner = out->owner_id;
    memset(out, 0, sizeof *out);
    out->owner_id = owner;
    const char *key;
    json_t *value;
    json_object_foreach(body, key, value) {
        if (strcmp(key, "name") && strcmp(key, "format") && strcmp(key, "path") &&
            strcmp(key, "artifact") && strcmp(key, "dataset_info"))
            spec_error(errors, key, "unknown field");
    }
    reg_check_name(body, &out->name, errors);
    json_t *format = json_object_get(body, "format");
    if (!format)
        spec_error(errors, "format", "is required (\"alpaca\" or \"flan\")");
    else if (!json_is_string(format) || (strcmp(json_string_value(format), "alpaca") != 0 &&
                                         strcmp(json_string_value(format), "flan") != 0))
        spec_error(errors, "format", "must be \"alpaca\" or \"flan\"");
    else
        out->format = json_string_value(format);
    json_t *path = json_object_get(body, "path");
    json_t *artifact = json_object_get(body, "artifact");
    if (!path && !artifact)
        spec_error(errors, "path", "is required unless the dataset is uploaded (\"artifact\")");
    else if (path && artifact)
        spec_error(errors, "path", "give exactly one of \"path\" or \"artifact\"");
    else if (path)
        reg_check_path(path, NULL, &out->path, errors);
    else if (!reg_is_id(artifact))
        spec_error(errors, "artifact", "must be an artifact id (a positive integer)");
    else
        out->artifact = (int64_t)json_integer_value(artifact);
    json_t *info = json_object_get(body, "dataset_info");
    if (info && !json_is_null(info)) {
        if (out->format && strcmp(out->format, "alpaca") != 0)
            spec_error(errors, "dataset_info",
                       "applies to alpaca datasets only (Flan records have fixed keys)");
        else
            reg_check_dataset_info(info, errors);
        out->dataset_info = info;
    }
    return json_array_size(errors) > before ? -1 : 0;
}

/* --- the database ---------------------------------------------------------- */

/* Appends a "field" error for each of the n artifact ids that does not
 * exist (fields[i] names ids[i]). Returns 0 (errors may have grown) or -1
 * with *status and err on a database error. */
static int reg_check_artifacts(PGconn *conn, const int64_t *ids, const char *const *fields,
                               size_t n, json_t *errors, int *status, char *err,
                               size_t errlen) {
    if (n == 0) return 0;
    buf_t list;
    buf_init(&list, 64 + n * 24);
    int w = buf_append(&list, "{", 1);
    for (size_t i = 0; i < n && w == 0; i++)
        w = buf_printf(&list, "%s%lld", i ? "," : "", (long long)ids[i]);
    if (w == 0) w = buf_append(&list, "}", 1);
    if (w != 0) {
        buf_free(&list);
        *status = 500;
        return err_set(err, errlen, "out of memory");
    }
    const char *params[] = {list.data};
    PGresult *res = NULL;
    int rc = db_exec(conn, REG_SQL_MISSING_ARTIFACTS, 1, params, &res, NULL, err, errlen);
    buf_free(&list);
    if (rc != 0) return reg_db_error(conn, status);
    for (int r = 0; r < PQntuples(res); r++) {
        int64_t missing = db_get_i64(res, r, 0);
        for (size_t i = 0; i < n; i++)
            if (ids[i] == missing)
                spec_error(errors, fields[i], "no artifact %lld", (long long)missing);
    }
    PQclear(res);
    return 0;
}

/* Maps a failed insert to the client's status: a taken name is 409 with a
 * "name" error, an artifact deleted since it was checked a 400. */
static int reg_insert_error(PGconn *conn, const char *sqlstate, enum reg_kind kind,
                            const char *name, json_t *errors, int *status, char *err,
                            size_t errlen) {
    if (strcmp(sqlstate, "23505") == 0) {
        *status = 409;
        spec_error(errors, "name", "a %s named \"%s\" already exists", reg_kind_name(kind), name);
        return err_set(err, errlen, "a %s named \"%s\" already exists", reg_kind_name(kind),
                       name);
    }
    if (strcmp(sqlstate, "23503") == 0) {
        *status = 400;
        return err_set(err, errlen, "an artifact the %s names no longer exists",
                       reg_kind_name(kind));
    }
    return reg_db_error(conn, status);
}

int reg_model_create(PGconn *conn, const reg_model_new *in, json_t *errors, int64_t *id,
                     char **doc, int *status, char *err, size_t errlen) {
    int rc = -1;
    PGresult *res = NULL;
    char **fields = NULL;
    *doc = NULL;
    size_t nids = in->nfiles + (in->file > 0 ? 1 : 0);
    int64_t *ids = calloc(nids ? nids : 1, sizeof *ids);
    fields = calloc(nids ? nids : 1, sizeof *fields);
    if (!ids || !fields) {
        *status = 500;
        err_set(err, errlen, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < in->nfiles; i++) {
        ids[i] = in->file_ids[i];
        size_t need = strlen(in->file_names[i]) + 7;
        fields[i] = malloc(need);
        if (!fields[i]) {
            *status = 500;
            err_set(err, errlen, "out of memory");
            goto out;
        }
        snprintf(fields[i], need, "files.%s", in->file_names[i]);
    }
    if (in->file > 0) {
        ids[in->nfiles] = in->file;
        fields[in->nfiles] = strdup("file");
        if (!fields[in->nfiles]) {
            *status = 500;
            err_set(err, errlen, "out of memory");
            goto out;
        }
    }
    if (db_begin(conn, err, errlen) != 0) {
        reg_db_error(conn, status);
        goto out;
    }
    if (reg_check_artifacts(conn, ids, (const char *const *)fields, nids, errors, status, err,
                            errlen) != 0)
        goto out;
    if (json_array_size(errors) > 0) {
        *status = 400;
        err_set(err, errlen, "the model names artifacts that do not exist (see errors)");
        goto out;
    }
    char file_text[24], owner[24], sqlstate[6];
    reg_id_text(in->file, file_text);
    reg_id_text(in->owner_id, owner);
    const char *params[] = {in->name, in->format, in->path, in->file > 0 ? file_text : NULL,
                            owner};
    if (db_exec(conn, REG_SQL_MODEL_INSERT, 5, params, &res, sqlstate, err, errlen) != 0) {
        reg_insert_error(conn, sqlstate, REG_MODEL, in->name, errors, status, err, errlen);
        goto out;
    }
    *id = db_get_i64(res, 0, 0);
    char id_text[24];
    reg_id_text(*id, id_text);
    for (size_t i = 0; i < in->nfiles; i++) {
        char art[24];
        reg_id_text(in->file_ids[i], art);
        const char *fp[] = {id_text, in->file_names[i], art};
        if (db_exec(conn, REG_SQL_MODEL_FILE_INSERT, 3, fp, NULL, sqlstate, err, errlen) != 0) {
            reg_insert_error(conn, sqlstate, REG_MODEL, in->name, errors, status, err, errlen);
            goto out;
        }
    }
    if (db_commit(conn, err, errlen) != 0) {
        reg_db_error(conn, status);
        goto out;
    }
    log_info("model %lld: registered \"%s\" (%s, %s) for user %lld", (long long)*id, in->name,
             in->format, in->path ? "path" : "uploaded", (long long)in->owner_id);
    rc = reg_get(conn, REG_MODEL, *id, doc, status, err, errlen);
out:
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    PQclear(res);
    if (fields)
        for (size_t i = 0; i < nids; i++) free(fields[i]);
    free(fields);
    free(ids);
    return rc;
}

int reg_dataset_create(PGconn *conn, const reg_dataset_new *in, json_t *errors, int64_t *id,
                       char **doc, int *status, char *err, size_t errlen) {
    int rc = -1;
    PGresult *res = NULL;
    char *info = NULL;
    *doc = NULL;
    if (in->dataset_info) {
        info = json_dumps(in->dataset_info, JSON_COMPACT);
        if (!info) {
            *status = 500;
            err_set(err, errlen, "out of memory");
            goto out;
        }
    }
    if (db_begin(conn, err, errlen) != 0) {
        reg_db_error(conn, status);
        goto out;
    }
    const char *field = "artifact";
    if (in->artifact > 0 &&
        reg_check_artifacts(conn, &in->artifact, &field, 1, errors, status, err, errlen) != 0)
        goto out;
    if (json_array_size(errors) > 0) {
        *status = 400;
        err_set(err, errlen, "the dataset names an artifact that does not exist (see errors)");
        goto out;
    }
    char art[24], owner[24], sqlstate[6];
    reg_id_text(in->artifact, art);
    reg_id_text(in->owner_id, owner);
    const char *params[] = {in->name, in->format, in->path, in->artifact > 0 ? art : NULL,
                            info, owner};
    if (db_exec(conn, REG_SQL_DATASET_INSERT, 6, params, &res, sqlstate, err, errlen) != 0) {
        reg_insert_error(conn, sqlstate, REG_DATASET, in->name, errors, status, err, errlen);
        goto out;
    }
    *id = db_get_i64(res, 0, 0);
    if (db_commit(conn, err, errlen) != 0) {
        reg_db_error(conn, status);
        goto out;
    }
    log_info("dataset %lld: registered \"%s\" (%s, %s) for user %lld", (long long)*id, in->name,
             in->format, in->path ? "path" : "uploaded", (long long)in->owner_id);
    rc = reg_get(conn, REG_DATASET, *id, doc, status, err, errlen);
out:
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) db_rollback(conn);
    PQclear(res);
    free(info);
    return rc;
}

int reg_get(PGconn *conn, enum reg_kind kind, int64_t id, char **doc, int *status, char *err,
            size_t errlen) {
    char id_text[24];
    reg_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    *doc = NULL;
    if (db_exec(conn, REG_SQL_GET[kind], 1, params, &res, NULL, err, errlen) != 0)
        return reg_db_error(conn, status);
    if (PQntuples(res) == 0) {
        PQclear(res);
        *status = 404;
        return err_set(err, errlen, "no %s %s", reg_kind_name(kind), id_text);
    }
    *doc = strdup(PQgetvalue(res, 0, 0));
    PQclear(res);
    if (!*doc) {
        *status = 500;
        return err_set(err, errlen, "out of memory");
    }
    return 0;
}

int reg_list(PGconn *conn, enum reg_kind kind, const char *name, int64_t before_id, int limit,
             char **items, int64_t *next_id, int *status, char *err, size_t errlen) {
    char before[24], lim[16];
    reg_id_text(before_id, before);
    /* one more row than asked tells whether there is a next page */
    snprintf(lim, sizeof lim, "%d", limit + 1);
    const char *params[] = {name, before_id > 0 ? before : NULL, lim};
    PGresult *res = NULL;
    *items = NULL;
    *next_id = 0;
    if (db_exec(conn, REG_SQL_LIST[kind], 3, params, &res, NULL, err, errlen) != 0)
        return reg_db_error(conn, status);
    int n = PQntuples(res);
    size_t total = 3;
    for (int i = 0; i < n && i < limit; i++) total += (size_t)PQgetlength(res, i, 0) + 1;
    buf_t b;
    buf_init(&b, total);
    int w = buf_append(&b, "[", 1);
    for (int i = 0; i < n && i < limit && w == 0; i++) {
        if (i > 0) w = buf_append(&b, ",", 1);
        if (w == 0) w = buf_append(&b, PQgetvalue(res, i, 0), (size_t)PQgetlength(res, i, 0));
    }
    if (w == 0) w = buf_append(&b, "]", 1);
    if (n > limit) *next_id = db_get_i64(res, limit - 1, 1);
    PQclear(res);
    if (w != 0) {
        buf_free(&b);
        *status = 500;
        return err_set(err, errlen, "out of memory");
    }
    *items = buf_steal(&b);
    return 0;
}

int reg_exists(PGconn *conn, enum reg_kind kind, int64_t id, char *err, size_t errlen) {
    char id_text[24];
    reg_id_text(id, id_text);
    const char *params[] = {id_text};
    PGresult *res = NULL;
    if (db_exec(conn, REG_SQL_EXISTS[kind], 1, params, &res, NULL, err, errlen) != 0) return -1;
    int found = PQntuples(res) > 0;
    PQclear(res);
    return found;
}
