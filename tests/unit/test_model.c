/* test_model.c - config.json, the Hugging Face loader and the llama2.c loader.
 *
 * Models are written here (safetensors, index, llama2.c files, all by hand,
 * not through st.c), with values exact in F32, F16 and BF16, so every loader
 * must reproduce them bit for bit; the llama2.c writer applies the RoPE
 * interleaving the loader must undo. Then the committed reference fixtures
 * (tests/reference/fixtures, made by PyTorch): the f32 HF model and its two
 * llama2.c exports give identical parameters, the f16 sharded copy of the
 * same model equals its f32 values rounded to f16, the bf16 tied model holds
 * bf16 values with lm_head == embed. Every comparison is exact. Broken
 * models (missing, extra, misshapen, wrongly typed tensors, bad indexes,
 * truncated files, bad config fields) must fail with errors naming the file
 * and the tensor or field. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/npy.h"
#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/model.h"

#define REF_DIR "tests/reference/fixtures"

static char test_dir[64];

static int setup_dir(void **state) {
    (void)state;
    return tu_mkdtemp(test_dir, sizeof test_dir, "model");
}

static int teardown_dir(void **state) {
    (void)state;
    return tu_rmtree(test_dir);
}

static void in_dir(char *out, size_t outlen, const char *name) {
    snprintf(out, outlen, "%s/%s", test_dir, name);
}

static void write_text(const char *name, const char *text) {
    char path[PATH_MAX];
    in_dir(path, sizeof path, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void remove_file(const char *name) {
    char path[PATH_MAX];
    in_dir(path, sizeof path, name);
    unlink(path);
}

/* --- the small model the writers use ------------------------------------ */

/* C = 8, FF = 12, L = 2, NH = 2 (HS = 4), NKV = 1, V = 10. */
static void small_config_text(char *out, size_t outlen, bool tied, const char *extra) {
    snprintf(out, outlen,
             "{\"model_type\": \"llama\", \"hidden_size\": 8, \"intermediate_size\": 12, "
             "\"num_hidden_layers\": 2, \"num_attention_heads\": 2, \"num_key_value_heads\": 1, "
             "\"vocab_size\": 10, \"max_position_embeddings\": 16, \"rms_norm_eps\": 1e-05, "
             "\"rope_theta\": 10000.0, \"tie_word_embeddings\": %s, \"bos_token_id\": 1, "
             "\"eos_token_id\": 2, \"rope_scaling\": null%s%s}",
             tied ? "true" : "false", extra ? ", " : "", extra ? extra : "");
}

typedef struct {
    char name[96];
    int ndim;
    size_t shape[3];
    const char *dtype; /* "F32", "F16", "BF16", or another to test refusal */
    size_t count;
    float *values;     /* count values, exact in F16 and BF16 */
} entry;

#define MAX_ENTRIES 32

/* Exact in binary16 and bfloat16: multiples of 1/4 in [-7, 8). */
static float entry_value(size_t tensor, size_t k) {
    return (float)((tensor * 7 + k * 3) % 61) * 0.25f - 7.0f;
}

static void add_entry(entry *e, size_t *n, const char *name, size_t rows, size_t cols,
                      const char *dtype) {
    entry *x = &e[*n];
    memset(x, 0, sizeof *x);
    snprintf(x->name, sizeof x->name, "%s", name);
    x->ndim = cols ? 2 : 1;
    x->shape[0] = rows;
    x->shape[1] = cols;
    x->count = rows * (cols ? cols : 1);
    x->dtype = dtype;
    x->values = malloc(x->count * sizeof(float));
    assert_non_null(x->values);
    for (size_t k = 0; k < x->count; k++) x->values[k] = entry_value(*n, k);
    (*n)++;
}

/* Every tensor of the small model, in HF names and shapes. */
static size_t small_entries(entry *e, bool tied, const char *dtype) {
    size_t n = 0;
    char name[96];
    add_entry(e, &n, "model.embed_tokens.weight", 10, 8, dtype);
    for (int l = 0; l < 2; l++) {
        static const struct {
            const char *suffix;
            size_t rows, cols;
        } per[] = {
            {"input_layernorm.weight", 8, 0},  {"self_attn.q_proj.weight", 8, 8},
            {"self_attn.k_proj.weight", 4, 8}, {"self_attn.v_proj.weight", 4, 8},
            {"self_attn.o_proj.weight", 8, 8}, {"post_attention_layernorm.weight", 8, 0},
            {"mlp.gate_proj.weight", 12, 8},   {"mlp.up_proj.weight", 12, 8},
            {"mlp.down_proj.weight", 8, 12},
        };
        for (size_t i = 0; i < sizeof per / sizeof per[0]; i++) {
            snprintf(name, sizeof name, "model.layers.%d.%s", l, per[i].suffix);
            add_entry(e, &n, name, per[i].rows, per[i].cols, dtype);
        }
    }
    add_entry(e, &n, "model.norm.weight", 8, 0, dtype);
    if (!tied) add_entry(e, &n, "lm_head.weight", 10, 8, dtype);
    return n;
}

static void free_entries(entry *e, size_t n) {
    for (size_t i = 0; i < n; i++) free(e[i].values);
}

static size_t dtype_size(const char *dtype) {
    if (strcmp(dtype, "F16") == 0 || strcmp(dtype, "BF16") == 0) return 2;
    if (strcmp(dtype, "F64") == 0 || strcmp(dtype, "I64") == 0) return 8;
    return 4;
}

static void encode(const entry *x, unsigned char *out) {
    for (size_t k = 0; k < x->count; k++) {
        float v = x->values[k];
        if (strcmp(x->dtype, "F16") == 0 || strcmp(x->dtype, "BF16") == 0) {
            uint16_t h;
            if (strcmp(x->dtype, "F16") == 0) {
                h = npy_double_to_half(v);
            } else {
                uint32_t bits;
                memcpy(&bits, &v, sizeof bits);
                h = (uint16_t)(bits >> 16);
            }
            out[2 * k] = (unsigned char)(h & 0xff);
            out[2 * k + 1] = (unsigned char)(h >> 8);
        } else if (strcmp(x->dtype, "F64") == 0) {
            double d = v;
            memcpy(out + 8 * k, &d, 8);
        } else {
            memcpy(out + 4 * k, &v, 4); /* F32, or I32 bits for a refusal test */
        }
    }
}

/* Writes entries[0..n) as a safetensors file test_dir/name. */
static void write_safetensors(const char *name, const entry *e, size_t n, size_t trim) {
    size_t cap = 16384, used = 0, off = 0;
    char *hdr = malloc(cap);
    assert_non_null(hdr);
    used += (size_t)snprintf(hdr + used, cap - used, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (size_t i = 0; i < n; i++) {
        size_t bytes = e[i].count * dtype_size(e[i].dtype);
        char shape[64];
        if (e[i].ndim == 2)
            snprintf(shape, sizeof shape, "%zu,%zu", e[i].shape[0], e[i].shape[1]);
        else
            snprintf(shape, sizeof shape, "%zu", e[i].shape[0]);
        used += (size_t)snprintf(hdr + used, cap - used,
                                 ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%s],"
                                 "\"data_offsets\":[%zu,%zu]}",
                                 e[i].name, e[i].dtype, shape, off, off + bytes);
        off += bytes;
        assert_true(used < cap - 200);
    }
    used += (size_t)snprintf(hdr + used, cap - used, "}");
    unsigned char *data = calloc(off ? off : 1, 1);
    assert_non_null(data);
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        encode(&e[i], data + at);
        at += e[i].count * dtype_size(e[i].dtype);
    }
    char path[PATH_MAX];
    in_dir(path, sizeof path, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)used >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(hdr, 1, used, f);
    fwrite(data, 1, off - trim, f);
    fclose(f);
    free(data);
    free(hdr);
}

/* Where model.h says a tensor lives (written from model.h, not from the
 * loader's table). NULL for an unknown name. */
static const float *dest_of(const llama_model *m, const char *name) {
    const llama_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, FF = (size_t)c->intermediate_size;
    size_t HS = C / (size_t)c->num_attention_heads;
    size_t Q = (size_t)c->num_attention_heads * HS, KV = (size_t)c->num_key_value_heads * HS;
    const llama_weights *w = &m->w;
    if (strcmp(name, "model.embed_tokens.weight") == 0) return w->embed;
    if (strcmp(name, "model.norm.weight") == 0) return w->final_norm;
    if (strcmp(name, "lm_head.weight") == 0) return w->lm_head;
    int l = -1, used = 0;
    char suffix[64];
    if (sscanf(name, "model.layers.%d.%63s%n", &l, suffix, &used) != 2) return NULL;
    size_t L = (size_t)l;
    if (strcmp(suffix, "input_layernorm.weight") == 0) return w->attn_norm + L * C;
    if (strcmp(suffix, "self_attn.q_proj.weight") == 0) return w->wq + L * Q * C;
    if (strcmp(suffix, "self_attn.k_proj.weight") == 0) return w->wk + L * KV * C;
    if (strcmp(suffix, "self_attn.v_proj.weight") == 0) return w->wv + L * KV * C;
    if (strcmp(suffix, "self_attn.o_proj.weight") == 0) return w->wo + L * C * Q;
    if (strcmp(suffix, "post_attention_layernorm.weight") == 0) return w->mlp_norm + L * C;
    if (strcmp(suffix, "mlp.gate_proj.weight") == 0) return w->w_gate + L * FF * C;
    if (strcmp(suffix, "mlp.up_proj.weight") == 0) return w->w_up + L * FF * C;
    if (strcmp(suffix, "mlp.down_proj.weight") == 0) return w->w_down + L * C * FF;
    return NULL;
}

static void check_entries(const llama_model *m, const entry *e, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const float *d = dest_of(m, e[i].name);
        assert_non_null(d);
        for (size_t k = 0; k < e[i].count; k++)
            if (d[k] != e[i].values[k])
                fail_msg("%s[%zu] = %g, expected %g", e[i].name, k, (double)d[k],
                         (double)e[i].values[k]);
    }
}

/* Loads test_dir, which must fail with err naming frag1 and frag2. */
static void expect_load_error(const char *frag1, const char *frag2) {
    llama_model m;
    char err[ERR_LEN] = "";
    assert_int_equal(llama_load_hf(test_dir, &m, err, sizeof err), -1);
    if (!strstr(err, frag1) || (frag2 && !strstr(err, frag2)))
        fail_msg("unexpected error: %s (wanted %s / %s)", err, frag1, frag2 ? frag2 : "");
    assert_null(m.params);
}

/* --- config.json -------------------------------------------------------- */

static void test_config_values_and_defaults(void **state) {
    (void)state;
    char text[1024], path[PATH_MAX], err[ERR_LEN];
    llama_config c;
    small_config_text(text, sizeof text, false, "\"pad_token_id\": 0");
    write_text("config.json", text);
    in_dir(path, sizeof path, "config.json");
    if (llama_config_load(path, &c, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(c.hidden_size, 8);
    assert_int_equal(c.intermediate_size, 12);
    assert_int_equal(c.num_hidden_layers, 2);
    assert_int_equal(c.num_attention_heads, 2);
    assert_int_equal(c.num_key_value_heads, 1);
    assert_int_equal(c.vocab_size, 10);
    assert_int_equal(c.max_position_embeddings, 16);
    assert_true(c.rms_norm_eps == 1e-5f);
    assert_true(c.rope_theta == 10000.0f);
    assert_false(c.tie_word_embeddings);
    assert_int_equal(c.bos_token_id, 1);
    assert_int_equal(c.eos_token_id, 2);
    assert_int_equal(c.pad_token_id, 0);

    /* LlamaConfig's defaults for everything absent. */
    write_text("config.json", "{}");
    if (llama_config_load(path, &c, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(c.hidden_size, 4096);
    assert_int_equal(c.intermediate_size, 11008);
    assert_int_equal(c.num_hidden_layers, 32);
    assert_int_equal(c.num_attention_heads, 32);
    assert_int_equal(c.num_key_value_heads, 32);
    assert_int_equal(c.vocab_size, 32000);
    assert_int_equal(c.max_position_embeddings, 2048);
    assert_true(c.rms_norm_eps == 1e-6f);
    assert_true(c.rope_theta == 10000.0f);
    assert_false(c.tie_word_embeddings);
    assert_int_equal(c.bos_token_id, -1);
    assert_int_equal(c.eos_token_id, -1);
    assert_int_equal(c.pad_token_id, -1);

    /* NKV defaults to NH, an EOS list gives its first id, null ids none. */
    write_text("config.json",
               "{\"hidden_size\": 64, \"num_attention_heads\": 8, \"num_key_value_heads\": null, "
               "\"vocab_size\": 300, \"eos_token_id\": [7, 9], \"pad_token_id\": null, "
               "\"rope_theta\": 500000, \"tie_word_embeddings\": true, \"head_dim\": 8, "
               "\"hidden_act\": \"silu\", \"attention_bias\": false}");
    if (llama_config_load(path, &c, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(c.num_key_value_heads, 8);
    assert_int_equal(c.eos_token_id, 7);
    assert_int_equal(c.pad_token_id, -1);
    assert_true(c.rope_theta == 500000.0f);
    assert_true(c.tie_word_embeddings);
}

static void test_config_errors(void **state) {
    (void)state;
    static const struct {
        const char *extra, *frag;
    } cases[] = {
        {"\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}", "rope_scaling"},
        {"\"model_type\": \"mistral\"", "model_type mistral"},
        {"\"hidden_size\": 9", "divisible by num_attention_heads"},
        {"\"hidden_size\": 6", "odd"},
        {"\"num_key_value_heads\": 3", "num_key_value_heads"},
        {"\"num_hidden_layers\": 0", "num_hidden_layers = 0"},
        {"\"num_hidden_layers\": -2", "num_hidden_layers = -2"},
        {"\"vocab_size\": \"10\"", "vocab_size must be an integer"},
        {"\"intermediate_size\": 12.5", "intermediate_size must be an integer"},
        {"\"hidden_size\": 99999999999", "hidden_size must be an integer"},
        {"\"rms_norm_eps\": 0", "rms_norm_eps"},
        {"\"rms_norm_eps\": \"small\"", "rms_norm_eps must be a number"},
        {"\"rope_theta\": -1", "rope_theta"},
        {"\"tie_word_embeddings\": \"yes\"", "tie_word_embeddings"},
        {"\"bos_token_id\": 10", "bos_token_id = 10 is outside the vocabulary"},
        {"\"pad_token_id\": \"0\"", "pad_token_id must be an integer"},
        {"\"head_dim\": 8", "head_dim"},
        {"\"hidden_act\": \"gelu\"", "hidden_act"},
        {"\"attention_bias\": true", "attention_bias"},
        {"\"mlp_bias\": true", "mlp_bias"},
        {"\"max_position_embeddings\": 0", "max_position_embeddings"},
    };
    char text[1024], path[PATH_MAX], err[ERR_LEN];
    llama_config c;
    in_dir(path, sizeof path, "config.json");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        /* A later duplicate key replaces the earlier one in jansson. */
        small_config_text(text, sizeof text, false, cases[i].extra);
        write_text("config.json", text);
        err[0] = '\0';
        if (llama_config_load(path, &c, err, sizeof err) != -1 || !strstr(err, cases[i].frag) ||
            !strstr(err, "config.json"))
            fail_msg("case %s: error \"%s\"", cases[i].extra, err);
    }
    write_text("config.json", "{\"hidden_size\": 8,");
    assert_int_equal(llama_config_load(path, &c, err, sizeof err), -1);
    assert_non_null(strstr(err, "not a JSON object"));
    write_text("config.json", "[1]");
    assert_int_equal(llama_config_load(path, &c, err, sizeof err), -1);
    remove_file("config.json");
    assert_int_equal(llama_config_load(path, &c, err, sizeof err), -1);
    assert_non_null(strstr(err, "config.json"));
}

static void test_param_count_and_alloc(void **state) {
    (void)state;
    llama_config c = {.hidden_size = 64, .intermediate_size = 172, .num_hidden_layers = 3,
                      .num_attention_heads = 4, .num_key_value_heads = 2, .vocab_size = 300,
                      .max_position_embeddings = 64, .rms_norm_eps = 1e-5f,
                      .rope_theta = 10000.0f, .tie_word_embeddings = false,
                      .bos_token_id = 1, .eos_token_id = 2, .pad_token_id = 0};
    /* embed + 3 * (2 norms + q, o (64x64) + k, v (32x64) + 3 MLP (172x64))
     * + final norm + lm_head. */
    size_t layer = 2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64;
    size_t want = 300 * 64 + 3 * layer + 64 + 300 * 64;
    assert_int_equal(llama_param_count(&c), want);
    llama_model m;
    char err[ERR_LEN];
    assert_int_equal(llama_alloc(&m, &c, err, sizeof err), 0);
    assert_int_equal(m.nparams, want);
    assert_true(m.w.embed == m.params);
    assert_true(m.w.lm_head + 300 * 64 == m.params + want);
    assert_true(m.w.final_norm + 64 == m.w.lm_head);
    assert_true(m.w.wk == m.w.wq + 3 * 64 * 64);
    assert_true(((uintptr_t)m.params & 63) == 0);
    llama_free(&m);
    assert_null(m.params);

    c.tie_word_embeddings = true;
    assert_int_equal(llama_param_count(&c), want - 300 * 64);
    assert_int_equal(llama_alloc(&m, &c, err, sizeof err), 0);
    assert_true(m.w.lm_head == m.w.embed);
    assert_true(m.w.final_norm + 64 == m.params + m.nparams);
    llama_free(&m);

    c.num_key_value_heads = 3;
    assert_int_equal(llama_alloc(&m, &c, err, sizeof err), -1);
    assert_non_null(strstr(err, "num_key_value_heads"));
    assert_null(m.params);
    llama_free(&m); /* a zeroed model frees cleanly */
}

/* --- the Hugging Face loader -------------------------------------------- */

static void test_load_hf_dtypes(void **state) {
    (void)state;
    static const char *const dtypes[] = {"F32", "F16", "BF16"};
    for (int tied = 0; tied < 2; tied++)
        for (size_t d = 0; d < 3; d++) {
            char text[1024], err[ERR_LEN];
            small_config_text(text, sizeof text, tied, NULL);
            write_text("config.json", text);
            entry e[MAX_ENTRIES];
            size_t n = small_entries(e, tied, dtypes[d]);
            write_safetensors("model.safetensors", e, n, 0);
            llama_model m;
            if (llama_load_hf(test_dir, &m, err, sizeof err) != 0)
                fail_msg("%s %s: %s", dtypes[d], tied ? "tied" : "untied", err);
            assert_int_equal(m.cfg.num_key_value_heads, 1);
            assert_int_equal(m.nparams, llama_param_count(&m.cfg));
            check_entries(&m, e, n);
            if (tied) assert_true(m.w.lm_head == m.w.embed);
            else assert_true(m.w.lm_head != m.w.embed);
            llama_free(&m);
            free_entries(e, n);
        }
}

/* Two shards and an index; an inv_freq buffer is ignored. */
static void test_load_hf_sharded(void **state) {
    (void)state;
    char text[1024], err[ERR_LEN];
    small_config_text(text, sizeof text, false, NULL);
    write_text("config.json", text);
    entry e[MAX_ENTRIES];
    size_t n = small_entries(e, false, "F16");
    add_entry(e, &n, "model.layers.1.self_attn.rotary_emb.inv_freq", 2, 0, "F32");
    size_t half = n / 2;
    write_safetensors("a-00001.safetensors", e, half, 0);
    write_safetensors("a-00002.safetensors", e + half, n - half, 0);
    char index[8192];
    size_t used = (size_t)snprintf(index, sizeof index, "{\"metadata\": {}, \"weight_map\": {");
    for (size_t i = 0; i < n; i++)
        used += (size_t)snprintf(index + used, sizeof index - used, "%s\"%s\": \"%s\"",
                                 i ? ", " : "", e[i].name,
                                 i < half ? "a-00001.safetensors" : "a-00002.safetensors");
    snprintf(index + used, sizeof index - used, "}}");
    write_text("model.safetensors.index.json", index);
    llama_model m;
    if (llama_load_hf(test_dir, &m, err, sizeof err) != 0) fail_msg("%s", err);
    check_entries(&m, e, n - 1);
    llama_free(&m);

    /* The index places a tensor in the other shard. */
    char *moved = strstr(index, "\"model.norm.weight\": \"a-00002");
    assert_non_null(moved);
    moved[strlen("\"model.norm.weight\": \"a-0000")] = '1';
    write_text("model.safetensors.index.json", index);
    expect_load_error("tensor model.norm.weight for this shard", "does not hold it");
    /* A shard name that leaves the directory. */
    write_text("model.safetensors.index.json",
               "{\"weight_map\": {\"model.norm.weight\": \"../x.safetensors\"}}");
    expect_load_error("model.norm.weight", "not a plain file name");
    write_text("model.safetensors.index.json", "{\"metadata\": {}}");
    expect_load_error("weight_map", NULL);
    /* The index lists a tensor its shard does not hold. */
    used = (size_t)snprintf(index, sizeof index, "{\"weight_map\": {");
    for (size_t i = 0; i < n; i++)
        used += (size_t)snprintf(index + used, sizeof index - used, "\"%s\": \"%s\", ",
                                 e[i].name,
                                 i < half ? "a-00001.safetensors" : "a-00002.safetensors");
    snprintf(index + used, sizeof index - used, "\"ghost\": \"a-00001.safetensors\"}}");
    write_text("model.safetensors.index.json", index);
    expect_load_error("a-00001.safetensors", "lists tensor ghost");
    /* A missing shard file. */
    remove_file("a-00002.safetensors");
    used = (size_t)snprintf(index, sizeof index, "{\"weight_map\": {");
    for (size_t i = 0; i < n; i++)
        used += (size_t)snprintf(index + used, sizeof index - used, "%s\"%s\": \"%s\"",
                                 i ? ", " : "", e[i].name,
                                 i < half ? "a-00001.safetensors" : "a-00002.safetensors");
    snprintf(index + used, sizeof index - used, "}}");
    write_text("model.safetensors.index.json", index);
    expect_load_error("a-00002.safetensors", NULL);
    remove_file("model.safetensors.index.json");
    expect_load_error("neither model.safetensors nor", NULL);
    free_entries(e, n);
}

static void test_load_hf_errors(void **state) {
    (void)state;
    char text[1024];
    small_config_text(text, sizeof text, false, NULL);
    write_text("config.json", text);
    entry e[MAX_ENTRIES];
    size_t n = small_entries(e, false, "F32");
    size_t q1 = 0; /* model.layers.1.self_attn.q_proj.weight */
    while (strcmp(e[q1].name, "model.layers.1.self_attn.q_proj.weight") != 0) q1++;

    /* Missing: the last layer's down projection, then lm_head. */
    entry keep = e[n - 3];
    assert_string_equal(keep.name, "model.layers.1.mlp.down_proj.weight");
    e[n - 3] = e[n - 1];
    write_safetensors("model.safetensors", e, n - 1, 0);
    expect_load_error("missing tensor model.layers.1.mlp.down_proj.weight", NULL);
    e[n - 3] = keep;
    write_safetensors("model.safetensors", e, n - 1, 0);
    expect_load_error("missing tensor lm_head.weight", "tie_word_embeddings false");

    /* Wrong shape, same element count. */
    e[q1].shape[0] = 4;
    e[q1].shape[1] = 16;
    write_safetensors("model.safetensors", e, n, 0);
    expect_load_error("model.layers.1.self_attn.q_proj.weight", "shape [4, 16]");
    e[q1].shape[0] = 8;
    e[q1].shape[1] = 8;
    /* 1-D where 2-D belongs. */
    e[q1].ndim = 1;
    e[q1].shape[0] = 64;
    write_safetensors("model.safetensors", e, n, 0);
    expect_load_error("model.layers.1.self_attn.q_proj.weight", "config.json expects [8, 8]");
    e[q1].ndim = 2;
    e[q1].shape[0] = 8;

    /* A dtype the loader does not convert. */
    e[q1].dtype = "I32";
    write_safetensors("model.safetensors", e, n, 0);
    expect_load_error("model.layers.1.self_attn.q_proj.weight", "dtype I32");
    e[q1].dtype = "F64";
    write_safetensors("model.safetensors", e, n, 0);
    expect_load_error("model.layers.1.self_attn.q_proj.weight", "dtype F64");
    e[q1].dtype = "F32";

    /* Extra tensors: a bias, a layer beyond num_hidden_layers, a spelling
     * with a leading zero. */
    static const char *const extras[] = {"model.layers.0.self_attn.q_proj.bias",
                                         "model.layers.2.input_layernorm.weight",
                                         "model.layers.01.input_layernorm.weight",
                                         "model.layers..input_layernorm.weight", "score.weight"};
    for (size_t i = 0; i < sizeof extras / sizeof extras[0]; i++) {
        add_entry(e, &n, extras[i], 8, 0, "F32");
        write_safetensors("model.safetensors", e, n, 0);
        expect_load_error("unexpected tensor", extras[i]);
        free(e[--n].values);
    }

    /* A truncated file. */
    write_safetensors("model.safetensors", e, n, 5);
    expect_load_error("model.safetensors", "truncated");

    /* lm_head present in a tied model. */
    small_config_text(text, sizeof text, true, NULL);
    write_text("config.json", text);
    write_safetensors("model.safetensors", e, n, 0);
    expect_load_error("lm_head.weight present", "tie_word_embeddings true");

    /* A config that is wrong for the tensors. */
    small_config_text(text, sizeof text, false, "\"intermediate_size\": 16");
    write_text("config.json", text);
    expect_load_error("mlp.gate_proj.weight", "config.json expects [16, 8]");
    small_config_text(text, sizeof text, false, "\"model_type\": \"gemma\"");
    write_text("config.json", text);
    expect_load_error("config.json", "model_type gemma");
    remove_file("config.json");
    expect_load_error("config.json", NULL);
    free_entries(e, n);
}

/* --- llama2.c ----------------------------------------------------------- */

/* Writes one stacked HF tensor (from the entries, layer by layer) in
 * llama2.c's layout: q/k rows interleaved per head (llama2.c row 2i + j
 * holds HF row j * HS/2 + i). */
static void write_l2c_stack(FILE *f, const entry *e, size_t n, const char *suffix, size_t heads) {
    char name[96];
    for (int l = 0; l < 2; l++) {
        snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix);
        const entry *x = NULL;
        for (size_t i = 0; i < n; i++)
            if (strcmp(e[i].name, name) == 0) x = &e[i];
        assert_non_null(x);
        if (!heads) {
            fwrite(x->values, sizeof(float), x->count, f);
            continue;
        }
        size_t cols = x->shape[1], hs = x->shape[0] / heads;
        for (size_t h = 0; h < heads; h++)
            for (size_t r = 0; r < hs; r++) {
                size_t i = r / 2, j = r % 2;
                fwrite(x->values + (h * hs + j * (hs / 2) + i) * cols, sizeof(float), cols, f);
            }
    }
}

static const entry *find_entry(const entry *e, size_t n, const char *name) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(e[i].name, name) == 0) return &e[i];
    fail_msg("no entry %s", name);
    return NULL;
}

static void write_l2c(const char *name, const entry *e, size_t n, bool tied, bool v1,
                      int version, int extra) {
    char path[PATH_MAX];
    in_dir(path, sizeof path, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    int32_t params[7] = {8, 12, 2, 2, 1, tied || v1 ? 10 : -10, 16};
    if (v1) {
        unsigned char hdr[256] = {0};
        uint32_t magic = 0x616b3432u;
        int32_t ver = version;
        memcpy(hdr, &magic, 4);
        memcpy(hdr + 4, &ver, 4);
        memcpy(hdr + 8, params, sizeof params);
        hdr[36] = tied ? 1 : 0;
        fwrite(hdr, 1, sizeof hdr, f);
    } else {
        fwrite(params, sizeof(int32_t), 7, f);
    }
    const entry *embed = find_entry(e, n, "model.embed_tokens.weight");
    const entry *norm = find_entry(e, n, "model.norm.weight");
    if (v1) {
        write_l2c_stack(f, e, n, "input_layernorm.weight", 0);
        write_l2c_stack(f, e, n, "post_attention_layernorm.weight", 0);
        fwrite(norm->values, sizeof(float), norm->count, f);
        fwrite(embed->values, sizeof(float), embed->count, f);
    } else {
        fwrite(embed->values, sizeof(float), embed->count, f);
        write_l2c_stack(f, e, n, "input_layernorm.weight", 0);
    }
    write_l2c_stack(f, e, n, "self_attn.q_proj.weight", 2);
    write_l2c_stack(f, e, n, "self_attn.k_proj.weight", 1);
    write_l2c_stack(f, e, n, "self_attn.v_proj.weight", 0);
    write_l2c_stack(f, e, n, "self_attn.o_proj.weight", 0);
    if (!v1) write_l2c_stack(f, e, n, "post_attention_layernorm.weight", 0);
    write_l2c_stack(f, e, n, "mlp.gate_proj.weight", 0); /* w1 */
    write_l2c_stack(f, e, n, "mlp.down_proj.weight", 0); /* w2 */
    write_l2c_stack(f, e, n, "mlp.up_proj.weight", 0);   /* w3 */
    if (!v1) {
        fwrite(norm->values, sizeof(float), norm->count, f);
        /* freq_cis_real, freq_cis_imag: 16 positions x HS/2 = 2, any values. */
        float cis[2 * 16 * 2];
        for (size_t i = 0; i < sizeof cis / sizeof cis[0]; i++) cis[i] = (float)i;
        fwrite(cis, sizeof(float), sizeof cis / sizeof cis[0], f);
    }
    if (!tied) {
        const entry *head = find_entry(e, n, "lm_head.weight");
        fwrite(head->values, sizeof(float), head->count, f);
    }
    for (int i = 0; i < extra; i++) fputc(0, f);
    fclose(f);
}

static void truncate_by(const char *name, size_t bytes) {
    char path[PATH_MAX];
    in_dir(path, sizeof path, name);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    assert_int_equal(truncate(path, size - (long)bytes), 0);
}

static void test_llama2c(void **state) {
    (void)state;
    char text[1024], err[ERR_LEN], path[PATH_MAX];
    for (int tied = 0; tied < 2; tied++) {
        small_config_text(text, sizeof text, tied, NULL);
        write_text("config.json", text);
        entry e[MAX_ENTRIES];
        size_t n = small_entries(e, tied, "F32");
        write_safetensors("model.safetensors", e, n, 0);
        llama_model hf, l2c;
        if (llama_load_hf(test_dir, &hf, err, sizeof err) != 0) fail_msg("%s", err);
        for (int v1 = 0; v1 < 2; v1++) {
            write_l2c("m.bin", e, n, tied, v1, 1, 0);
            in_dir(path, sizeof path, "m.bin");
            if (llama_load_llama2c(path, &l2c, err, sizeof err) != 0)
                fail_msg("%s %s: %s", v1 ? "v1" : "legacy", tied ? "tied" : "untied", err);
            assert_int_equal(l2c.nparams, hf.nparams);
            assert_memory_equal(l2c.params, hf.params, hf.nparams * sizeof(float));
            assert_int_equal(l2c.cfg.hidden_size, 8);
            assert_int_equal(l2c.cfg.num_key_value_heads, 1);
            assert_int_equal(l2c.cfg.vocab_size, 10);
            assert_int_equal(l2c.cfg.max_position_embeddings, 16);
            assert_true(l2c.cfg.rms_norm_eps == 1e-5f && l2c.cfg.rope_theta == 10000.0f);
            assert_int_equal(l2c.cfg.tie_word_embeddings, tied);
            assert_int_equal(l2c.cfg.bos_token_id, 1);
            assert_int_equal(l2c.cfg.eos_token_id, 2);
            assert_true(tied ? l2c.w.lm_head == l2c.w.embed : l2c.w.lm_head != l2c.w.embed);
            llama_free(&l2c);

            /* One byte short, one byte over: refused, naming the sizes. */
            truncate_by("m.bin", 1);
            assert_int_equal(llama_load_llama2c(path, &l2c, err, sizeof err), -1);
            assert_non_null(strstr(err, "m.bin"));
            assert_non_null(strstr(err, v1 ? "version 1" : "legacy"));
            assert_null(l2c.params);
            write_l2c("m.bin", e, n, tied, v1, 1, 1);
            assert_int_equal(llama_load_llama2c(path, &l2c, err, sizeof err), -1);
            assert_non_null(strstr(err, "bytes"));
        }
        llama_free(&hf);
        free_entries(e, n);
    }
    entry e[MAX_ENTRIES];
    size_t n = small_entries(e, false, "F32");
    /* Version 2 (int8) is not read. */
    write_l2c("m.bin", e, n, false, true, 2, 0);
    in_dir(path, sizeof path, "m.bin");
    llama_model m;
    assert_int_equal(llama_load_llama2c(path, &m, err, sizeof err), -1);
    assert_non_null(strstr(err, "version 2"));
    free_entries(e, n);

    /* Headers out of range. */
    int32_t bad[7] = {8, 12, 2, 3, 1, 10, 16}; /* 8 not divisible by 3 heads */
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite(bad, sizeof bad, 1, f);
    fclose(f);
    assert_int_equal(llama_load_llama2c(path, &m, err, sizeof err), -1);
    assert_non_null(strstr(err, "num_attention_heads"));
    bad[3] = 2;
    bad[2] = 0;
    f = fopen(path, "wb");
    fwrite(bad, sizeof bad, 1, f);
    fclose(f);
    assert_int_equal(llama_load_llama2c(path, &m, err, sizeof err), -1);
    assert_non_null(strstr(err, "num_hidden_layers = 0"));
    f = fopen(path, "wb");
    fwrite(bad, 10, 1, f);
    fclose(f);
    assert_int_equal(llama_load_llama2c(path, &m, err, sizeof err), -1);
    assert_non_null(strstr(err, "too short"));
    unsigned char v1hdr[256] = {0x32, 0x34, 0x6b, 0x61, 1};
    int32_t ok[7] = {8, 12, 2, 2, 1, 10, 16};
    memcpy(v1hdr + 8, ok, sizeof ok);
    v1hdr[36] = 7;
    f = fopen(path, "wb");
    fwrite(v1hdr, sizeof v1hdr, 1, f);
    fclose(f);
    assert_int_equal(llama_load_llama2c(path, &m, err, sizeof err), -1);
    assert_non_null(strstr(err, "shared_classifier"));
    in_dir(path, sizeof path, "absent.bin");
    assert_int_equal(llama_load_llama2c(path, &m, err, sizeof err), -1);
    assert_non_null(strstr(err, "absent.bin"));
}

/* --- the PyTorch reference fixtures ------------------------------------- */

static void load_ref(const char *sub, llama_model *m) {
    char dir[PATH_MAX], err[ERR_LEN];
    snprintf(dir, sizeof dir, "%s/%s", REF_DIR, sub);
    if (llama_load_hf(dir, m, err, sizeof err) != 0) fail_msg("%s", err);
}

static void test_reference_fixtures(void **state) {
    (void)state;
    llama_model f32, other;
    char err[ERR_LEN];
    load_ref("gqa", &f32);
    assert_int_equal(f32.cfg.num_key_value_heads, 2);
    assert_int_equal(f32.cfg.num_attention_heads, 4);
    assert_false(f32.cfg.tie_word_embeddings);
    assert_int_equal(f32.nparams, llama_param_count(&f32.cfg));
    /* Random weights: no all-zero tensor slipped through. */
    assert_true(f32.w.wq[5] != 0 && f32.w.lm_head[7] != 0 && f32.w.final_norm[3] != 0);

    static const char *const exports[] = {REF_DIR "/gqa/llama2c.bin",
                                          REF_DIR "/gqa/llama2c_v1.bin"};
    for (int i = 0; i < 2; i++) {
        if (llama_load_llama2c(exports[i], &other, err, sizeof err) != 0) fail_msg("%s", err);
        assert_int_equal(other.nparams, f32.nparams);
        assert_memory_equal(other.params, f32.params, f32.nparams * sizeof(float));
        assert_int_equal(other.cfg.num_key_value_heads, 2);
        llama_free(&other);
    }

    /* The sharded f16 copy of the same weights: each value is its f32 value
     * rounded to binary16 (round to nearest even, done by npy.c). */
    load_ref("sharded", &other);
    assert_int_equal(other.nparams, f32.nparams);
    size_t exact = 0;
    for (size_t i = 0; i < f32.nparams; i++) {
        float want = (float)npy_half_to_double(npy_double_to_half(f32.params[i]));
        if (other.params[i] != want)
            fail_msg("sharded param %zu = %a, f16(%a) = %a", i, (double)other.params[i],
                     (double)f32.params[i], (double)want);
        exact += other.params[i] == f32.params[i];
    }
    assert_true(exact < f32.nparams / 2); /* the rounding did happen */
    llama_free(&other);
    llama_free(&f32);

    load_ref("tied", &other);
    assert_true(other.cfg.tie_word_embeddings);
    assert_true(other.w.lm_head == other.w.embed);
    assert_true(other.cfg.rope_theta == 500000.0f && other.cfg.rms_norm_eps == 1e-6f);
    assert_int_equal(other.nparams, llama_param_count(&other.cfg));
    size_t nonzero = 0;
    for (size_t i = 0; i < other.nparams; i++) {
        uint32_t bits;
        memcpy(&bits, &other.params[i], sizeof bits);
        assert_int_equal(bits & 0xffffu, 0); /* bf16 values: low half zero */
        nonzero += bits != 0;
    }
    assert_true(nonzero > other.nparams * 9 / 10);
    llama_free(&other);

    /* A tied multi-query (NKV = 1) bf16 model and its llama2.c exports with a
     * shared classifier. */
    load_ref("chat", &f32);
    assert_true(f32.cfg.tie_word_embeddings);
    assert_int_equal(f32.cfg.num_key_value_heads, 1);
    static const char *const chat_exports[] = {REF_DIR "/chat/llama2c.bin",
                                               REF_DIR "/chat/llama2c_v1.bin"};
    for (int i = 0; i < 2; i++) {
        if (llama_load_llama2c(chat_exports[i], &other, err, sizeof err) != 0)
            fail_msg("%s", err);
        assert_true(other.cfg.tie_word_embeddings && other.w.lm_head == other.w.embed);
        assert_int_equal(other.nparams, f32.nparams);
        assert_memory_equal(other.params, f32.params, f32.nparams * sizeof(float));
        llama_free(&other);
    }
    llama_free(&f32);
}

/* --- memory ------------------------------------------------------------- */

static long status_kib(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    assert_non_null(f);
    char line[256];
    long v = -1;
    size_t n = strlen(field);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, n) == 0 && line[n] == ':') v = strtol(line + n + 1, NULL, 10);
    fclose(f);
    assert_true(v >= 0);
    return v;
}

/* The loader's promise: one float32 copy resident, not the mapped file as
 * well. A 34 MB F32 model is written in chunks; the peak resident size
 * (VmHWM, reset through clear_refs just before the load) may grow by the
 * parameters plus slack, while mapping the file and keeping its pages would
 * double it. The slack (half the parameters) leaves room for ASan's shadow. */
static void test_load_peak_memory(void **state) {
    (void)state;
    write_text("config.json",
               "{\"hidden_size\": 256, \"intermediate_size\": 512, \"num_hidden_layers\": 1, "
               "\"num_attention_heads\": 4, \"vocab_size\": 16384, "
               "\"max_position_embeddings\": 64, \"tie_word_embeddings\": false}");
    static const struct {
        const char *name;
        size_t rows, cols;
    } t[] = {
        {"model.embed_tokens.weight", 16384, 256},
        {"model.layers.0.input_layernorm.weight", 256, 0},
        {"model.layers.0.self_attn.q_proj.weight", 256, 256},
        {"model.layers.0.self_attn.k_proj.weight", 256, 256},
        {"model.layers.0.self_attn.v_proj.weight", 256, 256},
        {"model.layers.0.self_attn.o_proj.weight", 256, 256},
        {"model.layers.0.post_attention_layernorm.weight", 256, 0},
        {"model.layers.0.mlp.gate_proj.weight", 512, 256},
        {"model.layers.0.mlp.up_proj.weight", 512, 256},
        {"model.layers.0.mlp.down_proj.weight", 256, 512},
        {"model.norm.weight", 256, 0},
        {"lm_head.weight", 16384, 256},
    };
    size_t nt = sizeof t / sizeof t[0];
    char hdr[4096];
    size_t used = (size_t)snprintf(hdr, sizeof hdr, "{"), off = 0;
    for (size_t i = 0; i < nt; i++) {
        size_t count = t[i].rows * (t[i].cols ? t[i].cols : 1);
        char shape[32];
        if (t[i].cols) snprintf(shape, sizeof shape, "%zu,%zu", t[i].rows, t[i].cols);
        else snprintf(shape, sizeof shape, "%zu", t[i].rows);
        used += (size_t)snprintf(hdr + used, sizeof hdr - used,
                                 "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%s],"
                                 "\"data_offsets\":[%zu,%zu]}",
                                 i ? "," : "", t[i].name, shape, off, off + 4 * count);
        off += 4 * count;
    }
    used += (size_t)snprintf(hdr + used, sizeof hdr - used, "}");
    assert_true(used < sizeof hdr);
    char path[PATH_MAX], err[ERR_LEN];
    in_dir(path, sizeof path, "model.safetensors");
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)used >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(hdr, 1, used, f);
    float chunk[4096];
    for (size_t done = 0; done < off / 4;) {
        size_t k = off / 4 - done < 4096 ? off / 4 - done : 4096;
        for (size_t i = 0; i < k; i++) chunk[i] = (float)((done + i) % 1000) * 0.001f + 0.25f;
        assert_int_equal(fwrite(chunk, sizeof(float), k, f), k);
        done += k;
    }
    fclose(f);

    /* Reset the peak to the current size (Linux >= 4.0). */
    FILE *cr = fopen("/proc/self/clear_refs", "w");
    if (!cr || fputs("5", cr) < 0 || fclose(cr) != 0) skip();
    long before = status_kib("VmRSS");
    llama_model m;
    if (llama_load_hf(test_dir, &m, err, sizeof err) != 0) fail_msg("%s", err);
    long grew = status_kib("VmHWM") - before;
    long params_kib = (long)(m.nparams * sizeof(float) / 1024);
    if (grew > params_kib * 3 / 2)
        fail_msg("peak resident grew by %ld KiB for %ld KiB of parameters", grew, params_kib);
    assert_true(m.w.lm_head[16384 * 256 - 1] == (float)((off / 4 - 1) % 1000) * 0.001f + 0.25f);
    assert_true(m.w.embed[1001] == 1 * 0.001f + 0.25f);
    llama_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_config_values_and_defaults, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_config_errors, setup_dir, teardown_dir),
        cmocka_unit_test(test_param_count_and_alloc),
        cmocka_unit_test_setup_teardown(test_load_hf_dtypes, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_load_hf_sharded, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_load_hf_errors, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_llama2c, setup_dir, teardown_dir),
        cmocka_unit_test(test_reference_fixtures),
        cmocka_unit_test_setup_teardown(test_load_peak_memory, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
