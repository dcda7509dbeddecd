/* test_dataset.c - alpaca JSON, Flan JSONL and dataset_info.json registries
 * from tests/fixtures/data: every field of every example, max_examples,
 * format detection and explicit formats, and malformed files rejected with
 * the file and record named. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/dataset.h"

static char data_dir[PATH_MAX];

static void fixture(char *out, size_t outlen, const char *name) {
    snprintf(out, outlen, "%.*s/%s", (int)(outlen - 64), data_dir, name);
}

static void expect_example(const ds_example *e, const char *system, const char *query,
                           const char *response, const char *task) {
    if (system) assert_string_equal(e->system, system);
    else assert_null(e->system);
    assert_string_equal(e->query, query);
    assert_string_equal(e->response, response);
    if (task) assert_string_equal(e->task, task);
    else assert_null(e->task);
}

static void test_alpaca(void **state) {
    (void)state;
    char path[PATH_MAX], err[ERR_LEN];
    ds_dataset d;
    fixture(path, sizeof path, "alpaca.json");
    if (ds_load(path, DS_FORMAT_AUTO, 0, &d, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(d.n, 4);
    expect_example(&d.items[0], NULL, "Give three tips for staying healthy.",
                   "1. Eat well.\n2. Sleep.\n3. Move.", NULL);
    /* the instruction and a non-empty input are joined by a newline */
    expect_example(&d.items[1], "You are a translator.", "Translate to French.\nGood morning",
                   "Bonjour", NULL);
    /* an empty instruction leaves the input alone; an empty system is none */
    expect_example(&d.items[2], NULL, "Only an input, caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac", "ok", NULL);
    expect_example(&d.items[3], NULL, "Name a colour.", "Blue", NULL);
    ds_free(&d);
    assert_null(d.items);
    /* max_examples keeps the first records, in order */
    if (ds_load(path, DS_FORMAT_ALPACA, 2, &d, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(d.n, 2);
    assert_string_equal(d.items[1].response, "Bonjour");
    ds_free(&d);
}

static void test_flan(void **state) {
    (void)state;
    char path[PATH_MAX], err[ERR_LEN];
    ds_dataset d;
    fixture(path, sizeof path, "flan.jsonl");
    if (ds_load(path, DS_FORMAT_AUTO, 0, &d, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(d.n, 3); /* the blank line is skipped */
    expect_example(&d.items[0], NULL,
                   "Premise: a cat sleeps.\nHypothesis: an animal rests.\nOptions: yes, no", "yes",
                   "anli_r1");
    expect_example(&d.items[1], NULL, "What is 2 + 2?", "4", "math_dataset");
    expect_example(&d.items[2], NULL, "Summarize: the sky is blue today.", "Blue sky.", NULL);
    ds_free(&d);
    if (ds_load(path, DS_FORMAT_FLAN, 1, &d, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(d.n, 1);
    ds_free(&d);
    /* read as alpaca, the records lack "instruction" */
    assert_int_equal(ds_load(path, DS_FORMAT_ALPACA, 0, &d, err, sizeof err), -1);
    assert_non_null(strstr(err, "flan.jsonl: line 1: \"instruction\" is missing"));
    assert_int_equal(d.n, 0);
    assert_null(d.items);
}

static void test_parse_buffers(void **state) {
    (void)state;
    char err[ERR_LEN];
    ds_dataset d;
    /* an array of flan records, and JSON lines with CRLF endings */
    const char *arr = " [{\"inputs\": \"q\", \"targets\": \"a\", \"task\": \"t\"}]";
    assert_int_equal(ds_parse("mem", arr, strlen(arr), DS_FORMAT_FLAN, NULL, 0, &d, err, sizeof err), 0);
    expect_example(&d.items[0], NULL, "q", "a", "t");
    ds_free(&d);
    const char *crlf = "{\"inputs\": \"q1\", \"targets\": \"a1\"}\r\n{\"inputs\": \"q2\", \"targets\": \"\"}\r\n";
    assert_int_equal(ds_parse("mem", crlf, strlen(crlf), DS_FORMAT_AUTO, NULL, 0, &d, err, sizeof err), 0);
    assert_int_equal(d.n, 2);
    expect_example(&d.items[1], NULL, "q2", "", NULL);
    ds_free(&d);
    const struct {
        const char *text;
        enum ds_format fmt;
        const char *want;
    } bad[] = {
        {"", DS_FORMAT_AUTO, "mem: empty file"},
        {"  \n", DS_FORMAT_AUTO, "mem: empty file"},
        {"[]", DS_FORMAT_AUTO, "mem: no records"},
        {"\"text\"", DS_FORMAT_AUTO, "mem: neither a JSON array"},
        {"[1]", DS_FORMAT_AUTO, "mem: record 0: not a JSON object"},
        {"[{\"instruction\": \"\", \"input\": \"\", \"output\": \"x\"}]", DS_FORMAT_AUTO,
         "mem: record 0: \"instruction\" and \"input\" are both empty"},
        {"[{\"instruction\": \"i\", \"output\": null}]", DS_FORMAT_AUTO, "mem: record 0: \"output\" is null"},
        {"[{\"instruction\": \"i\", \"output\": \"o\", \"system\": 3}]", DS_FORMAT_AUTO,
         "mem: record 0: \"system\" is not a string"},
        {"[{\"instruction\": \"i\", \"input\": [], \"output\": \"o\"}]", DS_FORMAT_AUTO,
         "mem: record 0: \"input\" is not a string"},
        {"[{\"instruction\": \"i\", \"output\": \"o\"},", DS_FORMAT_AUTO, "mem: not valid JSON (line 1"},
        {"{\"inputs\": \"\", \"targets\": \"t\"}", DS_FORMAT_AUTO, "mem: line 1: \"inputs\" is empty"},
        {"{\"inputs\": \"q\", \"targets\": \"t\", \"task\": 5}", DS_FORMAT_AUTO,
         "mem: line 1: \"task\" is not a string"},
        {"{\"inputs\": \"q\", \"targets\": \"t\"}\n[1]", DS_FORMAT_AUTO, "mem: line 2: not a JSON object"},
        {"{\"inputs\": \"q\", \"targets\": \"t\"} {}", DS_FORMAT_AUTO, "mem: line 1: not valid JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        if (ds_parse("mem", bad[i].text, strlen(bad[i].text), bad[i].fmt, NULL, 0, &d, err,
                     sizeof err) != -1)
            fail_msg("case %zu accepted", i);
        if (!strstr(err, bad[i].want)) fail_msg("case %zu: \"%s\" lacks \"%s\"", i, err, bad[i].want);
        assert_int_equal(d.n, 0);
    }
    enum ds_format f;
    assert_int_equal(ds_format_parse("flan", &f), 0);
    assert_int_equal(f, DS_FORMAT_FLAN);
    assert_string_equal(ds_format_name(f), "flan");
    assert_int_equal(ds_format_parse("sharegpt", &f), -1);
}

static void test_malformed_files(void **state) {
    (void)state;
    char path[PATH_MAX], want[PATH_MAX + 64], err[ERR_LEN];
    ds_dataset d;
    fixture(path, sizeof path, "bad_alpaca_type.json");
    assert_int_equal(ds_load(path, DS_FORMAT_AUTO, 0, &d, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: record 1: \"instruction\" is not a string", path);
    assert_string_equal(err, want);
    /* max_examples stops before the broken record */
    assert_int_equal(ds_load(path, DS_FORMAT_AUTO, 1, &d, err, sizeof err), 0);
    assert_int_equal(d.n, 1);
    ds_free(&d);
    fixture(path, sizeof path, "bad_flan_json.jsonl");
    assert_int_equal(ds_load(path, DS_FORMAT_AUTO, 0, &d, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: line 3: not valid JSON", path);
    assert_non_null(strstr(err, want));
    fixture(path, sizeof path, "bad_flan_missing.jsonl");
    assert_int_equal(ds_load(path, DS_FORMAT_AUTO, 0, &d, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: line 2: \"targets\" is missing", path);
    assert_string_equal(err, want);
    fixture(path, sizeof path, "no_such_file.json");
    assert_int_equal(ds_load(path, DS_FORMAT_AUTO, 0, &d, err, sizeof err), -1);
    assert_non_null(strstr(err, path));
}

static void test_registry(void **state) {
    (void)state;
    char info[PATH_MAX], err[ERR_LEN];
    ds_dataset d;
    fixture(info, sizeof info, "dataset_info.json");
    if (ds_load_registry(info, "demo", 0, &d, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(d.n, 4);
    assert_string_equal(d.items[1].query, "Translate to French.\nGood morning");
    ds_free(&d);
    /* remapped columns, JSON lines, system column switched off */
    if (ds_load_registry(info, "remapped", 0, &d, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(d.n, 2);
    expect_example(&d.items[0], NULL, "Why is the sea salty?\nOceans", "Rivers carry minerals.", NULL);
    expect_example(&d.items[1], NULL, "Capital of France?", "Paris", NULL);
    ds_free(&d);
    const struct {
        const char *name, *want;
    } bad[] = {
        {"nope", "no dataset \"nope\""},
        {"hub", "hub.file_name: missing (only local files"},
        {"escape", "escape.file_name: must be a path inside"},
        {"sharegpt", "sharegpt.formatting: only \"alpaca\""},
        {"history", "history.columns.history: not supported"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(ds_load_registry(info, bad[i].name, 0, &d, err, sizeof err), -1);
        if (!strstr(err, bad[i].want)) fail_msg("%s: \"%s\" lacks \"%s\"", bad[i].name, err, bad[i].want);
        assert_non_null(strstr(err, info));
    }
}

int main(void) {
    tu_fixture_path(data_dir, sizeof data_dir, "data");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alpaca),          cmocka_unit_test(test_flan),
        cmocka_unit_test(test_parse_buffers),   cmocka_unit_test(test_malformed_files),
        cmocka_unit_test(test_registry),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
