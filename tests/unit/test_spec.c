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

/* --- predict ------------------------------------------------------------------ */

static void expect_predict(const char *text, enum spec_mode mode, const char *field,
                           const char *needle) {
    int rc;
    json_t *errors = validate("predict", text, mode, &rc);
    assert_int_equal(rc, -1);
    expect_error(errors, field, needle);
    json_decref(errors);
}

static void expect_predict_ok(const char *text, enum spec_mode mode) {
    int rc;
    json_t *errors = validate("predict", text, mode, &rc);
    if (rc != 0 || json_array_size(errors) != 0) {
        char *dump = json_dumps(errors, JSON_COMPACT);
        fail_msg("rejected (%s): %s: %s", mode == SPEC_LOCAL ? "local" : "server", text,
                 dump ? dump : "?");
    }
    json_decref(errors);
}

static void test_predict_good(void **state) {
    (void)state;
    /* The example, every field set. */
    const char *full = "{\"model\": {\"model\": 3}, \"adapter\": {\"job\": 12}, \"dataset\": "
                       "{\"dataset\": 5}, \"template\": \"llama2\", \"max_samples\": 10000, "
                       "\"pool\": \"last_token\", \"layers\": \"all\", \"dtype\": \"float16\", "
                       "\"batch_size\": 8, \"generate\": {\"max_new_tokens\": 64}}";
    const char *server[] = {
        full,
        "{\"model\": {\"model\": 1}, \"dataset\": {\"dataset\": 2}}",
        "{\"model\": {\"model\": 1}, \"dataset\": {\"dataset\": 2}, \"adapter\": {\"artifact\": "
        "9}, \"template\": \"alpaca\", \"pool\": \"mean\", \"layers\": [0, 16, 32], \"dtype\": "
        "\"float32\", \"batch_size\": 1}",
        "{\"model\": {\"model\": 1}, \"dataset\": {\"dataset\": 2}, \"adapter\": null, "
        "\"template\": \"vanilla\", \"pool\": \"mean_after_system\", \"batch_size\": 1024, "
        "\"generate\": {\"max_new_tokens\": 4096}, \"max_samples\": 1}",
        "{\"model\": {\"model\": 1}, \"dataset\": {\"dataset\": 2}, \"template\": \"default\", "
        "\"generate\": {\"max_new_tokens\": 1}, \"layers\": [0]}",
    };
    for (size_t i = 0; i < sizeof server / sizeof server[0]; i++) {
        expect_predict_ok(server[i], SPEC_SERVER);
        expect_predict_ok(server[i], SPEC_LOCAL);
    }
    /* Local runs name folders and files; "format" tells a dataset file's layout. */
    expect_predict_ok("{\"model\": {\"path\": \"models/tiny\"}, \"dataset\": {\"path\": "
                      "\"data/alpaca.json\"}}",
                      SPEC_LOCAL);
    expect_predict_ok("{\"model\": {\"path\": \"m\"}, \"dataset\": {\"path\": \"flan.jsonl\"}, "
                      "\"format\": \"flan\", \"adapter\": {\"path\": \"lora\"}}",
                      SPEC_LOCAL);
    expect_predict_ok("{\"model\": {\"path\": \"m\"}, \"dataset\": {\"path\": \"a.json\"}, "
                      "\"format\": \"alpaca\"}",
                      SPEC_LOCAL);
}

static void test_predict_refs(void **state) {
    (void)state;
    const char *ds = "\"dataset\": {\"dataset\": 5}";
    const char *md = "\"model\": {\"model\": 3}";
    char text[512];
    expect_predict("{\"dataset\": {\"dataset\": 5}}", SPEC_SERVER, "spec.model", "is required");
    expect_predict("{\"model\": {\"model\": 3}}", SPEC_SERVER, "spec.dataset", "is required");
    snprintf(text, sizeof text, "{\"model\": 3, %s}", ds);
    expect_predict(text, SPEC_SERVER, "spec.model", "must be an object such as {\"model\": 3}");
    snprintf(text, sizeof text, "{\"model\": {}, %s}", ds);
    expect_predict(text, SPEC_SERVER, "spec.model", "needs one of \"model\" or \"job\"");
    expect_predict(text, SPEC_LOCAL, "spec.model", "needs one of \"model\", \"job\" or \"path\"");
    /* A full fine-tuning train job's output is a model (the server checks
     * the job's kind and method). */
    snprintf(text, sizeof text, "{\"model\": {\"job\": 12}, %s}", ds);
    expect_predict_ok(text, SPEC_SERVER);
    snprintf(text, sizeof text, "{\"model\": {\"job\": 12}, %s, \"adapter\": {\"job\": 13}}", ds);
    expect_predict_ok(text, SPEC_SERVER);
    snprintf(text, sizeof text, "{\"model\": {\"job\": 0}, %s}", ds);
    expect_predict(text, SPEC_SERVER, "spec.model.job", "positive integer id");
    snprintf(text, sizeof text, "{\"model\": {\"job\": \"12\"}, %s}", ds);
    expect_predict(text, SPEC_SERVER, "spec.model.job", "positive integer id");
    snprintf(text, sizeof text, "{\"model\": {\"job\": 12, \"model\": 3}, %s}", ds);
    expect_predict(text, SPEC_SERVER, "spec.model", "exactly one input");
    snprintf(text, sizeof text, "{\"model\": 12, %s}", ds);
    expect_predict(text, SPEC_SERVER, "spec.model", "{\"job\": 12} (a full train job)");
    snprintf(text, sizeof text, "{\"model\": {\"model\": 0}, %s}", ds);
    expect_predict(text, SPEC_SERVER, "spec.model.model", "positive integer id");
    snprintf(text, sizeof text, "{\"model\": {\"model\": \"3\"}, %s}", ds);
    expect_predict(text, SPEC_SERVER, "spec.model.model", "positive integer id");
    /* An artifact is not a model; a path is for local runs only. */
    snprintf(text, sizeof text, "{\"model\": {\"artifact\": 3}, %s}", ds);
    expect_predict(text, SPEC_SERVER, "spec.model.artifact", "unknown field");
    snprintf(text, sizeof text, "{\"model\": {\"path\": \"/m\"}, %s}", ds);
    expect_predict(text, SPEC_SERVER, "spec.model.path", "unknown field");
    snprintf(text, sizeof text, "{\"model\": {\"model\": 3, \"path\": \"/m\"}, %s}", ds);
    expect_predict(text, SPEC_LOCAL, "spec.model", "exactly one input");
    snprintf(text, sizeof text, "{\"model\": {\"path\": \"\"}, %s}", ds);
    expect_predict(text, SPEC_LOCAL, "spec.model.path", "non-empty file path");

    snprintf(text, sizeof text, "{%s, \"dataset\": {\"dataset\": -5}}", md);
    expect_predict(text, SPEC_SERVER, "spec.dataset.dataset", "positive integer id");
    snprintf(text, sizeof text, "{%s, \"dataset\": {\"job\": 5}}", md);
    expect_predict(text, SPEC_SERVER, "spec.dataset.job", "unknown field");
    snprintf(text, sizeof text, "{%s, \"dataset\": [5]}", md);
    expect_predict(text, SPEC_SERVER, "spec.dataset", "must be an object");

    snprintf(text, sizeof text, "{%s, %s, \"adapter\": {}}", md, ds);
    expect_predict(text, SPEC_SERVER, "spec.adapter", "needs one of \"job\" or \"artifact\"");
    snprintf(text, sizeof text, "{%s, %s, \"adapter\": {\"job\": 1, \"artifact\": 2}}", md, ds);
    expect_predict(text, SPEC_SERVER, "spec.adapter", "exactly one input");
    snprintf(text, sizeof text, "{%s, %s, \"adapter\": {\"model\": 1}}", md, ds);
    expect_predict(text, SPEC_SERVER, "spec.adapter.model", "unknown field");
    snprintf(text, sizeof text, "{%s, %s, \"adapter\": \"lora\"}", md, ds);
    expect_predict(text, SPEC_SERVER, "spec.adapter", "must be an object");
    snprintf(text, sizeof text, "{%s, %s, \"adapter\": {\"path\": \"lora\"}}", md, ds);
    expect_predict(text, SPEC_SERVER, "spec.adapter.path", "unknown field");
}

static void test_predict_options(void **state) {
    (void)state;
    const char *base = "\"model\": {\"model\": 3}, \"dataset\": {\"dataset\": 5}";
    char text[512];
    static const struct {
        const char *field_json; /* appended to base */
        const char *field;
        const char *needle;
    } cases[] = {
        {"\"template\": \"chatml\"", "spec.template", "\"llama2\" (default)"},
        {"\"template\": 2", "spec.template", "\"vanilla\""},
        {"\"max_samples\": 0", "spec.max_samples", "from 1 to 100000000"},
        {"\"max_samples\": 100000001", "spec.max_samples", "from 1 to"},
        {"\"max_samples\": 2.5", "spec.max_samples", "from 1 to"},
        {"\"max_samples\": \"10\"", "spec.max_samples", "from 1 to"},
        {"\"pool\": \"first_token\"", "spec.pool", "\"last_token\" (default)"},
        {"\"pool\": null", "spec.pool", "\"mean_after_system\""},
        {"\"layers\": []", "spec.layers", "non-empty array"},
        {"\"layers\": \"last\"", "spec.layers", "\"all\""},
        {"\"layers\": [0, -1]", "spec.layers[1]", "layer index"},
        {"\"layers\": [1, 2, 1]", "spec.layers[2]", "repeats layer 1"},
        {"\"layers\": [100001]", "spec.layers[0]", "layer index"},
        {"\"dtype\": \"bfloat16\"", "spec.dtype", "\"float16\" (default) or \"float32\""},
        {"\"batch_size\": 0", "spec.batch_size", "from 1 to 1024"},
        {"\"batch_size\": 1025", "spec.batch_size", "from 1 to 1024"},
        {"\"batch_size\": true", "spec.batch_size", "from 1 to 1024"},
        {"\"generate\": 64", "spec.generate", "{\"max_new_tokens\": 64}"},
        {"\"generate\": {}", "spec.generate.max_new_tokens", "is required"},
        {"\"generate\": {\"max_new_tokens\": 0}", "spec.generate.max_new_tokens",
         "from 1 to 4096"},
        {"\"generate\": {\"max_new_tokens\": 4097}", "spec.generate.max_new_tokens",
         "from 1 to 4096"},
        {"\"generate\": {\"max_new_tokens\": 8, \"temperature\": 0.7}",
         "spec.generate.temperature", "unknown field"},
        {"\"format\": \"sharegpt\"", "spec.format", "\"alpaca\" or \"flan\""},
        /* a registered dataset has its format */
        {"\"format\": \"flan\"", "spec.format", "only to a local dataset file"},
        {"\"pooling\": \"mean\"", "spec.pooling", "unknown field"},
        {"\"kernel\": \"linear\"", "spec.kernel", "unknown field"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(text, sizeof text, "{%s, %s}", base, cases[i].field_json);
        expect_predict(text, SPEC_SERVER, cases[i].field, cases[i].needle);
        expect_predict(text, SPEC_LOCAL, cases[i].field, cases[i].needle);
    }
}

/* All problems at once, each under its own field; and the kinds the server
 * accepts are exactly those workers run (cka, predict; not yet train). */
static void test_predict_reports_all(void **state) {
    (void)state;
    int rc;
    json_t *errors = validate("predict",
                              "{\"model\": {\"path\": \"/m\"}, \"pool\": \"max\", \"dtype\": 16, "
                              "\"batch_size\": 0, \"layers\": [3, 3]}",
                              SPEC_SERVER, &rc);
    assert_int_equal(rc, -1);
    assert_int_equal(json_array_size(errors), 7);
    expect_error(errors, "spec.model.path", "unknown field");
    expect_error(errors, "spec.model", "needs one of \"model\" or \"job\"");
    expect_error(errors, "spec.pool", "\"last_token\"");
    expect_error(errors, "spec.dtype", "\"float32\"");
    expect_error(errors, "spec.batch_size", "from 1 to 1024");
    expect_error(errors, "spec.layers[1]", "repeats layer 3");
    expect_error(errors, "spec.dataset", "is required");
    json_decref(errors);
    assert_true(spec_known_kind("cka"));
    assert_true(spec_known_kind("predict"));
    assert_true(spec_known_kind("train"));
    assert_false(spec_known_kind("bench"));
    assert_false(spec_known_kind(NULL));
}

/* --- train -------------------------------------------------------------------- */

/* text with every ' turned into ", so specs read as JSON in the source. */
static const char *dq(const char *text) {
    static char out[4096];
    size_t n = strlen(text);
    if (n >= sizeof out) fail_msg("test spec too long");
    for (size_t i = 0; i <= n; i++) out[i] = text[i] == '\'' ? '"' : text[i];
    return out;
}

static void expect_train(const char *text, enum spec_mode mode, const char *field,
                         const char *needle) {
    int rc;
    json_t *errors = validate("train", dq(text), mode, &rc);
    assert_int_equal(rc, -1);
    expect_error(errors, field, needle);
    json_decref(errors);
}

/* Accepted, with no errors at all. */
static void expect_train_ok(const char *text, enum spec_mode mode) {
    int rc;
    json_t *errors = validate("train", dq(text), mode, &rc);
    if (rc != 0 || json_array_size(errors) != 0) {
        char *dump = json_dumps(errors, JSON_COMPACT);
        fail_msg("rejected (%s): %s: %s", mode == SPEC_LOCAL ? "local" : "server", text,
                 dump ? dump : "?");
    }
    json_decref(errors);
}

#define TRAIN_MIN "'base_model': {'model': 3}, 'dataset': {'dataset': 5}"

static void test_train_good(void **state) {
    (void)state;
    /* issue 4's example, every field as it gives them */
    const char *example =
        "{'base_model': {'model': 3}, 'dataset': {'dataset': 5}, 'template': 'llama2',"
        " 'method': 'lora', 'lora': {'r': 8, 'alpha': 16, 'dropout': 0, 'targets': ['q_proj', "
        "'v_proj']}, 'learning_rate': 5e-5, 'num_train_epochs': 3, 'max_steps': null, "
        "'batch_size': 4, 'gradient_accumulation_steps': 4, 'cutoff_len': 1024, "
        "'lr_scheduler': 'cosine', 'warmup_steps': 0, 'weight_decay': 0, 'max_grad_norm': 1.0, "
        "'seed': 42, 'save_steps': 1000}";
    expect_train_ok(example, SPEC_SERVER);
    expect_train_ok(example, SPEC_LOCAL);
    expect_train_ok("{" TRAIN_MIN "}", SPEC_SERVER);
    /* full fine-tuning, every optimizer field, a mixture of two datasets */
    expect_train_ok("{'base_model': {'model': 1}, 'dataset': [{'dataset': 5}, {'dataset': 6}],"
                    " 'method': 'full', 'learning_rate': 1e-5, 'max_steps': 100, "
                    "'lr_scheduler': 'linear', 'warmup_ratio': 0.1, 'weight_decay': 0.01, "
                    "'adam_beta1': 0.8, 'adam_beta2': 0.95, 'adam_epsilon': 1e-6, "
                    "'max_grad_norm': 0, 'mode': 'sft', 'template': 'alpaca', "
                    "'mixture': {'cap': 1000, 'by': 'task'}, 'save_steps': 0}",
                    SPEC_SERVER);
    /* from scratch on raw text, locally, with a cluster cap */
    expect_train_ok("{'base_model': {'init': {'hidden_size': 64, 'intermediate_size': 172, "
                    "'num_hidden_layers': 2, 'num_attention_heads': 4, "
                    "'num_key_value_heads': 2, 'vocab_size': 300, 'rms_norm_eps': 1e-5, "
                    "'rope_theta': 10000, 'tie_word_embeddings': true, "
                    "'max_position_embeddings': 256, 'bos_token_id': 1, 'eos_token_id': 2, "
                    "'pad_token_id': 0, 'initializer_range': 0.02}, "
                    "'tokenizer': {'path': 'tok/tokenizer.json'}}, "
                    "'dataset': {'path': 'text.jsonl'}, 'mode': 'pretrain', 'method': 'full', "
                    "'mixture': {'cap': 10, 'by': 'cluster', 'task_map': {'path': 'm.tsv'}}}",
                    SPEC_LOCAL);
    /* continuing an adapter: from a train job, an artifact, or locally a path */
    expect_train_ok("{" TRAIN_MIN ", 'adapter_init': {'job': 12}}", SPEC_SERVER);
    expect_train_ok("{" TRAIN_MIN ", 'adapter_init': {'artifact': 7}}", SPEC_SERVER);
    expect_train_ok("{'base_model': {'path': 'm'}, 'dataset': {'path': 'd.json'}, "
                    "'adapter_init': {'path': 'adapter'}, 'lr_scheduler': 'constant'}",
                    SPEC_LOCAL);
    expect_train_ok("{" TRAIN_MIN ", 'lora': {'r': 1024, 'alpha': 0.5, 'dropout': 0.99, "
                    "'targets': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', "
                    "'up_proj', 'down_proj']}, 'lr_scheduler': 'constant_with_warmup', "
                    "'warmup_steps': 10}",
                    SPEC_SERVER);
}

static void test_train_refs(void **state) {
    (void)state;
    expect_train("{'dataset': {'dataset': 5}}", SPEC_SERVER, "spec.base_model", "is required");
    expect_train("{'base_model': {'model': 3}}", SPEC_SERVER, "spec.dataset", "is required");
    expect_train("{'base_model': 3, 'dataset': {'dataset': 5}}", SPEC_SERVER, "spec.base_model",
                 "must be an object such as {\"model\": 3}");
    expect_train("{'base_model': {'model': 0}, 'dataset': {'dataset': 5}}", SPEC_SERVER,
                 "spec.base_model.model", "positive integer id");
    /* paths only in a local run */
    expect_train("{'base_model': {'path': 'm'}, 'dataset': {'dataset': 5}}", SPEC_SERVER,
                 "spec.base_model.path", "unknown field");
    expect_train("{'base_model': {'model': 3}, 'dataset': {'path': 'd'}}", SPEC_SERVER,
                 "spec.dataset.path", "unknown field");
    expect_train("{'base_model': {'model': 3}, 'dataset': {'artifact': 2}}", SPEC_SERVER,
                 "spec.dataset.artifact", "unknown field");
    expect_train("{'base_model': {'model': 3, 'path': 'm'}, 'dataset': {'dataset': 5}}",
                 SPEC_LOCAL, "spec.base_model", "exactly one input");
    expect_train("{'base_model': {'model': 3}, 'dataset': []}", SPEC_SERVER, "spec.dataset",
                 "array of 1 to 256");
    expect_train("{'base_model': {'model': 3}, 'dataset': [{'dataset': 5}, {'dataset': -1}]}",
                 SPEC_SERVER, "spec.dataset[1].dataset", "positive integer id");
    expect_train("{" TRAIN_MIN ", 'adapter_init': {'model': 3}}", SPEC_SERVER,
                 "spec.adapter_init.model", "unknown field");
    expect_train("{" TRAIN_MIN ", 'adapter_init': {}}", SPEC_SERVER, "spec.adapter_init",
                 "needs one of \"artifact\" or \"job\"");
}

static void test_train_init(void **state) {
    (void)state;
#define INIT_OK "'hidden_size': 64, 'intermediate_size': 172, 'num_hidden_layers': 2, " \
                "'num_attention_heads': 4, 'vocab_size': 300"
    expect_train("{'base_model': {'init': {" INIT_OK "}}, 'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.tokenizer", "is required with init");
    expect_train("{'base_model': {'init': {" INIT_OK "}, 'tokenizer': {'dataset': 2}}, "
                 "'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.tokenizer.dataset", "unknown field");
    expect_train("{'base_model': {'init': {" INIT_OK "}, 'model': 3, 'tokenizer': {'model': 3}},"
                 " 'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.model", "cannot be given with init");
    expect_train("{'base_model': {'init': [], 'tokenizer': {'model': 3}}, "
                 "'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.init", "must be a config object");
    expect_train("{'base_model': {'init': {'hidden_size': 64}, 'tokenizer': {'model': 3}}, "
                 "'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.init.vocab_size", "is required");
    expect_train("{'base_model': {'init': {" INIT_OK ", 'hidden_act': 'gelu'}, "
                 "'tokenizer': {'model': 3}}, 'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.init.hidden_act", "unknown field");
    expect_train("{'base_model': {'init': {" INIT_OK ", 'num_hidden_layers': 0}, "
                 "'tokenizer': {'model': 3}}, 'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.init.num_hidden_layers", "from 1 to 1024");
    /* 64 / 5 heads, and 64 / 8 = 8 fine but 64 / 64 = 1 is an odd head size */
    expect_train("{'base_model': {'init': {" INIT_OK ", 'num_attention_heads': 64}, "
                 "'tokenizer': {'model': 3}}, 'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.init.num_attention_heads", "even size");
    expect_train("{'base_model': {'init': {" INIT_OK ", 'num_key_value_heads': 3}, "
                 "'tokenizer': {'model': 3}}, 'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.init.num_key_value_heads",
                 "divide num_attention_heads (4)");
    expect_train("{'base_model': {'init': {" INIT_OK ", 'eos_token_id': 300}, "
                 "'tokenizer': {'model': 3}}, 'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.init.eos_token_id", "below vocab_size (300)");
    expect_train("{'base_model': {'init': {" INIT_OK ", 'rms_norm_eps': 0}, "
                 "'tokenizer': {'model': 3}}, 'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.init.rms_norm_eps", "(0, 1]");
    expect_train("{'base_model': {'init': {" INIT_OK ", 'tie_word_embeddings': 1}, "
                 "'tokenizer': {'model': 3}}, 'dataset': {'dataset': 5}}",
                 SPEC_SERVER, "spec.base_model.init.tie_word_embeddings", "true or false");
#undef INIT_OK
}

static void test_train_options(void **state) {
    (void)state;
    static const struct {
        const char *extra, *field, *needle;
    } bad[] = {
        {"'template': 'chatml'", "spec.template", "\"llama2\" (default)"},
        {"'method': 'qlora'", "spec.method", "\"lora\" (default) or \"full\""},
        {"'lora': 8", "spec.lora", "must be an object"},
        {"'lora': {'r': 0}", "spec.lora.r", "from 1 to 1024"},
        {"'lora': {'r': 1025}", "spec.lora.r", "from 1 to 1024"},
        {"'lora': {'r': 8.5}", "spec.lora.r", "integer"},
        {"'lora': {'alpha': 0}", "spec.lora.alpha", "(0, 1e+06]"},
        {"'lora': {'dropout': 1}", "spec.lora.dropout", "[0, 1)"},
        {"'lora': {'dropout': -0.1}", "spec.lora.dropout", "[0, 1)"},
        {"'lora': {'targets': []}", "spec.lora.targets", "non-empty array"},
        {"'lora': {'targets': ['q_proj', 'lm_head']}", "spec.lora.targets[1]", "must be one of"},
        {"'lora': {'targets': ['v_proj', 'v_proj']}", "spec.lora.targets[1]", "repeats v_proj"},
        {"'lora': {'rank': 8}", "spec.lora.rank", "unknown field"},
        {"'learning_rate': 0", "spec.learning_rate", "(0, 10]"},
        {"'learning_rate': '5e-5'", "spec.learning_rate", "must be a number"},
        {"'num_train_epochs': 0", "spec.num_train_epochs", "(0, 1e+06]"},
        {"'max_steps': 0", "spec.max_steps", "from 1 to"},
        {"'max_steps': 'all'", "spec.max_steps", "integer"},
        {"'batch_size': 0", "spec.batch_size", "from 1 to 1024"},
        {"'gradient_accumulation_steps': 0", "spec.gradient_accumulation_steps", "from 1 to"},
        {"'cutoff_len': 1", "spec.cutoff_len", "from 2 to 1048576"},
        {"'lr_scheduler': 'polynomial'", "spec.lr_scheduler", "\"linear\" (default)"},
        {"'warmup_steps': -1", "spec.warmup_steps", "from 0 to"},
        {"'warmup_ratio': 1.5", "spec.warmup_ratio", "[0, 1]"},
        {"'warmup_steps': 5, 'warmup_ratio': 0.1", "spec.warmup_ratio", "with warmup_steps"},
        {"'lr_scheduler': 'constant', 'warmup_steps': 5", "spec.warmup_steps",
         "constant_with_warmup"},
        {"'lr_scheduler': 'constant', 'warmup_ratio': 0.1", "spec.warmup_ratio",
         "constant_with_warmup"},
        {"'weight_decay': -0.01", "spec.weight_decay", "[0, 1000]"},
        {"'max_grad_norm': -1", "spec.max_grad_norm", "[0, 1e+09]"},
        {"'adam_beta1': 1", "spec.adam_beta1", "[0, 1)"},
        {"'adam_beta2': -0.5", "spec.adam_beta2", "[0, 1)"},
        {"'adam_epsilon': -1e-8", "spec.adam_epsilon", "[0, 1]"},
        {"'seed': -1", "spec.seed", "integer from 0"},
        {"'seed': 1.5", "spec.seed", "integer from 0"},
        {"'save_steps': -1", "spec.save_steps", "from 0 to"},
        {"'mode': 'rlhf'", "spec.mode", "\"sft\" (default) or \"pretrain\""},
        {"'mode': 'pretrain', 'template': 'llama2'", "spec.template", "only to mode \"sft\""},
        {"'method': 'full', 'lora': {'r': 4}", "spec.lora", "only with method \"lora\""},
        {"'method': 'full', 'adapter_init': {'job': 4}", "spec.adapter_init",
         "only with method \"lora\""},
        {"'adapter_init': {'job': 4}, 'lora': {'r': 4}", "spec.lora",
         "cannot be given with adapter_init"},
        {"'mixture': 100", "spec.mixture", "must be an object"},
        {"'mixture': {'by': 'task'}", "spec.mixture.cap", "is required"},
        {"'mixture': {'cap': 10}", "spec.mixture.by", "is required"},
        {"'mixture': {'cap': 0, 'by': 'task'}", "spec.mixture.cap", "from 1 to"},
        {"'mixture': {'cap': 10, 'by': 'dataset'}", "spec.mixture.by", "\"cluster\" or \"task\""},
        {"'mixture': {'cap': 10, 'by': 'cluster'}", "spec.mixture.task_map",
         "is required with by \"cluster\""},
        {"'mixture': {'cap': 10, 'by': 'task', 'task_map': {'artifact': 2}}",
         "spec.mixture.task_map", "only with by \"cluster\""},
        {"'mixture': {'cap': 10, 'by': 'cluster', 'task_map': {'job': 2}}",
         "spec.mixture.task_map.job", "unknown field"},
        {"'mixture': {'cap': 10, 'by': 'task', 'seed': 1}", "spec.mixture.seed", "unknown field"},
        {"'epochs': 3", "spec.epochs", "unknown field"},
        {"'lora_r': 8", "spec.lora_r", "unknown field"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char text[1024];
        snprintf(text, sizeof text, "{" TRAIN_MIN ", %s}", bad[i].extra);
        expect_train(text, SPEC_SERVER, bad[i].field, bad[i].needle);
        expect_train(text, SPEC_LOCAL, bad[i].field, bad[i].needle);
    }
    /* boundaries that are accepted */
    expect_train_ok("{" TRAIN_MIN ", 'lora': {'dropout': 0}, 'warmup_ratio': 1, "
                    "'adam_beta1': 0, 'adam_epsilon': 0, 'max_grad_norm': 0, 'seed': 0, "
                    "'cutoff_len': 2, 'learning_rate': 10, 'max_steps': null}",
                    SPEC_SERVER);
    /* warmup 0 with constant is no warmup, so it is allowed */
    expect_train_ok("{" TRAIN_MIN ", 'lr_scheduler': 'constant', 'warmup_steps': 0}",
                    SPEC_SERVER);
}

/* Every problem is reported at once, each naming its own field. */
static void test_train_reports_all(void **state) {
    (void)state;
    int rc;
    json_t *errors = validate("train",
                              dq("{'base_model': {'model': 'x'}, 'lora': {'r': 0}, "
                                 "'batch_size': 0, 'optimizer': 'sgd'}"),
                              SPEC_SERVER, &rc);
    assert_int_equal(rc, -1);
    expect_error(errors, "spec.base_model.model", "positive integer id");
    expect_error(errors, "spec.lora.r", "from 1 to 1024");
    expect_error(errors, "spec.batch_size", "from 1 to 1024");
    expect_error(errors, "spec.optimizer", "unknown field");
    expect_error(errors, "spec.dataset", "is required");
    assert_int_equal(json_array_size(errors), 5);
    json_decref(errors);
    /* train is a kind the server queues (workers resume it from checkpoints) */
    assert_true(spec_known_kind("train"));
}

/* --- precision (predict and train) -------------------------------------------- */

static void test_precision(void **state) {
    (void)state;
    static const char *const good[] = {"bf16", "fp16", "fp32"};
    char text[256];
    for (size_t i = 0; i < 3; i++) {
        snprintf(text, sizeof text,
                 "{\"model\": {\"model\": 3}, \"dataset\": {\"dataset\": 5}, "
                 "\"precision\": \"%s\"}",
                 good[i]);
        expect_predict_ok(text, SPEC_SERVER);
        expect_predict_ok(text, SPEC_LOCAL);
        snprintf(text, sizeof text, "{" TRAIN_MIN ", 'precision': '%s'}", good[i]);
        expect_train_ok(text, SPEC_SERVER);
        expect_train_ok(text, SPEC_LOCAL);
    }
    /* Wrong names, case, types: each names the field and the choices. */
    static const char *const bad[] = {"\"BF16\"", "\"float16\"", "\"tf32\"", "\"\"", "16",
                                      "null", "[\"bf16\"]", "true"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(text, sizeof text,
                 "{\"model\": {\"model\": 3}, \"dataset\": {\"dataset\": 5}, "
                 "\"precision\": %s}",
                 bad[i]);
        expect_predict(text, SPEC_SERVER, "spec.precision", "\"bf16\" (the default on a GPU)");
        int rc;
        json_t *errors = validate("predict", text, SPEC_LOCAL, &rc);
        assert_int_equal(rc, -1);
        assert_int_equal(json_array_size(errors), 1); /* nothing else is wrong */
        json_decref(errors);
        char train[256];
        snprintf(train, sizeof train, "{\"base_model\": {\"model\": 3}, \"dataset\": "
                 "{\"dataset\": 5}, \"precision\": %s}", bad[i]);
        errors = validate("train", train, SPEC_SERVER, &rc);
        assert_int_equal(rc, -1);
        expect_error(errors, "spec.precision", "\"fp16\" or \"fp32\"");
        assert_int_equal(json_array_size(errors), 1);
        json_decref(errors);
    }
    /* cka has no precision: still an unknown field there */
    expect_one("{\"x\": {\"artifact\": 3}, \"y\": {\"artifact\": 4}, \"precision\": "
               "\"bf16\"}",
               SPEC_SERVER, "spec.precision", "unknown field");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_specs),  cmocka_unit_test(test_bad_refs),
        cmocka_unit_test(test_bad_options), cmocka_unit_test(test_reports_all),
        cmocka_unit_test(test_bad_kind_and_shape), cmocka_unit_test(test_predict_good),
        cmocka_unit_test(test_predict_refs),       cmocka_unit_test(test_predict_options),
        cmocka_unit_test(test_predict_reports_all),
        cmocka_unit_test(test_train_good),         cmocka_unit_test(test_train_refs),
        cmocka_unit_test(test_train_init),         cmocka_unit_test(test_train_options),
        cmocka_unit_test(test_train_reports_all),
        cmocka_unit_test(test_precision),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
