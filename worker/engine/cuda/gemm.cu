/* gemm.cu - gemm.h with cuBLAS.
 *
 * cuBLAS is column-major and the engine row-major. A row-major (R, S)
 * matrix with row stride ld is, read column-major, its transpose (S, R)
 * with the same leading dimension, so the row-major C = op(A) op(B) is the
 * column-major C^T = op(B)^T op(A)^T: the operands swap places and keep
 * their transpose flags.
 *
 * fp32 products use CUBLAS_COMPUTE_32F with the default math mode, which
 * never rounds operands to TF32 (that needs CUBLAS_COMPUTE_32F_FAST_TF32 or
 * the TF32 math mode, neither set here), so fp32 results match the CPU's
 * sgemm to rounding. bf16 and fp16 operands are multiplied on the tensor
 * cores with fp32 accumulation and fp32 output. Not built under the
 * emulator: tests/cuda_emu/gemm_emu.c stands in for it there. */
#include "worker/engine/cuda/compat.cuh"

#include "common/util.h"
#include "worker/engine/cuda/gemm.h"

#include <cublas_v2.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

struct gemm_ctx {
    cublasHandle_t handle;
    cudaStream_t stream;
    void *workspace; /* cuBLAS's workspace, workspace_bytes of device memory */
    size_t workspace_bytes;
};

/* cuBLAS's own name for a status, for error messages. */
static const char *gemm_status_name(cublasStatus_t s) {
    const char *name = cublasGetStatusName(s);
    return name ? name : "unknown cuBLAS status";
}

int gemm_ctx_new(void *stream, size_t workspace_bytes, gemm_ctx **out, char *err, size_t errlen) {
    *out = NULL;
    gemm_ctx *g = static_cast<gemm_ctx *>(calloc(1, sizeof *g));
    if (!g) return err_set(err, errlen, "out of memory for a cuBLAS context");
    g->stream = static_cast<cudaStream_t>(stream);
    cublasStatus_t st = cublasCreate(&g->handle);
    if (st != CUBLAS_STATUS_SUCCESS) {
        free(g);
        return err_set(err, errlen, "cublasCreate: %s", gemm_status_name(st));
    }
    st = cublasSetStream(g->handle, g->stream);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasSetMathMode(g->handle, CUBLAS_DEFAULT_MATH);
    if (st != CUBLAS_STATUS_SUCCESS) {
        gemm_ctx_free(g);
        return err_set(err, errlen, "cuBLAS setup: %s", gemm_status_name(st));
    }
    if (workspace_bytes > 0) {
        cudaError_t ce = cudaMalloc(&g->workspace, workspace_bytes);
        if (ce != cudaSuccess) {
            (void)cudaGetLastError();
            g->workspace = NULL;
            gemm_ctx_free(g);
            return err_set(err, errlen, "cuBLAS workspace of %zu bytes: %s", workspace_bytes,
                            cudaGetErrorString(ce));
        }
        g->workspace_bytes = workspace_bytes;
        st = cublasSetWorkspace(g->handle, g->workspace, workspace_bytes);
        if (st != CUBLAS_STATUS_SUCCESS) {
            gemm_ctx_free(g);
            return err_set(err, errlen, "cublasSetWorkspace: %s", gemm_status_name(st));
        }
    }
    *out = g;
    return 0;
}

void gemm_ctx_free(gemm_ctx *g) {
    if (!g) return;
    if (g->handle) cublasDestroy(g->handle);
    /* The handle is gone, so nothing enqueued can still use the workspace
     * once the stream drains. */
    if (g->workspace) {
        cudaStreamSynchronize(g->stream);
        cudaFree(g->workspace);
    }
    free(g);
}

/* Whether every size fits cuBLAS's int. */
static bool gemm_fits(size_t a, size_t b, size_t c, size_t d, size_t e, size_t f) {
    size_t v[] = {a, b, c, d, e, f};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if (v[i] > (size_t)INT_MAX) return false;
    return true;
}

int gemm_run(gemm_ctx *g, gemm_type type, bool trans_a, bool trans_b, size_t M, size_t N,
             size_t K, float alpha, const void *A, size_t lda, const void *B, size_t ldb,
             float beta, float *C, size_t ldc, char *err, size_t errlen) {
    if (!gemm_fits(M, N, K, lda, ldb, ldc))
        return err_set(err, errlen, "product (%zu, %zu, %zu) exceeds cuBLAS's int sizes", M, N,
                        K);
    if (M == 0 || N == 0) return 0;
    cudaDataType_t dt = type == GEMM_BF16 ? CUDA_R_16BF : type == GEMM_F16 ? CUDA_R_16F
                                                                            : CUDA_R_32F;
    /* Column-major C^T (N, M) = op(B)^T (N, K) op(A)^T (K, M). */
    cublasStatus_t st = cublasGemmEx(
        g->handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
        (int)N, (int)M, (int)K, &alpha, B, dt, (int)ldb, A, dt, (int)lda, &beta, C, CUDA_R_32F,
        (int)ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
        return err_set(err, errlen, "cublasGemmEx (%zu, %zu, %zu): %s", M, N, K,
                        gemm_status_name(st));
    return 0;
}

int gemm_run_strided_batched(gemm_ctx *g, gemm_type type, bool trans_a, bool trans_b, size_t M,
                             size_t N, size_t K, float alpha, const void *A, size_t lda,
                             size_t stride_a, const void *B, size_t ldb, size_t stride_b,
                             float beta, float *C, size_t ldc, size_t stride_c, size_t batch,
                             char *err, size_t errlen) {
    if (!gemm_fits(M, N, K, lda, ldb, ldc) || !gemm_fits(batch, 0, 0, 0, 0, 0))
        return err_set(err, errlen,
                        "batched product (%zu, %zu, %zu) x %zu exceeds cuBLAS's int sizes", M, N,
                        K, batch);
    if ((stride_a | stride_b | stride_c) > (size_t)LLONG_MAX)
        return err_set(err, errlen, "batched product: a stride exceeds cuBLAS's long long");
    if (M == 0 || N == 0 || batch == 0) return 0;
    cudaDataType_t dt = type == GEMM_BF16 ? CUDA_R_16BF : type == GEMM_F16 ? CUDA_R_16F
                                                                            : CUDA_R_32F;
    /* The same swap as gemm_run, per product: C_i^T = op(B_i)^T op(A_i)^T. */
    cublasStatus_t st = cublasGemmStridedBatchedEx(
        g->handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
        (int)N, (int)M, (int)K, &alpha, B, dt, (int)ldb, (long long)stride_b, A, dt, (int)lda,
        (long long)stride_a, &beta, C, CUDA_R_32F, (int)ldc, (long long)stride_c, (int)batch,
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
        return err_set(err, errlen, "cublasGemmStridedBatchedEx (%zu, %zu, %zu) x %zu: %s", M,
                        N, K, batch, gemm_status_name(st));
    return 0;
}

/* Copies the lower triangle of the column-major n x n matrix c into its
 * upper one, so both hold the symmetric result syrk wrote into one. */
__global__ void gemm_mirror_lower(double *c, int n, int ldc) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; /* row */
    if (i >= (size_t)n) return;
    /* Columns stride by gridDim.y, which CUDA caps at 65535. (i, j) with
     * i < j lies above the diagonal; (j, i) is its mirror. */
    for (size_t j = (size_t)blockIdx.y; j < (size_t)n; j += gridDim.y)
        if (i < j) c[j * (size_t)ldc + i] = c[i * (size_t)ldc + j];
}

int gemm_dsyrk_t(gemm_ctx *g, size_t M, size_t N, double alpha, const double *A, size_t lda,
                 double beta, double *C, size_t ldc, char *err, size_t errlen) {
    if (!gemm_fits(M, N, lda, ldc, 0, 0))
        return err_set(err, errlen, "Gram matrix (%zu, %zu) exceeds cuBLAS's sizes", M, N);
    if (N == 0) return 0;
    /* Row-major A (M, N) is column-major A^T (N, M), so A^T A is that
     * matrix times its transpose: syrk with no transpose. */
    cublasStatus_t st = cublasDsyrk(g->handle, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, (int)N,
                                    (int)M, &alpha, A, (int)lda, &beta, C, (int)ldc);
    if (st != CUBLAS_STATUS_SUCCESS)
        return err_set(err, errlen, "cublasDsyrk (%zu, %zu): %s", M, N, gemm_status_name(st));
    dim3 grid((unsigned)((N + 255) / 256), (unsigned)(N < 65535 ? N : 65535));
    CU_LAUNCH(gemm_mirror_lower, grid, dim3(256), 0, g->stream, C, (int)N, (int)ldc);
    cudaError_t ce = cudaGetLastError();
    if (ce != cudaSuccess)
        return err_set(err, errlen, "Gram matrix mirror: %s", cudaGetErrorString(ce));
    return 0;
}

int gemm_dgemm_tn(gemm_ctx *g, size_t M, size_t N1, size_t N2, double alpha, const double *A,
                  size_t lda, const double *B, size_t ldb, double beta, double *C, size_t ldc,
                  char *err, size_t errlen) {
    if (!gemm_fits(M, N1, N2, lda, ldb, ldc))
        return err_set(err, errlen, "product (%zu, %zu, %zu) exceeds cuBLAS's int sizes", M,
                        N1, N2);
    if (N1 == 0 || N2 == 0) return 0;
    /* Column-major C^T (N2, N1) = B^T A, B^T being B read column-major and
     * A the transpose of A read so. */
    cublasStatus_t st = cublasDgemm(g->handle, CUBLAS_OP_N, CUBLAS_OP_T, (int)N2, (int)N1,
                                    (int)M, &alpha, B, (int)ldb, A, (int)lda, &beta, C,
                                    (int)ldc);
    if (st != CUBLAS_STATUS_SUCCESS)
        return err_set(err, errlen, "cublasDgemm (%zu, %zu, %zu): %s", M, N1, N2,
                        gemm_status_name(st));
    return 0;
}
