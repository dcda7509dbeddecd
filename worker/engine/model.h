/* model.h - a LLaMA-family model in memory: its config and its weights.
 *
 * Semantics follow Hugging Face's LlamaForCausalLM (config.json names).
 * Weights are float32, in ONE allocation (params) with a struct of pointers
 * into it, in Hugging Face's [out, in] layout (y = x W^T), so a checkpoint's
 * tensors are copied (converted from fp16/bf16 where needed) without any
 * transposition. Per-layer tensors are stacked over L.
 *
 * Shapes: C = hidden_size, FF = intermediate_size, L = num_hidden_layers,
 * NH = num_attention_heads, NKV = num_key_value_heads, HS = C / NH,
 * V = vocab_size. */
#ifndef STRATA_MODEL_H
#define STRATA_MODEL_H

#include <stdbool.h>
#include <stddef.h>

typedef struct {
    int hidden_size;             /* C */
    int intermediate_size;       /* FF */
    int num_hidden_layers;       /* L */
    int num_attention_heads;     /* NH */
    int num_key_value_heads;     /* NKV (defaults to NH) */
    int vocab_size;              /* V */
    int max_position_embeddings;
    float rms_norm_eps;          /* default 1e-6 */
    float rope_theta;            /* default 10000 */
    bool tie_word_embeddings;    /* default false */
    int bos_token_id, eos_token_id, pad_token_id; /* -1 when absent */
} llama_config;

typedef struct {
    float *embed;      /* (V, C) model.embed_tokens.weight */
    float *attn_norm;  /* (L, C) model.layers.i.input_layernorm.weight */
    float *wq;         /* (L, NH*HS, C) self_attn.q_proj.weight */
    float *wk;         /* (L, NKV*HS, C) self_attn.k_proj.weight */
    float *wv;         /* (L, NKV*HS, C) self_attn.v_proj.weight */
    float *wo;         /* (L, C, NH*HS) self_attn.o_proj.weight */
    float *mlp_norm;   /* (L, C) post_attention_layernorm.weight */
    float *w_gate;     /* (L, FF, C) mlp.gate_proj.weight */
    float *w_up;       /* (L, FF, C) mlp.up_proj.weight */
    float *w_down;     /* (L, C, FF) mlp.down_proj.weight */
    float *final_norm; /* (C) model.norm.weight */
    float *lm_head;    /* (V, C) lm_head.weight; == embed when tied */
} llama_weights;

typedef struct {
    llama_config cfg;
    llama_weights w;
    float *params;  /* the one allocation every pointer above points into */
    size_t nparams; /* floats in params */
} llama_model;

/* Number of floats each tensor takes; the loader and tests share it. */
size_t llama_param_count(const llama_config *cfg);

/* Reads and checks config.json (every field in range, C divisible by NH, NH
 * divisible by NKV). Returns 0, or -1 with err naming the field. */
int llama_config_load(const char *path, llama_config *cfg, char *err, size_t errlen);

/* Allocates params for cfg and points w into it (contents uninitialised). */
int llama_alloc(llama_model *m, const llama_config *cfg, char *err, size_t errlen);

/* Loads a Hugging Face model directory: config.json plus model.safetensors or
 * model.safetensors.index.json with its shards. Every tensor's name, dtype and
 * shape is checked; fp32/fp16/bf16 are converted to float32 as they are read
 * from the memory-mapped file (one fp32 copy resident, never two). */
int llama_load_hf(const char *dir, llama_model *m, char *err, size_t errlen);

/* Loads a llama2.c checkpoint (.bin; legacy and version-1 headers), undoing
 * its interleaved RoPE layout into Hugging Face's rotate-half one. */
int llama_load_llama2c(const char *path, llama_model *m, char *err, size_t errlen);

void llama_free(llama_model *m);

#endif
