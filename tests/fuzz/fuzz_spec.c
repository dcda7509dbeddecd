/* fuzz_spec.c - fuzz target for job-spec validation. The input is JSON text,
 * parsed as the server parses a request body (json_loadb with
 * JSON_REJECT_DUPLICATES) and as the worker parses a local spec file (no
 * flags).
 *
 * The parsed value goes to spec_validate as a spec for every kind the API may
 * be sent (the real one and unknown ones) in both modes; when it looks like a
 * POST /api/v1/jobs body ({"kind": ..., "spec": ...}) its own kind and spec go
 * too. Checked beyond "no crash, no leak": spec_validate returns -1 exactly
 * when it added errors (the server creates the job when it added none), every
 * error is a {"field", "message"} pair of strings that serialises, a spec valid
 * for the server is valid locally (local runs accept more), a kind with a
 * valid spec is one the server accepts (spec_known_kind), and a valid cka
 * spec names both inputs (a valid predict spec its model and dataset). */
#include "tests/fuzz/fuzz.h"

#include <jansson.h>
#include <string.h>

#include "common/spec.h"

static const char *const fuzz_spec_kinds[] = {"cka", "train", "predict", "", "CKA"};

/* The fields a valid cka spec and its input references may have (API.md):
 * an accepted spec with any other key means an error was lost. */
static const char *const fuzz_spec_cka_keys[] = {"x",        "y",      "kernel", "debiased",
                                                 "rbf_threshold", "layers", NULL};
static const char *const fuzz_spec_ref_keys[] = {"artifact", "job", "path", NULL};
/* The same for predict specs and their references. */
static const char *const fuzz_spec_predict_keys[] = {
    "model", "adapter", "dataset", "template", "max_samples", "pool", "layers", "dtype",
    "batch_size", "generate", "format", NULL};
static const char *const fuzz_spec_model_keys[] = {"model", "path", NULL};
static const char *const fuzz_spec_adapter_keys[] = {"job", "artifact", "path", NULL};
static const char *const fuzz_spec_dataset_keys[] = {"dataset", "path", NULL};

static void fuzz_spec_check_known(json_t *object, const char *const *known) {
    const char *key;
    json_t *value;
    json_object_foreach(object, key, value) {
        size_t i = 0;
        while (known[i] && strcmp(known[i], key) != 0) i++;
        FUZZ_CHECK(known[i] != NULL);
    }
}

/* Validates spec for kind in mode, checks the result's shape, and returns
 * spec_validate's result. */
static int fuzz_spec_run(const char *kind, json_t *spec, enum spec_mode mode) {
    json_t *errors = json_array();
    FUZZ_CHECK(errors != NULL);
    int rc = spec_validate(kind, spec, mode, errors);
    FUZZ_CHECK(rc == 0 || rc == -1);
    /* The server decides on the array, not on rc: they must agree. */
    FUZZ_CHECK((rc == -1) == (json_array_size(errors) > 0));
    size_t i;
    json_t *e;
    json_array_foreach(errors, i, e) {
        FUZZ_CHECK(json_is_object(e) && json_object_size(e) == 2);
        FUZZ_CHECK(json_is_string(json_object_get(e, "field")));
        FUZZ_CHECK(json_string_length(json_object_get(e, "field")) > 0);
        FUZZ_CHECK(json_is_string(json_object_get(e, "message")));
    }
    char *text = json_dumps(errors, JSON_COMPACT);
    FUZZ_CHECK(text != NULL);
    free(text);
    json_decref(errors);
    if (rc == 0) FUZZ_CHECK(spec_known_kind(kind));
    if (rc == 0 && kind && strcmp(kind, "predict") == 0) {
        fuzz_spec_check_known(spec, fuzz_spec_predict_keys);
        FUZZ_CHECK(json_is_object(json_object_get(spec, "model")));
        FUZZ_CHECK(json_is_object(json_object_get(spec, "dataset")));
        fuzz_spec_check_known(json_object_get(spec, "model"), fuzz_spec_model_keys);
        fuzz_spec_check_known(json_object_get(spec, "dataset"), fuzz_spec_dataset_keys);
        json_t *adapter = json_object_get(spec, "adapter");
        if (json_is_object(adapter))
            fuzz_spec_check_known(adapter, fuzz_spec_adapter_keys);
        else
            FUZZ_CHECK(!adapter || json_is_null(adapter));
    } else if (rc == 0) {
        FUZZ_CHECK(kind && strcmp(kind, "cka") == 0);
        fuzz_spec_check_known(spec, fuzz_spec_cka_keys);
        FUZZ_CHECK(json_is_object(json_object_get(spec, "x")));
        FUZZ_CHECK(json_is_object(json_object_get(spec, "y")));
        fuzz_spec_check_known(json_object_get(spec, "x"), fuzz_spec_ref_keys);
        fuzz_spec_check_known(json_object_get(spec, "y"), fuzz_spec_ref_keys);
    }
    return rc;
}

/* Both modes, with the mode relation checked. */
static void fuzz_spec_both(const char *kind, json_t *spec) {
    int server = fuzz_spec_run(kind, spec, SPEC_SERVER);
    int local = fuzz_spec_run(kind, spec, SPEC_LOCAL);
    if (server == 0) FUZZ_CHECK(local == 0);
}

static void fuzz_spec_value(json_t *root) {
    for (size_t i = 0; i < sizeof fuzz_spec_kinds / sizeof fuzz_spec_kinds[0]; i++)
        fuzz_spec_both(fuzz_spec_kinds[i], root);
    fuzz_spec_both(NULL, root);

    /* A whole job body: its kind (any string, as the server passes it) with
     * its spec, or with {} when absent, as api_jobs_create does. */
    json_t *kind = json_object_get(root, "kind");
    if (json_is_string(kind)) {
        json_t *spec = json_object_get(root, "spec");
        json_t *empty = json_object();
        fuzz_spec_both(json_string_value(kind), spec ? spec : empty);
        json_decref(empty);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const size_t flags[] = {JSON_REJECT_DUPLICATES, 0};
    json_t *first = NULL;
    for (size_t f = 0; f < sizeof flags / sizeof flags[0]; f++) {
        json_error_t jerr;
        json_t *root = json_loadb((const char *)data, size, flags[f], &jerr);
        if (!root) continue;
        /* The same text with fewer checks parses to the same value; only
         * validate it again when it differs. */
        if (!first) {
            fuzz_spec_value(root);
            first = root;
        } else {
            if (!json_equal(first, root)) fuzz_spec_value(root);
            json_decref(root);
        }
    }
    json_decref(first);
    return 0;
}
