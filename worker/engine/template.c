/* template.c - see template.h. A prompt is at most two text pieces (the
 * system part and the user part) after an optional BOS; they are tokenized
 * one by one because LLaMA-Factory encodes each formatter slot separately. */
#include "worker/engine/template.h"

#include "common/util.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

const char tmpl_llama2_system[] =
    "You are a helpful, respectful and honest assistant. "
    "Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, "
    "racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, "
    "explain why instead of answering something not correct. "
    "If you don't know the answer to a question, please don't share false information.";

const char tmpl_alpaca_system[] =
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n";

static const char *const tmpl_names[] = {"llama2", "alpaca", "default", "vanilla"};

int tmpl_parse(const char *name, enum tmpl_kind *out) {
    for (size_t i = 0; i < sizeof tmpl_names / sizeof tmpl_names[0]; i++)
        if (strcmp(name, tmpl_names[i]) == 0) {
            *out = (enum tmpl_kind)i;
            return 0;
        }
    return -1;
}

const char *tmpl_name(enum tmpl_kind k) {
    return (size_t)k < sizeof tmpl_names / sizeof tmpl_names[0] ? tmpl_names[k] : "unknown";
}

bool tmpl_has_bos(enum tmpl_kind k) { return k == TMPL_LLAMA2 || k == TMPL_VANILLA; }

/* Concatenates the NULL-terminated list of strings into a fresh string
 * (caller frees). Returns NULL when out of memory or over TOK_MAX_TEXT. */
static char *tmpl_concat(const char *first, ...) {
    va_list ap;
    size_t total = 0;
    va_start(ap, first);
    for (const char *s = first; s; s = va_arg(ap, const char *)) {
        total += strlen(s);
        if (total > TOK_MAX_TEXT) {
            va_end(ap);
            return NULL;
        }
    }
    va_end(ap);
    char *out = malloc(total + 1), *p = out;
    if (!out) return NULL;
    va_start(ap, first);
    for (const char *s = first; s; s = va_arg(ap, const char *)) {
        size_t n = strlen(s);
        memcpy(p, s, n);
        p += n;
    }
    va_end(ap);
    *p = '\0';
    return out;
}

/* Fills piece[0..2) with the template's text pieces (NULL where the
 * template has none for this example). Returns 0 or -1 with err; the caller
 * frees both pieces either way. */
static int tmpl_pieces(enum tmpl_kind k, const char *system, const char *query, char *piece[2],
                       char *err, size_t errlen) {
    piece[0] = piece[1] = NULL;
    bool has_system = system && *system;
    switch (k) {
    case TMPL_LLAMA2:
        piece[1] = tmpl_concat("[INST] <<SYS>>\n", has_system ? system : tmpl_llama2_system,
                               "\n<</SYS>>\n\n", query, " [/INST]", (const char *)NULL);
        if (!piece[1]) goto too_long;
        return 0;
    case TMPL_ALPACA:
        piece[0] = tmpl_concat(has_system ? system : tmpl_alpaca_system, (const char *)NULL);
        piece[1] = tmpl_concat("### Instruction:\n", query, "\n\n### Response:\n", (const char *)NULL);
        if (!piece[0] || !piece[1]) goto too_long;
        return 0;
    case TMPL_DEFAULT:
        if (has_system && !(piece[0] = tmpl_concat(system, "\n", (const char *)NULL))) goto too_long;
        piece[1] = tmpl_concat("Human: ", query, "\nAssistant: ", (const char *)NULL);
        if (!piece[1]) goto too_long;
        return 0;
    case TMPL_VANILLA:
        if (has_system && !(piece[0] = tmpl_concat(system, (const char *)NULL))) goto too_long;
        piece[1] = tmpl_concat(query, (const char *)NULL);
        if (!piece[1]) goto too_long;
        return 0;
    }
    return err_set(err, errlen, "unknown template %d", (int)k);
too_long:
    return err_set(err, errlen, "prompt over %u bytes (or out of memory)", TOK_MAX_TEXT);
}

int tmpl_prompt_text(enum tmpl_kind k, const char *system, const char *query, char **text,
                     char *err, size_t errlen) {
    *text = NULL;
    char *piece[2];
    int rc = -1;
    if (tmpl_pieces(k, system, query, piece, err, errlen) != 0) goto out;
    *text = tmpl_concat(piece[0] ? piece[0] : "", piece[1], (const char *)NULL);
    if (!*text) {
        err_set(err, errlen, "prompt over %u bytes (or out of memory)", TOK_MAX_TEXT);
        goto out;
    }
    rc = 0;
out:
    free(piece[0]);
    free(piece[1]);
    return rc;
}

/* The number of ids llama2's system part takes at the start of ids[0..n):
 * the leading ids that the system prefix encoded alone shares with them. */
static int tmpl_llama2_system_len(const tok_tokenizer *t, const char *system,
                                  const int32_t *ids, size_t n, size_t *len, char *err,
                                  size_t errlen) {
    bool has_system = system && *system;
    char *prefix = tmpl_concat("[INST] <<SYS>>\n", has_system ? system : tmpl_llama2_system,
                               "\n<</SYS>>\n\n", (const char *)NULL);
    if (!prefix) return err_set(err, errlen, "prompt over %u bytes (or out of memory)", TOK_MAX_TEXT);
    tok_ids alone;
    tok_ids_init(&alone, n + 1);
    int rc = tok_encode(t, prefix, strlen(prefix), &alone, err, errlen);
    /* a prefix that encodes to more ids than the whole piece has failed with
     * "too many tokens": then it shares at most n */
    size_t k = 0;
    while (k < alone.len && k < n && alone.v[k] == ids[k]) k++;
    *len = k;
    if (rc != 0 && alone.len == alone.max) rc = 0;
    tok_ids_free(&alone);
    free(prefix);
    return rc;
}

int tmpl_encode(enum tmpl_kind k, const tok_tokenizer *t, const char *system, const char *query,
                const char *response, tok_ids *prompt, tok_ids *response_ids, size_t *system_len,
                char *err, size_t errlen) {
    char *piece[2];
    int rc = -1;
    size_t start = prompt->len, sys = 0;
    if (tmpl_pieces(k, system, query, piece, err, errlen) != 0) goto out;
    if (tmpl_has_bos(k) && tok_bos_id(t) >= 0) {
        if (tok_ids_push(prompt, tok_bos_id(t)) != 0) {
            err_set(err, errlen, "prompt over %zu tokens", prompt->max);
            goto out;
        }
        sys = 1;
    }
    for (int i = 0; i < 2; i++) {
        size_t before = prompt->len;
        if (piece[i] && tok_encode(t, piece[i], strlen(piece[i]), prompt, err, errlen) != 0)
            goto out;
        if (i == 0) sys += prompt->len - before;
    }
    if (system_len && k == TMPL_LLAMA2) {
        size_t body = start + sys, in_piece = 0;
        if (tmpl_llama2_system_len(t, system, prompt->v + body, prompt->len - body, &in_piece, err,
                                   errlen) != 0)
            goto out;
        sys += in_piece;
    }
    if (system_len) *system_len = sys;
    if (response) {
        if (tok_eos_id(t) < 0) {
            err_set(err, errlen, "the tokenizer has no EOS token to end the response with");
            goto out;
        }
        if (tok_encode(t, response, strlen(response), response_ids, err, errlen) != 0) goto out;
        if (tok_ids_push(response_ids, tok_eos_id(t)) != 0) {
            err_set(err, errlen, "response over %zu tokens", response_ids->max);
            goto out;
        }
    }
    rc = 0;
out:
    free(piece[0]);
    free(piece[1]);
    return rc;
}

void tmpl_cutoff(size_t prompt_len, size_t response_len, size_t cutoff_len,
                 size_t reserved_label_len, size_t *keep_prompt, size_t *keep_response) {
    size_t total = prompt_len + response_len, max_response = 0;
    if (total > 0) {
        /* the same double operations, in the same order, as the Python */
        double share = (double)cutoff_len * ((double)response_len / (double)total);
        max_response = (size_t)share;
    }
    if (max_response < reserved_label_len) max_response = reserved_label_len;
    size_t taken = max_response < response_len ? max_response : response_len;
    size_t max_prompt = cutoff_len > taken ? cutoff_len - taken : 0;
    *keep_prompt = prompt_len < max_prompt ? prompt_len : max_prompt;
    *keep_response = response_len < max_response ? response_len : max_response;
}
