/* test_lora.c - LoRA adapters (worker/engine/lora.c) on the reference gqa model
 * (tests/reference/fixtures/gqa), against tests/fixtures/lora/ (gen_lora.py):
 * expected last-token hidden states of every layer computed by PyTorch with
 * the adapter UNMERGED (W x + s B (A x)) in float64, so the C merge is checked
 * against an independent computation.
 *
 * Tolerances: hidden states, per layer, max |C - ref| <= 1e-4 * max |ref|
 * (REF_REL_TOL, the reference's tolerance). The direct merge check (layer1):
 * max |W' - (W + s B A)| <= 1e-6 * max |W + s B A| (MERGE_REL_TOL: one float32
 * rounding of a sum over r = 2 terms), and every weight outside the targeted
 * slices is bit-identical. Error cases assert -1, a message naming the file
 * and the field or tensor, and a model left bit-identical. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/npy.h"
#include "common/st.h"
#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/backend.h"
#include "worker/engine/forward.h"
#include "worker/engine/lora.h"
#include "worker/engine/model.h"

#define REF_REL_TOL 1e-4
#define MERGE_REL_TOL 1e-6
#define MAX_B 8
#define MAX_LAYERS 8

static char gqa_dir[PATH_MAX + 64];
static char lora_dir[PATH_MAX + 64];

static void load_gqa(llama_model *m) {
    char err[ERR_LEN];
    memset(m, 0, sizeof *m);
    if (llama_load_hf(gqa_dir, m, err, sizeof err) != 0) fail_msg("%s: %s", gqa_dir, err);
}

/* The gqa batch from its expected.json. */
typedef struct {
    int B, T;
    int lengths[MAX_B];
    int *tokens;
} batch;

static void batch_load(batch *bt) {
    char path[PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/expected.json", gqa_dir);
    json_t *root = tu_load_json(path);
    json_t *b = json_object_get(root, "batch");
    json_t *ids = json_object_get(b, "input_ids"), *lens = json_object_get(b, "lengths");
    bt->T = (int)json_integer_value(json_object_get(b, "T"));
    bt->B = (int)json_array_size(lens);
    assert_true(bt->B > 0 && bt->B <= MAX_B && bt->T > 0);
    bt->tokens = calloc((size_t)bt->B * (size_t)bt->T, sizeof *bt->tokens);
    assert_non_null(bt->tokens);
    for (int i = 0; i < bt->B; i++) {
        bt->lengths[i] = (int)json_integer_value(json_array_get(lens, (size_t)i));
        json_t *row = json_array_get(ids, (size_t)i);
        assert_int_equal(json_array_size(row), (size_t)bt->T);
        for (int t = 0; t < bt->T; t++)
            bt->tokens[i * bt->T + t] = (int)json_integer_value(json_array_get(row, (size_t)t));
    }
    json_decref(root);
}

/* Last real token of each example, per hidden-state index. */
typedef struct {
    int L, C;
    const int *lengths;
    float *last[MAX_LAYERS + 1]; /* (B, C) each */
    int calls;
} last_collector;

static int last_hook(void *user, int layer, const float *x, int B, int T, int C, char *err,
                     size_t errlen) {
    (void)err, (void)errlen;
    last_collector *c = user;
    assert_int_equal(layer, c->calls);
    assert_int_equal(C, c->C);
    c->calls++;
    for (int b = 0; b < B; b++)
        memcpy(c->last[layer] + (size_t)b * (size_t)C,
               x + ((size_t)b * (size_t)T + (size_t)(c->lengths[b] - 1)) * (size_t)C,
               (size_t)C * sizeof *x);
    return 0;
}

/* Applies adapter name to gqa, runs the batch and compares every layer's
 * last-token states with the fixture; checks the reported info. */
static void adapter_case(const char *name, int modules, int r, double alpha, float scaling,
                         bool rslora) {
    llama_model m;
    load_gqa(&m);
    char dir[PATH_MAX + 128], err[ERR_LEN];
    snprintf(dir, sizeof dir, "%s/%s", lora_dir, name);
    lora_info info;
    memset(&info, 0, sizeof info);
    if (lora_apply_info(&m, dir, &info, err, sizeof err) != 0) fail_msg("%s: %s", dir, err);
    assert_int_equal(info.modules, modules);
    assert_int_equal(info.r, r);
    assert_true(info.alpha == alpha);
    assert_true(info.rslora == rslora);
    assert_true(fabsf(info.scaling - scaling) <= 1e-6f * scaling);

    batch bt;
    batch_load(&bt);
    int L = m.cfg.num_hidden_layers, C = m.cfg.hidden_size;
    assert_true(L < MAX_LAYERS);
    last_collector col;
    memset(&col, 0, sizeof col);
    col.L = L, col.C = C, col.lengths = bt.lengths;
    for (int l = 0; l <= L; l++) {
        col.last[l] = calloc((size_t)bt.B * (size_t)C, sizeof(float));
        assert_non_null(col.last[l]);
    }
    llama_state s;
    if (llama_state_init(&s, backend_cpu(), &m.cfg, bt.B, bt.T, err, sizeof err) != 0)
        fail_msg("state: %s", err);
    if (llama_forward(backend_cpu(), &m, &s, bt.tokens, bt.lengths, bt.B, bt.T, last_hook, &col,
                      NULL, err, sizeof err) != 0)
        fail_msg("forward: %s", err);
    assert_int_equal(col.calls, L + 1);
    for (int l = 0; l <= L; l++) {
        char path[PATH_MAX + 256];
        snprintf(path, sizeof path, "%s/last_token_%d.npy", dir, l);
        npy_header h;
        double *want = tu_read_npy(path, &h);
        assert_int_equal(h.rows, (size_t)bt.B);
        assert_int_equal(h.cols, (size_t)C);
        double e = tu_rel_err_f(col.last[l], want, (size_t)bt.B * (size_t)C, path);
        if (e > REF_REL_TOL) fail_msg("%s layer %d: relative error %g > %g", name, l, e, REF_REL_TOL);
        print_message("%s last_token_%d: relative error %.2g\n", name, l, e);
        free(want);
        free(col.last[l]);
    }
    llama_state_free(&s);
    free(bt.tokens);
    llama_free(&m);
}

static void test_qv(void **state) {
    (void)state;
    adapter_case("qv", 6, 8, 16.0, 2.0f, false);
}

static void test_all7_bf16(void **state) {
    (void)state;
    adapter_case("all7", 21, 4, 8.0, 2.0f, false);
}

static void test_rslora_regex_f16(void **state) {
    (void)state;
    adapter_case("rslora", 6, 4, 8.0, 4.0f, true);
}

/* Reads tensor name of file path as float32 (caller frees). */
static float *read_tensor(const char *path, const char *name, size_t count) {
    st_file f;
    char err[ERR_LEN];
    if (st_open(path, &f, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
    const st_tensor *t = st_find(&f, name);
    if (!t) fail_msg("%s: no %s", path, name);
    assert_int_equal(t->count, count);
    float *out = malloc(count * sizeof *out);
    assert_non_null(out);
    if (st_to_f32(&f, t, out, err, sizeof err) != 0) fail_msg("%s", err);
    st_close(&f);
    return out;
}

/* layers_to_transform [1]: only layer 1's q and v slices change, each by
 * exactly s B A (computed here in double from the file). */
static void test_layer1_direct_merge(void **state) {
    (void)state;
    llama_model base, m;
    load_gqa(&base);
    load_gqa(&m);
    char dir[PATH_MAX + 128], st_path[PATH_MAX + 200], err[ERR_LEN];
    snprintf(dir, sizeof dir, "%s/layer1", lora_dir);
    snprintf(st_path, sizeof st_path, "%s/adapter_model.safetensors", dir);
    lora_info info;
    if (lora_apply_info(&m, dir, &info, err, sizeof err) != 0) fail_msg("%s: %s", dir, err);
    assert_int_equal(info.modules, 2);
    assert_true(fabsf(info.scaling - 1.5f) < 1e-7f);
    const int r = 2, C = m.cfg.hidden_size;
    const int NH = m.cfg.num_attention_heads, HS = C / NH;
    const int outs[2] = {NH * HS, m.cfg.num_key_value_heads * HS};
    const char *mods[2] = {"q_proj", "v_proj"};
    float *bw[2] = {base.w.wq, base.w.wv}, *mw[2] = {m.w.wq, m.w.wv};
    size_t changed_lo[2], changed_hi[2];
    for (int k = 0; k < 2; k++) {
        char an[128], bn[128];
        snprintf(an, sizeof an, "base_model.model.model.layers.1.self_attn.%s.lora_A.weight", mods[k]);
        snprintf(bn, sizeof bn, "base_model.model.model.layers.1.self_attn.%s.lora_B.weight", mods[k]);
        float *a = read_tensor(st_path, an, (size_t)r * (size_t)C);
        float *b = read_tensor(st_path, bn, (size_t)outs[k] * (size_t)r);
        size_t slice = (size_t)outs[k] * (size_t)C;
        const float *w0 = bw[k] + slice, *w1 = mw[k] + slice; /* layer 1 */
        double scale = 0.0, worst = 0.0, moved = 0.0;
        for (int o = 0; o < outs[k]; o++) {
            for (int i = 0; i < C; i++) {
                double d = 0.0;
                for (int j = 0; j < r; j++) d += (double)b[o * r + j] * a[j * C + i];
                double want = w0[(size_t)o * C + i] + 1.5 * d;
                double got = w1[(size_t)o * C + i];
                if (fabs(want) > scale) scale = fabs(want);
                if (fabs(got - want) > worst) worst = fabs(got - want);
                moved += fabs(d);
            }
        }
        assert_true(moved > 0.0);
        if (worst > MERGE_REL_TOL * scale)
            fail_msg("%s: merge error %g > %g", mods[k], worst, MERGE_REL_TOL * scale);
        changed_lo[k] = (size_t)(mw[k] - m.params) + slice;
        changed_hi[k] = changed_lo[k] + slice;
        free(a);
        free(b);
    }
    /* Everything else is untouched, bit for bit. */
    assert_int_equal(m.nparams, base.nparams);
    size_t diffs = 0;
    for (size_t i = 0; i < m.nparams; i++) {
        bool in_slice = (i >= changed_lo[0] && i < changed_hi[0]) ||
                        (i >= changed_lo[1] && i < changed_hi[1]);
        if (!in_slice && memcmp(&m.params[i], &base.params[i], sizeof(float)) != 0) diffs++;
    }
    assert_int_equal(diffs, 0);
    llama_free(&base);
    llama_free(&m);
}

/* lora_apply on dir must fail with a message containing every needle, and
 * leave the model bit-identical. */
static void expect_error(const char *dir, const char *const *needles) {
    llama_model m;
    load_gqa(&m);
    size_t bytes = m.nparams * sizeof(float);
    float *copy = malloc(bytes);
    assert_non_null(copy);
    memcpy(copy, m.params, bytes);
    char err[ERR_LEN] = "";
    if (lora_apply(&m, dir, err, sizeof err) == 0) fail_msg("%s: accepted", dir);
    print_message("%s -> %s\n", strrchr(dir, '/') ? strrchr(dir, '/') + 1 : dir, err);
    for (const char *const *n = needles; *n; n++)
        if (!strstr(err, *n)) fail_msg("%s: error \"%s\" lacks \"%s\"", dir, err, *n);
    assert_memory_equal(copy, m.params, bytes);
    free(copy);
    llama_free(&m);
}

static void fixture_error(const char *name, const char *const *needles) {
    char dir[PATH_MAX + 128];
    snprintf(dir, sizeof dir, "%s/%s", lora_dir, name);
    expect_error(dir, needles);
}

static void test_tensor_errors(void **state) {
    (void)state;
    fixture_error("err_missing_b", (const char *const[]){
        "adapter_model.safetensors", "layers.0.self_attn.v_proj.lora_B.weight", "missing", NULL});
    fixture_error("err_bad_dtype", (const char *const[]){
        "adapter_model.safetensors", "layers.0.self_attn.q_proj.lora_A.weight", "F64", NULL});
    fixture_error("err_wrong_r", (const char *const[]){
        "adapter_model.safetensors", "lora_A.weight", "(2, 64)", "(4, 64)", "r 4", NULL});
    fixture_error("err_unknown_module", (const char *const[]){
        "adapter_model.safetensors", "layers.0.mlp.fc1.lora_A.weight", "supported", NULL});
    fixture_error("err_layer_range", (const char *const[]){
        "adapter_model.safetensors", "layers.7.self_attn.q_proj", "out of range", "3 layers", NULL});
    fixture_error("err_untargeted_layer", (const char *const[]){
        "adapter_model.safetensors", "layers.1.self_attn.q_proj", "not targeted", NULL});
}

/* A temporary adapter directory: config text (none when NULL) next to a
 * link to layer1's safetensors (none when link is false). */
static void temp_adapter(char *dir, size_t dirlen, const char *config, bool link) {
    if (tu_mkdtemp(dir, dirlen, "test-lora") != 0) fail_msg("mkdtemp failed");
    char path[PATH_MAX + 64], target[PATH_MAX + 128];
    if (config) {
        snprintf(path, sizeof path, "%s/adapter_config.json", dir);
        FILE *f = fopen(path, "w");
        assert_non_null(f);
        fputs(config, f);
        fclose(f);
    }
    if (link) {
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
        snprintf(target, sizeof target, "%s/layer1/adapter_model.safetensors", lora_dir);
        char abs_target[PATH_MAX];
        if (!realpath(target, abs_target)) fail_msg("realpath %s", target);
        assert_int_equal(symlink(abs_target, path), 0);
    }
}

/* One config-level refusal: a layer1-like config with one field changed. */
static void config_error(const char *fields, const char *const *needles) {
    char config[1024], dir[64];
    snprintf(config, sizeof config,
             "{\"peft_type\": \"LORA\", \"bias\": \"none\", \"lora_dropout\": 0.0, "
             "\"fan_in_fan_out\": false, \"use_rslora\": false, %s}", fields);
    temp_adapter(dir, sizeof dir, config, true);
    expect_error(dir, needles);
    tu_rmtree(dir);
}

#define GOOD_CORE "\"r\": 2, \"lora_alpha\": 3, \"target_modules\": [\"q_proj\", \"v_proj\"]"

static void test_config_errors(void **state) {
    (void)state;
    char dir[64];
    /* No adapter_config.json. */
    temp_adapter(dir, sizeof dir, NULL, true);
    expect_error(dir, (const char *const[]){"adapter_config.json", NULL});
    tu_rmtree(dir);
    /* No adapter_model.safetensors. */
    temp_adapter(dir, sizeof dir,
                 "{\"r\": 2, \"lora_alpha\": 3, \"target_modules\": [\"q_proj\"], "
                 "\"layers_to_transform\": [1]}", false);
    expect_error(dir, (const char *const[]){"adapter_model.safetensors", NULL});
    tu_rmtree(dir);
    /* Not JSON. */
    temp_adapter(dir, sizeof dir, "{\"r\": 2,", true);
    expect_error(dir, (const char *const[]){"adapter_config.json", "JSON", NULL});
    tu_rmtree(dir);

    config_error(GOOD_CORE ", \"layers_to_transform\": [1], \"modules_to_save\": [\"lm_head\"]",
                 (const char *const[]){"adapter_config.json", "modules_to_save", NULL});
    config_error(GOOD_CORE ", \"layers_to_transform\": [1], \"use_dora\": true",
                 (const char *const[]){"use_dora", NULL});
    config_error(GOOD_CORE ", \"layers_to_transform\": 1, \"rank_pattern\": {\"q_proj\": 4}",
                 (const char *const[]){"rank_pattern", NULL});
    config_error(GOOD_CORE ", \"layers_to_transform\": [5]",
                 (const char *const[]){"layers_to_transform", "out of range", NULL});
    config_error("\"r\": 0, \"lora_alpha\": 3, \"target_modules\": [\"q_proj\"]",
                 (const char *const[]){"adapter_config.json", "r must be", NULL});
    config_error("\"r\": 2, \"target_modules\": [\"q_proj\"]",
                 (const char *const[]){"lora_alpha", NULL});
    config_error("\"r\": 2, \"lora_alpha\": 3, \"target_modules\": [\"q_proj\", \"lm_head\"]",
                 (const char *const[]){"target_modules", "lm_head", "not supported", NULL});
    config_error("\"r\": 2, \"lora_alpha\": 3, \"target_modules\": \".*\"",
                 (const char *const[]){"target_modules", "lm_head", NULL});
    config_error("\"r\": 2, \"lora_alpha\": 3, \"target_modules\": \"nothing_here\"",
                 (const char *const[]){"matches no module", NULL});
    config_error("\"r\": 2, \"lora_alpha\": 3, \"target_modules\": []",
                 (const char *const[]){"target_modules", NULL});
    config_error(GOOD_CORE ", \"layers_to_transform\": [1], \"lora_bias\": true",
                 (const char *const[]){"lora_bias", NULL});
    /* The file is fine but the config targets more than it holds: layer1's
     * file has layer 1 only, the config every layer. */
    config_error(GOOD_CORE, (const char *const[]){
        "layers.0.self_attn.q_proj.lora_A.weight", "missing", NULL});
}

/* bias, fan_in_fan_out and peft_type, which config_error's prefix fixes. */
static void test_config_field_values(void **state) {
    (void)state;
    static const struct {
        const char *config, *needle;
    } cases[] = {
        {"{\"r\": 2, \"lora_alpha\": 3, \"target_modules\": [\"q_proj\"], \"bias\": \"all\"}", "bias"},
        {"{\"r\": 2, \"lora_alpha\": 3, \"target_modules\": [\"q_proj\"], \"fan_in_fan_out\": true}",
         "fan_in_fan_out"},
        {"{\"r\": 2, \"lora_alpha\": 3, \"target_modules\": [\"q_proj\"], \"peft_type\": \"IA3\"}",
         "peft_type"},
        {"{\"r\": 2, \"lora_alpha\": 3, \"target_modules\": [\"q_proj\"], \"use_rslora\": 1}",
         "use_rslora"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dir[64];
        temp_adapter(dir, sizeof dir, cases[i].config, true);
        expect_error(dir, (const char *const[]){"adapter_config.json", cases[i].needle, NULL});
        tu_rmtree(dir);
    }
}

int main(void) {
    tu_reference_path(gqa_dir, sizeof gqa_dir, "gqa");
    tu_fixture_path(lora_dir, sizeof lora_dir, "lora");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qv),
        cmocka_unit_test(test_all7_bf16),
        cmocka_unit_test(test_rslora_regex_f16),
        cmocka_unit_test(test_layer1_direct_merge),
        cmocka_unit_test(test_tensor_errors),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_config_field_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
