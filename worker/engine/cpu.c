/* cpu.c - the CPU backend (see backend.h): OpenBLAS sgemm for every matrix
 * product, plain loops for the elementwise ops. Threads are OpenBLAS's own. */
#include "worker/engine/backend.h"

#include "common/util.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 64-byte aligned so the compiler's vector loops and OpenBLAS's kernels start
 * on a cache line. Returns NULL with err set when out of memory; sizes no
 * object may have (over PTRDIFF_MAX) are refused before asking. */
static void *cpu_alloc(size_t bytes, char *err, size_t errlen) {
    void *p = NULL;
    if (bytes > PTRDIFF_MAX || posix_memalign(&p, 64, bytes ? bytes : 1) != 0) {
        err_set(err, errlen, "out of memory allocating %zu bytes", bytes);
        return NULL;
    }
    return p;
}

static void cpu_free_buf(void *buf) { free(buf); }

static void cpu_copy(void *dst, const void *src, size_t bytes) {
    if (bytes) memcpy(dst, src, bytes);
}

/* The callers (forward.c) keep every dimension within int, as cblas wants. */
static void cpu_matmul(float *out, const float *x, const float *w, size_t N, size_t in_dim,
                       size_t out_dim, bool accumulate) {
    if (N == 0 || out_dim == 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)out_dim, (int)in_dim, 1.0f,
                x, (int)in_dim, w, (int)in_dim, accumulate ? 1.0f : 0.0f, out, (int)out_dim);
}

static void cpu_rmsnorm(float *out, const float *x, const float *weight, size_t N, size_t C,
                        float eps) {
    for (size_t n = 0; n < N; n++) {
        const float *xr = x + n * C;
        float *outr = out + n * C;
        double sumsq = 0.0;
        for (size_t i = 0; i < C; i++) sumsq += (double)xr[i] * xr[i];
        /* Hugging Face rounds the mean to fp32 before adding eps. */
        float mean = (float)(sumsq / (double)C);
        float scale = 1.0f / sqrtf(mean + eps);
        for (size_t i = 0; i < C; i++) outr[i] = weight[i] * (xr[i] * scale);
    }
}

/* The frequency loop is outermost so each inverse frequency is computed once
 * per call, exactly as Hugging Face rounds it: fp32 exponent 2i/HS, fp32
 * power, fp32 reciprocal, fp32 angle pos * inv_freq. */
static void cpu_rope(float *x, const int *pos, size_t N, int nheads, int HS, float theta) {
    int half = HS / 2;
    size_t stride = (size_t)nheads * (size_t)HS;
    for (int i = 0; i < half; i++) {
        float exponent = (float)(2 * i) / (float)HS;
        float inv_freq = 1.0f / powf(theta, exponent);
        for (size_t n = 0; n < N; n++) {
            float angle = (float)pos[n] * inv_freq;
            float c = cosf(angle), s = sinf(angle);
            float *row = x + n * stride;
            for (int h = 0; h < nheads; h++) {
                float *head = row + (size_t)h * (size_t)HS;
                float a = head[i], b = head[i + half];
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
    }
}

/* Softmax of row[0..live) in place, row[live..width) set to zero. */
static void cpu_softmax_row(float *row, int live, int width) {
    float max = row[0];
    for (int j = 1; j < live; j++)
        if (row[j] > max) max = row[j];
    double sum = 0.0;
    for (int j = 0; j < live; j++) {
        row[j] = expf(row[j] - max);
        sum += row[j];
    }
    float inv = (float)(1.0 / sum);
    for (int j = 0; j < live; j++) row[j] *= inv;
    for (int j = live; j < width; j++) row[j] = 0.0f;
}

/* Per (sequence, head): scores = scale * Q K^T over the sequence's real keys
 * only (T x len, one sgemm), masked softmax per row, then P V (one sgemm)
 * written straight into the head's columns of out. Keys past len are never
 * touched, so what sits in the padding cannot reach any row. */
static void cpu_attention(float *out, const float *q, const float *k, const float *v,
                          const int *lengths, int B, int T, int NH, int NKV, int HS,
                          float *scratch) {
    int qstride = NH * HS, kvstride = NKV * HS, group = NH / NKV;
    float scale = 1.0f / sqrtf((float)HS);
    for (int b = 0; b < B; b++) {
        int len = lengths[b];
        size_t qbase = (size_t)b * (size_t)T * (size_t)qstride;
        size_t kvbase = (size_t)b * (size_t)T * (size_t)kvstride;
        for (int h = 0; h < NH; h++) {
            const float *qh = q + qbase + (size_t)h * (size_t)HS;
            size_t kvoff = kvbase + (size_t)(h / group) * (size_t)HS;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, len, HS, scale, qh, qstride,
                        k + kvoff, kvstride, 0.0f, scratch, len);
            for (int t = 0; t < T; t++) {
                int live = t < len ? t + 1 : len;
                cpu_softmax_row(scratch + (size_t)t * (size_t)len, live, len);
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, HS, len, 1.0f, scratch, len,
                        v + kvoff, kvstride, 0.0f, out + qbase + (size_t)h * (size_t)HS, qstride);
        }
    }
}

static void cpu_swiglu(float *gate, const float *up, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

static void cpu_embedding(float *out, const int *tokens, const float *table, size_t N, size_t C) {
    for (size_t n = 0; n < N; n++)
        memcpy(out + n * C, table + (size_t)tokens[n] * C, C * sizeof *out);
}

static void cpu_residual_add(float *x, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

static const backend cpu_backend = {
    .name = "cpu",
    .host_memory = true,
    .alloc = cpu_alloc,
    .free_buf = cpu_free_buf,
    .upload = cpu_copy,
    .download = cpu_copy,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .embedding = cpu_embedding,
    .residual_add = cpu_residual_add,
};

const backend *backend_cpu(void) { return &cpu_backend; }
