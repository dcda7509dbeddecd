/* runner.h - runs one job of a given kind, for the agent (jobs claimed from a
 * server) and for `strata-worker run` (one job, locally, no server).
 *
 * The kind-specific code (cka now; predict and train later) only sees this
 * context. Inputs are resolved to local files through callbacks, so the same
 * code reads {"path": "x.npy"} locally and {"artifact": 3} or {"job": 12}
 * through the server. Outputs go through add_artifact: copied into --out DIR
 * locally, uploaded by the agent. */
#ifndef STRATA_RUNNER_H
#define STRATA_RUNNER_H

#include "worker/engine/backend.h"
#include "worker/engine/cuda/cuda.h"

#include <jansson.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One per-layer input file of a predict job: hidden_states_{layer}.npy. */
typedef struct {
    int layer;
    char path[4096];
} runner_layer_file;

typedef struct runner_ctx runner_ctx;
struct runner_ctx {
    /* Resolves an input reference object (e.g. {"path": ...}, {"artifact": 3})
     * to a local file path. Returns 0, or -1 with err set. Single-matrix inputs. */
    int (*resolve_file)(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen, char *err,
                        size_t errlen);
    /* Resolves a reference to a set of per-layer files ({"job": ID} on the
     * server; a directory of hidden_states_*.npy locally). *files is malloc'd,
     * sorted by layer; the caller frees it. */
    int (*resolve_layers)(runner_ctx *ctx, json_t *ref, runner_layer_file **files, size_t *n,
                          char *err, size_t errlen);
    /* Resolves a model reference ({"model": ID} on the server, {"path": ...}
     * locally) to a local path: a Hugging Face model directory (config.json,
     * model.safetensors[.index.json], tokenizer.json) or a llama2.c .bin file.
     * Returns 0, or -1 with err set. */
    int (*resolve_model)(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen, char *err,
                         size_t errlen);
    /* Resolves a dataset reference ({"dataset": ID} / {"path": ...}) to a local
     * file and its format ("alpaca", "flan" or "auto" when unknown; formatlen
     * >= 16). */
    int (*resolve_dataset)(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                           char *format, size_t formatlen, char *err, size_t errlen);
    /* Resolves an adapter reference to a local directory holding
     * adapter_config.json and adapter_model.safetensors. */
    int (*resolve_adapter)(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen, char *err,
                           size_t errlen);
    /* Reports progress (may be NULL). */
    void (*progress)(runner_ctx *ctx, int64_t step, int64_t total, const char *message);
    /* Appends one line to the job's log (may be NULL). */
    void (*log)(runner_ctx *ctx, const char *line);
    /* Publishes the file at path as an output artifact called name. */
    int (*add_artifact)(runner_ctx *ctx, const char *name, const char *path, char *err,
                        size_t errlen);
    /* Records one point of a metric series (e.g. "loss" at an optimizer step;
     * may be NULL). The agent batches points to POST /jobs/{id}/metrics. */
    void (*metric)(runner_ctx *ctx, const char *name, int64_t step, double value);
    /* Finds the latest checkpoint an earlier attempt of this job left (may be
     * NULL: never any). Returns 0 with *step 0 when there is none, or with
     * *step > 0 and dir naming a local directory that holds that
     * checkpoint's files under their artifact names
     * (checkpoint-{step}-*). Returns -1 with err set when looking failed. */
    int (*resolve_checkpoint)(runner_ctx *ctx, char *dir, size_t dirlen, int64_t *step,
                              char *err, size_t errlen);
    /* Set to non-zero by the agent when the job is cancelled or the lease is
     * lost; long computations check it between steps and stop. */
    atomic_int *cancel;
    /* A private scratch directory for this job (exists, emptied afterwards). */
    const char *work_dir;
    void *user; /* for the callbacks */
    /* The GPU (CUDA device ordinal) predict and train jobs run on, or -1
     * for the CPU. Zero is GPU 0, so a context meant for the CPU must say
     * -1. When the GPU cannot be opened the job logs why and runs on the
     * CPU, unless gpu_required. cka jobs use it for pairs large enough to
     * gain from it (runner.c, RUNNER_CKA_GPU_MIN_FLOPS) and never require it. */
    int gpu;
    /* The job asked for GPUs (resources.gpus > 0): it fails, not retryably,
     * rather than fall back to the CPU. */
    bool gpu_required;
};

/* Where a predict or train job computes: the backend, and on a GPU its
 * ordinal and the precision of its matrix products. */
typedef struct {
    const backend *be;         /* backend_cpu() or the CUDA table */
    bool on_gpu;               /* be is the CUDA backend: close it afterwards */
    int gpu;                   /* the device ordinal; -1 on the CPU */
    cuda_precision precision;  /* CUDA_FP32 on the CPU */
    char label[192];           /* "GPU 0 (NVIDIA H200) in bf16" / "the CPU (fp32)" */
} runner_device;

/* Opens the backend a predict or train job runs on, from ctx->gpu and
 * spec.precision (default bf16 on a GPU; the CPU always computes in fp32),
 * and logs one line: "running on GPU 0 (NVIDIA H200) in bf16" or "running on
 * the CPU (fp32)" (with why, when a GPU was wanted and cannot be used, and a
 * note when a precision other than fp32 was asked of the CPU). Binds the
 * calling thread to the GPU (cuda.h). Returns 0, or -1 with err set when the
 * job requires a GPU (ctx->gpu_required) and none can be opened: no retry
 * helps then. Release with runner_device_close on the same thread. */
int runner_device_open(runner_ctx *ctx, json_t *spec, runner_device *dev, char *err,
                       size_t errlen);
/* Releases the thread's CUDA context when dev is on a GPU (every buffer of
 * its backend must be freed first); nothing on the CPU. */
void runner_device_close(runner_device *dev);
/* After a batch: on a GPU, waits for the queued work and reports any
 * asynchronous kernel or cuBLAS failure (out of memory among them, which
 * runner_err_is_oom recognises). 0, or -1 with err set; always 0 on the CPU. */
int runner_device_sync(const runner_device *dev, char *err, size_t errlen);

/* Parses a per-layer file name, hidden_states_{layer}.npy, with the layer in
 * plain decimal (no sign, no leading zeros, at most 100000). The agent and
 * local runs both find layers by it. */
bool runner_layer_from_name(const char *name, int *layer);

/* Appends a printf-formatted line to the job's log (nothing when ctx->log
 * is NULL). */
void runner_logf(runner_ctx *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* True when an error message reports memory exhaustion, the one failure of
 * a loader or engine call that a retry (on another worker) may not repeat. */
bool runner_err_is_oom(const char *err);

/* Checks that kind is one this worker can run. */
bool runner_supports(const char *kind);

/* Runs a job. On success returns 0 and sets *result (caller owns it). On
 * failure returns -1 with err set; *retryable tells whether trying again could
 * help (I/O, network) or not (bad spec, bad input). A cancelled job returns -1
 * with *cancelled set. */
int runner_run(const char *kind, json_t *spec, runner_ctx *ctx, json_t **result, bool *retryable,
               bool *cancelled, char *err, size_t errlen);

#endif
