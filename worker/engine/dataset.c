/* dataset.c - see dataset.h. The container (a JSON array, or one JSON object
 * per line) is told from the content; the record layout (alpaca columns or
 * flan's inputs/targets/task) from the format, which AUTO takes from the
 * container: an array is alpaca, lines are flan. */
#include "worker/engine/dataset.h"

#include "common/util.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define DS_MAX_REGISTRY (16u << 20)

const ds_columns ds_alpaca_columns = {"instruction", "input", "output", "system"};

int ds_format_parse(const char *s, enum ds_format *out) {
    if (strcmp(s, "auto") == 0) *out = DS_FORMAT_AUTO;
    else if (strcmp(s, "alpaca") == 0) *out = DS_FORMAT_ALPACA;
    else if (strcmp(s, "flan") == 0) *out = DS_FORMAT_FLAN;
    else return -1;
    return 0;
}

const char *ds_format_name(enum ds_format f) {
    return f == DS_FORMAT_ALPACA ? "alpaca" : f == DS_FORMAT_FLAN ? "flan" : "auto";
}

static void ds_example_free(ds_example *e) {
    free(e->system);
    free(e->query);
    free(e->response);
    free(e->task);
}

void ds_free(ds_dataset *d) {
    for (size_t i = 0; i < d->n; i++) ds_example_free(&d->items[i]);
    free(d->items);
    d->items = NULL;
    d->n = 0;
}

/* Where a record sits, for errors: "file: record 3" or "file: line 4". */
typedef struct {
    const char *name;
    const char *unit; /* "record" or "line" */
    size_t index;
} ds_where;

/* Reads an optional string field: absent or null gives *out = NULL (no
 * copy); a string is copied. Returns 0, or -1 with err for another type. */
static int ds_opt_string(const json_t *rec, const char *key, const ds_where *w, char **out,
                         char *err, size_t errlen) {
    *out = NULL;
    if (!key) return 0;
    const json_t *v = json_object_get(rec, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v))
        return err_set(err, errlen, "%s: %s %zu: \"%s\" is not a string", w->name, w->unit, w->index,
                       key);
    *out = strndup(json_string_value(v), json_string_length(v));
    if (!*out) return err_set(err, errlen, "out of memory");
    return 0;
}

/* Reads a required string field into a fresh copy. Returns 0 or -1. */
static int ds_req_string(const json_t *rec, const char *key, const ds_where *w, char **out,
                         char *err, size_t errlen) {
    const json_t *v = json_object_get(rec, key);
    if (!v) {
        *out = NULL;
        return err_set(err, errlen, "%s: %s %zu: \"%s\" is missing", w->name, w->unit, w->index, key);
    }
    return ds_opt_string(rec, key, w, out, err, errlen) != 0 ? -1
           : *out                                         ? 0
           : err_set(err, errlen, "%s: %s %zu: \"%s\" is null", w->name, w->unit, w->index, key);
}

/* Turns one alpaca record into an example: query = prompt, joined to a
 * non-empty query column by "\n" (an empty prompt leaves the query column
 * alone); an empty system counts as none. Returns 0 or -1 (e untouched). */
static int ds_alpaca_record(const json_t *rec, const ds_columns *c, const ds_where *w,
                            ds_example *e, char *err, size_t errlen) {
    char *prompt = NULL, *input = NULL, *response = NULL, *system = NULL;
    int rc = -1;
    if (!json_is_object(rec)) {
        err_set(err, errlen, "%s: %s %zu: not a JSON object", w->name, w->unit, w->index);
        goto out;
    }
    if (ds_req_string(rec, c->prompt, w, &prompt, err, errlen) != 0 ||
        ds_opt_string(rec, c->query, w, &input, err, errlen) != 0 ||
        ds_req_string(rec, c->response, w, &response, err, errlen) != 0 ||
        ds_opt_string(rec, c->system, w, &system, err, errlen) != 0)
        goto out;
    size_t pl = strlen(prompt), il = input ? strlen(input) : 0;
    if (pl == 0 && il == 0) {
        err_set(err, errlen, "%s: %s %zu: \"%s\" and \"%s\" are both empty", w->name, w->unit,
                w->index, c->prompt, c->query ? c->query : "(no query column)");
        goto out;
    }
    char *query = malloc(pl + il + 2);
    if (!query) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    memcpy(query, prompt, pl);
    size_t ql = pl;
    if (il) {
        if (pl) query[ql++] = '\n';
        memcpy(query + ql, input, il);
        ql += il;
    }
    query[ql] = '\0';
    if (system && !*system) {
        free(system);
        system = NULL;
    }
    *e = (ds_example){.system = system, .query = query, .response = response, .task = NULL};
    system = response = NULL;
    rc = 0;
out:
    free(prompt);
    free(input);
    free(response);
    free(system);
    return rc;
}

/* Turns one flan record {"inputs", "targets", "task"?} into an example. */
static int ds_flan_record(const json_t *rec, const ds_where *w, ds_example *e, char *err,
                          size_t errlen) {
    ds_example x = {0};
    if (!json_is_object(rec))
        return err_set(err, errlen, "%s: %s %zu: not a JSON object", w->name, w->unit, w->index);
    if (ds_req_string(rec, "inputs", w, &x.query, err, errlen) != 0 ||
        ds_req_string(rec, "targets", w, &x.response, err, errlen) != 0 ||
        ds_opt_string(rec, "task", w, &x.task, err, errlen) != 0)
        goto fail;
    if (!*x.query) {
        err_set(err, errlen, "%s: %s %zu: \"inputs\" is empty", w->name, w->unit, w->index);
        goto fail;
    }
    *e = x;
    return 0;
fail:
    ds_example_free(&x);
    return -1;
}

/* Appends a parsed record to d (growing by doubling). Returns 0 or -1. */
static int ds_push(ds_dataset *d, size_t *cap, const ds_example *e) {
    if (d->n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 64;
        ds_example *items = realloc(d->items, ncap * sizeof *items);
        if (!items) return -1;
        d->items = items;
        *cap = ncap;
    }
    d->items[d->n++] = *e;
    return 0;
}

static int ds_record(const json_t *rec, enum ds_format fmt, const ds_columns *cols,
                     const ds_where *w, ds_dataset *d, size_t *cap, char *err, size_t errlen) {
    ds_example e;
    if (fmt == DS_FORMAT_FLAN ? ds_flan_record(rec, w, &e, err, errlen)
                              : ds_alpaca_record(rec, cols, w, &e, err, errlen))
        return -1;
    if (ds_push(d, cap, &e) != 0) {
        ds_example_free(&e);
        return err_set(err, errlen, "out of memory");
    }
    return 0;
}

/* A JSON array of records. */
static int ds_parse_array(const char *name, const char *data, size_t len, enum ds_format fmt,
                          const ds_columns *cols, size_t max, ds_dataset *d, char *err,
                          size_t errlen) {
    json_error_t jerr;
    json_t *root = json_loadb(data, len, 0, &jerr);
    if (!root)
        return err_set(err, errlen, "%s: not valid JSON (line %d, column %d: %s)", name, jerr.line,
                       jerr.column, jerr.text);
    int rc = -1;
    size_t cap = 0;
    if (!json_is_array(root)) {
        err_set(err, errlen, "%s: not a JSON array of records", name);
        goto out;
    }
    for (size_t i = 0; i < json_array_size(root) && (max == 0 || d->n < max); i++) {
        ds_where w = {name, "record", i};
        if (ds_record(json_array_get(root, i), fmt, cols, &w, d, &cap, err, errlen) != 0) goto out;
    }
    rc = 0;
out:
    json_decref(root);
    return rc;
}

/* One JSON object per line; blank lines are skipped. */
static int ds_parse_lines(const char *name, const char *data, size_t len, enum ds_format fmt,
                          const ds_columns *cols, size_t max, ds_dataset *d, char *err,
                          size_t errlen) {
    size_t cap = 0, line = 0;
    for (size_t pos = 0; pos < len && (max == 0 || d->n < max);) {
        const char *nl = memchr(data + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - data) : len;
        line++;
        bool blank = true;
        for (size_t i = pos; i < end && blank; i++)
            blank = data[i] == ' ' || data[i] == '\t' || data[i] == '\r';
        if (!blank) {
            json_error_t jerr;
            json_t *rec = json_loadb(data + pos, end - pos, 0, &jerr);
            if (!rec)
                return err_set(err, errlen, "%s: line %zu: not valid JSON (column %d: %s)", name,
                               line, jerr.column, jerr.text);
            ds_where w = {name, "line", line};
            int rc = ds_record(rec, fmt, cols, &w, d, &cap, err, errlen);
            json_decref(rec);
            if (rc != 0) return -1;
        }
        pos = end + 1;
    }
    return 0;
}

int ds_parse(const char *name, const char *data, size_t len, enum ds_format fmt,
             const ds_columns *cols, size_t max_examples, ds_dataset *out, char *err,
             size_t errlen) {
    out->items = NULL;
    out->n = 0;
    if (!cols) cols = &ds_alpaca_columns;
    if (!cols->prompt || !cols->response)
        return err_set(err, errlen, "%s: the prompt and response columns must be named", name);
    size_t first = 0;
    while (first < len && (data[first] == ' ' || data[first] == '\t' || data[first] == '\r' ||
                           data[first] == '\n'))
        first++;
    if (first == len) return err_set(err, errlen, "%s: empty file", name);
    bool array = data[first] == '[';
    if (!array && data[first] != '{')
        return err_set(err, errlen, "%s: neither a JSON array (alpaca) nor JSON lines (flan)", name);
    if (fmt == DS_FORMAT_AUTO) fmt = array ? DS_FORMAT_ALPACA : DS_FORMAT_FLAN;
    int rc = array ? ds_parse_array(name, data, len, fmt, cols, max_examples, out, err, errlen)
                   : ds_parse_lines(name, data, len, fmt, cols, max_examples, out, err, errlen);
    if (rc == 0 && out->n == 0) rc = err_set(err, errlen, "%s: no records", name);
    if (rc != 0) ds_free(out);
    return rc;
}

/* ds_parse on a file with the given columns. */
static int ds_load_cols(const char *path, enum ds_format fmt, const ds_columns *cols,
                        size_t max_examples, ds_dataset *out, char *err, size_t errlen) {
    out->items = NULL;
    out->n = 0;
    char *data;
    size_t len;
    char why[ERR_LEN];
    if (util_read_file(path, DS_MAX_FILE, &data, &len, why, sizeof why) != 0)
        return err_set(err, errlen, "%s: %s", path, why);
    int rc = ds_parse(path, data, len, fmt, cols, max_examples, out, err, errlen);
    free(data);
    return rc;
}

int ds_load(const char *path, enum ds_format fmt, size_t max_examples, ds_dataset *out,
            char *err, size_t errlen) {
    return ds_load_cols(path, fmt, NULL, max_examples, out, err, errlen);
}

/* A file_name inside the registry's directory: relative, no ".." part. */
static bool ds_safe_relative(const char *p) {
    if (!*p || *p == '/') return false;
    for (const char *s = p; *s;) {
        const char *e = strchr(s, '/');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        if (n == 2 && s[0] == '.' && s[1] == '.') return false;
        if (!e) break;
        s = e + 1;
    }
    return true;
}

/* Reads a registry entry's "columns" over the defaults. Returns 0 or -1. */
static int ds_registry_columns(const json_t *entry, const char *info, const char *name,
                               ds_columns *c, char *err, size_t errlen) {
    *c = ds_alpaca_columns;
    const json_t *cols = json_object_get(entry, "columns");
    if (!cols || json_is_null(cols)) return 0;
    if (!json_is_object(cols))
        return err_set(err, errlen, "%s: %s.columns: not an object", info, name);
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)cols, key, v) {
        const char **slot = strcmp(key, "prompt") == 0     ? &c->prompt
                            : strcmp(key, "query") == 0    ? &c->query
                            : strcmp(key, "response") == 0 ? &c->response
                            : strcmp(key, "system") == 0   ? &c->system
                                                           : NULL;
        if (!slot)
            return err_set(err, errlen, "%s: %s.columns.%s: not supported (prompt, query, response, system)",
                           info, name, key);
        if (json_is_null(v) && slot != &c->prompt && slot != &c->response) {
            *slot = NULL;
            continue;
        }
        if (!json_is_string(v) || json_string_length(v) == 0)
            return err_set(err, errlen, "%s: %s.columns.%s: not a column name", info, name, key);
        *slot = json_string_value(v);
    }
    return 0;
}

int ds_load_registry(const char *info_path, const char *name, size_t max_examples,
                     ds_dataset *out, char *err, size_t errlen) {
    out->items = NULL;
    out->n = 0;
    char *data = NULL, *path = NULL, why[ERR_LEN];
    size_t len;
    json_t *root = NULL;
    int rc = -1;
    if (util_read_file(info_path, DS_MAX_REGISTRY, &data, &len, why, sizeof why) != 0) {
        err_set(err, errlen, "%s: %s", info_path, why);
        goto out;
    }
    json_error_t jerr;
    root = json_loadb(data, len, 0, &jerr);
    if (!json_is_object(root)) {
        err_set(err, errlen, "%s: not a JSON object", info_path);
        goto out;
    }
    const json_t *entry = json_object_get(root, name);
    if (!json_is_object(entry)) {
        err_set(err, errlen, "%s: no dataset \"%s\"", info_path, name);
        goto out;
    }
    const json_t *file = json_object_get(entry, "file_name");
    if (!json_is_string(file)) {
        err_set(err, errlen, "%s: %s.file_name: missing (only local files are supported)", info_path,
                name);
        goto out;
    }
    if (!ds_safe_relative(json_string_value(file))) {
        err_set(err, errlen, "%s: %s.file_name: must be a path inside the registry's directory",
                info_path, name);
        goto out;
    }
    const json_t *fmt = json_object_get(entry, "formatting");
    if (fmt && !(json_is_string(fmt) && strcmp(json_string_value(fmt), "alpaca") == 0)) {
        err_set(err, errlen, "%s: %s.formatting: only \"alpaca\" is supported", info_path, name);
        goto out;
    }
    ds_columns cols;
    if (ds_registry_columns(entry, info_path, name, &cols, err, errlen) != 0) goto out;
    const char *slash = strrchr(info_path, '/');
    int dirlen = slash ? (int)(slash - info_path) + 1 : 0;
    size_t plen = (size_t)dirlen + json_string_length(file) + 1;
    path = malloc(plen);
    if (!path) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    snprintf(path, plen, "%.*s%s", dirlen, info_path, json_string_value(file));
    rc = ds_load_cols(path, DS_FORMAT_ALPACA, &cols, max_examples, out, err, errlen);
out:
    json_decref(root);
    free(data);
    free(path);
    return rc;
}
