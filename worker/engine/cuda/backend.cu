/* backend.cu - the CUDA backend: backend.h's op table on one GPU.
 *
 * Each thread that calls cuda_backend_open gets a context of its own (C++
 * thread_local): its device, the precision of its matrix products, one
 * stream every op enqueues on, a gemm.h context bound to that stream, a
 * growable scratch for activations converted to bf16/fp16, the weight
 * ranges registered for low-precision copies, the buffers it allocated and
 * a sticky first error. The ops run on the calling thread's context; one
 * called on a thread that never opened one is a programming error and
 * aborts with a message naming the op.
 *
 * backend.h ops cannot fail, so an op whose launcher, cuBLAS call or copy
 * fails records the first such error and every later op of the thread does
 * nothing until cuda_backend_sync reports it (and clears it); downloads
 * then fill the host buffer with all-ones bytes (NaN as floats and doubles,
 * -1 as ints), so a caller that forgets to sync sees garbage that looks like
 * garbage rather than stale numbers.
 *
 * Matrix products (gemm.h, cuBLAS underneath): fp32 operands as they are in
 * CUDA_FP32; in CUDA_BF16 / CUDA_FP16 both operands rounded to the low
 * precision (activations into the scratch before each product, weights
 * from their registered copy or converted on the fly) with fp32
 * accumulation and fp32 output. Frozen weights (cuda_backend_upload_frozen)
 * are registered ranges whose fp32 side does not exist: their key is
 * host address space mapped with no access, so only the products, which
 * map it to the copy, may be given it. RoPE angles are computed on the host by the
 * CPU backend, so both backends rotate by identical fp32 angles. */
extern "C" {
#include "worker/engine/backend.h"
}
#include "worker/engine/cuda/compat.cuh"

#include "common/util.h"
#include "worker/engine/cuda/attn_gemm.h"
#include "worker/engine/cuda/cuda.h"
#include "worker/engine/cuda/gemm.h"
#include "worker/engine/cuda/kernels.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define CB_ERR_LEN 512
/* cuBLAS workspace per thread: what NVIDIA recommends for Hopper. */
#define CB_GEMM_WORKSPACE ((size_t)32 << 20)
/* Low-precision operands start on 16-byte boundaries (8 elements) inside
 * the scratch, as tensor-core kernels prefer. */
#define CB_ALIGN_ELEMS 8
/* Floats a frozen upload stages per chunk (32 MiB): large enough that the
 * copies run at full speed, small next to any model worth freezing. */
#define CB_FROZEN_CHUNK ((size_t)8 << 20)

/* A weight range [w, w + n) of device floats with its copy in the
 * context's low precision. A frozen range has no fp32 side: w is the start
 * of n floats of inaccessible host address space (map_bytes of it, to be
 * unmapped), and low is the only copy of the weights. */
typedef struct {
    const float *w;
    size_t n;
    uint16_t *low;
    bool frozen;
    size_t map_bytes;
} cb_weight;

/* A live buffer from this thread's alloc, so that freeing it can drop the
 * registered weight ranges inside it. */
typedef struct {
    void *p;
    size_t bytes;
} cb_buffer;

typedef struct {
    bool open;
    int device;
    cuda_precision precision;
    cudaStream_t stream;
    gemm_ctx *gemm;
    uint16_t *scratch; /* scratch_elems low-precision elements */
    size_t scratch_elems;
    attn_gemm_ws attn_ws; /* S/P and 16-bit q/k/v/dout of attn_gemm.h */
    cb_weight *weights;
    size_t nweights, cap_weights;
    cb_buffer *buffers;
    size_t nbuffers, cap_buffers;
    bool failed;
    char err[CB_ERR_LEN];
} cb_context;

static thread_local cb_context cb;

/* Records the thread's first error; later ones are consequences of it. */
static void cb_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void cb_fail(const char *fmt, ...) {
    if (cb.failed) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cb.err, sizeof cb.err, fmt, ap);
    va_end(ap);
    cb.failed = true;
}

/* Aborts when the calling thread has no open context: ops cannot return an
 * error, and running on some other thread's stream would be a silent race. */
static void cb_require(const char *op) {
    if (cb.open) return;
    fprintf(stderr,
            "strata: CUDA backend op %s called on a thread with no open CUDA context "
            "(call cuda_backend_open on this thread first)\n",
            op);
    abort();
}

/* Whether op should run: the thread has a context (else abort) and no
 * error is pending. */
static bool cb_ready(const char *op) {
    cb_require(op);
    return !cb.failed;
}

/* Records a failed CUDA runtime call of op (clearing the runtime's
 * last-error slot so the next check does not see it again). Returns
 * whether e was success. */
static bool cb_cuda_ok(const char *op, cudaError_t e) {
    if (e == cudaSuccess) return true;
    (void)cudaGetLastError();
    cb_fail("%s: %s", op, cudaGetErrorString(e));
    return false;
}

/* After a launcher: records its refusal (rc -1, err e) or a launch error. */
static bool cb_launched(const char *op, int rc, const char *e) {
    if (rc != 0) {
        cb_fail("%s: %s", op, e);
        return false;
    }
    return cb_cuda_ok(op, cudaGetLastError());
}

static void *cb_stream(void) { return static_cast<void *>(cb.stream); }

static gemm_type cb_low_type(void) { return cb.precision == CUDA_FP16 ? GEMM_F16 : GEMM_BF16; }

/* dst (n) = src (n) in the context's low precision, on the stream. */
static bool cb_convert(const char *op, uint16_t *dst, const float *src, size_t n) {
    char e[CB_ERR_LEN] = "";
    int rc = cb.precision == CUDA_FP16 ? cuk_to_fp16(dst, src, n, cb_stream(), e, sizeof e)
                                       : cuk_to_bf16(dst, src, n, cb_stream(), e, sizeof e);
    return cb_launched(op, rc, e);
}

/* n rounded up to CB_ALIGN_ELEMS. */
static size_t cb_aligned(size_t n) {
    return (n + CB_ALIGN_ELEMS - 1) / CB_ALIGN_ELEMS * CB_ALIGN_ELEMS;
}

/* The scratch with room for n low-precision elements, grown (never shrunk)
 * as needed, or NULL with the error recorded. Growing waits for the stream,
 * whose queued products may still read the old scratch. */
static uint16_t *cb_scratch(const char *op, size_t n) {
    if (n <= cb.scratch_elems) return cb.scratch;
    size_t want = n + n / 4;
    if (!cb_cuda_ok(op, cudaStreamSynchronize(cb.stream))) return NULL;
    if (cb.scratch) cudaFree(cb.scratch);
    cb.scratch = NULL;
    cb.scratch_elems = 0;
    void *p = NULL;
    if (cudaMalloc(&p, want * sizeof(uint16_t)) != cudaSuccess) {
        (void)cudaGetLastError();
        want = n;
        if (cudaMalloc(&p, want * sizeof(uint16_t)) != cudaSuccess) {
            (void)cudaGetLastError();
            cb_fail("%s: out of GPU memory for %zu bytes of low-precision scratch", op,
                    n * sizeof(uint16_t));
            return NULL;
        }
    }
    cb.scratch = static_cast<uint16_t *>(p);
    cb.scratch_elems = want;
    return cb.scratch;
}

/* The low-precision copy of [w, w + n) when a registered range (frozen or
 * not) holds it, else NULL. */
static const uint16_t *cb_registered(const float *w, size_t n) {
    uintptr_t a = reinterpret_cast<uintptr_t>(w);
    for (size_t i = 0; i < cb.nweights; i++) {
        const cb_weight *r = &cb.weights[i];
        uintptr_t b = reinterpret_cast<uintptr_t>(r->w);
        if (a >= b && (a - b) / sizeof(float) + n <= r->n)
            return r->low + (a - b) / sizeof(float);
    }
    return NULL;
}

/* One product through gemm.h, its failure recorded under op. */
static void cb_gemm(const char *op, gemm_type type, bool trans_a, bool trans_b, size_t M,
                    size_t N, size_t K, const void *A, size_t lda, const void *B, size_t ldb,
                    float beta, float *C, size_t ldc) {
    char e[CB_ERR_LEN] = "";
    if (gemm_run(cb.gemm, type, trans_a, trans_b, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc, e,
                 sizeof e) != 0)
        cb_fail("%s: %s", op, e);
}

/* --- memory ----------------------------------------------------------- */

/* Drops (and frees the copies of) registered ranges starting inside
 * [p, p + bytes): their memory is going away, and a later buffer at the
 * same address must not be read through a stale copy. */
static void cb_drop_weights_in(const void *p, size_t bytes) {
    uintptr_t lo = reinterpret_cast<uintptr_t>(p);
    size_t kept = 0;
    for (size_t i = 0; i < cb.nweights; i++) {
        uintptr_t w = reinterpret_cast<uintptr_t>(cb.weights[i].w);
        /* A frozen key is host address space, never inside a device buffer;
         * only cuda_backend_free_frozen releases it. */
        if (!cb.weights[i].frozen && w >= lo && w - lo < bytes) {
            cudaFree(cb.weights[i].low);
            continue;
        }
        cb.weights[kept++] = cb.weights[i];
    }
    cb.nweights = kept;
}

/* cudaMalloc of bytes (at least 1, so NULL always means failure). Returns
 * NULL with err "out of GPU memory allocating N bytes (F GiB free of T
 * GiB)" when the device is full. The caller owns the buffer (free_buf). */
static void *cb_alloc(size_t bytes, char *err, size_t errlen) {
    cb_require("alloc");
    if (cb.nbuffers == cb.cap_buffers) {
        size_t cap = cb.cap_buffers ? 2 * cb.cap_buffers : 16;
        void *grown = realloc(cb.buffers, cap * sizeof *cb.buffers);
        if (!grown) {
            err_set(err, errlen, "out of host memory tracking GPU buffers");
            return NULL;
        }
        cb.buffers = static_cast<cb_buffer *>(grown);
        cb.cap_buffers = cap;
    }
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        size_t free_b = 0, total_b = 0;
        if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) (void)cudaGetLastError();
        const double gib = 1024.0 * 1024.0 * 1024.0;
        if (e == cudaErrorMemoryAllocation)
            err_set(err, errlen,
                      "out of GPU memory allocating %zu bytes (%.2f GiB free of %.2f GiB)", bytes,
                      (double)free_b / gib, (double)total_b / gib);
        else
            err_set(err, errlen, "cudaMalloc of %zu bytes: %s", bytes, cudaGetErrorString(e));
        return NULL;
    }
    cb.buffers[cb.nbuffers++] = {p, bytes};
    return p;
}

/* cudaFree, after dropping the registered weights inside the buffer. Works
 * on any thread (cleanup paths), though only the allocating thread's
 * context knows the buffer's extent. */
static void cb_free_buf(void *buf) {
    if (!buf) return;
    if (cb.open) {
        for (size_t i = cb.nbuffers; i-- > 0;) {
            if (cb.buffers[i].p != buf) continue;
            cb_drop_weights_in(buf, cb.buffers[i].bytes);
            cb.buffers[i] = cb.buffers[--cb.nbuffers];
            break;
        }
    }
    cudaFree(buf);
}

/* Host -> device on the stream, waited for, so the host buffer may be
 * reused at once and the copy lands after every op enqueued before it. */
static void cb_upload(void *dst, const void *src, size_t bytes) {
    if (!cb_ready("upload") || bytes == 0) return;
    if (!cb_cuda_ok("upload", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice,
                                              cb.stream)))
        return;
    cb_cuda_ok("upload", cudaStreamSynchronize(cb.stream));
}

/* Device -> host after everything enqueued; all-ones bytes when an error
 * is pending or the copy fails. */
static void cb_download(void *dst, const void *src, size_t bytes) {
    if (bytes == 0) {
        cb_require("download");
        return;
    }
    if (cb_ready("download") &&
        cb_cuda_ok("download", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost,
                                               cb.stream)) &&
        cb_cuda_ok("download", cudaStreamSynchronize(cb.stream)))
        return;
    memset(dst, 0xff, bytes);
}

static void cb_zero(float *x, size_t n) {
    if (!cb_ready("zero") || n == 0) return;
    cb_cuda_ok("zero", cudaMemsetAsync(x, 0, n * sizeof(float), cb.stream));
}

static void cb_copy(float *dst, const float *src, size_t n) {
    if (!cb_ready("copy") || n == 0) return;
    cb_cuda_ok("copy", cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice,
                                       cb.stream));
}

static void cb_scale(float *x, size_t n, float a) {
    if (!cb_ready("scale") || n == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_scale(x, n, a, cb_stream(), e, sizeof e);
    cb_launched("scale", rc, e);
}

/* --- matrix products -------------------------------------------------- */

/* out (N, out_dim) (+)= x (N, in_dim) W^T: row-major C = A B^T. In
 * bf16/fp16 a w inside a registered or frozen range is read from its copy;
 * a frozen w never reaches the fp32 branch, as the precision cannot change
 * while frozen ranges exist. */
static void cb_matmul(float *out, const float *x, const float *w, size_t N, size_t in_dim,
                      size_t out_dim, bool accumulate) {
    if (!cb_ready("matmul") || N == 0 || out_dim == 0) return;
    float beta = accumulate ? 1.0f : 0.0f;
    if (cb.precision == CUDA_FP32) {
        cb_gemm("matmul", GEMM_F32, false, true, N, out_dim, in_dim, x, in_dim, w, in_dim, beta,
                out, out_dim);
        return;
    }
    size_t nx = cb_aligned(N * in_dim), nw = out_dim * in_dim;
    const uint16_t *wl = cb_registered(w, nw);
    uint16_t *s = cb_scratch("matmul", nx + (wl ? 0 : nw));
    if (!s || !cb_convert("matmul", s, x, N * in_dim)) return;
    if (!wl) {
        if (!cb_convert("matmul", s + nx, w, nw)) return;
        wl = s + nx;
    }
    cb_gemm("matmul", cb_low_type(), false, true, N, out_dim, in_dim, s, in_dim, wl, in_dim,
            beta, out, out_dim);
}

/* dx (N, in) (+)= dy (N, out) W (out, in); dw (out, in) += dy^T x. W is
 * read only for dx, from its copy when registered or frozen (dw of a frozen
 * weight is never asked for: it is not trained). */
static void cb_matmul_backward(float *dx, float *dw, const float *dy, const float *x,
                               const float *w, size_t N, size_t in_dim, size_t out_dim,
                               bool accumulate_dx) {
    if (!cb_ready("matmul_backward") || N == 0 || out_dim == 0 || in_dim == 0) return;
    if (!dx && !dw) return;
    float beta_dx = accumulate_dx ? 1.0f : 0.0f;
    if (cb.precision == CUDA_FP32) {
        if (dx)
            cb_gemm("matmul_backward dx", GEMM_F32, false, false, N, in_dim, out_dim, dy,
                    out_dim, w, in_dim, beta_dx, dx, in_dim);
        if (dw)
            cb_gemm("matmul_backward dw", GEMM_F32, true, false, out_dim, in_dim, N, dy,
                    out_dim, x, in_dim, 1.0f, dw, in_dim);
        return;
    }
    /* Scratch: dy, then W unless registered (for dx), then x (for dw). */
    size_t ndy = cb_aligned(N * out_dim), nw = out_dim * in_dim;
    const uint16_t *wl = dx ? cb_registered(w, nw) : NULL;
    size_t nw_scratch = dx && !wl ? cb_aligned(nw) : 0;
    size_t nx = dw ? N * in_dim : 0;
    uint16_t *s = cb_scratch("matmul_backward", ndy + nw_scratch + nx);
    if (!s || !cb_convert("matmul_backward", s, dy, N * out_dim)) return;
    if (dx) {
        if (!wl) {
            if (!cb_convert("matmul_backward", s + ndy, w, nw)) return;
            wl = s + ndy;
        }
        cb_gemm("matmul_backward dx", cb_low_type(), false, false, N, in_dim, out_dim, s,
                out_dim, wl, in_dim, beta_dx, dx, in_dim);
    }
    if (dw) {
        uint16_t *xl = s + ndy + nw_scratch;
        if (!cb_convert("matmul_backward", xl, x, nx)) return;
        cb_gemm("matmul_backward dw", cb_low_type(), true, false, out_dim, in_dim, N, s, out_dim,
                xl, in_dim, 1.0f, dw, in_dim);
    }
}

/* --- row and element ops ---------------------------------------------- */

static void cb_rmsnorm(float *out, const float *x, const float *weight, size_t N, size_t C,
                       float eps) {
    if (!cb_ready("rmsnorm") || N == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_rmsnorm(out, x, weight, N, C, eps, cb_stream(), e, sizeof e);
    cb_launched("rmsnorm", rc, e);
}

static void cb_rmsnorm_backward(float *dx, float *dweight, const float *dout, const float *x,
                                const float *weight, size_t N, size_t C, float eps) {
    if (!cb_ready("rmsnorm_backward") || N == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_rmsnorm_backward(dx, dweight, dout, x, weight, N, C, eps, cb_stream(), e,
                                  sizeof e);
    cb_launched("rmsnorm_backward", rc, e);
}

/* The (npos, HS/2, 2) angle table computed on the host by the CPU backend
 * and uploaded into cs (device), so every backend rotates by the same fp32
 * angles. */
static void cb_rope_table(float *cs, int npos, int HS, float theta) {
    if (!cb_ready("rope_table") || npos <= 0 || HS <= 0) return;
    size_t n = (size_t)npos * (size_t)HS;
    float *host = static_cast<float *>(malloc(n * sizeof(float)));
    if (!host) {
        cb_fail("rope_table: out of host memory for %d positions", npos);
        return;
    }
    backend_cpu()->rope_table(host, npos, HS, theta);
    cb_upload(cs, host, n * sizeof(float));
    free(host);
}

static void cb_rope_cached(float *x, const int *pos, size_t N, int nheads, int HS,
                           const float *cs) {
    if (!cb_ready("rope_cached") || N == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_rope_cached(x, pos, N, nheads, HS, cs, false, cb_stream(), e, sizeof e);
    cb_launched("rope_cached", rc, e);
}

static void cb_rope_backward_cached(float *dx, const int *pos, size_t N, int nheads, int HS,
                                    const float *cs) {
    if (!cb_ready("rope_backward_cached") || N == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_rope_cached(dx, pos, N, nheads, HS, cs, true, cb_stream(), e, sizeof e);
    cb_launched("rope_backward_cached", rc, e);
}

/* rope without a caller's table (off the hot path: forward.c builds one
 * table per forward): reads the positions back to size a table for
 * 0..max(pos), builds it as rope_table does, rotates, and frees it once the
 * stream is done with it. */
static void cb_rope(float *x, const int *pos, size_t N, int nheads, int HS, float theta) {
    if (!cb_ready("rope") || N == 0) return;
    int *host_pos = static_cast<int *>(malloc(N * sizeof(int)));
    if (!host_pos) {
        cb_fail("rope: out of host memory for %zu positions", N);
        return;
    }
    cb_download(host_pos, pos, N * sizeof(int));
    int npos = 1;
    for (size_t n = 0; n < N; n++)
        if (host_pos[n] >= npos) npos = host_pos[n] + 1;
    free(host_pos);
    if (cb.failed) return;
    void *table = NULL;
    size_t bytes = (size_t)npos * (size_t)HS * sizeof(float);
    if (!cb_cuda_ok("rope", cudaMalloc(&table, bytes))) return;
    float *cs = static_cast<float *>(table);
    cb_rope_table(cs, npos, HS, theta);
    cb_rope_cached(x, pos, N, nheads, HS, cs);
    cb_cuda_ok("rope", cudaStreamSynchronize(cb.stream));
    cudaFree(table);
}

/* Whether attention of this shape takes the tensor-core path (attn_gemm.h):
 * bf16/fp16 products and T >= ATTN_GEMM_MIN_T, a shape it plans and room
 * for its workspace in the context (grown here, never shrunk). Otherwise,
 * fp32 jobs included, the exact flash kernels run: a refused plan (one
 * head's scores past the cap) or a full device costs speed, not the job.
 * Decided before anything is enqueued. */
static bool cb_attn_gemm(int B, int T, int NH, int NKV, int HS, bool backward,
                         attn_gemm_plan *plan) {
    if (!attn_gemm_wanted(cb.precision != CUDA_FP32, T)) return false;
    char e[CB_ERR_LEN] = "";
    if (attn_gemm_plan_make(plan, B, T, NH, NKV, HS, backward, ATTN_GEMM_SP_CAP, e, sizeof e))
        return false;
    return attn_gemm_reserve(&cb.attn_ws, plan->ws_bytes, cb_stream(), e, sizeof e) == 0;
}

static void cb_attention(float *out, const float *q, const float *k, const float *v,
                         const int *lengths, int B, int T, int NH, int NKV, int HS,
                         float *scratch) {
    if (!cb_ready("attention")) return;
    char e[CB_ERR_LEN] = "";
    attn_gemm_plan plan;
    int rc;
    if (cb_attn_gemm(B, T, NH, NKV, HS, false, &plan))
        rc = attn_gemm_forward(&plan, &cb.attn_ws, cb.gemm, cb_low_type(), out, q, k, v, lengths,
                               cb_stream(), e, sizeof e);
    else
        rc = cuk_attention(out, q, k, v, lengths, B, T, NH, NKV, HS, scratch, cb_stream(), e,
                           sizeof e);
    cb_launched("attention", rc, e);
}

static void cb_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                  const float *q, const float *k, const float *v,
                                  const int *lengths, int B, int T, int NH, int NKV, int HS,
                                  float *scratch) {
    if (!cb_ready("attention_backward")) return;
    char e[CB_ERR_LEN] = "";
    attn_gemm_plan plan;
    int rc;
    if (cb_attn_gemm(B, T, NH, NKV, HS, true, &plan))
        rc = attn_gemm_backward(&plan, &cb.attn_ws, cb.gemm, cb_low_type(), dq, dk, dv, dout, q,
                                k, v, lengths, cb_stream(), e, sizeof e);
    else
        rc = cuk_attention_backward(dq, dk, dv, dout, q, k, v, lengths, B, T, NH, NKV, HS,
                                    scratch, cb_stream(), e, sizeof e);
    cb_launched("attention_backward", rc, e);
}

static void cb_swiglu(float *gate, const float *up, size_t n) {
    if (!cb_ready("swiglu") || n == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_swiglu(gate, up, n, cb_stream(), e, sizeof e);
    cb_launched("swiglu", rc, e);
}

static void cb_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                               const float *up, size_t n) {
    if (!cb_ready("swiglu_backward") || n == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_swiglu_backward(dgate, dup, dout, gate, up, n, cb_stream(), e, sizeof e);
    cb_launched("swiglu_backward", rc, e);
}

static void cb_embedding(float *out, const int *tokens, const float *table, size_t N, size_t C) {
    if (!cb_ready("embedding") || N == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_embedding(out, tokens, table, N, C, cb_stream(), e, sizeof e);
    cb_launched("embedding", rc, e);
}

static void cb_embedding_backward(float *dtable, const float *dout, const int *tokens, size_t N,
                                  size_t C) {
    if (!cb_ready("embedding_backward") || N == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_embedding_backward(dtable, dout, tokens, N, C, cb_stream(), e, sizeof e);
    cb_launched("embedding_backward", rc, e);
}

static void cb_cross_entropy(float *logits, double *row_loss, const int *targets, size_t N,
                             size_t V, float scale) {
    if (!cb_ready("cross_entropy") || N == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_cross_entropy(logits, row_loss, targets, N, V, scale, cb_stream(), e, sizeof e);
    cb_launched("cross_entropy", rc, e);
}

static void cb_residual_add(float *x, const float *y, size_t n) {
    if (!cb_ready("residual_add") || n == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_residual_add(x, y, n, cb_stream(), e, sizeof e);
    cb_launched("residual_add", rc, e);
}

static void cb_dropout(float *out, const float *x, size_t n, uint64_t key, uint64_t threshold,
                       float scale, bool accumulate) {
    if (!cb_ready("dropout") || n == 0) return;
    char e[CB_ERR_LEN] = "";
    int rc = cuk_dropout(out, x, n, key, threshold, scale, accumulate, cb_stream(), e, sizeof e);
    cb_launched("dropout", rc, e);
}

/* In backend.h's field order. */
static const backend cb_table = {
    "cuda",
    false,
    cb_alloc,
    cb_free_buf,
    cb_upload,
    cb_download,
    cb_zero,
    cb_copy,
    cb_scale,
    cb_matmul,
    cb_matmul_backward,
    cb_rmsnorm,
    cb_rmsnorm_backward,
    cb_rope,
    cb_rope_table,
    cb_rope_cached,
    cb_rope_backward_cached,
    cb_attention,
    cb_attention_backward,
    cb_swiglu,
    cb_swiglu_backward,
    cb_embedding,
    cb_embedding_backward,
    cb_cross_entropy,
    cb_residual_add,
    cb_dropout,
};

/* --- the context ------------------------------------------------------ */

/* Room for one more registry entry: 0, or -1 with err set. */
static int cb_reserve_weight(char *err, size_t errlen) {
    if (cb.nweights < cb.cap_weights) return 0;
    size_t cap = cb.cap_weights ? 2 * cb.cap_weights : 8;
    void *grown = realloc(cb.weights, cap * sizeof *cb.weights);
    if (!grown) return err_set(err, errlen, "out of host memory registering weights");
    cb.weights = static_cast<cb_weight *>(grown);
    cb.cap_weights = cap;
    return 0;
}

/* The index of the frozen range whose key range holds w, or -1. */
static long cb_frozen_at(const float *w) {
    uintptr_t a = reinterpret_cast<uintptr_t>(w);
    for (size_t i = 0; i < cb.nweights; i++) {
        const cb_weight *r = &cb.weights[i];
        uintptr_t b = reinterpret_cast<uintptr_t>(r->w);
        if (r->frozen && a >= b && a - b < r->n * sizeof(float)) return (long)i;
    }
    return -1;
}

/* Converts every registered range again (after a switch of precision, the
 * copies being in the old one). */
static void cb_reconvert_weights(void) {
    if (cb.precision == CUDA_FP32) return;
    for (size_t i = 0; i < cb.nweights && !cb.failed; i++)
        if (!cb.weights[i].frozen)
            cb_convert("register_weights", cb.weights[i].low, cb.weights[i].w, cb.weights[i].n);
}

const backend *cuda_backend_open(int device, cuda_precision precision, char *err,
                                 size_t errlen) {
    if ((unsigned)precision > (unsigned)CUDA_FP16) {
        err_set(err, errlen, "unknown precision %d", (int)precision);
        return NULL;
    }
    if (cb.open) {
        if (device != cb.device) {
            err_set(err, errlen,
                      "this thread is bound to GPU %d; cuda_backend_close it before opening GPU "
                      "%d",
                      cb.device, device);
            return NULL;
        }
        if (precision != cb.precision) {
            for (size_t i = 0; i < cb.nweights; i++)
                if (cb.weights[i].frozen) {
                    err_set(err, errlen,
                              "this thread holds frozen %s weights, which cannot be converted "
                              "to %s; free them first",
                              cuda_precision_name(cb.precision), cuda_precision_name(precision));
                    return NULL;
                }
            cb.precision = precision;
            cb_reconvert_weights();
        }
        return &cb_table;
    }
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        err_set(err, errlen, "no usable CUDA driver or GPU (%s)", cudaGetErrorString(e));
        return NULL;
    }
    if (device < 0 || device >= count) {
        err_set(err, errlen, "GPU %d does not exist (this process sees %d)", device, count);
        return NULL;
    }
    e = cudaSetDevice(device);
    if (e == cudaSuccess) e = cudaStreamCreate(&cb.stream);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        err_set(err, errlen, "GPU %d: %s", device, cudaGetErrorString(e));
        cb.stream = NULL;
        return NULL;
    }
    char ge[CB_ERR_LEN] = "";
    if (gemm_ctx_new(cb_stream(), CB_GEMM_WORKSPACE, &cb.gemm, ge, sizeof ge) != 0) {
        cudaStreamDestroy(cb.stream);
        cb.stream = NULL;
        err_set(err, errlen, "GPU %d: %s", device, ge);
        return NULL;
    }
    cb.open = true;
    cb.device = device;
    cb.precision = precision;
    cb.failed = false;
    cb.err[0] = '\0';
    return &cb_table;
}

void cuda_backend_close(void) {
    if (!cb.open) return;
    cudaStreamSynchronize(cb.stream);
    (void)cudaGetLastError();
    for (size_t i = 0; i < cb.nweights; i++) {
        cudaFree(cb.weights[i].low);
        if (cb.weights[i].frozen)
            munmap(const_cast<float *>(cb.weights[i].w), cb.weights[i].map_bytes);
    }
    free(cb.weights);
    if (cb.scratch) cudaFree(cb.scratch);
    attn_gemm_ws_free(&cb.attn_ws);
    free(cb.buffers);
    gemm_ctx_free(cb.gemm);
    cudaStreamDestroy(cb.stream);
    memset(&cb, 0, sizeof cb);
}

int cuda_backend_register_weights(const float *w, size_t n, char *err, size_t errlen) {
    if (!cb.open) return err_set(err, errlen, "no CUDA backend is open on this thread");
    if (cb.failed) return err_set(err, errlen, "an earlier GPU operation failed: %s", cb.err);
    if (cb.precision == CUDA_FP32 || n == 0) return 0;
    if (cb_frozen_at(w) >= 0) {
        /* Its copy is all there is and cannot change. */
        if (cb_registered(w, n)) return 0;
        return err_set(err, errlen, "%zu weights at a frozen key run past its end", n);
    }
    for (size_t i = 0; i < cb.nweights; i++) {
        cb_weight *r = &cb.weights[i];
        if (r->w != w) continue;
        if (r->n == n) {
            /* Refresh in place: ordered on the stream after whatever
             * changed the weights, before the products that read them. */
            if (!cb_convert("register_weights", r->low, w, n))
                return err_set(err, errlen, "%s", cb.err);
            return 0;
        }
        cuda_backend_forget_weights(w);
        break;
    }
    if (cb_reserve_weight(err, errlen) != 0) return -1;
    void *low = NULL;
    if (cudaMalloc(&low, n * sizeof(uint16_t)) != cudaSuccess) {
        (void)cudaGetLastError();
        return err_set(err, errlen, "out of GPU memory for a %s copy of %zu weights",
                         cuda_precision_name(cb.precision), n);
    }
    cb_weight r = {w, n, static_cast<uint16_t *>(low), false, 0};
    if (!cb_convert("register_weights", r.low, w, n)) {
        cudaFree(low);
        return err_set(err, errlen, "%s", cb.err);
    }
    cb.weights[cb.nweights++] = r;
    return 0;
}

void cuda_backend_forget_weights(const float *w) {
    if (!cb.open) return;
    for (size_t i = 0; i < cb.nweights; i++) {
        if (cb.weights[i].w != w || cb.weights[i].frozen) continue;
        /* Queued products may still read the copy. */
        cudaStreamSynchronize(cb.stream);
        cudaFree(cb.weights[i].low);
        cb.weights[i] = cb.weights[--cb.nweights];
        return;
    }
}

void *cuda_backend_stream(void) { return cb.open ? static_cast<void *>(cb.stream) : NULL; }

int cuda_backend_sync(char *err, size_t errlen) {
    if (!cb.open) return err_set(err, errlen, "no CUDA backend is open on this thread");
    cb_cuda_ok("stream", cudaStreamSynchronize(cb.stream));
    if (!cb.failed) return 0;
    err_set(err, errlen, "%s", cb.err);
    cb.failed = false;
    cb.err[0] = '\0';
    return -1;
}

/* Fills low (n, low precision, device) from host (n floats) chunk by chunk
 * through stage (chunk floats, device). The stream orders each copy into
 * stage after the conversion that read its previous contents. Returns
 * whether everything ran (an error is recorded otherwise). */
static bool cb_stage_frozen(uint16_t *low, const float *host, size_t n, float *stage,
                            size_t chunk) {
    for (size_t off = 0; off < n; off += chunk) {
        size_t m = n - off < chunk ? n - off : chunk;
        if (!cb_cuda_ok("upload_frozen", cudaMemcpyAsync(stage, host + off, m * sizeof(float),
                                                         cudaMemcpyHostToDevice, cb.stream)))
            return false;
        if (!cb_convert("upload_frozen", low + off, stage, m)) return false;
    }
    return cb_cuda_ok("upload_frozen", cudaStreamSynchronize(cb.stream));
}

int cuda_backend_upload_frozen(const float *host, size_t n, const float **key, char *err,
                               size_t errlen) {
    *key = NULL;
    if (!cb.open) return err_set(err, errlen, "no CUDA backend is open on this thread");
    if (cb.failed) return err_set(err, errlen, "an earlier GPU operation failed: %s", cb.err);
    if (cb.precision == CUDA_FP32)
        return err_set(err, errlen, "frozen weights need bf16 or fp16 products; this context "
                                      "computes in fp32");
    if (!host || n == 0) return err_set(err, errlen, "no weights to upload");
    if (n > SIZE_MAX / sizeof(float))
        return err_set(err, errlen, "%zu weights do not fit in the address space", n);
    if (cb_reserve_weight(err, errlen) != 0) return -1;
    size_t map_bytes = n * sizeof(float);
    /* PROT_NONE and MAP_NORESERVE: no memory, no commit charge, and any
     * dereference faults. */
    void *range = mmap(NULL, map_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
    if (range == MAP_FAILED)
        return err_set(err, errlen, "cannot reserve %zu bytes of address space for frozen "
                                      "weights: %s", map_bytes, strerror(errno));
    void *low = NULL, *stage = NULL;
    size_t chunk = n < CB_FROZEN_CHUNK ? n : CB_FROZEN_CHUNK;
    if (cudaMalloc(&low, n * sizeof(uint16_t)) != cudaSuccess) {
        (void)cudaGetLastError();
        err_set(err, errlen, "out of GPU memory for %zu frozen %s weights", n,
                  cuda_precision_name(cb.precision));
        goto fail;
    }
    if (cudaMalloc(&stage, chunk * sizeof(float)) != cudaSuccess) {
        (void)cudaGetLastError();
        err_set(err, errlen, "out of GPU memory for %zu bytes of staging for frozen weights",
                  chunk * sizeof(float));
        goto fail;
    }
    if (!cb_stage_frozen(static_cast<uint16_t *>(low), host, n, static_cast<float *>(stage),
                         chunk)) {
        err_set(err, errlen, "%s", cb.err);
        goto fail;
    }
    cudaFree(stage);
    cb.weights[cb.nweights++] = {static_cast<const float *>(range), n,
                                 static_cast<uint16_t *>(low), true, map_bytes};
    *key = static_cast<const float *>(range);
    return 0;
fail:
    /* The stream may still hold the copies: they must finish before the
     * memory goes. */
    cudaStreamSynchronize(cb.stream);
    (void)cudaGetLastError();
    if (stage) cudaFree(stage);
    if (low) cudaFree(low);
    munmap(range, map_bytes);
    return -1;
}

void cuda_backend_free_frozen(const float *key) {
    if (!cb.open || !key) return;
    for (size_t i = 0; i < cb.nweights; i++) {
        cb_weight *r = &cb.weights[i];
        if (!r->frozen || r->w != key) continue;
        /* Queued products may still read the copy. */
        cudaStreamSynchronize(cb.stream);
        cudaFree(r->low);
        munmap(const_cast<float *>(r->w), r->map_bytes);
        cb.weights[i] = cb.weights[--cb.nweights];
        return;
    }
}

bool cuda_backend_low_precision(void) { return cb.open && cb.precision != CUDA_FP32; }
