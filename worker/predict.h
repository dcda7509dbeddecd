/* predict.h - the predict job kind: run a model over a dataset's prompts and
 * save every requested hidden state, pooled per example.
 *
 * Spec (validated by spec_validate("predict", ...)): model, adapter?,
 * dataset, format? (local dataset files only), template (llama2), max_samples
 * (all), pool (last_token), layers ("all" = 0..L, Hugging Face's
 * output_hidden_states indexing), dtype (float16), batch_size (8),
 * generate? {max_new_tokens}.
 *
 * Each example's prompt is encoded with the template (the prompt only, no
 * response) and cut to the model's max_position_embeddings ids, keeping the
 * start (as LLaMA-Factory's cutoff keeps a prompt's start); examples.jsonl
 * marks such an example "truncated". Pools, over the kept prompt ids:
 *   last_token        the last one (position len - 1)
 *   mean              the mean over [0, len), BOS included
 *   mean_after_system the mean over [system_len, len), where system_len is
 *                     BOS plus the system part (tmpl_encode); an example with
 *                     nothing after its system part is an error.
 * Means are accumulated in double.
 *
 * Artifacts: hidden_states_{layer}.npy (N, hidden_size) in dtype, rows in
 * dataset order; examples.jsonl, one line per example {"index",
 * "input_ids", "pooled_position" (an int for last_token, [start, end) for the
 * mean pools), "task" (when the dataset has one), "truncated" (only when
 * true)}; with generate, generated_predictions.jsonl {"label", "predict"} per
 * example: greedy decoding (argmax of the last position's logits, stop after
 * EOS or max_new_tokens or when the sequence reaches max_position_embeddings),
 * decoded without special tokens. */
#ifndef STRATA_PREDICT_H
#define STRATA_PREDICT_H

#include "worker/engine/backend.h"
#include "worker/engine/model.h"
#include "worker/engine/tok.h"
#include "worker/runner.h"

#include <jansson.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

/* Runs a predict job (spec already validated). Returns 0 with *result (the
 * caller owns it): {"examples", "layers", "hidden_size", "dtype", "pool",
 * "template", "artifacts", "seconds", "tokens_per_second" (prompt tokens per
 * second of the hidden-state pass), "prompt_tokens"} (plus "max_new_tokens"
 * with generate). Returns -1 with err set; *retryable for resolver failures
 * (the server may be unreachable), writing artifacts and running out of
 * memory, not for bad specs or inputs (a model, tokenizer, adapter or
 * dataset that does not load); *cancelled when ctx->cancel was set (checked
 * between batches and between greedy steps).
 *
 * Memory: the model's float32 copy, the pooled rows of every requested layer
 * ((L + 1) x N x C floats for "all") until they are written, and for float16
 * output one N x C float64 conversion buffer. */
int predict_run(json_t *spec, runner_ctx *ctx, json_t **result, bool *retryable, bool *cancelled,
                char *err, size_t errlen);

/* Greedy decoding of n prompts, batch_size at a time, on backend be: each
 * step appends the argmax of the last position's logits (the lowest id on
 * ties) and a sequence stops after eos_id (kept in its output; -1: none),
 * after max_new ids, or when prompt + output reach max_len ids. Each prompt
 * holds 1..max_len ids. out[0..n) are initialised here and filled with the
 * new ids; the caller tok_ids_free()s each, also on failure. cancel may be
 * NULL. Returns 0, or -1 with err set (out of memory, a bad prompt, cancelled:
 * err "cancelled"). */
int predict_greedy(const backend *be, const llama_model *m, const tok_ids *prompts, size_t n,
                   int batch_size, int max_new, int eos_id, size_t max_len, atomic_int *cancel,
                   tok_ids *out, char *err, size_t errlen);

#endif
