/* gemm.h - the matrix products of the CUDA backend and of GPU CKA, behind
 * one small interface: gemm.cu implements it with cuBLAS / cublasLt;
 * tests/cuda_emu/gemm_emu.c implements it with CBLAS on the host (rounding
 * operands to bf16/fp16 where the real one reads them so), so that the
 * backend runs under the emulator too.
 *
 * Row-major throughout, as the engine is: C (M, N) = alpha * op(A) op(B) +
 * beta * C with op(X) = X or X^T, lda/ldb/ldc the row strides in elements.
 * A and B share one element type (fp32, bf16 or fp16, raw uint16_t bits for
 * the last two); C and the accumulation are fp32. */
#ifndef STRATA_CUDA_GEMM_H
#define STRATA_CUDA_GEMM_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { GEMM_F32 = 0, GEMM_BF16, GEMM_F16 } gemm_type;

typedef struct gemm_ctx gemm_ctx;

/* A context on the current device bound to stream (a cudaStream_t as void
 * *), with workspace_bytes of workspace for cublasLt. 0 and *out, or -1
 * with err. */
int gemm_ctx_new(void *stream, size_t workspace_bytes, gemm_ctx **out, char *err, size_t errlen);
void gemm_ctx_free(gemm_ctx *g);

/* C (M, N) = alpha * op(A) op(B) + beta * C, row-major, fp32 accumulate;
 * op(A) is (M, K), op(B) is (K, N). 0, or -1 with err (dimensions that do
 * not fit the library's int, a library error). */
int gemm_run(gemm_ctx *g, gemm_type type, bool trans_a, bool trans_b, size_t M, size_t N,
             size_t K, float alpha, const void *A, size_t lda, const void *B, size_t ldb,
             float beta, float *C, size_t ldc, char *err, size_t errlen);

/* batch products C_i = alpha * op(A_i) op(B_i) + beta * C_i (i < batch)
 * with X_i = X + i * stride_x elements (of X's type: 16-bit for bf16/fp16
 * operands, fp32 for C), each as gemm_run computes it. A zero stride reuses
 * one operand for every product; C_i must not overlap. 0, or -1 with err
 * (as gemm_run, or a batch or stride past the library's sizes). */
int gemm_run_strided_batched(gemm_ctx *g, gemm_type type, bool trans_a, bool trans_b, size_t M,
                             size_t N, size_t K, float alpha, const void *A, size_t lda,
                             size_t stride_a, const void *B, size_t ldb, size_t stride_b,
                             float beta, float *C, size_t ldc, size_t stride_c, size_t batch,
                             char *err, size_t errlen);

/* Which cuBLAS entry point runs the bf16/fp16 products of gemm_run:
 * cublasGemmEx (EX) or cublasLtMatmul with the heuristic's best algorithm,
 * cached per shape in the context (LT; cublasGemmEx when the heuristic
 * offers none). AUTO is LT for bf16/fp16 and EX for fp32, a choice made
 * before any GPU measured the two (bench_gpu gemm does): revisit it with
 * the numbers. fp32 products, the batched and the float64 ones always run
 * as before. A context starts with STRATA_GEMM (ex, lt or auto; unset or
 * empty: auto), read once by gemm_ctx_new, which fails on another value. */
typedef enum { GEMM_PATH_AUTO = 0, GEMM_PATH_EX, GEMM_PATH_LT } gemm_path;

/* "ex", "lt" or "auto" into *out: 0, or -1 with err naming the value. */
int gemm_path_parse(const char *s, gemm_path *out, char *err, size_t errlen);
const char *gemm_path_name(gemm_path p);

/* The path of g's later products (tests and the bench switch it). */
void gemm_set_path(gemm_ctx *g, gemm_path p);
gemm_path gemm_get_path(const gemm_ctx *g);

/* What gemm_run did on a context since it was made: products run by
 * cublasGemmEx (fallbacks included) and by cublasLtMatmul, products that
 * chose LT but fell back for want of a heuristic algorithm, heuristic
 * queries (cache misses) and cached shapes now held. The emulator counts
 * the path chosen only (lt_products when LT was chosen, no queries). */
typedef struct {
    unsigned long long ex_products, lt_products, lt_fallbacks, lt_queries;
    unsigned cached_shapes;
} gemm_stats;

void gemm_get_stats(const gemm_ctx *g, gemm_stats *out);

/* Float64 products for CKA: C (N, N) = alpha * A^T A + beta * C (A (M, N)
 * row-major; both triangles of C are written), and C (N1, N2) =
 * alpha * A^T B + beta * C. */
int gemm_dsyrk_t(gemm_ctx *g, size_t M, size_t N, double alpha, const double *A, size_t lda,
                 double beta, double *C, size_t ldc, char *err, size_t errlen);
int gemm_dgemm_tn(gemm_ctx *g, size_t M, size_t N1, size_t N2, double alpha, const double *A,
                  size_t lda, const double *B, size_t ldb, double beta, double *C, size_t ldc,
                  char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
