/* gemm_emu.c - worker/engine/cuda/gemm.h on the host with CBLAS, for the
 * emulated CUDA build (tests/cuda_emu/): what gemm.cu does with cuBLAS.
 * bf16/fp16 operands (raw uint16_t bits) are widened exactly to float32 and
 * multiplied by sgemm with float32 accumulation, which is what cuBLAS
 * computes up to the order of summation. The stream is ignored: everything
 * under the emulator runs synchronously. */
#include "worker/engine/cuda/gemm.h"

#include <cblas.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/cuda_emu/half_bits.h"

struct gemm_ctx {
    size_t workspace_bytes; /* accepted as cublasLt's would be; unused */
    gemm_path path;         /* recorded and counted; the maths is the same */
    gemm_stats stats;
};

int gemm_path_parse(const char *s, gemm_path *out, char *err, size_t errlen)
{
    if (s == NULL || *s == '\0' || strcmp(s, "auto") == 0)
        *out = GEMM_PATH_AUTO;
    else if (strcmp(s, "ex") == 0)
        *out = GEMM_PATH_EX;
    else if (strcmp(s, "lt") == 0)
        *out = GEMM_PATH_LT;
    else {
        snprintf(err, errlen, "gemm path '%.32s': expected ex, lt or auto", s);
        return -1;
    }
    return 0;
}

const char *gemm_path_name(gemm_path p)
{
    return p == GEMM_PATH_EX ? "ex" : p == GEMM_PATH_LT ? "lt" : "auto";
}

void gemm_set_path(gemm_ctx *g, gemm_path p)
{
    g->path = p;
}

gemm_path gemm_get_path(const gemm_ctx *g)
{
    return g->path;
}

void gemm_get_stats(const gemm_ctx *g, gemm_stats *out)
{
    *out = g->stats;
}

int gemm_ctx_new(void *stream, size_t workspace_bytes, gemm_ctx **out, char *err, size_t errlen)
{
    (void)stream;
    if (out == NULL) {
        snprintf(err, errlen, "gemm_ctx_new: no output pointer");
        return -1;
    }
    *out = NULL;
    gemm_path path;
    if (gemm_path_parse(getenv("STRATA_GEMM"), &path, err, errlen) != 0)
        return -1;
    gemm_ctx *g = calloc(1, sizeof *g);
    if (g == NULL) {
        snprintf(err, errlen, "gemm_ctx_new: out of memory");
        return -1;
    }
    g->workspace_bytes = workspace_bytes;
    g->path = path;
    *out = g;
    return 0;
}

void gemm_ctx_free(gemm_ctx *g)
{
    free(g);
}

/* -1 with err unless every value fits the BLAS int. */
static int gemm_check_int(const char *fn, const size_t *v, size_t n, char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] > (size_t)INT_MAX) {
            snprintf(err, errlen, "%s: dimension or stride %zu does not fit the library's int",
                     fn, v[i]);
            return -1;
        }
    return 0;
}

/* The (rows, cols) block of a 16-bit matrix with row stride ld, widened to
 * a compact float32 (rows, cols) array. NULL when out of memory; the caller
 * frees. */
static float *gemm_widen(gemm_type type, const uint16_t *src, size_t rows, size_t cols,
                         size_t ld)
{
    float *dst = malloc((rows * cols > 0 ? rows * cols : 1) * sizeof *dst);
    if (dst == NULL)
        return NULL;
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++) {
            uint16_t h = src[r * ld + c];
            dst[r * cols + c] =
                type == GEMM_BF16 ? half_bits_bf16_to_f32(h) : half_bits_f16_to_f32(h);
        }
    return dst;
}

/* beta 0 makes C output only (cuBLAS does not read it), so NaN or garbage
 * in C must not leak into the result. */
static void gemm_zero_f32(float *C, size_t rows, size_t cols, size_t ldc)
{
    for (size_t r = 0; r < rows; r++)
        memset(C + r * ldc, 0, cols * sizeof *C);
}

static void gemm_zero_f64(double *C, size_t rows, size_t cols, size_t ldc)
{
    for (size_t r = 0; r < rows; r++)
        memset(C + r * ldc, 0, cols * sizeof *C);
}

/* One product, as gemm_run computes it, without counting it. */
static int gemm_product(gemm_ctx *g, gemm_type type, bool trans_a, bool trans_b, size_t M,
                        size_t N, size_t K, float alpha, const void *A, size_t lda,
                        const void *B, size_t ldb, float beta, float *C, size_t ldc, char *err,
                        size_t errlen)
{
    int rc = -1;
    float *wa = NULL, *wb = NULL;
    size_t a_rows = trans_a ? K : M, a_cols = trans_a ? M : K;
    size_t b_rows = trans_b ? N : K, b_cols = trans_b ? K : N;
    const size_t dims[] = {M, N, K, lda, ldb, ldc};
    if (g == NULL) {
        snprintf(err, errlen, "gemm_run: no context");
        goto out;
    }
    if (type != GEMM_F32 && type != GEMM_BF16 && type != GEMM_F16) {
        snprintf(err, errlen, "gemm_run: unknown operand type %d", (int)type);
        goto out;
    }
    if (gemm_check_int("gemm_run", dims, sizeof dims / sizeof dims[0], err, errlen) != 0)
        goto out;
    /* cuBLAS refuses strides shorter than a row (CUBLAS_STATUS_INVALID_VALUE). */
    if (lda < (a_cols > 0 ? a_cols : 1) || ldb < (b_cols > 0 ? b_cols : 1) ||
        ldc < (N > 0 ? N : 1)) {
        snprintf(err, errlen,
                 "gemm_run: row stride too short (lda %zu for %zu columns, ldb %zu for %zu, "
                 "ldc %zu for %zu)",
                 lda, a_cols, ldb, b_cols, ldc, N);
        goto out;
    }
    if (M == 0 || N == 0) {
        rc = 0;
        goto out;
    }
    if (C == NULL || (K > 0 && (A == NULL || B == NULL))) {
        snprintf(err, errlen, "gemm_run: NULL matrix");
        goto out;
    }
    if (beta == 0.0f)
        gemm_zero_f32(C, M, N, ldc);
    const float *fa = A, *fb = B;
    size_t fa_ld = lda, fb_ld = ldb;
    if (type != GEMM_F32 && K > 0) {
        wa = gemm_widen(type, A, a_rows, a_cols, lda);
        wb = gemm_widen(type, B, b_rows, b_cols, ldb);
        if (wa == NULL || wb == NULL) {
            snprintf(err, errlen, "gemm_run: out of memory widening %s operands",
                     type == GEMM_BF16 ? "bf16" : "fp16");
            goto out;
        }
        fa = wa;
        fb = wb;
        fa_ld = a_cols;
        fb_ld = b_cols;
    }
    if (K == 0) {
        /* C = beta C: BLAS implementations differ on K 0, so do it here. */
        for (size_t r = 0; r < M; r++)
            for (size_t c = 0; c < N; c++)
                C[r * ldc + c] *= beta;
        rc = 0;
        goto out;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K, alpha, fa,
                (int)(fa_ld > 0 ? fa_ld : 1), fb, (int)(fb_ld > 0 ? fb_ld : 1), beta, C, (int)ldc);
    rc = 0;
out:
    free(wa);
    free(wb);
    return rc;
}

int gemm_run(gemm_ctx *g, gemm_type type, bool trans_a, bool trans_b, size_t M, size_t N,
             size_t K, float alpha, const void *A, size_t lda, const void *B, size_t ldb,
             float beta, float *C, size_t ldc, char *err, size_t errlen)
{
    if (gemm_product(g, type, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
                     err, errlen) != 0)
        return -1;
    /* Counted as gemm.cu counts: the path it would take (Lt for 16-bit
     * products with K > 0 unless EX is asked for), empty products not. */
    if (M > 0 && N > 0) {
        if (type != GEMM_F32 && K > 0 && g->path != GEMM_PATH_EX)
            g->stats.lt_products++;
        else
            g->stats.ex_products++;
    }
    return 0;
}

/* gemm_product per product, in batch order (as the stream would run
 * them; not counted: gemm.cu's batched products stay with cuBLAS's Ex);
 * the offsets are in elements of each operand's type. */
int gemm_run_strided_batched(gemm_ctx *g, gemm_type type, bool trans_a, bool trans_b, size_t M,
                             size_t N, size_t K, float alpha, const void *A, size_t lda,
                             size_t stride_a, const void *B, size_t ldb, size_t stride_b,
                             float beta, float *C, size_t ldc, size_t stride_c, size_t batch,
                             char *err, size_t errlen)
{
    const size_t dims[] = {batch};
    if (gemm_check_int("gemm_run_strided_batched", dims, 1, err, errlen) != 0)
        return -1;
    size_t esize = type == GEMM_F32 ? sizeof(float) : sizeof(uint16_t);
    for (size_t i = 0; i < batch; i++) {
        const char *a = (const char *)A + i * stride_a * esize;
        const char *b = (const char *)B + i * stride_b * esize;
        if (gemm_product(g, type, trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta,
                         C + i * stride_c, ldc, err, errlen) != 0)
            return -1;
    }
    return 0;
}

int gemm_dsyrk_t(gemm_ctx *g, size_t M, size_t N, double alpha, const double *A, size_t lda,
                 double beta, double *C, size_t ldc, char *err, size_t errlen)
{
    const size_t dims[] = {M, N, lda, ldc};
    if (g == NULL) {
        snprintf(err, errlen, "gemm_dsyrk_t: no context");
        return -1;
    }
    if (gemm_check_int("gemm_dsyrk_t", dims, sizeof dims / sizeof dims[0], err, errlen) != 0)
        return -1;
    if (lda < (N > 0 ? N : 1) || ldc < (N > 0 ? N : 1)) {
        snprintf(err, errlen, "gemm_dsyrk_t: row stride too short (lda %zu, ldc %zu, N %zu)",
                 lda, ldc, N);
        return -1;
    }
    if (N == 0)
        return 0;
    if (C == NULL || (M > 0 && A == NULL)) {
        snprintf(err, errlen, "gemm_dsyrk_t: NULL matrix");
        return -1;
    }
    if (beta == 0.0)
        gemm_zero_f64(C, N, N, ldc);
    if (M == 0) {
        for (size_t r = 0; r < N; r++)
            for (size_t c = 0; c < N; c++)
                C[r * ldc + c] *= beta;
        return 0;
    }
    /* Row-major A (M, N) with Trans: C = alpha A^T A + beta C, upper part. */
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)N, (int)M, alpha, A, (int)lda, beta,
                C, (int)ldc);
    for (size_t r = 1; r < N; r++)
        for (size_t c = 0; c < r; c++)
            C[r * ldc + c] = C[c * ldc + r];
    return 0;
}

int gemm_dgemm_tn(gemm_ctx *g, size_t M, size_t N1, size_t N2, double alpha, const double *A,
                  size_t lda, const double *B, size_t ldb, double beta, double *C, size_t ldc,
                  char *err, size_t errlen)
{
    const size_t dims[] = {M, N1, N2, lda, ldb, ldc};
    if (g == NULL) {
        snprintf(err, errlen, "gemm_dgemm_tn: no context");
        return -1;
    }
    if (gemm_check_int("gemm_dgemm_tn", dims, sizeof dims / sizeof dims[0], err, errlen) != 0)
        return -1;
    if (lda < (N1 > 0 ? N1 : 1) || ldb < (N2 > 0 ? N2 : 1) || ldc < (N2 > 0 ? N2 : 1)) {
        snprintf(err, errlen,
                 "gemm_dgemm_tn: row stride too short (lda %zu, ldb %zu, ldc %zu for %zu x %zu)",
                 lda, ldb, ldc, N1, N2);
        return -1;
    }
    if (N1 == 0 || N2 == 0)
        return 0;
    if (C == NULL || (M > 0 && (A == NULL || B == NULL))) {
        snprintf(err, errlen, "gemm_dgemm_tn: NULL matrix");
        return -1;
    }
    if (beta == 0.0)
        gemm_zero_f64(C, N1, N2, ldc);
    if (M == 0) {
        for (size_t r = 0; r < N1; r++)
            for (size_t c = 0; c < N2; c++)
                C[r * ldc + c] *= beta;
        return 0;
    }
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)N1, (int)N2, (int)M, alpha, A,
                (int)lda, B, (int)ldb, beta, C, (int)ldc);
    return 0;
}
