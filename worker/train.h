/* train.h - the train job kind: fine-tune a LLaMA-family model (or train one
 * from a random initialisation) on a dataset, as LLaMA-Factory's
 * `--stage sft` does with Hugging Face's Trainer.
 *
 * Spec: validated by spec_validate("train", ...); fields and defaults in
 * docs/api.md ("Train jobs (spec)") and spec.h (SPEC_TRAIN_DEFAULT_*).
 *
 * The run: examples are built with sft_build (SFT: prompt labels -100,
 * response + EOS counted; pretrain: every token counts), capped per task or
 * cluster when the spec has a mixture, and visited by sft_loader (seeded
 * shuffle per epoch, batch_size examples per micro-batch,
 * gradient_accumulation_steps micro-batches per optimizer step, steps never
 * straddling epochs). Total steps: max_steps, else ceil(num_train_epochs x
 * steps per epoch). Each optimizer step: gradients zeroed, every
 * micro-batch's loss and gradient accumulated with the token-mean scaling
 * over the whole step (Hugging Face's Trainer with num_items_in_batch),
 * global-norm clipping (max_grad_norm; 0 off), learning rate base x
 * sched_lambda(completed steps), one AdamW step (norm weights without weight
 * decay, as the Trainer exempts them). The step's loss is its token mean.
 *
 * Methods: "full" trains every weight. "lora" trains a PEFT adapter
 * (llama_lora, unmerged; the base weights frozen and only read): new, with
 * PEFT's initialisation (A uniform in +-1/sqrt(in), B zero; seeded), or
 * continued from adapter_init (its adapter_config.json sets r, alpha and the
 * targets: a list of module names, no layers_to_transform). LoRA dropout
 * (lora.dropout or the adapter's lora_dropout) applies to the adapter
 * branch's input in training, with masks keyed by seed and micro-batch.
 *
 * Outputs (ctx->add_artifact): full: config.json (Hugging Face names,
 * torch_dtype float32) and model.safetensors (F32, Hugging Face tensor names,
 * lm_head.weight left out when tied); lora: adapter_config.json and
 * adapter_model.safetensors (F32, PEFT names) as PEFT saves them; both: the
 * tokenizer's files the base model has (tokenizer.json,
 * tokenizer_config.json, special_tokens_map.json). Every save_steps optimizer
 * steps (0: never) a checkpoint: checkpoint-{step}-model.safetensors (full)
 * or checkpoint-{step}-adapter_model.safetensors (lora), the trained
 * parameters as above; checkpoint-{step}-optimizer.bin (adamw_write_file);
 * checkpoint-{step}-trainer_state.json ({"step", "epoch", "cursor" (the data
 * position sft_loader_seek takes), "seed", "losses", "learning_rates",
 * "grad_norms"}). The data order depends only on (seed, epoch), so that is
 * all a resumed run needs.
 *
 * Resume: when ctx->resolve_checkpoint names a checkpoint (an earlier
 * attempt's), the run loads its parameters, optimizer state, data position
 * and series, and continues with step + 1; the steps after it are the same
 * as an uninterrupted run's (same arithmetic in the same order). Each step's
 * loss, learning rate and gradient norm also go to ctx->metric.
 *
 * Memory: the model; full: its gradient and AdamW's two moments (4 float32
 * copies of the parameters in all); lora: the adapter 4 times; plus the
 * training activations for batch_size x the longest example (forward.h). */
#ifndef STRATA_TRAIN_H
#define STRATA_TRAIN_H

#include "worker/runner.h"

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Runs a train job (spec already validated). Returns 0 with *result (caller
 * owns it): {"method", "mode", "template" (sft only), "examples",
 * "truncated", "steps", "steps_per_epoch", "losses" (one per optimizer step),
 * "learning_rates", "grad_norms" (before clipping), "final_loss",
 * "trainable_parameters", "tokens", "seconds", "tokens_per_second",
 * "checkpoints" (steps saved), "resumed_from" (the checkpoint step continued
 * from; 0 for none), "artifacts"}. Returns -1 with err set;
 * *retryable for resolver failures, writing outputs and running out of
 * memory, not for bad inputs or a diverged loss (non-finite gradient norm);
 * *cancelled when ctx->cancel was set (checked between micro-batches). */
int train_run(json_t *spec, runner_ctx *ctx, json_t **result, bool *retryable, bool *cancelled,
              char *err, size_t errlen);

/* Parses an artifact name checkpoint-{step}-{rest} (step a plain positive
 * decimal); *rest points into name. Returns false for any other name. */
bool train_checkpoint_name(const char *name, int64_t *step, const char **rest);

/* The highest step whose checkpoint-{step}-trainer_state.json is in dir (the
 * trainer state is written last, so its presence marks a complete set), or
 * *step 0 when there is none. Returns 0, or -1 with err when dir cannot be
 * read. */
int train_find_checkpoint(const char *dir, int64_t *step, char *err, size_t errlen);

#endif
