/* test_cudaemu_train.c - predict and train jobs through runner_run on GPU 0
 * of the emulated CUDA runtime (tests/cuda_emu: the real .cu kernels and
 * backend, run on the CPU, with cuda_devices() == 1), against the same jobs
 * on the CPU backend (ctx.gpu = -1). Model: the reference chat model
 * (tests/reference/fixtures/chat: C 16, L 2, V 427, tied); data: the six
 * alpaca examples of tests/fixtures/predict/dataset.json.
 *
 * Tolerances, as max |gpu - cpu| / max |cpu| over each compared set (each
 * saved tensor on its own):
 *   fp32: 1e-5 (FP32_TOL) for every hidden state, every loss, learning rate
 *     and grad norm, and every tensor of the saved adapter / model; greedy
 *     generations identical.
 *   bf16 / fp16: products round their operands to 8 (bf16) or 11 (fp16)
 *     significant bits before an fp32 accumulation, so each product is off
 *     by up to ~2^-8 relative; through two layers and a few optimizer steps
 *     hidden states and losses stay within 3e-2 (LOWP_TOL) of the CPU's,
 *     grad norms within 10 times that. The trained tensors are compared
 *     within 0.15 of each tensor's largest |value| (LOWP_TENSOR_TOL): AdamW
 *     moves every element by about lr per step whatever its gradient's
 *     size, so an element whose gradient is near zero can move the other
 *     way under rounding (lr 0.005 to 0.01 over 3 steps, against tensors of
 *     largest |value| 0.1 to 1).
 *     Measured (emulator): hidden states 3e-4 (bf16); losses 1e-4, grad
 *     norms 1e-3, tensors 0.02 (bf16 LoRA) and 0.06 (fp16 full).
 * The optimizer runs on the device (train.c: cuk_sumsq + cuk_adamw, the
 * moments in device memory): every GPU train job's log must say that a
 * step moved 16 bytes (the gradients' sum of squares and inf/NaN flag) and
 * that its steps moved 16 each, nothing more. Where the optimizer ran on
 * the host before, a step downloaded the gradients and uploaded the
 * parameters: 8 bytes per trainable parameter (the full fp32 runs here:
 * 2 x 4 x 12,672 = 101,376 bytes a step, printed per run; a 7B model: 2 x 27 GB).
 * fp32 with clipping active at every step (max_grad_norm below every norm,
 * asserted) and weight decay on some ranges, for full fine-tuning and LoRA,
 * within FP32_TOL of the CPU; checkpoints cross devices: one written on
 * the GPU (moments within FP32_TOL of the CPU's, same step, config and
 * ranges) continues on the CPU, one written on the CPU continues on the
 * GPU, both ending within FP32_TOL of the uninterrupted CPU run.
 * Also: the job logs which device it ran on and the result says so; a GPU
 * that does not exist falls back to the CPU, unless the job required one,
 * which then fails without a retry. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/npy.h"
#include "common/st.h"
#include "common/util.h"
#include "tests/unit/testutil.h"
#include "worker/engine/cuda/cuda.h"
#include "worker/runner.h"

#define FP32_TOL 1e-5
#define LOWP_TOL 3e-2
#define LOWP_TENSOR_TOL 0.15

static char model_dir[PATH_MAX];
static char dataset_path[PATH_MAX];

static int setup(void **state) {
    (void)state;
    tu_reference_path(model_dir, sizeof model_dir, "chat");
    char dir[PATH_MAX];
    tu_fixture_path(dir, sizeof dir, "predict");
    snprintf(dataset_path, sizeof dataset_path, "%.3000s/dataset.json", dir);
    return 0;
}

/* The job's log lines, joined with newlines. */
static char job_log[16384];

static void test_log(runner_ctx *ctx, const char *line) {
    (void)ctx;
    size_t used = strlen(job_log);
    snprintf(job_log + used, sizeof job_log - used, "%s\n", line);
}

/* The checkpoint the next job resumes from (resume_step 0: none). */
static char resume_dir[PATH_MAX];
static int64_t resume_step;

static int test_resolve_checkpoint(runner_ctx *ctx, char *dir, size_t dirlen, int64_t *step,
                                   char *err, size_t errlen) {
    (void)ctx;
    (void)err;
    (void)errlen;
    *step = resume_step;
    snprintf(dir, dirlen, "%s", resume_dir);
    return 0;
}

/* Runs kind with spec_text ('' quotes; %M the model dir, %D the dataset)
 * on gpu (-1: the CPU), gpu_required as given, resuming from resume_dir's
 * checkpoint of resume_step when that is not 0. Returns runner_run's
 * status; *result on success, err and *retryable on failure. */
static int run_job(tu_run *run, const char *kind, const char *spec_text, int gpu,
                   bool gpu_required, json_t **result, bool *retryable, char *err,
                   size_t errlen) {
    json_t *spec = tu_spec_load(spec_text, model_dir, dataset_path);
    atomic_int cancel;
    atomic_init(&cancel, 0);
    runner_ctx ctx = tu_run_ctx(run, &cancel);
    ctx.log = test_log;
    ctx.gpu = gpu;
    ctx.gpu_required = gpu_required;
    ctx.resolve_checkpoint = test_resolve_checkpoint;
    job_log[0] = '\0';
    bool cancelled = false;
    *retryable = false;
    int rc = runner_run(kind, spec, &ctx, result, retryable, &cancelled, err, errlen);
    assert_false(cancelled);
    json_decref(spec);
    return rc;
}

/* Runs the job and fails the test when it fails; returns its result. */
static json_t *run_ok(tu_run *run, const char *kind, const char *spec_text, int gpu) {
    char err[ERR_LEN];
    json_t *result = NULL;
    bool retryable;
    if (run_job(run, kind, spec_text, gpu, false, &result, &retryable, err, sizeof err) != 0)
        fail_msg("%s job on %s failed: %s", kind, gpu < 0 ? "the CPU" : "the GPU", err);
    return result;
}

/* Compares the number arrays result[key] of two runs; returns the relative
 * difference. */
static double series_diff(json_t *gpu, json_t *cpu, const char *key) {
    json_t *a = json_object_get(gpu, key), *b = json_object_get(cpu, key);
    size_t n = json_array_size(b);
    assert_true(n > 0);
    assert_int_equal(json_array_size(a), n);
    double *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    assert_true(x && y);
    for (size_t i = 0; i < n; i++) {
        x[i] = json_number_value(json_array_get(a, i));
        y[i] = json_number_value(json_array_get(b, i));
    }
    double d = tu_rel_err(x, y, n, key);
    free(x);
    free(y);
    return d;
}

/* Compares every hidden_states_{l}.npy of two predict runs, l = 0..L. */
static double hidden_diff(const tu_run *gpu, const tu_run *cpu, int L) {
    double worst = 0;
    for (int l = 0; l <= L; l++) {
        char a[PATH_MAX + 64], b[PATH_MAX + 64], what[32];
        snprintf(a, sizeof a, "%s/hidden_states_%d.npy", gpu->out, l);
        snprintf(b, sizeof b, "%s/hidden_states_%d.npy", cpu->out, l);
        npy_header ha, hb;
        double *x = tu_read_npy(a, &ha), *y = tu_read_npy(b, &hb);
        assert_int_equal(ha.rows, hb.rows);
        assert_int_equal(ha.cols, hb.cols);
        snprintf(what, sizeof what, "layer %d", l);
        worst = fmax(worst, tu_rel_err(x, y, ha.rows * ha.cols, what));
        free(x);
        free(y);
    }
    return worst;
}

/* Compares every tensor of the safetensors file name in two runs' outputs
 * (same names, shapes); returns the worst relative difference. */
static double tensors_diff(const tu_run *gpu, const tu_run *cpu, const char *name) {
    char a[PATH_MAX + 64], b[PATH_MAX + 64], err[ERR_LEN];
    snprintf(a, sizeof a, "%s/%s", gpu->out, name);
    snprintf(b, sizeof b, "%s/%s", cpu->out, name);
    st_file fa, fb;
    if (st_open(a, &fa, err, sizeof err) != 0 || st_open(b, &fb, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_int_equal(fa.ntensors, fb.ntensors);
    double worst = 0;
    for (size_t i = 0; i < fb.ntensors; i++) {
        const st_tensor *tb = &fb.tensors[i], *ta = st_find(&fa, tb->name);
        if (!ta) fail_msg("%s has no %s", a, tb->name);
        assert_int_equal(ta->count, tb->count);
        float *x = malloc(ta->count * sizeof *x), *y = malloc(tb->count * sizeof *y);
        double *dx = malloc(ta->count * sizeof *dx), *dy = malloc(tb->count * sizeof *dy);
        assert_true(x && y && dx && dy);
        if (st_to_f32(&fa, ta, x, err, sizeof err) != 0 ||
            st_to_f32(&fb, tb, y, err, sizeof err) != 0)
            fail_msg("%s", err);
        for (size_t k = 0; k < tb->count; k++) {
            dx[k] = x[k];
            dy[k] = y[k];
        }
        bool all_zero = true;
        for (size_t k = 0; k < tb->count && all_zero; k++) all_zero = dy[k] == 0;
        /* a tensor the CPU left at zero must be zero on the GPU too */
        if (all_zero)
            for (size_t k = 0; k < ta->count; k++) assert_true(dx[k] == 0);
        else
            worst = fmax(worst, tu_rel_err(dx, dy, tb->count, tb->name));
        free(x);
        free(y);
        free(dx);
        free(dy);
    }
    st_close(&fa);
    st_close(&fb);
    return worst;
}

static void expect_log(const char *needle) {
    if (!strstr(job_log, needle)) fail_msg("no log line with \"%s\" in:\n%s", needle, job_log);
}

static void expect_device(json_t *result, const char *device, const char *precision) {
    assert_string_equal(json_string_value(json_object_get(result, "device")), device);
    assert_string_equal(json_string_value(json_object_get(result, "precision")), precision);
}

static void test_emulated_gpu(void **state) {
    (void)state;
    cuda_device_info devs[CUDA_MAX_DEVICES];
    char why[ERR_LEN] = "";
    assert_int_equal(cuda_devices(devs, CUDA_MAX_DEVICES, why, sizeof why), 1);
    assert_int_equal(devs[0].index, 0);
    assert_true(devs[0].name[0] != '\0');
    assert_true(devs[0].memory_gb > 0);
}

#define PREDICT_SPEC(precision)                                                                 \
    "{'model': {'path': '%M'}, 'dataset': {'path': '%D'}, 'template': 'vanilla', "             \
    "'pool': 'mean', 'dtype': 'float32', 'batch_size': 4, 'generate': {'max_new_tokens': 3}, " \
    "'precision': '" precision "'}"

static void test_predict_fp32(void **state) {
    (void)state;
    tu_run cpu, gpu;
    tu_run_begin(&cpu, "emu-pc");
    tu_run_begin(&gpu, "emu-pg");
    json_t *rc = run_ok(&cpu, "predict", PREDICT_SPEC("fp32"), -1);
    expect_log("running on the CPU (fp32)");
    expect_device(rc, "cpu", "fp32");
    json_t *rg = run_ok(&gpu, "predict", PREDICT_SPEC("fp32"), 0);
    expect_log("running on GPU 0 (");
    expect_log(") in fp32");
    expect_device(rg, "cuda", "fp32");
    double d = hidden_diff(&gpu, &cpu, 2);
    printf("predict fp32: hidden states %.3g relative\n", d);
    assert_true(d <= FP32_TOL);
    /* greedy decoding: the same ids, so the same text */
    char a[PATH_MAX + 64], b[PATH_MAX + 64], *ta = NULL, *tb = NULL, err[ERR_LEN];
    size_t la = 0, lb = 0;
    snprintf(a, sizeof a, "%s/generated_predictions.jsonl", gpu.out);
    snprintf(b, sizeof b, "%s/generated_predictions.jsonl", cpu.out);
    if (util_read_file(a, 1 << 20, &ta, &la, err, sizeof err) != 0 ||
        util_read_file(b, 1 << 20, &tb, &lb, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_true(lb > 0);
    assert_int_equal(la, lb);
    assert_memory_equal(ta, tb, lb);
    free(ta);
    free(tb);
    json_decref(rc);
    json_decref(rg);
    tu_run_end(&cpu);
    tu_run_end(&gpu);
}

static void test_predict_bf16(void **state) {
    (void)state;
    tu_run cpu, gpu;
    tu_run_begin(&cpu, "emu-bc");
    tu_run_begin(&gpu, "emu-bg");
    json_t *rc = run_ok(&cpu, "predict", PREDICT_SPEC("bf16"), -1);
    /* the CPU says it computes in fp32 whatever was asked */
    expect_log("precision bf16 applies on a GPU only: the CPU computes in fp32");
    expect_device(rc, "cpu", "fp32");
    json_t *rg = run_ok(&gpu, "predict", PREDICT_SPEC("bf16"), 0);
    expect_log(") in bf16");
    expect_device(rg, "cuda", "bf16");
    double d = hidden_diff(&gpu, &cpu, 2);
    printf("predict bf16: hidden states %.3g relative\n", d);
    assert_true(d <= LOWP_TOL);
    /* and it is not fp32: the rounding shows */
    assert_true(d > FP32_TOL / 10);
    json_decref(rc);
    json_decref(rg);
    tu_run_end(&cpu);
    tu_run_end(&gpu);
}

#define LORA_SPEC(precision)                                                                     \
    "{'base_model': {'path': '%M'}, 'dataset': {'path': '%D'}, 'template': 'vanilla', "         \
    "'method': 'lora', 'lora': {'r': 4, 'alpha': 8, 'dropout': 0.1, 'targets': ['q_proj', "     \
    "'v_proj', 'down_proj']}, 'learning_rate': 0.01, 'lr_scheduler': 'constant', "              \
    "'batch_size': 3, 'gradient_accumulation_steps': 2, 'max_steps': 3, 'save_steps': 0, "      \
    "'seed': 11, 'precision': '" precision "'}"

#define FULL_SPEC(precision)                                                                     \
    "{'base_model': {'path': '%M'}, 'dataset': {'path': '%D'}, 'template': 'vanilla', "         \
    "'method': 'full', 'learning_rate': 0.005, 'lr_scheduler': 'cosine', 'batch_size': 6, "     \
    "'max_steps': 3, 'save_steps': 0, 'max_grad_norm': 0.5, 'seed': 5, "                        \
    "'precision': '" precision "'}"

/* Fails unless the job log says the optimizer ran on the GPU and its
 * steps moved 16 bytes each between host and device (the gradients' sum of
 * squares and inf/NaN flag), steps of them in this run. */
static void expect_device_optimizer(int64_t steps) {
    char line[128];
    expect_log("optimizer: AdamW on GPU 0 (fp32 master weights and moments of ");
    expect_log("on the device); a step moves 16 bytes to the host");
    snprintf(line, sizeof line, "optimizer: %lld steps moved %lld bytes between host and GPU",
             (long long)steps, (long long)steps * 16);
    expect_log(line);
}

/* Runs spec on the CPU and on the GPU and compares losses, learning rates,
 * grad norms and the saved tensors (file) within tol; every GPU grad norm
 * must exceed min_norm (a max_grad_norm the test wants active). Returns
 * the worst loss difference. */
static double train_pair(const char *spec, const char *file, const char *precision, double tol,
                         double tensor_tol, double min_norm) {
    tu_run cpu, gpu;
    tu_run_begin(&cpu, "emu-tc");
    tu_run_begin(&gpu, "emu-tg");
    json_t *rc = run_ok(&cpu, "train", spec, -1);
    json_t *rg = run_ok(&gpu, "train", spec, 0);
    expect_device(rg, "cuda", precision);
    expect_device_optimizer(json_integer_value(json_object_get(rg, "steps")));
    json_int_t trainable = json_integer_value(json_object_get(rg, "trainable_parameters"));
    assert_true(trainable > 0);
    printf("optimizer step host<->device: 16 bytes (host AdamW: %lld)\n",
           (long long)trainable * 8);
    json_t *gn = json_object_get(rg, "grad_norms");
    for (size_t i = 0; i < json_array_size(gn); i++)
        if (!(json_real_value(json_array_get(gn, i)) > min_norm))
            fail_msg("grad norm %zu is %g, not above %g", i,
                     json_real_value(json_array_get(gn, i)), min_norm);
    if (strcmp(precision, "fp16") == 0) {
        expect_log("fp16: loss scale 65536");
        /* at 2^16 these gradients stay finite: no step skipped */
        assert_int_equal(json_integer_value(json_object_get(rg, "skipped_steps")), 0);
    }
    double dl = series_diff(rg, rc, "losses"), dr = series_diff(rg, rc, "learning_rates");
    double dn = series_diff(rg, rc, "grad_norms"), dt = tensors_diff(&gpu, &cpu, file);
    printf("train %s %s: losses %.3g, lrs %.3g, grad norms %.3g, %s %.3g relative\n", precision,
           file, dl, dr, dn, file, dt);
    assert_true(dl <= tol);
    assert_true(dr <= 1e-12);
    assert_true(dn <= tol * 10); /* a norm of gradients: their error, not the loss's */
    assert_true(dt <= tensor_tol);
    /* the losses moved: the optimizer steps reached the device */
    json_t *losses = json_object_get(rg, "losses");
    assert_true(json_real_value(json_array_get(losses, 2)) !=
                json_real_value(json_array_get(losses, 0)));
    json_decref(rc);
    json_decref(rg);
    tu_run_end(&cpu);
    tu_run_end(&gpu);
    return dl;
}

static void test_train_lora_fp32(void **state) {
    (void)state;
    train_pair(LORA_SPEC("fp32"), "adapter_model.safetensors", "fp32", FP32_TOL, FP32_TOL, 0);
}

static void test_train_full_fp32(void **state) {
    (void)state;
    train_pair(FULL_SPEC("fp32"), "model.safetensors", "fp32", FP32_TOL, FP32_TOL, 0);
}

static void test_train_lora_bf16(void **state) {
    (void)state;
    train_pair(LORA_SPEC("bf16"), "adapter_model.safetensors", "bf16", LOWP_TOL, LOWP_TENSOR_TOL,
               0);
}

static void test_train_full_fp16(void **state) {
    (void)state;
    train_pair(FULL_SPEC("fp16"), "model.safetensors", "fp16", LOWP_TOL, LOWP_TENSOR_TOL, 0);
}

/* Clipping and weight decay on the device optimizer, fp32: max_grad_norm
 * 0.05 is below every step's gradient norm (asserted), so every step clips;
 * weight_decay 0.1 applies to the linear weights and the embedding but not
 * to the norm weights (full fine-tuning: ranges of both kinds) or to the
 * whole adapter (LoRA). Within FP32_TOL of the CPU, as without them. */
#define CLIP_SPEC(method, extra)                                                                \
    "{'base_model': {'path': '%M'}, 'dataset': {'path': '%D'}, 'template': 'vanilla', "         \
    "'method': '" method "', " extra "'learning_rate': 0.01, 'lr_scheduler': 'cosine', "        \
    "'warmup_steps': 1, 'batch_size': 2, 'max_steps': 6, 'save_steps': 2, "                     \
    "'weight_decay': 0.1, 'max_grad_norm': 0.05, 'seed': 7, 'precision': 'fp32'}"
#define CLIP_LORA                                                                               \
    CLIP_SPEC("lora", "'lora': {'r': 2, 'alpha': 4, 'targets': ['q_proj', 'o_proj', "          \
                      "'up_proj']}, ")
#define CLIP_FULL CLIP_SPEC("full", "")
#define CLIP_MAX_NORM 0.05

static void test_train_clip_decay_full(void **state) {
    (void)state;
    train_pair(CLIP_FULL, "model.safetensors", "fp32", FP32_TOL, FP32_TOL, CLIP_MAX_NORM);
}

static void test_train_clip_decay_lora(void **state) {
    (void)state;
    train_pair(CLIP_LORA, "adapter_model.safetensors", "fp32", FP32_TOL, FP32_TOL,
               CLIP_MAX_NORM);
}

/* A little-endian uint64 at p. */
static uint64_t le64(const unsigned char *p) {
    uint64_t x = 0;
    for (int i = 0; i < 8; i++) x |= (uint64_t)p[i] << (8 * i);
    return x;
}

/* Compares two checkpoint optimizer states (adamw.c's format): the same
 * header and ranges byte for byte (step, config, ranges), the moments
 * within tol relative (each of m and v on its own). */
static void optimizer_files_close(const char *a, const char *b, double tol) {
    char *da = NULL, *db = NULL, err[ERR_LEN];
    size_t la = 0, lb = 0;
    if (util_read_file(a, (size_t)1 << 28, &da, &la, err, sizeof err) != 0 ||
        util_read_file(b, (size_t)1 << 28, &db, &lb, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_int_equal(la, lb);
    assert_true(la > 64 && memcmp(da, "STRAdamW", 8) == 0);
    size_t prefix = 64 + 24 * (size_t)le64((const unsigned char *)da + 24);
    assert_true(prefix < la && (la - prefix) % 8 == 0);
    assert_memory_equal(da, db, prefix);
    size_t T = (la - prefix) / 8;
    double *x = malloc(T * sizeof *x), *y = malloc(T * sizeof *y);
    assert_true(x && y);
    for (int which = 0; which < 2; which++) {
        for (size_t i = 0; i < T; i++) {
            float fa, fb;
            memcpy(&fa, da + prefix + (which * T + i) * 4, 4);
            memcpy(&fb, db + prefix + (which * T + i) * 4, 4);
            x[i] = fa;
            y[i] = fb;
        }
        double d = tu_rel_err(x, y, T, which ? "exp_avg_sq" : "exp_avg");
        printf("  checkpoint %s: %s %.3g relative\n", strrchr(a, '/') + 1,
               which ? "exp_avg_sq" : "exp_avg", d);
        assert_true(d <= tol);
    }
    free(x);
    free(y);
    free(da);
    free(db);
}

/* Checkpoints cross devices (fp32, clipping and decay active, 6 steps,
 * checkpoints every 2): A runs on the CPU, B on the GPU, both from the
 * start; C resumes B's (GPU) checkpoint of step 2 on the CPU, D resumes A's
 * (CPU) checkpoint of step 4 on the GPU. The GPU's checkpoint holds the
 * CPU's step, config and ranges and moments within FP32_TOL; C and D end
 * where A ends: every loss, learning rate and grad norm and the final
 * tensors within FP32_TOL, and each says where it resumed. */
static void check_resume_across(const char *spec, const char *file, const char *ckpt) {
    tu_run a, b, c, d;
    tu_run_begin(&a, "emu-ra");
    tu_run_begin(&b, "emu-rb");
    tu_run_begin(&c, "emu-rc");
    tu_run_begin(&d, "emu-rd");
    resume_step = 0;
    json_t *ra = run_ok(&a, "train", spec, -1);
    json_t *rb = run_ok(&b, "train", spec, 0);
    expect_device_optimizer(6);
    char pa[PATH_MAX + 64], pb[PATH_MAX + 64];
    for (int step = 2; step <= 6; step += 2) {
        snprintf(pa, sizeof pa, "%s/checkpoint-%d-optimizer.bin", a.out, step);
        snprintf(pb, sizeof pb, "%s/checkpoint-%d-optimizer.bin", b.out, step);
        optimizer_files_close(pb, pa, FP32_TOL);
        char name[96];
        snprintf(name, sizeof name, "checkpoint-%d-%s", step, ckpt);
        double dt = tensors_diff(&b, &a, name);
        assert_true(dt <= FP32_TOL);
    }
    /* GPU checkpoint of step 2, continued on the CPU */
    snprintf(resume_dir, sizeof resume_dir, "%s", b.out);
    resume_step = 2;
    json_t *rc = run_ok(&c, "train", spec, -1);
    expect_log("train: resumed from checkpoint step 2");
    expect_log("running on the CPU (fp32)");
    /* CPU checkpoint of step 4, continued on the GPU */
    snprintf(resume_dir, sizeof resume_dir, "%s", a.out);
    resume_step = 4;
    json_t *rd = run_ok(&d, "train", spec, 0);
    resume_step = 0;
    expect_log("train: resumed from checkpoint step 4");
    expect_device(rd, "cuda", "fp32");
    expect_device_optimizer(2);
    assert_int_equal(json_integer_value(json_object_get(rc, "resumed_from")), 2);
    assert_int_equal(json_integer_value(json_object_get(rd, "resumed_from")), 4);
    const struct {
        json_t *r;
        tu_run *run;
        const char *what;
    } cont[] = {{rb, &b, "GPU from the start"}, {rc, &c, "GPU step 2 -> CPU"},
                {rd, &d, "CPU step 4 -> GPU"}};
    for (size_t i = 0; i < sizeof cont / sizeof cont[0]; i++) {
        assert_int_equal(json_array_size(json_object_get(cont[i].r, "losses")), 6);
        double dl = series_diff(cont[i].r, ra, "losses");
        double dr = series_diff(cont[i].r, ra, "learning_rates");
        double dn = series_diff(cont[i].r, ra, "grad_norms");
        double dt = tensors_diff(cont[i].run, &a, file);
        printf("%s vs CPU uninterrupted: losses %.3g, lrs %.3g, grad norms %.3g, %s %.3g\n",
               cont[i].what, dl, dr, dn, file, dt);
        assert_true(dl <= FP32_TOL);
        assert_true(dr <= 1e-12);
        assert_true(dn <= FP32_TOL);
        assert_true(dt <= FP32_TOL);
    }
    json_decref(ra);
    json_decref(rb);
    json_decref(rc);
    json_decref(rd);
    tu_run_end(&a);
    tu_run_end(&b);
    tu_run_end(&c);
    tu_run_end(&d);
}

static void test_resume_across_full(void **state) {
    (void)state;
    check_resume_across(CLIP_FULL, "model.safetensors", "model.safetensors");
}

static void test_resume_across_lora(void **state) {
    (void)state;
    check_resume_across(CLIP_LORA, "adapter_model.safetensors", "adapter_model.safetensors");
}

/* fp16 overflow: examples whose only label is EOS, one per step, so each
 * logit's gradient is scaled by the whole loss scale (2^16): past half's
 * 65504 the operands of the head's backward product become inf, the step
 * is skipped and the scale halved until the steps go through; the
 * checkpoint keeps the scaler's state. */
static void test_train_fp16_skip(void **state) {
    (void)state;
    tu_run run;
    tu_run_begin(&run, "emu-skip");
    char data[PATH_MAX], saved[PATH_MAX];
    snprintf(data, sizeof data, "%.3000s/eos.json", run.work);
    static const char eos[] = "[{\"instruction\": \"hello there\", \"input\": \"\", \"output\": \"\"},"
                              " {\"instruction\": \"good day\", \"input\": \"\", \"output\": \"\"}]";
    char err[ERR_LEN];
    if (util_write_file_atomic(data, eos, sizeof eos - 1, 0644, err, sizeof err) != 0)
        fail_msg("%s", err);
    snprintf(saved, sizeof saved, "%s", dataset_path);
    snprintf(dataset_path, sizeof dataset_path, "%s", data);
    json_t *r = run_ok(&run, "train",
                       "{'base_model': {'path': '%M'}, 'dataset': {'path': '%D'}, 'template': "
                       "'vanilla', 'method': 'full', 'learning_rate': 0.001, 'lr_scheduler': "
                       "'constant', 'batch_size': 1, 'max_steps': 8, 'save_steps': 8, 'seed': 3, "
                       "'precision': 'fp16'}",
                       0);
    snprintf(dataset_path, sizeof dataset_path, "%s", saved);
    json_int_t skipped = json_integer_value(json_object_get(r, "skipped_steps"));
    printf("fp16 with one label per step: %lld of 8 steps skipped\n", (long long)skipped);
    assert_true(skipped >= 1 && skipped < 8);
    expect_log("step 1: fp16 gradients overflowed; step skipped, loss scale now 32768");
    /* skipped steps download the norm too, and nothing else */
    expect_device_optimizer(8);
    /* a skipped step reports grad norm 0 and still has a finite loss */
    json_t *norms = json_object_get(r, "grad_norms"), *losses = json_object_get(r, "losses");
    assert_true(json_real_value(json_array_get(norms, 0)) == 0.0);
    assert_true(isfinite(json_real_value(json_array_get(losses, 0))));
    /* once the scale is small enough the steps go through again */
    assert_true(json_real_value(json_array_get(norms, 7)) > 0.0);
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/checkpoint-8-trainer_state.json", run.out);
    json_t *st = tu_load_json(path);
    assert_int_equal(json_integer_value(json_object_get(st, "skipped_steps")), skipped);
    double scale = json_number_value(json_object_get(st, "loss_scale"));
    assert_true(scale == 65536.0 / (double)(1 << skipped));
    json_decref(st);
    json_decref(r);
    tu_run_end(&run);
}

static void test_fallback_and_required(void **state) {
    (void)state;
    tu_run run;
    tu_run_begin(&run, "emu-fb");
    char err[ERR_LEN];
    json_t *result = NULL;
    bool retryable = true;
    /* GPU 7 does not exist: logged, and the job runs on the CPU */
    assert_int_equal(run_job(&run, "predict", PREDICT_SPEC("bf16"), 7, false, &result,
                             &retryable, err, sizeof err),
                     0);
    expect_log("cannot use GPU 7 (GPU 7 is not one of this worker's 1 GPU)");
    expect_device(result, "cpu", "fp32");
    json_decref(result);
    result = NULL;
    /* unless the job required a GPU */
    assert_int_equal(run_job(&run, "train", LORA_SPEC("bf16"), 7, true, &result, &retryable, err,
                             sizeof err),
                     -1);
    assert_null(result);
    assert_false(retryable);
    assert_non_null(strstr(err, "this job needs a GPU and GPU 7 cannot be used"));
    assert_int_equal(run_job(&run, "predict", PREDICT_SPEC("bf16"), -1, true, &result,
                             &retryable, err, sizeof err),
                     -1);
    assert_false(retryable);
    assert_non_null(strstr(err, "this job needs a GPU"));
    tu_run_end(&run);
}

/* A GPU too small for the model: the job fails, retryably (another worker
 * may have more memory), saying it ran out of GPU memory. */
static void test_gpu_out_of_memory(void **state) {
    (void)state;
    tu_run run;
    tu_run_begin(&run, "emu-oom");
    char err[ERR_LEN];
    json_t *result = NULL;
    bool retryable = false;
    setenv("STRATA_EMU_MEMORY", "4096", 1);
    int rc = run_job(&run, "predict", PREDICT_SPEC("fp32"), 0, true, &result, &retryable, err,
                     sizeof err);
    unsetenv("STRATA_EMU_MEMORY");
    assert_int_equal(rc, -1);
    assert_null(result);
    assert_non_null(strstr(err, "out of GPU memory"));
    assert_true(runner_err_is_oom(err));
    assert_true(retryable);
    tu_run_end(&run);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_emulated_gpu),
        cmocka_unit_test(test_gpu_out_of_memory),
        cmocka_unit_test(test_predict_fp32),
        cmocka_unit_test(test_predict_bf16),
        cmocka_unit_test(test_train_lora_fp32),
        cmocka_unit_test(test_train_full_fp32),
        cmocka_unit_test(test_train_lora_bf16),
        cmocka_unit_test(test_train_full_fp16),
        cmocka_unit_test(test_train_clip_decay_full),
        cmocka_unit_test(test_train_clip_decay_lora),
        cmocka_unit_test(test_resume_across_full),
        cmocka_unit_test(test_resume_across_lora),
        cmocka_unit_test(test_train_fp16_skip),
        cmocka_unit_test(test_fallback_and_required),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
