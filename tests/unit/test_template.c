/* test_template.c - prompt templates: the exact text of each template with
 * and without a system prompt (through the byte-level tokenizer, whose ids
 * are the text's bytes), BOS and EOS placement, LLaMA-Factory's piece-by-
 * piece tokenization with a Llama 2 kind tokenizer (each piece gets its own
 * "▁"), and the errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/template.h"
#include "worker/engine/tok.h"

static char tiny_path[PATH_MAX];

/* Encodes an example with the byte tokenizer and checks the prompt is
 * [BOS] + want_prompt's bytes and the response is its bytes + EOS. */
static void expect_bytes(enum tmpl_kind k, const char *system, const char *query, bool bos,
                         const char *want_prompt, size_t want_sys) {
    tok_tokenizer *t = tok_byte_new();
    tok_ids p, r;
    tok_ids_init(&p, 1 << 16);
    tok_ids_init(&r, 1 << 16);
    char err[ERR_LEN];
    size_t sys;
    if (tmpl_encode(k, t, system, query, "The answer.", &p, &r, &sys, err, sizeof err) != 0)
        fail_msg("%s", err);
    size_t n = strlen(want_prompt), off = bos ? 1 : 0;
    if (p.len != n + off) fail_msg("%s: %zu prompt ids, want %zu", tmpl_name(k), p.len, n + off);
    if (bos) assert_int_equal(p.v[0], TOK_BYTE_BOS);
    for (size_t i = 0; i < n; i++)
        if (p.v[off + i] != (unsigned char)want_prompt[i])
            fail_msg("%s: prompt byte %zu is %d, want '%c'", tmpl_name(k), i, p.v[off + i], want_prompt[i]);
    const char *resp = "The answer.";
    assert_int_equal(r.len, strlen(resp) + 1);
    for (size_t i = 0; i < strlen(resp); i++) assert_int_equal(r.v[i], (unsigned char)resp[i]);
    assert_int_equal(r.v[r.len - 1], TOK_BYTE_EOS);
    assert_int_equal(sys, want_sys);
    /* tmpl_prompt_text is the same text without BOS */
    char *text;
    assert_int_equal(tmpl_prompt_text(k, system, query, &text, err, sizeof err), 0);
    assert_string_equal(text, want_prompt);
    assert_int_equal(tmpl_has_bos(k), bos);
    free(text);
    tok_ids_free(&p);
    tok_ids_free(&r);
    tok_free(t);
}

static void test_texts(void **state) {
    (void)state;
    char want[4096];
    snprintf(want, sizeof want, "[INST] <<SYS>>\n%s\n<</SYS>>\n\nWhat is 2+2?\n4 or 5 [/INST]",
             tmpl_llama2_system);
    size_t llama2_sys = 1 + strlen(want) - strlen("What is 2+2?\n4 or 5 [/INST]");
    expect_bytes(TMPL_LLAMA2, NULL, "What is 2+2?\n4 or 5", true, want, llama2_sys);
    expect_bytes(TMPL_LLAMA2, "", "What is 2+2?\n4 or 5", true, want, llama2_sys);
    expect_bytes(TMPL_LLAMA2, "Be brief.", "Hi", true, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", 36);
    expect_bytes(TMPL_ALPACA, NULL, "Add 2 and 2.", false,
                 "Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\nAdd 2 and 2.\n\n"
                 "### Response:\n",
                 strlen(tmpl_alpaca_system));
    expect_bytes(TMPL_ALPACA, "Sys.", "Q", false, "Sys.### Instruction:\nQ\n\n### Response:\n", 4);
    expect_bytes(TMPL_DEFAULT, NULL, "Q", false, "Human: Q\nAssistant: ", 0);
    expect_bytes(TMPL_DEFAULT, "Sys.", "Q", false, "Sys.\nHuman: Q\nAssistant: ", 5);
    expect_bytes(TMPL_VANILLA, NULL, "Just this.", true, "Just this.", 1);
    expect_bytes(TMPL_VANILLA, "Sys. ", "Q", true, "Sys. Q", 6);
}

/* Llama 2's default system prompt, word for word as Meta and LLaMA-Factory
 * spell it (two paragraphs, no trailing newline). */
static void test_default_system(void **state) {
    (void)state;
    assert_int_equal(strncmp(tmpl_llama2_system, "You are a helpful, respectful and honest assistant. "
                                                 "Always answer as helpfully as possible, while being safe. ",
                             110),
                     0);
    assert_non_null(strstr(tmpl_llama2_system, "socially unbiased and positive in nature.\n\nIf a question"));
    const char *tail = "please don't share false information.";
    size_t n = strlen(tmpl_llama2_system);
    assert_string_equal(tmpl_llama2_system + n - strlen(tail), tail);
    assert_int_equal(n, 507);
}

static void encode_text(const tok_tokenizer *t, const char *text, tok_ids *out) {
    char err[ERR_LEN];
    if (tok_encode(t, text, strlen(text), out, err, sizeof err) != 0) fail_msg("%s", err);
}

static bool ids_equal(const tok_ids *a, const tok_ids *b) {
    return a->len == b->len && memcmp(a->v, b->v, a->len * sizeof a->v[0]) == 0;
}

/* With a Llama 2 kind tokenizer each piece is tokenized on its own. */
static void test_pieces_llama_tokenizer(void **state) {
    (void)state;
    tok_tokenizer *t;
    char err[ERR_LEN];
    if (tok_load_hf(tiny_path, &t, err, sizeof err) != 0) fail_msg("%s", err);
    tok_ids p, r, want, joined;
    tok_ids_init(&p, 1 << 16);
    tok_ids_init(&r, 1 << 16);
    tok_ids_init(&want, 1 << 16);
    tok_ids_init(&joined, 1 << 16);
    assert_int_equal(tmpl_encode(TMPL_ALPACA, t, "hello", "world", "hello world", &p, &r, NULL,
                                 err, sizeof err),
                     0);
    encode_text(t, "hello", &want);
    encode_text(t, "### Instruction:\nworld\n\n### Response:\n", &want);
    assert_true(ids_equal(&p, &want));
    encode_text(t, "hello### Instruction:\nworld\n\n### Response:\n", &joined);
    assert_false(ids_equal(&p, &joined)); /* not the concatenated text */
    /* response: its own pieces, then EOS */
    assert_int_equal(r.len, 3);
    assert_int_equal(r.v[0], tok_piece_id(t, "\xe2\x96\x81hello"));
    assert_int_equal(r.v[1], tok_piece_id(t, "\xe2\x96\x81world"));
    assert_int_equal(r.v[2], tok_eos_id(t));
    /* llama2: BOS, then one piece */
    p.len = want.len = 0;
    assert_int_equal(tmpl_encode(TMPL_LLAMA2, t, "hello", "world", NULL, &p, &r, NULL, err, sizeof err), 0);
    assert_int_equal(tok_ids_push(&want, tok_bos_id(t)), 0);
    encode_text(t, "[INST] <<SYS>>\nhello\n<</SYS>>\n\nworld [/INST]", &want);
    assert_true(ids_equal(&p, &want));
    assert_int_equal(r.len, 3); /* no response asked for: untouched */
    /* llama2's system part: BOS plus the ids of "[INST] <<SYS>>\nhello\n<</SYS>>\n\n" */
    size_t sys;
    tok_ids prefix;
    tok_ids_init(&prefix, 1 << 16);
    encode_text(t, "[INST] <<SYS>>\nhello\n<</SYS>>\n\n", &prefix);
    p.len = 0;
    assert_int_equal(tmpl_encode(TMPL_LLAMA2, t, "hello", "world", NULL, &p, NULL, &sys, err,
                                 sizeof err),
                     0);
    assert_int_equal(sys, 1 + prefix.len);
    assert_true(sys < p.len);
    assert_memory_equal(p.v + 1, prefix.v, prefix.len * sizeof prefix.v[0]);
    tok_ids_free(&prefix);
    /* alpaca's: the system piece, tokenized on its own */
    p.len = 0;
    assert_int_equal(tmpl_encode(TMPL_ALPACA, t, "hello", "world", NULL, &p, NULL, &sys, err,
                                 sizeof err),
                     0);
    assert_int_equal(sys, 1);
    assert_int_equal(p.v[0], tok_piece_id(t, "\xe2\x96\x81hello"));
    /* the ids are appended: a second prompt follows the first */
    size_t first = p.len;
    assert_int_equal(tmpl_encode(TMPL_VANILLA, t, NULL, "hello", NULL, &p, NULL, NULL, err, sizeof err), 0);
    assert_int_equal(p.len, first + 2);
    assert_int_equal(p.v[first], tok_bos_id(t));
    assert_int_equal(p.v[first + 1], tok_piece_id(t, "\xe2\x96\x81hello"));
    tok_ids_free(&p);
    tok_ids_free(&r);
    tok_ids_free(&want);
    tok_ids_free(&joined);
    tok_free(t);
}

static void test_errors(void **state) {
    (void)state;
    enum tmpl_kind k;
    assert_int_equal(tmpl_parse("llama2", &k), 0);
    assert_int_equal(k, TMPL_LLAMA2);
    assert_int_equal(tmpl_parse("vanilla", &k), 0);
    assert_int_equal(k, TMPL_VANILLA);
    assert_string_equal(tmpl_name(TMPL_DEFAULT), "default");
    assert_int_equal(tmpl_parse("chatml", &k), -1);
    assert_int_equal(tmpl_parse("", &k), -1);

    /* a tokenizer without BOS or EOS (tokenizer_config.json says so) */
    char dir[64], path[PATH_MAX], cfg[PATH_MAX], err[ERR_LEN];
    assert_int_equal(tu_mkdtemp(dir, sizeof dir, "tmpl"), 0);
    char *data;
    size_t len;
    if (util_read_file(tiny_path, 1 << 20, &data, &len, err, sizeof err) != 0) fail_msg("%s", err);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    snprintf(cfg, sizeof cfg, "%s/tokenizer_config.json", dir);
    const char *cfg_text = "{\"bos_token\": null, \"eos_token\": null}";
    assert_int_equal(util_write_file_atomic(path, data, len, 0644, err, sizeof err), 0);
    assert_int_equal(util_write_file_atomic(cfg, cfg_text, strlen(cfg_text), 0644, err, sizeof err), 0);
    free(data);
    tok_tokenizer *t;
    if (tok_load_hf(path, &t, err, sizeof err) != 0) fail_msg("%s", err);
    tok_ids p, r;
    tok_ids_init(&p, 1 << 16);
    tok_ids_init(&r, 1 << 16);
    /* no BOS: left out, as LLaMA-Factory does */
    assert_int_equal(tmpl_encode(TMPL_VANILLA, t, NULL, "hello", NULL, &p, NULL, NULL, err, sizeof err), 0);
    assert_int_equal(p.len, 1);
    assert_int_equal(tmpl_encode(TMPL_VANILLA, t, NULL, "hello", "world", &p, &r, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "no EOS"));
    tok_ids_free(&p);
    tok_ids_free(&r);
    tok_free(t);
    assert_int_equal(tu_rmtree(dir), 0);

    /* the id arrays' maximum is enforced */
    t = tok_byte_new();
    tok_ids_init(&p, 8);
    assert_int_equal(tmpl_encode(TMPL_DEFAULT, t, NULL, "query", NULL, &p, NULL, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "too many tokens"));
    tok_ids_free(&p);
    tok_ids_init(&p, 1);
    assert_int_equal(tmpl_encode(TMPL_LLAMA2, t, NULL, "query", NULL, &p, NULL, NULL, err, sizeof err), -1);
    tok_ids_free(&p);
    tok_ids_init(&p, 64);
    tok_ids_init(&r, 3);
    assert_int_equal(tmpl_encode(TMPL_VANILLA, t, NULL, "q", "abc", &p, &r, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "response over 3 tokens"));
    tok_ids_free(&p);
    tok_ids_free(&r);
    tok_free(t);
}

/* LLaMA-Factory's infer_max_len, worked by hand (and checked in Python). */
static void test_cutoff(void **state) {
    (void)state;
    const struct {
        size_t prompt, response, cutoff, reserved, keep_prompt, keep_response;
    } cases[] = {
        {10, 5, 1024, 1, 10, 5},          /* fits: nothing cut */
        {1000, 100, 1024, 1, 931, 93},    /* 1024 * 100/1100 = 93.09 -> 93 */
        {3000, 3000, 1024, 1, 512, 512},
        {2000, 0, 1024, 1, 1024, 0},      /* no response: the reserve is not used */
        {2000, 1, 1024, 1, 1023, 1},
        {7, 15, 22, 1, 7, 14},            /* 22 * (15/22) = 14.999999999999998 */
        {0, 0, 1024, 1, 0, 0},
        {50, 50, 10, 20, 0, 20},          /* a reserve over the cutoff leaves no prompt */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t kp, kr;
        tmpl_cutoff(cases[i].prompt, cases[i].response, cases[i].cutoff, cases[i].reserved, &kp, &kr);
        if (kp != cases[i].keep_prompt || kr != cases[i].keep_response)
            fail_msg("case %zu: kept %zu and %zu, want %zu and %zu", i, kp, kr, cases[i].keep_prompt,
                     cases[i].keep_response);
    }
}

int main(void) {
    tu_fixture_path(tiny_path, sizeof tiny_path, "tok/tiny.json");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_texts),
        cmocka_unit_test(test_default_system),
        cmocka_unit_test(test_pieces_llama_tokenizer),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_cutoff),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
