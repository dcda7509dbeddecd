/* lora.h - LoRA adapters in PEFT's format, merged into a model at load.
 *
 * An adapter directory holds adapter_config.json and adapter_model.safetensors
 * as PEFT saves them. For a targeted linear layer with weight W (out, in),
 * PEFT computes y = W x + s * B (A x), A = lora_A (r, in), B = lora_B (out, r),
 * s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora); dropout only
 * acts in training. For a frozen adapter this is exactly y = (W + s B A) x, so
 * the adapter is merged once into the model's float32 weights.
 *
 * Tensor names: base_model.model.model.layers.{i}.{self_attn|mlp}.{module}
 * .{lora_A|lora_B}.weight, modules q_proj k_proj v_proj o_proj (self_attn)
 * and gate_proj up_proj down_proj (mlp); F32, F16 or BF16.
 *
 * adapter_config.json fields used: r, lora_alpha, use_rslora,
 * target_modules (a list of module names, "q_proj" or "self_attn.q_proj"
 * (PEFT's suffix match, limited to these two spellings); or a string: "all-linear", or
 * a regular expression PEFT full-matches against module names like
 * "model.layers.0.self_attn.q_proj", taken here as a POSIX extended regex),
 * layers_to_transform (an int or a list; only with a list of target modules,
 * as in PEFT). Refused, naming the field: peft_type other than LORA,
 * bias other than "none", fan_in_fan_out, use_dora, lora_bias, non-empty
 * modules_to_save, rank_pattern, alpha_pattern, exclude_modules,
 * target_parameters, trainable_token_indices, layer_replication, a
 * layers_pattern other than "layers", and target modules outside the seven.
 *
 * Completeness rule: the config decides the set of (layer, module) pairs the
 * adapter covers (every targeted module in every layer, or in the layers of
 * layers_to_transform), as PEFT builds the adapted model from the config.
 * The file must hold exactly lora_A and lora_B for each of those pairs:
 * a missing tensor, or a tensor for a pair the config does not target, is an
 * error (PEFT would silently leave such a module unadapted or ignore the
 * weight; here it means the files do not belong together). */
#ifndef STRATA_LORA_H
#define STRATA_LORA_H

#include "worker/engine/model.h"

#include <stdbool.h>
#include <stddef.h>

/* What lora_apply_info merged. */
typedef struct {
    int modules;    /* (layer, projection) pairs merged */
    int r;
    double alpha;   /* lora_alpha */
    bool rslora;
    float scaling;  /* alpha / r, or alpha / sqrt(r) with use_rslora */
} lora_info;

/* Reads adapter_dir/adapter_config.json and adapter_dir/
 * adapter_model.safetensors, checks them against m's config (see the rules
 * above) and merges W += scaling * B A into m's float32 weights. Every check
 * (and the scratch allocation) comes before any weight changes, so on
 * failure m is unchanged.
 * Fills info (when not NULL) and logs one line naming what was applied.
 * Returns 0, or -1 with err naming the file and the field or tensor. */
int lora_apply_info(llama_model *m, const char *adapter_dir, lora_info *info, char *err,
                    size_t errlen);

/* lora_apply_info without the report. */
int lora_apply(llama_model *m, const char *adapter_dir, char *err, size_t errlen);

#endif
