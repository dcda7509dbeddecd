/* test_tok.c - the tokenizers: encodings of tests/fixtures/tok/tiny.json
 * checked by hand (spaces, newlines, byte fallback, empty text, special
 * tokens, rank order and leftmost ties), the cases of
 * tests/reference/fixtures/tokenizer (an independent Python model of
 * Hugging Face tokenizers), decode round trips, tokenizer_config.json,
 * malformed files named in the error, and the byte-level tokenizer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/tok.h"

static char tmp_dir[64];

static tok_tokenizer *load_tiny(void) {
    char path[PATH_MAX + 64], err[ERR_LEN];
    tu_fixture_path(path, sizeof path, "tok/tiny.json");
    tok_tokenizer *t = NULL;
    if (tok_load_hf(path, &t, err, sizeof err) != 0) fail_msg("%s", err);
    return t;
}

/* Encodes text and compares with want[0..n). */
static void expect_encoding(const tok_tokenizer *t, const char *text, const int32_t *want,
                            size_t n) {
    tok_ids ids;
    tok_ids_init(&ids, 1 << 20);
    char err[ERR_LEN];
    if (tok_encode(t, text, strlen(text), &ids, err, sizeof err) != 0) fail_msg("%s", err);
    if (ids.len != n) fail_msg("\"%s\": %zu ids, want %zu", text, ids.len, n);
    for (size_t i = 0; i < n; i++)
        if (ids.v[i] != want[i]) fail_msg("\"%s\": id %zu is %d, want %d", text, i, ids.v[i], want[i]);
    tok_ids_free(&ids);
}

static void expect_decoding(const tok_tokenizer *t, const int32_t *ids, size_t n, bool skip,
                            const char *want) {
    char *text, err[ERR_LEN];
    size_t len;
    if (tok_decode(t, ids, n, skip, &text, &len, err, sizeof err) != 0) fail_msg("%s", err);
    assert_string_equal(text, want);
    assert_int_equal(len, strlen(want));
    free(text);
}

#define ENC(t, text, ...)                                                           \
    do {                                                                            \
        const int32_t want_[] = {__VA_ARGS__};                                      \
        expect_encoding(t, text, want_, sizeof want_ / sizeof want_[0]);           \
    } while (0)

/* Ids in tiny.json (see gen_tok.py): bytes at 3 + b, then these. */
enum {
    SP = 259, H, E, L, O, W, R, D,
    SP_H, LL, ELL, SP_HELL, SP_HELLO, SP_W, OR, SP_WOR, LD, SP_WORLD, SP_SP
};
#define BYTE(b) (3 + (b))

static void test_tiny_encode(void **state) {
    (void)state;
    tok_tokenizer *t = load_tiny();
    assert_int_equal(tok_vocab_size(t), SP_SP + 1);
    assert_int_equal(tok_bos_id(t), 1);
    assert_int_equal(tok_eos_id(t), 2);
    assert_int_equal(tok_pad_id(t), -1);
    assert_string_equal(tok_piece(t, SP_HELLO), "\xe2\x96\x81hello");
    assert_int_equal(tok_piece_id(t, "<0x0A>"), BYTE(0x0a));

    ENC(t, "hello world", SP_HELLO, SP_WORLD);
    /* "\n" is not in the vocabulary: byte fallback; "world" has no "▁" */
    ENC(t, "hello\nworld", SP_HELLO, BYTE(0x0a), W, OR, LD);
    /* é and 日 are not in the vocabulary: one token per UTF-8 byte */
    ENC(t, "h\xc3\xa9", SP_H, BYTE(0xc3), BYTE(0xa9));
    ENC(t, "\xe6\x97\xa5", SP, BYTE(0xe6), BYTE(0x97), BYTE(0xa5));
    /* spaces: "▁ h" (rank 0) merges before "▁ ▁" (rank 10) */
    ENC(t, "  hello", SP_SP, SP_HELLO);
    ENC(t, "hello ", SP_HELLO, SP);
    ENC(t, " ", SP_SP);
    /* equal ranks: the leftmost pair merges first */
    ENC(t, "lll", SP, LL, L);
    /* special tokens are split out of the raw text; each piece gets its "▁" */
    ENC(t, "<s>hello</s>", 1, SP_HELLO, 2);
    ENC(t, "hello<s>world", SP_HELLO, 1, SP_WORLD);
    ENC(t, "<s></s>", 1, 2);
    ENC(t, "<s", SP, BYTE('<'), BYTE('s'));

    tok_ids ids;
    tok_ids_init(&ids, 16);
    char err[ERR_LEN];
    assert_int_equal(tok_encode(t, "", 0, &ids, err, sizeof err), 0);
    assert_int_equal(ids.len, 0);
    assert_int_equal(tok_encode(t, "h\xc3(", 3, &ids, err, sizeof err), -1);
    assert_non_null(strstr(err, "not valid UTF-8"));
    tok_ids_free(&ids);
    /* the id array's maximum is enforced */
    tok_ids_init(&ids, 2);
    assert_int_equal(tok_encode(t, "hello hello hello", 17, &ids, err, sizeof err), -1);
    assert_non_null(strstr(err, "too many tokens"));
    tok_ids_free(&ids);
    tok_free(t);
}

static void test_tiny_decode(void **state) {
    (void)state;
    tok_tokenizer *t = load_tiny();
    const char *texts[] = {"hello world", "hello\nworld", "h\xc3\xa9", "\xe6\x97\xa5", "  hello",
                           "hello ", " ", "lll", "", "dr\xc3\xb6w \t\r\n \xf0\x9f\x98\x80 x"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        tok_ids ids;
        tok_ids_init(&ids, 1 << 20);
        char err[ERR_LEN];
        if (tok_encode(t, texts[i], strlen(texts[i]), &ids, err, sizeof err) != 0)
            fail_msg("%s", err);
        expect_decoding(t, ids.v, ids.len, false, texts[i]);
        tok_ids_free(&ids);
    }
    /* Hugging Face keeps the "▁" that a special token's neighbour got */
    const int32_t with_special[] = {1, SP_HELLO, 2};
    expect_decoding(t, with_special, 3, false, "<s> hello</s>");
    expect_decoding(t, with_special, 3, true, "hello");
    /* a byte run that is not UTF-8: one U+FFFD per byte token */
    const int32_t broken[] = {SP_H, BYTE(0xc3), SP_W};
    expect_decoding(t, broken, 3, false, "h\xef\xbf\xbd w");
    const int32_t bad[] = {SP_H, 5000};
    char *text, err[ERR_LEN];
    size_t len;
    assert_int_equal(tok_decode(t, bad, 2, false, &text, &len, err, sizeof err), -1);
    assert_non_null(strstr(err, "id 5000 at position 1"));
    assert_null(text);
    tok_free(t);
}

/* The reference cases: ids, decoded text (with and without special tokens). */
static void test_reference_cases(void **state) {
    (void)state;
    char dir[PATH_MAX + 64], path[PATH_MAX + 128], err[ERR_LEN];
    tu_reference_path(dir, sizeof dir, "tokenizer");
    snprintf(path, sizeof path, "%s/tokenizer_cases.json", dir);
    if (access(path, R_OK) != 0) {
        print_message("no %s: reference cases skipped\n", path);
        skip();
    }
    json_t *root = tu_load_json(path);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    tok_tokenizer *t;
    if (tok_load_hf(path, &t, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(tok_vocab_size(t), json_integer_value(json_object_get(root, "vocab_size")));
    assert_int_equal(tok_bos_id(t), json_integer_value(json_object_get(root, "bos_id")));
    assert_int_equal(tok_eos_id(t), json_integer_value(json_object_get(root, "eos_id")));
    json_t *cases = json_object_get(root, "cases");
    assert_true(json_array_size(cases) >= 5);
    size_t i, roundtrips = 0;
    json_t *c;
    json_array_foreach(cases, i, c) {
        const char *text = json_string_value(json_object_get(c, "text"));
        json_t *want = json_object_get(c, "ids");
        assert_non_null(text);
        tok_ids ids;
        tok_ids_init(&ids, 1 << 20);
        if (tok_encode(t, text, json_string_length(json_object_get(c, "text")), &ids, err,
                       sizeof err) != 0)
            fail_msg("case %zu: %s", i, err);
        if (ids.len != json_array_size(want))
            fail_msg("case %zu \"%s\": %zu ids, want %zu", i, text, ids.len, json_array_size(want));
        for (size_t k = 0; k < ids.len; k++)
            if (ids.v[k] != json_integer_value(json_array_get(want, k)))
                fail_msg("case %zu \"%s\": id %zu is %d, want %d", i, text, k, ids.v[k],
                         (int)json_integer_value(json_array_get(want, k)));
        expect_decoding(t, ids.v, ids.len, false, json_string_value(json_object_get(c, "decoded")));
        expect_decoding(t, ids.v, ids.len, true,
                        json_string_value(json_object_get(c, "decoded_skip_special")));
        if (json_is_true(json_object_get(c, "roundtrip"))) {
            expect_decoding(t, ids.v, ids.len, false, text);
            roundtrips++;
        }
        tok_ids_free(&ids);
    }
    assert_true(roundtrips >= json_array_size(cases) / 2);
    tok_free(t);
    json_decref(root);
}

static void write_text(const char *name, const char *text, char *path, size_t pathlen) {
    snprintf(path, pathlen, "%s/%s", tmp_dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
    assert_int_equal(fclose(f), 0);
}

static char *tiny_text(void) {
    char path[PATH_MAX + 64], err[ERR_LEN], *data;
    size_t len;
    tu_fixture_path(path, sizeof path, "tok/tiny.json");
    if (util_read_file(path, 1 << 20, &data, &len, err, sizeof err) != 0) fail_msg("%s", err);
    return data;
}

/* tokenizer_config.json beside tokenizer.json names BOS, EOS and PAD. */
static void test_tokenizer_config(void **state) {
    (void)state;
    char *tiny = tiny_text(), path[PATH_MAX], cfg[PATH_MAX], err[ERR_LEN];
    write_text("tokenizer.json", tiny, path, sizeof path);
    write_text("tokenizer_config.json",
               "{\"bos_token\": {\"content\": \"</s>\", \"lstrip\": false}, \"eos_token\": \"<s>\", "
               "\"pad_token\": \"<unk>\"}",
               cfg, sizeof cfg);
    tok_tokenizer *t;
    if (tok_load_hf(path, &t, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(tok_bos_id(t), 2);
    assert_int_equal(tok_eos_id(t), 1);
    assert_int_equal(tok_pad_id(t), 0);
    tok_free(t);
    write_text("tokenizer_config.json", "{\"bos_token\": null, \"eos_token\": \"<eos>\"}", cfg,
               sizeof cfg);
    assert_int_equal(tok_load_hf(path, &t, err, sizeof err), -1);
    assert_non_null(strstr(err, "eos_token \"<eos>\" is not a token"));
    assert_null(t);
    unlink(cfg);
    unlink(path);
    free(tiny);
}

/* Replaces the first occurrence of from in s by to (fresh string). */
static char *replace_once(const char *s, const char *from, const char *to) {
    const char *p = strstr(s, from);
    if (!p) fail_msg("fixture lacks \"%s\"", from);
    size_t pre = (size_t)(p - s), fl = strlen(from), tl = strlen(to), rest = strlen(p + fl);
    char *out = malloc(pre + tl + rest + 1);
    assert_non_null(out);
    memcpy(out, s, pre);
    memcpy(out + pre, to, tl);
    memcpy(out + pre + tl, p + fl, rest + 1);
    return out;
}

static void test_malformed(void **state) {
    (void)state;
    char *tiny = tiny_text();
    const struct {
        const char *from, *to, *want;
    } cases[] = {
        {"\"type\": \"Prepend\"", "\"type\": \"Lowercase\"", "normalizer: only Llama 2's"},
        {"\"pre_tokenizer\": null", "\"pre_tokenizer\": {\"type\": \"Metaspace\"}", "pre_tokenizer: must be null"},
        {"\"type\": \"Fuse\"", "\"type\": \"Strip\"", "decoder: only Llama 2's"},
        {"\"type\": \"BPE\"", "\"type\": \"WordPiece\"", "model.type: only \"BPE\""},
        {"\"dropout\": null", "\"dropout\": 0.1", "model.dropout"},
        {"\"<s>\": 1,", "\"<s>\": -1,", "model.vocab: \"<s>\" has an id that is not an integer"},
        {"\"<s>\": 1,", "\"<s>\": 2,", "share id 2"},
        {"\"\xe2\x96\x81 h\"", "\"\xe2\x96\x81 x\"", "model.merges[0]: \"x\" not in the vocabulary"},
        {"\"\xe2\x96\x81 h\"", "\"\xe2\x96\x81h\"", "model.merges[0]: \"\xe2\x96\x81h\" is not two tokens"},
        {"\"\xe2\x96\x81 h\"", "17", "model.merges[0]: neither"},
        {"\"content\": \"<s>\"", "\"content\": \"<S>\"", "added_tokens[1]: id 1 is \"<s>\" in the vocabulary"},
        {"\"unk_token\": \"<unk>\"", "\"unk_token\": \"<nope>\"", "model.unk_token: \"<nope>\" not in"},
        {"\"merges\": [", "\"merges_\": [", "model.merges: missing"},
        {"\"model\": {", "\"model_\": {", "model: missing"},
        {"\"ignore_merges\": false", "\"ignore_merges\": true", "model.ignore_merges"},
        {"\"single_word\": false", "\"single_word\": true", "added_tokens[0]: single_word"},
    };
    char err[ERR_LEN];
    tok_tokenizer *t = (tok_tokenizer *)1;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *doc = replace_once(tiny, cases[i].from, cases[i].to);
        err[0] = '\0';
        if (tok_load_hf_buffer(doc, strlen(doc), &t, err, sizeof err) != -1)
            fail_msg("case %zu accepted", i);
        if (!strstr(err, cases[i].want)) fail_msg("case %zu: \"%s\" lacks \"%s\"", i, err, cases[i].want);
        assert_null(t);
        free(doc);
    }
    /* a truncated file and a file that is not there name the file */
    char path[PATH_MAX];
    tiny[strlen(tiny) / 2] = '\0';
    write_text("tokenizer.json", tiny, path, sizeof path);
    assert_int_equal(tok_load_hf(path, &t, err, sizeof err), -1);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "not valid JSON"));
    unlink(path);
    assert_int_equal(tok_load_hf(path, &t, err, sizeof err), -1);
    assert_non_null(strstr(err, path));
    assert_int_equal(tok_load_hf_buffer("[]", 2, &t, err, sizeof err), -1);
    assert_string_equal(err, "not a JSON object");
    free(tiny);
}

/* A model directory: tokenizer.json when there is one, else the byte-level
 * tokenizer for a 259-entry vocabulary; ids past the model's are refused. */
static void test_load_dir(void **state) {
    (void)state;
    char *tiny = tiny_text(), path[PATH_MAX], err[ERR_LEN];
    tok_tokenizer *t;
    assert_int_equal(tok_load_dir(tmp_dir, TOK_BYTE_VOCAB, &t, err, sizeof err), 0);
    assert_int_equal(tok_vocab_size(t), TOK_BYTE_VOCAB);
    assert_int_equal(tok_bos_id(t), TOK_BYTE_BOS);
    tok_free(t);
    assert_int_equal(tok_load_dir(tmp_dir, 32000, &t, err, sizeof err), -1);
    assert_non_null(strstr(err, "no tokenizer.json"));
    assert_null(t);
    write_text("tokenizer.json", tiny, path, sizeof path);
    assert_int_equal(tok_load_dir(tmp_dir, 32000, &t, err, sizeof err), 0);
    assert_int_equal(tok_vocab_size(t), SP_SP + 1);
    tok_free(t);
    assert_int_equal(tok_load_dir(tmp_dir, SP_SP, &t, err, sizeof err), -1);
    assert_non_null(strstr(err, "ids up to 277 but the model's vocab_size is 277"));
    unlink(path);
    free(tiny);
}

/* lstrip and rstrip added tokens swallow the whitespace beside them. */
static void test_strip_flags(void **state) {
    (void)state;
    char *tiny = tiny_text(), err[ERR_LEN];
    /* </s> is the third added token: its flags are the third occurrences */
    char *p = tiny;
    for (int i = 0; i < 3; i++) p = strstr(p + 1, "\"lstrip\": false");
    assert_non_null(p);
    memcpy(p, "\"lstrip\": true ", 15);
    p = strstr(p, "\"rstrip\": false");
    assert_non_null(p);
    memcpy(p, "\"rstrip\": true ", 15);
    tok_tokenizer *t;
    if (tok_load_hf_buffer(tiny, strlen(tiny), &t, err, sizeof err) != 0) fail_msg("%s", err);
    ENC(t, "hello \n </s> \t world", SP_HELLO, 2, SP_WORLD);
    ENC(t, "hello<s> world", SP_HELLO, 1, SP, SP_WORLD); /* <s> swallows nothing */
    tok_free(t);
    free(tiny);
}

static void test_byte_tokenizer(void **state) {
    (void)state;
    tok_tokenizer *t = tok_byte_new();
    assert_non_null(t);
    assert_int_equal(tok_vocab_size(t), 259);
    assert_int_equal(tok_bos_id(t), 256);
    assert_int_equal(tok_eos_id(t), 257);
    assert_int_equal(tok_pad_id(t), 258);
    assert_null(tok_piece(t, 65));
    const char text[] = " h\xc3\xa9\n\x00\xff <s>";
    tok_ids ids;
    tok_ids_init(&ids, 64);
    char err[ERR_LEN];
    assert_int_equal(tok_encode(t, text, sizeof text - 1, &ids, err, sizeof err), 0);
    assert_int_equal(ids.len, sizeof text - 1);
    for (size_t i = 0; i < ids.len; i++) assert_int_equal(ids.v[i], (unsigned char)text[i]);
    /* BOS, EOS and PAD have no text; every byte string comes back whole */
    assert_int_equal(tok_ids_push(&ids, TOK_BYTE_EOS), 0);
    assert_int_equal(tok_ids_push(&ids, TOK_BYTE_PAD), 0);
    char *out;
    size_t len;
    assert_int_equal(tok_decode(t, ids.v, ids.len, false, &out, &len, err, sizeof err), 0);
    assert_int_equal(len, sizeof text - 1);
    assert_memory_equal(out, text, len);
    free(out);
    const int32_t bad = 259;
    assert_int_equal(tok_decode(t, &bad, 1, false, &out, &len, err, sizeof err), -1);
    assert_non_null(strstr(err, "outside the vocabulary"));
    tok_ids_free(&ids);
    tok_free(t);
}

int main(void) {
    if (tu_mkdtemp(tmp_dir, sizeof tmp_dir, "tok") != 0) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_encode),      cmocka_unit_test(test_tiny_decode),
        cmocka_unit_test(test_reference_cases),  cmocka_unit_test(test_tokenizer_config),
        cmocka_unit_test(test_malformed),        cmocka_unit_test(test_byte_tokenizer),
        cmocka_unit_test(test_load_dir),         cmocka_unit_test(test_strip_flags),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tu_rmtree(tmp_dir);
    return rc;
}
