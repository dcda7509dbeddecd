/* bench_gpu.c - strata's CUDA engine at LLaMA scale, for bench/gpu/run.sh.
 *
 *   bench_gpu train   --shape 1b|7b|tiny [--batch 4] [--seq 1024] [--rank 8]
 *                     [--warmup 1] [--steps 3] [--precision bf16]
 *   bench_gpu predict --shape 1b|7b|tiny [--batch 8] [--seq 512] [--warmup 1] [--steps 3]
 *   bench_gpu cka     [--rows 8000] [--dim 4096]
 *   bench_gpu gemm    [--shape 7b|tiny] [--tokens 4096] [--precision bf16|fp16]
 *
 * Models have random weights drawn on the host with a fixed seed (uniform
 * with std 0.02, norms one; nothing is downloaded), placed on GPU 0 with
 * llama_model_to_backend_frozen as predict jobs and LoRA's base model are:
 * in bf16/fp16 the projections and the head exist on the device only in
 * that precision (cuda_backend_upload_frozen), the embedding and norms stay
 * fp32; in fp32 the whole model is uploaded in fp32.
 *
 * train: LoRA r (default 8, alpha 16) on q_proj and v_proj, one optimizer
 * step = llama_lora_loss_and_grad over batch x seq random tokens (every
 * position scored) + the device optimizer of train jobs (train.c's
 * train_step_gpu): cuk_sumsq over the adapter's gradients, one 16-byte
 * download of their sum of squares and inf/NaN flag, clip coefficient and
 * adamw_begin_step's scalars on the host, cuk_adamw on the fp32 adapter and
 * moments, which stay on the device; both kernels on the backend's stream.
 * A step whose gradients are not finite is skipped, as an fp16 job's would
 * be (the bench does no loss scaling), and counted in "skipped_steps".
 * Reports tokens/s and MFU = flops / (seconds * 989e12), 989 TFLOP/s being
 * H100/H200 SXM's
 * dense bf16 peak, with per token
 *   2 N (forward products) + 2 N (backward: activation gradients; the
 *   frozen weights get no weight gradient) + 6 N_lora (the adapter's
 *   forward, activation and weight gradients) + 12 L seq C (attention's
 *   QK^T and PV, forward and backward, counted without causal halving as
 *   PaLM's MFU does),
 * N the multiply-accumulated weights (every projection and the LM head; the
 * embedding lookup does no products), N_lora = L sum_targets r (in + out).
 * bench/gpu/peer.py uses the same formula.
 *
 * predict: llama_forward over batch x seq tokens with the hook pooling each
 * sequence's last token from every hidden state (what a predict job reads;
 * the engine downloads each layer's (B, T, C) states for it), and again
 * with no hook or logits (the GPU's compute alone). Reports sequences/s.
 *
 * cka: linear CKA (biased) of two random (rows, dim) float64 matrices on the
 * GPU (cka_gpu_compute_with, float64 products, transfers included) and on
 * the CPU (cka_compute, feature space), with both values.
 *
 * gemm: the matrix products of a 7B LoRA step over --tokens tokens (4096:
 * batch 4 x 1024), each through gemm.h's two paths (gemm_set_path: EX,
 * cublasGemmEx; LT, cublasLtMatmul with the cached heuristic algorithm),
 * for every linear layer shape (q/k/v/o 4096 x 4096, gate/up 11008 x 4096,
 * down 4096 x 11008, lm_head 32000 x 4096; W (out, in)): the forward
 * y = x W^T and the backward's dx = dy W and dW = dy^T x, bf16 (or fp16)
 * operands, fp32 output and accumulation, as the backend calls gemm_run.
 * Each is timed over enough repetitions for 0.2 s after two warm-up runs
 * (the first Lt run asks the heuristic); reports TFLOP/s of both, their
 * ratio lt / ex, whether Lt found an algorithm (else it ran Ex) and the
 * largest |lt - ex| over max |ex|. This is the measurement STRATA_GEMM's
 * default (auto = lt) waits on; peer.py gemm times torch.matmul on the same
 * shapes.
 *
 * Prints one JSON object per measurement on stdout; progress on stderr. */
#include "common/util.h"
#include "worker/engine/adamw.h"
#include "worker/engine/backend.h"
#include "worker/engine/cka.h"
#include "worker/engine/cuda/cka_gpu.h"
#include "worker/engine/cuda/cuda.h"
#include "worker/engine/cuda/gemm.h"
#include "worker/engine/cuda/kernels.h"
#include "worker/engine/forward.h"
#include "worker/engine/model.h"
#include "worker/engine/model_backend.h"
#include "tests/cuda_emu/half_bits.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BENCH_PEAK_FLOPS 989e12
#define BENCH_FILL_THREADS 16
/* What one optimizer step downloads: the gradients' sum of squares (a
 * double) and inf/NaN flag (an int), padded to 16 bytes, as train.c's
 * TRAIN_GPU_NORM_BYTES. */
#define BENCH_NORM_BYTES 16
#define BENCH_LR 1e-4
#define BENCH_MAX_GRAD_NORM 1.0

typedef struct {
    const char *mode;
    const char *shape;
    int batch, seq, rank, warmup, steps;
    size_t rows, dim;
    size_t tokens;
    cuda_precision precision;
} bench_args;

/* The model shapes: TinyLlama-1.1B's and Llama-2-7B's (and "tiny", for
 * the emulator). */
static int bench_config(const char *shape, llama_config *c, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    c->vocab_size = 32000;
    c->max_position_embeddings = 4096;
    c->rms_norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    c->bos_token_id = 1, c->eos_token_id = 2, c->pad_token_id = -1;
    if (strcmp(shape, "1b") == 0) {
        c->hidden_size = 2048, c->intermediate_size = 5632, c->num_hidden_layers = 22;
        c->num_attention_heads = 32, c->num_key_value_heads = 4;
    } else if (strcmp(shape, "7b") == 0) {
        c->hidden_size = 4096, c->intermediate_size = 11008, c->num_hidden_layers = 32;
        c->num_attention_heads = 32, c->num_key_value_heads = 32;
    } else if (strcmp(shape, "tiny") == 0) {
        /* not a benchmark: a shape the CUDA emulator runs in seconds, to
         * prove this program's steps before GPU time is spent */
        c->vocab_size = 512;
        c->hidden_size = 64, c->intermediate_size = 176, c->num_hidden_layers = 2;
        c->num_attention_heads = 4, c->num_key_value_heads = 2;
    } else {
        return err_set(err, errlen, "unknown shape %s (1b, 7b, tiny)", shape);
    }
    return 0;
}

/* Weights multiplied per token: every projection and the LM head. */
static double bench_matmul_params(const llama_config *c) {
    double C = c->hidden_size, FF = c->intermediate_size, L = c->num_hidden_layers;
    double KVD = C / c->num_attention_heads * c->num_key_value_heads;
    return L * (2.0 * C * C + 2.0 * C * KVD + 3.0 * C * FF) + (double)c->vocab_size * C;
}

/* ---- random weights, filled in parallel ----------------------------------- */

typedef struct {
    float *p;
    size_t begin, end;
    float half_width;
    uint64_t seed;
} bench_fill_part;

static void *bench_fill_thread(void *arg) {
    bench_fill_part *f = arg;
    uint64_t s = f->seed;
    for (size_t i = f->begin; i < f->end; i++) {
        s += 0x9E3779B97F4A7C15ULL;
        double u = (double)(backend_mix64(s) >> 11) * (1.0 / 9007199254740992.0);
        f->p[i] = (float)((2.0 * u - 1.0) * f->half_width);
    }
    return NULL;
}

/* p[0..n) uniform in (-a, a), a = 0.02 sqrt(3) (std 0.02), the same for a
 * seed however many threads run. */
static void bench_fill(float *p, size_t n, uint64_t seed) {
    pthread_t th[BENCH_FILL_THREADS];
    bench_fill_part parts[BENCH_FILL_THREADS];
    size_t chunk = (n + BENCH_FILL_THREADS - 1) / BENCH_FILL_THREADS;
    int started = 0;
    for (int t = 0; t < BENCH_FILL_THREADS; t++) {
        size_t b = (size_t)t * chunk, e = b + chunk > n ? n : b + chunk;
        parts[t] = (bench_fill_part){p, b < n ? b : n, e, 0.0346f, seed * 1000003u + (uint64_t)t};
        if (pthread_create(&th[t], NULL, bench_fill_thread, &parts[t]) == 0)
            started |= 1 << t;
        else
            bench_fill_thread(&parts[t]);
    }
    for (int t = 0; t < BENCH_FILL_THREADS; t++)
        if (started & (1 << t)) pthread_join(th[t], NULL);
}

static void bench_ones(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = 1.0f;
}

/* A random model of shape on the GPU (dev), placed as a frozen model
 * (llama_model_to_backend_frozen: nothing to register; in bf16/fp16 the
 * projections and head only in that precision). The host copy is freed
 * once uploaded. 0, or -1 with err ("out of GPU memory" when it does not
 * fit); release dev with llama_model_free_backend. */
static int bench_model(const backend *gpu, const char *shape, llama_model *dev, char *err,
                       size_t errlen) {
    llama_config cfg;
    llama_model host;
    if (bench_config(shape, &cfg, err, errlen) != 0) return -1;
    if (llama_alloc(&host, &cfg, err, errlen) != 0) return -1;
    double t0 = util_now_seconds();
    bench_fill(host.params, host.nparams, 7);
    size_t C = (size_t)cfg.hidden_size, L = (size_t)cfg.num_hidden_layers;
    bench_ones(host.w.attn_norm, L * C);
    bench_ones(host.w.mlp_norm, L * C);
    bench_ones(host.w.final_norm, C);
    fprintf(stderr, "bench_gpu: %s: %zu params drawn in %.1f s\n", shape, host.nparams,
            util_now_seconds() - t0);
    t0 = util_now_seconds();
    int rc = llama_model_to_backend_frozen(gpu, &host, dev, err, errlen);
    llama_free(&host);
    if (rc != 0) return -1;
    fprintf(stderr, "bench_gpu: %s: placed in %.1f s (%s)\n", shape, util_now_seconds() - t0,
            cuda_backend_low_precision() ? "frozen: projections low-precision only" : "fp32");
    return 0;
}

static void bench_tokens(int *tokens, size_t n, int V, uint64_t seed) {
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++) tokens[i] = 3 + (int)(backend_mix64(s++) % (uint64_t)(V - 3));
}

static void bench_memory_note(char *out, size_t len) {
    size_t free_b = 0, total_b = 0;
    char err[ERR_LEN];
    if (cuda_backend_memory(&free_b, &total_b, err, sizeof err) == 0)
        snprintf(out, len, "%.1f", (double)(total_b - free_b) / (1024.0 * 1024.0 * 1024.0));
    else
        snprintf(out, len, "null");
}

/* ---- train ------------------------------------------------------------------ */

/* The adapter's device optimizer state: fp32 moments and the norm's
 * scratch (a double and an int, BENCH_NORM_BYTES). */
typedef struct {
    float *m, *v;
    float *norm;
} bench_opt_dev;

/* One optimizer step on the device, as train.c's train_step_gpu does for a
 * LoRA job (no loss scaling): the sum of squares of the n gradients in
 * dgrads and their inf/NaN flag reduced by cuk_sumsq and downloaded
 * (BENCH_NORM_BYTES), then, unless a gradient is not finite (*skipped set,
 * nothing changed), one cuk_adamw over params with the clip coefficient
 * and adamw_begin_step's scalars; both kernels on the backend's stream.
 * *norm gets the pre-clip norm. Returns 0, or -1 with err (a refused
 * launch, a device failure). */
static int bench_opt_step(const backend *gpu, adamw *opt, bench_opt_dev *d, float *params,
                          const float *dgrads, size_t n, double *norm, bool *skipped, char *err,
                          size_t errlen) {
    double *d_sum = (double *)(void *)d->norm;
    int *d_flag = (int *)(void *)(d->norm + 2);
    *skipped = false;
    gpu->zero(d->norm, BENCH_NORM_BYTES / sizeof(float));
    if (cuk_sumsq(d_sum, d_flag, dgrads, n, cuda_backend_stream(), err, errlen) != 0)
        return -1;
    unsigned char host[BENCH_NORM_BYTES];
    gpu->download(host, d->norm, sizeof host);
    if (cuda_backend_sync(err, errlen) != 0) return -1;
    double sumsq;
    int flag;
    memcpy(&sumsq, host, sizeof sumsq);
    memcpy(&flag, host + 2 * sizeof(float), sizeof flag);
    *norm = sqrt(sumsq);
    if (flag != 0 || !isfinite(*norm)) {
        *skipped = true;
        return 0;
    }
    float coef = adamw_clip_coef(*norm, BENCH_MAX_GRAD_NORM);
    adamw_scalars sc = adamw_begin_step(opt, BENCH_LR);
    return cuk_adamw(params, dgrads, d->m, d->v, n, coef, adamw_range_decay(opt, 0, &sc),
                     sc.beta1, sc.one_minus_beta1, sc.beta2, sc.one_minus_beta2,
                     sc.neg_step_size, sc.bias_correction2_sqrt, sc.eps, cuda_backend_stream(),
                     err, errlen);
}

static int bench_train(const bench_args *a, char *err, size_t errlen) {
    int rc = -1;
    const backend *gpu = cuda_backend_open(0, a->precision, err, errlen);
    if (!gpu) return -1;
    llama_model dev;
    memset(&dev, 0, sizeof dev);
    llama_state s;
    memset(&s, 0, sizeof s);
    float *lora_host = NULL, *dlora = NULL, *dgrads = NULL;
    bench_opt_dev od = {NULL, NULL, NULL};
    int *tokens = NULL, *lengths = NULL;
    adamw *opt = NULL;
    if (bench_model(gpu, a->shape, &dev, err, errlen) != 0) goto out;
    const llama_config *cfg = &dev.cfg;
    bool target[LLAMA_NPROJ] = {false};
    target[LLAMA_PROJ_Q] = target[LLAMA_PROJ_V] = true;
    size_t np = llama_lora_count(cfg, a->rank, target);
    size_t N = (size_t)a->batch * (size_t)a->seq;
    lora_host = calloc(np, sizeof(float));
    tokens = malloc(N * sizeof(int));
    lengths = calloc((size_t)a->batch, sizeof(int));
    if (!lora_host || !tokens || !lengths) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    for (int b = 0; b < a->batch; b++) lengths[b] = a->seq;
    bench_tokens(tokens, N, cfg->vocab_size, 11);
    llama_lora lo_host, lo;
    float scaling = 16.0f / (float)a->rank;
    if (llama_lora_bind(&lo_host, cfg, a->rank, scaling, target, lora_host, err, errlen) != 0)
        goto out;
    /* PEFT's init: A random, B zero. */
    for (int p = 0; p < LLAMA_NPROJ; p++) {
        if (!target[p]) continue;
        size_t out_d, in_d;
        llama_proj_dims(cfg, (llama_proj)p, &out_d, &in_d);
        bench_fill(lo_host.a[p], (size_t)cfg->num_hidden_layers * (size_t)a->rank * in_d,
                   100 + (uint64_t)p);
    }
    size_t bytes = np * sizeof(float);
    dlora = gpu->alloc(bytes, err, errlen);
    dgrads = dlora ? gpu->alloc(bytes, err, errlen) : NULL;
    od.m = dgrads ? gpu->alloc(bytes, err, errlen) : NULL;
    od.v = od.m ? gpu->alloc(bytes, err, errlen) : NULL;
    od.norm = od.v ? gpu->alloc(BENCH_NORM_BYTES, err, errlen) : NULL;
    if (!od.norm) goto out;
    gpu->upload(dlora, lora_host, bytes);
    gpu->zero(od.m, np);
    gpu->zero(od.v, np);
    if (llama_lora_bind(&lo, cfg, a->rank, scaling, target, dlora, err, errlen) != 0) goto out;
    adamw_range range = {0, np, true};
    adamw_config acfg = adamw_default_config();
    if (adamw_new(&acfg, &range, 1, &opt, err, errlen) != 0) goto out;
    if (llama_state_init_train(&s, gpu, cfg, a->batch, a->seq, err, errlen) != 0) goto out;
    double t_start = 0.0, loss_first = NAN, loss_last = NAN;
    int skipped_steps = 0;
    for (int step = 0; step < a->warmup + a->steps; step++) {
        if (step == a->warmup) {
            if (cuda_backend_sync(err, errlen) != 0) goto out;
            t_start = util_now_seconds();
        }
        double t_step = util_now_seconds();
        gpu->zero(dgrads, np);
        double loss_sum = 0.0, norm = 0.0;
        long counted = 0;
        bool skipped = false;
        if (llama_lora_loss_and_grad(gpu, &dev, &lo, &s, tokens, tokens, lengths, a->batch,
                                     a->seq, 1.0 / (double)(N - (size_t)a->batch), dgrads,
                                     &loss_sum, &counted, err, errlen) != 0)
            goto out;
        if (bench_opt_step(gpu, opt, &od, dlora, dgrads, np, &norm, &skipped, err, errlen) != 0)
            goto out;
        if (cuda_backend_sync(err, errlen) != 0) goto out;
        if (skipped && step >= a->warmup) skipped_steps++;
        double loss = loss_sum / (double)(counted ? counted : 1);
        if (step == 0) loss_first = loss;
        loss_last = loss;
        fprintf(stderr, "bench_gpu: train %s step %d: loss %.4f, grad norm %.4g%s, %.3f s\n",
                a->shape, step, loss, norm, skipped ? " (not finite: skipped)" : "",
                util_now_seconds() - t_step);
    }
    double seconds = (util_now_seconds() - t_start) / a->steps;
    double tokens_per_step = (double)N;
    double nmm = bench_matmul_params(cfg), nlora = (double)np;
    double flops_per_token = 4.0 * nmm + 6.0 * nlora +
                             12.0 * cfg->num_hidden_layers * (double)a->seq * cfg->hidden_size;
    char mem[32];
    bench_memory_note(mem, sizeof mem);
    printf("{\"bench\": \"train_lora\", \"impl\": \"strata\", \"shape\": \"%s\", \"batch\": %d, "
           "\"seq\": %d, \"rank\": %d, \"precision\": \"%s\", \"steps\": %d, "
           "\"seconds_per_step\": %.6f, \"tokens_per_s\": %.1f, \"mfu\": %.4f, "
           "\"flops_per_token\": %.6g, \"params_matmul\": %.0f, \"params_lora\": %.0f, "
           "\"loss_first\": %.6f, \"loss_last\": %.6f, \"optimizer\": \"device\", "
           "\"optimizer_bytes_per_step\": %d, \"skipped_steps\": %d, "
           "\"gpu_memory_used_gib\": %s}\n",
           a->shape, a->batch, a->seq, a->rank, cuda_precision_name(a->precision), a->steps,
           seconds, tokens_per_step / seconds,
           flops_per_token * tokens_per_step / seconds / BENCH_PEAK_FLOPS, flops_per_token, nmm,
           nlora, loss_first, loss_last, BENCH_NORM_BYTES, skipped_steps, mem);
    fflush(stdout);
    rc = 0;
out:
    adamw_free(opt);
    llama_state_free(&s);
    if (dlora) gpu->free_buf(dlora);
    if (dgrads) gpu->free_buf(dgrads);
    if (od.m) gpu->free_buf(od.m);
    if (od.v) gpu->free_buf(od.v);
    if (od.norm) gpu->free_buf(od.norm);
    llama_model_free_backend(gpu, &dev);
    free(lora_host);
    free(tokens);
    free(lengths);
    cuda_backend_close();
    return rc;
}

/* ---- predict ---------------------------------------------------------------- */

typedef struct {
    int B, C, L;
    const int *lengths;
    float *pooled; /* (L+1, B, C) */
} bench_pool;

static int bench_pool_hook(void *user, int layer, const float *x, int B, int T, int C, char *err,
                           size_t errlen) {
    bench_pool *p = user;
    if (B != p->B || C != p->C || layer < 0 || layer > p->L)
        return err_set(err, errlen, "hook: unexpected layer %d", layer);
    for (int b = 0; b < B; b++)
        memcpy(p->pooled + ((size_t)layer * (size_t)B + (size_t)b) * (size_t)C,
               x + ((size_t)b * (size_t)T + (size_t)(p->lengths[b] - 1)) * (size_t)C,
               (size_t)C * sizeof(float));
    return 0;
}

static int bench_predict(const bench_args *a, char *err, size_t errlen) {
    int rc = -1;
    const backend *gpu = cuda_backend_open(0, a->precision, err, errlen);
    if (!gpu) return -1;
    llama_model dev;
    memset(&dev, 0, sizeof dev);
    llama_state s;
    memset(&s, 0, sizeof s);
    size_t N = (size_t)a->batch * (size_t)a->seq;
    int *tokens = malloc(N * sizeof(int)), *lengths = calloc((size_t)a->batch, sizeof(int));
    float *pooled = NULL;
    if (!tokens || !lengths) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    if (bench_model(gpu, a->shape, &dev, err, errlen) != 0) goto out;
    const llama_config *cfg = &dev.cfg;
    pooled = malloc((size_t)(cfg->num_hidden_layers + 1) * (size_t)a->batch *
                    (size_t)cfg->hidden_size * sizeof(float));
    if (!pooled) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    bench_tokens(tokens, N, cfg->vocab_size, 13);
    for (int b = 0; b < a->batch; b++) lengths[b] = a->seq;
    if (llama_state_init(&s, gpu, cfg, a->batch, a->seq, err, errlen) != 0) goto out;
    bench_pool pool = {a->batch, cfg->hidden_size, cfg->num_hidden_layers, lengths, pooled};
    /* with the hook (a predict job), then compute alone */
    for (int variant = 0; variant < 2; variant++) {
        double t_start = 0.0;
        for (int it = 0; it < a->warmup + a->steps; it++) {
            if (it == a->warmup) {
                if (cuda_backend_sync(err, errlen) != 0) goto out;
                t_start = util_now_seconds();
            }
            if (llama_forward(gpu, &dev, &s, tokens, lengths, a->batch, a->seq,
                              variant == 0 ? bench_pool_hook : NULL, &pool, NULL, err,
                              errlen) != 0)
                goto out;
            if (cuda_backend_sync(err, errlen) != 0) goto out;
        }
        double seconds = (util_now_seconds() - t_start) / a->steps;
        char mem[32];
        bench_memory_note(mem, sizeof mem);
        printf("{\"bench\": \"%s\", \"impl\": \"strata\", \"shape\": \"%s\", \"batch\": %d, "
               "\"seq\": %d, \"precision\": \"%s\", \"seconds_per_batch\": %.6f, "
               "\"sequences_per_s\": %.2f, \"tokens_per_s\": %.1f, \"gpu_memory_used_gib\": %s}\n",
               variant == 0 ? "predict" : "forward_only", a->shape, a->batch, a->seq,
               cuda_precision_name(a->precision), seconds, a->batch / seconds,
               (double)N / seconds, mem);
        fflush(stdout);
    }
    rc = 0;
out:
    llama_state_free(&s);
    llama_model_free_backend(gpu, &dev);
    free(tokens);
    free(lengths);
    free(pooled);
    cuda_backend_close();
    return rc;
}

/* ---- cka ---------------------------------------------------------------------- */

static int bench_cka(const bench_args *a, char *err, size_t errlen) {
    size_t n = a->rows * a->dim;
    double *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    double *x2 = malloc(n * sizeof *x2), *y2 = malloc(n * sizeof *y2);
    float *tmp = malloc(n * sizeof *tmp);
    int rc = -1;
    if (!x || !y || !x2 || !y2 || !tmp) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    bench_fill(tmp, n, 21);
    for (size_t i = 0; i < n; i++) x[i] = tmp[i];
    bench_fill(tmp, n, 22);
    for (size_t i = 0; i < n; i++) y[i] = 0.5 * x[i] + tmp[i]; /* related, not equal */
    memcpy(x2, x, n * sizeof *x);
    memcpy(y2, y, n * sizeof *y);
    cka_matrix mx = {x, a->rows, a->dim, a->dim}, my = {y, a->rows, a->dim, a->dim};
    cka_matrix cx = {x2, a->rows, a->dim, a->dim}, cy = {y2, a->rows, a->dim, a->dim};
    cka_options opt = {CKA_LINEAR, false, 1.0, CKA_SPACE_FEATURE};
    cka_gpu_call call;
    memset(&call, 0, sizeof call);
    call.device = 0;
    call.precision = CKA_GPU_AUTO;
    cka_result rg, rc_cpu;
    /* a small warm-up call so that context creation is not timed */
    cka_matrix wx = {x2, 64, a->dim, a->dim}, wy = {y2, 64, a->dim, a->dim};
    double *wxd = malloc(64 * a->dim * sizeof *wxd), *wyd = malloc(64 * a->dim * sizeof *wyd);
    if (wxd && wyd) {
        memcpy(wxd, x, 64 * a->dim * sizeof *wxd);
        memcpy(wyd, y, 64 * a->dim * sizeof *wyd);
        wx.data = wxd, wy.data = wyd;
        cka_result wr;
        cka_gpu_call wcall = call;
        cka_gpu_compute_with(&wx, &wy, &opt, &wcall, NULL, &wr, err, errlen);
    }
    free(wxd);
    free(wyd);
    double t0 = util_now_seconds();
    if (cka_gpu_compute_with(&mx, &my, &opt, &call, NULL, &rg, err, errlen) != 0) goto out;
    double tg = util_now_seconds() - t0;
    t0 = util_now_seconds();
    if (cka_compute(&cx, &cy, &opt, NULL, &rc_cpu, err, errlen) != 0) goto out;
    double tc = util_now_seconds() - t0;
    printf("{\"bench\": \"cka\", \"impl\": \"strata\", \"rows\": %zu, \"dim\": %zu, "
           "\"precision\": \"%s\", \"seconds\": %.6f, \"cka\": %.12f, \"cpu_seconds\": %.6f, "
           "\"cpu_cka\": %.12f, \"cpu_threads\": %ld}\n",
           a->rows, a->dim, call.used == CKA_GPU_F32 ? "f32" : "f64", tg, rg.cka, tc, rc_cpu.cka,
           sysconf(_SC_NPROCESSORS_ONLN));
    fflush(stdout);
    rc = 0;
out:
    free(x), free(y), free(x2), free(y2), free(tmp);
    return rc;
}

/* ---- gemm --------------------------------------------------------------------- */

/* gemm.h's workspace for the bench's context, as the backend's. */
#define BENCH_GEMM_WORKSPACE ((size_t)32 << 20)
/* Each product is repeated for at least this long per path. */
#define BENCH_GEMM_SECONDS 0.2

/* One linear layer of the model: W (out, in). */
typedef struct {
    const char *name;
    size_t out, in;
} bench_linear;

/* One product: C (M, N) = op(A) op(B), row-major, as gemm_run takes it. */
typedef struct {
    char name[40];
    bool ta, tb;
    size_t M, N, K, lda, ldb, ldc;
    const uint16_t *A, *B;
    float *C;
} bench_gemm_op;

/* n random 16-bit operands (uniform, std 0.02) of type into dev, through
 * host. 0, or -1 with err. */
static int bench_gemm_fill(const backend *gpu, gemm_type type, uint16_t *dev, size_t n,
                           uint64_t seed, char *err, size_t errlen) {
    float *f = malloc(n * sizeof *f);
    uint16_t *h = malloc(n * sizeof *h);
    if (!f || !h) {
        free(f);
        free(h);
        return err_set(err, errlen, "out of host memory for %zu operands", n);
    }
    bench_fill(f, n, seed);
    for (size_t i = 0; i < n; i++)
        h[i] = type == GEMM_BF16 ? half_bits_bf16_from_f32(f[i]) : half_bits_f16_from_f32(f[i]);
    gpu->upload(dev, h, n * sizeof *h);
    free(f);
    free(h);
    return 0;
}

/* Seconds per product of op on path: two warm-up runs, one timed run to
 * size the repetitions, then enough of them for BENCH_GEMM_SECONDS (3 to
 * 1000). *reps gets their count. 0, or -1 with err. */
static int bench_gemm_time(gemm_ctx *g, gemm_type type, gemm_path path, const bench_gemm_op *op,
                           double *seconds, int *reps, char *err, size_t errlen) {
    gemm_set_path(g, path);
    int n = 1;
    for (int pass = 0; pass < 3; pass++) {
        int count = pass == 0 ? 2 : pass == 1 ? 1 : n;
        if (cuda_backend_sync(err, errlen) != 0) return -1;
        double t0 = util_now_seconds();
        for (int i = 0; i < count; i++)
            if (gemm_run(g, type, op->ta, op->tb, op->M, op->N, op->K, 1.0f, op->A, op->lda,
                         op->B, op->ldb, 0.0f, op->C, op->ldc, err, errlen) != 0)
                return -1;
        if (cuda_backend_sync(err, errlen) != 0) return -1;
        double t = util_now_seconds() - t0;
        if (pass == 1) {
            double want = t > 0.0 ? BENCH_GEMM_SECONDS / t : 1000.0;
            n = want < 3.0 ? 3 : want > 1000.0 ? 1000 : (int)want;
        } else if (pass == 2) {
            *seconds = t / n;
            *reps = n;
        }
    }
    return 0;
}

/* max |a - b| / max |b| over n values (+inf for a value not finite). */
static double bench_rel_diff(const float *a, const float *b, size_t n) {
    double worst = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(b[i])) return INFINITY;
        scale = fmax(scale, fabs((double)b[i]));
        worst = fmax(worst, fabs((double)a[i] - (double)b[i]));
    }
    return scale > 0.0 ? worst / scale : worst;
}

/* One product through both paths: times, the Lt algorithm's presence and
 * the two results' difference; one JSON line. 0, or -1 with err. */
static int bench_gemm_op_run(const backend *gpu, gemm_ctx *g, gemm_type type,
                             const bench_gemm_op *op, const char *prec, char *err,
                             size_t errlen) {
    double t_ex = 0.0, t_lt = 0.0;
    int r_ex = 0, r_lt = 0;
    gemm_stats s0, s1;
    size_t nc = op->M * op->ldc;
    float *c_ex = malloc(nc * sizeof *c_ex), *c_lt = malloc(nc * sizeof *c_lt);
    int rc = -1;
    if (!c_ex || !c_lt) {
        err_set(err, errlen, "out of host memory for a %zu x %zu product", op->M, op->N);
        goto out;
    }
    if (bench_gemm_time(g, type, GEMM_PATH_EX, op, &t_ex, &r_ex, err, errlen) != 0) goto out;
    gpu->download(c_ex, op->C, nc * sizeof *c_ex);
    gemm_get_stats(g, &s0);
    if (bench_gemm_time(g, type, GEMM_PATH_LT, op, &t_lt, &r_lt, err, errlen) != 0) goto out;
    gemm_get_stats(g, &s1);
    gpu->download(c_lt, op->C, nc * sizeof *c_lt);
    if (cuda_backend_sync(err, errlen) != 0) goto out;
    double flops = 2.0 * (double)op->M * (double)op->N * (double)op->K;
    bool lt_algo = s1.lt_fallbacks == s0.lt_fallbacks && s1.lt_products > s0.lt_products;
    double diff = bench_rel_diff(c_lt, c_ex, nc);
    char diff_s[32] = "null"; /* JSON has no infinity */
    if (isfinite(diff)) snprintf(diff_s, sizeof diff_s, "%.3g", diff);
    fprintf(stderr, "bench_gpu: gemm %-16s %5zu x %5zu x %5zu: ex %.1f TFLOP/s, lt %.1f%s\n",
            op->name, op->M, op->N, op->K, flops / t_ex * 1e-12, flops / t_lt * 1e-12,
            lt_algo ? "" : " (no Lt algorithm: ran Ex)");
    printf("{\"bench\": \"gemm\", \"impl\": \"strata\", \"product\": \"%s\", \"M\": %zu, "
           "\"N\": %zu, \"K\": %zu, \"trans_a\": %s, \"trans_b\": %s, \"precision\": \"%s\", "
           "\"ex_seconds\": %.9f, \"lt_seconds\": %.9f, \"ex_tflops\": %.3f, "
           "\"lt_tflops\": %.3f, \"lt_over_ex\": %.4f, \"lt_algo\": %s, "
           "\"lt_vs_ex_rel_diff\": %s, \"ex_reps\": %d, \"lt_reps\": %d}\n",
           op->name, op->M, op->N, op->K, op->ta ? "true" : "false", op->tb ? "true" : "false",
           prec, t_ex, t_lt, flops / t_ex * 1e-12, flops / t_lt * 1e-12, t_ex / t_lt,
           lt_algo ? "true" : "false", diff_s, r_ex, r_lt);
    fflush(stdout);
    rc = 0;
out:
    free(c_ex);
    free(c_lt);
    return rc;
}

static int bench_gemm(const bench_args *a, char *err, size_t errlen) {
    static const bench_linear full[] = {
        {"q/k/v/o", 4096, 4096}, {"gate/up", 11008, 4096}, {"down", 4096, 11008},
        {"lm_head", 32000, 4096}};
    static const bench_linear tiny[] = {
        {"q/k/v/o", 64, 64}, {"gate/up", 176, 64}, {"down", 64, 176}, {"lm_head", 512, 64}};
    bool is_tiny = strcmp(a->shape, "tiny") == 0;
    if (!is_tiny && strcmp(a->shape, "7b") != 0)
        return err_set(err, errlen, "gemm: shape %s (7b or tiny)", a->shape);
    if (a->precision == CUDA_FP32)
        return err_set(err, errlen, "gemm: the Lt path is for bf16/fp16 products");
    const bench_linear *lin = is_tiny ? tiny : full;
    size_t T = a->tokens ? a->tokens : is_tiny ? 64 : 4096;
    gemm_type type = a->precision == CUDA_FP16 ? GEMM_F16 : GEMM_BF16;
    const char *prec = cuda_precision_name(a->precision);
    const backend *gpu = cuda_backend_open(0, a->precision, err, errlen);
    if (!gpu) return -1;
    gemm_ctx *g = NULL;
    int rc = -1;
    if (gemm_ctx_new(cuda_backend_stream(), BENCH_GEMM_WORKSPACE, &g, err, errlen) != 0)
        goto out;
    fprintf(stderr, "bench_gpu: gemm: %zu tokens, %s, STRATA_GEMM default %s\n", T, prec,
            gemm_path_name(gemm_get_path(g)));
    for (int l = 0; l < 4; l++) {
        size_t out = lin[l].out, in = lin[l].in;
        size_t nc = T * out > out * in ? T * out : out * in;
        nc = nc > T * in ? nc : T * in;
        uint16_t *x = gpu->alloc(T * in * 2, err, errlen);
        uint16_t *w = x ? gpu->alloc(out * in * 2, err, errlen) : NULL;
        uint16_t *dy = w ? gpu->alloc(T * out * 2, err, errlen) : NULL;
        float *c = dy ? gpu->alloc(nc * sizeof(float), err, errlen) : NULL;
        int lrc = -1;
        if (c && bench_gemm_fill(gpu, type, x, T * in, 31 + (uint64_t)l, err, errlen) == 0 &&
            bench_gemm_fill(gpu, type, w, out * in, 41 + (uint64_t)l, err, errlen) == 0 &&
            bench_gemm_fill(gpu, type, dy, T * out, 51 + (uint64_t)l, err, errlen) == 0) {
            bench_gemm_op ops[3] = {
                {"", false, true, T, out, in, in, in, out, x, w, c},
                {"", false, false, T, in, out, out, in, in, dy, w, c},
                {"", true, false, out, in, T, out, in, in, dy, x, c},
            };
            static const char *what[3] = {"fwd", "dx", "dw"};
            lrc = 0;
            for (int k = 0; k < 3 && lrc == 0; k++) {
                snprintf(ops[k].name, sizeof ops[k].name, "%s %s", lin[l].name, what[k]);
                lrc = bench_gemm_op_run(gpu, g, type, &ops[k], prec, err, errlen);
            }
        }
        if (x) gpu->free_buf(x);
        if (w) gpu->free_buf(w);
        if (dy) gpu->free_buf(dy);
        if (c) gpu->free_buf(c);
        if (lrc != 0) goto out;
    }
    gemm_stats st;
    gemm_get_stats(g, &st);
    fprintf(stderr, "bench_gpu: gemm: %llu Ex and %llu Lt products, %llu Lt fallbacks, %llu "
            "heuristic queries, %u shapes cached\n", st.ex_products, st.lt_products,
            st.lt_fallbacks, st.lt_queries, st.cached_shapes);
    rc = 0;
out:
    gemm_ctx_free(g);
    cuda_backend_close();
    return rc;
}

/* ---- main ---------------------------------------------------------------------- */

static int bench_int(const char *s, int64_t lo, int64_t hi, int64_t *out) {
    if (util_parse_i64(s, lo, hi, out) != 0) {
        fprintf(stderr, "bench_gpu: %s is not a number in [%lld, %lld]\n", s, (long long)lo,
                (long long)hi);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    bench_args a = {.shape = "1b", .batch = 0, .seq = 0, .rank = 8, .warmup = 1, .steps = 3,
                    .rows = 8000, .dim = 4096, .precision = CUDA_BF16};
    if (argc < 2) {
        fprintf(stderr, "usage: bench_gpu train|predict|cka|gemm [options] (see bench_gpu.c)\n");
        return 2;
    }
    a.mode = argv[1];
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        int64_t n = 0;
        char err[ERR_LEN];
        if (strcmp(k, "--shape") == 0) {
            a.shape = v;
        } else if (strcmp(k, "--precision") == 0) {
            if (cuda_precision_parse(v, &a.precision, err, sizeof err) != 0) {
                fprintf(stderr, "bench_gpu: %s\n", err);
                return 2;
            }
        } else if (bench_int(v, 1, 1 << 20, &n) != 0) {
            return 2;
        } else if (strcmp(k, "--batch") == 0) {
            a.batch = (int)n;
        } else if (strcmp(k, "--seq") == 0) {
            a.seq = (int)n;
        } else if (strcmp(k, "--rank") == 0) {
            a.rank = (int)n;
        } else if (strcmp(k, "--warmup") == 0) {
            a.warmup = (int)n;
        } else if (strcmp(k, "--steps") == 0) {
            a.steps = (int)n;
        } else if (strcmp(k, "--rows") == 0) {
            a.rows = (size_t)n;
        } else if (strcmp(k, "--dim") == 0) {
            a.dim = (size_t)n;
        } else if (strcmp(k, "--tokens") == 0) {
            a.tokens = (size_t)n;
        } else {
            fprintf(stderr, "bench_gpu: unknown option %s\n", k);
            return 2;
        }
    }
    cuda_device_info dev;
    char why[ERR_LEN] = "", err[ERR_LEN] = "";
    if (cuda_devices(&dev, 1, why, sizeof why) <= 0) {
        fprintf(stderr, "bench_gpu: no GPU: %s\n", why);
        return 77;
    }
    fprintf(stderr, "bench_gpu: %s on %s\n", a.mode, dev.name);
    int rc;
    if (strcmp(a.mode, "train") == 0) {
        if (!a.batch) a.batch = 4;
        if (!a.seq) a.seq = 1024;
        rc = bench_train(&a, err, sizeof err);
    } else if (strcmp(a.mode, "predict") == 0) {
        if (!a.batch) a.batch = 8;
        if (!a.seq) a.seq = 512;
        rc = bench_predict(&a, err, sizeof err);
    } else if (strcmp(a.mode, "cka") == 0) {
        rc = bench_cka(&a, err, sizeof err);
    } else if (strcmp(a.mode, "gemm") == 0) {
        if (strcmp(a.shape, "1b") == 0) a.shape = "7b"; /* the default shape */
        rc = bench_gemm(&a, err, sizeof err);
    } else {
        fprintf(stderr, "bench_gpu: unknown mode %s\n", a.mode);
        return 2;
    }
    if (rc != 0) {
        fprintf(stderr, "bench_gpu: %s: %s\n", a.mode, err);
        printf("{\"bench\": \"%s\", \"impl\": \"strata\", \"shape\": \"%s\", \"error\": \"%s\"}\n",
               a.mode, a.shape, strchr(err, '"') ? "see stderr" : err);
        return 1;
    }
    return 0;
}
