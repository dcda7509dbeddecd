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
 * emulator: tests/cuda_emu/gemm_emu.c stands in for it there.
 *
 * gemm_run's bf16/fp16 products take cublasLtMatmul unless the context's
 * path is GEMM_PATH_EX (gemm.h). Lt's heuristic is asked once per shape
 * and the answer (descriptors and algorithm, or "none": cublasGemmEx runs
 * it) is cached in a small table in the context. The key holds every
 * input the heuristic sees: types, transposes, sizes, strides, whether
 * beta is zero and the operands' pointer alignments, since an algorithm
 * chosen for 256-byte aligned operands may not run on an offset view. */
#include "worker/engine/cuda/compat.cuh"

#include "common/util.h"
#include "worker/engine/cuda/gemm.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Cached shapes per context: a 7B LoRA step has about a dozen distinct
 * products; more shapes than this evict round-robin. */
#define GEMM_LT_CACHE 64
/* Lt's alignment preferences stop at 256 bytes. */
#define GEMM_LT_MAX_ALIGN 256u

/* Everything the heuristic's answer depends on. Zeroed before it is
 * filled, so that memcmp compares padding too. */
typedef struct {
    int type, trans_a, trans_b, beta_zero;
    unsigned align_a, align_b, align_c;
    size_t M, N, K, lda, ldb, ldc;
} gemm_lt_key;

/* One cached shape: its descriptors and algorithm, or have_algo false when
 * the heuristic offered none (descriptors then released: Ex runs it). */
typedef struct {
    bool used, have_algo;
    gemm_lt_key key;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
} gemm_lt_entry;

struct gemm_ctx {
    cublasHandle_t handle;
    cudaStream_t stream;
    void *workspace; /* cuBLAS's workspace, workspace_bytes of device memory */
    size_t workspace_bytes;
    /* The Lt path: its handle (sharing the workspace, which is safe as
     * everything runs in order on one stream), the path and the cache. */
    cublasLtHandle_t lt;
    gemm_path path;
    gemm_lt_entry cache[GEMM_LT_CACHE];
    unsigned next_victim;
    gemm_stats stats;
};

/* cuBLAS's own name for a status, for error messages. */
static const char *gemm_status_name(cublasStatus_t s) {
    const char *name = cublasGetStatusName(s);
    return name ? name : "unknown cuBLAS status";
}

int gemm_path_parse(const char *s, gemm_path *out, char *err, size_t errlen) {
    if (!s || !*s || strcmp(s, "auto") == 0)
        *out = GEMM_PATH_AUTO;
    else if (strcmp(s, "ex") == 0)
        *out = GEMM_PATH_EX;
    else if (strcmp(s, "lt") == 0)
        *out = GEMM_PATH_LT;
    else
        return err_set(err, errlen, "gemm path '%.32s': expected ex, lt or auto", s);
    return 0;
}

const char *gemm_path_name(gemm_path p) {
    return p == GEMM_PATH_EX ? "ex" : p == GEMM_PATH_LT ? "lt" : "auto";
}

void gemm_set_path(gemm_ctx *g, gemm_path p) { g->path = p; }

gemm_path gemm_get_path(const gemm_ctx *g) { return g->path; }

void gemm_get_stats(const gemm_ctx *g, gemm_stats *out) {
    *out = g->stats;
    out->cached_shapes = 0;
    for (int i = 0; i < GEMM_LT_CACHE; i++)
        if (g->cache[i].used) out->cached_shapes++;
}

/* Destroys an entry's descriptors and marks it unused. */
static void gemm_lt_release(gemm_lt_entry *e) {
    if (e->desc) cublasLtMatmulDescDestroy(e->desc);
    if (e->la) cublasLtMatrixLayoutDestroy(e->la);
    if (e->lb) cublasLtMatrixLayoutDestroy(e->lb);
    if (e->lc) cublasLtMatrixLayoutDestroy(e->lc);
    memset(e, 0, sizeof *e);
}

int gemm_ctx_new(void *stream, size_t workspace_bytes, gemm_ctx **out, char *err, size_t errlen) {
    *out = NULL;
    gemm_path path;
    if (gemm_path_parse(getenv("STRATA_GEMM"), &path, err, errlen) != 0) return -1;
    gemm_ctx *g = static_cast<gemm_ctx *>(calloc(1, sizeof *g));
    if (!g) return err_set(err, errlen, "out of memory for a cuBLAS context");
    g->stream = static_cast<cudaStream_t>(stream);
    g->path = path;
    cublasStatus_t st = cublasCreate(&g->handle);
    if (st != CUBLAS_STATUS_SUCCESS) {
        free(g);
        return err_set(err, errlen, "cublasCreate: %s", gemm_status_name(st));
    }
    st = cublasLtCreate(&g->lt);
    if (st != CUBLAS_STATUS_SUCCESS) {
        g->lt = NULL;
        gemm_ctx_free(g);
        return err_set(err, errlen, "cublasLtCreate: %s", gemm_status_name(st));
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
    for (int i = 0; i < GEMM_LT_CACHE; i++)
        if (g->cache[i].used) gemm_lt_release(&g->cache[i]);
    if (g->lt) cublasLtDestroy(g->lt);
    if (g->handle) cublasDestroy(g->handle);
    /* The handle is gone, so nothing enqueued can still use the workspace
     * once the stream drains. */
    if (g->workspace) {
        cudaStreamSynchronize(g->stream);
        cudaFree(g->workspace);
    }
    free(g);
}

/* cuBLAS's name for an operand type. */
static cudaDataType_t gemm_cuda_type(gemm_type t) {
    return t == GEMM_BF16 ? CUDA_R_16BF : t == GEMM_F16 ? CUDA_R_16F : CUDA_R_32F;
}

/* Whether every size fits cuBLAS's int. */
static bool gemm_fits(size_t a, size_t b, size_t c, size_t d, size_t e, size_t f) {
    size_t v[] = {a, b, c, d, e, f};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if (v[i] > (size_t)INT_MAX) return false;
    return true;
}

/* The largest power of two up to 256 that divides p's address. */
static unsigned gemm_align(const void *p) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    uintptr_t low = a & (~a + 1);
    return a == 0 || low >= GEMM_LT_MAX_ALIGN ? GEMM_LT_MAX_ALIGN : (unsigned)low;
}

/* Fills e for k: descriptors of the swapped column-major product (Lt's A
 * is our B, Lt's B our A, C^T (N, M) the output), and the heuristic's best
 * algorithm within the context's workspace and the operands' alignments.
 * A heuristic with nothing to offer (no algorithm, CUBLAS_STATUS_NOT_
 * SUPPORTED) leaves have_algo false and returns 0; a descriptor or
 * heuristic failure returns -1 with err, e released. */
static int gemm_lt_prepare(gemm_ctx *g, const gemm_lt_key *k, gemm_lt_entry *e, char *err,
                           size_t errlen) {
    memset(e, 0, sizeof *e);
    e->key = *k;
    cudaDataType_t dt = gemm_cuda_type((gemm_type)k->type);
    int32_t op_a = k->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    int32_t op_b = k->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    uint64_t max_ws = g->workspace_bytes;
    uint32_t al_a = k->align_b, al_b = k->align_a, al_c = k->align_c;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    const char *what = "cublasLtMatmulDescCreate";
    cublasStatus_t st = cublasLtMatmulDescCreate(&e->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (st == CUBLAS_STATUS_SUCCESS) {
        what = "cublasLtMatmulDescSetAttribute";
        st = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a,
                                            sizeof op_a);
    }
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b,
                                            sizeof op_b);
    /* Stored shapes: a row-major (R, S) matrix is column-major (S, R). */
    if (st == CUBLAS_STATUS_SUCCESS) {
        what = "cublasLtMatrixLayoutCreate";
        st = cublasLtMatrixLayoutCreate(&e->la, dt, k->trans_b ? k->K : k->N,
                                        k->trans_b ? k->N : k->K, (int64_t)k->ldb);
    }
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatrixLayoutCreate(&e->lb, dt, k->trans_a ? k->M : k->K,
                                        k->trans_a ? k->K : k->M, (int64_t)k->lda);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatrixLayoutCreate(&e->lc, CUDA_R_32F, k->N, k->M, (int64_t)k->ldc);
    if (st == CUBLAS_STATUS_SUCCESS) {
        what = "cublasLtMatmulPreferenceCreate";
        st = cublasLtMatmulPreferenceCreate(&pref);
    }
    if (st == CUBLAS_STATUS_SUCCESS) {
        what = "cublasLtMatmulPreferenceSetAttribute";
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &max_ws, sizeof max_ws);
    }
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof al_c);
    if (st == CUBLAS_STATUS_SUCCESS) {
        what = "cublasLtMatmulAlgoGetHeuristic";
        memset(&res, 0, sizeof res);
        g->stats.lt_queries++;
        st = cublasLtMatmulAlgoGetHeuristic(g->lt, e->desc, e->la, e->lb, e->lc, e->lc, pref, 1,
                                            &res, &found);
        if (st == CUBLAS_STATUS_NOT_SUPPORTED) {
            st = CUBLAS_STATUS_SUCCESS;
            found = 0;
        }
    }
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS) {
        gemm_lt_release(e);
        return err_set(err, errlen, "%s (%zu, %zu, %zu): %s", what, k->M, k->N, k->K,
                        gemm_status_name(st));
    }
    if (found > 0 && res.state == CUBLAS_STATUS_SUCCESS &&
        res.workspaceSize <= g->workspace_bytes) {
        e->algo = res.algo;
        e->have_algo = true;
        e->used = true;
    } else {
        /* Nothing to run with Lt: remember that, without descriptors. */
        gemm_lt_release(e);
        e->key = *k;
        e->used = true;
    }
    return 0;
}

/* The cached entry for k, asking the heuristic on a miss (into a free
 * slot, else evicting round-robin). NULL with err on a library failure. */
static const gemm_lt_entry *gemm_lt_lookup(gemm_ctx *g, const gemm_lt_key *k, char *err,
                                           size_t errlen) {
    int slot = -1;
    for (int i = 0; i < GEMM_LT_CACHE; i++) {
        if (!g->cache[i].used) {
            if (slot < 0) slot = i;
        } else if (memcmp(&g->cache[i].key, k, sizeof *k) == 0) {
            return &g->cache[i];
        }
    }
    if (slot < 0) {
        slot = (int)(g->next_victim++ % GEMM_LT_CACHE);
        gemm_lt_release(&g->cache[slot]);
    }
    if (gemm_lt_prepare(g, k, &g->cache[slot], err, errlen) != 0) return NULL;
    return &g->cache[slot];
}

int gemm_run(gemm_ctx *g, gemm_type type, bool trans_a, bool trans_b, size_t M, size_t N,
             size_t K, float alpha, const void *A, size_t lda, const void *B, size_t ldb,
             float beta, float *C, size_t ldc, char *err, size_t errlen) {
    if (!gemm_fits(M, N, K, lda, ldb, ldc))
        return err_set(err, errlen, "product (%zu, %zu, %zu) exceeds cuBLAS's int sizes", M, N,
                        K);
    if (M == 0 || N == 0) return 0;
    /* K 0 (C = beta C) stays with Ex, which defines it. */
    if (type != GEMM_F32 && K > 0 && g->path != GEMM_PATH_EX) {
        gemm_lt_key k;
        memset(&k, 0, sizeof k);
        k.type = (int)type, k.trans_a = trans_a, k.trans_b = trans_b, k.beta_zero = beta == 0.0f;
        k.align_a = gemm_align(A), k.align_b = gemm_align(B), k.align_c = gemm_align(C);
        k.M = M, k.N = N, k.K = K, k.lda = lda, k.ldb = ldb, k.ldc = ldc;
        const gemm_lt_entry *e = gemm_lt_lookup(g, &k, err, errlen);
        if (!e) return -1;
        if (e->have_algo) {
            cublasStatus_t st = cublasLtMatmul(g->lt, e->desc, &alpha, B, e->la, A, e->lb, &beta,
                                               C, e->lc, C, e->lc, &e->algo, g->workspace,
                                               g->workspace_bytes, g->stream);
            if (st != CUBLAS_STATUS_SUCCESS)
                return err_set(err, errlen, "cublasLtMatmul (%zu, %zu, %zu): %s", M, N, K,
                                gemm_status_name(st));
            g->stats.lt_products++;
            return 0;
        }
        g->stats.lt_fallbacks++;
    }
    cudaDataType_t dt = gemm_cuda_type(type);
    /* Column-major C^T (N, M) = op(B)^T (N, K) op(A)^T (K, M). */
    cublasStatus_t st = cublasGemmEx(
        g->handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
        (int)N, (int)M, (int)K, &alpha, B, dt, (int)ldb, A, dt, (int)lda, &beta, C, CUDA_R_32F,
        (int)ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
        return err_set(err, errlen, "cublasGemmEx (%zu, %zu, %zu): %s", M, N, K,
                        gemm_status_name(st));
    g->stats.ex_products++;
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
    cudaDataType_t dt = gemm_cuda_type(type);
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
