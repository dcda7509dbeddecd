/* adamw.c - AdamW and global-norm clipping over ranges of a flat float32
 * parameter array; the formulas and their torch origin are in adamw.h.
 *
 * Serialized state, all integers and floats little-endian:
 *
 *   offset  size  field
 *        0     8  magic "STRAdamW"
 *        8     4  format version (1)
 *       12     4  zero
 *       16     8  step t (int64)
 *       24     8  nranges (uint64)
 *       32    32  beta1, beta2, eps, weight_decay (float64 each)
 *       64  24*n  per range: offset, count, decay (0 or 1), uint64 each
 *            4*T  m (float32), T = trainable elements, in range order
 *            4*T  v (float32) */
#include "worker/engine/adamw.h"

#include "common/util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ADAMW_MAGIC "STRAdamW"
#define ADAMW_VERSION 1u
#define ADAMW_HEADER_BYTES 64u
#define ADAMW_RANGE_BYTES 24u

struct adamw {
    adamw_config cfg;
    adamw_range *ranges;
    size_t nranges;
    size_t trainable; /* sum of counts */
    int64_t t;
    float *m; /* (trainable) first moments, packed in range order */
    float *v; /* (trainable) second moments */
};

adamw_config adamw_default_config(void) {
    adamw_config c = {ADAMW_DEFAULT_BETA1, ADAMW_DEFAULT_BETA2, ADAMW_DEFAULT_EPS,
                      ADAMW_DEFAULT_WEIGHT_DECAY};
    return c;
}

/* Rejects betas outside [0, 1) and negative or non-finite eps / decay, which
 * torch.optim.AdamW refuses too. Returns 0 or -1 with err. */
static int adamw_check_config(const adamw_config *cfg, char *err, size_t errlen) {
    if (!(cfg->beta1 >= 0.0 && cfg->beta1 < 1.0))
        return err_set(err, errlen, "adamw: beta1 %g is not in [0, 1)", cfg->beta1);
    if (!(cfg->beta2 >= 0.0 && cfg->beta2 < 1.0))
        return err_set(err, errlen, "adamw: beta2 %g is not in [0, 1)", cfg->beta2);
    if (!(cfg->eps >= 0.0 && isfinite(cfg->eps)))
        return err_set(err, errlen, "adamw: eps %g must be finite and >= 0", cfg->eps);
    if (!(cfg->weight_decay >= 0.0 && isfinite(cfg->weight_decay)))
        return err_set(err, errlen, "adamw: weight_decay %g must be finite and >= 0",
                       cfg->weight_decay);
    return 0;
}

/* Checks that ranges are non-empty, increasing and disjoint, with no offset
 * arithmetic overflowing; sums their counts into *total. Returns 0 or -1. */
static int adamw_check_ranges(const adamw_range *ranges, size_t nranges, size_t *total,
                              char *err, size_t errlen) {
    if (nranges == 0) return err_set(err, errlen, "adamw: no trainable ranges");
    size_t sum = 0, end = 0;
    for (size_t i = 0; i < nranges; i++) {
        const adamw_range *r = &ranges[i];
        if (r->count == 0) return err_set(err, errlen, "adamw: range %zu is empty", i);
        if (r->offset > SIZE_MAX - r->count)
            return err_set(err, errlen, "adamw: range %zu overflows", i);
        if (i > 0 && r->offset < end)
            return err_set(err, errlen,
                           "adamw: range %zu (offset %zu) overlaps or precedes range %zu (end %zu)",
                           i, r->offset, i - 1, end);
        end = r->offset + r->count;
        sum += r->count; /* cannot overflow: the ranges are disjoint within SIZE_MAX */
    }
    *total = sum;
    return 0;
}

int adamw_new(const adamw_config *cfg, const adamw_range *ranges, size_t nranges, adamw **out,
              char *err, size_t errlen) {
    size_t total = 0;
    adamw *opt = NULL;
    if (adamw_check_config(cfg, err, errlen) != 0) return -1;
    if (adamw_check_ranges(ranges, nranges, &total, err, errlen) != 0) return -1;
    /* Keeps adamw_state_size (header + ranges + two moments) below SIZE_MAX. */
    if (total > SIZE_MAX / 4 / (2 * sizeof(float)) || nranges > SIZE_MAX / 4 / ADAMW_RANGE_BYTES)
        return err_set(err, errlen, "adamw: %zu elements in %zu ranges is too many", total,
                       nranges);
    opt = calloc(1, sizeof *opt);
    if (!opt) goto oom;
    opt->cfg = *cfg;
    opt->nranges = nranges;
    opt->trainable = total;
    opt->ranges = malloc(nranges * sizeof *ranges);
    opt->m = calloc(total, sizeof(float));
    opt->v = calloc(total, sizeof(float));
    if (!opt->ranges || !opt->m || !opt->v) goto oom;
    memcpy(opt->ranges, ranges, nranges * sizeof *ranges);
    *out = opt;
    return 0;
oom:
    adamw_free(opt);
    return err_set(err, errlen, "adamw: out of memory for the moments of %zu elements", total);
}

void adamw_free(adamw *opt) {
    if (!opt) return;
    free(opt->ranges);
    free(opt->m);
    free(opt->v);
    free(opt);
}

int64_t adamw_steps(const adamw *opt) { return opt->t; }
size_t adamw_trainable(const adamw *opt) { return opt->trainable; }
const float *adamw_exp_avg(const adamw *opt) { return opt->m; }
const float *adamw_exp_avg_sq(const adamw *opt) { return opt->v; }

double adamw_grad_norm(const adamw *opt, const float *grads) {
    double sum = 0.0;
    for (size_t r = 0; r < opt->nranges; r++) {
        const float *g = grads + opt->ranges[r].offset; /* (count) */
        for (size_t i = 0; i < opt->ranges[r].count; i++) sum += (double)g[i] * g[i];
    }
    return sqrt(sum);
}

float adamw_clip_coef(double total, double max_norm) {
    if (!(max_norm > 0.0) || !isfinite(total)) return 1.0f;
    /* torch: clip_coef = max_norm / (total_norm + 1e-6) on a float32 tensor,
     * where scalar / tensor is tensor.reciprocal() * scalar. */
    float denom = (float)total + 1e-6f;
    float coef = (1.0f / denom) * (float)max_norm;
    return coef < 1.0f ? coef : 1.0f;
}

double adamw_clip_grad_norm(const adamw *opt, float *grads, double max_norm) {
    double total = adamw_grad_norm(opt, grads);
    float coef = adamw_clip_coef(total, max_norm);
    if (coef == 1.0f) return total;
    for (size_t r = 0; r < opt->nranges; r++) {
        float *g = grads + opt->ranges[r].offset; /* (count) */
        for (size_t i = 0; i < opt->ranges[r].count; i++) g[i] *= coef;
    }
    return total;
}

adamw_scalars adamw_begin_step(adamw *opt, double lr) {
    opt->t++;
    const adamw_config *c = &opt->cfg;
    double t = (double)opt->t;
    double bias_correction1 = 1.0 - pow(c->beta1, t);
    double bias_correction2 = 1.0 - pow(c->beta2, t);
    /* Each scalar is rounded to float32 where torch hands it to a float32
     * kernel, so the arithmetic of the update is torch's, operation for
     * operation. */
    adamw_scalars s;
    s.beta1 = (float)c->beta1;
    s.one_minus_beta1 = (float)(1.0 - c->beta1);
    s.beta2 = (float)c->beta2;
    s.one_minus_beta2 = (float)(1.0 - c->beta2);
    s.neg_step_size = (float)(-(lr / bias_correction1));
    s.bias_correction2_sqrt = (float)sqrt(bias_correction2);
    s.eps = (float)c->eps;
    s.decay = (float)(1.0 - lr * c->weight_decay);
    return s;
}

float adamw_range_decay(const adamw *opt, size_t r, const adamw_scalars *s) {
    return opt->ranges[r].decay && opt->cfg.weight_decay != 0.0 ? s->decay : 1.0f;
}

const adamw_range *adamw_ranges(const adamw *opt, size_t *nranges) {
    *nranges = opt->nranges;
    return opt->ranges;
}

void adamw_moments(adamw *opt, float **m, float **v) {
    *m = opt->m;
    *v = opt->v;
}

void adamw_step(adamw *opt, float *params, const float *grads, double lr) {
    const adamw_scalars s = adamw_begin_step(opt, lr);
    size_t packed = 0;
    for (size_t r = 0; r < opt->nranges; r++) {
        const adamw_range *range = &opt->ranges[r];
        float *p = params + range->offset;      /* (count) */
        const float *g = grads + range->offset; /* (count) */
        float *m = opt->m + packed, *v = opt->v + packed;
        const float decay = adamw_range_decay(opt, r, &s);
        bool decayed = decay != 1.0f; /* p * 1 is p: skip the multiplication */
        for (size_t i = 0; i < range->count; i++) {
            float pi = decayed ? p[i] * decay : p[i];
            m[i] = m[i] * s.beta1 + s.one_minus_beta1 * g[i];
            v[i] = v[i] * s.beta2 + (s.one_minus_beta2 * g[i]) * g[i];
            float denom = sqrtf(v[i]) / s.bias_correction2_sqrt + s.eps;
            p[i] = pi + (s.neg_step_size * m[i]) / denom;
        }
        packed += range->count;
    }
}

size_t adamw_state_size(const adamw *opt) {
    return ADAMW_HEADER_BYTES + opt->nranges * ADAMW_RANGE_BYTES +
           2 * opt->trainable * sizeof(float);
}

/* Little-endian stores and loads, independent of the host's byte order. */
static void adamw_put_u32(unsigned char *p, uint32_t x) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(x >> (8 * i));
}

static void adamw_put_u64(unsigned char *p, uint64_t x) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(x >> (8 * i));
}

static void adamw_put_f64(unsigned char *p, double x) {
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    adamw_put_u64(p, bits);
}

static uint32_t adamw_get_u32(const unsigned char *p) {
    uint32_t x = 0;
    for (int i = 0; i < 4; i++) x |= (uint32_t)p[i] << (8 * i);
    return x;
}

static uint64_t adamw_get_u64(const unsigned char *p) {
    uint64_t x = 0;
    for (int i = 0; i < 8; i++) x |= (uint64_t)p[i] << (8 * i);
    return x;
}

static double adamw_get_f64(const unsigned char *p) {
    uint64_t bits = adamw_get_u64(p);
    double x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* Writes count float32s as little-endian bytes at dst. */
static void adamw_put_floats(unsigned char *dst, const float *src, size_t count) {
    for (size_t i = 0; i < count; i++) {
        uint32_t bits;
        memcpy(&bits, &src[i], sizeof bits);
        adamw_put_u32(dst + 4 * i, bits);
    }
}

static void adamw_get_floats(float *dst, const unsigned char *src, size_t count) {
    for (size_t i = 0; i < count; i++) {
        uint32_t bits = adamw_get_u32(src + 4 * i);
        memcpy(&dst[i], &bits, sizeof bits);
    }
}

/* Bytes of the header and the ranges, before the moments. */
static size_t adamw_prefix_size(const adamw *opt) {
    return ADAMW_HEADER_BYTES + opt->nranges * ADAMW_RANGE_BYTES;
}

/* Writes the header and the ranges (adamw_prefix_size bytes) at p. */
static void adamw_put_prefix(const adamw *opt, unsigned char *p) {
    memset(p, 0, ADAMW_HEADER_BYTES);
    memcpy(p, ADAMW_MAGIC, 8);
    adamw_put_u32(p + 8, ADAMW_VERSION);
    adamw_put_u64(p + 16, (uint64_t)opt->t);
    adamw_put_u64(p + 24, opt->nranges);
    adamw_put_f64(p + 32, opt->cfg.beta1);
    adamw_put_f64(p + 40, opt->cfg.beta2);
    adamw_put_f64(p + 48, opt->cfg.eps);
    adamw_put_f64(p + 56, opt->cfg.weight_decay);
    p += ADAMW_HEADER_BYTES;
    for (size_t r = 0; r < opt->nranges; r++, p += ADAMW_RANGE_BYTES) {
        adamw_put_u64(p, opt->ranges[r].offset);
        adamw_put_u64(p + 8, opt->ranges[r].count);
        adamw_put_u64(p + 16, opt->ranges[r].decay ? 1 : 0);
    }
}

int adamw_serialize(const adamw *opt, void *buf, size_t len, char *err, size_t errlen) {
    size_t need = adamw_state_size(opt);
    if (len < need)
        return err_set(err, errlen, "adamw: state needs %zu bytes, buffer holds %zu", need, len);
    unsigned char *p = buf;
    adamw_put_prefix(opt, p);
    p += adamw_prefix_size(opt);
    adamw_put_floats(p, opt->m, opt->trainable);
    adamw_put_floats(p + 4 * opt->trainable, opt->v, opt->trainable);
    return 0;
}

/* Compares one config field of a state with opt's, bit for bit (the spec
 * that made both is the same, so the doubles are too). */
static int adamw_same_field(const char *name, double stored, double mine, char *err,
                            size_t errlen) {
    if (memcmp(&stored, &mine, sizeof stored) == 0) return 0;
    return err_set(err, errlen, "adamw: state has %s %.17g, the optimizer %.17g", name, stored,
                   mine);
}

/* Checks the header and ranges of a state (the first len bytes of it) against
 * opt and returns its step in *t. Needs ADAMW_HEADER_BYTES to read the header
 * and adamw_prefix_size(opt) for the ranges. Returns 0 or -1 with err. */
static int adamw_check_prefix(const adamw *opt, const unsigned char *p, size_t len, int64_t *t,
                              char *err, size_t errlen) {
    if (len < ADAMW_HEADER_BYTES || memcmp(p, ADAMW_MAGIC, 8) != 0)
        return err_set(err, errlen, "adamw: not an optimizer state (bad magic or too short)");
    uint32_t version = adamw_get_u32(p + 8);
    if (version != ADAMW_VERSION)
        return err_set(err, errlen, "adamw: state format version %u, expected %u", version,
                       ADAMW_VERSION);
    uint64_t step = adamw_get_u64(p + 16), nranges = adamw_get_u64(p + 24);
    if (step > (uint64_t)INT64_MAX)
        return err_set(err, errlen, "adamw: step %llu out of range", (unsigned long long)step);
    if (nranges != opt->nranges)
        return err_set(err, errlen, "adamw: state has %llu ranges, the optimizer %zu",
                       (unsigned long long)nranges, opt->nranges);
    if (adamw_same_field("beta1", adamw_get_f64(p + 32), opt->cfg.beta1, err, errlen) != 0 ||
        adamw_same_field("beta2", adamw_get_f64(p + 40), opt->cfg.beta2, err, errlen) != 0 ||
        adamw_same_field("eps", adamw_get_f64(p + 48), opt->cfg.eps, err, errlen) != 0 ||
        adamw_same_field("weight_decay", adamw_get_f64(p + 56), opt->cfg.weight_decay, err,
                         errlen) != 0)
        return -1;
    if (len < adamw_prefix_size(opt))
        return err_set(err, errlen, "adamw: state is truncated in its ranges");
    p += ADAMW_HEADER_BYTES;
    for (size_t r = 0; r < opt->nranges; r++, p += ADAMW_RANGE_BYTES) {
        const adamw_range *mine = &opt->ranges[r];
        uint64_t offset = adamw_get_u64(p), count = adamw_get_u64(p + 8),
                 decay = adamw_get_u64(p + 16);
        if (offset != mine->offset || count != mine->count || decay != (mine->decay ? 1u : 0u))
            return err_set(err, errlen,
                           "adamw: state range %zu is offset %llu count %llu decay %llu, the "
                           "optimizer's offset %zu count %zu decay %d",
                           r, (unsigned long long)offset, (unsigned long long)count,
                           (unsigned long long)decay, mine->offset, mine->count,
                           mine->decay ? 1 : 0);
    }
    *t = (int64_t)step;
    return 0;
}

int adamw_deserialize(adamw *opt, const void *buf, size_t len, char *err, size_t errlen) {
    const unsigned char *p = buf;
    int64_t t = 0;
    if (adamw_check_prefix(opt, p, len, &t, err, errlen) != 0) return -1;
    size_t need = adamw_state_size(opt);
    if (len != need)
        return err_set(err, errlen, "adamw: state is %zu bytes, expected %zu", len, need);
    p += adamw_prefix_size(opt);
    opt->t = t;
    adamw_get_floats(opt->m, p, opt->trainable);
    adamw_get_floats(opt->v, p + 4 * opt->trainable, opt->trainable);
    return 0;
}

/* Floats per chunk when streaming the moments through a file. */
#define ADAMW_CHUNK 16384

int adamw_write_file(const adamw *opt, FILE *f, char *err, size_t errlen) {
    int rc = -1;
    size_t prefix = adamw_prefix_size(opt);
    unsigned char *buf = malloc(prefix > 4 * ADAMW_CHUNK ? prefix : 4 * ADAMW_CHUNK);
    if (!buf) return err_set(err, errlen, "adamw: out of memory");
    adamw_put_prefix(opt, buf);
    if (fwrite(buf, 1, prefix, f) != prefix) goto io;
    const float *moments[2] = {opt->m, opt->v};
    for (int which = 0; which < 2; which++) {
        for (size_t done = 0; done < opt->trainable;) {
            size_t n = opt->trainable - done < ADAMW_CHUNK ? opt->trainable - done : ADAMW_CHUNK;
            adamw_put_floats(buf, moments[which] + done, n);
            if (fwrite(buf, 4, n, f) != n) goto io;
            done += n;
        }
    }
    if (fflush(f) != 0) goto io;
    rc = 0;
    goto out;
io:
    err_set(err, errlen, "adamw: writing the optimizer state failed");
out:
    free(buf);
    return rc;
}

int adamw_read_file(adamw *opt, FILE *f, char *err, size_t errlen) {
    int rc = -1;
    int64_t t = 0;
    size_t prefix = adamw_prefix_size(opt);
    unsigned char *buf = malloc(prefix > 4 * ADAMW_CHUNK ? prefix : 4 * ADAMW_CHUNK);
    float *m = malloc(opt->trainable * sizeof *m), *v = malloc(opt->trainable * sizeof *v);
    if (!buf || !m || !v) {
        err_set(err, errlen, "adamw: out of memory reading the optimizer state");
        goto out;
    }
    /* The header first: it says whether the ranges that follow are ours. */
    size_t got = fread(buf, 1, ADAMW_HEADER_BYTES, f);
    if (got == ADAMW_HEADER_BYTES) got += fread(buf + got, 1, prefix - got, f);
    if (adamw_check_prefix(opt, buf, got, &t, err, errlen) != 0) goto out;
    float *moments[2] = {m, v};
    for (int which = 0; which < 2; which++) {
        for (size_t done = 0; done < opt->trainable;) {
            size_t n = opt->trainable - done < ADAMW_CHUNK ? opt->trainable - done : ADAMW_CHUNK;
            if (fread(buf, 4, n, f) != n) {
                err_set(err, errlen, "adamw: optimizer state is truncated (%zu of %zu bytes)",
                        ftell(f) >= 0 ? (size_t)ftell(f) : 0, adamw_state_size(opt));
                goto out;
            }
            adamw_get_floats(moments[which] + done, buf, n);
            done += n;
        }
    }
    if (fgetc(f) != EOF) {
        err_set(err, errlen, "adamw: optimizer state has bytes after its %zu",
                adamw_state_size(opt));
        goto out;
    }
    opt->t = t;
    free(opt->m);
    free(opt->v);
    opt->m = m;
    opt->v = v;
    m = v = NULL;
    rc = 0;
out:
    free(buf);
    free(m);
    free(v);
    return rc;
}
