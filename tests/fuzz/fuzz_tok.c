/* fuzz_tok.c - fuzz target for the tokenizers. An input that starts with '{'
 * is a tokenizer.json: it is loaded and, when accepted, every id it gives
 * for a few fixed texts (spaces, newlines, specials, Unicode) must be in the
 * vocabulary and decode without error. Any other input is text, encoded by
 * a small Llama 2 kind tokenizer built once (specials, all 256 byte tokens,
 * a few letters and merges) and by the byte-level tokenizer. Checked beyond
 * "no crash, no leak": ids are in range; decode(encode(x)) == x for the byte
 * tokenizer always, and for the Llama kind whenever x is valid UTF-8 with no
 * "▁" and no special-token text (what Hugging Face's decoder can restore);
 * a rejected text is exactly one that is not valid UTF-8. */
#include "tests/fuzz/fuzz.h"

#include <jansson.h>
#include <string.h>

#include "common/util.h"
#include "worker/engine/tok.h"

static tok_tokenizer *fuzz_tok_llama, *fuzz_tok_bytes;

/* Builds the fixed Llama 2 kind tokenizer (tests/fixtures/tok/tiny.json's
 * shape) through the public loader. */
static tok_tokenizer *fuzz_tok_build(void) {
    static const char *const chars[] = {"\xe2\x96\x81", "h", "e", "l", "o", "w", "r", "d", "<"};
    static const char *const merges[][2] = {
        {"\xe2\x96\x81", "h"}, {"l", "l"}, {"e", "ll"}, {"\xe2\x96\x81h", "ell"},
        {"\xe2\x96\x81hell", "o"}, {"\xe2\x96\x81", "w"}, {"o", "r"}, {"\xe2\x96\x81w", "or"},
        {"l", "d"}, {"\xe2\x96\x81wor", "ld"}, {"\xe2\x96\x81", "\xe2\x96\x81"}, {"<", "<"}};
    json_t *vocab = json_object(), *mj = json_array(), *added = json_array();
    const char *specials[] = {"<unk>", "<s>", "</s>"};
    int id = 0;
    for (int i = 0; i < 3; i++, id++) {
        json_object_set_new(vocab, specials[i], json_integer(id));
        json_array_append_new(added, json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", id,
                                               "content", specials[i], "single_word", 0, "lstrip", 0,
                                               "rstrip", 0, "normalized", 0, "special", 1));
    }
    for (int b = 0; b < 256; b++, id++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        json_object_set_new(vocab, name, json_integer(id));
    }
    for (size_t i = 0; i < sizeof chars / sizeof chars[0]; i++, id++)
        json_object_set_new(vocab, chars[i], json_integer(id));
    for (size_t i = 0; i < sizeof merges / sizeof merges[0]; i++) {
        char joined[64];
        snprintf(joined, sizeof joined, "%s%s", merges[i][0], merges[i][1]);
        if (!json_object_get(vocab, joined)) json_object_set_new(vocab, joined, json_integer(id++));
        json_array_append_new(mj, json_pack("[s, s]", merges[i][0], merges[i][1]));
    }
    json_t *root = json_pack(
        "{s:o, s:{s:s, s:[{s:s, s:s}, {s:s, s:{s:s}, s:s}]}, s:n, "
        "s:{s:s, s:[{s:s, s:{s:s}, s:s}, {s:s}, {s:s}, {s:s, s:s, s:i, s:i}]}, "
        "s:{s:s, s:n, s:s, s:b, s:b, s:o, s:o}}",
        "added_tokens", added,
        "normalizer", "type", "Sequence", "normalizers", "type", "Prepend", "prepend", "\xe2\x96\x81",
        "type", "Replace", "pattern", "String", " ", "content", "\xe2\x96\x81",
        "pre_tokenizer",
        "decoder", "type", "Sequence", "decoders", "type", "Replace", "pattern", "String",
        "\xe2\x96\x81", "content", " ", "type", "ByteFallback", "type", "Fuse", "type", "Strip",
        "content", " ", "start", 1, "stop", 0,
        "model", "type", "BPE", "dropout", "unk_token", "<unk>", "fuse_unk", 1, "byte_fallback", 1,
        "vocab", vocab, "merges", mj);
    FUZZ_CHECK(root);
    char *text = json_dumps(root, 0);
    json_decref(root);
    FUZZ_CHECK(text);
    tok_tokenizer *t = NULL;
    char err[ERR_LEN];
    if (tok_load_hf_buffer(text, strlen(text), &t, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_tok: built tokenizer rejected: %s\n", err);
        abort();
    }
    free(text);
    return t;
}

static bool fuzz_tok_valid_utf8(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t len = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
                   : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
        if (len == 0 || len > n - i) return false;
        unsigned cp = c & (0x7fu >> len);
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return false;
            cp = cp << 6 | (s[i + k] & 0x3fu);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += len;
    }
    return true;
}

static bool fuzz_tok_contains(const uint8_t *s, size_t n, const char *needle) {
    return memmem(s, n, needle, strlen(needle)) != NULL;
}

/* Encodes and decodes text; checks ids are in range and, when asked, that
 * the text comes back. Returns whether encoding succeeded. */
static bool fuzz_tok_roundtrip(const tok_tokenizer *t, const uint8_t *text, size_t n,
                               bool expect_back) {
    tok_ids ids;
    tok_ids_init(&ids, 1u << 24);
    char err[ERR_LEN];
    bool ok = tok_encode(t, (const char *)text, n, &ids, err, sizeof err) == 0;
    if (ok) {
        for (size_t i = 0; i < ids.len; i++)
            FUZZ_CHECK(ids.v[i] >= 0 && ids.v[i] < tok_vocab_size(t));
        char *back;
        size_t blen;
        FUZZ_CHECK(tok_decode(t, ids.v, ids.len, false, &back, &blen, err, sizeof err) == 0);
        FUZZ_CHECK(back[blen] == '\0');
        if (expect_back) FUZZ_CHECK(blen == n && memcmp(back, text, n) == 0);
        free(back);
        FUZZ_CHECK(tok_decode(t, ids.v, ids.len, true, &back, &blen, err, sizeof err) == 0);
        free(back);
    }
    tok_ids_free(&ids);
    return ok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!fuzz_tok_llama) {
        fuzz_tok_llama = fuzz_tok_build();
        fuzz_tok_bytes = tok_byte_new();
        FUZZ_CHECK(fuzz_tok_bytes);
    }
    if (size > 0 && data[0] == '{') {
        tok_tokenizer *t = NULL;
        char err[ERR_LEN] = "";
        if (tok_load_hf_buffer((const char *)data, size, &t, err, sizeof err) != 0) {
            FUZZ_CHECK(t == NULL && err[0] != '\0');
            return 0;
        }
        static const char *const texts[] = {"", "hello world", "  a\n\tb ", "<s>x</s><unk>",
                                            "caf\xc3\xa9 \xe6\x97\xa5\xf0\x9f\x98\x80",
                                            "\xe2\x96\x81\xe2\x96\x81 <<s>>"};
        for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
            fuzz_tok_roundtrip(t, (const uint8_t *)texts[i], strlen(texts[i]), false);
        int32_t probe[] = {0, tok_vocab_size(t) - 1, tok_bos_id(t), tok_eos_id(t)};
        char *back;
        size_t blen;
        for (size_t i = 0; i < 4; i++)
            if (probe[i] >= 0 && tok_piece(t, probe[i]) &&
                tok_decode(t, &probe[i], 1, false, &back, &blen, err, sizeof err) == 0)
                free(back);
        tok_free(t);
        return 0;
    }
    FUZZ_CHECK(fuzz_tok_roundtrip(fuzz_tok_bytes, data, size, true));
    bool valid = fuzz_tok_valid_utf8(data, size);
    bool restorable = valid && !fuzz_tok_contains(data, size, "\xe2\x96\x81") &&
                      !fuzz_tok_contains(data, size, "<s>") && !fuzz_tok_contains(data, size, "</s>") &&
                      !fuzz_tok_contains(data, size, "<unk>");
    FUZZ_CHECK(fuzz_tok_roundtrip(fuzz_tok_llama, data, size, restorable) == valid);
    return 0;
}
