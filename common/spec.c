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

/* An input reference: exactly one of artifact / job (/ path locally). */
static void spec_check_ref(json_t *ref, const char *field, enum spec_mode mode, json_t *errors) {
    char sub[160]; /* field (< 80) + "." + key, truncated if longer */
    if (!ref) {
        spec_error(errors, field, "is required");
        return;
    }
    if (!json_is_object(ref)) {
        spec_error(errors, field, "must be an object such as {\"artifact\": 3} or {\"job\": 12}");
        return;
    }
    int kinds = 0;
    const char *key;
    json_t *value;
    json_object_foreach(ref, key, value) {
        snprintf(sub, sizeof sub, "%s.%s", field, key);
        if (strcmp(key, "artifact") == 0 || strcmp(key, "job") == 0) {
            kinds++;
            if (!spec_is_positive_id(value)) spec_error(errors, sub, "must be a positive integer id");
        } else if (strcmp(key, "path") == 0 && mode == SPEC_LOCAL) {
            kinds++;
            if (!json_is_string(value) || json_string_length(value) == 0)
                spec_error(errors, sub, "must be a non-empty file path");
        } else {
            spec_error(errors, sub, "unknown field");
        }
    }
    if (kinds == 0)
        spec_error(errors, field,
                   mode == SPEC_LOCAL ? "needs one of \"artifact\", \"job\" or \"path\""
                                      : "needs one of \"artifact\" or \"job\"");
    else if (kinds > 1)
        spec_error(errors, field, "must name exactly one input");
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
            if (json_is_string(value) && strcmp(json_string_value(value), "all") == 0) continue;
            if (!json_is_array(value) || json_array_size(value) == 0 ||
                json_array_size(value) > 100000) {
                spec_error(errors, field, "must be \"all\" or a non-empty array of layer indices");
                continue;
            }
            size_t i;
            json_t *layer;
            json_array_foreach(value, i, layer) {
                if (!json_is_integer(layer) || json_integer_value(layer) < 0 ||
                    json_integer_value(layer) > 100000) {
                    char item[96];
                    snprintf(item, sizeof item, "spec.layers[%zu]", i);
                    spec_error(errors, item, "must be a layer index (integer >= 0)");
                }
            }
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

bool spec_known_kind(const char *kind) { return kind && strcmp(kind, "cka") == 0; }

int spec_validate(const char *kind, json_t *spec, enum spec_mode mode, json_t *errors) {
    if (!json_is_object(spec)) {
        spec_error(errors, "spec", "must be an object");
        return -1;
    }
    if (kind && strcmp(kind, "cka") == 0) return spec_validate_cka(spec, mode, errors);
    spec_error(errors, "kind", "unknown job kind \"%s\" (this server runs: cka)",
               kind ? kind : "");
    return -1;
}
