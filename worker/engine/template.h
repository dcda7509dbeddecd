/* template.h - prompt templates, shaped as LLaMA-Factory (the version the
 * seed used) shapes them, and their tokenization.
 *
 *   llama2   BOS "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{query} [/INST]"
 *            ({system} is Llama 2's default system prompt when the example
 *            has none)
 *   alpaca   "{system}" "### Instruction:\n{query}\n\n### Response:\n"
 *            ({system} defaults to "Below is an instruction ...\n\n")
 *   default  "{system}\n" (only when the example has one)
 *            "Human: {query}\nAssistant: "
 *   vanilla  BOS "{system}" (only when the example has one) "{query}"
 *
 * Each quoted piece is tokenized on its own, as LLaMA-Factory does (so with
 * Llama 2's tokenizer each gets its own leading "▁"); BOS is the tokenizer's
 * BOS id and is left out when the tokenizer has none. The response is
 * tokenized separately and followed by EOS. vanilla's BOS follows
 * ARCHITECTURE.md ("the query as it is, after BOS"). */
#ifndef STRATA_TEMPLATE_H
#define STRATA_TEMPLATE_H

#include "worker/engine/tok.h"

enum tmpl_kind { TMPL_LLAMA2 = 0, TMPL_ALPACA, TMPL_DEFAULT, TMPL_VANILLA };

/* Llama 2's default system prompt and alpaca's default system text. */
extern const char tmpl_llama2_system[];
extern const char tmpl_alpaca_system[];

/* Parses a template name ("llama2", "alpaca", "default", "vanilla").
 * Returns 0 or -1. */
int tmpl_parse(const char *name, enum tmpl_kind *out);
const char *tmpl_name(enum tmpl_kind k);

/* The prompt as text: the pieces above joined, BOS left out (whether the
 * prompt starts with BOS is tmpl_has_bos). system may be NULL or "" (none).
 * Returns 0 with *text (caller frees), or -1 with err. */
int tmpl_prompt_text(enum tmpl_kind k, const char *system, const char *query, char **text,
                     char *err, size_t errlen);
bool tmpl_has_bos(enum tmpl_kind k);

/* Tokenizes one example: APPENDS the prompt's ids to prompt and, when
 * response is not NULL, the response's ids followed by EOS to response_ids
 * (an error when the tokenizer has no EOS). When system_len is not NULL it
 * receives how many of the appended prompt ids are BOS and the system part
 * (0 when the prompt has neither), for pooling "mean_after_system": for
 * llama2, whose system part shares a piece with the query, that is the
 * number of leading ids that encoding "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n"
 * alone has in common with the whole piece's ids. Returns 0, or -1 with err. */
int tmpl_encode(enum tmpl_kind k, const tok_tokenizer *t, const char *system, const char *query,
                const char *response, tok_ids *prompt, tok_ids *response_ids, size_t *system_len,
                char *err, size_t errlen);

/* LLaMA-Factory's cut of a prompt and response to cutoff_len tokens (its
 * infer_max_len, applied to every example): the response may keep its share
 * of cutoff_len in proportion to its length (float64 arithmetic truncated,
 * as Python's int() does), at least reserved_label_len; the prompt keeps
 * the rest, counted from its start, so an over-long prompt loses its end.
 * Writes how many ids of each are kept (never more than there are). Note
 * the float rounding can drop a response's last id even when both fit
 * (prompt 7, response 15, cutoff 22 keeps 7 and 14), as LLaMA-Factory does.
 * Its defaults: cutoff_len 1024, reserved_label_len 1. A reserved_label_len
 * over cutoff_len leaves the prompt nothing here (Python's negative slice
 * would keep part of it). */
void tmpl_cutoff(size_t prompt_len, size_t response_len, size_t cutoff_len,
                 size_t reserved_label_len, size_t *keep_prompt, size_t *keep_response);

#endif
