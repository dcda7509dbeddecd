/* test_spec.c - spec_validate: good specs pass in both modes; each bad field
 * is reported with the API's field path and a message that says what is
 * expected. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "common/spec.h"

/* Validates the JSON text; returns the error array (caller frees). */
static json_t *validate(const char *kind, const char *text, enum spec_mode mode, int *rc) {
    json_error_t jerr;
    json_t *spec = json_loads(text, JSON_DECODE_ANY, &jerr);
    if (!spec) fail_msg("bad test JSON %s: %s", text, jerr.text);
    json_t *errors = json_array();
    *rc = spec_validate(kind, spec, mode, errors);
    json_decref(spec);
    return errors;
}

/* Asserts that errors holds an entry for field whose message contains needle. */
static void expect_error(json_t *errors, const char *field, const char *needle) {
    size_t i;
    json_t *e;
    json_array_foreach(errors, i, e) {
        const char *f = json_string_value(json_object_get(e, "field"));
        const char *m = json_string_value(json_object_get(e, "message"));
        if (f && m && strcmp(f, field) == 0 && strstr(m, needle)) return;
    }
    char *dump = json_dumps(errors, JSON_COMPACT);
    fail_msg("no error {%s: ...%s...} in %s", field, needle, dump ? dump : "?");
}

static void expect_one(const char *text, enum spec_mode mode, const char *field,
                       const char *needle) {
    int rc;
    json_t *errors = validate("cka", text, mode, &rc);
    assert_int_equal(rc, -1);
    expect_error(errors, field, needle);
    json_decref(errors);
}

static void test_good_specs(void **state) {
    (void)state;
    const char *server[] = {
        "{\"x\": {\"artifact\": 3}, \"y\": {\"artifact\": 4}}",
        "{\"x\": {\"artifact\": 3}, \"y\": {\"artifact\": 4}, \"kernel\": \"linear\", "
        "\"debiased\": true}",
        "{\"x\": {\"job\": 12}, \"y\": {\"job\": 13}, \"layers\": [1, 2, 30]}",
        "{\"x\": {\"job\": 12}, \"y\": {\"job\": 13}, \"layers\": \"all\"}",
        "{\"x\": {\"artifact\": 1}, \"y\": {\"artifact\": 2}, \"kernel\": \"rbf\", "
        "\"rbf_threshold\": 0.5}",
        "{\"x\": {\"artifact\": 1}, \"y\": {\"artifact\": 2}, \"rbf_threshold\": 1000000}",
    };
    for (size_t i = 0; i < sizeof server / sizeof server[0]; i++) {
        for (int mode = SPEC_SERVER; mode <= SPEC_LOCAL; mode++) {
            int rc;
            json_t *errors = validate("cka", server[i], (enum spec_mode)mode, &rc);
            if (rc != 0 || json_array_size(errors) != 0) fail_msg("rejected: %s", server[i]);
            json_decref(errors);
        }
    }
    int rc;
    json_t *errors = validate("cka", "{\"x\": {\"path\": \"a.npy\"}, \"y\": {\"path\": \"dir\"}}",
                              SPEC_LOCAL, &rc);
    assert_int_equal(rc, 0);
    assert_int_equal(json_array_size(errors), 0);
    json_decref(errors);
}

static void test_bad_refs(void **state) {
    (void)state;
    expect_one("{\"y\": {\"artifact\": 4}}", SPEC_SERVER, "spec.x", "is required");
    expect_one("{\"x\": {\"artifact\": 4}}", SPEC_SERVER, "spec.y", "is required");
    expect_one("{\"x\": 3, \"y\": {\"artifact\": 4}}", SPEC_SERVER, "spec.x", "must be an object");
    expect_one("{\"x\": {}, \"y\": {\"artifact\": 4}}", SPEC_SERVER, "spec.x",
               "needs one of \"artifact\" or \"job\"");
    expect_one("{\"x\": {}, \"y\": {\"artifact\": 4}}", SPEC_LOCAL, "spec.x",
               "needs one of \"artifact\", \"job\" or \"path\"");
    expect_one("{\"x\": {\"artifact\": 1, \"job\": 2}, \"y\": {\"artifact\": 4}}", SPEC_SERVER,
               "spec.x", "exactly one input");
    expect_one("{\"x\": {\"artifact\": 0}, \"y\": {\"artifact\": 4}}", SPEC_SERVER,
               "spec.x.artifact", "positive integer id");
    expect_one("{\"x\": {\"artifact\": 1}, \"y\": {\"job\": \"7\"}}", SPEC_SERVER, "spec.y.job",
               "positive integer id");
    expect_one("{\"x\": {\"artifact\": 1}, \"y\": {\"job\": -7}}", SPEC_SERVER, "spec.y.job",
               "positive integer id");
    /* Paths are for local runs only. */
    expect_one("{\"x\": {\"path\": \"a.npy\"}, \"y\": {\"artifact\": 4}}", SPEC_SERVER,
               "spec.x.path", "unknown field");
    expect_one("{\"x\": {\"path\": \"\"}, \"y\": {\"artifact\": 4}}", SPEC_LOCAL, "spec.x.path",
               "non-empty file path");
    expect_one("{\"x\": {\"path\": 5}, \"y\": {\"artifact\": 4}}", SPEC_LOCAL, "spec.x.path",
               "non-empty file path");
    expect_one("{\"x\": {\"artifact\": 1, \"sha\": 2}, \"y\": {\"artifact\": 4}}", SPEC_SERVER,
               "spec.x.sha", "unknown field");
}

static void test_bad_options(void **state) {
    (void)state;
    const char *base = "\"x\": {\"artifact\": 1}, \"y\": {\"artifact\": 2}";
    const char *jobs = "\"x\": {\"job\": 1}, \"y\": {\"job\": 2}";
    char text[256];
    snprintf(text, sizeof text, "{%s, \"kernel\": \"poly\"}", base);
    expect_one(text, SPEC_SERVER, "spec.kernel", "must be \"linear\" or \"rbf\"");
    snprintf(text, sizeof text, "{%s, \"kernel\": 1}", base);
    expect_one(text, SPEC_SERVER, "spec.kernel", "must be \"linear\" or \"rbf\"");
    snprintf(text, sizeof text, "{%s, \"debiased\": \"yes\"}", base);
    expect_one(text, SPEC_SERVER, "spec.debiased", "true or false");
    snprintf(text, sizeof text, "{%s, \"debiased\": 1}", base);
    expect_one(text, SPEC_SERVER, "spec.debiased", "true or false");
    snprintf(text, sizeof text, "{%s, \"rbf_threshold\": 0}", base);
    expect_one(text, SPEC_SERVER, "spec.rbf_threshold", "(0, 1e6]");
    snprintf(text, sizeof text, "{%s, \"rbf_threshold\": -2.5}", base);
    expect_one(text, SPEC_SERVER, "spec.rbf_threshold", "(0, 1e6]");
    snprintf(text, sizeof text, "{%s, \"rbf_threshold\": 1e7}", base);
    expect_one(text, SPEC_SERVER, "spec.rbf_threshold", "(0, 1e6]");
    snprintf(text, sizeof text, "{%s, \"rbf_threshold\": \"1\"}", base);
    expect_one(text, SPEC_SERVER, "spec.rbf_threshold", "(0, 1e6]");
    snprintf(text, sizeof text, "{%s, \"layers\": []}", jobs);
    expect_one(text, SPEC_SERVER, "spec.layers", "non-empty array");
    snprintf(text, sizeof text, "{%s, \"layers\": \"some\"}", jobs);
    expect_one(text, SPEC_SERVER, "spec.layers", "\"all\"");
    snprintf(text, sizeof text, "{%s, \"layers\": [1, -2, 3, \"4\"]}", jobs);
    expect_one(text, SPEC_SERVER, "spec.layers[1]", "layer index");
    expect_one(text, SPEC_SERVER, "spec.layers[3]", "layer index");
    /* Layers pick among per-layer files: with two single artifacts they
     * would be ignored, so they are refused. */
    snprintf(text, sizeof text, "{%s, \"layers\": [1]}", base);
    expect_one(text, SPEC_SERVER, "spec.layers", "only to per-layer inputs");
    snprintf(text, sizeof text, "{%s, \"kernal\": \"rbf\"}", base);
    expect_one(text, SPEC_SERVER, "spec.kernal", "unknown field");
}

/* Every problem is reported at once, each under its own field. */
static void test_reports_all(void **state) {
    (void)state;
    int rc;
    json_t *errors = validate("cka",
                              "{\"x\": {\"artifact\": -1}, \"kernel\": \"cosine\", "
                              "\"debiased\": null, \"layers\": [0.5]}",
                              SPEC_SERVER, &rc);
    assert_int_equal(rc, -1);
    assert_int_equal(json_array_size(errors), 5);
    expect_error(errors, "spec.x.artifact", "positive integer id");
    expect_error(errors, "spec.kernel", "\"linear\"");
    expect_error(errors, "spec.debiased", "true or false");
    expect_error(errors, "spec.layers[0]", "layer index");
    expect_error(errors, "spec.y", "is required");
    json_decref(errors);
}

static void test_bad_kind_and_shape(void **state) {
    (void)state;
    int rc;
    json_t *errors = validate("sort", "{}", SPEC_SERVER, &rc);
    assert_int_equal(rc, -1);
    expect_error(errors, "kind", "unknown job kind \"sort\"");
    json_decref(errors);
    errors = validate("cka", "[1, 2]", SPEC_SERVER, &rc);
    assert_int_equal(rc, -1);
    expect_error(errors, "spec", "must be an object");
    json_decref(errors);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_specs),  cmocka_unit_test(test_bad_refs),
        cmocka_unit_test(test_bad_options), cmocka_unit_test(test_reports_all),
        cmocka_unit_test(test_bad_kind_and_shape),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
