/* cka.cu - cka_gpu.h: linear CKA in feature space on one GPU.
 *
 * Shapes: the input pair as one device matrix A = [X Y] (n, D) with D =
 * dx + dy and row stride D; the product C = A'A (D, D), whose blocks are
 * X'X (dx, dx), X'Y (dx, dy) and Y'Y (dy, dy).
 *
 * Every reduction is deterministic: kernels write one partial sum per block
 * (or per row chunk), and the partials are added in a fixed order (on the
 * device per column, on the host for the few hundred Frobenius partials),
 * so the same input gives the same bits on every run. */
#include "worker/engine/cuda/compat.cuh"

#include "common/util.h"
#include "worker/engine/cuda/cka_gpu.h"
#include "worker/engine/cuda/gemm.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CKA_THREADS 256u       /* threads per block, a power of two for cka_block_sum */
#define CKA_MAX_CHUNKS 128u    /* row chunks of the column reductions */
#define CKA_MIN_CHUNK_ROWS 32u /* fewer rows per chunk than this is not worth a block */
#define CKA_MAX_BLOCKS 1024u   /* grid of the grid-stride reductions */
#define CKA_PER_THREAD 16u     /* least elements per thread of a grid-stride loop */
#define CKA_STAGE_BYTES ((size_t)64 << 20) /* pinned staging for strided uploads */
#define CKA_GEMM_WORKSPACE ((size_t)32 << 20)

/* ---- kernels ------------------------------------------------------------- */

/* The sum of v over the block (blockDim.x a power of two <= CKA_THREADS),
 * returned to every thread. Every thread of the block must call it. */
static __device__ double cka_block_sum(double v, double *scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
        __syncthreads();
    }
    double total = scratch[0];
    __syncthreads();
    return total;
}

/* Column partial sums over one chunk of rows (blockIdx.y) of a (n, D): with
 * relative, sum[c, j] = sum_i (a_ij - a_0j) and spread[c, j] = sum_i |a_ij -
 * a_0j| (the CPU's centring pass, which never adds the offset of a column
 * shifted by thousands); without, sum[c, j] = sum_i a_ij. Threads run along
 * columns, so a warp reads consecutive addresses. */
template <typename T>
static __global__ void cka_col_partial_kernel(const T *__restrict__ a, size_t n, size_t D,
                                       size_t chunk_rows, bool relative, double *sum,
                                       double *spread) {
    size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= D) return;
    size_t r0 = (size_t)blockIdx.y * chunk_rows;
    size_t r1 = r0 + chunk_rows < n ? r0 + chunk_rows : n;
    double ref = relative ? (double)a[j] : 0.0;
    double s = 0.0, sp = 0.0;
    for (size_t i = r0; i < r1; i++) {
        double d = (double)a[i * D + j] - ref;
        s += d;
        sp += fabs(d);
    }
    sum[(size_t)blockIdx.y * D + j] = s;
    if (relative) spread[(size_t)blockIdx.y * D + j] = sp;
}

/* Adds the chunks' partials per column in chunk order: out_sum[j] (and
 * out_spread[j] when spread is not NULL). */
static __global__ void cka_col_finish_kernel(const double *__restrict__ sum,
                                      const double *__restrict__ spread, size_t D,
                                      unsigned chunks, double *out_sum, double *out_spread) {
    size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= D) return;
    double s = 0.0, sp = 0.0;
    for (unsigned c = 0; c < chunks; c++) {
        s += sum[(size_t)c * D + j];
        if (spread) sp += spread[(size_t)c * D + j];
    }
    out_sum[j] = s;
    if (out_spread) out_spread[j] = sp;
}

/* a_ij := (a_ij - first_j) - sum_j / n where column j varies, 0 where it is
 * exactly constant: cka.c's centring, in the same order of operations.
 * first holds row 0 as it was before centring. */
static __global__ void cka_centre_kernel(double *a, size_t n, size_t D, const double *__restrict__ first,
                                  const double *__restrict__ sum,
                                  const double *__restrict__ spread) {
    size_t total = n * D, step = (size_t)gridDim.x * blockDim.x;
    double rows = (double)n;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += step) {
        size_t j = k % D;
        a[k] = spread[j] != 0.0 ? (a[k] - first[j]) - sum[j] / rows : 0.0;
    }
}

/* dst (count) = src rounded to float32. */
static __global__ void cka_to_f32_kernel(float *dst, const double *__restrict__ src, size_t count) {
    size_t step = (size_t)gridDim.x * blockDim.x;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < count; k += step)
        dst[k] = (float)src[k];
}

/* Per row i (one block per row, grid-striding over rows) of the centred a
 * (n, D): kd_i = sum_{j < dx} a_ij^2, k1_i = sum_{j < dx} a_ij colsum_j, and
 * ld_i, l1_i the same over the y columns [dx, D). These are the Gram
 * diagonals and K 1 = X (X'1) of the debiased estimator. */
template <typename T>
static __global__ void cka_row_stats_kernel(const T *__restrict__ a, size_t n, size_t dx, size_t D,
                                     const double *__restrict__ colsum, double *kd, double *k1,
                                     double *ld, double *l1) {
    __shared__ double scratch[CKA_THREADS];
    for (size_t i = blockIdx.x; i < n; i += gridDim.x) {
        const T *row = a + i * D;
        double sq_x = 0.0, dot_x = 0.0, sq_y = 0.0, dot_y = 0.0;
        for (size_t j = threadIdx.x; j < D; j += blockDim.x) {
            double v = (double)row[j];
            if (j < dx) {
                sq_x += v * v;
                dot_x += v * colsum[j];
            } else {
                sq_y += v * v;
                dot_y += v * colsum[j];
            }
        }
        sq_x = cka_block_sum(sq_x, scratch);
        dot_x = cka_block_sum(dot_x, scratch);
        sq_y = cka_block_sum(sq_y, scratch);
        dot_y = cka_block_sum(dot_y, scratch);
        if (threadIdx.x == 0) {
            kd[i] = sq_x;
            k1[i] = dot_x;
            ld[i] = sq_y;
            l1[i] = dot_y;
        }
    }
}

/* partial[block] = sum of c_ij^2 (in double) over this block's share of the
 * (rows, cols) block of c at row stride ld. */
template <typename T>
static __global__ void cka_sumsq_kernel(const T *__restrict__ c, size_t rows, size_t cols, size_t ld,
                                 double *partial) {
    __shared__ double scratch[CKA_THREADS];
    size_t total = rows * cols, step = (size_t)gridDim.x * blockDim.x;
    double s = 0.0;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += step) {
        double v = (double)c[(k / cols) * ld + k % cols];
        s += v * v;
    }
    s = cka_block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/* ---- host ---------------------------------------------------------------- */

/* 0 when e is cudaSuccess; else -1 with err "what: <CUDA's message>" (which
 * says "out of memory" for a failed allocation, as runners look for). */
static int cka_cuda(cudaError_t e, const char *what, char *err, size_t errlen) {
    if (e == cudaSuccess) return 0;
    (void)cudaGetLastError();
    return err_set(err, errlen, "GPU %s: %s", what, cudaGetErrorString(e));
}

/* Float64 at a useful fraction of the float32 rate: P100 (6.0), V100 (7.0),
 * A100 (8.0), H100/H200 (9.0), B200 (10.0). Everything else runs float64 at
 * 1/32 or 1/64 rate, where float32 products are the faster way. */
static bool cka_gpu_fast_fp64(int major, int minor) {
    return minor == 0 && (major == 6 || major == 7 || major == 8 || major == 9 || major == 10);
}

static bool cka_gpu_cancelled(atomic_int *cancel) { return cancel && cancel->load() != 0; }

/* Blocks for a grid-stride loop over work elements: at least
 * CKA_PER_THREAD elements per thread (fewer, larger blocks reduce the
 * partials to add and cost nothing in bandwidth), at most CKA_MAX_BLOCKS. */
static unsigned cka_blocks(size_t work) {
    size_t per_block = (size_t)CKA_THREADS * CKA_PER_THREAD;
    size_t b = (work + per_block - 1) / per_block;
    if (b == 0) b = 1;
    return b > CKA_MAX_BLOCKS ? CKA_MAX_BLOCKS : (unsigned)b;
}

/* What one call holds on the device and host; all freed by cka_gpu_free. */
typedef struct {
    cudaStream_t stream;
    gemm_ctx *gemm;
    double *a;        /* (n, D) input, centred in place */
    float *af;        /* (n, D) float32 copy (F32 path only) */
    void *c;          /* (D, D) product, double or float */
    double *partial;  /* 2 * chunks * D column partials, later the Frobenius partials */
    double *cols;     /* first, sum, spread, colsum: 4 * D */
    double *rows;     /* kd, k1, ld, l1: 4 * n (debiased only) */
    double *stage;    /* pinned host staging for strided uploads */
    double *host;     /* host copies of cols and rows */
} cka_gpu_buffers;

static void cka_gpu_free(cka_gpu_buffers *b) {
    if (b->stream) (void)cudaStreamSynchronize(b->stream);
    if (b->gemm) gemm_ctx_free(b->gemm);
    cudaFree(b->a);
    cudaFree(b->af);
    cudaFree(b->c);
    cudaFree(b->partial);
    cudaFree(b->cols);
    cudaFree(b->rows);
    if (b->stage) cudaFreeHost(b->stage);
    free(b->host);
    if (b->stream) cudaStreamDestroy(b->stream);
    (void)cudaGetLastError();
}

/* Copies x and y (n rows each) into b->a as [X Y] (n, D). One copy when they
 * already lie side by side with stride D; otherwise rows are packed into
 * pinned staging a chunk at a time. Returns 0, or -1 with err. */
static int cka_gpu_upload(cka_gpu_buffers *b, const cka_matrix *x, const cka_matrix *y,
                          char *err, size_t errlen) {
    size_t n = x->rows, dx = x->cols, dy = y->cols, D = dx + dy;
    if (y->data == x->data + dx && x->stride == D && y->stride == D)
        return cka_cuda(cudaMemcpyAsync(b->a, x->data, n * D * sizeof(double),
                                        cudaMemcpyHostToDevice, b->stream),
                        "upload", err, errlen);
    size_t chunk = CKA_STAGE_BYTES / (D * sizeof(double));
    if (chunk == 0) chunk = 1;
    if (chunk > n) chunk = n;
    if (cka_cuda(cudaMallocHost((void **)&b->stage, chunk * D * sizeof(double)),
                 "pinned staging buffer", err, errlen) != 0)
        return -1;
    for (size_t r0 = 0; r0 < n; r0 += chunk) {
        size_t rows = n - r0 < chunk ? n - r0 : chunk;
        /* The previous chunk's copy must finish before its staging is reused. */
        if (cka_cuda(cudaStreamSynchronize(b->stream), "upload", err, errlen) != 0) return -1;
        for (size_t i = 0; i < rows; i++) {
            memcpy(b->stage + i * D, x->data + (r0 + i) * x->stride, dx * sizeof(double));
            memcpy(b->stage + i * D + dx, y->data + (r0 + i) * y->stride, dy * sizeof(double));
        }
        if (cka_cuda(cudaMemcpyAsync(b->a + r0 * D, b->stage, rows * D * sizeof(double),
                                     cudaMemcpyHostToDevice, b->stream),
                     "upload", err, errlen) != 0)
            return -1;
    }
    return 0;
}

/* Launches the column reduction of a (n, D) into out_sum (and out_spread
 * when relative): partial sums per row chunk, then per column in order. */
template <typename T>
static int cka_gpu_columns(cka_gpu_buffers *b, const T *a, size_t n, size_t D, bool relative,
                           double *out_sum, double *out_spread, char *err, size_t errlen) {
    size_t chunk_rows = (n + CKA_MAX_CHUNKS - 1) / CKA_MAX_CHUNKS;
    if (chunk_rows < CKA_MIN_CHUNK_ROWS) chunk_rows = CKA_MIN_CHUNK_ROWS;
    unsigned chunks = (unsigned)((n + chunk_rows - 1) / chunk_rows);
    unsigned col_blocks = (unsigned)((D + CKA_THREADS - 1) / CKA_THREADS);
    double *sum = b->partial, *spread = b->partial + (size_t)CKA_MAX_CHUNKS * D;
    CU_LAUNCH(cka_col_partial_kernel<T>, dim3(col_blocks, chunks), dim3(CKA_THREADS), 0,
              b->stream, a, n, D, chunk_rows, relative, sum, spread);
    CU_LAUNCH(cka_col_finish_kernel, dim3(col_blocks), dim3(CKA_THREADS), 0, b->stream, sum,
              relative ? spread : (const double *)NULL, D, chunks, out_sum,
              relative ? out_spread : (double *)NULL);
    return cka_cuda(cudaGetLastError(), "column reduction", err, errlen);
}

/* The squared Frobenius norm of the (rows, cols) block of c (row stride ld),
 * reduced in double: per-block partials on the device, added here in
 * order. Synchronises the stream. Returns 0, or -1 with err. */
template <typename T>
static int cka_gpu_frob2(cka_gpu_buffers *b, const T *c, size_t rows, size_t cols, size_t ld,
                         double *out, char *err, size_t errlen) {
    unsigned blocks = cka_blocks(rows * cols);
    double host[CKA_MAX_BLOCKS];
    CU_LAUNCH(cka_sumsq_kernel<T>, dim3(blocks), dim3(CKA_THREADS), 0, b->stream, c, rows, cols,
              ld, b->partial);
    if (cka_cuda(cudaGetLastError(), "Frobenius norm", err, errlen) != 0 ||
        cka_cuda(cudaMemcpyAsync(host, b->partial, blocks * sizeof(double),
                                 cudaMemcpyDeviceToHost, b->stream),
                 "download", err, errlen) != 0 ||
        cka_cuda(cudaStreamSynchronize(b->stream), "Frobenius norm", err, errlen) != 0)
        return -1;
    double s = 0.0;
    for (unsigned i = 0; i < blocks; i++) s += host[i];
    *out = s;
    return 0;
}

/* The three norms and, if debiased, the row and column statistics of the
 * centred data at a (T = double, or float on the F32 path) with its product
 * c, into p (whose vectors point into b->host). Returns 0, or -1 with err. */
template <typename T>
static int cka_gpu_parts(cka_gpu_buffers *b, const T *a, const T *c, size_t n, size_t dx,
                         size_t dy, bool debiased, cka_linear_parts *p, char *err,
                         size_t errlen) {
    size_t D = dx + dy;
    p->n = n;
    p->dx = dx;
    p->dy = dy;
    if (cka_gpu_frob2(b, c, dx, dx, D, &p->fxx, err, errlen) != 0 ||
        cka_gpu_frob2(b, c + dx * D + dx, dy, dy, D, &p->fyy, err, errlen) != 0 ||
        cka_gpu_frob2(b, c + dx, dx, dy, D, &p->fxy, err, errlen) != 0)
        return -1;
    if (!debiased) return 0;
    /* Column sums of the centred data as the products saw it (rounded to
     * float32 on that path), so the debiased corrections match the norms. */
    double *colsum = b->cols + 3 * D;
    if (cka_gpu_columns(b, a, n, D, false, colsum, NULL, err, errlen) != 0) return -1;
    double *kd = b->rows, *k1 = kd + n, *ld = k1 + n, *l1 = ld + n;
    unsigned grid = n < 65535 ? (unsigned)n : 65535u, threads = 32;
    while (threads < CKA_THREADS && threads < D) threads *= 2; /* a short row needs few */
    CU_LAUNCH(cka_row_stats_kernel<T>, dim3(grid), dim3(threads), 0, b->stream, a, n, dx, D,
              (const double *)colsum, kd, k1, ld, l1);
    /* host: kd, k1, ld, l1 (4n) then colsum (D) */
    double *host = b->host;
    if (cka_cuda(cudaGetLastError(), "row statistics", err, errlen) != 0 ||
        cka_cuda(cudaMemcpyAsync(host, b->rows, 4 * n * sizeof(double), cudaMemcpyDeviceToHost,
                                 b->stream),
                 "download", err, errlen) != 0 ||
        cka_cuda(cudaMemcpyAsync(host + 4 * n, colsum, D * sizeof(double),
                                 cudaMemcpyDeviceToHost, b->stream),
                 "download", err, errlen) != 0 ||
        cka_cuda(cudaStreamSynchronize(b->stream), "row statistics", err, errlen) != 0)
        return -1;
    p->kd = host;
    p->k1 = host + n;
    p->ld = host + 2 * n;
    p->l1 = host + 3 * n;
    p->ks = host + 4 * n;
    p->ls = host + 4 * n + dx;
    return 0;
}

/* Device bytes a call needs for n rows of D columns (see cka_gpu_buffers). */
static size_t cka_gpu_need(size_t n, size_t D, bool f32, bool debiased) {
    size_t need = n * D * sizeof(double) + 2 * (size_t)CKA_MAX_CHUNKS * D * sizeof(double) +
                  4 * D * sizeof(double) + CKA_GEMM_WORKSPACE;
    need += f32 ? n * D * sizeof(float) + D * D * sizeof(float) : D * D * sizeof(double);
    if (debiased) need += 4 * n * sizeof(double);
    return need;
}

static double cka_gib(size_t bytes) { return (double)bytes / (1024.0 * 1024.0 * 1024.0); }

/* The work after the device is chosen and the rows prepared. Returns 0 with
 * *value, or -1 with err (call->cpu_may_run set by the caller for GPU
 * failures; input errors and cancellation clear it here). */
static int cka_gpu_run(cka_gpu_buffers *b, cka_matrix *x, cka_matrix *y, bool debiased, bool f32,
                       cka_gpu_call *call, atomic_int *cancel, double *value, char *err,
                       size_t errlen) {
    size_t n = x->rows, dx = x->cols, dy = y->cols, D = dx + dy;
    if (cka_cuda(cudaStreamCreate(&b->stream), "stream", err, errlen) != 0 ||
        gemm_ctx_new(b->stream, f32 ? CKA_GEMM_WORKSPACE : 0, &b->gemm, err, errlen) != 0 ||
        cka_cuda(cudaMalloc((void **)&b->a, n * D * sizeof(double)), "allocation of the input",
                 err, errlen) != 0 ||
        cka_cuda(cudaMalloc((void **)&b->partial, 2 * (size_t)CKA_MAX_CHUNKS * D * sizeof(double)),
                 "allocation", err, errlen) != 0 ||
        cka_cuda(cudaMalloc((void **)&b->cols, 4 * D * sizeof(double)), "allocation", err,
                 errlen) != 0 ||
        cka_cuda(cudaMalloc(&b->c, D * D * (f32 ? sizeof(float) : sizeof(double))),
                 "allocation of the product", err, errlen) != 0)
        return -1;
    if (debiased && cka_cuda(cudaMalloc((void **)&b->rows, 4 * n * sizeof(double)),
                             "allocation", err, errlen) != 0)
        return -1;
    /* host: D spreads for the variance check, or 4n + D statistics */
    b->host = (double *)malloc((debiased ? 4 * n + D : D) * sizeof(double));
    if (!b->host) return err_set(err, errlen, "out of memory for the CKA statistics");
    if (cka_gpu_upload(b, x, y, err, errlen) != 0) return -1;

    double *first = b->cols, *sum = first + D, *spread = sum + D;
    if (cka_cuda(cudaMemcpyAsync(first, b->a, D * sizeof(double), cudaMemcpyDeviceToDevice,
                                 b->stream),
                 "copy", err, errlen) != 0 ||
        cka_gpu_columns(b, (const double *)b->a, n, D, true, sum, spread, err, errlen) != 0)
        return -1;
    CU_LAUNCH(cka_centre_kernel, dim3(cka_blocks(n * D)), dim3(CKA_THREADS), 0, b->stream, b->a,
              n, D, (const double *)first, (const double *)sum, (const double *)spread);
    if (cka_cuda(cudaGetLastError(), "centring", err, errlen) != 0 ||
        cka_cuda(cudaMemcpyAsync(b->host, spread, D * sizeof(double), cudaMemcpyDeviceToHost,
                                 b->stream),
                 "download", err, errlen) != 0 ||
        cka_cuda(cudaStreamSynchronize(b->stream), "centring", err, errlen) != 0)
        return -1;
    size_t varying_x = 0, varying_y = 0;
    for (size_t j = 0; j < D; j++)
        if (b->host[j] != 0.0) (j < dx ? varying_x : varying_y)++;
    if (cka_check_variance(varying_x, varying_y, err, errlen) != 0) {
        call->cpu_may_run = false;
        return -1;
    }
    if (cka_gpu_cancelled(cancel)) goto cancelled;

    cka_linear_parts parts;
    memset(&parts, 0, sizeof parts);
    if (!f32) {
        if (gemm_dsyrk_t(b->gemm, n, D, 1.0, b->a, D, 0.0, (double *)b->c, D, err, errlen) != 0)
            return -1;
        if (cka_gpu_parts(b, (const double *)b->a, (const double *)b->c, n, dx, dy, debiased,
                          &parts, err, errlen) != 0)
            return -1;
    } else {
        if (cka_cuda(cudaMalloc((void **)&b->af, n * D * sizeof(float)),
                     "allocation of the float32 copy", err, errlen) != 0)
            return -1;
        CU_LAUNCH(cka_to_f32_kernel, dim3(cka_blocks(n * D)), dim3(CKA_THREADS), 0, b->stream,
                  b->af, (const double *)b->a, n * D);
        if (cka_cuda(cudaGetLastError(), "float32 rounding", err, errlen) != 0) return -1;
        /* C (D, D) = A'A: op(A) = A' (D, n), B = A (n, D). */
        if (gemm_run(b->gemm, GEMM_F32, true, false, D, D, n, 1.0f, b->af, D, b->af, D, 0.0f,
                     (float *)b->c, D, err, errlen) != 0)
            return -1;
        if (cka_gpu_parts(b, (const float *)b->af, (const float *)b->c, n, dx, dy, debiased,
                          &parts, err, errlen) != 0)
            return -1;
    }
    if (cka_gpu_cancelled(cancel)) goto cancelled;
    if (cka_linear_finish(&parts, debiased, value, err, errlen) != 0) {
        call->cpu_may_run = false;
        return -1;
    }
    return 0;
cancelled:
    call->cpu_may_run = false;
    return err_set(err, errlen, "cancelled");
}

int cka_gpu_compute_with(cka_matrix *x, cka_matrix *y, const cka_options *opt,
                         cka_gpu_call *call, atomic_int *cancel, cka_result *res, char *err,
                         size_t errlen) {
    memset(res, 0, sizeof *res);
    call->used = call->precision;
    call->cpu_may_run = true;
    call->device_name[0] = '\0';
    if (opt->kernel != CKA_LINEAR || opt->space == CKA_SPACE_GRAM)
        return err_set(err, errlen,
                           "the GPU computes linear CKA in feature space only (asked for %s%s)",
                           opt->kernel == CKA_RBF ? "the rbf kernel" : "linear",
                           opt->space == CKA_SPACE_GRAM ? " in Gram space" : "");
    cudaDeviceProp prop;
    memset(&prop, 0, sizeof prop);
    if (cka_cuda(cudaSetDevice(call->device), "cudaSetDevice", err, errlen) != 0 ||
        cka_cuda(cudaGetDeviceProperties(&prop, call->device), "cudaGetDeviceProperties", err,
                 errlen) != 0)
        return -1;
    size_t name_len = strnlen(prop.name, sizeof prop.name);
    if (name_len >= sizeof call->device_name) name_len = sizeof call->device_name - 1;
    memcpy(call->device_name, prop.name, name_len);
    call->device_name[name_len] = '\0';
    if (call->precision == CKA_GPU_AUTO)
        call->used = cka_gpu_fast_fp64(prop.major, prop.minor) ? CKA_GPU_F64 : CKA_GPU_F32;
    bool f32 = call->used == CKA_GPU_F32;

    call->cpu_may_run = false;
    if (cka_prepare(x, y, opt, res, err, errlen) != 0) return -1;
    if (cka_gpu_cancelled(cancel)) return err_set(err, errlen, "cancelled");
    call->cpu_may_run = true;
    size_t n = x->rows, D = x->cols + y->cols;
    if (n > SIZE_MAX / 16 / D || D > SIZE_MAX / 16 / D)
        return err_set(err, errlen, "%zu x %zu inputs are too large for the GPU", n, D);
    size_t free_bytes = 0, total_bytes = 0, need = cka_gpu_need(n, D, f32, opt->debiased);
    if (cka_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo", err, errlen) != 0)
        return -1;
    if (need > free_bytes)
        return err_set(err, errlen,
                           "out of GPU memory on %s: %zu x %zu %s CKA needs %.2f GiB, %.2f GiB "
                           "free",
                           call->device_name, n, D, f32 ? "float32" : "float64", cka_gib(need),
                           cka_gib(free_bytes));

    cka_gpu_buffers b;
    memset(&b, 0, sizeof b);
    double value = NAN;
    int rc = cka_gpu_run(&b, x, y, opt->debiased, f32, call, cancel, &value, err, errlen);
    cka_gpu_free(&b);
    if (rc != 0) return -1;
    if (cka_set_result(res, value, false, err, errlen) != 0) {
        call->cpu_may_run = false;
        return -1;
    }
    call->cpu_may_run = false;
    return 0;
}

int cka_gpu_compute(cka_matrix *x, cka_matrix *y, const cka_options *opt, int device,
                    atomic_int *cancel, cka_result *res, char *err, size_t errlen) {
    cka_gpu_call call;
    memset(&call, 0, sizeof call);
    call.device = device;
    call.precision = CKA_GPU_AUTO;
    return cka_gpu_compute_with(x, y, opt, &call, cancel, res, err, errlen);
}
