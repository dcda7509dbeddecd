/* sft.c - training examples, batches and mixtures (see sft.h). */
#include "worker/engine/sft.h"

#include <stdlib.h>
#include <string.h>

#include "common/util.h"

#define SFT_MAX_MAP_FILE ((size_t)16 << 20)

/* ---- random numbers ---- */

/* splitmix64's output function: a bijective mix of its 64-bit input. */
static uint64_t sft_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t sft_splitmix_next(uint64_t *state) {
    *state += 0x9e3779b97f4a7c15ULL;
    return sft_mix64(*state);
}

void sft_rng_init(sft_rng *r, uint64_t seed, uint64_t stream) {
    uint64_t st = sft_mix64(seed) ^ sft_mix64(stream + 1);
    for (int i = 0; i < 4; i++) r->s[i] = sft_splitmix_next(&st);
}

static uint64_t sft_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t sft_rng_next(sft_rng *r) {
    uint64_t *s = r->s;
    uint64_t out = sft_rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = sft_rotl(s[3], 45);
    return out;
}

uint64_t sft_rng_below(sft_rng *r, uint64_t n) {
    /* values below (2^64 - n) % n would make the low residues more likely */
    uint64_t threshold = (0 - n) % n;
    for (;;) {
        uint64_t x = sft_rng_next(r);
        if (x >= threshold) return x % n;
    }
}

void sft_shuffle(sft_rng *r, size_t *v, size_t n) {
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)sft_rng_below(r, (uint64_t)i);
        size_t tmp = v[i - 1];
        v[i - 1] = v[j];
        v[j] = tmp;
    }
}

/* ---- examples ---- */

void sft_set_free(sft_set *s) {
    free(s->input_ids);
    free(s->labels);
    free(s->off);
    memset(s, 0, sizeof *s);
}

int32_t sft_pad_id(const tok_tokenizer *t) {
    if (tok_pad_id(t) >= 0) return tok_pad_id(t);
    if (tok_eos_id(t) >= 0) return tok_eos_id(t);
    return 0;
}

/* Appends n ids and their labels (labels NULL: the ids themselves, or
 * SFT_IGNORE everywhere when ignore) to s, growing its arrays. Returns 0 or
 * -1 when out of memory. */
static int sft_append(sft_set *s, size_t *cap, const int32_t *ids, size_t n, bool ignore) {
    if (s->n_tokens + n > *cap) {
        size_t c = *cap ? *cap : 1024;
        while (c < s->n_tokens + n) c *= 2;
        int32_t *a = realloc(s->input_ids, c * sizeof *a);
        if (!a) return -1;
        s->input_ids = a;
        int32_t *b = realloc(s->labels, c * sizeof *b);
        if (!b) return -1;
        s->labels = b;
        *cap = c;
    }
    for (size_t i = 0; i < n; i++) {
        s->input_ids[s->n_tokens + i] = ids[i];
        s->labels[s->n_tokens + i] = ignore ? SFT_IGNORE : ids[i];
    }
    s->n_tokens += n;
    return 0;
}

/* The prompt and response ids of one example in SFT mode, cut as
 * LLaMA-Factory cuts them. Returns 0, or -1 with err. */
static int sft_one_sft(const ds_example *ex, const tok_tokenizer *t, const sft_opts *o,
                       tok_ids *p, tok_ids *r, size_t *keep_p, size_t *keep_r, char *err,
                       size_t errlen) {
    p->len = r->len = 0;
    if (tmpl_encode(o->tmpl, t, ex->system, ex->query, ex->response, p, r, NULL, err, errlen))
        return -1;
    tmpl_cutoff(p->len, r->len, o->cutoff_len, o->reserved_label_len, keep_p, keep_r);
    return 0;
}

/* The ids of one raw-text example (pretraining mode), before the cut to
 * cutoff_len, in p. Returns 0, or -1 with err. */
static int sft_one_pretrain(const ds_example *ex, const tok_tokenizer *t, tok_ids *p, char *err,
                            size_t errlen) {
    p->len = 0;
    if (tok_bos_id(t) >= 0 && tok_ids_push(p, tok_bos_id(t)))
        return err_set(err, errlen, "out of memory");
    size_t qn = strlen(ex->query), rn = strlen(ex->response);
    char *text = malloc(qn + rn + 1);
    if (!text) return err_set(err, errlen, "out of memory");
    memcpy(text, ex->query, qn);
    memcpy(text + qn, ex->response, rn + 1);
    int rc = tok_encode(t, text, qn + rn, p, err, errlen);
    free(text);
    if (rc) return -1;
    if (tok_eos_id(t) >= 0 && tok_ids_push(p, tok_eos_id(t)))
        return err_set(err, errlen, "too many tokens");
    return 0;
}

int sft_build(const ds_dataset *ds, const size_t *subset, size_t n_subset,
              const tok_tokenizer *t, const sft_opts *o, sft_set *out, char *err,
              size_t errlen) {
    memset(out, 0, sizeof *out);
    size_t n = subset ? n_subset : ds->n;
    if (n == 0) return err_set(err, errlen, "the dataset has no examples");
    if (o->cutoff_len < 2)
        return err_set(err, errlen, "cutoff_len %zu is too small (at least 2)", o->cutoff_len);
    if (o->mode == SFT_MODE_SFT) {
        if (o->reserved_label_len == 0)
            return err_set(err, errlen, "reserved_label_len must be at least 1");
        if (o->cutoff_len <= o->reserved_label_len)
            return err_set(err, errlen,
                           "cutoff_len %zu is too small: it must exceed reserved_label_len %zu",
                           o->cutoff_len, o->reserved_label_len);
    }
    int rc = -1;
    size_t cap = 0;
    tok_ids p, r;
    tok_ids_init(&p, TOK_MAX_TEXT);
    tok_ids_init(&r, TOK_MAX_TEXT);
    out->off = malloc((n + 1) * sizeof *out->off);
    if (!out->off) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    out->off[0] = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k = subset ? subset[i] : i;
        if (k >= ds->n) {
            err_set(err, errlen, "example index %zu is out of range (%zu examples)", k, ds->n);
            goto out;
        }
        char e2[ERR_LEN];
        size_t start = out->n_tokens;
        if (o->mode == SFT_MODE_SFT) {
            size_t kp, kr;
            if (sft_one_sft(&ds->items[k], t, o, &p, &r, &kp, &kr, e2, sizeof e2)) {
                err_set(err, errlen, "example %zu: %s", k, e2);
                goto out;
            }
            if (kp < p.len || kr < r.len) out->n_truncated++;
            if (sft_append(out, &cap, p.v, kp, true) || sft_append(out, &cap, r.v, kr, false)) {
                err_set(err, errlen, "out of memory");
                goto out;
            }
        } else {
            if (sft_one_pretrain(&ds->items[k], t, &p, e2, sizeof e2)) {
                err_set(err, errlen, "example %zu: %s", k, e2);
                goto out;
            }
            size_t keep = p.len < o->cutoff_len ? p.len : o->cutoff_len;
            if (keep < p.len) out->n_truncated++;
            if (sft_append(out, &cap, p.v, keep, false)) {
                err_set(err, errlen, "out of memory");
                goto out;
            }
        }
        for (size_t j = start + 1; j < out->n_tokens; j++)
            if (out->labels[j] != SFT_IGNORE) out->n_label++;
        out->off[i + 1] = out->n_tokens;
    }
    out->n = n;
    rc = 0;
out:
    tok_ids_free(&p);
    tok_ids_free(&r);
    if (rc) sft_set_free(out);
    return rc;
}

/* ---- batches ---- */

int sft_plan(size_t n, size_t batch_size, size_t grad_accum, size_t num_epochs,
             size_t max_steps, size_t *steps_per_epoch, size_t *total_steps, char *err,
             size_t errlen) {
    if (n == 0) return err_set(err, errlen, "the dataset has no examples");
    if (batch_size == 0) return err_set(err, errlen, "batch_size must be at least 1");
    if (grad_accum == 0)
        return err_set(err, errlen, "gradient_accumulation_steps must be at least 1");
    if (max_steps == 0 && num_epochs == 0)
        return err_set(err, errlen, "one of num_train_epochs and max_steps must be above 0");
    size_t micro = n / batch_size + (n % batch_size != 0);
    size_t spe = micro / grad_accum + (micro % grad_accum != 0);
    if (max_steps == 0 && num_epochs > SIZE_MAX / spe)
        return err_set(err, errlen, "num_train_epochs %zu is too large", num_epochs);
    *steps_per_epoch = spe;
    *total_steps = max_steps ? max_steps : num_epochs * spe;
    return 0;
}

/* Fills l->order with epoch l->pos.epoch's order. */
static void sft_loader_order(sft_loader *l) {
    size_t n = l->set->n;
    for (size_t i = 0; i < n; i++) l->order[i] = i;
    if (!l->o.shuffle) return;
    sft_rng r;
    sft_rng_init(&r, l->o.seed, l->pos.epoch);
    sft_shuffle(&r, l->order, n);
}

int sft_loader_init(sft_loader *l, const sft_set *set, const sft_loader_opts *o, char *err,
                    size_t errlen) {
    memset(l, 0, sizeof *l);
    if (set->n == 0) return err_set(err, errlen, "the dataset has no examples");
    if (o->batch_size == 0) return err_set(err, errlen, "batch_size must be at least 1");
    if (o->grad_accum == 0)
        return err_set(err, errlen, "gradient_accumulation_steps must be at least 1");
    l->order = malloc(set->n * sizeof *l->order);
    if (!l->order) return err_set(err, errlen, "out of memory");
    l->set = set;
    l->o = *o;
    sft_loader_order(l);
    return 0;
}

int sft_loader_seek(sft_loader *l, sft_pos pos, char *err, size_t errlen) {
    if (pos.cursor > l->set->n)
        return err_set(err, errlen, "data position %llu is past the dataset's %zu examples",
                       (unsigned long long)pos.cursor, l->set->n);
    if (pos.cursor == l->set->n) {
        pos.epoch++;
        pos.cursor = 0;
    }
    bool same = pos.epoch == l->pos.epoch;
    l->pos = pos;
    if (!same) sft_loader_order(l);
    return 0;
}

sft_pos sft_loader_pos(const sft_loader *l) { return l->pos; }

void sft_loader_free(sft_loader *l) {
    free(l->order);
    memset(l, 0, sizeof *l);
}

/* Fills micro-batch b with the examples idx[0..rows), right padded.
 * Returns 0, or -1 when out of memory (b keeps its old buffers). */
static int sft_fill_batch(const sft_set *s, const size_t *idx, size_t rows, int32_t pad,
                          sft_batch *b) {
    size_t T = 0;
    for (size_t i = 0; i < rows; i++) {
        size_t len = s->off[idx[i] + 1] - s->off[idx[i]];
        if (len > T) T = len;
    }
    if (T == 0) T = 1;
    int32_t *ids = realloc(b->input_ids, rows * T * sizeof *ids);
    if (!ids) return -1;
    b->input_ids = ids;
    int32_t *lab = realloc(b->labels, rows * T * sizeof *lab);
    if (!lab) return -1;
    b->labels = lab;
    size_t *lens = realloc(b->lens, rows * sizeof *lens);
    if (!lens) return -1;
    b->lens = lens;
    size_t *index = realloc(b->index, rows * sizeof *index);
    if (!index) return -1;
    b->index = index;
    b->rows = rows;
    b->seq_len = T;
    b->n_label = 0;
    for (size_t i = 0; i < rows; i++) {
        size_t o = s->off[idx[i]], len = s->off[idx[i] + 1] - o;
        b->lens[i] = len;
        b->index[i] = idx[i];
        for (size_t j = 0; j < T; j++) {
            bool in = j < len;
            b->input_ids[i * T + j] = in ? s->input_ids[o + j] : pad;
            b->labels[i * T + j] = in ? s->labels[o + j] : SFT_IGNORE;
            if (in && j > 0 && s->labels[o + j] != SFT_IGNORE) b->n_label++;
        }
    }
    return 0;
}

int sft_loader_next(sft_loader *l, sft_step *step, char *err, size_t errlen) {
    size_t n = l->set->n, bs = l->o.batch_size;
    /* a step never holds more micro-batches than an epoch has */
    size_t micro = n / bs + (n % bs != 0);
    size_t want = l->o.grad_accum < micro ? l->o.grad_accum : micro;
    if (step->cap_mb < want) {
        sft_batch *mb = realloc(step->mb, want * sizeof *mb);
        if (!mb) return err_set(err, errlen, "out of memory");
        memset(mb + step->cap_mb, 0, (want - step->cap_mb) * sizeof *mb);
        step->mb = mb;
        step->cap_mb = want;
    }
    step->n_mb = 0;
    step->n_label = 0;
    step->n_tokens = 0;
    step->epoch = l->pos.epoch;
    size_t cur = (size_t)l->pos.cursor;
    while (step->n_mb < l->o.grad_accum && cur < n) {
        size_t rows = n - cur < bs ? n - cur : bs;
        sft_batch *b = &step->mb[step->n_mb];
        if (sft_fill_batch(l->set, l->order + cur, rows, l->o.pad_id, b))
            return err_set(err, errlen, "out of memory");
        step->n_label += b->n_label;
        for (size_t i = 0; i < rows; i++) step->n_tokens += b->lens[i];
        step->n_mb++;
        cur += rows;
    }
    if (cur >= n) {
        l->pos.epoch++;
        l->pos.cursor = 0;
        sft_loader_order(l);
    } else {
        l->pos.cursor = cur;
    }
    return 0;
}

void sft_step_free(sft_step *step) {
    if (step->mb) {
        /* every allocated entry, not only the last step's n_mb */
        for (size_t i = 0; i < step->cap_mb; i++) {
            free(step->mb[i].input_ids);
            free(step->mb[i].labels);
            free(step->mb[i].lens);
            free(step->mb[i].index);
        }
    }
    free(step->mb);
    memset(step, 0, sizeof *step);
}

/* ---- task maps ---- */

void sft_taskmap_free(sft_taskmap *m) {
    for (size_t i = 0; i < m->n; i++) {
        free(m->task[i]);
        free(m->cluster[i]);
    }
    free(m->task);
    free(m->cluster);
    memset(m, 0, sizeof *m);
}

static char *sft_strndup(const char *s, size_t n) {
    char *p = malloc(n + 1);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

typedef struct {
    char *task, *cluster;
} sft_pair;

static int sft_cmp_pair(const void *a, const void *b) {
    return strcmp(((const sft_pair *)a)->task, ((const sft_pair *)b)->task);
}

/* Sorts m's pairs by task; fails (naming the task) on a duplicate. */
static int sft_taskmap_sort(const char *name, sft_taskmap *m, char *err, size_t errlen) {
    if (m->n == 0) return 0;
    sft_pair *pv = malloc(m->n * sizeof *pv);
    if (!pv) return err_set(err, errlen, "out of memory");
    for (size_t i = 0; i < m->n; i++) pv[i] = (sft_pair){m->task[i], m->cluster[i]};
    qsort(pv, m->n, sizeof *pv, sft_cmp_pair);
    for (size_t i = 0; i < m->n; i++) {
        m->task[i] = pv[i].task;
        m->cluster[i] = pv[i].cluster;
    }
    free(pv);
    for (size_t i = 1; i < m->n; i++)
        if (strcmp(m->task[i - 1], m->task[i]) == 0)
            return err_set(err, errlen, "%s: task \"%s\" is listed twice", name, m->task[i]);
    return 0;
}

int sft_taskmap_parse(const char *name, const char *data, size_t len, sft_taskmap *out,
                      char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    size_t cap = 0, line_no = 0, pos = 0;
    bool header = false;
    while (pos < len) {
        const char *line = data + pos;
        const char *nl = memchr(line, '\n', len - pos);
        size_t ll = nl ? (size_t)(nl - line) : len - pos;
        pos += ll + (nl != NULL);
        line_no++;
        if (ll > 0 && line[ll - 1] == '\r') ll--;
        if (ll == 0) continue;
        const char *tab = memchr(line, '\t', ll);
        if (!tab || memchr(tab + 1, '\t', ll - (size_t)(tab - line) - 1)) {
            err_set(err, errlen, "%s line %zu: want \"task<TAB>cluster\"", name, line_no);
            goto fail;
        }
        size_t tl = (size_t)(tab - line), cl = ll - tl - 1;
        if (!header) {
            if (tl != 4 || memcmp(line, "task", 4) != 0 || cl != 7 ||
                memcmp(tab + 1, "cluster", 7) != 0) {
                err_set(err, errlen, "%s line %zu: the header must be \"task<TAB>cluster\"", name,
                        line_no);
                goto fail;
            }
            header = true;
            continue;
        }
        if (tl == 0 || cl == 0) {
            err_set(err, errlen, "%s line %zu: empty task or cluster", name, line_no);
            goto fail;
        }
        if (out->n == cap) {
            size_t c = cap ? cap * 2 : 64;
            char **t = realloc(out->task, c * sizeof *t);
            if (!t) goto oom;
            out->task = t;
            char **k = realloc(out->cluster, c * sizeof *k);
            if (!k) goto oom;
            out->cluster = k;
            cap = c;
        }
        char *ts = sft_strndup(line, tl), *cs = sft_strndup(tab + 1, cl);
        if (!ts || !cs) {
            free(ts);
            free(cs);
            goto oom;
        }
        out->task[out->n] = ts;
        out->cluster[out->n] = cs;
        out->n++;
    }
    if (!header) {
        err_set(err, errlen, "%s: empty (want the header \"task<TAB>cluster\")", name);
        goto fail;
    }
    if (sft_taskmap_sort(name, out, err, errlen)) goto fail;
    return 0;
oom:
    err_set(err, errlen, "out of memory");
fail:
    sft_taskmap_free(out);
    return -1;
}

int sft_taskmap_load(const char *path, sft_taskmap *out, char *err, size_t errlen) {
    char *data = NULL;
    size_t len = 0;
    memset(out, 0, sizeof *out);
    if (util_read_file(path, SFT_MAX_MAP_FILE, &data, &len, err, errlen)) return -1;
    int rc = sft_taskmap_parse(path, data, len, out, err, errlen);
    free(data);
    return rc;
}

const char *sft_taskmap_cluster(const sft_taskmap *m, const char *task) {
    size_t lo = 0, hi = m->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(m->task[mid], task);
        if (c == 0) return m->cluster[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* ---- mixtures ---- */

void sft_mix_free(sft_mix *m) {
    for (size_t i = 0; i < m->n_groups; i++) free(m->groups[i].name);
    free(m->groups);
    free(m->keep);
    memset(m, 0, sizeof *m);
}

static int sft_cmp_size(const void *a, const void *b) {
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

/* The index of group name in m->groups[0..n_groups) (sorted), or where it
 * would go with *found false. */
static size_t sft_group_find(const sft_mix *m, const char *name, bool *found) {
    size_t lo = 0, hi = m->n_groups;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(m->groups[mid].name, name);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

int sft_mix_cap(const ds_dataset *ds, const sft_taskmap *map, enum sft_cap_by by, size_t cap,
                uint64_t seed, sft_mix *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    size_t n = ds->n;
    if (n == 0) return err_set(err, errlen, "the dataset has no examples");
    if (cap == 0) return err_set(err, errlen, "the cap must be at least 1");
    if (by == SFT_CAP_CLUSTER && !map)
        return err_set(err, errlen, "capping by cluster needs a task map");
    int rc = -1;
    const char **gname = malloc(n * sizeof *gname);
    size_t *order = malloc(n * sizeof *order), *gix = malloc(n * sizeof *gix);
    size_t gcap = 0;
    out->keep = malloc(n * sizeof *out->keep);
    if (!gname || !order || !gix || !out->keep) goto oom;
    /* each example's group, and the sorted group list with its sizes */
    for (size_t i = 0; i < n; i++) {
        const char *task = ds->items[i].task;
        if (!task) {
            err_set(err, errlen, "example %zu has no task", i);
            goto out;
        }
        gname[i] = task;
        if (by == SFT_CAP_CLUSTER) {
            gname[i] = sft_taskmap_cluster(map, task);
            if (!gname[i]) {
                err_set(err, errlen, "example %zu: task \"%s\" is not in the task map", i, task);
                goto out;
            }
        }
        bool found;
        size_t g = sft_group_find(out, gname[i], &found);
        if (!found) {
            if (out->n_groups == gcap) {
                size_t c = gcap ? gcap * 2 : 16;
                sft_group *ng = realloc(out->groups, c * sizeof *ng);
                if (!ng) goto oom;
                out->groups = ng;
                gcap = c;
            }
            char *nm = sft_strndup(gname[i], strlen(gname[i]));
            if (!nm) goto oom;
            memmove(out->groups + g + 1, out->groups + g,
                    (out->n_groups - g) * sizeof *out->groups);
            out->groups[g] = (sft_group){.name = nm, .available = 0, .kept = 0};
            out->n_groups++;
        }
        out->groups[g].available++;
    }
    for (size_t i = 0; i < n; i++) {
        bool found;
        gix[i] = sft_group_find(out, gname[i], &found);
        order[i] = i;
    }
    sft_rng r;
    sft_rng_init(&r, seed, 0);
    sft_shuffle(&r, order, n);
    for (size_t i = 0; i < n; i++) {
        sft_group *g = &out->groups[gix[order[i]]];
        if (g->kept < cap) {
            g->kept++;
            out->keep[out->n_keep++] = order[i];
        }
    }
    qsort(out->keep, out->n_keep, sizeof *out->keep, sft_cmp_size);
    rc = 0;
    goto out;
oom:
    err_set(err, errlen, "out of memory");
out:
    free(gname);
    free(order);
    free(gix);
    if (rc) sft_mix_free(out);
    return rc;
}
