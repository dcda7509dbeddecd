/* spec.h - validation of job specs, shared by the server (at submission, so a
 * bad spec is a 400 that creates nothing) and the worker (before running, so
 * `strata-worker run` gives the same messages locally).
 *
 * Field paths are reported as the API names them: "spec.x", "spec.kernel",
 * "spec.x.artifact". */
#ifndef STRATA_SPEC_H
#define STRATA_SPEC_H

#include <jansson.h>
#include <stdbool.h>

/* Bounds of spec values (predict: samples, batch, generated tokens; any
 * kind: layer indices). */
#define SPEC_MAX_LAYER 100000
#define SPEC_MAX_SAMPLES 100000000
#define SPEC_MAX_BATCH 1024
#define SPEC_MAX_NEW_TOKENS 4096
/* Bounds of train spec values. */
#define SPEC_MAX_DATASETS 256
#define SPEC_MAX_LORA_R 1024
#define SPEC_MAX_STEPS 1000000000
#define SPEC_MAX_ACCUM 1000000
#define SPEC_MAX_CUTOFF 1048576
/* Train spec defaults (docs/api.md, "Train jobs (spec)"): Hugging Face
 * TrainingArguments' where it has one, PEFT's LoRA defaults otherwise. */
#define SPEC_TRAIN_DEFAULT_TEMPLATE "llama2"
#define SPEC_TRAIN_DEFAULT_METHOD "lora"
#define SPEC_TRAIN_DEFAULT_LORA_R 8
#define SPEC_TRAIN_DEFAULT_LORA_ALPHA 16.0
#define SPEC_TRAIN_DEFAULT_LORA_DROPOUT 0.0
#define SPEC_TRAIN_DEFAULT_LEARNING_RATE 5e-5
#define SPEC_TRAIN_DEFAULT_EPOCHS 3.0
#define SPEC_TRAIN_DEFAULT_BATCH_SIZE 8
#define SPEC_TRAIN_DEFAULT_GRAD_ACCUM 1
#define SPEC_TRAIN_DEFAULT_CUTOFF_LEN 1024
#define SPEC_TRAIN_DEFAULT_SCHEDULER "linear"
#define SPEC_TRAIN_DEFAULT_MAX_GRAD_NORM 1.0
#define SPEC_TRAIN_DEFAULT_SEED 42
#define SPEC_TRAIN_DEFAULT_SAVE_STEPS 500
#define SPEC_TRAIN_DEFAULT_INIT_RANGE 0.02

/* The precision of a GPU's matrix products when a predict or train job
 * gives none ("precision": "bf16" | "fp16" | "fp32"; cuda.h's names). The
 * CPU always computes in fp32 and says so in the job log. */
#define SPEC_DEFAULT_PRECISION "bf16"

/* Where input references may point. The server accepts {"artifact": ID} and
 * {"job": ID}; a local run also accepts {"path": "..."}. */
enum spec_mode { SPEC_SERVER = 0, SPEC_LOCAL = 1 };

/* Validates spec for kind: "cka", "predict" or "train" (base_model,
 * dataset, template, method, lora, optimizer, schedule and checkpoint fields:
 * docs/api.md, "Train jobs (spec)"). Appends {"field": ..., "message": ...} objects to
 * errors (a JSON array owned by the caller). Returns 0 when valid, -1 when
 * not (errors then holds at least one entry). */
int spec_validate(const char *kind, json_t *spec, enum spec_mode mode, json_t *errors);

/* The job kinds this build validates and runs, as messages list them. */
#define SPEC_KINDS "cka, predict, train"

/* True for the job kinds the server accepts and workers run (SPEC_KINDS;
 * their spec fields are in docs/api.md). A kind is added
 * here only once runner_supports() knows it, so the server never queues a
 * job no worker can run. */
bool spec_known_kind(const char *kind);

/* Appends one {"field", "message"} error object to errors. */
void spec_error(json_t *errors, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
