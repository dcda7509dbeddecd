/* forward.c - see forward.h. One decoder layer, in Hugging Face's order:
 *   xn = rmsnorm(x);  q, k, v = xn Wq^T, xn Wk^T, xn Wv^T;  rope(q, k)
 *   x += attention(q, k, v) Wo^T
 *   xn = rmsnorm(x);  x += (silu(xn Wgate^T) * xn Wup^T) Wdown^T */
#include "worker/engine/forward.h"

#include "common/util.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Largest batch dimension and row count accepted: cblas takes ints, and
 * B*T rows times the widest layer must stay far from size_t overflow. */
#define FORWARD_DIM_MAX (1 << 20)

/* a * b into *out; false on size_t overflow. */
static bool forward_mul(size_t a, size_t b, size_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}

static bool forward_add(size_t a, size_t b, size_t *out) {
    return !__builtin_add_overflow(a, b, out);
}

/* Checks the dimensions the ops rely on (C = NH * HS, NKV divides NH, HS
 * even). Returns 0, or -1 with err naming what is wrong. */
static int forward_check_config(const llama_config *cfg, char *err, size_t errlen) {
    if (cfg->hidden_size <= 0 || cfg->hidden_size > FORWARD_DIM_MAX)
        return err_set(err, errlen, "hidden_size %d out of range", cfg->hidden_size);
    if (cfg->intermediate_size <= 0 || cfg->intermediate_size > FORWARD_DIM_MAX)
        return err_set(err, errlen, "intermediate_size %d out of range", cfg->intermediate_size);
    if (cfg->num_hidden_layers <= 0 || cfg->num_hidden_layers > 4096)
        return err_set(err, errlen, "num_hidden_layers %d out of range", cfg->num_hidden_layers);
    if (cfg->vocab_size <= 0 || cfg->vocab_size > INT_MAX / 2)
        return err_set(err, errlen, "vocab_size %d out of range", cfg->vocab_size);
    if (cfg->num_attention_heads <= 0 || cfg->hidden_size % cfg->num_attention_heads != 0)
        return err_set(err, errlen, "num_attention_heads %d does not divide hidden_size %d",
                       cfg->num_attention_heads, cfg->hidden_size);
    if (cfg->num_key_value_heads <= 0 ||
        cfg->num_attention_heads % cfg->num_key_value_heads != 0)
        return err_set(err, errlen, "num_key_value_heads %d does not divide num_attention_heads %d",
                       cfg->num_key_value_heads, cfg->num_attention_heads);
    if ((cfg->hidden_size / cfg->num_attention_heads) % 2 != 0)
        return err_set(err, errlen, "head size %d is odd (RoPE rotates pairs)",
                       cfg->hidden_size / cfg->num_attention_heads);
    if (!(cfg->rms_norm_eps >= 0.0f) || !(cfg->rope_theta > 0.0f))
        return err_set(err, errlen, "rms_norm_eps or rope_theta out of range");
    return 0;
}

int llama_state_init(llama_state *s, const backend *be, const llama_config *cfg, int B, int T,
                     char *err, size_t errlen) {
    memset(s, 0, sizeof *s);
    if (forward_check_config(cfg, err, errlen) != 0) return -1;
    if (B <= 0 || T <= 0 || B > FORWARD_DIM_MAX || T > FORWARD_DIM_MAX ||
        (int64_t)B * T > FORWARD_DIM_MAX)
        return err_set(err, errlen, "batch %d x %d out of range", B, T);
    s->be = be;
    s->B = B;
    s->T = T;
    s->C = cfg->hidden_size;
    s->FF = cfg->intermediate_size;
    s->NH = cfg->num_attention_heads;
    s->NKV = cfg->num_key_value_heads;
    s->HS = s->C / s->NH;
    s->V = cfg->vocab_size;
    s->L = cfg->num_hidden_layers;

    size_t N = (size_t)B * (size_t)T, C = (size_t)s->C, FF = (size_t)s->FF;
    size_t kv = (size_t)s->NKV * (size_t)s->HS;
    size_t nx, nq, nkv, nff, nscores, ncs, total = 0;
    if (!forward_mul(N, C, &nx) || !forward_mul(N, C, &nq) || !forward_mul(N, kv, &nkv) ||
        !forward_mul(N, FF, &nff) || !forward_mul((size_t)T, (size_t)T, &nscores) ||
        !forward_mul((size_t)T, (size_t)s->HS, &ncs))
        goto too_big;
    size_t parts[] = {nx, nx, nq, nkv, nkv, nff, nff, nscores, ncs};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        if (!forward_add(total, parts[i], &total)) goto too_big;
    size_t bytes;
    if (!forward_mul(total, sizeof(float), &bytes)) goto too_big;
    s->acts = be->alloc(bytes, err, errlen);
    if (!s->acts) goto fail;
    float *p = s->acts;
    s->x = p, p += nx;
    s->xn = p, p += nx;
    s->q = p, p += nq;
    s->k = p, p += nkv;
    s->v = p, p += nkv;
    s->gate = p, p += nff;
    s->up = p, p += nff;
    s->scores = p, p += nscores;
    s->rope_cs = p;

    size_t nints = 2 * N + (size_t)B;
    s->ints = be->alloc(nints * sizeof(int), err, errlen);
    if (!s->ints) goto fail;
    s->tokens = s->ints;
    s->pos = s->ints + N;
    s->lengths = s->ints + 2 * N;
    s->host_ints = malloc(nints * sizeof(int));
    if (!s->host_ints) {
        err_set(err, errlen, "out of memory for %zu token ids", nints);
        goto fail;
    }
    if (!be->host_memory) {
        s->host_hidden = malloc(nx * sizeof(float));
        if (!s->host_hidden) {
            err_set(err, errlen, "out of memory for a (%d, %d, %d) host copy", B, T, s->C);
            goto fail;
        }
    }
    return 0;

too_big:
    err_set(err, errlen, "activations for batch %d x %d do not fit in memory", B, T);
fail:
    llama_state_free(s);
    return -1;
}

/* Sum of n sizes into *out; false on overflow. */
static bool forward_sum(const size_t *parts, size_t n, size_t *out) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        if (!forward_add(total, parts[i], &total)) return false;
    *out = total;
    return true;
}

int llama_state_init_train(llama_state *s, const backend *be, const llama_config *cfg, int B,
                           int T, char *err, size_t errlen) {
    if (llama_state_init(s, be, cfg, B, T, err, errlen) != 0) return -1;
    size_t N = (size_t)B * (size_t)T, C = (size_t)s->C, FF = (size_t)s->FF, L = (size_t)s->L;
    size_t QD = (size_t)s->NH * (size_t)s->HS, KVD = (size_t)s->NKV * (size_t)s->HS;
    size_t nc, nq, nkv, nff, nv, ntt, lc, lq, lkv, lff, lc1, total, bytes;
    if (!forward_mul(N, C, &nc) || !forward_mul(N, QD, &nq) || !forward_mul(N, KVD, &nkv) ||
        !forward_mul(N, FF, &nff) || !forward_mul(N, (size_t)s->V, &nv) ||
        !forward_mul(2 * (size_t)T, (size_t)T, &ntt) || !forward_mul(L, nc, &lc) ||
        !forward_mul(L + 1, nc, &lc1) || !forward_mul(L, nq, &lq) ||
        !forward_mul(L, nkv, &lkv) || !forward_mul(L, nff, &lff))
        goto too_big;
    size_t parts[] = {lc1, lc, lq, lkv, lkv, lq, lff, lff, nv,
                      nc,  nc, nq, nkv, nkv, nff, nff, nff, ntt};
    if (!forward_sum(parts, sizeof parts / sizeof parts[0], &total) ||
        !forward_mul(total, sizeof(float), &bytes))
        goto too_big;
    s->train = be->alloc(bytes, err, errlen);
    if (!s->train) goto fail;
    float *p = s->train;
    s->xs = p, p += lc1;
    s->xmid = p, p += lc;
    s->tq = p, p += lq;
    s->tk = p, p += lkv;
    s->tv = p, p += lkv;
    s->tatt = p, p += lq;
    s->tgate = p, p += lff;
    s->tup = p, p += lff;
    s->tlogits = p, p += nv;
    s->dx = p, p += nc;
    s->dxn = p, p += nc;
    s->dq = p, p += nq;
    s->dk = p, p += nkv;
    s->dv = p, p += nkv;
    s->dh = p, p += nff;
    s->dup = p, p += nff;
    s->h = p, p += nff;
    s->attn_scratch = p;
    s->row_loss = be->alloc(N * sizeof(double), err, errlen);
    if (!s->row_loss) goto fail;
    s->targets = be->alloc(N * sizeof(int), err, errlen);
    if (!s->targets) goto fail;
    s->host_targets = malloc(N * sizeof(int));
    if (!s->host_targets) {
        err_set(err, errlen, "out of memory for %zu labels", N);
        goto fail;
    }
    if (!be->host_memory) {
        s->host_row_loss = malloc(N * sizeof(double));
        if (!s->host_row_loss) {
            err_set(err, errlen, "out of memory for %zu losses", N);
            goto fail;
        }
    }
    return 0;

too_big:
    err_set(err, errlen, "training activations for batch %d x %d do not fit in memory", B, T);
fail:
    llama_state_free(s);
    return -1;
}

void llama_state_free(llama_state *s) {
    if (s->be) {
        if (s->acts) s->be->free_buf(s->acts);
        if (s->ints) s->be->free_buf(s->ints);
        if (s->dev_logits) s->be->free_buf(s->dev_logits);
        if (s->train) s->be->free_buf(s->train);
        if (s->row_loss) s->be->free_buf(s->row_loss);
        if (s->targets) s->be->free_buf(s->targets);
        if (s->lora_buf) s->be->free_buf(s->lora_buf);
        if (s->lora_xd) s->be->free_buf(s->lora_xd);
    }
    free(s->host_ints);
    free(s->host_hidden);
    free(s->host_targets);
    free(s->host_row_loss);
    memset(s, 0, sizeof *s);
}

/* Hands hidden state x (backend memory, (B, T, C)) to the hook in host
 * memory. Returns the hook's result. */
static int forward_emit(llama_state *s, int layer, const float *x, int B, int T, llama_hook hook,
                        void *user, char *err, size_t errlen) {
    if (!hook) return 0;
    const float *host = x;
    if (!s->be->host_memory) {
        s->be->download(s->host_hidden, x, (size_t)B * (size_t)T * (size_t)s->C * sizeof(float));
        host = s->host_hidden;
    }
    err_set(err, errlen, "hidden-state hook failed at layer %d", layer);
    if (hook(user, layer, host, B, T, s->C, err, errlen) != 0) return -1;
    if (err && errlen) err[0] = '\0';
    return 0;
}

/* Validates the batch and uploads token ids (padding replaced by id 0 when
 * out of range), positions 0..T-1 per row and lengths. Returns 0 or -1. */
static int forward_prepare(llama_state *s, const int *tokens, const int *lengths, int B, int T,
                           char *err, size_t errlen) {
    /* Host and backend int buffers share one layout, sized for capacity. */
    size_t N = (size_t)B * (size_t)T, cap = (size_t)s->B * (size_t)s->T;
    int *host_tokens = s->host_ints, *host_pos = s->host_ints + cap,
        *host_lengths = s->host_ints + 2 * cap;
    for (int b = 0; b < B; b++) {
        int len = lengths[b];
        if (len < 1 || len > T)
            return err_set(err, errlen, "sequence %d has length %d, outside 1..%d", b, len, T);
        host_lengths[b] = len;
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)b * (size_t)T + (size_t)t;
            int id = tokens[i];
            if (id < 0 || id >= s->V) {
                if (t < len)
                    return err_set(err, errlen,
                                   "token id %d at sequence %d position %d outside vocabulary "
                                   "of %d",
                                   id, b, t, s->V);
                /* Padding: any real id gives the same results at real
                 * positions; 0 keeps the lookup in bounds. */
                id = 0;
            }
            host_tokens[i] = id;
            host_pos[i] = t;
        }
    }
    s->be->upload(s->tokens, host_tokens, N * sizeof(int));
    s->be->upload(s->pos, host_pos, N * sizeof(int));
    s->be->upload(s->lengths, host_lengths, (size_t)B * sizeof(int));
    return 0;
}

int llama_forward(const backend *be, const llama_model *m, llama_state *s, const int *tokens,
                  const int *lengths, int B, int T, llama_hook hook, void *user, float *logits,
                  char *err, size_t errlen) {
    const llama_config *cfg = &m->cfg;
    if (!s->acts || be != s->be)
        return err_set(err, errlen, "forward state was not set up for backend %s", be->name);
    if (cfg->hidden_size != s->C || cfg->intermediate_size != s->FF ||
        cfg->num_attention_heads != s->NH || cfg->num_key_value_heads != s->NKV ||
        cfg->vocab_size != s->V || cfg->num_hidden_layers != s->L)
        return err_set(err, errlen, "model config differs from the one the state was sized for");
    if (B < 1 || B > s->B || T < 1 || T > s->T)
        return err_set(err, errlen, "batch %d x %d exceeds the state's %d x %d", B, T, s->B, s->T);
    if (forward_prepare(s, tokens, lengths, B, T, err, errlen) != 0) return -1;

    const llama_weights *w = &m->w;
    size_t N = (size_t)B * (size_t)T, C = (size_t)s->C, FF = (size_t)s->FF;
    size_t QD = (size_t)s->NH * (size_t)s->HS, KVD = (size_t)s->NKV * (size_t)s->HS;
    float eps = cfg->rms_norm_eps, theta = cfg->rope_theta;
    const int *pos = s->pos;
    const int *lens = s->lengths;

    /* Positions are 0..T-1 (forward_prepare), so T rows of angles serve
     * every layer's q and k. */
    be->rope_table(s->rope_cs, T, s->HS, theta);
    be->embedding(s->x, s->tokens, w->embed, N, C); /* (B, T, C) */
    if (forward_emit(s, 0, s->x, B, T, hook, user, err, errlen) != 0) return -1;

    for (int l = 0; l < s->L; l++) {
        size_t li = (size_t)l;
        be->rmsnorm(s->xn, s->x, w->attn_norm + li * C, N, C, eps);
        be->matmul(s->q, s->xn, w->wq + li * QD * C, N, C, QD, false); /* (B, T, NH*HS) */
        be->matmul(s->k, s->xn, w->wk + li * KVD * C, N, C, KVD, false); /* (B, T, NKV*HS) */
        be->matmul(s->v, s->xn, w->wv + li * KVD * C, N, C, KVD, false);
        be->rope_cached(s->q, pos, N, s->NH, s->HS, s->rope_cs);
        be->rope_cached(s->k, pos, N, s->NKV, s->HS, s->rope_cs);
        /* xn is free once q, k, v exist; it takes the attention output
         * (NH*HS == C). */
        be->attention(s->xn, s->q, s->k, s->v, lens, B, T, s->NH, s->NKV, s->HS, s->scores);
        be->matmul(s->x, s->xn, w->wo + li * C * QD, N, QD, C, true);

        be->rmsnorm(s->xn, s->x, w->mlp_norm + li * C, N, C, eps);
        be->matmul(s->gate, s->xn, w->w_gate + li * FF * C, N, C, FF, false); /* (B, T, FF) */
        be->matmul(s->up, s->xn, w->w_up + li * FF * C, N, C, FF, false);
        be->swiglu(s->gate, s->up, N * FF);
        be->matmul(s->x, s->gate, w->w_down + li * C * FF, N, FF, C, true);

        if (l + 1 < s->L && forward_emit(s, l + 1, s->x, B, T, hook, user, err, errlen) != 0)
            return -1;
    }

    be->rmsnorm(s->xn, s->x, w->final_norm, N, C, eps);
    if (forward_emit(s, s->L, s->xn, B, T, hook, user, err, errlen) != 0) return -1;

    if (logits) {
        size_t V = (size_t)s->V;
        if (be->host_memory) {
            be->matmul(logits, s->xn, w->lm_head, N, C, V, false); /* (B, T, V) */
        } else {
            if (!s->dev_logits) {
                size_t cap;
                if (!forward_mul((size_t)s->B * (size_t)s->T, V * sizeof(float), &cap))
                    return err_set(err, errlen, "logits for batch %d x %d do not fit", s->B, s->T);
                s->dev_logits = be->alloc(cap, err, errlen);
                if (!s->dev_logits) return -1;
            }
            be->matmul(s->dev_logits, s->xn, w->lm_head, N, C, V, false);
            be->download(logits, s->dev_logits, N * V * sizeof(float));
        }
    }
    return 0;
}

/* Checks labels and builds the shifted targets in s->host_targets: the
 * label of position t+1 for position t, or -1. Counts the scored positions
 * into *n_counted. Returns 0 or -1 with err set. */
static int forward_targets(llama_state *s, const int *labels, const int *lengths, int B, int T,
                           long *n_counted, char *err, size_t errlen) {
    long count = 0;
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)b * (size_t)T + (size_t)t;
            int lab = labels[i];
            if (lab == LLAMA_IGNORE_INDEX) continue;
            if (lab < 0 || lab >= s->V)
                return err_set(err, errlen, "label %d at sequence %d position %d outside "
                               "vocabulary of %d", lab, b, t, s->V);
            if (t >= lengths[b])
                return err_set(err, errlen, "label %d at padding position %d of sequence %d "
                               "(length %d)", lab, t, b, lengths[b]);
        }
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)b * (size_t)T + (size_t)t;
            int next = t + 1 < T ? labels[i + 1] : LLAMA_IGNORE_INDEX;
            s->host_targets[i] = next == LLAMA_IGNORE_INDEX ? -1 : next;
            if (next != LLAMA_IGNORE_INDEX) count++;
        }
    }
    *n_counted = count;
    return 0;
}

/* Pointer to X's gradient in grads (layout of m->params), or NULL when
 * grads is NULL (frozen). */
static float *forward_grad(const llama_model *m, float *grads, const float *x) {
    return grads ? grads + (x - m->params) : NULL;
}

const char *llama_proj_module(llama_proj p) {
    static const char *const names[LLAMA_NPROJ] = {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
    return (unsigned)p < LLAMA_NPROJ ? names[p] : NULL;
}

void llama_proj_dims(const llama_config *cfg, llama_proj p, size_t *out, size_t *in) {
    size_t C = (size_t)cfg->hidden_size, FF = (size_t)cfg->intermediate_size;
    size_t KVD = C / (size_t)cfg->num_attention_heads * (size_t)cfg->num_key_value_heads;
    size_t outs[LLAMA_NPROJ] = {C, KVD, KVD, C, FF, FF, C};
    size_t ins[LLAMA_NPROJ] = {C, C, C, C, C, C, FF};
    *out = (unsigned)p < LLAMA_NPROJ ? outs[p] : 0;
    *in = (unsigned)p < LLAMA_NPROJ ? ins[p] : 0;
}

size_t llama_lora_count(const llama_config *cfg, int r, const bool target[LLAMA_NPROJ]) {
    if (r < 1 || cfg->num_hidden_layers < 1) return 0;
    size_t total = 0;
    for (int p = 0; p < LLAMA_NPROJ; p++) {
        if (!target[p]) continue;
        size_t out, in, per, all;
        llama_proj_dims(cfg, (llama_proj)p, &out, &in);
        if (!forward_mul((size_t)r, out + in, &per) ||
            !forward_mul(per, (size_t)cfg->num_hidden_layers, &all) ||
            !forward_add(total, all, &total))
            return 0;
    }
    return total;
}

int llama_lora_bind(llama_lora *lo, const llama_config *cfg, int r, float scaling,
                    const bool target[LLAMA_NPROJ], float *params, char *err, size_t errlen) {
    memset(lo, 0, sizeof *lo);
    size_t n = llama_lora_count(cfg, r, target);
    if (n == 0) return err_set(err, errlen, "LoRA rank %d with no target, or too large", r);
    if (!isfinite(scaling)) return err_set(err, errlen, "LoRA scaling is not finite");
    lo->r = r;
    lo->scaling = scaling;
    lo->params = params;
    lo->nparams = n;
    size_t L = (size_t)cfg->num_hidden_layers, off = 0;
    for (int p = 0; p < LLAMA_NPROJ; p++) {
        lo->target[p] = target[p];
        if (!target[p]) continue;
        size_t out, in;
        llama_proj_dims(cfg, (llama_proj)p, &out, &in);
        lo->a[p] = params + off;
        off += L * (size_t)r * in;
        lo->b[p] = params + off;
        off += L * out * (size_t)r;
    }
    return 0;
}

uint64_t llama_dropout_key(uint64_t seed, uint64_t counter, int layer, llama_proj p) {
    uint64_t k = backend_mix64(backend_mix64(seed) ^ counter);
    return backend_mix64(k ^ ((uint64_t)layer * LLAMA_NPROJ + (uint64_t)p));
}

/* floor(p * 2^53): the multiplication by a power of two is exact in double,
 * so the reference can reproduce it bit for bit. */
static uint64_t forward_dropout_threshold(float p) { return (uint64_t)((double)p * 0x1p53); }

void llama_dropout_mask(float *mask, float p, uint64_t seed, uint64_t counter, int layer,
                        llama_proj proj, size_t n) {
    uint64_t key = llama_dropout_key(seed, counter, layer, proj);
    uint64_t thr = forward_dropout_threshold(p);
    float scale = 1.0f / (1.0f - p);
    for (size_t i = 0; i < n; i++)
        mask[i] = backend_dropout_keep(key, (uint64_t)i, thr) ? scale : 0.0f;
}

/* Dropout of (layer l, projection p) for lo's micro-batch over n elements:
 * forward, s->lora_xd = x dropped out; with dx not NULL, its backward,
 * dx += the mask times s->lora_xd (there the input's gradient). */
static void forward_lora_dropout(const backend *be, llama_state *s, const llama_lora *lo,
                                 llama_proj p, size_t l, float *dx, const float *x, size_t n) {
    uint64_t key = llama_dropout_key(lo->dropout_seed, lo->dropout_counter, (int)l, p);
    uint64_t thr = forward_dropout_threshold(lo->dropout);
    float scale = 1.0f / (1.0f - lo->dropout);
    if (dx)
        be->dropout(dx, s->lora_xd, n, key, thr, scale, true);
    else
        be->dropout(s->lora_xd, x, n, key, thr, scale, false);
}

/* One projection of layer l in the training forward: out (=, or += with
 * accumulate) x W^T, plus, where lo targets p, scaling * (x_d A^T) B^T with
 * u = scaling * x_d A^T kept in s for the backward; x_d is x, or x dropped
 * out with lo's dropout. */
static void forward_proj(const backend *be, llama_state *s, const llama_lora *lo, llama_proj p,
                         size_t l, float *out, const float *x, const float *w, size_t N,
                         size_t in, size_t outd, bool accumulate) {
    be->matmul(out, x, w, N, in, outd, accumulate);
    if (!lo || !lo->target[p]) return;
    size_t r = (size_t)lo->r;
    float *u = s->lora_u + (l * LLAMA_NPROJ + (size_t)p) * N * r;
    const float *xa = x;
    if (lo->dropout > 0) {
        forward_lora_dropout(be, s, lo, p, l, NULL, x, N * in);
        xa = s->lora_xd;
    }
    be->matmul(u, xa, lo->a[p] + l * r * in, N, in, r, false);
    be->scale(u, N * r, lo->scaling);
    be->matmul(out, u, lo->b[p] + l * outd * r, N, r, outd, true);
}

/* Backward of forward_proj given dy (N, outd): dx (=, or += with
 * accumulate) dy W (+ the adapter's path), dW += dy^T x when dw is not
 * NULL; with lo targeting p, dB += dy^T u and dA += du^T x_d with
 * du = scaling * dy B, into lora_grads (lo's layout), and dx += du A, times
 * the dropout mask when lo drops out (x_d then redrawn from x). */
static void forward_proj_backward(const backend *be, llama_state *s, const llama_lora *lo,
                                  float *lora_grads, llama_proj p, size_t l, float *dx,
                                  float *dw, const float *dy, const float *x, const float *w,
                                  size_t N, size_t in, size_t outd, bool accumulate) {
    be->matmul_backward(dx, dw, dy, x, w, N, in, outd, accumulate);
    if (!lo || !lo->target[p]) return;
    size_t r = (size_t)lo->r;
    const float *u = s->lora_u + (l * LLAMA_NPROJ + (size_t)p) * N * r;
    const float *a = lo->a[p] + l * r * in, *b = lo->b[p] + l * outd * r;
    float *ga = lora_grads + (a - lo->params), *gb = lora_grads + (b - lo->params);
    be->matmul_backward(s->lora_du, gb, dy, u, b, N, r, outd, false);
    be->scale(s->lora_du, N * r, lo->scaling);
    if (lo->dropout > 0) {
        forward_lora_dropout(be, s, lo, p, l, NULL, x, N * in);
        be->matmul_backward(NULL, ga, s->lora_du, s->lora_xd, a, N, in, r, false);
        /* x_d is spent: the buffer takes du A, which the mask then gates. */
        be->matmul_backward(s->lora_xd, NULL, s->lora_du, x, a, N, in, r, false);
        forward_lora_dropout(be, s, lo, p, l, dx, x, N * in);
        return;
    }
    be->matmul_backward(dx, ga, s->lora_du, x, a, N, in, r, true);
}

/* The training forward: as llama_forward, but every activation the
 * backward needs is kept (see llama_state), and the logits go to
 * s->tlogits. s->xn ends holding the final normed hidden state. lo (or
 * NULL) is applied unmerged. */
static void forward_train_pass(const backend *be, const llama_model *m, const llama_lora *lo,
                               llama_state *s, int B, int T) {
    const llama_weights *w = &m->w;
    size_t N = (size_t)B * (size_t)T, C = (size_t)s->C, FF = (size_t)s->FF;
    size_t QD = (size_t)s->NH * (size_t)s->HS, KVD = (size_t)s->NKV * (size_t)s->HS;
    float eps = m->cfg.rms_norm_eps;
    be->rope_table(s->rope_cs, T, s->HS, m->cfg.rope_theta);
    be->embedding(s->xs, s->tokens, w->embed, N, C);
    for (size_t l = 0; l < (size_t)s->L; l++) {
        float *x = s->xs + l * N * C, *xmid = s->xmid + l * N * C, *xout = x + N * C;
        float *q = s->tq + l * N * QD, *k = s->tk + l * N * KVD, *v = s->tv + l * N * KVD;
        float *att = s->tatt + l * N * QD, *gate = s->tgate + l * N * FF,
              *up = s->tup + l * N * FF;
        be->rmsnorm(s->xn, x, w->attn_norm + l * C, N, C, eps);
        forward_proj(be, s, lo, LLAMA_PROJ_Q, l, q, s->xn, w->wq + l * QD * C, N, C, QD, false);
        forward_proj(be, s, lo, LLAMA_PROJ_K, l, k, s->xn, w->wk + l * KVD * C, N, C, KVD,
                     false);
        forward_proj(be, s, lo, LLAMA_PROJ_V, l, v, s->xn, w->wv + l * KVD * C, N, C, KVD,
                     false);
        be->rope_cached(q, s->pos, N, s->NH, s->HS, s->rope_cs);
        be->rope_cached(k, s->pos, N, s->NKV, s->HS, s->rope_cs);
        be->attention(att, q, k, v, s->lengths, B, T, s->NH, s->NKV, s->HS, s->scores);
        be->copy(xmid, x, N * C);
        forward_proj(be, s, lo, LLAMA_PROJ_O, l, xmid, att, w->wo + l * C * QD, N, QD, C, true);
        be->rmsnorm(s->xn, xmid, w->mlp_norm + l * C, N, C, eps);
        forward_proj(be, s, lo, LLAMA_PROJ_GATE, l, gate, s->xn, w->w_gate + l * FF * C, N, C,
                     FF, false);
        forward_proj(be, s, lo, LLAMA_PROJ_UP, l, up, s->xn, w->w_up + l * FF * C, N, C, FF,
                     false);
        be->copy(s->h, gate, N * FF);
        be->swiglu(s->h, up, N * FF);
        be->copy(xout, xmid, N * C);
        forward_proj(be, s, lo, LLAMA_PROJ_DOWN, l, xout, s->h, w->w_down + l * C * FF, N, FF, C,
                     true);
    }
    be->rmsnorm(s->xn, s->xs + (size_t)s->L * N * C, w->final_norm, N, C, eps);
    be->matmul(s->tlogits, s->xn, w->lm_head, N, C, (size_t)s->V, false);
}

/* The backward of forward_train_pass from the logits' gradient (in
 * s->tlogits) down to the embedding table, adding into grads (NULL: base
 * frozen) and, with lo, into lora_grads. s->xn holds the final normed
 * hidden state on entry. */
static void forward_train_backward(const backend *be, const llama_model *m, const llama_lora *lo,
                                   llama_state *s, int B, int T, float *grads,
                                   float *lora_grads) {
    const llama_weights *w = &m->w;
    size_t N = (size_t)B * (size_t)T, C = (size_t)s->C, FF = (size_t)s->FF;
    size_t QD = (size_t)s->NH * (size_t)s->HS, KVD = (size_t)s->NKV * (size_t)s->HS;
    float eps = m->cfg.rms_norm_eps;
    be->matmul_backward(s->dxn, forward_grad(m, grads, w->lm_head), s->tlogits, s->xn,
                        w->lm_head, N, C, (size_t)s->V, false);
    be->zero(s->dx, N * C);
    be->rmsnorm_backward(s->dx, forward_grad(m, grads, w->final_norm), s->dxn,
                         s->xs + (size_t)s->L * N * C, w->final_norm, N, C, eps);
    /* s->dx is the gradient of the residual stream leaving layer l; after
     * each block's rmsnorm_backward it is that of the stream entering it
     * (the residual branch passes it through unchanged). */
    for (size_t l = (size_t)s->L; l-- > 0;) {
        const float *x = s->xs + l * N * C, *xmid = s->xmid + l * N * C;
        const float *q = s->tq + l * N * QD, *k = s->tk + l * N * KVD, *v = s->tv + l * N * KVD;
        const float *att = s->tatt + l * N * QD, *gate = s->tgate + l * N * FF,
                    *up = s->tup + l * N * FF;
        const float *wq = w->wq + l * QD * C, *wk = w->wk + l * KVD * C,
                    *wv = w->wv + l * KVD * C, *wo = w->wo + l * C * QD;
        const float *wg = w->w_gate + l * FF * C, *wu = w->w_up + l * FF * C,
                    *wd = w->w_down + l * C * FF;

        /* MLP: xout = xmid + (silu(gate) * up) Wd^T. */
        be->copy(s->h, gate, N * FF);
        be->swiglu(s->h, up, N * FF);
        forward_proj_backward(be, s, lo, lora_grads, LLAMA_PROJ_DOWN, l, s->dh,
                              forward_grad(m, grads, wd), s->dx, s->h, wd, N, FF, C, false);
        be->swiglu_backward(s->dh, s->dup, s->dh, gate, up, N * FF);
        be->rmsnorm(s->xn, xmid, w->mlp_norm + l * C, N, C, eps);
        forward_proj_backward(be, s, lo, lora_grads, LLAMA_PROJ_GATE, l, s->dxn,
                              forward_grad(m, grads, wg), s->dh, s->xn, wg, N, C, FF, false);
        forward_proj_backward(be, s, lo, lora_grads, LLAMA_PROJ_UP, l, s->dxn,
                              forward_grad(m, grads, wu), s->dup, s->xn, wu, N, C, FF, true);
        be->rmsnorm_backward(s->dx, forward_grad(m, grads, w->mlp_norm + l * C), s->dxn, xmid,
                             w->mlp_norm + l * C, N, C, eps);

        /* Attention: xmid = x + attention(rope(q), rope(k), v) Wo^T. dxn
         * (QD == C columns) takes the attention output's gradient. */
        forward_proj_backward(be, s, lo, lora_grads, LLAMA_PROJ_O, l, s->dxn,
                              forward_grad(m, grads, wo), s->dx, att, wo, N, QD, C, false);
        be->zero(s->dq, N * QD);
        be->zero(s->dk, N * KVD);
        be->zero(s->dv, N * KVD);
        be->attention_backward(s->dq, s->dk, s->dv, s->dxn, q, k, v, s->lengths, B, T, s->NH,
                               s->NKV, s->HS, s->attn_scratch);
        be->rope_backward_cached(s->dq, s->pos, N, s->NH, s->HS, s->rope_cs);
        be->rope_backward_cached(s->dk, s->pos, N, s->NKV, s->HS, s->rope_cs);
        be->rmsnorm(s->xn, x, w->attn_norm + l * C, N, C, eps);
        forward_proj_backward(be, s, lo, lora_grads, LLAMA_PROJ_Q, l, s->dxn,
                              forward_grad(m, grads, wq), s->dq, s->xn, wq, N, C, QD, false);
        forward_proj_backward(be, s, lo, lora_grads, LLAMA_PROJ_K, l, s->dxn,
                              forward_grad(m, grads, wk), s->dk, s->xn, wk, N, C, KVD, true);
        forward_proj_backward(be, s, lo, lora_grads, LLAMA_PROJ_V, l, s->dxn,
                              forward_grad(m, grads, wv), s->dv, s->xn, wv, N, C, KVD, true);
        /* Below the first layer's projections only the embedding table is
         * left, so without its gradient the stream's need not be formed. */
        if (l == 0 && !grads) break;
        be->rmsnorm_backward(s->dx, forward_grad(m, grads, w->attn_norm + l * C), s->dxn, x,
                             w->attn_norm + l * C, N, C, eps);
    }
    if (grads) be->embedding_backward(forward_grad(m, grads, w->embed), s->dx, s->tokens, N, C);
}

/* Allocates s's LoRA buffers for rank r unless already sized for it, and
 * with dropout the dropped-out input's (once). Returns 0 or -1 with err
 * set. */
static int forward_lora_buffers(llama_state *s, int r, bool dropout, char *err, size_t errlen) {
    if (dropout && !s->lora_xd) {
        size_t N = (size_t)s->B * (size_t)s->T, in = (size_t)s->C, n, bytes;
        size_t qd = (size_t)s->NH * (size_t)s->HS;
        if ((size_t)s->FF > in) in = (size_t)s->FF;
        if (qd > in) in = qd;
        if (!forward_mul(N, in, &n) || !forward_mul(n, sizeof(float), &bytes))
            return err_set(err, errlen, "LoRA dropout buffer does not fit in memory");
        s->lora_xd = s->be->alloc(bytes, err, errlen);
        if (!s->lora_xd) return -1;
    }
    if (s->lora_buf && s->lora_r == r) return 0;
    if (s->lora_buf) s->be->free_buf(s->lora_buf);
    s->lora_buf = NULL;
    s->lora_r = 0;
    size_t N = (size_t)s->B * (size_t)s->T, nu, total, bytes;
    if (!forward_mul(N, (size_t)r, &nu) ||
        !forward_mul(nu, (size_t)s->L * LLAMA_NPROJ + 1, &total) ||
        !forward_mul(total, sizeof(float), &bytes))
        return err_set(err, errlen, "LoRA activations of rank %d do not fit in memory", r);
    s->lora_buf = s->be->alloc(bytes, err, errlen);
    if (!s->lora_buf) return -1;
    s->lora_r = r;
    s->lora_u = s->lora_buf;
    s->lora_du = s->lora_buf + nu * (size_t)s->L * LLAMA_NPROJ;
    return 0;
}

/* The shared body of llama_loss_and_grad and llama_lora_loss_and_grad. */
static int forward_loss_and_grad(const backend *be, const llama_model *m, const llama_lora *lo,
                                 llama_state *s, const int *tokens, const int *labels,
                                 const int *lengths, int B, int T, double loss_scale,
                                 float *grads, float *lora_grads, double *loss_sum,
                                 long *n_counted, char *err, size_t errlen) {
    const llama_config *cfg = &m->cfg;
    if (!s->acts || !s->train || be != s->be)
        return err_set(err, errlen, "state was not set up for training on backend %s", be->name);
    if (cfg->hidden_size != s->C || cfg->intermediate_size != s->FF ||
        cfg->num_attention_heads != s->NH || cfg->num_key_value_heads != s->NKV ||
        cfg->vocab_size != s->V || cfg->num_hidden_layers != s->L)
        return err_set(err, errlen, "model config differs from the one the state was sized for");
    if (B < 1 || B > s->B || T < 1 || T > s->T)
        return err_set(err, errlen, "batch %d x %d exceeds the state's %d x %d", B, T, s->B, s->T);
    if (!isfinite(loss_scale))
        return err_set(err, errlen, "loss_scale %g is not finite", loss_scale);
    if (lo && forward_lora_buffers(s, lo->r, lo->dropout > 0, err, errlen) != 0) return -1;
    if (forward_prepare(s, tokens, lengths, B, T, err, errlen) != 0) return -1;
    long counted = 0;
    if (forward_targets(s, labels, lengths, B, T, &counted, err, errlen) != 0) return -1;

    size_t N = (size_t)B * (size_t)T;
    be->upload(s->targets, s->host_targets, N * sizeof(int));
    forward_train_pass(be, m, lo, s, B, T);
    be->cross_entropy(s->tlogits, s->row_loss, s->targets, N, (size_t)s->V, (float)loss_scale);
    const double *rl = s->row_loss;
    if (!be->host_memory) {
        be->download(s->host_row_loss, s->row_loss, N * sizeof(double));
        rl = s->host_row_loss;
    }
    double sum = 0.0;
    for (size_t i = 0; i < N; i++) sum += rl[i];
    /* With nothing scored every gradient is zero: skip the backward. */
    if (counted > 0) forward_train_backward(be, m, lo, s, B, T, grads, lora_grads);
    *loss_sum = sum;
    *n_counted = counted;
    return 0;
}

int llama_loss_and_grad(const backend *be, const llama_model *m, llama_state *s,
                        const int *tokens, const int *labels, const int *lengths, int B, int T,
                        double loss_scale, float *grads, double *loss_sum, long *n_counted,
                        char *err, size_t errlen) {
    return forward_loss_and_grad(be, m, NULL, s, tokens, labels, lengths, B, T, loss_scale,
                                 grads, NULL, loss_sum, n_counted, err, errlen);
}

int llama_lora_loss_and_grad(const backend *be, const llama_model *m, const llama_lora *lo,
                             llama_state *s, const int *tokens, const int *labels,
                             const int *lengths, int B, int T, double loss_scale,
                             float *lora_grads, double *loss_sum, long *n_counted, char *err,
                             size_t errlen) {
    if (!lo || !lo->params || !lora_grads || lo->r < 1)
        return err_set(err, errlen, "no LoRA adapter or gradient buffer");
    if (llama_lora_count(&m->cfg, lo->r, lo->target) != lo->nparams)
        return err_set(err, errlen, "LoRA adapter was not laid out for this model");
    if (!(lo->dropout >= 0.0f && lo->dropout < 1.0f))
        return err_set(err, errlen, "LoRA dropout %g is not in [0, 1)", (double)lo->dropout);
    return forward_loss_and_grad(be, m, lo, s, tokens, labels, lengths, B, T, loss_scale, NULL,
                                 lora_grads, loss_sum, n_counted, err, errlen);
}
