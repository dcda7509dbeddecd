/* gpu_models.c - the model-level checks of test_gpu (see test_gpu.c):
 *
 *   ref forward NAME     tests/reference/fixtures/NAME (gqa, tied, sharded,
 *                        chat): llama_forward on the GPU in fp32, every hidden
 *                        state and the logits vs the float64 PyTorch
 *                        reference: 1e-4 of max |ref| per file (REF_TOL, the
 *                        tolerance test_forward.c holds the CPU to).
 *   ref train NAME       tests/reference/train/fixtures (sft_gqa, sft_tied,
 *                        pretrain; lora_gqa): llama_loss_and_grad /
 *                        llama_lora_loss_and_grad on the GPU in fp32, loss and
 *                        every saved gradient within 1e-4 (test_backward.c's).
 *   fwd bf16 / fp16      gqa's forward with bf16 / fp16 products (registered
 *                        weight copies) vs the float64 reference: 5e-2 / 1e-2
 *                        of max |ref|. Each product adds an error of about
 *                        2^-9 (bf16) or 2^-12 (fp16) of its output's size;
 *                        over the model's ~15 products along a path the
 *                        errors add in quadrature, ~1e-2 for bf16 at worst,
 *                        and the bound leaves margin on top.
 *   fwd ... frozen       the same forward with the model placed as predict
 *                        jobs and LoRA's base model are
 *                        (llama_model_to_backend_frozen: projections only in
 *                        bf16/fp16, converted on the device): every hidden
 *                        state and the logits equal to the registered-copy
 *                        forward's bit for bit (both round the same fp32
 *                        weights to nearest even, and matmul reads either
 *                        copy the same way: tolerance 0), and within the
 *                        same 5e-2 / 1e-2 of the float64 reference.
 *   train ...            train jobs through runner_run on the reference chat
 *                        model, GPU (ctx.gpu 0) vs CPU (ctx.gpu -1): step 1's
 *                        loss within 1e-5 (the same batch on the same
 *                        weights, only summation orders differ), the 8-step
 *                        curve within 1e-3 in fp32 (AdamW divides by
 *                        sqrt(v), so parameters whose gradients are near
 *                        zero turn rounding-level differences into
 *                        lr-sized steps; their effect on the loss stays
 *                        small) and 3e-2 in bf16 (LoRA bf16: the frozen
 *                        base model). Every GPU train job must log the
 *                        device optimizer (train.c): "a step moves 16 bytes
 *                        to the host" and, at the end, steps x 16 bytes
 *                        moved between host and GPU (tolerance 0 bytes).
 *   predict / cka jobs   predict jobs (last_token and mean pools) on GPU vs
 *                        CPU: hidden states within 1e-5 in fp32 (5e-2 bf16);
 *                        CKA jobs between the two pools: the same CPU-made
 *                        inputs with ctx.gpu 0 vs -1 within 1e-6, and the
 *                        GPU-made vs CPU-made inputs within 1e-4 (inputs
 *                        differing by 1e-5 relative move a CKA value by about
 *                        that much).
 *   cka gpu f64 / f32    cka_gpu_compute_with on a larger random input (a
 *                        column offset by 1e4, NaN rows) vs cka_compute on
 *                        the CPU: float64 products within 1e-6 (the issue's
 *                        bar), float32 products within 1e-4 (centred data
 *                        rounded to float32: 2^-24 per element, products
 *                        summed over thousands of rows). */
#include "tests/gpu/test_gpu.h"

#include "common/npy.h"
#include "common/st.h"
#include "common/util.h"
#include "worker/engine/cka.h"
#include "worker/engine/cuda/cka_gpu.h"
#include "worker/engine/forward.h"
#include "worker/engine/model.h"
#include "worker/engine/model_backend.h"
#include "worker/runner.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define REF_TOL 1e-4
#define FWD_BF16_TOL 5e-2
#define FWD_FP16_TOL 1e-2
#define TRAIN_STEP1_TOL 1e-5
#define TRAIN_FP32_TOL 1e-3
#define TRAIN_BF16_TOL 3e-2
#define PREDICT_FP32_TOL 1e-5
#define PREDICT_BF16_TOL 5e-2
#define CKA_SAME_INPUT_TOL 1e-6
#define CKA_PREDICTED_TOL 1e-4
#define CKA_F32_TOL 1e-4
#define GT_MAX_B 16
#define GT_MAX_LAYERS 16

/* tests/reference/fixtures, or $STRATA_REFERENCE (as testutil.h has it). */
static void gt_reference_dir(char *out, size_t len, const char *rel) {
    const char *env = getenv("STRATA_REFERENCE");
    snprintf(out, len, "%s/%s", env && *env ? env : "tests/reference/fixtures", rel);
}

/* ---- a right-padded batch from a fixture's JSON ---------------------------- */

typedef struct {
    int B, T;
    int *tokens, *labels, *lengths; /* labels NULL when absent */
    long n_counted;
} gt_batch;

static void gt_batch_free(gt_batch *b) {
    free(b->tokens), free(b->labels), free(b->lengths);
    memset(b, 0, sizeof *b);
}

/* Fills b from {"input_ids", "labels"?, "lengths", "T", "n_counted"?}.
 * 0, or -1 with err. */
static int gt_batch_load(gt_batch *b, json_t *j, char *err, size_t errlen) {
    memset(b, 0, sizeof *b);
    json_t *ids = json_object_get(j, "input_ids"), *labels = json_object_get(j, "labels");
    json_t *lens = json_object_get(j, "lengths");
    b->T = (int)json_integer_value(json_object_get(j, "T"));
    b->B = (int)json_array_size(lens);
    b->n_counted = (long)json_integer_value(json_object_get(j, "n_counted"));
    if (b->B < 1 || b->B > GT_MAX_B || b->T < 1 || json_array_size(ids) != (size_t)b->B)
        return err_set(err, errlen, "malformed batch");
    size_t n = (size_t)b->B * (size_t)b->T;
    b->tokens = calloc(n, sizeof(int));
    b->lengths = calloc((size_t)b->B, sizeof(int));
    if (labels) b->labels = calloc(n, sizeof(int));
    if (!b->tokens || !b->lengths || (labels && !b->labels)) {
        gt_batch_free(b);
        return err_set(err, errlen, "out of memory");
    }
    for (int i = 0; i < b->B; i++) {
        b->lengths[i] = (int)json_integer_value(json_array_get(lens, (size_t)i));
        json_t *row = json_array_get(ids, (size_t)i), *lrow = json_array_get(labels, (size_t)i);
        if (json_array_size(row) != (size_t)b->T ||
            (labels && json_array_size(lrow) != (size_t)b->T)) {
            gt_batch_free(b);
            return err_set(err, errlen, "batch row %d is not T = %d long", i, b->T);
        }
        for (int t = 0; t < b->T; t++) {
            size_t k = (size_t)i * (size_t)b->T + (size_t)t;
            b->tokens[k] = (int)json_integer_value(json_array_get(row, (size_t)t));
            if (labels) b->labels[k] = (int)json_integer_value(json_array_get(lrow, (size_t)t));
        }
    }
    return 0;
}

/* Reads a .npy fixture as float32 with an expected element count (caller
 * frees); NULL with err. */
static float *gt_read_npy_f32(const char *path, size_t count, char *err, size_t errlen) {
    double *d = NULL;
    npy_header h;
    if (npy_read_f64(path, &d, &h, err, errlen) != 0) return NULL;
    if (h.rows * h.cols != count) {
        free(d);
        err_set(err, errlen, "%s: %zu values, expected %zu", path, h.rows * h.cols, count);
        return NULL;
    }
    float *f = malloc((count ? count : 1) * sizeof *f);
    if (f)
        for (size_t i = 0; i < count; i++) f[i] = (float)d[i];
    else
        err_set(err, errlen, "out of memory");
    free(d);
    return f;
}

/* ---- reference forward ------------------------------------------------------ */

/* Hook: packs each sequence's real rows of hidden state `layer` at its
 * reference offset. */
typedef struct {
    const int *lengths, *offsets;
    int C, L;
    float *hidden[GT_MAX_LAYERS + 1];
} gt_collect;

static int gt_collect_hook(void *user, int layer, const float *x, int B, int T, int C, char *err,
                           size_t errlen) {
    gt_collect *c = user;
    if (layer < 0 || layer > c->L || C != c->C)
        return err_set(err, errlen, "hook: layer %d, C %d unexpected", layer, C);
    for (int b = 0; b < B; b++)
        memcpy(c->hidden[layer] + (size_t)c->offsets[b] * (size_t)C,
               x + (size_t)b * (size_t)T * (size_t)C,
               (size_t)c->lengths[b] * (size_t)C * sizeof(float));
    return 0;
}

/* How gt_reference_forward_err places the model on the backend. */
typedef enum {
    GT_PLACE_PLAIN,      /* llama_model_to_backend */
    GT_PLACE_REGISTERED, /* llama_model_to_backend + a registered low-precision copy */
    GT_PLACE_FROZEN      /* llama_model_to_backend_frozen (predict, LoRA's base) */
} gt_place;

/* Runs reference model name's batch on be with the model placed as place
 * and returns the worst relative error over its hidden states and logits,
 * or NAN with err. When keep is not NULL, *keep gets every compared output
 * (hidden states 0..L, then the logits, packed; *nkeep floats; malloc'd,
 * the caller frees; NULL on failure) for bitwise comparison of two runs. */
static double gt_reference_forward_err(const backend *be, gt_place place, const char *name,
                                       float **keep, size_t *nkeep, char *err, size_t errlen) {
    char dir[PATH_MAX], path[PATH_MAX + 64];
    gt_reference_dir(dir, sizeof dir, name);
    double worst = NAN;
    llama_model host, dev;
    memset(&host, 0, sizeof host);
    memset(&dev, 0, sizeof dev);
    json_t *expected = NULL;
    gt_batch bt = {0};
    gt_collect col = {0};
    llama_state s;
    memset(&s, 0, sizeof s);
    float *logits = NULL, *packed = NULL, *kept = NULL;
    size_t nkept = 0;
    int offsets[GT_MAX_B];
    bool registered = false;
    if (keep) *keep = NULL, *nkeep = 0;
    if (llama_load_hf(dir, &host, err, errlen) != 0) goto out;
    snprintf(path, sizeof path, "%s/expected.json", dir);
    json_error_t jerr;
    expected = json_load_file(path, 0, &jerr);
    if (!expected) {
        err_set(err, errlen, "%s: %s", path, jerr.text);
        goto out;
    }
    if (gt_batch_load(&bt, json_object_get(expected, "batch"), err, errlen) != 0) goto out;
    int L = host.cfg.num_hidden_layers, C = host.cfg.hidden_size, V = host.cfg.vocab_size;
    size_t n_tokens = (size_t)json_integer_value(json_object_get(expected, "n_tokens"));
    if (L > GT_MAX_LAYERS) {
        err_set(err, errlen, "%s: %d layers", name, L);
        goto out;
    }
    for (int b = 0; b < bt.B; b++)
        offsets[b] = (int)json_integer_value(
            json_array_get(json_object_get(expected, "offsets"), (size_t)b));
    col.lengths = bt.lengths, col.offsets = offsets, col.C = C, col.L = L;
    for (int l = 0; l <= L; l++) {
        col.hidden[l] = calloc(n_tokens * (size_t)C, sizeof(float));
        if (!col.hidden[l]) {
            err_set(err, errlen, "out of memory");
            goto out;
        }
    }
    logits = malloc((size_t)bt.B * (size_t)bt.T * (size_t)V * sizeof *logits);
    packed = malloc(n_tokens * (size_t)V * sizeof *packed);
    if (keep) kept = malloc(n_tokens * ((size_t)(L + 1) * (size_t)C + (size_t)V) * sizeof *kept);
    if (!logits || !packed || (keep && !kept)) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    if ((place == GT_PLACE_FROZEN ? llama_model_to_backend_frozen(be, &host, &dev, err, errlen)
                                  : llama_model_to_backend(be, &host, &dev, err, errlen)) != 0)
        goto out;
    if (place == GT_PLACE_REGISTERED) {
        if (cuda_backend_register_weights(dev.params, dev.nparams, err, errlen) != 0) goto out;
        registered = true;
    }
    if (llama_state_init(&s, be, &dev.cfg, bt.B, bt.T, err, errlen) != 0) goto out;
    if (llama_forward(be, &dev, &s, bt.tokens, bt.lengths, bt.B, bt.T, gt_collect_hook, &col,
                      logits, err, errlen) != 0)
        goto out;
    if (cuda_backend_sync(err, errlen) != 0) goto out;
    worst = 0.0;
    for (int l = 0; l <= L + 1; l++) {
        char file[64];
        size_t cols = l <= L ? (size_t)C : (size_t)V;
        if (l <= L)
            snprintf(file, sizeof file, "hidden_%d.npy", l);
        else
            snprintf(file, sizeof file, "logits.npy");
        snprintf(path, sizeof path, "%s/%s", dir, file);
        float *want = gt_read_npy_f32(path, n_tokens * cols, err, errlen);
        if (!want) {
            worst = NAN;
            goto out;
        }
        const float *got = col.hidden[l <= L ? l : 0];
        if (l > L) {
            for (int b = 0; b < bt.B; b++)
                memcpy(packed + (size_t)offsets[b] * (size_t)V,
                       logits + (size_t)b * (size_t)bt.T * (size_t)V,
                       (size_t)bt.lengths[b] * (size_t)V * sizeof *packed);
            got = packed;
        }
        double e = gt_rel_err(got, want, n_tokens * cols);
        if (!(e <= worst)) worst = e;
        free(want);
        if (kept) {
            memcpy(kept + nkept, got, n_tokens * cols * sizeof *kept);
            nkept += n_tokens * cols;
        }
    }
    if (keep) {
        *keep = kept;
        *nkeep = nkept;
        kept = NULL;
    }
out:
    llama_state_free(&s);
    if (registered) cuda_backend_forget_weights(dev.params);
    llama_model_free_backend(be, &dev);
    llama_free(&host);
    json_decref(expected);
    gt_batch_free(&bt);
    for (int l = 0; l <= GT_MAX_LAYERS; l++) free(col.hidden[l]);
    free(logits);
    free(packed);
    free(kept);
    return worst;
}

void gt_check_reference_forward(const backend *gpu) {
    static const char *const names[] = {"gqa", "tied", "sharded", "chat"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char check[48], err[ERR_LEN] = "";
        snprintf(check, sizeof check, "ref forward %s fp32", names[i]);
        if (!gt_wanted(check)) continue;
        double t0 = util_now_seconds();
        double e = gt_reference_forward_err(gpu, GT_PLACE_PLAIN, names[i], NULL, NULL, err,
                                            sizeof err);
        gt_record(check, e, REF_TOL, util_now_seconds() - t0, isnan(e) ? err : "hidden + logits");
    }
}

/* 0 when a and b (n floats each) are equal bit for bit; otherwise the
 * largest |a - b|, or +inf when the differing bits compare equal or are
 * not numbers (-0 vs 0, NaN), so that any difference fails a 0 bound. */
static double gt_bitwise_err(const float *a, const float *b, size_t n) {
    if (memcmp(a, b, n * sizeof *a) == 0) return 0.0;
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= worst)) worst = d;
    }
    return worst > 0.0 ? worst : INFINITY;
}

/* gqa's forward in bf16 and fp16: registered weight copies vs the float64
 * reference, then the frozen placement vs the reference and vs the
 * registered run bit for bit. */
void gt_check_forward_precision(int device) {
    static const cuda_precision precs[] = {CUDA_BF16, CUDA_FP16};
    for (size_t i = 0; i < 2; i++) {
        const char *pname = cuda_precision_name(precs[i]);
        double tol = precs[i] == CUDA_BF16 ? FWD_BF16_TOL : FWD_FP16_TOL;
        char check[64], check_frozen[64], check_bits[64], err[ERR_LEN] = "", note[160];
        snprintf(check, sizeof check, "fwd %s gqa vs float64 ref", pname);
        snprintf(check_frozen, sizeof check_frozen, "fwd %s gqa frozen vs float64 ref", pname);
        snprintf(check_bits, sizeof check_bits, "fwd %s gqa frozen == registered", pname);
        bool want_frozen = gt_wanted(check_frozen) || gt_wanted(check_bits);
        if (!gt_wanted(check) && !want_frozen) continue;
        double t0 = util_now_seconds(), e = NAN;
        float *reg = NULL, *frz = NULL;
        size_t nreg = 0, nfrz = 0;
        const backend *gpu = cuda_backend_open(device, precs[i], err, sizeof err);
        if (gpu)
            e = gt_reference_forward_err(gpu, GT_PLACE_REGISTERED, "gqa", &reg, &nreg, err,
                                         sizeof err);
        if (gt_wanted(check))
            gt_record(check, e, tol, util_now_seconds() - t0,
                      isnan(e) ? err : "registered weights");
        if (!want_frozen) {
            free(reg);
            continue;
        }
        t0 = util_now_seconds();
        double ef = NAN;
        if (gpu && reg)
            ef = gt_reference_forward_err(gpu, GT_PLACE_FROZEN, "gqa", &frz, &nfrz, err,
                                          sizeof err);
        double seconds = util_now_seconds() - t0;
        if (gt_wanted(check_frozen))
            gt_record(check_frozen, ef, tol, seconds,
                      isnan(ef) ? err : "llama_model_to_backend_frozen");
        if (gt_wanted(check_bits)) {
            double eb = NAN;
            if (frz && nfrz == nreg) {
                eb = gt_bitwise_err(frz, reg, nreg);
                snprintf(note, sizeof note, "%zu floats (hidden states + logits)%s", nreg,
                         eb == 0.0 ? " bit for bit" : "");
            } else if (frz) {
                snprintf(note, sizeof note, "%zu floats vs %zu", nfrz, nreg);
            } else {
                snprintf(note, sizeof note, "%s", err);
            }
            gt_record(check_bits, eb, 0.0, seconds, note);
        }
        free(reg);
        free(frz);
    }
    char err[ERR_LEN];
    if (!cuda_backend_open(device, CUDA_FP32, err, sizeof err))
        gt_record("cuda_backend_open fp32", NAN, 0, 0, err);
}

/* ---- reference training ---------------------------------------------------- */

/* Offset into params of Hugging Face tensor name and its float count;
 * -1 when name is not a tensor of m. */
static long gt_tensor_offset(const llama_model *m, const char *name, size_t *n) {
    const llama_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, FF = (size_t)c->intermediate_size;
    size_t HS = C / (size_t)c->num_attention_heads, KVD = HS * (size_t)c->num_key_value_heads;
    size_t V = (size_t)c->vocab_size;
    const llama_weights *w = &m->w;
    const float *p = NULL;
    if (strcmp(name, "model.embed_tokens.weight") == 0) {
        p = w->embed, *n = V * C;
    } else if (strcmp(name, "lm_head.weight") == 0) {
        p = w->lm_head, *n = V * C;
    } else if (strcmp(name, "model.norm.weight") == 0) {
        p = w->final_norm, *n = C;
    } else {
        int layer = -1, used = 0;
        if (sscanf(name, "model.layers.%d.%n", &layer, &used) != 1 || used == 0 || layer < 0 ||
            layer >= c->num_hidden_layers)
            return -1;
        size_t l = (size_t)layer;
        const char *rest = name + used;
        struct {
            const char *suffix;
            const float *base;
            size_t count;
        } const t[] = {
            {"input_layernorm.weight", w->attn_norm, C},
            {"post_attention_layernorm.weight", w->mlp_norm, C},
            {"self_attn.q_proj.weight", w->wq, C * C},
            {"self_attn.k_proj.weight", w->wk, KVD * C},
            {"self_attn.v_proj.weight", w->wv, KVD * C},
            {"self_attn.o_proj.weight", w->wo, C * C},
            {"mlp.gate_proj.weight", w->w_gate, FF * C},
            {"mlp.up_proj.weight", w->w_up, FF * C},
            {"mlp.down_proj.weight", w->w_down, C * FF},
        };
        for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
            if (strcmp(rest, t[i].suffix) == 0) p = t[i].base + l * t[i].count, *n = t[i].count;
    }
    return p ? (long)(p - m->params) : -1;
}

/* Compares the downloaded gradient buffer grads (layout of base) with
 * every .npy the fixture's "grads" map names, resolving names through
 * offset_of. Returns the worst relative error, NAN with err. */
typedef long (*gt_offset_fn)(const void *user, const char *name, size_t *n);

static double gt_compare_grads(json_t *map, const char *dir, const float *grads,
                               gt_offset_fn offset_of, const void *user, size_t *checked,
                               char *err, size_t errlen) {
    const char *name;
    json_t *file;
    double worst = 0.0;
    *checked = 0;
    json_object_foreach(map, name, file) {
        size_t n = 0;
        long off = offset_of(user, name, &n);
        if (off < 0) {
            err_set(err, errlen, "no tensor %s", name);
            return NAN;
        }
        char path[PATH_MAX + 256];
        snprintf(path, sizeof path, "%s/%s", dir, json_string_value(file));
        float *want = gt_read_npy_f32(path, n, err, errlen);
        if (!want) return NAN;
        double e = gt_rel_err(grads + off, want, n);
        free(want);
        if (!(e <= worst)) worst = e;
        (*checked)++;
    }
    return worst;
}

static long gt_model_offset(const void *user, const char *name, size_t *n) {
    return gt_tensor_offset(user, name, n);
}

/* A LoRA adapter's tensor names resolved in its layout. */
typedef struct {
    const llama_lora *lo;
    const llama_config *cfg;
} gt_lora_names;

static long gt_lora_offset(const void *user, const char *name, size_t *n) {
    const gt_lora_names *ln = user;
    for (int l = 0; l < ln->cfg->num_hidden_layers; l++)
        for (int p = 0; p < LLAMA_NPROJ; p++) {
            if (!ln->lo->target[p]) continue;
            size_t out, in, r = (size_t)ln->lo->r;
            llama_proj_dims(ln->cfg, (llama_proj)p, &out, &in);
            for (int isb = 0; isb < 2; isb++) {
                char want[160];
                snprintf(want, sizeof want, "base_model.model.model.layers.%d.%s.lora_%s.weight",
                         l, llama_proj_module((llama_proj)p), isb ? "B" : "A");
                if (strcmp(want, name) != 0) continue;
                const float *t = isb ? ln->lo->b[p] + (size_t)l * out * r
                                     : ln->lo->a[p] + (size_t)l * r * in;
                *n = r * (isb ? out : in);
                return (long)(t - ln->lo->params);
            }
        }
    return -1;
}

/* One training fixture (lora: lora_gqa over sft_gqa's batch) on gpu in
 * fp32. Records one row: the worse of the loss's and the gradients'
 * relative errors. */
static void gt_reference_train(const backend *gpu, const char *name, bool lora) {
    char check[48], err[ERR_LEN] = "", dir[PATH_MAX], path[PATH_MAX + 64], note[160] = "";
    snprintf(check, sizeof check, "ref train %s fp32", name);
    if (!gt_wanted(check)) return;
    double t0 = util_now_seconds(), worst = NAN;
    gt_reference_dir(dir, sizeof dir, "../train/fixtures/");
    size_t dl = strlen(dir);
    snprintf(dir + dl, sizeof dir - dl, "%s", name);
    llama_model host, dev;
    memset(&host, 0, sizeof host);
    memset(&dev, 0, sizeof dev);
    json_t *expected = NULL, *batch_src = NULL;
    gt_batch bt = {0};
    llama_state s;
    memset(&s, 0, sizeof s);
    float *grads_host = NULL, *lora_host = NULL, *dgrads = NULL, *dlora = NULL;
    llama_lora lo_host, lo_dev;
    size_t np = 0;
    json_error_t jerr;
    snprintf(path, sizeof path, "%s/expected.json", dir);
    expected = json_load_file(path, 0, &jerr);
    if (!expected) {
        err_set(err, sizeof err, "%s: %s", path, jerr.text);
        goto out;
    }
    snprintf(path, sizeof path, "%s/%s", dir,
             json_string_value(json_object_get(expected, "model_dir")));
    if (llama_load_hf(path, &host, err, sizeof err) != 0) goto out;
    batch_src = json_incref(json_object_get(expected, "batch"));
    if (lora) { /* its batch is sft_gqa's */
        json_decref(batch_src);
        char sdir[PATH_MAX];
        snprintf(sdir, sizeof sdir, "%.*s/sft_gqa/expected.json", (int)dl - 1, dir);
        json_t *sft = json_load_file(sdir, 0, &jerr);
        if (!sft) {
            err_set(err, sizeof err, "%s: %s", sdir, jerr.text);
            goto out;
        }
        batch_src = json_incref(json_object_get(sft, "batch"));
        json_decref(sft);
    }
    if (gt_batch_load(&bt, batch_src, err, sizeof err) != 0) goto out;
    if (!bt.labels || bt.n_counted <= 0) {
        err_set(err, sizeof err, "%s: batch without labels", name);
        goto out;
    }
    if (llama_model_to_backend(gpu, &host, &dev, err, sizeof err) != 0) goto out;
    if (llama_state_init_train(&s, gpu, &dev.cfg, bt.B, bt.T, err, sizeof err) != 0) goto out;
    double loss_sum = 0.0;
    long counted = 0;
    const llama_config *cfg = &host.cfg;
    if (!lora) {
        np = host.nparams;
        dgrads = gpu->alloc(np * sizeof(float), err, sizeof err);
        if (!dgrads) goto out;
        gpu->zero(dgrads, np);
        if (llama_loss_and_grad(gpu, &dev, &s, bt.tokens, bt.labels, bt.lengths, bt.B, bt.T,
                                1.0 / (double)bt.n_counted, dgrads, &loss_sum, &counted, err,
                                sizeof err) != 0)
            goto out;
    } else {
        json_t *lj = json_object_get(expected, "lora");
        int r = (int)json_integer_value(json_object_get(lj, "r"));
        double alpha = json_number_value(json_object_get(lj, "alpha"));
        bool target[LLAMA_NPROJ] = {false};
        target[LLAMA_PROJ_Q] = target[LLAMA_PROJ_V] = true;
        np = llama_lora_count(cfg, r, target);
        lora_host = calloc(np ? np : 1, sizeof(float));
        if (!lora_host) {
            err_set(err, sizeof err, "out of memory");
            goto out;
        }
        if (llama_lora_bind(&lo_host, cfg, r, (float)(alpha / r), target, lora_host, err,
                            sizeof err) != 0)
            goto out;
        snprintf(path, sizeof path, "%s/%s/adapter_model.safetensors", dir,
                 json_string_value(json_object_get(expected, "adapter_dir")));
        st_file sf;
        if (st_open(path, &sf, err, sizeof err) != 0) goto out;
        gt_lora_names ln = {&lo_host, cfg};
        const char *tname = NULL;
        for (size_t i = 0; i < sf.ntensors; i++) {
            const st_tensor *t = &sf.tensors[i];
            size_t n = 0;
            long off = gt_lora_offset(&ln, t->name, &n);
            if (off < 0 || t->count != n) {
                tname = t->name;
                break;
            }
            if (st_to_f32(&sf, t, lora_host + off, err, sizeof err) != 0) {
                tname = t->name;
                break;
            }
        }
        st_close(&sf);
        if (tname) {
            if (!err[0]) err_set(err, sizeof err, "%s: unexpected tensor %s", path, tname);
            goto out;
        }
        dlora = gpu->alloc(np * sizeof(float), err, sizeof err);
        dgrads = gpu->alloc(np * sizeof(float), err, sizeof err);
        if (!dlora || !dgrads) goto out;
        gpu->upload(dlora, lora_host, np * sizeof(float));
        gpu->zero(dgrads, np);
        if (llama_lora_bind(&lo_dev, cfg, r, (float)(alpha / r), target, dlora, err,
                            sizeof err) != 0)
            goto out;
        if (llama_lora_loss_and_grad(gpu, &dev, &lo_dev, &s, bt.tokens, bt.labels, bt.lengths,
                                     bt.B, bt.T, 1.0 / (double)bt.n_counted, dgrads, &loss_sum,
                                     &counted, err, sizeof err) != 0)
            goto out;
    }
    if (cuda_backend_sync(err, sizeof err) != 0) goto out;
    if (counted != bt.n_counted) {
        err_set(err, sizeof err, "counted %ld tokens, fixture %ld", counted, bt.n_counted);
        goto out;
    }
    grads_host = malloc(np * sizeof(float));
    if (!grads_host) {
        err_set(err, sizeof err, "out of memory");
        goto out;
    }
    gpu->download(grads_host, dgrads, np * sizeof(float));
    double want = json_number_value(json_object_get(expected, "loss"));
    double loss = loss_sum / (double)counted, lerr = fabs(loss - want) / fabs(want);
    size_t checked = 0;
    gt_lora_names ln = {&lo_host, cfg};
    double gerr = lora ? gt_compare_grads(json_object_get(expected, "grads"), dir, grads_host,
                                          gt_lora_offset, &ln, &checked, err, sizeof err)
                       : gt_compare_grads(json_object_get(expected, "grads"), dir, grads_host,
                                          gt_model_offset, &host, &checked, err, sizeof err);
    if (isnan(gerr)) goto out;
    if (checked == 0) {
        err_set(err, sizeof err, "%s: no gradients compared", name);
        goto out;
    }
    worst = fmax(lerr, gerr);
    snprintf(note, sizeof note, "loss %.2g, %zu grads worst %.2g", lerr, checked, gerr);
out:
    gt_record(check, worst, REF_TOL, util_now_seconds() - t0, isnan(worst) ? err : note);
    if (dgrads) gpu->free_buf(dgrads);
    if (dlora) gpu->free_buf(dlora);
    llama_state_free(&s);
    llama_model_free_backend(gpu, &dev);
    llama_free(&host);
    json_decref(expected);
    json_decref(batch_src);
    gt_batch_free(&bt);
    free(grads_host);
    free(lora_host);
}

void gt_check_reference_backward(const backend *gpu) {
    gt_reference_train(gpu, "sft_gqa", false);
    gt_reference_train(gpu, "sft_tied", false);
    gt_reference_train(gpu, "pretrain", false);
    gt_reference_train(gpu, "lora_gqa", true);
}

/* ---- jobs through runner_run ------------------------------------------------- */

/* One job's directories and what its log said. */
typedef struct {
    char work[PATH_MAX];
    char out[PATH_MAX];
    bool ran_on_gpu; /* a "running on GPU" log line */
    char device_line[256];
    bool opt_per_step;        /* "a step moves 16 bytes to the host" logged */
    long long opt_steps;      /* from "optimizer: N steps moved M bytes ..." (-1: none) */
    long long opt_bytes;
} gt_job;

static const char *gt_ref_path(json_t *ref, char *err, size_t errlen) {
    const char *p = json_string_value(json_object_get(ref, "path"));
    struct stat st;
    if (!p) {
        err_set(err, errlen, "test_gpu resolves {\"path\"} references only");
        return NULL;
    }
    if (stat(p, &st) != 0) {
        err_set(err, errlen, "%s: %s", p, strerror(errno));
        return NULL;
    }
    return p;
}

static int gt_resolve_path(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen, char *err,
                           size_t errlen) {
    (void)ctx;
    const char *p = gt_ref_path(ref, err, errlen);
    if (!p) return -1;
    snprintf(path, pathlen, "%s", p);
    return 0;
}

static int gt_resolve_dataset(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                              char *format, size_t formatlen, char *err, size_t errlen) {
    snprintf(format, formatlen, "auto");
    return gt_resolve_path(ctx, ref, path, pathlen, err, errlen);
}

static int gt_layer_cmp(const void *pa, const void *pb) {
    const runner_layer_file *a = pa, *b = pb;
    return (a->layer > b->layer) - (a->layer < b->layer);
}

/* {"path": DIR}: DIR's hidden_states_{layer}.npy files, sorted by layer
 * (*files malloc'd, the caller frees). */
static int gt_resolve_layers(runner_ctx *ctx, json_t *ref, runner_layer_file **files,
                             size_t *nfiles, char *err, size_t errlen) {
    (void)ctx;
    *files = NULL;
    *nfiles = 0;
    const char *dir = gt_ref_path(ref, err, errlen);
    if (!dir) return -1;
    runner_layer_file *out = calloc(GT_MAX_LAYERS + 1, sizeof *out);
    if (!out) return err_set(err, errlen, "out of memory");
    size_t n = 0;
    for (int layer = 0; layer <= GT_MAX_LAYERS; layer++) {
        char path[sizeof out[0].path];
        struct stat st;
        snprintf(path, sizeof path, "%s/hidden_states_%d.npy", dir, layer);
        if (stat(path, &st) != 0) continue;
        out[n].layer = layer;
        snprintf(out[n].path, sizeof out[n].path, "%s", path);
        n++;
    }
    if (n == 0) {
        free(out);
        return err_set(err, errlen, "%s holds no hidden_states_{layer}.npy", dir);
    }
    qsort(out, n, sizeof *out, gt_layer_cmp);
    *files = out;
    *nfiles = n;
    return 0;
}

static int gt_add_artifact(runner_ctx *ctx, const char *name, const char *path, char *err,
                           size_t errlen) {
    gt_job *job = ctx->user;
    char dst[PATH_MAX + 256];
    snprintf(dst, sizeof dst, "%s/%s", job->out, name);
    if (rename(path, dst) != 0)
        return err_set(err, errlen, "rename %s -> %s: %s", path, dst, strerror(errno));
    return 0;
}

static void gt_log(runner_ctx *ctx, const char *line) {
    gt_job *job = ctx->user;
    if (strstr(line, "running on ")) {
        snprintf(job->device_line, sizeof job->device_line, "%s", line);
        if (strstr(line, "running on GPU")) job->ran_on_gpu = true;
    }
    if (strstr(line, "optimizer: AdamW on GPU") &&
        strstr(line, "on the device); a step moves 16 bytes to the host"))
        job->opt_per_step = true;
    long long steps = 0, bytes = 0;
    if (sscanf(line, "optimizer: %lld steps moved %lld bytes between host and GPU", &steps,
               &bytes) == 2)
        job->opt_steps = steps, job->opt_bytes = bytes;
    if (gt_cfg.verbose) fprintf(stderr, "  job: %s\n", line);
}

/* Runs spec_text as a job of kind on gpu (-1: the CPU) in fresh
 * directories under the run's scratch directory named tag. Returns the
 * result (caller frees) or NULL with err. */
static json_t *gt_run_job(const char *kind, const char *spec_text, int gpu, const char *tag,
                          gt_job *job, char *err, size_t errlen) {
    memset(job, 0, sizeof *job);
    job->opt_steps = -1;
    snprintf(job->work, sizeof job->work, "%.3000s/%s-work", gt_cfg.tmp, tag);
    snprintf(job->out, sizeof job->out, "%.3000s/%s", gt_cfg.tmp, tag);
    if (mkdir(job->work, 0700) != 0 || mkdir(job->out, 0700) != 0) {
        err_set(err, errlen, "mkdir under %s: %s", gt_cfg.tmp, strerror(errno));
        return NULL;
    }
    json_error_t jerr;
    json_t *spec = json_loads(spec_text, 0, &jerr);
    if (!spec) {
        err_set(err, errlen, "bad spec %s: %s", spec_text, jerr.text);
        return NULL;
    }
    atomic_int cancel;
    atomic_init(&cancel, 0);
    runner_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.resolve_file = gt_resolve_path;
    ctx.resolve_layers = gt_resolve_layers;
    ctx.resolve_model = gt_resolve_path;
    ctx.resolve_dataset = gt_resolve_dataset;
    ctx.resolve_adapter = gt_resolve_path;
    ctx.log = gt_log;
    ctx.add_artifact = gt_add_artifact;
    ctx.cancel = &cancel;
    ctx.work_dir = job->work;
    ctx.user = job;
    ctx.gpu = gpu;
    ctx.gpu_required = gpu >= 0; /* a GPU run that silently fell back would prove nothing */
    json_t *result = NULL;
    bool retryable = false, cancelled = false;
    if (runner_run(kind, spec, &ctx, &result, &retryable, &cancelled, err, errlen) != 0)
        result = NULL;
    json_decref(spec);
    return result;
}

/* max over i of |a[i] - b[i]| / |b[i]| for two arrays of numbers
 * (the first n only when n > 0); NAN when they differ in length or hold
 * something else. */
static double gt_series_err(json_t *a, json_t *b, size_t n) {
    size_t na = json_array_size(a);
    if (na == 0 || na != json_array_size(b)) return NAN;
    if (n == 0 || n > na) n = na;
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_array_get(a, i), *y = json_array_get(b, i);
        if (!json_is_number(x) || !json_is_number(y)) return NAN;
        double vy = json_number_value(y);
        double e = fabs(json_number_value(x) - vy) / fmax(fabs(vy), 1e-300);
        if (!(e <= worst)) worst = e;
    }
    return worst;
}

/* Where the reference chat model and the predict dataset are. */
static void gt_chat_paths(char *model, size_t mlen, char *dataset, size_t dlen) {
    gt_reference_dir(model, mlen, "chat");
    const char *env = getenv("STRATA_FIXTURES");
    snprintf(dataset, dlen, "%s/predict/dataset.json", env && *env ? env : "tests/fixtures");
}

/* A row "CHECK optimizer" for a GPU train job: its log must say the
 * optimizer ran on the device moving 16 bytes a step, and its final count
 * must be 16 x the result's steps. The error is the byte count's distance
 * from that (+inf when a line is missing); the tolerance 0. */
static void gt_device_optimizer_row(const char *check, const gt_job *job, json_t *result) {
    char row[96], note[200];
    snprintf(row, sizeof row, "%s optimizer", check);
    long long steps = json_integer_value(json_object_get(result, "steps"));
    double e;
    if (!job->opt_per_step) {
        e = INFINITY;
        snprintf(note, sizeof note, "no 'a step moves 16 bytes to the host' log line");
    } else if (job->opt_steps < 0) {
        e = INFINITY;
        snprintf(note, sizeof note, "no 'optimizer: N steps moved M bytes' log line");
    } else {
        e = fabs((double)job->opt_bytes - 16.0 * (double)steps);
        if (job->opt_steps != steps) e = INFINITY;
        snprintf(note, sizeof note,
                 "device AdamW: %lld steps moved %lld bytes (result: %lld steps)",
                 job->opt_steps, job->opt_bytes, steps);
    }
    gt_record(row, e, 0.0, 0.0, note);
}

/* A train job on the GPU and the CPU; rows for step 1 (fp32 only), the
 * whole curve and the GPU job's device optimizer. */
static void gt_train_pair(const char *method, const char *precision, const char *check) {
    if (!gt_wanted(check)) return;
    double t0 = util_now_seconds();
    char model[PATH_MAX], dataset[PATH_MAX], spec[3 * PATH_MAX], err[ERR_LEN] = "",
                                                                 note[200] = "";
    gt_chat_paths(model, sizeof model, dataset, sizeof dataset);
    bool lora = strcmp(method, "lora") == 0;
    snprintf(spec, sizeof spec,
             "{\"base_model\": {\"path\": \"%s\"}, \"dataset\": {\"path\": \"%s\"}, "
             "\"template\": \"vanilla\", \"method\": \"%s\", \"learning_rate\": %s, "
             "\"lr_scheduler\": \"constant\", \"batch_size\": 6, \"max_steps\": 8, "
             "\"save_steps\": 0, \"seed\": 7, \"precision\": \"%s\"%s}",
             model, dataset, method, lora ? "0.05" : "0.01", precision,
             lora ? ", \"lora\": {\"r\": 4, \"alpha\": 8, \"targets\": [\"q_proj\", \"v_proj\"]}"
                  : "");
    char tag_gpu[64], tag_cpu[64];
    snprintf(tag_gpu, sizeof tag_gpu, "train-%s-%s-gpu", method, precision);
    snprintf(tag_cpu, sizeof tag_cpu, "train-%s-%s-cpu", method, precision);
    gt_job jg, jc;
    json_t *rg = gt_run_job("train", spec, gt_cfg.device, tag_gpu, &jg, err, sizeof err);
    json_t *rc = rg ? gt_run_job("train", spec, -1, tag_cpu, &jc, err, sizeof err) : NULL;
    double seconds = util_now_seconds() - t0;
    bool fp32 = strcmp(precision, "fp32") == 0;
    char check1[64];
    snprintf(check1, sizeof check1, "%s step 1", check);
    if (!rg || !rc) {
        if (fp32) gt_record(check1, NAN, TRAIN_STEP1_TOL, seconds, err);
        gt_record(check, NAN, fp32 ? TRAIN_FP32_TOL : TRAIN_BF16_TOL, seconds, err);
    } else if (!jg.ran_on_gpu) {
        gt_record(check, NAN, 0, seconds, "the GPU job did not log 'running on GPU'");
    } else {
        json_t *lg = json_object_get(rg, "losses"), *lc = json_object_get(rc, "losses");
        if (fp32) gt_record(check1, gt_series_err(lg, lc, 1), TRAIN_STEP1_TOL, seconds, NULL);
        snprintf(note, sizeof note, "%zu steps, last loss gpu %.6f cpu %.6f", json_array_size(lg),
                 json_number_value(json_array_get(lg, json_array_size(lg) - 1)),
                 json_number_value(json_array_get(lc, json_array_size(lc) - 1)));
        gt_record(check, gt_series_err(lg, lc, 0), fp32 ? TRAIN_FP32_TOL : TRAIN_BF16_TOL,
                  seconds, note);
        gt_device_optimizer_row(check, &jg, rg);
    }
    json_decref(rg);
    json_decref(rc);
}

void gt_check_train_jobs(void) {
    gt_train_pair("full", "fp32", "train full fp32 8 steps");
    gt_train_pair("lora", "fp32", "train lora fp32 8 steps");
    gt_train_pair("full", "bf16", "train full bf16 8 steps");
    gt_train_pair("lora", "bf16", "train lora bf16 8 steps");
}

/* Worst relative error between the hidden_states_{l}.npy files of two
 * predict outputs, over every layer the first has. NAN with err. */
static double gt_compare_layers(const char *dir_a, const char *dir_b, int *layers, char *err,
                                size_t errlen) {
    double worst = 0.0;
    *layers = 0;
    for (int l = 0; l <= GT_MAX_LAYERS; l++) {
        char pa[PATH_MAX + 64], pb[PATH_MAX + 64];
        snprintf(pa, sizeof pa, "%s/hidden_states_%d.npy", dir_a, l);
        snprintf(pb, sizeof pb, "%s/hidden_states_%d.npy", dir_b, l);
        struct stat st;
        if (stat(pa, &st) != 0) break;
        double *a = NULL, *b = NULL;
        npy_header ha, hb;
        if (npy_read_f64(pa, &a, &ha, err, errlen) != 0) return NAN;
        if (npy_read_f64(pb, &b, &hb, err, errlen) != 0) {
            free(a);
            return NAN;
        }
        double e = ha.rows == hb.rows && ha.cols == hb.cols ? gt_rel_err_d(a, b, ha.rows * ha.cols)
                                                            : NAN;
        free(a);
        free(b);
        if (isnan(e)) {
            err_set(err, errlen, "layer %d: shapes differ", l);
            return NAN;
        }
        if (!(e <= worst)) worst = e;
        (*layers)++;
    }
    if (*layers == 0) {
        err_set(err, errlen, "%s has no hidden states", dir_a);
        return NAN;
    }
    return worst;
}

/* The CKA values of a cka job's result, per layer, as an array. */
static json_t *gt_cka_values(json_t *result) {
    json_t *vals = json_array(), *layers = json_object_get(result, "layers"), *e;
    size_t i;
    json_array_foreach(layers, i, e) json_array_append(vals, json_object_get(e, "cka"));
    return vals;
}

/* max |a - b| over two arrays of CKA values (absolute: CKA lies in [0, 1]). */
static double gt_abs_err(json_t *a, json_t *b) {
    size_t n = json_array_size(a);
    if (n == 0 || n != json_array_size(b)) return NAN;
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs(json_number_value(json_array_get(a, i)) -
                        json_number_value(json_array_get(b, i)));
        if (!(e <= worst)) worst = e;
    }
    return worst;
}

void gt_check_predict_cka_jobs(void) {
    if (!gt_wanted("predict") && !gt_wanted("cka job")) return;
    static const char *const pools[] = {"last_token", "mean"};
    char model[PATH_MAX], dataset[PATH_MAX], spec[3 * PATH_MAX], err[ERR_LEN] = "";
    gt_chat_paths(model, sizeof model, dataset, sizeof dataset);
    /* [pool][0 gpu, 1 cpu] output directories */
    char outs[2][2][PATH_MAX];
    bool ok = true;
    for (int p = 0; p < 2; p++) {
        double t0 = util_now_seconds();
        snprintf(spec, sizeof spec,
                 "{\"model\": {\"path\": \"%s\"}, \"dataset\": {\"path\": \"%s\"}, "
                 "\"template\": \"vanilla\", \"pool\": \"%s\", \"dtype\": \"float32\", "
                 "\"precision\": \"fp32\"}",
                 model, dataset, pools[p]);
        gt_job jobs[2];
        json_t *res[2] = {NULL, NULL};
        for (int side = 0; side < 2; side++) {
            char tag[64];
            snprintf(tag, sizeof tag, "predict-%s-%s", pools[p], side ? "cpu" : "gpu");
            res[side] = gt_run_job("predict", spec, side ? -1 : gt_cfg.device, tag, &jobs[side],
                                   err, sizeof err);
            memcpy(outs[p][side], jobs[side].out, sizeof outs[p][side]);
            if (!res[side]) break;
        }
        char check[48];
        snprintf(check, sizeof check, "predict %s fp32", pools[p]);
        int layers = 0;
        double e = NAN;
        if (res[0] && res[1] && !jobs[0].ran_on_gpu)
            err_set(err, sizeof err, "the GPU job did not log 'running on GPU'");
        else if (res[0] && res[1])
            e = gt_compare_layers(outs[p][0], outs[p][1], &layers, err, sizeof err);
        char note[96];
        snprintf(note, sizeof note, "%d layers of hidden states", layers);
        gt_record(check, e, PREDICT_FP32_TOL, util_now_seconds() - t0, isnan(e) ? err : note);
        if (isnan(e)) ok = false;
        json_decref(res[0]);
        json_decref(res[1]);
    }
    /* bf16 predict (the GPU default) vs the fp32 CPU run */
    {
        double t0 = util_now_seconds();
        snprintf(spec, sizeof spec,
                 "{\"model\": {\"path\": \"%s\"}, \"dataset\": {\"path\": \"%s\"}, "
                 "\"template\": \"vanilla\", \"pool\": \"last_token\", \"dtype\": \"float32\", "
                 "\"precision\": \"bf16\"}",
                 model, dataset);
        gt_job job;
        json_t *r = gt_run_job("predict", spec, gt_cfg.device, "predict-bf16-gpu", &job, err,
                               sizeof err);
        int layers = 0;
        double e = r ? gt_compare_layers(job.out, outs[0][1], &layers, err, sizeof err) : NAN;
        gt_record("predict last_token bf16 vs cpu fp32", e, PREDICT_BF16_TOL,
                  util_now_seconds() - t0, isnan(e) ? err : "bf16 products");
        json_decref(r);
    }
    if (!ok) return;
    /* CKA between the two pools' hidden states, layer by layer. The runner
     * sends only products above a size threshold to the GPU; these inputs
     * are small, so the threshold goes to 0 for this process. */
    setenv("STRATA_CKA_GPU_MIN_FLOPS", "0", 1);
    double t0 = util_now_seconds();
    json_t *vals[3] = {NULL, NULL, NULL};
    gt_job jobs[3];
    /* [0] GPU-made inputs, ctx.gpu 0; [1] CPU-made, ctx.gpu 0; [2] CPU-made, CPU */
    for (int i = 0; i < 3; i++) {
        int side = i == 0 ? 0 : 1;
        snprintf(spec, sizeof spec, "{\"x\": {\"path\": \"%s\"}, \"y\": {\"path\": \"%s\"}}",
                 outs[0][side], outs[1][side]);
        char tag[32];
        snprintf(tag, sizeof tag, "cka-%d", i);
        json_t *r = gt_run_job("cka", spec, i == 2 ? -1 : gt_cfg.device, tag, &jobs[i], err,
                               sizeof err);
        if (!r) break;
        vals[i] = gt_cka_values(r);
        json_decref(r);
    }
    double seconds = util_now_seconds() - t0;
    if (!vals[2]) {
        gt_record("cka job", NAN, CKA_SAME_INPUT_TOL, seconds, err);
    } else {
        char note[160];
        snprintf(note, sizeof note, "%zu layers, cka[last] %.6f", json_array_size(vals[2]),
                 json_number_value(json_array_get(vals[2], json_array_size(vals[2]) - 1)));
        gt_record("cka job same inputs gpu vs cpu", gt_abs_err(vals[1], vals[2]),
                  CKA_SAME_INPUT_TOL, seconds, note);
        gt_record("cka job gpu-made vs cpu-made", gt_abs_err(vals[0], vals[2]), CKA_PREDICTED_TOL,
                  0.0, "predict (gpu) -> cka vs predict (cpu) -> cka");
    }
    for (int i = 0; i < 3; i++) json_decref(vals[i]);
}

/* ---- CKA on the GPU, directly --------------------------------------------- */

/* Random (N, D) data in float64 with one column offset by 1e4 (LLaMA's
 * massive activations) and a few NaN rows; y depends on x partly, so the
 * CKA is neither 0 nor 1. */
static void gt_cka_data(double *x, double *y, size_t N, size_t DX, size_t DY, gt_rng *rng) {
    for (size_t i = 0; i < N; i++) {
        for (size_t j = 0; j < DX; j++) x[i * DX + j] = gt_uniform(rng, -1.0f, 1.0f);
        for (size_t j = 0; j < DY; j++)
            y[i * DY + j] = 0.5 * x[i * DX + (j % DX)] + gt_uniform(rng, -1.0f, 1.0f);
        x[i * DX + 3] += 1e4;
    }
    for (size_t i = 7; i < N; i += N / 5) x[i * DX + 1] = NAN;
    y[(N / 2) * DY] = NAN;
}

void gt_check_cka_gpu(void) {
    size_t N = gt_cfg.small ? 200 : 4096, DX = gt_cfg.small ? 24 : 512,
           DY = gt_cfg.small ? 40 : 768;
    static const cka_gpu_precision precs[] = {CKA_GPU_F64, CKA_GPU_F32};
    for (int deb = 0; deb < 2; deb++)
        for (size_t pi = 0; pi < 2; pi++) {
            char check[48];
            snprintf(check, sizeof check, "cka gpu %s %s", pi ? "f32" : "f64",
                     deb ? "debiased" : "biased");
            if (!gt_wanted(check)) continue;
            double t0 = util_now_seconds();
            char err[ERR_LEN] = "", note[160] = "";
            gt_rng rng = {0xc4a0 + (uint64_t)deb};
            double *x = malloc(N * DX * sizeof *x), *y = malloc(N * DY * sizeof *y);
            double *x2 = malloc(N * DX * sizeof *x2), *y2 = malloc(N * DY * sizeof *y2);
            if (!x || !y || !x2 || !y2) abort();
            gt_cka_data(x, y, N, DX, DY, &rng);
            memcpy(x2, x, N * DX * sizeof *x);
            memcpy(y2, y, N * DY * sizeof *y);
            cka_matrix mx = {x, N, DX, DX}, my = {y, N, DY, DY};
            cka_matrix cx = {x2, N, DX, DX}, cy = {y2, N, DY, DY};
            cka_options opt = {CKA_LINEAR, deb != 0, 1.0, CKA_SPACE_FEATURE};
            cka_gpu_call call;
            memset(&call, 0, sizeof call);
            call.device = gt_cfg.device;
            call.precision = precs[pi];
            cka_result rg, rc;
            double e = NAN;
            double tg0 = util_now_seconds();
            int okg = cka_gpu_compute_with(&mx, &my, &opt, &call, NULL, &rg, err, sizeof err);
            double tg = util_now_seconds() - tg0, tc0 = util_now_seconds();
            if (okg == 0 && cka_compute(&cx, &cy, &opt, NULL, &rc, err, sizeof err) == 0) {
                double tc = util_now_seconds() - tc0;
                e = fabs(rg.cka - rc.cka);
                if (rg.n != rc.n || rg.dropped_rows != rc.dropped_rows) {
                    e = NAN;
                    snprintf(err, sizeof err, "rows used %zu/%zu, dropped %zu/%zu", rg.n, rc.n,
                             rg.dropped_rows, rc.dropped_rows);
                }
                snprintf(note, sizeof note,
                         "N %zu Dx %zu Dy %zu cka %.9f gpu %.3fs cpu %.3fs", rc.n,
                         DX, DY, rc.cka, tg, tc);
            }
            if (okg == 0 && call.used != precs[pi] && !isnan(e)) {
                e = NAN;
                snprintf(err, sizeof err, "asked %s, the GPU used the other precision",
                         pi ? "f32" : "f64");
            }
            gt_record(check, e, pi ? CKA_F32_TOL : CKA_SAME_INPUT_TOL, util_now_seconds() - t0,
                      isnan(e) ? err : note);
            free(x), free(y), free(x2), free(y2);
        }
}
