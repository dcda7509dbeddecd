/* train.c - see train.h. */
#include "worker/train.h"

#include "common/spec.h"
#include "common/st.h"
#include "common/util.h"
#include "worker/engine/adamw.h"
#include "worker/engine/backend.h"
#include "worker/engine/cuda/kernels.h"
#include "worker/engine/dataset.h"
#include "worker/engine/forward.h"
#include "worker/engine/model.h"
#include "worker/engine/model_backend.h"
#include "worker/engine/schedule.h"
#include "worker/engine/sft.h"
#include "worker/engine/template.h"
#include "worker/engine/tok.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The seed stream of the random initialisation (epochs use 0, 1, ...). */
#define TRAIN_INIT_STREAM UINT64_MAX

/* The seed stream of LoRA's A initialisation. */
#define TRAIN_LORA_STREAM (UINT64_MAX - 1)

/* fp16 loss scaling as torch.cuda.amp.GradScaler's defaults: start at
 * 2^16, halve (and skip the step) when a gradient is inf/NaN, double after
 * 2000 steps in a row without one. */
#define TRAIN_SCALE_INIT 65536.0
#define TRAIN_SCALE_GROWTH_INTERVAL 2000

/* What one optimizer step on a GPU downloads: the gradients' sum of
 * squares (a double) and their inf/NaN flag (an int), padded to 16 bytes. */
#define TRAIN_GPU_NORM_BYTES 16

typedef struct {
    bool lora;
    int lora_r;
    double lora_alpha, lora_dropout;
    bool target[LLAMA_NPROJ];
    enum sft_mode mode;
    enum tmpl_kind tmpl;
    double lr, epochs;
    int64_t max_steps; /* 0: from epochs */
    size_t batch_size, grad_accum, cutoff_len;
    sched_kind sched;
    int64_t warmup_steps;
    double warmup_ratio;
    adamw_config adam;
    double max_grad_norm;
    uint64_t seed;
    int64_t save_steps;
} train_opts;

typedef struct {
    train_opts o;
    llama_model model;
    bool model_loaded;
    tok_tokenizer *tok;
    char tok_dir[4096];  /* where the tokenizer's files are ("" when none) */
    char tok_file[4096]; /* a lone tokenizer.json (init with an artifact) */
    ds_dataset ds;
    sft_set set;
    sft_mix mix;
    bool mixed;
    float *grads;
    adamw *opt;
    llama_state state;
    bool state_ready;
    llama_lora lora;      /* method lora: the adapter being trained */
    float *lora_params;   /* its flat buffer (lora.nparams floats) */
    float *train_params;  /* what the optimizer updates: model.params or lora_params */
    size_t n_train;       /* floats in train_params (and grads) */
    int *lens;           /* batch_size row lengths as int */
    json_t *losses, *lrs, *norms, *checkpoints;

    /* Where the passes run. On a GPU the model lives in dmodel (full
     * fine-tuning: the trainable parameters themselves) and the adapter in
     * d_lora_params; gradients accumulate in d_grads. The optimizer runs
     * there too: d_train (dmodel.params or d_lora_params) is the fp32
     * master copy, d_m / d_v the moments (packed in adamw's range order),
     * d_norm one double and one int for the gradients' sum of squares and
     * inf/NaN flag, the only thing a step downloads. opt stays on the host
     * for the step count, the scalars and the checkpoint format; its
     * moments and the host parameters (model.params / lora_params) are
     * filled from the device at checkpoints and at the end only. On the CPU
     * fwd, fwd_lora and fwd_grads are the host objects. */
    runner_device dev;
    bool dev_open;
    llama_model dmodel;
    bool dmodel_ready;
    float *d_lora_params;
    llama_lora dlora;
    float *d_grads;
    float *d_train;
    float *d_m, *d_v, *d_norm;
    uint64_t step_bytes; /* host<->device bytes the optimizer steps moved */
    const llama_model *fwd;
    llama_lora *fwd_lora;
    float *fwd_grads;
    /* fp16 on a GPU only: the dynamic loss scale (see TRAIN_SCALE_INIT),
     * clean steps since it last changed, steps skipped for inf/NaN. */
    bool scaling;
    double loss_scale;
    int64_t scale_clean, skipped;
} train_job;

static void train_job_free(train_job *job) {
    /* device buffers (the state's among them) before the CUDA context */
    if (job->state_ready) llama_state_free(&job->state);
    job->state_ready = false;
    if (job->d_grads) job->dev.be->free_buf(job->d_grads);
    if (job->d_m) job->dev.be->free_buf(job->d_m);
    if (job->d_v) job->dev.be->free_buf(job->d_v);
    if (job->d_norm) job->dev.be->free_buf(job->d_norm);
    if (job->d_lora_params) job->dev.be->free_buf(job->d_lora_params);
    if (job->dmodel_ready) {
        cuda_backend_forget_weights(job->dmodel.params);
        llama_model_free_backend(job->dev.be, &job->dmodel);
    }
    if (job->dev_open) runner_device_close(&job->dev);
    if (job->model_loaded) llama_free(&job->model);
    tok_free(job->tok);
    ds_free(&job->ds);
    sft_set_free(&job->set);
    if (job->mixed) sft_mix_free(&job->mix);
    free(job->grads);
    free(job->lora_params);
    adamw_free(job->opt);
    if (job->state_ready) llama_state_free(&job->state);
    free(job->lens);
    json_decref(job->losses);
    json_decref(job->lrs);
    json_decref(job->norms);
    json_decref(job->checkpoints);
}

static double train_num(json_t *spec, const char *key, double dflt) {
    json_t *v = json_object_get(spec, key);
    return json_is_number(v) ? json_number_value(v) : dflt;
}

static int64_t train_int(json_t *spec, const char *key, int64_t dflt) {
    json_t *v = json_object_get(spec, key);
    return json_is_integer(v) ? (int64_t)json_integer_value(v) : dflt;
}

/* Reads the scalar options with their defaults (the spec is valid). */
static int train_options(train_opts *o, json_t *spec, char *err, size_t errlen) {
    const char *method = json_string_value(json_object_get(spec, "method"));
    o->lora = strcmp(method ? method : SPEC_TRAIN_DEFAULT_METHOD, "lora") == 0;
    json_t *lora = json_object_get(spec, "lora");
    o->lora_r = (int)train_int(lora, "r", SPEC_TRAIN_DEFAULT_LORA_R);
    o->lora_alpha = train_num(lora, "alpha", SPEC_TRAIN_DEFAULT_LORA_ALPHA);
    o->lora_dropout = train_num(lora, "dropout", SPEC_TRAIN_DEFAULT_LORA_DROPOUT);
    json_t *targets = json_object_get(lora, "targets");
    memset(o->target, 0, sizeof o->target);
    if (!targets) {
        o->target[LLAMA_PROJ_Q] = o->target[LLAMA_PROJ_V] = true;
    } else {
        size_t i;
        json_t *t;
        json_array_foreach(targets, i, t) {
            const char *name = json_string_value(t);
            for (int p = 0; p < LLAMA_NPROJ; p++) {
                const char *module = llama_proj_module((llama_proj)p);
                if (name && strcmp(strchr(module, '.') + 1, name) == 0) o->target[p] = true;
            }
        }
    }
    const char *mode = json_string_value(json_object_get(spec, "mode"));
    o->mode = mode && strcmp(mode, "pretrain") == 0 ? SFT_MODE_PRETRAIN : SFT_MODE_SFT;
    const char *tmpl = json_string_value(json_object_get(spec, "template"));
    if (tmpl_parse(tmpl ? tmpl : SPEC_TRAIN_DEFAULT_TEMPLATE, &o->tmpl) != 0)
        return err_set(err, errlen, "unknown template \"%s\"", tmpl);
    o->lr = train_num(spec, "learning_rate", SPEC_TRAIN_DEFAULT_LEARNING_RATE);
    o->epochs = train_num(spec, "num_train_epochs", SPEC_TRAIN_DEFAULT_EPOCHS);
    o->max_steps = train_int(spec, "max_steps", 0);
    o->batch_size = (size_t)train_int(spec, "batch_size", SPEC_TRAIN_DEFAULT_BATCH_SIZE);
    o->grad_accum =
        (size_t)train_int(spec, "gradient_accumulation_steps", SPEC_TRAIN_DEFAULT_GRAD_ACCUM);
    o->cutoff_len = (size_t)train_int(spec, "cutoff_len", SPEC_TRAIN_DEFAULT_CUTOFF_LEN);
    const char *sched_name = json_string_value(json_object_get(spec, "lr_scheduler"));
    if (sched_parse_kind(sched_name ? sched_name : SPEC_TRAIN_DEFAULT_SCHEDULER, &o->sched, err,
                         errlen) != 0)
        return -1;
    o->warmup_steps = train_int(spec, "warmup_steps", 0);
    o->warmup_ratio = train_num(spec, "warmup_ratio", 0);
    o->adam = adamw_default_config();
    o->adam.beta1 = train_num(spec, "adam_beta1", o->adam.beta1);
    o->adam.beta2 = train_num(spec, "adam_beta2", o->adam.beta2);
    o->adam.eps = train_num(spec, "adam_epsilon", o->adam.eps);
    o->adam.weight_decay = train_num(spec, "weight_decay", o->adam.weight_decay);
    o->max_grad_norm = train_num(spec, "max_grad_norm", SPEC_TRAIN_DEFAULT_MAX_GRAD_NORM);
    o->seed = (uint64_t)train_int(spec, "seed", SPEC_TRAIN_DEFAULT_SEED);
    o->save_steps = train_int(spec, "save_steps", SPEC_TRAIN_DEFAULT_SAVE_STEPS);
    return 0;
}

/* The directory part of path ("." when it has none). */
static void train_dirname(const char *path, char *dir, size_t dirlen) {
    snprintf(dir, dirlen, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        dir[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(dir, dirlen, ".");
}

static bool train_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* A standard normal deviate (Box-Muller on two 53-bit uniforms). */
static double train_normal(sft_rng *r) {
    double u1 = ((double)(sft_rng_next(r) >> 11) + 1.0) * 0x1p-53; /* (0, 1] */
    double u2 = (double)(sft_rng_next(r) >> 11) * 0x1p-53;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

/* Hugging Face's LlamaPreTrainedModel initialisation: every linear and the
 * embedding normal(0, std), the padding id's embedding row zero, RMSNorm
 * weights one. Seeded by (seed, TRAIN_INIT_STREAM). */
static void train_init_weights(llama_model *m, double std, uint64_t seed) {
    sft_rng r;
    sft_rng_init(&r, seed, TRAIN_INIT_STREAM);
    const llama_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, L = (size_t)c->num_hidden_layers;
    float *norms[3] = {m->w.attn_norm, m->w.mlp_norm, m->w.final_norm};
    size_t norm_n[3] = {L * C, L * C, C};
    for (size_t i = 0; i < m->nparams; i++) m->params[i] = (float)(std * train_normal(&r));
    for (int k = 0; k < 3; k++)
        for (size_t i = 0; i < norm_n[k]; i++) norms[k][i] = 1.0f;
    if (c->pad_token_id >= 0 && c->pad_token_id < c->vocab_size)
        memset(m->w.embed + (size_t)c->pad_token_id * C, 0, C * sizeof(float));
}

/* The config of base_model.init, with defaults filled in (special ids from
 * the tokenizer when not given). */
static void train_init_config(json_t *init, const tok_tokenizer *tok, llama_config *c) {
    memset(c, 0, sizeof *c);
    c->hidden_size = (int)json_integer_value(json_object_get(init, "hidden_size"));
    c->intermediate_size = (int)json_integer_value(json_object_get(init, "intermediate_size"));
    c->num_hidden_layers = (int)json_integer_value(json_object_get(init, "num_hidden_layers"));
    c->num_attention_heads = (int)json_integer_value(json_object_get(init, "num_attention_heads"));
    json_t *kv = json_object_get(init, "num_key_value_heads");
    c->num_key_value_heads = kv ? (int)json_integer_value(kv) : c->num_attention_heads;
    c->vocab_size = (int)json_integer_value(json_object_get(init, "vocab_size"));
    json_t *mp = json_object_get(init, "max_position_embeddings");
    c->max_position_embeddings = mp ? (int)json_integer_value(mp) : 2048;
    c->rms_norm_eps = (float)train_num(init, "rms_norm_eps", 1e-6);
    c->rope_theta = (float)train_num(init, "rope_theta", 10000.0);
    c->tie_word_embeddings = json_is_true(json_object_get(init, "tie_word_embeddings"));
    json_t *id;
    c->bos_token_id = (id = json_object_get(init, "bos_token_id")) ? (int)json_integer_value(id)
                                                                   : tok_bos_id(tok);
    c->eos_token_id = (id = json_object_get(init, "eos_token_id")) ? (int)json_integer_value(id)
                                                                   : tok_eos_id(tok);
    c->pad_token_id = (id = json_object_get(init, "pad_token_id")) ? (int)json_integer_value(id)
                                                                   : tok_pad_id(tok);
}

/* The tokenizer of base_model.init: a registered model's, an artifact
 * tokenizer.json, or a local path (a directory or the file). */
static int train_load_init_tokenizer(train_job *job, json_t *ref, int vocab, runner_ctx *ctx,
                                     bool *retryable, char *err, size_t errlen) {
    char path[4096];
    bool file;
    if (json_object_get(ref, "model")) {
        if (!ctx->resolve_model) return err_set(err, errlen, "this worker cannot resolve models");
        if (ctx->resolve_model(ctx, ref, path, sizeof path, err, errlen) != 0) {
            *retryable = true;
            return err_prefix(err, errlen, "tokenizer");
        }
        file = !train_is_dir(path);
        if (file) train_dirname(path, path, sizeof path); /* a llama2.c .bin: its directory */
        file = false;
    } else {
        /* A local path may be a directory (an empty one means the byte-level
         * tokenizer), which resolve_file refuses; resolve_model takes both. */
        bool local = json_object_get(ref, "path") && ctx->resolve_model;
        int got = local ? ctx->resolve_model(ctx, ref, path, sizeof path, err, errlen)
                        : ctx->resolve_file(ctx, ref, path, sizeof path, err, errlen);
        if (got != 0) {
            *retryable = true;
            return err_prefix(err, errlen, "tokenizer");
        }
        file = !train_is_dir(path);
    }
    int rc = file ? tok_load_hf(path, &job->tok, err, errlen)
                  : tok_load_dir(path, vocab, &job->tok, err, errlen);
    if (rc != 0) {
        *retryable = runner_err_is_oom(err);
        return err_prefix(err, errlen, "tokenizer %s", path);
    }
    if (tok_vocab_size(job->tok) > vocab)
        return err_set(err, errlen, "tokenizer %s has ids up to %d, beyond init.vocab_size %d",
                       path, tok_vocab_size(job->tok) - 1, vocab);
    snprintf(file ? job->tok_file : job->tok_dir, sizeof job->tok_dir, "%s", path);
    return 0;
}

/* Loads the base model and its tokenizer, or builds a random one from init. */
static int train_load_model(train_job *job, json_t *spec, runner_ctx *ctx, bool *retryable,
                            char *err, size_t errlen) {
    json_t *base = json_object_get(spec, "base_model");
    json_t *init = json_object_get(base, "init");
    if (init) {
        int vocab = (int)json_integer_value(json_object_get(init, "vocab_size"));
        if (train_load_init_tokenizer(job, json_object_get(base, "tokenizer"), vocab, ctx,
                                      retryable, err, errlen) != 0)
            return -1;
        llama_config cfg;
        train_init_config(init, job->tok, &cfg);
        if (llama_alloc(&job->model, &cfg, err, errlen) != 0) {
            *retryable = runner_err_is_oom(err);
            return err_prefix(err, errlen, "base_model.init");
        }
        job->model_loaded = true;
        train_init_weights(&job->model, train_num(init, "initializer_range",
                                                  SPEC_TRAIN_DEFAULT_INIT_RANGE),
                           job->o.seed);
        return 0;
    }
    char path[4096];
    if (!ctx->resolve_model) return err_set(err, errlen, "this worker cannot resolve models");
    if (ctx->resolve_model(ctx, base, path, sizeof path, err, errlen) != 0) {
        *retryable = true;
        return err_prefix(err, errlen, "base_model");
    }
    bool is_dir = train_is_dir(path);
    int rc = is_dir ? llama_load_hf(path, &job->model, err, errlen)
                    : llama_load_llama2c(path, &job->model, err, errlen);
    if (rc != 0) {
        *retryable = runner_err_is_oom(err);
        return err_prefix(err, errlen, "base_model %s", path);
    }
    job->model_loaded = true;
    if (is_dir)
        snprintf(job->tok_dir, sizeof job->tok_dir, "%s", path);
    else
        train_dirname(path, job->tok_dir, sizeof job->tok_dir);
    if (tok_load_dir(job->tok_dir, job->model.cfg.vocab_size, &job->tok, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        return err_prefix(err, errlen, "tokenizer");
    }
    return 0;
}

/* Loads one dataset reference and appends its examples to job->ds. */
static int train_add_dataset(train_job *job, json_t *ref, runner_ctx *ctx, bool *retryable,
                             char *err, size_t errlen) {
    char path[4096], format[32] = "auto";
    enum ds_format fmt;
    if (!ctx->resolve_dataset) return err_set(err, errlen, "this worker cannot resolve datasets");
    if (ctx->resolve_dataset(ctx, ref, path, sizeof path, format, sizeof format, err, errlen) !=
        0) {
        *retryable = true;
        return err_prefix(err, errlen, "dataset");
    }
    if (ds_format_parse(format, &fmt) != 0)
        return err_set(err, errlen, "dataset %s: unknown format \"%s\"", path, format);
    ds_dataset one;
    memset(&one, 0, sizeof one);
    if (ds_load(path, fmt, 0, &one, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        return -1; /* ds_load names the file and record */
    }
    if (one.n == 0) {
        ds_free(&one);
        return err_set(err, errlen, "dataset %s has no examples", path);
    }
    if (job->ds.n == 0) {
        job->ds = one;
        return 0;
    }
    ds_example *items = realloc(job->ds.items, (job->ds.n + one.n) * sizeof *items);
    if (!items) {
        ds_free(&one);
        *retryable = true;
        return err_set(err, errlen, "out of memory");
    }
    /* The examples move: one keeps no pointers after this. */
    memcpy(items + job->ds.n, one.items, one.n * sizeof *items);
    job->ds.items = items;
    job->ds.n += one.n;
    free(one.items);
    return 0;
}

/* The dataset(s), the mixture cap, and the examples. */
static int train_load_data(train_job *job, json_t *spec, runner_ctx *ctx, bool *retryable,
                           char *err, size_t errlen) {
    json_t *dataset = json_object_get(spec, "dataset");
    if (json_is_array(dataset)) {
        size_t i;
        json_t *ref;
        json_array_foreach(dataset, i, ref) {
            if (train_add_dataset(job, ref, ctx, retryable, err, errlen) != 0)
                return err_prefix(err, errlen, "dataset[%zu]", i);
        }
    } else if (train_add_dataset(job, dataset, ctx, retryable, err, errlen) != 0) {
        return -1;
    }
    const size_t *subset = NULL;
    size_t n_subset = 0;
    json_t *mixture = json_object_get(spec, "mixture");
    if (mixture) {
        const char *by = json_string_value(json_object_get(mixture, "by"));
        bool cluster = by && strcmp(by, "cluster") == 0;
        sft_taskmap map;
        memset(&map, 0, sizeof map);
        if (cluster) {
            char path[4096];
            if (ctx->resolve_file(ctx, json_object_get(mixture, "task_map"), path, sizeof path,
                                  err, errlen) != 0) {
                *retryable = true;
                return err_prefix(err, errlen, "mixture.task_map");
            }
            if (sft_taskmap_load(path, &map, err, errlen) != 0)
                return err_prefix(err, errlen, "mixture.task_map");
        }
        size_t cap = (size_t)json_integer_value(json_object_get(mixture, "cap"));
        int rc = sft_mix_cap(&job->ds, cluster ? &map : NULL,
                             cluster ? SFT_CAP_CLUSTER : SFT_CAP_TASK, cap, job->o.seed,
                             &job->mix, err, errlen);
        sft_taskmap_free(&map);
        if (rc != 0) return err_prefix(err, errlen, "mixture");
        job->mixed = true;
        subset = job->mix.keep;
        n_subset = job->mix.n_keep;
    }
    sft_opts so = {job->o.mode, job->o.tmpl, job->o.cutoff_len, 1};
    if (sft_build(&job->ds, subset, n_subset, job->tok, &so, &job->set, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        return -1;
    }
    return 0;
}

/* PEFT's name of layer l's lora_A or lora_B tensor of projection p. */
static void train_lora_name(char *out, size_t outlen, int l, llama_proj p, bool b) {
    snprintf(out, outlen, "base_model.model.model.layers.%d.%s.lora_%c.weight", l,
             llama_proj_module(p), b ? 'B' : 'A');
}

/* Reads adapter_init's adapter_config.json: r, lora_alpha, use_rslora and a
 * list of target modules. Refuses what this trainer cannot continue (other
 * PEFT types, biases, layer subsets, pattern targets, dropout), naming the
 * field. Fills job->o's LoRA options and *scaling. */
static int train_adapter_config(train_job *job, const char *dir, float *scaling, char *err,
                                size_t errlen) {
    char path[4200];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    json_error_t jerr;
    json_t *c = json_load_file(path, 0, &jerr);
    int rc = -1;
    if (!c) return err_set(err, errlen, "%s: %s", path, jerr.text);
    json_t *v;
    if (!json_is_object(c)) {
        err_set(err, errlen, "%s: not a JSON object", path);
        goto out;
    }
    if ((v = json_object_get(c, "peft_type")) && !json_is_null(v) &&
        (!json_is_string(v) || strcmp(json_string_value(v), "LORA") != 0)) {
        err_set(err, errlen, "%s: peft_type must be LORA", path);
        goto out;
    }
    if ((v = json_object_get(c, "bias")) && !json_is_null(v) &&
        (!json_is_string(v) || strcmp(json_string_value(v), "none") != 0)) {
        err_set(err, errlen, "%s: bias must be \"none\" to continue training", path);
        goto out;
    }
    if ((v = json_object_get(c, "layers_to_transform")) && !json_is_null(v)) {
        err_set(err, errlen, "%s: layers_to_transform is not supported for adapter_init", path);
        goto out;
    }
    v = json_object_get(c, "r");
    if (!json_is_integer(v) || json_integer_value(v) < 1 ||
        json_integer_value(v) > SPEC_MAX_LORA_R) {
        err_set(err, errlen, "%s: r must be an integer from 1 to %d", path, SPEC_MAX_LORA_R);
        goto out;
    }
    job->o.lora_r = (int)json_integer_value(v);
    v = json_object_get(c, "lora_alpha");
    if (!json_is_number(v) || json_number_value(v) <= 0) {
        err_set(err, errlen, "%s: lora_alpha must be a positive number", path);
        goto out;
    }
    job->o.lora_alpha = json_number_value(v);
    v = json_object_get(c, "lora_dropout");
    job->o.lora_dropout = json_is_number(v) ? json_number_value(v) : 0.0;
    bool rslora = json_is_true(json_object_get(c, "use_rslora"));
    *scaling = (float)(rslora ? job->o.lora_alpha / sqrt((double)job->o.lora_r)
                              : job->o.lora_alpha / job->o.lora_r);
    v = json_object_get(c, "target_modules");
    if (!json_is_array(v) || json_array_size(v) == 0) {
        err_set(err, errlen, "%s: target_modules must be a list of module names", path);
        goto out;
    }
    memset(job->o.target, 0, sizeof job->o.target);
    size_t i;
    json_t *t;
    json_array_foreach(v, i, t) {
        const char *name = json_string_value(t);
        int found = -1;
        for (int p = 0; p < LLAMA_NPROJ && name; p++) {
            const char *module = llama_proj_module((llama_proj)p);
            if (strcmp(name, module) == 0 || strcmp(name, strchr(module, '.') + 1) == 0)
                found = p;
        }
        if (found < 0) {
            err_set(err, errlen, "%s: target_modules[%zu] is not one of the seven projections",
                    path, i);
            goto out;
        }
        job->o.target[found] = true;
    }
    rc = 0;
out:
    json_decref(c);
    return rc;
}

/* Reads every lora_A / lora_B tensor of the adapter file at path (adapter_init's
 * or a checkpoint's) into job->lora; the file must hold exactly those, with
 * the bound shapes. */
static int train_adapter_weights(train_job *job, const char *path, char *err, size_t errlen) {
    char name[160];
    st_file f;
    if (st_open(path, &f, err, errlen) != 0) return -1;
    const llama_config *cfg = &job->model.cfg;
    int r = job->lora.r, rc = -1;
    size_t expected = 0;
    for (int p = 0; p < LLAMA_NPROJ; p++) {
        if (!job->lora.target[p]) continue;
        size_t out_dim, in_dim;
        llama_proj_dims(cfg, (llama_proj)p, &out_dim, &in_dim);
        for (int l = 0; l < cfg->num_hidden_layers; l++)
            for (int b = 0; b < 2; b++) {
                train_lora_name(name, sizeof name, l, (llama_proj)p, b);
                const st_tensor *t = st_find(&f, name);
                size_t rows = b ? out_dim : (size_t)r, cols = b ? (size_t)r : in_dim;
                if (!t) {
                    err_set(err, errlen, "%s: no tensor %s", path, name);
                    goto out;
                }
                if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols) {
                    err_set(err, errlen, "%s: tensor %s is not (%zu, %zu)", path, name, rows,
                            cols);
                    goto out;
                }
                float *dst = b ? job->lora.b[p] + (size_t)l * out_dim * (size_t)r
                               : job->lora.a[p] + (size_t)l * (size_t)r * in_dim;
                if (st_to_f32(&f, t, dst, err, errlen) != 0) goto out;
                expected++;
            }
    }
    if (f.ntensors != expected) {
        err_set(err, errlen, "%s: %zu tensors, expected the %zu of the config's targets", path,
                f.ntensors, expected);
        goto out;
    }
    rc = 0;
out:
    st_close(&f);
    return rc;
}

/* Sets up the adapter being trained: from adapter_init, or new with PEFT's
 * initialisation (A kaiming-uniform with a = sqrt(5), i.e. uniform in
 * +-1/sqrt(in); B zero), seeded by (seed, TRAIN_LORA_STREAM). */
static int train_make_lora(train_job *job, json_t *spec, runner_ctx *ctx, bool *retryable,
                           char *err, size_t errlen) {
    const llama_config *cfg = &job->model.cfg;
    float scaling = (float)(job->o.lora_alpha / job->o.lora_r);
    json_t *init = json_object_get(spec, "adapter_init");
    char dir[4096];
    if (init) {
        if (!ctx->resolve_adapter) return err_set(err, errlen, "this worker cannot resolve adapters");
        if (ctx->resolve_adapter(ctx, init, dir, sizeof dir, err, errlen) != 0) {
            *retryable = true;
            return err_prefix(err, errlen, "adapter_init");
        }
        if (train_adapter_config(job, dir, &scaling, err, errlen) != 0)
            return err_prefix(err, errlen, "adapter_init");
    }
    if (!(job->o.lora_dropout >= 0 && job->o.lora_dropout < 1))
        return err_set(err, errlen, "lora dropout %g is not in [0, 1)", job->o.lora_dropout);
    size_t n = llama_lora_count(cfg, job->o.lora_r, job->o.target);
    if (n == 0) return err_set(err, errlen, "lora: no adapter for these targets and r");
    job->lora_params = calloc(n, sizeof *job->lora_params);
    if (!job->lora_params) {
        *retryable = true;
        return err_set(err, errlen, "out of memory for the adapter (%zu floats)", n);
    }
    if (llama_lora_bind(&job->lora, cfg, job->o.lora_r, scaling, job->o.target,
                        job->lora_params, err, errlen) != 0)
        return -1;
    /* Masks are keyed by the run's seed and the micro-batch's number (set
     * per call), so a resumed run redraws the ones it would have drawn. */
    job->lora.dropout = (float)job->o.lora_dropout;
    job->lora.dropout_seed = job->o.seed;
    if (init) {
        char path[4200];
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
        return train_adapter_weights(job, path, err, errlen) != 0
                   ? err_prefix(err, errlen, "adapter_init")
                   : 0;
    }
    sft_rng r;
    sft_rng_init(&r, job->o.seed, TRAIN_LORA_STREAM);
    for (int p = 0; p < LLAMA_NPROJ; p++) {
        if (!job->lora.target[p]) continue;
        size_t out_dim, in_dim;
        llama_proj_dims(cfg, (llama_proj)p, &out_dim, &in_dim);
        double bound = 1.0 / sqrt((double)in_dim);
        size_t count = (size_t)cfg->num_hidden_layers * (size_t)job->lora.r * in_dim;
        for (size_t i = 0; i < count; i++) {
            double u = (double)(sft_rng_next(&r) >> 11) * 0x1p-53;
            job->lora.a[p][i] = (float)((2.0 * u - 1.0) * bound);
        }
    }
    return 0;
}

/* Writes the adapter as PEFT's adapter_model.safetensors (F32). */
static int train_write_adapter(const train_job *job, const char *path, char *err,
                               size_t errlen) {
    const llama_config *cfg = &job->model.cfg;
    size_t cap = 2 * (size_t)cfg->num_hidden_layers * LLAMA_NPROJ, n = 0;
    st_out_tensor *o = calloc(cap, sizeof *o);
    char (*names)[160] = calloc(cap, sizeof *names);
    int rc = -1;
    if (!o || !names) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    size_t r = (size_t)job->lora.r;
    for (int p = 0; p < LLAMA_NPROJ; p++) {
        if (!job->lora.target[p]) continue;
        size_t out_dim, in_dim;
        llama_proj_dims(cfg, (llama_proj)p, &out_dim, &in_dim);
        for (int l = 0; l < cfg->num_hidden_layers; l++)
            for (int b = 0; b < 2; b++) {
                train_lora_name(names[n], sizeof names[n], l, (llama_proj)p, b);
                o[n].name = names[n];
                o[n].dtype = ST_F32;
                o[n].ndim = 2;
                o[n].shape[0] = b ? out_dim : r;
                o[n].shape[1] = b ? r : in_dim;
                o[n].data = b ? job->lora.b[p] + (size_t)l * out_dim * r
                              : job->lora.a[p] + (size_t)l * r * in_dim;
                n++;
            }
    }
    static const char *const meta[] = {"format", "pt", NULL};
    rc = st_write_file(path, o, n, meta, err, errlen);
out:
    free(o);
    free(names);
    return rc;
}

/* Writes adapter_config.json as PEFT saves it for this adapter. */
static int train_write_adapter_config(const train_job *job, const char *path, char *err,
                                      size_t errlen) {
    json_t *targets = json_array();
    for (int p = 0; p < LLAMA_NPROJ && targets; p++)
        if (job->lora.target[p])
            json_array_append_new(targets,
                                  json_string(strchr(llama_proj_module((llama_proj)p), '.') + 1));
    json_t *c = targets ? json_pack("{s:{}, s:n, s:s, s:b, s:b, s:b, s:f, s:f, s:n, s:s, s:i, "
                                    "s:{}, s:o, s:s, s:b}",
                                    "alpha_pattern", "base_model_name_or_path", "bias", "none",
                                    "fan_in_fan_out", 0, "inference_mode", 1,
                                    "init_lora_weights", 1, "lora_alpha", job->o.lora_alpha,
                                    "lora_dropout", job->o.lora_dropout, "modules_to_save",
                                    "peft_type", "LORA", "r", job->lora.r, "rank_pattern",
                                    "target_modules", targets, "task_type", "CAUSAL_LM",
                                    "use_rslora", 0)
                        : NULL;
    char *text = c ? json_dumps(c, JSON_INDENT(2) | JSON_SORT_KEYS) : NULL;
    json_decref(c);
    if (!text) return err_set(err, errlen, "out of memory");
    int rc = util_write_file_atomic(path, text, strlen(text), 0644, err, errlen);
    free(text);
    return rc;
}

/* One named tensor of the model's parameters (a per-layer slice or a
 * global tensor). */
typedef struct {
    char name[96];
    float *data;
    int ndim;
    size_t rows, cols;
    bool decay; /* Hugging Face's Trainer: not for norm weights */
} train_tensor;

/* Lists m's tensors in Hugging Face's names, each layer's separately. *out
 * is malloc'd (caller frees). Returns the count, or 0 when out of memory. */
static size_t train_tensors(const llama_model *m, train_tensor **out) {
    const llama_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, FF = (size_t)c->intermediate_size;
    size_t L = (size_t)c->num_hidden_layers, V = (size_t)c->vocab_size;
    size_t HS = C / (size_t)c->num_attention_heads;
    size_t Q = (size_t)c->num_attention_heads * HS, KV = (size_t)c->num_key_value_heads * HS;
    const llama_weights *w = &m->w;
    const struct {
        const char *name;
        float *base;
        size_t rows, cols; /* cols 0: a vector */
    } per[] = {
        {"input_layernorm.weight", w->attn_norm, C, 0},
        {"self_attn.q_proj.weight", w->wq, Q, C},
        {"self_attn.k_proj.weight", w->wk, KV, C},
        {"self_attn.v_proj.weight", w->wv, KV, C},
        {"self_attn.o_proj.weight", w->wo, C, Q},
        {"post_attention_layernorm.weight", w->mlp_norm, C, 0},
        {"mlp.gate_proj.weight", w->w_gate, FF, C},
        {"mlp.up_proj.weight", w->w_up, FF, C},
        {"mlp.down_proj.weight", w->w_down, C, FF},
    };
    size_t nper = sizeof per / sizeof per[0];
    size_t cap = 3 + L * nper;
    train_tensor *t = calloc(cap, sizeof *t);
    if (!t) return 0;
    size_t n = 0;
    t[n++] = (train_tensor){"model.embed_tokens.weight", w->embed, 2, V, C, true};
    for (size_t l = 0; l < L; l++)
        for (size_t k = 0; k < nper; k++) {
            train_tensor *x = &t[n++];
            snprintf(x->name, sizeof x->name, "model.layers.%zu.%s", l, per[k].name);
            size_t count = per[k].rows * (per[k].cols ? per[k].cols : 1);
            x->data = per[k].base + l * count;
            x->ndim = per[k].cols ? 2 : 1;
            x->rows = per[k].rows;
            x->cols = per[k].cols;
            x->decay = per[k].cols != 0;
        }
    t[n++] = (train_tensor){"model.norm.weight", w->final_norm, 1, C, 0, false};
    if (!c->tie_word_embeddings)
        t[n++] = (train_tensor){"lm_head.weight", w->lm_head, 2, V, C, true};
    *out = t;
    return n;
}

/* Writes m's parameters as a Hugging Face model.safetensors (F32). */
static int train_write_weights(const llama_model *m, const char *path, char *err,
                               size_t errlen) {
    train_tensor *t = NULL;
    size_t n = train_tensors(m, &t);
    st_out_tensor *o = n ? calloc(n, sizeof *o) : NULL;
    if (!o) {
        free(t);
        return err_set(err, errlen, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        o[i].name = t[i].name;
        o[i].dtype = ST_F32;
        o[i].ndim = t[i].ndim;
        o[i].shape[0] = t[i].rows;
        o[i].shape[1] = t[i].cols;
        o[i].data = t[i].data;
    }
    static const char *const meta[] = {"format", "pt", NULL};
    int rc = st_write_file(path, o, n, meta, err, errlen);
    free(o);
    free(t);
    return rc;
}

/* A float as the shortest decimal that reads back as the same float, so
 * config.json says 1e-05, not 9.999999747378752e-06. */
static json_t *train_json_float(float v) {
    char buf[32];
    for (int p = 1; p <= 9; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, (double)v);
        if ((float)strtod(buf, NULL) == v) break;
    }
    return json_real(strtod(buf, NULL));
}

static json_t *train_json_id(int id) { return id >= 0 ? json_integer(id) : json_null(); }

/* Writes config.json for m in Hugging Face's LlamaConfig names. */
static int train_write_config(const llama_config *c, const char *path, char *err,
                              size_t errlen) {
    json_t *cfg = json_pack(
        "{s:[s], s:b, s:o, s:o, s:s, s:i, s:i, s:i, s:s, s:i, s:i, s:i, s:o, s:o, s:n, s:o, "
        "s:b, s:s, s:b, s:i}",
        "architectures", "LlamaForCausalLM", "attention_bias", 0, "bos_token_id",
        train_json_id(c->bos_token_id), "eos_token_id", train_json_id(c->eos_token_id),
        "hidden_act", "silu", "hidden_size", c->hidden_size, "intermediate_size",
        c->intermediate_size, "max_position_embeddings", c->max_position_embeddings,
        "model_type", "llama", "num_attention_heads", c->num_attention_heads,
        "num_hidden_layers", c->num_hidden_layers, "num_key_value_heads",
        c->num_key_value_heads, "pad_token_id", train_json_id(c->pad_token_id), "rms_norm_eps",
        train_json_float(c->rms_norm_eps), "rope_scaling", "rope_theta",
        train_json_float(c->rope_theta), "tie_word_embeddings", c->tie_word_embeddings,
        "torch_dtype", "float32", "use_cache", 1, "vocab_size", c->vocab_size);
    if (!cfg) return err_set(err, errlen, "out of memory");
    char *text = json_dumps(cfg, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(9));
    json_decref(cfg);
    if (!text) return err_set(err, errlen, "out of memory");
    size_t len = strlen(text);
    int rc = util_write_file_atomic(path, text, len, 0644, err, errlen);
    free(text);
    return rc;
}

/* Publishes the file work_dir/name as artifact name and records it. */
static int train_publish(runner_ctx *ctx, const char *name, const char *path, json_t *artifacts,
                         char *err, size_t errlen) {
    if (ctx->add_artifact(ctx, name, path, err, errlen) != 0)
        return err_prefix(err, errlen, "artifact %s", name);
    json_array_append_new(artifacts, json_string(name));
    return 0;
}

/* work_dir/name into out. Returns 0 or -1 when it does not fit. */
static int train_work_path(runner_ctx *ctx, const char *name, char *out, size_t outlen,
                           char *err, size_t errlen) {
    int n = snprintf(out, outlen, "%s/%s", ctx->work_dir, name);
    if (n < 0 || (size_t)n >= outlen) return err_set(err, errlen, "path too long: %s", name);
    return 0;
}

/* Copies the file src to work_dir/name (add_artifact may move what it is
 * given, and the base model's files must stay) and publishes the copy. */
static int train_publish_copy(runner_ctx *ctx, const char *name, const char *src,
                              json_t *artifacts, char *err, size_t errlen) {
    char path[4096], *data = NULL;
    size_t len = 0;
    if (train_work_path(ctx, name, path, sizeof path, err, errlen) != 0) return -1;
    if (util_read_file(src, (size_t)1 << 30, &data, &len, err, errlen) != 0) return -1;
    int rc = util_write_file_atomic(path, data, len, 0644, err, errlen);
    free(data);
    if (rc != 0) return -1;
    return train_publish(ctx, name, path, artifacts, err, errlen);
}

/* Writes and publishes the final model: config.json, model.safetensors and
 * the tokenizer's files (copies: the base model keeps its own). */
static int train_write_outputs(train_job *job, runner_ctx *ctx, json_t *artifacts, char *err,
                               size_t errlen) {
    char path[4096];
    if (job->o.lora) {
        if (train_work_path(ctx, "adapter_config.json", path, sizeof path, err, errlen) != 0 ||
            train_write_adapter_config(job, path, err, errlen) != 0 ||
            train_publish(ctx, "adapter_config.json", path, artifacts, err, errlen) != 0)
            return -1;
        if (train_work_path(ctx, "adapter_model.safetensors", path, sizeof path, err, errlen) !=
                0 ||
            train_write_adapter(job, path, err, errlen) != 0 ||
            train_publish(ctx, "adapter_model.safetensors", path, artifacts, err, errlen) != 0)
            return -1;
    } else {
        if (train_work_path(ctx, "config.json", path, sizeof path, err, errlen) != 0 ||
            train_write_config(&job->model.cfg, path, err, errlen) != 0 ||
            train_publish(ctx, "config.json", path, artifacts, err, errlen) != 0)
            return -1;
        if (train_work_path(ctx, "model.safetensors", path, sizeof path, err, errlen) != 0 ||
            train_write_weights(&job->model, path, err, errlen) != 0 ||
            train_publish(ctx, "model.safetensors", path, artifacts, err, errlen) != 0)
            return -1;
    }
    if (job->tok_file[0])
        return train_publish_copy(ctx, "tokenizer.json", job->tok_file, artifacts, err, errlen);
    static const char *const names[] = {"tokenizer.json", "tokenizer_config.json",
                                        "special_tokens_map.json"};
    for (size_t i = 0; i < sizeof names / sizeof names[0] && job->tok_dir[0]; i++) {
        int n = snprintf(path, sizeof path, "%s/%s", job->tok_dir, names[i]);
        if (n < 0 || (size_t)n >= sizeof path || access(path, R_OK) != 0) continue;
        if (train_publish_copy(ctx, names[i], path, artifacts, err, errlen) != 0) return -1;
    }
    return 0;
}

/* On a GPU: downloads the trained parameters (the device's master copy)
 * into the host's (model.params or lora_params) and, with moments, AdamW's
 * moments into the host optimizer, so that the writers, which read the
 * host copies, save what the device holds. Nothing on the CPU. Returns 0,
 * or -1 with err set (an asynchronous device failure). */
static int train_to_host(train_job *job, bool moments, char *err, size_t errlen) {
    if (!job->dev.on_gpu) return 0;
    const backend *be = job->dev.be;
    be->download(job->train_params, job->d_train, job->n_train * sizeof(float));
    if (moments) {
        float *m, *v;
        adamw_moments(job->opt, &m, &v);
        size_t bytes = adamw_trainable(job->opt) * sizeof(float);
        be->download(m, job->d_m, bytes);
        be->download(v, job->d_v, bytes);
    }
    return runner_device_sync(&job->dev, err, errlen);
}

/* Writes and publishes checkpoint-{step}-*: parameters, optimizer state and
 * the trainer state (data position, losses so far); on a GPU from what the
 * device holds (the only time a run moves them to the host). */
static int train_checkpoint(train_job *job, runner_ctx *ctx, int64_t step, sft_pos pos,
                            json_t *artifacts, char *err, size_t errlen) {
    char name[128], path[4096];
    if (train_to_host(job, true, err, errlen) != 0)
        return err_prefix(err, errlen, "checkpoint of step %lld", (long long)step);
    snprintf(name, sizeof name, "checkpoint-%lld-%s.safetensors", (long long)step,
             job->o.lora ? "adapter_model" : "model");
    if (train_work_path(ctx, name, path, sizeof path, err, errlen) != 0 ||
        (job->o.lora ? train_write_adapter(job, path, err, errlen)
                     : train_write_weights(&job->model, path, err, errlen)) != 0 ||
        train_publish(ctx, name, path, artifacts, err, errlen) != 0)
        return -1;

    snprintf(name, sizeof name, "checkpoint-%lld-optimizer.bin", (long long)step);
    if (train_work_path(ctx, name, path, sizeof path, err, errlen) != 0) return -1;
    FILE *f = fopen(path, "wb");
    if (!f) return err_set(err, errlen, "create %s: %s", path, strerror(errno));
    int rc = adamw_write_file(job->opt, f, err, errlen);
    if (rc == 0 && (fflush(f) != 0 || fsync(fileno(f)) != 0)) {
        err_set(err, errlen, "write %s: %s", path, strerror(errno));
        rc = -1;
    }
    if (fclose(f) != 0 && rc == 0) {
        err_set(err, errlen, "write %s: %s", path, strerror(errno));
        rc = -1;
    }
    if (rc != 0 || train_publish(ctx, name, path, artifacts, err, errlen) != 0) return -1;

    snprintf(name, sizeof name, "checkpoint-%lld-trainer_state.json", (long long)step);
    json_t *state = json_pack("{s:I, s:I, s:I, s:I, s:O, s:O, s:O}", "step", (json_int_t)step,
                              "epoch", (json_int_t)pos.epoch, "cursor", (json_int_t)pos.cursor,
                              "seed", (json_int_t)job->o.seed, "losses", job->losses,
                              "learning_rates", job->lrs, "grad_norms", job->norms);
    /* fp16 loss scaling's state, so a resumed run scales as this one would */
    if (state && (job->scaling || job->skipped > 0))
        json_object_set_new(state, "skipped_steps", json_integer((json_int_t)job->skipped));
    if (state && job->scaling) {
        json_object_set_new(state, "loss_scale", json_real(job->loss_scale));
        json_object_set_new(state, "scale_clean_steps", json_integer((json_int_t)job->scale_clean));
    }
    char *text = state ? json_dumps(state, JSON_COMPACT) : NULL;
    json_decref(state);
    if (!text) return err_set(err, errlen, "out of memory");
    rc = train_work_path(ctx, name, path, sizeof path, err, errlen);
    if (rc == 0) rc = util_write_file_atomic(path, text, strlen(text), 0644, err, errlen);
    free(text);
    if (rc != 0 || train_publish(ctx, name, path, artifacts, err, errlen) != 0) return -1;
    json_array_append_new(job->checkpoints, json_integer(step));
    return 0;
}

/* The optimizer over every parameter, norm weights without decay. Adjacent
 * tensors with the same decay share one range. */
static int train_make_optimizer(train_job *job, char *err, size_t errlen) {
    if (job->o.lora) {
        /* A and B are linear weights: decayed, as the Trainer decays them */
        adamw_range all = {0, job->lora.nparams, true};
        return adamw_new(&job->o.adam, &all, 1, &job->opt, err, errlen);
    }
    train_tensor *t = NULL;
    size_t n = train_tensors(&job->model, &t);
    adamw_range *r = n ? calloc(n, sizeof *r) : NULL;
    if (!r) {
        free(t);
        return err_set(err, errlen, "out of memory");
    }
    /* model.h's one allocation holds the tensors in train_tensors' order
     * except that each per-layer kind is stacked over layers: sort by offset. */
    size_t nr = 0;
    for (size_t i = 0; i < n; i++) {
        r[nr].offset = (size_t)(t[i].data - job->model.params);
        r[nr].count = t[i].rows * (t[i].cols ? t[i].cols : 1);
        r[nr].decay = t[i].decay;
        nr++;
    }
    for (size_t i = 1; i < nr; i++) { /* insertion sort: few hundred ranges */
        adamw_range v = r[i];
        size_t j = i;
        while (j > 0 && r[j - 1].offset > v.offset) {
            r[j] = r[j - 1];
            j--;
        }
        r[j] = v;
    }
    size_t m = 0;
    for (size_t i = 0; i < nr; i++) {
        if (m > 0 && r[m - 1].decay == r[i].decay && r[m - 1].offset + r[m - 1].count == r[i].offset)
            r[m - 1].count += r[i].count;
        else
            r[m++] = r[i];
    }
    int rc = adamw_new(&job->o.adam, r, m, &job->opt, err, errlen);
    free(r);
    free(t);
    return rc;
}

/* Reads the full model's parameters from a checkpoint's model.safetensors
 * (every tensor train_tensors names, with its shape, and nothing else). */
static int train_read_weights(llama_model *m, const char *path, char *err, size_t errlen) {
    train_tensor *t = NULL;
    size_t n = train_tensors(m, &t);
    if (n == 0) return err_set(err, errlen, "out of memory");
    st_file f;
    if (st_open(path, &f, err, errlen) != 0) {
        free(t);
        return -1;
    }
    int rc = -1;
    for (size_t i = 0; i < n; i++) {
        const st_tensor *x = st_find(&f, t[i].name);
        if (!x) {
            err_set(err, errlen, "%s: no tensor %s", path, t[i].name);
            goto out;
        }
        if (x->ndim != t[i].ndim || x->shape[0] != t[i].rows ||
            (t[i].ndim == 2 && x->shape[1] != t[i].cols)) {
            err_set(err, errlen, "%s: tensor %s has another shape than the model's", path,
                    t[i].name);
            goto out;
        }
        if (st_to_f32(&f, x, t[i].data, err, errlen) != 0) goto out;
    }
    if (f.ntensors != n) {
        err_set(err, errlen, "%s: %zu tensors, the model has %zu", path, f.ntensors, n);
        goto out;
    }
    rc = 0;
out:
    st_close(&f);
    free(t);
    return rc;
}

/* Copies the first n numbers of the state's array key into *dst (replacing
 * it). Returns 0, or -1 with err when the array is missing or short. */
static int train_state_series(json_t *state, const char *key, int64_t n, json_t **dst,
                              const char *path, char *err, size_t errlen) {
    json_t *a = json_object_get(state, key);
    if (!json_is_array(a) || json_array_size(a) < (size_t)n)
        return err_set(err, errlen, "%s: %s must list the %lld steps taken", path, key,
                       (long long)n);
    json_t *copy = json_array();
    for (int64_t i = 0; copy && i < n; i++) {
        json_t *v = json_array_get(a, (size_t)i);
        if (!json_is_number(v)) {
            json_decref(copy);
            return err_set(err, errlen, "%s: %s[%lld] is not a number", path, key, (long long)i);
        }
        json_array_append_new(copy, json_real(json_number_value(v)));
    }
    if (!copy) return err_set(err, errlen, "out of memory");
    json_decref(*dst);
    *dst = copy;
    return 0;
}

/* Continues from the checkpoint of step in dir (files named as
 * train_checkpoint publishes them): the parameters (model or adapter), the
 * optimizer state, the trainer state's data position and the series so far.
 * A checkpoint of another spec (seed, shapes, optimizer ranges, more steps
 * than this run has) is refused. Returns 0 with *pos set, or -1 with err. */
static int train_resume(train_job *job, const char *dir, int64_t step, int64_t total,
                        sft_pos *pos, char *err, size_t errlen) {
    char path[4200];
    if (step > total)
        return err_set(err, errlen, "checkpoint of step %lld is past this run's %lld steps",
                       (long long)step, (long long)total);
    snprintf(path, sizeof path, "%s/checkpoint-%lld-trainer_state.json", dir, (long long)step);
    json_error_t jerr;
    json_t *state = json_load_file(path, 0, &jerr);
    if (!state) return err_set(err, errlen, "%s: %s", path, jerr.text);
    int rc = -1;
    json_t *v;
    if (!json_is_integer(v = json_object_get(state, "step")) || json_integer_value(v) != step) {
        err_set(err, errlen, "%s: step is not %lld", path, (long long)step);
        goto out;
    }
    if (!json_is_integer(v = json_object_get(state, "seed")) ||
        (uint64_t)json_integer_value(v) != job->o.seed) {
        err_set(err, errlen, "%s: written with another seed", path);
        goto out;
    }
    json_t *epoch = json_object_get(state, "epoch"), *cursor = json_object_get(state, "cursor");
    if (!json_is_integer(epoch) || json_integer_value(epoch) < 0 || !json_is_integer(cursor) ||
        json_integer_value(cursor) < 0) {
        err_set(err, errlen, "%s: epoch and cursor must be integers >= 0", path);
        goto out;
    }
    pos->epoch = (uint64_t)json_integer_value(epoch);
    pos->cursor = (uint64_t)json_integer_value(cursor);
    v = json_object_get(state, "skipped_steps");
    if (v && (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > step)) {
        err_set(err, errlen, "%s: skipped_steps must be an integer from 0 to %lld", path,
                (long long)step);
        goto out;
    }
    job->skipped = v ? (int64_t)json_integer_value(v) : 0;
    json_t *ls = json_object_get(state, "loss_scale"), *clean = json_object_get(state, "scale_clean_steps");
    if (job->scaling && ls) {
        if (!json_is_number(ls) || !(json_number_value(ls) > 0) || !json_is_integer(clean) ||
            json_integer_value(clean) < 0) {
            err_set(err, errlen, "%s: loss_scale must be a positive number with "
                    "scale_clean_steps an integer >= 0", path);
            goto out;
        }
        job->loss_scale = json_number_value(ls);
        job->scale_clean = (int64_t)json_integer_value(clean);
    }
    if (train_state_series(state, "losses", step, &job->losses, path, err, errlen) != 0 ||
        train_state_series(state, "learning_rates", step, &job->lrs, path, err, errlen) != 0 ||
        train_state_series(state, "grad_norms", step, &job->norms, path, err, errlen) != 0)
        goto out;

    snprintf(path, sizeof path, "%s/checkpoint-%lld-%s.safetensors", dir, (long long)step,
             job->o.lora ? "adapter_model" : "model");
    if ((job->o.lora ? train_adapter_weights(job, path, err, errlen)
                     : train_read_weights(&job->model, path, err, errlen)) != 0)
        goto out;

    snprintf(path, sizeof path, "%s/checkpoint-%lld-optimizer.bin", dir, (long long)step);
    FILE *f = fopen(path, "rb");
    if (!f) {
        err_set(err, errlen, "open %s: %s", path, strerror(errno));
        goto out;
    }
    int orc = adamw_read_file(job->opt, f, err, errlen);
    fclose(f);
    if (orc != 0) {
        err_prefix(err, errlen, "%s", path);
        goto out;
    }
    /* fp16 steps skipped for inf/NaN gradients never reached the optimizer */
    if (adamw_steps(job->opt) != step - job->skipped) {
        err_set(err, errlen, "%s: the optimizer has taken %lld steps, not %lld", path,
                (long long)adamw_steps(job->opt), (long long)(step - job->skipped));
        goto out;
    }
    for (int64_t k = job->o.save_steps; job->o.save_steps > 0 && k <= step; k += job->o.save_steps)
        json_array_append_new(job->checkpoints, json_integer(k));
    rc = 0;
out:
    json_decref(state);
    return rc;
}

/* fp16 loss scaling's bookkeeping once a step's gradients were checked
 * (torch.cuda.amp.GradScaler's): an overflow skips the step and halves the
 * scale; otherwise *unscale gets the factor that undoes this step's scale
 * (a power of two, so multiplying by it is exact) and the scale doubles
 * after TRAIN_SCALE_GROWTH_INTERVAL clean steps in a row. Returns whether
 * the optimizer steps. Without loss scaling: true, *unscale 1. */
static bool train_scaler(train_job *job, runner_ctx *ctx, int64_t k, bool overflow,
                         float *unscale) {
    *unscale = 1.0f;
    if (!job->scaling) return true;
    if (overflow) {
        /* no update, a smaller scale; the step still counts (data,
         * schedule) and reports grad_norm 0 */
        job->skipped++;
        job->loss_scale /= 2;
        job->scale_clean = 0;
        runner_logf(ctx, "step %lld: fp16 gradients overflowed; step skipped, loss scale now %g",
                    (long long)k + 1, job->loss_scale);
        return false;
    }
    *unscale = (float)(1.0 / job->loss_scale);
    if (++job->scale_clean >= TRAIN_SCALE_GROWTH_INTERVAL) {
        job->loss_scale *= 2;
        job->scale_clean = 0;
    }
    return true;
}

/* The optimizer step on the CPU: clip the host gradients, AdamW on the
 * host parameters. *norm gets the pre-clip norm. Returns 0, or -1 with err
 * when the norm is not finite (the loss diverged). */
static int train_step_cpu(train_job *job, int64_t k, double lr, double *norm, char *err,
                          size_t errlen) {
    *norm = adamw_clip_grad_norm(job->opt, job->grads, job->o.max_grad_norm);
    if (!isfinite(*norm))
        return err_set(err, errlen, "step %lld: gradient norm is %g (the loss diverged)",
                       (long long)k + 1, *norm);
    adamw_step(job->opt, job->train_params, job->grads, lr);
    return 0;
}

/* The CUDA stream the optimizer's kernels run on: the backend's own, so
 * they run after the gradient passes queued before them and before the
 * backend's next copy or kernel, with no host wait. */
static void *train_gpu_stream(void) { return cuda_backend_stream(); }

/* On a GPU: the sum of squares of the trainable gradients in double and
 * whether any is inf or NaN, reduced on the device over every range and
 * downloaded in one TRAIN_GPU_NORM_BYTES copy. Returns 0, or -1 with err
 * (a refused launch, an asynchronous device failure). */
static int train_gpu_sumsq(train_job *job, double *sumsq, bool *nonfinite, char *err,
                           size_t errlen) {
    const backend *be = job->dev.be;
    size_t nr = 0;
    const adamw_range *r = adamw_ranges(job->opt, &nr);
    double *d_sum = (double *)(void *)job->d_norm;
    int *d_flag = (int *)(void *)(job->d_norm + 2);
    be->zero(job->d_norm, TRAIN_GPU_NORM_BYTES / sizeof(float));
    for (size_t i = 0; i < nr; i++)
        if (cuk_sumsq(d_sum, d_flag, job->d_grads + r[i].offset, r[i].count, train_gpu_stream(),
                      err, errlen) != 0)
            return err_prefix(err, errlen, "gradient norm");
    unsigned char host[TRAIN_GPU_NORM_BYTES];
    be->download(host, job->d_norm, sizeof host);
    job->step_bytes += sizeof host;
    if (runner_device_sync(&job->dev, err, errlen) != 0) return -1;
    int flag;
    memcpy(sumsq, host, sizeof *sumsq);
    memcpy(&flag, host + 2 * sizeof(float), sizeof flag);
    *nonfinite = flag != 0;
    return 0;
}

/* The optimizer step on a GPU, with nothing but the norm crossing to the
 * host: the gradients' sum of squares decides the fp16 skip, the norm and
 * the clip coefficient on the host exactly as adamw_clip_grad_norm would
 * (the unscale is a power of two, so scaling the root in double equals
 * the root of unscaled squares, and one multiplication by unscale * coef
 * rounds as unscaling then clipping does); then one cuk_adamw per range
 * with adamw_begin_step's scalars and adamw_range_decay's factor, and a
 * fully trained model's low-precision copy refreshed on the device.
 * *norm gets the pre-clip norm (0 for a skipped step). Returns 0, or -1
 * with err (the loss diverged, a refused launch, a device failure). */
static int train_step_gpu(train_job *job, runner_ctx *ctx, int64_t k, double lr, double *norm,
                          char *err, size_t errlen) {
    double sumsq = 0;
    bool nonfinite = false;
    float unscale;
    *norm = 0;
    if (train_gpu_sumsq(job, &sumsq, &nonfinite, err, errlen) != 0)
        return err_prefix(err, errlen, "step %lld", (long long)k + 1);
    if (!train_scaler(job, ctx, k, nonfinite, &unscale)) return 0;
    double total = sqrt(sumsq) * (double)unscale;
    if (nonfinite && isfinite(total)) total = NAN;
    if (!isfinite(total))
        return err_set(err, errlen, "step %lld: gradient norm is %g (the loss diverged)",
                       (long long)k + 1, total);
    float grad_scale = unscale * adamw_clip_coef(total, job->o.max_grad_norm);
    adamw_scalars s = adamw_begin_step(job->opt, lr);
    size_t nr = 0, packed = 0;
    const adamw_range *r = adamw_ranges(job->opt, &nr);
    for (size_t i = 0; i < nr; i++) {
        if (cuk_adamw(job->d_train + r[i].offset, job->d_grads + r[i].offset, job->d_m + packed,
                      job->d_v + packed, r[i].count, grad_scale,
                      adamw_range_decay(job->opt, i, &s), s.beta1, s.one_minus_beta1, s.beta2,
                      s.one_minus_beta2, s.neg_step_size, s.bias_correction2_sqrt, s.eps,
                      train_gpu_stream(), err, errlen) != 0)
            return err_prefix(err, errlen, "step %lld: AdamW", (long long)k + 1);
        packed += r[i].count;
    }
    if (!job->o.lora) {
        char why[ERR_LEN];
        if (cuda_backend_register_weights(job->dmodel.params, job->dmodel.nparams, why,
                                          sizeof why) != 0)
            runner_logf(ctx, "no %s copy of the updated weights (%s)",
                        cuda_precision_name(job->dev.precision), why);
    }
    *norm = total;
    return 0;
}

/* On a GPU: the optimizer's device state, its moments zero or (after a
 * resume) uploaded from the host optimizer, and the norm's scratch. Logs
 * what lives where and what a step moves. Returns 0, or -1 with err
 * (*retryable when the GPU is out of memory). */
static int train_gpu_optimizer(train_job *job, runner_ctx *ctx, bool *retryable, char *err,
                               size_t errlen) {
    const backend *be = job->dev.be;
    size_t n = adamw_trainable(job->opt), bytes = n * sizeof(float);
    job->d_m = be->alloc(bytes, err, errlen);
    job->d_v = job->d_m ? be->alloc(bytes, err, errlen) : NULL;
    job->d_norm = job->d_v ? be->alloc(TRAIN_GPU_NORM_BYTES, err, errlen) : NULL;
    if (!job->d_norm) {
        *retryable = runner_err_is_oom(err);
        return err_prefix(err, errlen, "AdamW moments on GPU %d", job->dev.gpu);
    }
    if (adamw_steps(job->opt) > 0) {
        float *m, *v;
        adamw_moments(job->opt, &m, &v);
        be->upload(job->d_m, m, bytes);
        be->upload(job->d_v, v, bytes);
    } else {
        be->zero(job->d_m, n);
        be->zero(job->d_v, n);
    }
    runner_logf(ctx,
                "optimizer: AdamW on GPU %d (fp32 master weights and moments of %zu "
                "parameters on the device); a step moves %d bytes to the host",
                job->dev.gpu, n, TRAIN_GPU_NORM_BYTES);
    return 0;
}

/* Points the passes at the host objects (CPU) or, on a GPU, places the
 * model, the adapter and the gradients in device memory from the host
 * copies as they are now (after a resume), and registers the model's
 * weights for low-precision products. fp16 on a GPU turns on loss scaling
 * (its state from a resumed checkpoint when train_resume set one). Returns
 * 0, or -1 with err set (*retryable when the GPU is out of memory). */
static int train_to_device(train_job *job, runner_ctx *ctx, bool *retryable, char *err,
                           size_t errlen) {
    job->fwd = &job->model;
    job->fwd_lora = &job->lora;
    job->fwd_grads = job->grads;
    if (!job->dev.on_gpu) return 0;
    const backend *be = job->dev.be;
    /* Under LoRA the base model is frozen: in bf16/fp16 its projections
     * live on the device in that precision only, already covered. */
    if ((job->o.lora ? llama_model_to_backend_frozen(be, &job->model, &job->dmodel, err, errlen)
                     : llama_model_to_backend(be, &job->model, &job->dmodel, err, errlen)) != 0) {
        *retryable = runner_err_is_oom(err);
        return err_prefix(err, errlen, "model to GPU %d", job->dev.gpu);
    }
    job->dmodel_ready = true;
    job->fwd = &job->dmodel;
    char why[ERR_LEN];
    if (!job->o.lora &&
        cuda_backend_register_weights(job->dmodel.params, job->dmodel.nparams, why,
                                      sizeof why) != 0)
        runner_logf(ctx, "no %s copy of the weights (%s): products convert them as they go",
                    cuda_precision_name(job->dev.precision), why);
    size_t bytes = job->n_train * sizeof(float);
    job->d_grads = be->alloc(bytes, err, errlen);
    if (!job->d_grads) {
        *retryable = runner_err_is_oom(err);
        return err_prefix(err, errlen, "gradients on GPU %d", job->dev.gpu);
    }
    job->fwd_grads = job->d_grads;
    if (job->o.lora) {
        job->d_lora_params = be->alloc(bytes, err, errlen);
        if (!job->d_lora_params) {
            *retryable = runner_err_is_oom(err);
            return err_prefix(err, errlen, "adapter on GPU %d", job->dev.gpu);
        }
        be->upload(job->d_lora_params, job->lora_params, bytes);
        if (llama_lora_bind(&job->dlora, &job->model.cfg, job->lora.r, job->lora.scaling,
                            job->lora.target, job->d_lora_params, err, errlen) != 0)
            return -1;
        job->dlora.dropout = job->lora.dropout;
        job->dlora.dropout_seed = job->lora.dropout_seed;
        job->fwd_lora = &job->dlora;
    }
    job->d_train = job->o.lora ? job->d_lora_params : job->dmodel.params;
    if (train_gpu_optimizer(job, ctx, retryable, err, errlen) != 0) return -1;
    if (job->scaling)
        runner_logf(ctx, "fp16: loss scale %g (halved on inf/NaN gradients, doubled after %d "
                    "clean steps)", job->loss_scale, TRAIN_SCALE_GROWTH_INTERVAL);
    if (runner_device_sync(&job->dev, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        return -1;
    }
    return 0;
}

/* The training loop; see train.h. */
static int train_loop(train_job *job, runner_ctx *ctx, json_t *artifacts, int64_t start,
                      sft_pos start_pos, int64_t total, size_t *tokens_out, bool *retryable,
                      bool *cancelled, char *err, size_t errlen) {
    const backend *be = job->dev.be;
    sft_loader loader;
    sft_step step;
    memset(&loader, 0, sizeof loader);
    memset(&step, 0, sizeof step);
    int rc = -1;
    sft_loader_opts lo = {job->o.seed, job->o.batch_size, job->o.grad_accum, true,
                          sft_pad_id(job->tok)};
    sched sch = {job->o.sched, 0, total};
    if (sched_warmup_steps(job->o.warmup_steps, job->o.warmup_ratio, total, &sch.warmup_steps,
                           err, errlen) != 0 ||
        sched_check(&sch, err, errlen) != 0)
        goto out;
    if (sft_loader_init(&loader, &job->set, &lo, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        goto out;
    }
    if (start > 0 && sft_loader_seek(&loader, start_pos, err, errlen) != 0) {
        err_prefix(err, errlen, "checkpoint of step %lld", (long long)start);
        goto out;
    }
    size_t tokens = 0;
    double started = util_now_seconds();
    for (int64_t k = start; k < total; k++) {
        if (sft_loader_next(&loader, &step, err, errlen) != 0) {
            *retryable = runner_err_is_oom(err);
            goto out;
        }
        if (step.n_label == 0) {
            err_set(err, errlen,
                    "step %lld: no token to learn from (every label is masked; raise cutoff_len)",
                    (long long)k + 1);
            goto out;
        }
        if (job->dev.on_gpu)
            be->zero(job->d_grads, job->n_train);
        else
            memset(job->grads, 0, job->n_train * sizeof *job->grads);
        /* fp16 multiplies the loss (so its small gradients stay representable)
         * and divides the gradients back before clipping */
        double scale = 1.0 / (double)step.n_label * (job->scaling ? job->loss_scale : 1.0);
        double loss_sum = 0;
        long counted = 0;
        for (size_t b = 0; b < step.n_mb; b++) {
            if (ctx->cancel && atomic_load(ctx->cancel)) {
                *cancelled = true;
                err_set(err, errlen, "cancelled");
                goto out;
            }
            const sft_batch *mb = &step.mb[b];
            for (size_t i = 0; i < mb->rows; i++) job->lens[i] = (int)mb->lens[i];
            double ls = 0;
            long nc = 0;
            job->fwd_lora->dropout_counter =
                (uint64_t)k * (uint64_t)job->o.grad_accum + (uint64_t)b;
            int lrc =
                job->o.lora
                    ? llama_lora_loss_and_grad(be, job->fwd, job->fwd_lora, &job->state,
                                               mb->input_ids, mb->labels, job->lens, (int)mb->rows,
                                               (int)mb->seq_len, scale, job->fwd_grads, &ls, &nc,
                                               err, errlen)
                    : llama_loss_and_grad(be, job->fwd, &job->state, mb->input_ids, mb->labels,
                                          job->lens, (int)mb->rows, (int)mb->seq_len, scale,
                                          job->fwd_grads, &ls, &nc, err, errlen);
            if (lrc == 0) lrc = runner_device_sync(&job->dev, err, errlen);
            if (lrc != 0) {
                *retryable = runner_err_is_oom(err);
                err_prefix(err, errlen, "step %lld", (long long)k + 1);
                goto out;
            }
            loss_sum += ls;
            counted += nc;
        }
        double lr = job->o.lr * sched_lambda(&sch, k), norm = 0;
        int src = job->dev.on_gpu ? train_step_gpu(job, ctx, k, lr, &norm, err, errlen)
                                  : train_step_cpu(job, k, lr, &norm, err, errlen);
        if (src != 0) {
            *retryable = runner_err_is_oom(err);
            goto out;
        }
        double loss = counted > 0 ? loss_sum / (double)counted : 0.0;
        tokens += step.n_tokens;
        json_array_append_new(job->losses, json_real(loss));
        json_array_append_new(job->lrs, json_real(lr));
        json_array_append_new(job->norms, json_real(norm));
        if (ctx->metric) {
            ctx->metric(ctx, "loss", k + 1, loss);
            ctx->metric(ctx, "learning_rate", k + 1, lr);
            ctx->metric(ctx, "grad_norm", k + 1, norm);
        }
        double elapsed = util_now_seconds() - started;
        double tps = elapsed > 0 ? (double)tokens / elapsed : 0.0;
        char message[128];
        snprintf(message, sizeof message, "step %lld/%lld, loss %.4f, %.0f tokens/s",
                 (long long)k + 1, (long long)total, loss, tps);
        if (ctx->progress) ctx->progress(ctx, k + 1, total, message);
        runner_logf(ctx, "step %lld/%lld: loss %.6f, lr %.3e, grad norm %.4f, epoch %llu, %.0f tokens/s",
                  (long long)k + 1, (long long)total, loss, lr, norm,
                  (unsigned long long)step.epoch, tps);
        if (job->o.save_steps > 0 && (k + 1) % job->o.save_steps == 0 &&
            train_checkpoint(job, ctx, k + 1, sft_loader_pos(&loader), artifacts, err, errlen) !=
                0) {
            *retryable = true;
            goto out;
        }
    }
    *tokens_out = tokens;
    rc = 0;
out:
    sft_step_free(&step);
    sft_loader_free(&loader);
    return rc;
}

int train_run(json_t *spec, runner_ctx *ctx, json_t **result, bool *retryable, bool *cancelled,
              char *err, size_t errlen) {
    train_job job;
    memset(&job, 0, sizeof job);
    json_t *artifacts = json_array(), *out = NULL;
    int rc = -1;
    double started = util_now_seconds();
    *result = NULL;
    *retryable = false;
    *cancelled = false;
    job.losses = json_array();
    job.lrs = json_array();
    job.norms = json_array();
    job.checkpoints = json_array();
    if (!artifacts || !job.losses || !job.lrs || !job.norms || !job.checkpoints) {
        *retryable = true;
        err_set(err, errlen, "out of memory");
        goto out;
    }
    if (train_options(&job.o, spec, err, errlen) != 0) goto out;
    if (train_load_model(&job, spec, ctx, retryable, err, errlen) != 0 ||
        train_load_data(&job, spec, ctx, retryable, err, errlen) != 0)
        goto out;
    if (job.o.lora && train_make_lora(&job, spec, ctx, retryable, err, errlen) != 0) goto out;
    job.train_params = job.o.lora ? job.lora_params : job.model.params;
    job.n_train = job.o.lora ? job.lora.nparams : job.model.nparams;

    size_t spe = 0, total = 0;
    if (sft_plan(job.set.n, job.o.batch_size, job.o.grad_accum, 1, 0, &spe, &total, err,
                 errlen) != 0)
        goto out;
    int64_t steps = job.o.max_steps > 0 ? job.o.max_steps
                                        : (int64_t)ceil(job.o.epochs * (double)spe);
    if (steps < 1) steps = 1;
    size_t longest = 0;
    for (size_t i = 0; i < job.set.n; i++)
        if (job.set.off[i + 1] - job.set.off[i] > longest)
            longest = job.set.off[i + 1] - job.set.off[i];
    job.grads = calloc(job.n_train, sizeof *job.grads);
    job.lens = calloc(job.o.batch_size, sizeof *job.lens);
    if (!job.grads || !job.lens) {
        *retryable = true;
        err_set(err, errlen, "out of memory for the gradients (%zu floats)", job.n_train);
        goto out;
    }
    if (runner_device_open(ctx, spec, &job.dev, err, errlen) != 0) goto out;
    job.dev_open = true;
    job.scaling = job.dev.on_gpu && job.dev.precision == CUDA_FP16;
    job.loss_scale = TRAIN_SCALE_INIT;
    if (llama_state_init_train(&job.state, job.dev.be, &job.model.cfg, (int)job.o.batch_size,
                               (int)longest, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        goto out;
    }
    job.state_ready = true;
    if (train_make_optimizer(&job, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        goto out;
    }
    const llama_config *cfg = &job.model.cfg;
    runner_logf(ctx,
              "train: %s, %zu examples (%zu truncated, %zu labels), %lld steps "
              "(%zu per epoch), batch %zu x %zu, longest %zu tokens, model C=%d L=%d V=%d, "
              "%zu trainable parameters",
              job.o.lora ? "LoRA" : "full fine-tuning", job.set.n, job.set.n_truncated,
              job.set.n_label, (long long)steps, spe,
              job.o.batch_size, job.o.grad_accum, longest, cfg->hidden_size,
              cfg->num_hidden_layers, cfg->vocab_size, adamw_trainable(job.opt));
    int64_t resumed = 0;
    sft_pos pos = {0, 0};
    if (ctx->resolve_checkpoint) {
        char dir[4096];
        if (ctx->resolve_checkpoint(ctx, dir, sizeof dir, &resumed, err, errlen) != 0) {
            *retryable = true;
            err_prefix(err, errlen, "checkpoint");
            goto out;
        }
        if (resumed > 0) {
            if (train_resume(&job, dir, resumed, steps, &pos, err, errlen) != 0) {
                *retryable = runner_err_is_oom(err);
                err_prefix(err, errlen, "resume");
                goto out;
            }
            runner_logf(ctx, "train: resumed from checkpoint step %lld (epoch %llu, cursor %llu)",
                      (long long)resumed, (unsigned long long)pos.epoch,
                      (unsigned long long)pos.cursor);
        }
    }
    if (train_to_device(&job, ctx, retryable, err, errlen) != 0) goto out;
    size_t tokens = 0;
    double loop_start = util_now_seconds();
    if (train_loop(&job, ctx, artifacts, resumed, pos, steps, &tokens, retryable, cancelled, err,
                   errlen) != 0)
        goto out;
    double loop_seconds = util_now_seconds() - loop_start;
    if (job.dev.on_gpu)
        runner_logf(ctx, "optimizer: %lld steps moved %llu bytes between host and GPU",
                    (long long)(steps - resumed), (unsigned long long)job.step_bytes);
    if (train_to_host(&job, false, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        goto out;
    }
    if (train_write_outputs(&job, ctx, artifacts, err, errlen) != 0) {
        *retryable = true;
        goto out;
    }
    size_t nl = json_array_size(job.losses);
    double final_loss = nl ? json_real_value(json_array_get(job.losses, nl - 1)) : 0.0;
    out = json_pack("{s:s, s:s, s:I, s:I, s:I, s:I, s:O, s:O, s:O, s:f, s:I, s:I, s:f, s:f, "
                    "s:O, s:O}",
                    "method", job.o.lora ? "lora" : "full", "mode", job.o.mode == SFT_MODE_SFT ? "sft" : "pretrain",
                    "examples", (json_int_t)job.set.n, "truncated",
                    (json_int_t)job.set.n_truncated, "steps", (json_int_t)steps,
                    "steps_per_epoch", (json_int_t)spe, "losses", job.losses, "learning_rates",
                    job.lrs, "grad_norms", job.norms, "final_loss", final_loss,
                    "trainable_parameters", (json_int_t)adamw_trainable(job.opt), "tokens",
                    (json_int_t)tokens, "seconds", util_now_seconds() - started,
                    "tokens_per_second", loop_seconds > 0 ? (double)tokens / loop_seconds : 0.0,
                    "checkpoints", job.checkpoints, "artifacts", artifacts);
    if (out) json_object_set_new(out, "resumed_from", json_integer(resumed));
    if (out) json_object_set_new(out, "device", json_string(job.dev.on_gpu ? "cuda" : "cpu"));
    if (out)
        json_object_set_new(out, "precision",
                            json_string(cuda_precision_name(job.dev.precision)));
    if (out && (job.scaling || job.skipped > 0))
        json_object_set_new(out, "skipped_steps", json_integer((json_int_t)job.skipped));
    if (out && job.o.mode == SFT_MODE_SFT)
        json_object_set_new(out, "template", json_string(tmpl_name(job.o.tmpl)));
    if (!out) {
        *retryable = true;
        err_set(err, errlen, "out of memory");
        goto out;
    }
    runner_logf(ctx, "train: %lld steps, final loss %.6f, %zu tokens in %.3f s", (long long)steps,
              final_loss, tokens, loop_seconds);
    *result = out;
    rc = 0;
out:
    if (rc != 0 && ctx->cancel && atomic_load(ctx->cancel)) *cancelled = true;
    train_job_free(&job);
    json_decref(artifacts);
    return rc;
}

bool train_checkpoint_name(const char *name, int64_t *step, const char **rest) {
    static const char prefix[] = "checkpoint-";
    size_t n = sizeof prefix - 1;
    if (strncmp(name, prefix, n) != 0) return false;
    const char *digits = name + n, *dash = strchr(digits, '-');
    if (!dash || dash == digits || dash - digits > 18 || digits[0] == '0' || dash[1] == '\0')
        return false;
    int64_t v = 0;
    for (const char *c = digits; c < dash; c++) {
        if (*c < '0' || *c > '9') return false;
        v = v * 10 + (*c - '0');
    }
    *step = v;
    *rest = dash + 1;
    return true;
}

int train_find_checkpoint(const char *dir, int64_t *step, char *err, size_t errlen) {
    *step = 0;
    DIR *d = opendir(dir);
    if (!d) return err_set(err, errlen, "open %s: %s", dir, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int64_t s;
        const char *rest;
        if (train_checkpoint_name(e->d_name, &s, &rest) &&
            strcmp(rest, "trainer_state.json") == 0 && s > *step)
            *step = s;
    }
    closedir(d);
    return 0;
}
