/* predict.c - see predict.h.
 *
 * The pooled hidden states of every requested layer are gathered in memory,
 * one float32 (N, C) buffer per layer, filled by a forward hook as each batch
 * runs, and written as .npy at the end. Examples are batched in order of
 * prompt length (less padding); rows are still written in dataset order,
 * which the forward pass allows because an example's results do not depend
 * on its batch. */
#include "worker/predict.h"

#include "common/npy.h"
#include "common/spec.h"
#include "common/util.h"
#include "worker/engine/dataset.h"
#include "worker/engine/forward.h"
#include "worker/engine/lora.h"
#include "worker/engine/model_backend.h"
#include "worker/engine/template.h"

#include <cblas.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

enum predict_pool { POOL_LAST = 0, POOL_MEAN, POOL_MEAN_AFTER_SYSTEM };

static const char *const predict_pool_names[] = {"last_token", "mean", "mean_after_system"};

typedef struct {
    tok_ids ids;       /* the prompt as run (after the cut) */
    size_t pool_start; /* pooled rows [pool_start, pool_end) */
    size_t pool_end;
    bool truncated;
} predict_example;

typedef struct {
    llama_model model;
    bool model_loaded;
    tok_tokenizer *tok;
    ds_dataset ds;
    enum tmpl_kind tmpl;
    enum predict_pool pool;
    bool f16;
    int batch_size;
    int max_new; /* 0: no generation */
    int *layers; /* requested hidden-state indices, ascending */
    int nlayers;
    int *slot;   /* (L + 1): index into layers / hidden, or -1 */
    predict_example *ex;
    size_t n;
    size_t *order;  /* examples by prompt length */
    float **hidden; /* nlayers (N, C) buffers */
    double *acc;    /* (C) mean accumulator */
    runner_device dev;   /* where the forward runs */
    bool dev_open;
    llama_model dmodel;  /* on a GPU: the model in device memory; fwd points here */
    bool dmodel_ready;
    const llama_model *fwd; /* the model the forward reads: &model or &dmodel */
} predict_job;

/* What the hook needs to know about the running batch. */
typedef struct {
    predict_job *job;
    const size_t *members; /* example indices of the batch's sequences */
} predict_batch;

static void predict_job_free(predict_job *job) {
    /* device memory first, then the thread's CUDA context */
    if (job->dmodel_ready) llama_model_free_backend(job->dev.be, &job->dmodel);
    if (job->dev_open) runner_device_close(&job->dev);
    if (job->model_loaded) llama_free(&job->model);
    tok_free(job->tok);
    ds_free(&job->ds);
    if (job->ex)
        for (size_t i = 0; i < job->n; i++) tok_ids_free(&job->ex[i].ids);
    free(job->ex);
    free(job->order);
    if (job->hidden)
        for (int i = 0; i < job->nlayers; i++) free(job->hidden[i]);
    free(job->hidden);
    free(job->layers);
    free(job->slot);
    free(job->acc);
}

/* Loads the model (a Hugging Face directory or a llama2.c .bin file), its
 * tokenizer (from the directory; for a .bin, the directory holding it) and
 * the adapter when the spec names one. Returns 0, or -1 with err set. */
static int predict_load_model(predict_job *job, json_t *spec, runner_ctx *ctx, bool *retryable,
                              char *err, size_t errlen) {
    char path[4096], dir[4096];
    struct stat st;
    if (!ctx->resolve_model) return err_set(err, errlen, "this worker cannot resolve models");
    if (ctx->resolve_model(ctx, json_object_get(spec, "model"), path, sizeof path, err,
                           errlen) != 0) {
        *retryable = true;
        return err_prefix(err, errlen, "model");
    }
    if (stat(path, &st) != 0) return err_set(err, errlen, "model %s: %s", path, strerror(errno));
    bool is_dir = S_ISDIR(st.st_mode);
    int rc = is_dir ? llama_load_hf(path, &job->model, err, errlen)
                    : llama_load_llama2c(path, &job->model, err, errlen);
    if (rc != 0) {
        *retryable = runner_err_is_oom(err);
        return err_prefix(err, errlen, "model %s", path);
    }
    job->model_loaded = true;
    snprintf(dir, sizeof dir, "%s", path);
    if (!is_dir) {
        char *slash = strrchr(dir, '/');
        if (slash == dir)
            dir[1] = '\0';
        else if (slash)
            *slash = '\0';
        else
            snprintf(dir, sizeof dir, ".");
    }
    if (tok_load_dir(dir, job->model.cfg.vocab_size, &job->tok, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        if (!is_dir)
            return err_prefix(err, errlen,
                                "llama2.c checkpoint %s needs a tokenizer.json in its directory",
                                path);
        return err_prefix(err, errlen, "tokenizer");
    }
    json_t *adapter = json_object_get(spec, "adapter");
    if (adapter && !json_is_null(adapter)) {
        char adir[4096];
        if (!ctx->resolve_adapter) return err_set(err, errlen, "this worker cannot resolve adapters");
        if (ctx->resolve_adapter(ctx, adapter, adir, sizeof adir, err, errlen) != 0) {
            *retryable = true;
            return err_prefix(err, errlen, "adapter");
        }
        if (lora_apply(&job->model, adir, err, errlen) != 0) {
            *retryable = runner_err_is_oom(err);
            return err_prefix(err, errlen, "adapter %s", adir);
        }
    }
    return 0;
}

/* Reads the dataset (its first max_samples records). */
static int predict_load_dataset(predict_job *job, json_t *spec, runner_ctx *ctx, bool *retryable,
                                char *err, size_t errlen) {
    char path[4096], format[32] = "auto";
    enum ds_format fmt;
    if (!ctx->resolve_dataset) return err_set(err, errlen, "this worker cannot resolve datasets");
    if (ctx->resolve_dataset(ctx, json_object_get(spec, "dataset"), path, sizeof path, format,
                             sizeof format, err, errlen) != 0) {
        *retryable = true;
        return err_prefix(err, errlen, "dataset");
    }
    /* spec.format only comes with a local file, and says more than "auto" */
    const char *given = json_string_value(json_object_get(spec, "format"));
    if (given) snprintf(format, sizeof format, "%s", given);
    if (ds_format_parse(format, &fmt) != 0)
        return err_set(err, errlen, "dataset %s: unknown format \"%s\"", path, format);
    json_t *max = json_object_get(spec, "max_samples");
    size_t max_samples = max ? (size_t)json_integer_value(max) : 0;
    if (ds_load(path, fmt, max_samples, &job->ds, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        return -1; /* ds_load names the file and record */
    }
    if (job->ds.n == 0) return err_set(err, errlen, "dataset %s has no examples", path);
    return 0;
}

/* Encodes every example's prompt, cuts it and places its pooled range. */
static int predict_encode(predict_job *job, char *err, size_t errlen) {
    size_t cutoff = (size_t)job->model.cfg.max_position_embeddings;
    job->n = job->ds.n;
    job->ex = calloc(job->n, sizeof *job->ex);
    if (!job->ex) return err_set(err, errlen, "out of memory");
    for (size_t i = 0; i < job->n; i++) {
        const ds_example *d = &job->ds.items[i];
        predict_example *e = &job->ex[i];
        size_t system_len = 0;
        tok_ids_init(&e->ids, TOK_MAX_TEXT);
        if (tmpl_encode(job->tmpl, job->tok, d->system, d->query, NULL, &e->ids, NULL,
                        &system_len, err, errlen) != 0)
            return err_prefix(err, errlen, "example %zu", i);
        if (e->ids.len == 0)
            return err_set(err, errlen, "example %zu: the prompt encodes to no tokens", i);
        if (e->ids.len > cutoff) {
            e->ids.len = cutoff;
            e->truncated = true;
        }
        size_t len = e->ids.len;
        switch (job->pool) {
        case POOL_LAST:
            e->pool_start = len - 1;
            e->pool_end = len;
            break;
        case POOL_MEAN:
            e->pool_start = 0;
            e->pool_end = len;
            break;
        case POOL_MEAN_AFTER_SYSTEM:
            if (system_len >= len)
                return err_set(err, errlen,
                               "example %zu: no prompt tokens after the system part (%zu of %zu "
                               "ids) to pool with mean_after_system",
                               i, system_len, len);
            e->pool_start = system_len;
            e->pool_end = len;
            break;
        }
    }
    return 0;
}

/* Orders examples by prompt length, ties by index (a stable counting sort:
 * lengths are at most the cutoff). */
static int predict_make_order(predict_job *job, char *err, size_t errlen) {
    size_t maxlen = 0;
    for (size_t i = 0; i < job->n; i++)
        if (job->ex[i].ids.len > maxlen) maxlen = job->ex[i].ids.len;
    size_t *start = calloc(maxlen + 2, sizeof *start);
    job->order = malloc(job->n * sizeof *job->order);
    if (!start || !job->order) {
        free(start);
        return err_set(err, errlen, "out of memory");
    }
    for (size_t i = 0; i < job->n; i++) start[job->ex[i].ids.len + 1]++;
    for (size_t l = 1; l <= maxlen + 1; l++) start[l] += start[l - 1];
    for (size_t i = 0; i < job->n; i++) job->order[start[job->ex[i].ids.len]++] = i;
    free(start);
    return 0;
}

/* Reads spec.layers ("all" or indices, unique by validation) against the
 * model's L + 1 hidden states and allocates one (N, C) buffer per layer. */
static int predict_layers(predict_job *job, json_t *spec, char *err, size_t errlen) {
    int L = job->model.cfg.num_hidden_layers, C = job->model.cfg.hidden_size;
    json_t *wanted = json_object_get(spec, "layers");
    job->slot = malloc((size_t)(L + 1) * sizeof *job->slot);
    job->layers = malloc((size_t)(L + 1) * sizeof *job->layers);
    if (!job->slot || !job->layers) return err_set(err, errlen, "out of memory");
    for (int l = 0; l <= L; l++) job->slot[l] = json_is_array(wanted) ? -1 : 0;
    if (json_is_array(wanted)) {
        size_t i;
        json_t *v;
        json_array_foreach(wanted, i, v) {
            json_int_t l = json_integer_value(v);
            if (l < 0 || l > L)
                return err_set(err, errlen,
                               "spec.layers[%zu]: layer %lld is out of range: the model has "
                               "hidden states 0..%d",
                               i, (long long)l, L);
            job->slot[l] = 0;
        }
    }
    job->nlayers = 0;
    for (int l = 0; l <= L; l++)
        if (job->slot[l] == 0) {
            job->slot[l] = job->nlayers;
            job->layers[job->nlayers++] = l;
        }
    job->hidden = calloc((size_t)job->nlayers, sizeof *job->hidden);
    job->acc = malloc((size_t)C * sizeof *job->acc);
    if (!job->hidden || !job->acc) return err_set(err, errlen, "out of memory");
    if (job->n > SIZE_MAX / sizeof(float) / (size_t)C)
        return err_set(err, errlen, "out of memory for %zu examples", job->n);
    for (int i = 0; i < job->nlayers; i++) {
        job->hidden[i] = malloc(job->n * (size_t)C * sizeof(float));
        if (!job->hidden[i])
            return err_set(err, errlen, "out of memory for %d layers of %zu x %d floats",
                           job->nlayers, job->n, C);
    }
    return 0;
}

/* The forward hook: pools each sequence's rows of a requested layer into
 * that layer's buffer, at its example's row. */
static int predict_hook(void *user, int layer, const float *x, int B, int T, int C, char *err,
                        size_t errlen) {
    (void)err;
    (void)errlen;
    predict_batch *pb = user;
    predict_job *job = pb->job;
    int slot = job->slot[layer];
    if (slot < 0) return 0;
    for (int b = 0; b < B; b++) {
        size_t e = pb->members[b];
        const predict_example *ex = &job->ex[e];
        float *dst = job->hidden[slot] + e * (size_t)C;
        const float *rows = x + (size_t)b * (size_t)T * (size_t)C;
        if (ex->pool_end - ex->pool_start == 1) {
            memcpy(dst, rows + ex->pool_start * (size_t)C, (size_t)C * sizeof *dst);
            continue;
        }
        for (int c = 0; c < C; c++) job->acc[c] = 0.0;
        for (size_t t = ex->pool_start; t < ex->pool_end; t++)
            for (int c = 0; c < C; c++) job->acc[c] += rows[t * (size_t)C + (size_t)c];
        double count = (double)(ex->pool_end - ex->pool_start);
        for (int c = 0; c < C; c++) dst[c] = (float)(job->acc[c] / count);
    }
    return 0;
}

/* Runs the forward over every example, batch_size at a time, in length
 * order. Sets *tokens to the number of prompt tokens run. */
static int predict_hidden(predict_job *job, runner_ctx *ctx, bool *cancelled, size_t *tokens,
                          char *err, size_t errlen) {
    const backend *be = job->dev.be;
    llama_state s;
    int B = job->batch_size, rc = -1;
    size_t maxlen = job->ex[job->order[job->n - 1]].ids.len;
    int *ids = NULL, lengths[SPEC_MAX_BATCH];
    if ((size_t)B > job->n) B = (int)job->n;
    if (llama_state_init(&s, be, &job->model.cfg, B, (int)maxlen, err, errlen) != 0) return -1;
    ids = malloc((size_t)B * maxlen * sizeof *ids);
    if (!ids) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    *tokens = 0;
    for (size_t first = 0; first < job->n; first += (size_t)B) {
        if (ctx->cancel && atomic_load(ctx->cancel)) {
            *cancelled = true;
            err_set(err, errlen, "cancelled");
            goto out;
        }
        int nb = (int)(job->n - first < (size_t)B ? job->n - first : (size_t)B);
        const size_t *members = job->order + first;
        /* the batch's longest prompt is its last: members are length-sorted */
        int T = (int)job->ex[members[nb - 1]].ids.len;
        for (int b = 0; b < nb; b++) {
            const tok_ids *p = &job->ex[members[b]].ids;
            for (size_t t = 0; t < (size_t)T; t++)
                ids[(size_t)b * (size_t)T + t] = t < p->len ? p->v[t] : 0;
            lengths[b] = (int)p->len;
            *tokens += p->len;
        }
        predict_batch pb = {job, members};
        if (llama_forward(be, job->fwd, &s, ids, lengths, nb, T, predict_hook, &pb, NULL, err,
                          errlen) != 0 ||
            runner_device_sync(&job->dev, err, errlen) != 0)
            goto out;
        if (ctx->progress)
            ctx->progress(ctx, (int64_t)(first + (size_t)nb), (int64_t)job->n, "examples");
    }
    rc = 0;
out:
    free(ids);
    llama_state_free(&s);
    return rc;
}

/* Writes the per-layer .npy files and publishes them; appends their names
 * to artifacts. */
static int predict_write_hidden(predict_job *job, runner_ctx *ctx, json_t *artifacts,
                                bool *retryable, char *err, size_t errlen) {
    size_t C = (size_t)job->model.cfg.hidden_size, count = job->n * C;
    double *wide = NULL;
    int rc = -1;
    if (job->f16) {
        wide = malloc(count * sizeof *wide);
        if (!wide) {
            *retryable = true;
            return err_set(err, errlen, "out of memory");
        }
    }
    for (int i = 0; i < job->nlayers; i++) {
        char name[64], path[4096];
        snprintf(name, sizeof name, "hidden_states_%d.npy", job->layers[i]);
        int n = snprintf(path, sizeof path, "%s/%s", ctx->work_dir, name);
        if (n < 0 || (size_t)n >= sizeof path) {
            err_set(err, errlen, "work directory path too long");
            goto out;
        }
        int w;
        if (job->f16) {
            /* float -> double is exact, so the half is float32's nearest */
            for (size_t k = 0; k < count; k++) wide[k] = job->hidden[i][k];
            w = npy_write_f64(path, NPY_F16, 2, wide, job->n, C, err, errlen);
        } else {
            w = npy_write_f32(path, job->hidden[i], job->n, C, err, errlen);
        }
        if (w != 0 || ctx->add_artifact(ctx, name, path, err, errlen) != 0) {
            *retryable = true;
            err_prefix(err, errlen, "%s", name);
            goto out;
        }
        if (!json_is_array(artifacts) || json_array_append_new(artifacts, json_string(name)) != 0) {
            *retryable = true;
            err_set(err, errlen, "out of memory");
            goto out;
        }
        /* the float buffer is not needed any more: give the memory back early */
        free(job->hidden[i]);
        job->hidden[i] = NULL;
    }
    rc = 0;
out:
    free(wide);
    return rc;
}

/* Writes lines (each a JSON object, consumed) to work_dir/name and
 * publishes it. */
static int predict_write_jsonl(runner_ctx *ctx, const char *name, json_t *lines,
                               json_t *artifacts, bool *retryable, char *err, size_t errlen) {
    char path[4096];
    int n = snprintf(path, sizeof path, "%s/%s", ctx->work_dir, name);
    if (n < 0 || (size_t)n >= sizeof path) return err_set(err, errlen, "work directory path too long");
    FILE *f = fopen(path, "w");
    *retryable = true;
    if (!f) return err_set(err, errlen, "create %s: %s", path, strerror(errno));
    size_t i;
    json_t *line;
    bool ok = true;
    json_array_foreach(lines, i, line) {
        if (json_dumpf(line, f, JSON_COMPACT | JSON_ENSURE_ASCII) != 0 || fputc('\n', f) == EOF) {
            ok = false;
            break;
        }
    }
    if (fclose(f) != 0) ok = false;
    if (!ok) return err_set(err, errlen, "write %s: %s", path, strerror(errno));
    if (ctx->add_artifact(ctx, name, path, err, errlen) != 0) return -1;
    if (json_array_append_new(artifacts, json_string(name)) != 0)
        return err_set(err, errlen, "out of memory");
    *retryable = false;
    return 0;
}

/* examples.jsonl: index, prompt ids, pooled position or range, task. */
static int predict_write_examples(predict_job *job, runner_ctx *ctx, json_t *artifacts,
                                  bool *retryable, char *err, size_t errlen) {
    json_t *lines = json_array();
    int rc = -1;
    *retryable = true;
    if (!lines) return err_set(err, errlen, "out of memory");
    for (size_t i = 0; i < job->n; i++) {
        const predict_example *e = &job->ex[i];
        json_t *ids = json_array(), *line = NULL;
        if (!ids) goto oom;
        for (size_t t = 0; t < e->ids.len; t++)
            if (json_array_append_new(ids, json_integer(e->ids.v[t])) != 0) {
                json_decref(ids);
                goto oom;
            }
        json_t *pos = job->pool == POOL_LAST
                          ? json_integer((json_int_t)e->pool_start)
                          : json_pack("[I, I]", (json_int_t)e->pool_start, (json_int_t)e->pool_end);
        line = json_pack("{s:I, s:o, s:o}", "index", (json_int_t)i, "input_ids", ids,
                         "pooled_position", pos);
        if (!line || json_array_append_new(lines, line) != 0) goto oom;
        if (job->ds.items[i].task &&
            json_object_set_new(line, "task", json_string(job->ds.items[i].task)) != 0)
            goto oom;
        if (e->truncated && json_object_set_new(line, "truncated", json_true()) != 0) goto oom;
    }
    rc = predict_write_jsonl(ctx, "examples.jsonl", lines, artifacts, retryable, err, errlen);
    goto out;
oom:
    err_set(err, errlen, "out of memory");
out:
    json_decref(lines);
    return rc;
}

/* The hook of a greedy step: keeps, per sequence, the last real position's
 * row of the final hidden state (after the final norm). */
typedef struct {
    const int *lengths;
    float *last; /* (B, C) */
    int L;
} predict_greedy_batch;

static int predict_greedy_hook(void *user, int layer, const float *x, int B, int T, int C,
                               char *err, size_t errlen) {
    (void)err;
    (void)errlen;
    predict_greedy_batch *g = user;
    if (layer != g->L) return 0;
    for (int b = 0; b < B; b++)
        memcpy(g->last + (size_t)b * (size_t)C,
               x + ((size_t)b * (size_t)T + (size_t)(g->lengths[b] - 1)) * (size_t)C,
               (size_t)C * sizeof(float));
    return 0;
}

/* predict_greedy with the head's weights read from head (V, C) in host
 * memory, so that m may live on a GPU (dev, when not NULL, is synchronised
 * after every step and its errors end the decoding). */
static int predict_greedy_on(const backend *be, const llama_model *m, const float *head,
                             const runner_device *dev, const tok_ids *prompts, size_t n,
                             int batch_size, int max_new, int eos_id, size_t max_len,
                             atomic_int *cancel, tok_ids *out, char *err, size_t errlen) {
    const llama_config *cfg = &m->cfg;
    size_t C = (size_t)cfg->hidden_size, V = (size_t)cfg->vocab_size, maxprompt = 0;
    llama_state s;
    bool state = false;
    int rc = -1, *ids = NULL, *lengths = NULL;
    size_t *active = NULL;
    float *last = NULL, *logits = NULL;
    for (size_t i = 0; i < n; i++) tok_ids_init(&out[i], (size_t)max_new);
    if (n == 0) return 0;
    if (batch_size < 1 || max_new < 1 || max_len < 1)
        return err_set(err, errlen, "bad greedy arguments");
    for (size_t i = 0; i < n; i++) {
        if (prompts[i].len < 1 || prompts[i].len > max_len)
            return err_set(err, errlen, "prompt %zu has %zu ids (1..%zu allowed)", i,
                           prompts[i].len, max_len);
        if (prompts[i].len > maxprompt) maxprompt = prompts[i].len;
    }
    size_t T = maxprompt + (size_t)max_new - 1; /* the last id is never run */
    if (T > max_len) T = max_len;
    if ((size_t)batch_size > n) batch_size = (int)n;
    size_t B = (size_t)batch_size;
    if (llama_state_init(&s, be, cfg, batch_size, (int)T, err, errlen) != 0) return -1;
    state = true;
    ids = malloc(B * T * sizeof *ids);
    lengths = malloc(B * sizeof *lengths);
    active = malloc(B * sizeof *active);
    last = malloc(B * C * sizeof *last);
    logits = malloc(V * sizeof *logits);
    if (!ids || !lengths || !active || !last || !logits) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    for (size_t first = 0; first < n; first += B) {
        size_t na = n - first < B ? n - first : B;
        for (size_t b = 0; b < na; b++) active[b] = first + b;
        while (na > 0) {
            if (cancel && atomic_load(cancel)) {
                err_set(err, errlen, "cancelled");
                goto out;
            }
            size_t Tb = 0;
            for (size_t b = 0; b < na; b++) {
                size_t len = prompts[active[b]].len + out[active[b]].len;
                if (len > Tb) Tb = len;
            }
            for (size_t b = 0; b < na; b++) {
                const tok_ids *p = &prompts[active[b]], *o = &out[active[b]];
                for (size_t t = 0; t < Tb; t++)
                    ids[b * Tb + t] = t < p->len          ? p->v[t]
                                      : t < p->len + o->len ? o->v[t - p->len]
                                                            : 0;
                lengths[b] = (int)(p->len + o->len);
            }
            predict_greedy_batch g = {lengths, last, cfg->num_hidden_layers};
            if (llama_forward(be, m, &s, ids, lengths, (int)na, (int)Tb, predict_greedy_hook, &g,
                              NULL, err, errlen) != 0 ||
                (dev && runner_device_sync(dev, err, errlen) != 0))
                goto out;
            size_t kept = 0;
            for (size_t b = 0; b < na; b++) {
                cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)V, (int)C, 1.0f, head, (int)C,
                            last + b * C, 1, 0.0f, logits, 1);
                size_t best = 0;
                for (size_t v = 1; v < V; v++)
                    if (logits[v] > logits[best]) best = v;
                tok_ids *o = &out[active[b]];
                if (tok_ids_push(o, (int32_t)best) != 0) {
                    err_set(err, errlen, "out of memory");
                    goto out;
                }
                bool done = (int)best == eos_id || o->len >= (size_t)max_new ||
                            prompts[active[b]].len + o->len >= max_len;
                if (!done) active[kept++] = active[b];
            }
            na = kept;
        }
    }
    rc = 0;
out:
    free(ids);
    free(lengths);
    free(active);
    free(last);
    free(logits);
    if (state) llama_state_free(&s);
    return rc;
}

int predict_greedy(const backend *be, const llama_model *m, const tok_ids *prompts, size_t n,
                   int batch_size, int max_new, int eos_id, size_t max_len, atomic_int *cancel,
                   tok_ids *out, char *err, size_t errlen) {
    return predict_greedy_on(be, m, m->w.lm_head, NULL, prompts, n, batch_size, max_new, eos_id,
                             max_len, cancel, out, err, errlen);
}

/* Greedy continuations of every prompt, decoded, with the dataset's
 * responses as labels: generated_predictions.jsonl. */
static int predict_generate(predict_job *job, runner_ctx *ctx, json_t *artifacts,
                            bool *retryable, bool *cancelled, char *err, size_t errlen) {
    tok_ids *prompts = malloc(job->n * sizeof *prompts);
    tok_ids *gen = calloc(job->n, sizeof *gen);
    json_t *lines = json_array();
    int rc = -1;
    if (!prompts || !gen || !lines) {
        *retryable = true;
        err_set(err, errlen, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < job->n; i++) prompts[i] = job->ex[i].ids;
    size_t max_len = (size_t)job->model.cfg.max_position_embeddings;
    int eos = tok_eos_id(job->tok);
    if (eos < 0) eos = job->model.cfg.eos_token_id;
    /* the last hidden state comes back to the host; the head's product runs
     * there from the host copy of the weights */
    if (predict_greedy_on(job->dev.be, job->fwd, job->model.w.lm_head, &job->dev, prompts,
                          job->n, job->batch_size, job->max_new, eos, max_len, ctx->cancel, gen,
                          err, errlen) != 0) {
        *cancelled = ctx->cancel && atomic_load(ctx->cancel);
        *retryable = runner_err_is_oom(err);
        err_prefix(err, errlen, "generate");
        goto out;
    }
    for (size_t i = 0; i < job->n; i++) {
        char *text = NULL;
        size_t len = 0;
        if (tok_decode(job->tok, gen[i].v, gen[i].len, true, &text, &len, err, errlen) != 0) {
            err_prefix(err, errlen, "example %zu: decode", i);
            goto out;
        }
        json_t *line = json_pack("{s:s, s:s%}", "label", job->ds.items[i].response, "predict",
                                 text, len);
        free(text);
        if (!line || json_array_append_new(lines, line) != 0) {
            *retryable = true;
            err_set(err, errlen, "example %zu: the text is not valid UTF-8 or out of memory", i);
            goto out;
        }
    }
    rc = predict_write_jsonl(ctx, "generated_predictions.jsonl", lines, artifacts, retryable,
                             err, errlen);
out:
    if (gen)
        for (size_t i = 0; i < job->n; i++) tok_ids_free(&gen[i]);
    free(gen);
    free(prompts);
    json_decref(lines);
    return rc;
}

/* Opens the job's device (runner_device_open: ctx->gpu, spec.precision)
 * and, on a GPU, copies the model there frozen: in bf16/fp16 its
 * projections exist on the device only in that precision (7B: 13 GiB, not
 * 26 + 13), so predict of 7B with batch 8 fits in 24 GB. The host model
 * stays: the generation head's product and the pooled rows use host memory.
 * Returns 0, or -1 with err set (*retryable when the GPU ran out of
 * memory: another worker may have a larger one). */
static int predict_to_device(predict_job *job, json_t *spec, runner_ctx *ctx, bool *retryable,
                             char *err, size_t errlen) {
    if (runner_device_open(ctx, spec, &job->dev, err, errlen) != 0) return -1;
    job->dev_open = true;
    job->fwd = &job->model;
    if (!job->dev.on_gpu) return 0;
    const backend *be = job->dev.be;
    if (llama_model_to_backend_frozen(be, &job->model, &job->dmodel, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        return err_prefix(err, errlen, "model to GPU %d", job->dev.gpu);
    }
    job->dmodel_ready = true;
    job->fwd = &job->dmodel;
    return 0;
}

/* Reads the scalar options of the spec (validated already). */
static int predict_options(predict_job *job, json_t *spec, char *err, size_t errlen) {
    const char *tmpl = json_string_value(json_object_get(spec, "template"));
    if (tmpl_parse(tmpl ? tmpl : "llama2", &job->tmpl) != 0)
        return err_set(err, errlen, "unknown template \"%s\"", tmpl);
    const char *pool = json_string_value(json_object_get(spec, "pool"));
    job->pool = POOL_LAST;
    if (pool) {
        size_t k = 0;
        while (k < 3 && strcmp(pool, predict_pool_names[k]) != 0) k++;
        if (k == 3) return err_set(err, errlen, "unknown pool \"%s\"", pool);
        job->pool = (enum predict_pool)k;
    }
    const char *dtype = json_string_value(json_object_get(spec, "dtype"));
    job->f16 = !dtype || strcmp(dtype, "float32") != 0;
    json_t *bs = json_object_get(spec, "batch_size");
    job->batch_size = bs ? (int)json_integer_value(bs) : 8;
    if (job->batch_size < 1 || job->batch_size > SPEC_MAX_BATCH)
        return err_set(err, errlen, "batch_size must be from 1 to %d", SPEC_MAX_BATCH);
    json_t *gen = json_object_get(spec, "generate");
    job->max_new = gen ? (int)json_integer_value(json_object_get(gen, "max_new_tokens")) : 0;
    return 0;
}

int predict_run(json_t *spec, runner_ctx *ctx, json_t **result, bool *retryable, bool *cancelled,
                char *err, size_t errlen) {
    predict_job job;
    memset(&job, 0, sizeof job);
    json_t *artifacts = json_array(), *layers = json_array(), *out = NULL;
    int rc = -1;
    double started = util_now_seconds();
    *result = NULL;
    *retryable = false;
    *cancelled = false;
    if (!artifacts || !layers) {
        *retryable = true;
        err_set(err, errlen, "out of memory");
        goto out;
    }
    if (predict_options(&job, spec, err, errlen) != 0) goto out;
    if (predict_load_model(&job, spec, ctx, retryable, err, errlen) != 0) goto out;
    if (predict_load_dataset(&job, spec, ctx, retryable, err, errlen) != 0) goto out;
    if (predict_encode(&job, err, errlen) != 0 || predict_make_order(&job, err, errlen) != 0 ||
        predict_layers(&job, spec, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        goto out;
    }
    if (predict_to_device(&job, spec, ctx, retryable, err, errlen) != 0) goto out;
    const llama_config *cfg = &job.model.cfg;
    runner_logf(ctx,
                "predict: %zu examples, template %s, pool %s, %d of %d hidden states, batch %d, "
                "model C=%d L=%d V=%d",
                job.n, tmpl_name(job.tmpl), predict_pool_names[job.pool], job.nlayers,
                cfg->num_hidden_layers + 1, job.batch_size, cfg->hidden_size,
                cfg->num_hidden_layers, cfg->vocab_size);
    size_t tokens = 0;
    double fwd_start = util_now_seconds();
    if (predict_hidden(&job, ctx, cancelled, &tokens, err, errlen) != 0) {
        *retryable = runner_err_is_oom(err);
        goto out;
    }
    double fwd_seconds = util_now_seconds() - fwd_start;
    if (predict_write_hidden(&job, ctx, artifacts, retryable, err, errlen) != 0 ||
        predict_write_examples(&job, ctx, artifacts, retryable, err, errlen) != 0)
        goto out;
    if (job.max_new > 0 &&
        predict_generate(&job, ctx, artifacts, retryable, cancelled, err, errlen) != 0)
        goto out;
    for (int i = 0; i < job.nlayers; i++)
        if (json_array_append_new(layers, json_integer(job.layers[i])) != 0) {
            *retryable = true;
            err_set(err, errlen, "out of memory");
            goto out;
        }
    double seconds = util_now_seconds() - started;
    out = json_pack("{s:I, s:O, s:i, s:s, s:s, s:s, s:O, s:f, s:f, s:I, s:s, s:s}", "examples",
                    (json_int_t)job.n, "layers", layers, "hidden_size", cfg->hidden_size, "dtype",
                    job.f16 ? "float16" : "float32", "pool", predict_pool_names[job.pool],
                    "template", tmpl_name(job.tmpl), "artifacts", artifacts, "seconds", seconds,
                    "tokens_per_second", fwd_seconds > 0 ? (double)tokens / fwd_seconds : 0.0,
                    "prompt_tokens", (json_int_t)tokens, "device",
                    job.dev.on_gpu ? "cuda" : "cpu", "precision",
                    cuda_precision_name(job.dev.precision));
    if (out && job.max_new > 0)
        json_object_set_new(out, "max_new_tokens", json_integer(job.max_new));
    if (!out) {
        *retryable = true;
        err_set(err, errlen, "out of memory");
        goto out;
    }
    runner_logf(ctx, "predict: %zu prompt tokens in %.3f s (%.1f tokens/s)", tokens, fwd_seconds,
                fwd_seconds > 0 ? (double)tokens / fwd_seconds : 0.0);
    *result = out;
    rc = 0;
out:
    if (rc != 0 && ctx->cancel && atomic_load(ctx->cancel)) *cancelled = true;
    predict_job_free(&job);
    json_decref(artifacts);
    json_decref(layers);
    return rc;
}
