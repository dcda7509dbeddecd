/* runner.c - see runner.h. Kinds this worker runs: cka, predict
 * (worker/predict.c) and train (worker/train.c).
 *
 * A cka input is either one matrix ({"artifact": ID}, or {"path": FILE}
 * locally) or a set of per-layer matrices ({"job": ID}, or {"path": DIR}
 * locally); x and y must be the same sort. Each pair of matrices is read side
 * by side into one float64 buffer, N x (Dx + Dy), so the engine can form all
 * feature products with one dsyrk and no copy. */
#include "worker/runner.h"

#include "common/npy.h"
#include "common/spec.h"
#include "common/util.h"
#include "worker/engine/blas.h"
#include "worker/engine/cka.h"
#include "worker/engine/cuda/cka_gpu.h"
#include "worker/engine/cuda/cuda.h"
#include "worker/predict.h"
#include "worker/train.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

void runner_logf(runner_ctx *ctx, const char *fmt, ...) {
    if (!ctx->log) return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    ctx->log(ctx, line);
}

/* The host allocator says "out of memory", the CUDA backend "out of GPU
 * memory": both are a machine's limit, not the job's fault. */
bool runner_err_is_oom(const char *err) {
    return strstr(err, "out of memory") != NULL || strstr(err, "out of GPU memory") != NULL;
}

/* Tries GPU ctx->gpu in precision p: fills dev and returns 0, or -1 with
 * why set (no such GPU, or the backend would not open). */
static int runner_try_gpu(runner_ctx *ctx, cuda_precision p, runner_device *dev, char *why,
                          size_t whylen) {
    cuda_device_info devs[CUDA_MAX_DEVICES];
    char none[ERR_LEN] = "";
    int n = cuda_devices(devs, CUDA_MAX_DEVICES, none, sizeof none);
    if (n == 0) return err_set(why, whylen, "no GPU: %s", none);
    int found = -1;
    for (int i = 0; i < n; i++)
        if (devs[i].index == ctx->gpu) found = i;
    if (found < 0)
        return err_set(why, whylen, "GPU %d is not one of this worker's %d GPU%s", ctx->gpu, n,
                       n == 1 ? "" : "s");
    char err[ERR_LEN] = "";
    const backend *be = cuda_backend_open(ctx->gpu, p, err, sizeof err);
    if (!be) return err_set(why, whylen, "GPU %d: %s", ctx->gpu, err);
    dev->be = be;
    dev->on_gpu = true;
    dev->gpu = ctx->gpu;
    dev->precision = p;
    snprintf(dev->label, sizeof dev->label, "GPU %d (%s) in %s", ctx->gpu, devs[found].name,
             cuda_precision_name(p));
    return 0;
}

int runner_device_open(runner_ctx *ctx, json_t *spec, runner_device *dev, char *err,
                       size_t errlen) {
    memset(dev, 0, sizeof *dev);
    dev->be = backend_cpu();
    dev->gpu = -1;
    dev->precision = CUDA_FP32;
    snprintf(dev->label, sizeof dev->label, "the CPU (fp32)");
    const char *asked = json_string_value(json_object_get(spec, "precision"));
    cuda_precision p = CUDA_BF16;
    /* The spec was validated, so the name parses; the default is the GPU's. */
    if (cuda_precision_parse(asked ? asked : SPEC_DEFAULT_PRECISION, &p, err, errlen) != 0)
        return -1;
    char why[ERR_LEN] = "";
    if (ctx->gpu >= 0) {
        if (runner_try_gpu(ctx, p, dev, why, sizeof why) == 0) {
            runner_logf(ctx, "running on %s", dev->label);
            return 0;
        }
        if (ctx->gpu_required)
            return err_set(err, errlen, "this job needs a GPU and GPU %d cannot be used (%s)",
                           ctx->gpu, why);
        runner_logf(ctx, "cannot use GPU %d (%s); running on the CPU (fp32)", ctx->gpu, why);
    } else if (ctx->gpu_required) {
        return err_set(err, errlen, "this job needs a GPU and this worker runs it on the CPU");
    } else {
        runner_logf(ctx, "running on the CPU (fp32)");
    }
    if (asked && p != CUDA_FP32)
        runner_logf(ctx, "precision %s applies on a GPU only: the CPU computes in fp32", asked);
    return 0;
}

void runner_device_close(runner_device *dev) {
    if (dev->on_gpu) cuda_backend_close();
    dev->on_gpu = false;
    dev->be = backend_cpu();
}

int runner_device_sync(const runner_device *dev, char *err, size_t errlen) {
    if (!dev->on_gpu) return 0;
    if (cuda_backend_sync(err, errlen) != 0) return err_prefix(err, errlen, "GPU %d", dev->gpu);
    return 0;
}

bool runner_layer_from_name(const char *name, int *layer) {
    static const char prefix[] = "hidden_states_", suffix[] = ".npy";
    size_t n = strlen(name), np = sizeof prefix - 1, ns = sizeof suffix - 1;
    if (n <= np + ns || strncmp(name, prefix, np) != 0 || strcmp(name + n - ns, suffix) != 0)
        return false;
    char digits[16];
    size_t nd = n - np - ns;
    if (nd >= sizeof digits || (nd > 1 && name[np] == '0')) return false;
    memcpy(digits, name + np, nd);
    digits[nd] = '\0';
    for (size_t i = 0; i < nd; i++)
        if (digits[i] < '0' || digits[i] > '9') return false;
    int64_t v;
    if (util_parse_i64(digits, 0, 100000, &v) != 0) return false;
    *layer = (int)v;
    return true;
}

bool runner_supports(const char *kind) {
    return kind && (strcmp(kind, "cka") == 0 || strcmp(kind, "predict") == 0 ||
                    strcmp(kind, "train") == 0);
}

static void runner_log(runner_ctx *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void runner_log(runner_ctx *ctx, const char *fmt, ...) {
    if (!ctx->log) return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    ctx->log(ctx, line);
}

/* Joins validation errors into one message: "invalid spec: spec.x: ...; ...". */
static void runner_join_errors(json_t *errors, char *err, size_t errlen) {
    size_t used = 0, i;
    json_t *e;
    int n = snprintf(err, errlen, "invalid spec:");
    used = n > 0 ? (size_t)n : 0;
    json_array_foreach(errors, i, e) {
        if (used >= errlen) break;
        n = snprintf(err + used, errlen - used, "%s %s: %s", i ? ";" : "",
                     json_string_value(json_object_get(e, "field")),
                     json_string_value(json_object_get(e, "message")));
        if (n < 0) break;
        used += (size_t)n;
    }
}

/* A reference names a set of per-layer files: {"job": ID}, or locally a
 * {"path"} that is a directory. */
static bool runner_ref_is_layers(json_t *ref) {
    if (json_object_get(ref, "job")) return true;
    const char *path = json_string_value(json_object_get(ref, "path"));
    struct stat st;
    return path && stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* An npy error is worth retrying only when it is about I/O or memory, not
 * about the file's content. */
static bool runner_npy_error_retryable(const char *err) {
    return strncmp(err, "open ", 5) == 0 || strstr(err, ": read: ") != NULL ||
           runner_err_is_oom(err) || strstr(err, "changed while reading") != NULL;
}

typedef struct {
    cka_options opt;
    const char *kernel_name;
} runner_cka_job;

/* Below this many multiply-adds (n * (Dx + Dy) * min(n, Dx + Dy), the CPU's
 * cheaper formulation) the CPU finishes in well under a second on a few
 * cores, about what the GPU's fixed costs take (CUDA context, cuBLAS handle,
 * the upload over PCIe), so smaller pairs stay on the CPU. Above it the GPU
 * wins by far: 1e12 multiply-adds are minutes of CPU and a fraction of a
 * second of float64 tensor cores. */
#define RUNNER_CKA_GPU_MIN_FLOPS 1e10

/* RUNNER_CKA_GPU_MIN_FLOPS, or STRATA_CKA_GPU_MIN_FLOPS when that is a
 * number >= 0 (0 puts every pair on the GPU: for tests, and for operators
 * whose CPUs are slow). */
static double runner_cka_gpu_min_flops(void) {
    const char *s = getenv("STRATA_CKA_GPU_MIN_FLOPS");
    if (!s || !*s) return RUNNER_CKA_GPU_MIN_FLOPS;
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !(v >= 0) || !isfinite(v))
        return RUNNER_CKA_GPU_MIN_FLOPS;
    return v;
}

/* CKA of x and y on ctx->gpu when the worker has one and the pair is large
 * enough, else (or when the GPU declines or fails, with a log line saying
 * why) on the CPU. where (wherelen) names what computed it for the log.
 * Returns 0 with *res, or -1 with err as cka_compute. */
static int runner_cka_compute(runner_ctx *ctx, const cka_options *opt, cka_matrix *x,
                              cka_matrix *y, cka_result *res, char *where, size_t wherelen,
                              char *err, size_t errlen) {
    double n = (double)x->rows, d = (double)(x->cols + y->cols);
    snprintf(where, wherelen, "the CPU");
    if (ctx->gpu < 0 || n * d * (n < d ? n : d) < runner_cka_gpu_min_flops())
        return cka_compute(x, y, opt, ctx->cancel, res, err, errlen);
    cka_gpu_call call;
    memset(&call, 0, sizeof call);
    call.device = ctx->gpu;
    call.precision = CKA_GPU_AUTO;
    if (cka_gpu_compute_with(x, y, opt, &call, ctx->cancel, res, err, errlen) == 0) {
        snprintf(where, wherelen, "GPU %d (%s) in %s", ctx->gpu, call.device_name,
                 call.used == CKA_GPU_F64 ? "float64" : "float32");
        return 0;
    }
    if (!call.cpu_may_run) return -1;
    runner_logf(ctx, "cka not on GPU %d (%s): computing on the CPU", ctx->gpu, err);
    /* The GPU call may already have dropped NaN rows from x and y. */
    size_t dropped = res->dropped_rows;
    if (cka_compute(x, y, opt, ctx->cancel, res, err, errlen) != 0) return -1;
    res->dropped_rows += dropped;
    return 0;
}

/* Reads the matrices at xpath and ypath side by side and computes their CKA.
 * Appends {"layer", "cka", "n", "dropped_rows", "seconds", ...} to layers.
 * Returns 0, or -1 with err, *retryable and *cancelled set. */
static int runner_cka_pair(runner_ctx *ctx, const runner_cka_job *job, const char *xpath,
                           const char *ypath, json_t *layer, json_t *layers, bool *retryable,
                           bool *cancelled, char *err, size_t errlen) {
    double started = util_now_seconds();
    npy_header hx, hy;
    double *xy = NULL;
    int rc = -1;
    if (npy_read_header(xpath, &hx, err, errlen) != 0 ||
        npy_read_header(ypath, &hy, err, errlen) != 0) {
        *retryable = runner_npy_error_retryable(err);
        goto out;
    }
    if (hx.rows != hy.rows) {
        err_set(err, errlen, "x has %zu rows, y has %zu", hx.rows, hy.rows);
        *retryable = false;
        goto out;
    }
    size_t stride = hx.cols + hy.cols;
    if (stride == 0 || hx.rows > SIZE_MAX / sizeof(double) / stride) {
        err_set(err, errlen, "inputs of %zu rows are too large", hx.rows);
        *retryable = false;
        goto out;
    }
    xy = malloc(hx.rows * stride * sizeof(double) + 1);
    if (!xy) {
        err_set(err, errlen, "out of memory for %zu x %zu float64", hx.rows, stride);
        *retryable = true;
        goto out;
    }
    if (npy_read_f64_into(xpath, &hx, xy, stride, err, errlen) != 0 ||
        npy_read_f64_into(ypath, &hy, xy + hx.cols, stride, err, errlen) != 0) {
        *retryable = runner_npy_error_retryable(err);
        goto out;
    }
    double loaded = util_now_seconds();
    cka_matrix x = {xy, hx.rows, hx.cols, stride};
    cka_matrix y = {xy + hx.cols, hy.rows, hy.cols, stride};
    cka_result res;
    char where[160];
    if (runner_cka_compute(ctx, &job->opt, &x, &y, &res, where, sizeof where, err, errlen) !=
        0) {
        *cancelled = ctx->cancel && atomic_load(ctx->cancel);
        *retryable = runner_err_is_oom(err);
        goto out;
    }
    double done = util_now_seconds();
    json_t *entry = json_pack("{s:O, s:f, s:I, s:I, s:f, s:f, s:s}", "layer", layer, "cka",
                              res.cka, "n", (json_int_t)res.n, "dropped_rows",
                              (json_int_t)res.dropped_rows, "seconds", done - started,
                              "compute_seconds", done - loaded, "space",
                              res.gram_space ? "gram" : "feature");
    if (!entry || json_array_append_new(layers, entry) != 0) {
        err_set(err, errlen, "out of memory");
        *retryable = true;
        goto out;
    }
    char label[32] = "-";
    if (json_is_integer(layer)) snprintf(label, sizeof label, "%lld", (long long)json_integer_value(layer));
    runner_log(ctx,
               "cka layer %s: %.6f (n=%zu, dropped %zu, %zu x %zu vs %zu x %zu %s/%s, %s space "
               "on %s, %.3f s load, %.3f s compute)",
               label, res.cka, res.n, res.dropped_rows, hx.rows, hx.cols, hy.rows, hy.cols,
               npy_dtype_name(hx.dtype), npy_dtype_name(hy.dtype),
               res.gram_space ? "Gram" : "feature", where, loaded - started, done - loaded);
    rc = 0;
out:
    free(xy);
    return rc;
}

static bool runner_layer_requested(json_t *wanted, int layer) {
    if (!json_is_array(wanted)) return true; /* "all" or absent */
    size_t i;
    json_t *v;
    json_array_foreach(wanted, i, v) if (json_integer_value(v) == layer) return true;
    return false;
}

static const runner_layer_file *runner_find_layer(const runner_layer_file *files, size_t n,
                                                  int layer) {
    for (size_t i = 0; i < n; i++)
        if (files[i].layer == layer) return &files[i];
    return NULL;
}

/* Per-layer inputs: the layers both sides have (filtered by spec.layers,
 * where every requested layer must exist on both sides). */
static int runner_cka_layers(runner_ctx *ctx, const runner_cka_job *job, json_t *spec,
                             json_t *layers, bool *retryable, bool *cancelled, char *err,
                             size_t errlen) {
    runner_layer_file *xf = NULL, *yf = NULL;
    size_t nx = 0, ny = 0;
    int rc = -1;
    json_t *wanted = json_object_get(spec, "layers");
    if (ctx->resolve_layers(ctx, json_object_get(spec, "x"), &xf, &nx, err, errlen) != 0 ||
        ctx->resolve_layers(ctx, json_object_get(spec, "y"), &yf, &ny, err, errlen) != 0) {
        *retryable = true;
        goto out;
    }
    if (json_is_array(wanted)) {
        size_t i;
        json_t *v;
        json_array_foreach(wanted, i, v) {
            int layer = (int)json_integer_value(v);
            const char *side = !runner_find_layer(xf, nx, layer)   ? "x"
                               : !runner_find_layer(yf, ny, layer) ? "y"
                                                                   : NULL;
            if (side) {
                err_set(err, errlen, "layer %d is not in %s", layer, side);
                *retryable = false;
                goto out;
            }
        }
    }
    int64_t total = 0;
    for (size_t i = 0; i < nx; i++)
        if (runner_layer_requested(wanted, xf[i].layer) && runner_find_layer(yf, ny, xf[i].layer))
            total++;
    if (total == 0) {
        err_set(err, errlen, "x and y have no layer in common");
        *retryable = false;
        goto out;
    }
    int64_t step = 0;
    for (size_t i = 0; i < nx; i++) {
        const runner_layer_file *other = runner_find_layer(yf, ny, xf[i].layer);
        if (!other || !runner_layer_requested(wanted, xf[i].layer)) continue;
        if (ctx->cancel && atomic_load(ctx->cancel)) {
            err_set(err, errlen, "cancelled");
            *cancelled = true;
            goto out;
        }
        char message[64];
        snprintf(message, sizeof message, "layer %d", xf[i].layer);
        if (ctx->progress) ctx->progress(ctx, step, total, message);
        json_t *layer = json_integer(xf[i].layer);
        int pair = runner_cka_pair(ctx, job, xf[i].path, other->path, layer, layers, retryable,
                                   cancelled, err, errlen);
        json_decref(layer);
        if (pair != 0) {
            char inner[ERR_LEN];
            snprintf(inner, sizeof inner, "%s", err);
            if (!*cancelled) err_set(err, errlen, "layer %d: %s", xf[i].layer, inner);
            goto out;
        }
        step++;
    }
    if (ctx->progress) ctx->progress(ctx, total, total, "done");
    rc = 0;
out:
    free(xf);
    free(yf);
    return rc;
}

/* Runs a cka job; see runner_run. */
static int runner_cka(json_t *spec, runner_ctx *ctx, json_t **result, bool *retryable,
                      bool *cancelled, char *err, size_t errlen) {
    runner_cka_job job;
    memset(&job, 0, sizeof job);
    json_t *kernel = json_object_get(spec, "kernel");
    job.kernel_name = kernel ? json_string_value(kernel) : "linear";
    job.opt.kernel = strcmp(job.kernel_name, "rbf") == 0 ? CKA_RBF : CKA_LINEAR;
    job.opt.debiased = json_is_true(json_object_get(spec, "debiased"));
    json_t *threshold = json_object_get(spec, "rbf_threshold");
    job.opt.rbf_threshold = threshold ? json_number_value(threshold) : 1.0;
    job.opt.space = CKA_SPACE_AUTO;

    json_t *x = json_object_get(spec, "x"), *y = json_object_get(spec, "y");
    bool x_layers = runner_ref_is_layers(x), y_layers = runner_ref_is_layers(y);
    json_t *layers = json_array();
    json_t *out = NULL;
    int rc = -1;
    if (!layers) {
        *retryable = true;
        return err_set(err, errlen, "out of memory");
    }
    if (x_layers != y_layers) {
        err_set(err, errlen,
                "x and y must both be single matrices or both per-layer inputs (x is %s, y is %s)",
                x_layers ? "per-layer" : "one matrix", y_layers ? "per-layer" : "one matrix");
        *retryable = false;
        goto out;
    }
    if (x_layers) {
        if (runner_cka_layers(ctx, &job, spec, layers, retryable, cancelled, err, errlen) != 0)
            goto out;
    } else {
        char xpath[4096], ypath[4096];
        if (ctx->resolve_file(ctx, x, xpath, sizeof xpath, err, errlen) != 0 ||
            ctx->resolve_file(ctx, y, ypath, sizeof ypath, err, errlen) != 0) {
            *retryable = true;
            goto out;
        }
        if (ctx->progress) ctx->progress(ctx, 0, 1, "computing");
        if (runner_cka_pair(ctx, &job, xpath, ypath, json_null(), layers, retryable, cancelled,
                            err, errlen) != 0)
            goto out;
        if (ctx->progress) ctx->progress(ctx, 1, 1, "done");
    }
    out = json_pack("{s:s, s:b, s:O, s:s}", "kernel", job.kernel_name, "debiased",
                    job.opt.debiased, "layers", layers, "blas_core", blas_core_name());
    if (out && job.opt.kernel == CKA_RBF)
        json_object_set_new(out, "rbf_threshold", json_real(job.opt.rbf_threshold));
    if (!out) {
        err_set(err, errlen, "out of memory");
        *retryable = true;
        goto out;
    }
    *result = out;
    rc = 0;
out:
    json_decref(layers);
    return rc;
}

int runner_run(const char *kind, json_t *spec, runner_ctx *ctx, json_t **result, bool *retryable,
               bool *cancelled, char *err, size_t errlen) {
    *result = NULL;
    *retryable = false;
    *cancelled = false;
    /* The server has already refused {"path"} references; a local run allows
     * them, so the local mode accepts both. */
    json_t *errors = json_array();
    if (!errors) {
        *retryable = true;
        return err_set(err, errlen, "out of memory");
    }
    if (spec_validate(kind, spec, SPEC_LOCAL, errors) != 0) {
        runner_join_errors(errors, err, errlen);
        json_decref(errors);
        return -1;
    }
    json_decref(errors);
    if (!runner_supports(kind)) return err_set(err, errlen, "this worker cannot run %s jobs", kind);
    if (strcmp(kind, "predict") == 0)
        return predict_run(spec, ctx, result, retryable, cancelled, err, errlen);
    if (strcmp(kind, "train") == 0)
        return train_run(spec, ctx, result, retryable, cancelled, err, errlen);
    return runner_cka(spec, ctx, result, retryable, cancelled, err, errlen);
}
