/* forward.c - see forward.h. One decoder layer, in Hugging Face's order:
 *   xn = rmsnorm(x);  q, k, v = xn Wq^T, xn Wk^T, xn Wv^T;  rope(q, k)
 *   x += attention(q, k, v) Wo^T
 *   xn = rmsnorm(x);  x += (silu(xn Wgate^T) * xn Wup^T) Wdown^T */
#include "worker/engine/forward.h"

#include "common/util.h"

#include <limits.h>
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

void llama_state_free(llama_state *s) {
    if (s->be) {
        if (s->acts) s->be->free_buf(s->acts);
        if (s->ints) s->be->free_buf(s->ints);
        if (s->dev_logits) s->be->free_buf(s->dev_logits);
    }
    free(s->host_ints);
    free(s->host_hidden);
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
