/* test_server_registry.c - the registry's request checks (no database):
 * names, paths, model and dataset bodies; each bad field is reported under
 * its own name, all at once, and a good body fills the registration. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <string.h>

#include "server/registry.h"

static json_t *load(const char *text) {
    json_error_t jerr;
    json_t *v = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    if (!v) fail_msg("bad test JSON %s: %s", text, jerr.text);
    return v;
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

static void expect_model_error(const char *text, const char *field, const char *needle) {
    json_t *body = load(text), *errors = json_array();
    reg_model_new m = {.owner_id = 1};
    assert_int_equal(reg_model_check(body, &m, errors), -1);
    expect_error(errors, field, needle);
    reg_model_new_free(&m);
    json_decref(errors);
    json_decref(body);
}

static void expect_dataset_error(const char *text, const char *field, const char *needle) {
    json_t *body = load(text), *errors = json_array();
    reg_dataset_new d = {.owner_id = 1};
    assert_int_equal(reg_dataset_check(body, &d, errors), -1);
    expect_error(errors, field, needle);
    json_decref(errors);
    json_decref(body);
}

static void test_names(void **state) {
    (void)state;
    const char *good[] = {"llama2-7b-chat", "meta-llama/Llama-2-7b", "a", "A.b_c-9", "x/y/z"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        if (!reg_valid_name(good[i])) fail_msg("refused name %s", good[i]);
    const char *bad[] = {"", "-x", ".x", "/x", "x/", "a//b", "a..b", "../x", "a b", "a\tb",
                         "é", "x:y"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (reg_valid_name(bad[i])) fail_msg("accepted name '%s'", bad[i]);
    char longest[REG_MAX_NAME + 2];
    memset(longest, 'n', sizeof longest);
    longest[REG_MAX_NAME] = '\0';
    assert_true(reg_valid_name(longest));
    longest[REG_MAX_NAME] = 'n';
    longest[REG_MAX_NAME + 1] = '\0';
    assert_false(reg_valid_name(longest));
}

static void test_paths(void **state) {
    (void)state;
    const char *good[] = {"/", "/shared/models/llama-2-7b", "/a/b.c/..d/e..", "/a//b/",
                          "/with space/ü"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        if (!reg_valid_path(good[i], strlen(good[i]))) fail_msg("refused path %s", good[i]);
    const char *bad[] = {"", "relative", "./x", "/a/../b", "/a/..", "/..", "/a/./b", "/.",
                         "/a\nb", "/a\x7f"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (reg_valid_path(bad[i], strlen(bad[i]))) fail_msg("accepted path '%s'", bad[i]);
    /* a JSON string may hold NUL: the length tells */
    assert_false(reg_valid_path("/a\0b", 4));
}

static void test_model_good(void **state) {
    (void)state;
    json_t *errors = json_array();
    json_t *body = load("{\"name\": \"tiny\", \"files\": {\"config.json\": 3, "
                        "\"model.safetensors\": 4, \"tokenizer.json\": 5}}");
    reg_model_new m = {.owner_id = 7};
    assert_int_equal(reg_model_check(body, &m, errors), 0);
    assert_int_equal(json_array_size(errors), 0);
    assert_string_equal(m.name, "tiny");
    assert_string_equal(m.format, "hf");
    assert_null(m.path);
    assert_int_equal(m.file, 0);
    assert_int_equal(m.owner_id, 7);
    assert_int_equal(m.nfiles, 3);
    int64_t sum = 0;
    bool config = false;
    for (size_t i = 0; i < m.nfiles; i++) {
        sum += m.file_ids[i];
        if (strcmp(m.file_names[i], "config.json") == 0) {
            config = true;
            assert_int_equal(m.file_ids[i], 3);
        }
    }
    assert_true(config);
    assert_int_equal(sum, 12);
    reg_model_new_free(&m);
    json_decref(body);

    body = load("{\"name\": \"s\", \"format\": \"llama2c\", \"path\": \"/m/stories15M.bin\"}");
    m = (reg_model_new){.owner_id = 1};
    assert_int_equal(reg_model_check(body, &m, errors), 0);
    assert_string_equal(m.format, "llama2c");
    assert_string_equal(m.path, "/m/stories15M.bin");
    assert_int_equal(m.nfiles, 0);
    reg_model_new_free(&m);
    json_decref(body);

    body = load("{\"name\": \"s\", \"format\": \"llama2c\", \"file\": 9}");
    m = (reg_model_new){.owner_id = 1};
    assert_int_equal(reg_model_check(body, &m, errors), 0);
    assert_int_equal(m.file, 9);
    assert_null(m.path);
    reg_model_new_free(&m);
    json_decref(body);
    assert_int_equal(json_array_size(errors), 0);
    json_decref(errors);
}

static void test_model_bad(void **state) {
    (void)state;
    expect_model_error("{\"path\": \"/m\"}", "name", "is required");
    expect_model_error("{\"name\": 5, \"path\": \"/m\"}", "name", "A-Z a-z 0-9");
    expect_model_error("{\"name\": \"m\"}", "path", "is required unless");
    expect_model_error("{\"name\": \"m\", \"path\": \"m\"}", "path", "absolute");
    expect_model_error("{\"name\": \"m\", \"path\": \"/a/../b\"}", "path", "absolute");
    expect_model_error("{\"name\": \"m\", \"path\": 3}", "path", "absolute");
    expect_model_error("{\"name\": \"m\", \"path\": \"/a\", \"file\": 3}", "path", "exactly one");
    expect_model_error("{\"name\": \"m\", \"format\": \"onnx\", \"path\": \"/a\"}", "format",
                       "\"llama2c\"");
    expect_model_error("{\"name\": \"m\", \"path\": \"/a\", \"revision\": \"main\"}", "revision",
                       "unknown field");
    expect_model_error("{\"name\": \"m\", \"format\": \"llama2c\", \"path\": \"/a/m.pt\"}", "path",
                       "must name a .bin file");
    expect_model_error("{\"name\": \"m\", \"format\": \"llama2c\", \"path\": \"/a/.bin\"}", "path",
                       "must name a .bin file");
    expect_model_error("{\"name\": \"m\", \"file\": 3}", "file", "is for llama2c models");
    expect_model_error("{\"name\": \"m\", \"format\": \"llama2c\", \"file\": 0}", "file",
                       "artifact id");
    expect_model_error("{\"name\": \"m\", \"format\": \"llama2c\", \"files\": {\"config.json\": 1}}",
                       "files", "is for hf models");
    expect_model_error("{\"name\": \"m\", \"files\": {}}", "files", "1-256 entries");
    expect_model_error("{\"name\": \"m\", \"files\": [1]}", "files", "1-256 entries");
    expect_model_error("{\"name\": \"m\", \"files\": {\"model.safetensors\": 1}}", "files",
                       "must include config.json");
    expect_model_error("{\"name\": \"m\", \"files\": {\"config.json\": 1}}", "files",
                       "model.safetensors.index.json");
    expect_model_error("{\"name\": \"m\", \"files\": {\"config.json\": 1, \"model.safetensors\": "
                       "\"2\"}}",
                       "files.model.safetensors", "artifact id");
    expect_model_error("{\"name\": \"m\", \"files\": {\"config.json\": 1, \"model.safetensors\": 2, "
                       "\"sub/x\": 3}}",
                       "files.sub/x", "plain file name");
    expect_model_error("{\"name\": \"m\", \"files\": {\"config.json\": 1, \"model.safetensors\": 2, "
                       "\"-rf\": 3}}",
                       "files.-rf", "plain file name");

    /* every problem at once */
    json_t *body = load("{\"name\": \"..\", \"format\": \"x\", \"extra\": 1}");
    json_t *errors = json_array();
    reg_model_new m = {.owner_id = 1};
    assert_int_equal(reg_model_check(body, &m, errors), -1);
    assert_int_equal(json_array_size(errors), 4);
    expect_error(errors, "path", "is required unless");
    expect_error(errors, "extra", "unknown field");
    expect_error(errors, "name", "A-Z");
    expect_error(errors, "format", "\"hf\"");
    reg_model_new_free(&m);
    json_decref(errors);
    json_decref(body);

    /* an empty body (req->json is NULL) */
    errors = json_array();
    m = (reg_model_new){.owner_id = 1};
    assert_int_equal(reg_model_check(NULL, &m, errors), -1);
    expect_error(errors, "name", "is required");
    expect_error(errors, "path", "is required");
    json_decref(errors);
}

static void test_dataset_good(void **state) {
    (void)state;
    json_t *errors = json_array();
    json_t *body = load("{\"name\": \"alpaca_en\", \"format\": \"alpaca\", \"path\": "
                        "\"/d/alpaca.json\", \"dataset_info\": {\"file_name\": \"alpaca.json\", "
                        "\"formatting\": \"alpaca\", \"columns\": {\"prompt\": \"instruction\", "
                        "\"query\": \"input\", \"response\": \"output\", \"system\": \"sys\", "
                        "\"history\": \"hist\"}, \"tags\": {\"x\": null}}}");
    reg_dataset_new d = {.owner_id = 4};
    assert_int_equal(reg_dataset_check(body, &d, errors), 0);
    assert_string_equal(d.name, "alpaca_en");
    assert_string_equal(d.format, "alpaca");
    assert_string_equal(d.path, "/d/alpaca.json");
    assert_int_equal(d.artifact, 0);
    assert_ptr_equal(d.dataset_info, json_object_get(body, "dataset_info"));
    assert_int_equal(d.owner_id, 4);
    json_decref(body);

    body = load("{\"name\": \"flan\", \"format\": \"flan\", \"artifact\": 12, \"dataset_info\": "
                "null}");
    d = (reg_dataset_new){.owner_id = 1};
    assert_int_equal(reg_dataset_check(body, &d, errors), 0);
    assert_int_equal(d.artifact, 12);
    assert_null(d.path);
    assert_null(d.dataset_info);
    json_decref(body);
    assert_int_equal(json_array_size(errors), 0);
    json_decref(errors);
}

static void test_dataset_bad(void **state) {
    (void)state;
    expect_dataset_error("{\"name\": \"d\", \"path\": \"/d\"}", "format", "is required");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"sharegpt\", \"path\": \"/d\"}", "format",
                         "\"alpaca\" or \"flan\"");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"flan\"}", "path", "is required unless");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"flan\", \"path\": \"/d\", \"artifact\": 1}",
                         "path", "exactly one");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"flan\", \"artifact\": -1}", "artifact",
                         "artifact id");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"flan\", \"path\": \"d.jsonl\"}", "path",
                         "absolute");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"flan\", \"path\": \"/d\", \"split\": 1}",
                         "split", "unknown field");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"flan\", \"path\": \"/d\", "
                         "\"dataset_info\": {}}",
                         "dataset_info", "alpaca datasets only");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"alpaca\", \"path\": \"/d\", "
                         "\"dataset_info\": \"x\"}",
                         "dataset_info", "must be an object");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"alpaca\", \"path\": \"/d\", "
                         "\"dataset_info\": {\"formatting\": \"sharegpt\"}}",
                         "dataset_info.formatting", "\"alpaca\"");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"alpaca\", \"path\": \"/d\", "
                         "\"dataset_info\": {\"file_name\": 3}}",
                         "dataset_info.file_name", "a string");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"alpaca\", \"path\": \"/d\", "
                         "\"dataset_info\": {\"columns\": [\"instruction\"]}}",
                         "dataset_info.columns", "must be an object");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"alpaca\", \"path\": \"/d\", "
                         "\"dataset_info\": {\"columns\": {\"messages\": \"conv\"}}}",
                         "dataset_info.columns.messages", "unknown column");
    expect_dataset_error("{\"name\": \"d\", \"format\": \"alpaca\", \"path\": \"/d\", "
                         "\"dataset_info\": {\"columns\": {\"prompt\": \"\"}}}",
                         "dataset_info.columns.prompt", "name of a key");

    /* dataset_info is bounded */
    json_t *body = load("{\"name\": \"d\", \"format\": \"alpaca\", \"path\": \"/d\"}");
    json_t *info = json_object();
    char key[32];
    for (int i = 0; i < 4000; i++) {
        snprintf(key, sizeof key, "tag%05d", i);
        json_object_set_new(info, key, json_string("0123456789"));
    }
    json_object_set_new(body, "dataset_info", info);
    json_t *errors = json_array();
    reg_dataset_new d = {.owner_id = 1};
    assert_int_equal(reg_dataset_check(body, &d, errors), -1);
    expect_error(errors, "dataset_info", "at most 65536 bytes");
    json_decref(errors);
    json_decref(body);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),        cmocka_unit_test(test_paths),
        cmocka_unit_test(test_model_good),   cmocka_unit_test(test_model_bad),
        cmocka_unit_test(test_dataset_good), cmocka_unit_test(test_dataset_bad),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
