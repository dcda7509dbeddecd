/* spec.c - see spec.h. One validator per job kind; each checks types, ranges
 * and unknown fields, since a typo in a field name would otherwise be a silent
 * default. */
#include "spec.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* Cuts s before a trailing multibyte UTF-8 character that snprintf's
 * truncation left incomplete: jansson refuses such text, and the error that
 * carried it would be lost (a spec with an unknown field then passed). */
static void spec_utf8_trim(char *s) {
    size_t n = strlen(s), start = n;
    while (start > 0 && n - start < 3 && ((unsigned char)s[start - 1] & 0xC0) == 0x80) start--;
    if (start == 0) return;
    unsigned char lead = (unsigned char)s[start - 1];
    size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (n - (start - 1) < need) s[start - 1] = '\0';
}

void spec_error(json_t *errors, const char *field, const char *fmt, ...) {
    char message[512], name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    snprintf(name, sizeof name, "%s", field);
    spec_utf8_trim(message);
    spec_utf8_trim(name);
    json_t *e = json_pack("{s:s, s:s}", "field", name, "message", message);
    /* Still not UTF-8 (a caller's text was not): the error must not vanish. */
    if (!e) e = json_pack("{s:s, s:s}", "field", "spec", "message", "invalid (not UTF-8)");
    json_array_append_new(errors, e);
}

static bool spec_is_positive_id(json_t *v) {
    return json_is_integer(v) && json_integer_value(v) > 0;
}

/* Appends "\"a\"", "\"a\" or \"b\"", "\"a\", \"b\" or \"c\"" for the keys
 * (then "path" when path is true) to out. */
static void spec_key_list(const char *const *keys, bool path, char *out, size_t outlen) {
    const char *all[8];
    size_t n = 0;
    for (; keys[n] && n < 7; n++) all[n] = keys[n];
    if (path) all[n++] = "path";
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < n && used < outlen; i++) {
        const char *sep = i == 0 ? "" : i + 1 == n ? " or " : ", ";
        int w = snprintf(out + used, outlen - used, "%s\"%s\"", sep, all[i]);
        if (w < 0) return;
        used += (size_t)w;
    }
}

/* An input reference: exactly one of the id keys (ids: artifact, job, model,
 * dataset, ...) or, locally, path. example is shown when ref is not an
 * object. */
static void spec_check_ref_of(json_t *ref, const char *field, const char *const *ids,
                              const char *example, enum spec_mode mode, json_t *errors) {
    char sub[160]; /* field (< 80) + "." + key, truncated if longer */
    if (!ref) {
        spec_error(errors, field, "is required");
        return;
    }
    if (!json_is_object(ref)) {
        spec_error(errors, field, "must be an object such as %s", example);
        return;
    }
    int kinds = 0;
    const char *key;
    json_t *value;
    json_object_foreach(ref, key, value) {
        snprintf(sub, sizeof sub, "%s.%s", field, key);
        size_t i = 0;
        while (ids[i] && strcmp(ids[i], key) != 0) i++;
        if (ids[i]) {
            kinds++;
            if (!spec_is_positive_id(value)) spec_error(errors, sub, "must be a positive integer id");
        } else if (strcmp(key, "path") == 0 && mode == SPEC_LOCAL) {
            kinds++;
            if (!json_is_string(value) || json_string_length(value) == 0 ||
                strlen(json_string_value(value)) != json_string_length(value))
                spec_error(errors, sub, "must be a non-empty file path");
        } else {
            spec_error(errors, sub, "unknown field");
        }
    }
    char keys[200];
    spec_key_list(ids, mode == SPEC_LOCAL, keys, sizeof keys);
    if (kinds == 0)
        spec_error(errors, field, "needs %s%s", ids[1] || mode == SPEC_LOCAL ? "one of " : "",
                   keys);
    else if (kinds > 1)
        spec_error(errors, field, "must name exactly one input");
}

static const char *const spec_cka_ids[] = {"artifact", "job", NULL};

/* A cka input: {"artifact": ID} or {"job": ID} (or a local path). */
static void spec_check_ref(json_t *ref, const char *field, enum spec_mode mode, json_t *errors) {
    spec_check_ref_of(ref, field, spec_cka_ids, "{\"artifact\": 3} or {\"job\": 12}", mode,
                      errors);
}

/* "layers": "all" or a non-empty array of layer indices; unique is set when
 * an index may appear only once. */
static void spec_check_layers(json_t *value, const char *field, bool unique, json_t *errors) {
    if (json_is_string(value) && strcmp(json_string_value(value), "all") == 0) return;
    if (!json_is_array(value) || json_array_size(value) == 0 ||
        json_array_size(value) > SPEC_MAX_LAYER) {
        spec_error(errors, field, "must be \"all\" or a non-empty array of layer indices");
        return;
    }
    /* one bit per possible index: repeats are found in one pass */
    unsigned char seen[SPEC_MAX_LAYER / 8 + 1];
    memset(seen, 0, sizeof seen);
    size_t i;
    json_t *layer;
    json_array_foreach(value, i, layer) {
        char item[96];
        snprintf(item, sizeof item, "%s[%zu]", field, i);
        if (!json_is_integer(layer) || json_integer_value(layer) < 0 ||
            json_integer_value(layer) > SPEC_MAX_LAYER) {
            spec_error(errors, item, "must be a layer index (integer >= 0)");
            continue;
        }
        size_t index = (size_t)json_integer_value(layer);
        unsigned char bit = (unsigned char)(1u << (index % 8));
        if (unique && (seen[index / 8] & bit))
            spec_error(errors, item, "repeats layer %zu", index);
        seen[index / 8] |= bit;
    }
}

static int spec_validate_cka(json_t *spec, enum spec_mode mode, json_t *errors) {
    size_t before = json_array_size(errors);
    const char *key;
    json_t *value;
    json_object_foreach(spec, key, value) {
        char field[80];
        snprintf(field, sizeof field, "spec.%s", key);
        if (strcmp(key, "x") == 0 || strcmp(key, "y") == 0) {
            spec_check_ref(value, field, mode, errors);
        } else if (strcmp(key, "kernel") == 0) {
            if (!json_is_string(value) ||
                (strcmp(json_string_value(value), "linear") != 0 &&
                 strcmp(json_string_value(value), "rbf") != 0))
                spec_error(errors, field, "must be \"linear\" or \"rbf\"");
        } else if (strcmp(key, "debiased") == 0) {
            if (!json_is_boolean(value)) spec_error(errors, field, "must be true or false");
        } else if (strcmp(key, "rbf_threshold") == 0) {
            if (!json_is_number(value) || json_number_value(value) <= 0 ||
                json_number_value(value) > 1e6)
                spec_error(errors, field, "must be a number in (0, 1e6]");
        } else if (strcmp(key, "layers") == 0) {
            spec_check_layers(value, field, false, errors);
        } else {
            spec_error(errors, field, "unknown field");
        }
    }
    if (!json_object_get(spec, "x")) spec_error(errors, "spec.x", "is required");
    if (!json_object_get(spec, "y")) spec_error(errors, "spec.y", "is required");
    /* Layers select among a predict job's per-layer files; with two single
     * matrices they would be silently ignored. */
    if (json_object_get(spec, "layers") && json_array_size(errors) == before &&
        json_object_get(json_object_get(spec, "x"), "artifact") &&
        json_object_get(json_object_get(spec, "y"), "artifact"))
        spec_error(errors, "spec.layers",
                   "applies only to per-layer inputs ({\"job\": ID}); x and y are single artifacts");
    return json_array_size(errors) > before ? -1 : 0;
}

/* One of the strings of a NULL-terminated list. */
static bool spec_is_one_of(json_t *v, const char *const *choices) {
    if (!json_is_string(v)) return false;
    for (size_t i = 0; choices[i]; i++)
        if (strcmp(json_string_value(v), choices[i]) == 0) return true;
    return false;
}

static const char *const spec_predict_model_ids[] = {"model", NULL};
static const char *const spec_predict_adapter_ids[] = {"job", "artifact", NULL};
static const char *const spec_predict_dataset_ids[] = {"dataset", NULL};
static const char *const spec_templates[] = {"llama2", "alpaca", "default", "vanilla", NULL};
static const char *const spec_pools[] = {"last_token", "mean", "mean_after_system", NULL};
static const char *const spec_dtypes[] = {"float16", "float32", NULL};
static const char *const spec_dataset_formats[] = {"alpaca", "flan", NULL};

/* "generate": {"max_new_tokens": 1..4096}. */
static void spec_check_generate(json_t *value, json_t *errors) {
    if (!json_is_object(value)) {
        spec_error(errors, "spec.generate", "must be an object such as {\"max_new_tokens\": 64}");
        return;
    }
    const char *key;
    json_t *v;
    json_object_foreach(value, key, v) {
        char field[300];
        snprintf(field, sizeof field, "spec.generate.%s", key);
        if (strcmp(key, "max_new_tokens") != 0)
            spec_error(errors, field, "unknown field");
        else if (!json_is_integer(v) || json_integer_value(v) < 1 ||
                 json_integer_value(v) > SPEC_MAX_NEW_TOKENS)
            spec_error(errors, field, "must be an integer from 1 to %d", SPEC_MAX_NEW_TOKENS);
    }
    if (!json_object_get(value, "max_new_tokens"))
        spec_error(errors, "spec.generate.max_new_tokens", "is required");
}

static int spec_validate_predict(json_t *spec, enum spec_mode mode, json_t *errors) {
    size_t before = json_array_size(errors);
    const char *key;
    json_t *value;
    json_object_foreach(spec, key, value) {
        char field[80];
        snprintf(field, sizeof field, "spec.%s", key);
        if (strcmp(key, "model") == 0) {
            spec_check_ref_of(value, field, spec_predict_model_ids, "{\"model\": 3}", mode,
                              errors);
        } else if (strcmp(key, "adapter") == 0) {
            /* null: no adapter, as when the field is left out */
            if (!json_is_null(value))
                spec_check_ref_of(value, field, spec_predict_adapter_ids,
                                  "{\"job\": 12} (a train job) or {\"artifact\": 7}", mode,
                                  errors);
        } else if (strcmp(key, "dataset") == 0) {
            spec_check_ref_of(value, field, spec_predict_dataset_ids, "{\"dataset\": 5}", mode,
                              errors);
        } else if (strcmp(key, "template") == 0) {
            if (!spec_is_one_of(value, spec_templates))
                spec_error(errors, field,
                           "must be \"llama2\" (default), \"alpaca\", \"default\" or \"vanilla\"");
        } else if (strcmp(key, "max_samples") == 0) {
            if (!json_is_integer(value) || json_integer_value(value) < 1 ||
                json_integer_value(value) > SPEC_MAX_SAMPLES)
                spec_error(errors, field, "must be an integer from 1 to %d", SPEC_MAX_SAMPLES);
        } else if (strcmp(key, "pool") == 0) {
            if (!spec_is_one_of(value, spec_pools))
                spec_error(errors, field,
                           "must be \"last_token\" (default), \"mean\" or \"mean_after_system\"");
        } else if (strcmp(key, "layers") == 0) {
            spec_check_layers(value, field, true, errors);
        } else if (strcmp(key, "dtype") == 0) {
            if (!spec_is_one_of(value, spec_dtypes))
                spec_error(errors, field, "must be \"float16\" (default) or \"float32\"");
        } else if (strcmp(key, "batch_size") == 0) {
            if (!json_is_integer(value) || json_integer_value(value) < 1 ||
                json_integer_value(value) > SPEC_MAX_BATCH)
                spec_error(errors, field, "must be an integer from 1 to %d", SPEC_MAX_BATCH);
        } else if (strcmp(key, "generate") == 0) {
            spec_check_generate(value, errors);
        } else if (strcmp(key, "format") == 0) {
            if (!spec_is_one_of(value, spec_dataset_formats))
                spec_error(errors, field, "must be \"alpaca\" or \"flan\"");
        } else {
            spec_error(errors, field, "unknown field");
        }
    }
    if (!json_object_get(spec, "model")) spec_error(errors, "spec.model", "is required");
    if (!json_object_get(spec, "dataset")) spec_error(errors, "spec.dataset", "is required");
    /* A registered dataset carries its format; only a bare local file needs
     * telling (when its content does not). */
    json_t *dataset = json_object_get(spec, "dataset");
    if (json_object_get(spec, "format") && json_is_object(dataset) &&
        !json_object_get(dataset, "path"))
        spec_error(errors, "spec.format",
                   "applies only to a local dataset file ({\"path\": ...}); a registered dataset "
                   "has its format");
    return json_array_size(errors) > before ? -1 : 0;
}

bool spec_known_kind(const char *kind) {
    return kind && (strcmp(kind, "cka") == 0 || strcmp(kind, "predict") == 0);
}

int spec_validate(const char *kind, json_t *spec, enum spec_mode mode, json_t *errors) {
    if (!json_is_object(spec)) {
        spec_error(errors, "spec", "must be an object");
        return -1;
    }
    if (kind && strcmp(kind, "cka") == 0) return spec_validate_cka(spec, mode, errors);
    if (kind && strcmp(kind, "predict") == 0) return spec_validate_predict(spec, mode, errors);
    spec_error(errors, "kind", "unknown job kind \"%s\" (this server runs: cka, predict)",
               kind ? kind : "");
    return -1;
}
