/* dataset.h - instruction datasets: LLaMA-Factory's alpaca JSON (with its
 * dataset_info.json registry) and the Flan 2021 JSONL layout.
 *
 * alpaca: a JSON array of objects {"instruction", "input"?, "output",
 *   "system"?} (the column names can be remapped by dataset_info.json's
 *   "columns": prompt, query, response, system). The query is the
 *   instruction joined to a non-empty input by "\n", as LLaMA-Factory does
 *   (an empty instruction leaves the input alone).
 * flan: one JSON object per line {"inputs", "targets", "task"?}; blank lines
 *   are skipped. The query is inputs, the response targets.
 * A malformed record fails the whole load with an error naming the file and
 * the record (array index for alpaca, 1-based line for flan). */
#ifndef STRATA_DATASET_H
#define STRATA_DATASET_H

#include <stddef.h>

#define DS_MAX_FILE ((size_t)1 << 30) /* largest dataset file read */

enum ds_format { DS_FORMAT_AUTO = 0, DS_FORMAT_ALPACA, DS_FORMAT_FLAN };

typedef struct {
    char *system;   /* NULL when the record has none (templates insert their default) */
    char *query;    /* never NULL */
    char *response; /* never NULL; "" when the record has no output */
    char *task;     /* flan's task, NULL when absent */
} ds_example;

typedef struct {
    ds_example *items;
    size_t n;
} ds_dataset;

/* Column names of the alpaca layout; NULL means "not read". */
typedef struct {
    const char *prompt, *query, *response, *system;
} ds_columns;

/* The defaults: instruction, input, output, system. */
extern const ds_columns ds_alpaca_columns;

/* Parses "alpaca", "flan" or "auto". Returns 0 or -1. */
int ds_format_parse(const char *s, enum ds_format *out);
const char *ds_format_name(enum ds_format f);

/* Parses a dataset held in memory; name is only used in errors. AUTO tells
 * the layouts apart by the first non-blank byte ('[' alpaca, '{' flan).
 * Reads at most max_examples records (0: all). cols may be NULL (defaults;
 * ignored for flan). Returns 0 with *out filled (free with ds_free), or -1
 * with err naming the file and record; *out is then empty. */
int ds_parse(const char *name, const char *data, size_t len, enum ds_format fmt,
             const ds_columns *cols, size_t max_examples, ds_dataset *out, char *err,
             size_t errlen);

/* ds_parse on a file (at most DS_MAX_FILE bytes). */
int ds_load(const char *path, enum ds_format fmt, size_t max_examples, ds_dataset *out,
            char *err, size_t errlen);

/* Loads dataset name from a LLaMA-Factory registry: info_path is a
 * dataset_info.json mapping names to {"file_name", "columns"?,
 * "formatting"?}; file_name is relative to the registry's directory (and may
 * not leave it). formatting must be "alpaca" when given. Returns 0 or -1. */
int ds_load_registry(const char *info_path, const char *name, size_t max_examples,
                     ds_dataset *out, char *err, size_t errlen);

void ds_free(ds_dataset *d);

#endif
