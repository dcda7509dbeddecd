/* cpu.c - the CPU backend (see backend.h). Every op is split over a small
 * persistent thread pool (one per process, as many threads as OpenBLAS uses,
 * started on first use): matmul by output columns, attention by (sequence,
 * head) pairs, the row-wise and elementwise ops by rows or chunks. Each
 * thread's share of a product is one single-threaded OpenBLAS sgemm
 * (OpenBLAS is held to one thread during the section), so OpenBLAS's own
 * threads never run, and never spin on the cores while the pool works; the
 * pool's threads sleep between sections. */
#include "worker/engine/backend.h"

#include "common/util.h"

#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
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

static void cpu_zero(float *x, size_t n) {
    if (n) memset(x, 0, n * sizeof *x);
}

static void cpu_scale(float *x, size_t n, float a) {
    for (size_t i = 0; i < n; i++) x[i] *= a;
}

static void cpu_copy_floats(float *dst, const float *src, size_t n) {
    if (n) memcpy(dst, src, n * sizeof *dst);
}

/* --- the thread pool ------------------------------------------------------ */

#define CPU_MAX_THREADS 64

/* Runs task number task (0 <= task < ntasks) as participant worker
 * (0 = the calling thread, 1.. = the pool's threads). */
typedef void (*cpu_task_fn)(void *ctx, size_t task, int worker);

/* One process-wide pool. A parallel section publishes fn/ctx/ntasks under mu
 * and bumps gen; every participant then claims tasks from next until none
 * are left, and the caller waits until no helper is still inside. run_lock
 * lets one section at a time use the pool; a concurrent caller runs its
 * tasks alone instead of waiting. */
static struct {
    pthread_once_t once;
    pthread_mutex_t run_lock;
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    int nthreads; /* participants, the caller included */
    unsigned long gen;
    int active; /* helpers not yet done with section gen */
    cpu_task_fn fn;
    void *ctx;
    size_t ntasks;
    atomic_size_t next;
} cpu_pool = {.once = PTHREAD_ONCE_INIT,
              .run_lock = PTHREAD_MUTEX_INITIALIZER,
              .mu = PTHREAD_MUTEX_INITIALIZER,
              .wake = PTHREAD_COND_INITIALIZER,
              .done = PTHREAD_COND_INITIALIZER,
              .nthreads = 1};

/* Claims and runs the current section's tasks until none are left. */
static void cpu_pool_drain(int worker) {
    for (;;) {
        size_t t = atomic_fetch_add_explicit(&cpu_pool.next, 1, memory_order_relaxed);
        if (t >= cpu_pool.ntasks) return;
        cpu_pool.fn(cpu_pool.ctx, t, worker);
    }
}

/* A helper: sleeps until a section starts, works on it, reports done. The
 * section's fields are read after observing gen under mu, and not changed
 * until every helper has reported, so they need no further locking. */
static void *cpu_pool_main(void *arg) {
    int worker = (int)(intptr_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&cpu_pool.mu);
    for (;;) {
        while (cpu_pool.gen == seen) pthread_cond_wait(&cpu_pool.wake, &cpu_pool.mu);
        seen = cpu_pool.gen;
        pthread_mutex_unlock(&cpu_pool.mu);
        cpu_pool_drain(worker);
        pthread_mutex_lock(&cpu_pool.mu);
        if (--cpu_pool.active == 0) pthread_cond_signal(&cpu_pool.done);
    }
    return NULL;
}

/* A forked child has none of the helpers: it runs every section alone. */
static void cpu_pool_forked(void) { cpu_pool.nthreads = 1; }

/* Starts as many helpers as OpenBLAS has threads, minus the caller. The
 * helpers block every signal, so the program's handlers run on its own
 * threads. If a thread cannot be started the pool is simply smaller (down
 * to the caller alone): the ops never fail. Helpers live until exit. */
static void cpu_pool_start(void) {
    int want = openblas_get_num_threads();
    if (want < 1) want = 1;
    if (want > CPU_MAX_THREADS) want = CPU_MAX_THREADS;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int n = 1;
    pthread_attr_t attr;
    if (want > 1 && pthread_attr_init(&attr) == 0) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        for (; n < want; n++) {
            pthread_t th;
            if (pthread_create(&th, &attr, cpu_pool_main, (void *)(intptr_t)n) != 0) break;
        }
        pthread_attr_destroy(&attr);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (n > 1 && pthread_atfork(NULL, NULL, cpu_pool_forked) != 0) {
        /* Helpers without the fork guard would hang a forked child's first
         * section; they stay asleep and the pool runs on the caller. */
        n = 1;
    }
    cpu_pool.nthreads = n;
}

/* Participants a parallel section may have: worker ids lie in [0, this). */
static int cpu_pool_threads(void) {
    pthread_once(&cpu_pool.once, cpu_pool_start);
    return cpu_pool.nthreads;
}

/* Runs fn for tasks 0..ntasks-1 on the pool and the calling thread, and
 * returns when all are done. Tasks must touch disjoint memory. Runs them all
 * on the caller (worker 0) when there is one task, one thread, or another
 * section already holds the pool. */
static void cpu_parallel(cpu_task_fn fn, void *ctx, size_t ntasks) {
    if (ntasks <= 1 || cpu_pool_threads() <= 1 || pthread_mutex_trylock(&cpu_pool.run_lock) != 0) {
        for (size_t t = 0; t < ntasks; t++) fn(ctx, t, 0);
        return;
    }
    pthread_mutex_lock(&cpu_pool.mu);
    cpu_pool.fn = fn;
    cpu_pool.ctx = ctx;
    cpu_pool.ntasks = ntasks;
    atomic_store_explicit(&cpu_pool.next, 0, memory_order_relaxed);
    cpu_pool.active = cpu_pool.nthreads - 1;
    cpu_pool.gen++;
    pthread_cond_broadcast(&cpu_pool.wake);
    pthread_mutex_unlock(&cpu_pool.mu);
    cpu_pool_drain(0);
    pthread_mutex_lock(&cpu_pool.mu);
    while (cpu_pool.active > 0) pthread_cond_wait(&cpu_pool.done, &cpu_pool.mu);
    pthread_mutex_unlock(&cpu_pool.mu);
    pthread_mutex_unlock(&cpu_pool.run_lock);
}

/* Elementwise work is split into chunks of this many floats (rows for the
 * row-wise ops are grouped to about this much): big enough that a task's
 * cost dwarfs claiming it, small enough to balance two to a few threads. */
#define CPU_CHUNK 16384

/* Chunks of at most CPU_CHUNK elements covering n (at least one). */
static size_t cpu_chunks(size_t n) { return n / CPU_CHUNK + 1; }

/* Rows per task so that a task covers about CPU_CHUNK floats of width. */
static size_t cpu_rows_per_task(size_t width) {
    return width >= CPU_CHUNK ? 1 : CPU_CHUNK / (width ? width : 1);
}

/* --- matrix products ------------------------------------------------------ */

/* Each thread's share of a matmul's output columns is rounded up to a
 * multiple of this, the widest sgemm register block, so no kernel runs on a
 * ragged edge except the last. One share per thread, not finer: every task
 * packs all of x, so more tasks would pack it more often (16 column tasks of
 * 128 measured 2.6x slower than 2 for the MLP projections). */
#define CPU_MATMUL_COLS 16

typedef struct {
    float *out;
    const float *x, *w;
    size_t N, in_dim, out_dim, cols;
    float beta;
} cpu_matmul_ctx;

/* Columns [task*cols, ...) of out: out[:, o0:o1] (op)= x W[o0:o1, :]^T, one
 * single-threaded sgemm; W's rows o0..o1 are contiguous, and out is written
 * with its full row stride. */
static void cpu_matmul_task(void *vctx, size_t task, int worker) {
    (void)worker;
    const cpu_matmul_ctx *c = vctx;
    size_t o0 = task * c->cols, o1 = o0 + c->cols < c->out_dim ? o0 + c->cols : c->out_dim;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c->N, (int)(o1 - o0),
                (int)c->in_dim, 1.0f, c->x, (int)c->in_dim, c->w + o0 * c->in_dim,
                (int)c->in_dim, c->beta, c->out + o0, (int)c->out_dim);
}

/* out = x W^T split by output columns over the pool, OpenBLAS held to one
 * thread meanwhile: the pool's threads do all the work and sleep between
 * sections, instead of OpenBLAS's threads spinning through the elementwise
 * ops that follow. The callers (forward.c) keep every dimension within int,
 * as cblas wants. */
static void cpu_matmul(float *out, const float *x, const float *w, size_t N, size_t in_dim,
                       size_t out_dim, bool accumulate) {
    if (N == 0 || out_dim == 0) return;
    size_t workers = (size_t)cpu_pool_threads();
    size_t cols = (out_dim + workers - 1) / workers;
    cols = (cols + CPU_MATMUL_COLS - 1) / CPU_MATMUL_COLS * CPU_MATMUL_COLS;
    cpu_matmul_ctx c = {out, x, w, N, in_dim, out_dim, cols, accumulate ? 1.0f : 0.0f};
    size_t tasks = (out_dim + c.cols - 1) / c.cols;
    int blas_threads = openblas_get_num_threads();
    if (blas_threads > 1) openblas_set_num_threads(1);
    cpu_parallel(cpu_matmul_task, &c, tasks);
    if (blas_threads > 1) openblas_set_num_threads(blas_threads);
}

typedef struct {
    float *dx, *dw;
    const float *dy, *x, *w;
    size_t N, in_dim, out_dim, cols;
    float beta;
} cpu_matmul_bwd_ctx;

/* Columns [task*cols, ...) of dx: dx[:, i0:i1] (op)= dy W[:, i0:i1]. */
static void cpu_matmul_dx_task(void *vctx, size_t task, int worker) {
    (void)worker;
    const cpu_matmul_bwd_ctx *c = vctx;
    size_t i0 = task * c->cols, i1 = i0 + c->cols < c->in_dim ? i0 + c->cols : c->in_dim;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)c->N, (int)(i1 - i0),
                (int)c->out_dim, 1.0f, c->dy, (int)c->out_dim, c->w + i0, (int)c->in_dim,
                c->beta, c->dx + i0, (int)c->in_dim);
}

/* Rows [task*cols, ...) of dW: dW[o0:o1, :] += dy[:, o0:o1]^T x. */
static void cpu_matmul_dw_task(void *vctx, size_t task, int worker) {
    (void)worker;
    const cpu_matmul_bwd_ctx *c = vctx;
    size_t o0 = task * c->cols, o1 = o0 + c->cols < c->out_dim ? o0 + c->cols : c->out_dim;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)(o1 - o0), (int)c->in_dim,
                (int)c->N, 1.0f, c->dy + o0, (int)c->out_dim, c->x, (int)c->in_dim, 1.0f,
                c->dw + o0 * c->in_dim, (int)c->in_dim);
}

/* Share of n columns per worker, rounded up to the sgemm register block. */
static size_t cpu_matmul_share(size_t n) {
    size_t workers = (size_t)cpu_pool_threads();
    size_t cols = (n + workers - 1) / workers;
    return (cols + CPU_MATMUL_COLS - 1) / CPU_MATMUL_COLS * CPU_MATMUL_COLS;
}

/* Two sections, each one sgemm per thread on disjoint outputs: dx split by
 * input columns, dW by output rows (contiguous in W's layout), so neither
 * needs a reduction across threads. */
static void cpu_matmul_backward(float *dx, float *dw, const float *dy, const float *x,
                                const float *w, size_t N, size_t in_dim, size_t out_dim,
                                bool accumulate_dx) {
    if (N == 0 || out_dim == 0 || in_dim == 0) return;
    cpu_matmul_bwd_ctx c = {dx, dw, dy, x, w, N, in_dim, out_dim, 0, accumulate_dx ? 1.0f : 0.0f};
    int blas_threads = openblas_get_num_threads();
    if (blas_threads > 1) openblas_set_num_threads(1);
    if (dx) {
        c.cols = cpu_matmul_share(in_dim);
        cpu_parallel(cpu_matmul_dx_task, &c, (in_dim + c.cols - 1) / c.cols);
    }
    if (dw) {
        c.cols = cpu_matmul_share(out_dim);
        cpu_parallel(cpu_matmul_dw_task, &c, (out_dim + c.cols - 1) / c.cols);
    }
    if (blas_threads > 1) openblas_set_num_threads(blas_threads);
}

/* --- exp --------------------------------------------------------------- */

/* Four floats in an SSE register; GCC's vector extension, so the loops
 * below run four lanes at a time on any x86-64 without -march flags. */
typedef float cpu_v4f __attribute__((vector_size(16)));
typedef int32_t cpu_v4i __attribute__((vector_size(16)));

/* exp(x) for x in [-87.3, 88.3] (inputs outside are clamped: below, the
 * result is ~1e-38 instead of smaller; above, ~2e38 instead of larger, which
 * neither softmax, whose inputs are <= 0, nor silu can tell apart). x =
 * k ln2 + r with k = round(x / ln2) and ln2 split in two parts (Cody and
 * Waite), so |r| <= ln2/2 exactly enough; e^r by its degree-7 Taylor
 * polynomial (truncation below 6e-9 relative); 2^k built in the exponent
 * bits. Measured against double exp on about 2 million points of
 * [-87, 88]: at most 9.9e-8 relative (about one ulp), far inside the ops'
 * 1e-5 tolerance against PyTorch.
 * cpu_exp4 and cpu_exp1 are the same arithmetic, lane-wise and scalar, so
 * a row's value does not depend on whether it falls in the vector body or
 * the tail. */
#define CPU_EXP_LO (-87.3f)
#define CPU_EXP_HI 88.3f
#define CPU_LOG2E 1.44269504088896341f
#define CPU_LN2_HI 0.693145751953125f
#define CPU_LN2_LO 1.42860682030941723212e-6f
#define CPU_ROUND_MAGIC 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer */

/* Lane-wise mask ? a : b, mask lanes all ones or all zeros (what vector
 * comparisons give). */
static inline cpu_v4f cpu_v4_select(cpu_v4i mask, cpu_v4f a, cpu_v4f b) {
    cpu_v4i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    cpu_v4i r = (mask & ai) | (~mask & bi);
    cpu_v4f out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline cpu_v4f cpu_exp4(cpu_v4f x) {
    const cpu_v4f lo = {CPU_EXP_LO, CPU_EXP_LO, CPU_EXP_LO, CPU_EXP_LO};
    const cpu_v4f hi = {CPU_EXP_HI, CPU_EXP_HI, CPU_EXP_HI, CPU_EXP_HI};
    x = cpu_v4_select(x < lo, lo, x);
    x = cpu_v4_select(x > hi, hi, x);
    cpu_v4f kf = (x * CPU_LOG2E + CPU_ROUND_MAGIC) - CPU_ROUND_MAGIC;
    cpu_v4f r = (x - kf * CPU_LN2_HI) - kf * CPU_LN2_LO;
    cpu_v4f p = {1.0f / 5040.0f, 1.0f / 5040.0f, 1.0f / 5040.0f, 1.0f / 5040.0f};
    p = 1.0f / 720.0f + r * p;
    p = 1.0f / 120.0f + r * p;
    p = 1.0f / 24.0f + r * p;
    p = 1.0f / 6.0f + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r * p;
    p = 1.0f + r * p;
    cpu_v4i bits = (__builtin_convertvector(kf, cpu_v4i) + 127) << 23;
    cpu_v4f scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float cpu_exp1(float x) {
    x = x < CPU_EXP_LO ? CPU_EXP_LO : x;
    x = x > CPU_EXP_HI ? CPU_EXP_HI : x;
    float kf = (x * CPU_LOG2E + CPU_ROUND_MAGIC) - CPU_ROUND_MAGIC;
    float r = (x - kf * CPU_LN2_HI) - kf * CPU_LN2_LO;
    float p = 1.0f / 5040.0f;
    p = 1.0f / 720.0f + r * p;
    p = 1.0f / 120.0f + r * p;
    p = 1.0f / 24.0f + r * p;
    p = 1.0f / 6.0f + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r * p;
    p = 1.0f + r * p;
    int32_t bits = ((int32_t)kf + 127) * (1 << 23);
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The same exp sixteen lanes at a time, for CPUs with AVX-512F: the
 * functions below carry the target attribute and are called only after
 * cpu_avx512 says the CPU has it, so the build needs no -march flag. The
 * arithmetic is cpu_exp4's operation for operation (no contraction into
 * FMA: the build is ISO C, -ffp-contract=off), so every lane gives the
 * same bits as the four-lane and scalar versions. */
typedef float cpu_v16f __attribute__((vector_size(64)));
typedef int32_t cpu_v16i __attribute__((vector_size(64)));

static bool cpu_avx512(void) { return __builtin_cpu_supports("avx512f"); }

__attribute__((target("avx512f"))) static inline cpu_v16f cpu_exp16(cpu_v16f x) {
    const cpu_v16f zero = {0};
    cpu_v16f lo = zero + CPU_EXP_LO, hi = zero + CPU_EXP_HI;
    cpu_v16i m = x < lo, xi, li, hi_i;
    memcpy(&xi, &x, sizeof xi);
    memcpy(&li, &lo, sizeof li);
    xi = (m & li) | (~m & xi);
    memcpy(&x, &xi, sizeof x);
    m = x > hi;
    memcpy(&hi_i, &hi, sizeof hi_i);
    xi = (m & hi_i) | (~m & xi);
    memcpy(&x, &xi, sizeof x);
    cpu_v16f kf = (x * CPU_LOG2E + CPU_ROUND_MAGIC) - CPU_ROUND_MAGIC;
    cpu_v16f r = (x - kf * CPU_LN2_HI) - kf * CPU_LN2_LO;
    cpu_v16f p = zero + 1.0f / 5040.0f;
    p = 1.0f / 720.0f + r * p;
    p = 1.0f / 120.0f + r * p;
    p = 1.0f / 24.0f + r * p;
    p = 1.0f / 6.0f + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r * p;
    p = 1.0f + r * p;
    cpu_v16i bits = (__builtin_convertvector(kf, cpu_v16i) + 127) << 23;
    cpu_v16f scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* row[j] = exp(row[j] - sub) for the first n / 16 * 16 elements; returns
 * how many it did. */
__attribute__((target("avx512f"))) static int cpu_exp_sub16(float *row, int n, float sub) {
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        cpu_v16f v;
        memcpy(&v, row + j, sizeof v);
        v = cpu_exp16(v - sub);
        memcpy(row + j, &v, sizeof v);
    }
    return j;
}

/* gate[i] = silu(gate[i]) * up[i] for the first n / 16 * 16 elements;
 * returns how many it did. */
__attribute__((target("avx512f"))) static size_t cpu_silu_mul16(float *gate, const float *up,
                                                                 size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        cpu_v16f g, u;
        memcpy(&g, gate + i, sizeof g);
        memcpy(&u, up + i, sizeof u);
        g = g / (1.0f + cpu_exp16(-g)) * u;
        memcpy(gate + i, &g, sizeof g);
    }
    return i;
}

/* --- row-wise and elementwise ops ---------------------------------------- */

typedef struct {
    float *out;
    const float *x, *weight;
    size_t N, C, rows;
    float eps;
} cpu_rmsnorm_ctx;

/* Rows [task*rows, ...) of rmsnorm. The sum of squares is in double over
 * four interleaved accumulators (independent adds, not one long chain). */
static void cpu_rmsnorm_task(void *vctx, size_t task, int worker) {
    (void)worker;
    const cpu_rmsnorm_ctx *c = vctx;
    size_t C = c->C, end = (task + 1) * c->rows;
    if (end > c->N) end = c->N;
    for (size_t n = task * c->rows; n < end; n++) {
        const float *xr = c->x + n * C;
        float *outr = c->out + n * C;
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
        size_t i = 0;
        for (; i + 4 <= C; i += 4) {
            s0 += (double)xr[i] * xr[i];
            s1 += (double)xr[i + 1] * xr[i + 1];
            s2 += (double)xr[i + 2] * xr[i + 2];
            s3 += (double)xr[i + 3] * xr[i + 3];
        }
        for (; i < C; i++) s0 += (double)xr[i] * xr[i];
        /* Hugging Face rounds the mean to fp32 before adding eps. */
        float mean = (float)((s0 + s1 + s2 + s3) / (double)C);
        float scale = 1.0f / sqrtf(mean + c->eps);
        for (i = 0; i < C; i++) outr[i] = c->weight[i] * (xr[i] * scale);
    }
}

static void cpu_rmsnorm(float *out, const float *x, const float *weight, size_t N, size_t C,
                        float eps) {
    cpu_rmsnorm_ctx c = {out, x, weight, N, C, cpu_rows_per_task(C), eps};
    cpu_parallel(cpu_rmsnorm_task, &c, (N + c.rows - 1) / c.rows);
}

/* 1/sqrt(mean(x^2) + eps) of one row, rounded exactly as cpu_rmsnorm_task
 * rounds it (so the backward differentiates the forward that ran). */
static float cpu_rms_scale(const float *xr, size_t C, float eps) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    size_t i = 0;
    for (; i + 4 <= C; i += 4) {
        s0 += (double)xr[i] * xr[i];
        s1 += (double)xr[i + 1] * xr[i + 1];
        s2 += (double)xr[i + 2] * xr[i + 2];
        s3 += (double)xr[i + 3] * xr[i + 3];
    }
    for (; i < C; i++) s0 += (double)xr[i] * xr[i];
    float mean = (float)((s0 + s1 + s2 + s3) / (double)C);
    return 1.0f / sqrtf(mean + eps);
}

typedef struct {
    float *dx;
    const float *dout, *x, *weight;
    size_t N, C, rows;
    float eps;
} cpu_rmsnorm_bwd_ctx;

/* Rows [task*rows, ...) of dx. With g = weight * dout and r the row's
 * scale, y = g-weighted x r, so dx_j = r g_j - r^3 x_j (sum_i g_i x_i) / C
 * (the second term through r's dependence on every x_i). */
static void cpu_rmsnorm_bwd_task(void *vctx, size_t task, int worker) {
    (void)worker;
    const cpu_rmsnorm_bwd_ctx *c = vctx;
    size_t C = c->C, end = (task + 1) * c->rows;
    if (end > c->N) end = c->N;
    for (size_t n = task * c->rows; n < end; n++) {
        const float *xr = c->x + n * C, *dy = c->dout + n * C;
        float *dxr = c->dx + n * C;
        float r = cpu_rms_scale(xr, C, c->eps);
        double dot = 0.0;
        for (size_t i = 0; i < C; i++) dot += (double)c->weight[i] * dy[i] * xr[i];
        float coef = (float)((double)r * r * r * dot / (double)C);
        for (size_t i = 0; i < C; i++) dxr[i] += r * (c->weight[i] * dy[i]) - coef * xr[i];
    }
}

/* dx over the pool by rows; dweight, a sum over every row, on the caller
 * alone (N x C multiply-adds, small beside the projections around it, and
 * the same order every run). */
static void cpu_rmsnorm_backward(float *dx, float *dweight, const float *dout, const float *x,
                                 const float *weight, size_t N, size_t C, float eps) {
    if (dx) {
        cpu_rmsnorm_bwd_ctx c = {dx, dout, x, weight, N, C, cpu_rows_per_task(C), eps};
        cpu_parallel(cpu_rmsnorm_bwd_task, &c, (N + c.rows - 1) / c.rows);
    }
    if (dweight) {
        for (size_t n = 0; n < N; n++) {
            const float *xr = x + n * C, *dy = dout + n * C;
            float r = cpu_rms_scale(xr, C, eps);
            for (size_t i = 0; i < C; i++) dweight[i] += dy[i] * (xr[i] * r);
        }
    }
}

/* cs (npos, HS/2, 2) = cos, sin of pos * inv_freq_i, each inverse frequency
 * rounded exactly as Hugging Face does: fp32 exponent 2i/HS, fp32 power,
 * fp32 reciprocal, fp32 angle pos * inv_freq. */
static void cpu_rope_table(float *cs, int npos, int HS, float theta) {
    int half = HS / 2;
    for (int i = 0; i < half; i++) {
        float exponent = (float)(2 * i) / (float)HS;
        float inv_freq = 1.0f / powf(theta, exponent);
        for (int p = 0; p < npos; p++) {
            float angle = (float)p * inv_freq;
            float *e = cs + ((size_t)p * (size_t)half + (size_t)i) * 2;
            e[0] = cosf(angle);
            e[1] = sinf(angle);
        }
    }
}

typedef struct {
    float *x;
    const int *pos;
    const float *cs;
    size_t N, rows;
    int nheads, HS;
    bool inverse;
} cpu_rope_ctx;

/* Rows [task*rows, ...) of rope, angles from the table; inverse rotates by
 * -angle (the backward). */
static void cpu_rope_task(void *vctx, size_t task, int worker) {
    (void)worker;
    const cpu_rope_ctx *c = vctx;
    int half = c->HS / 2;
    size_t stride = (size_t)c->nheads * (size_t)c->HS, end = (task + 1) * c->rows;
    if (end > c->N) end = c->N;
    for (size_t n = task * c->rows; n < end; n++) {
        const float *cs = c->cs + (size_t)c->pos[n] * (size_t)half * 2;
        float *row = c->x + n * stride;
        for (int h = 0; h < c->nheads; h++) {
            float *head = row + (size_t)h * (size_t)c->HS;
            for (int i = 0; i < half; i++) {
                float co = cs[2 * i], si = c->inverse ? -cs[2 * i + 1] : cs[2 * i + 1];
                float a = head[i], b = head[i + half];
                head[i] = a * co - b * si;
                head[i + half] = b * co + a * si;
            }
        }
    }
}

static void cpu_rope_cached(float *x, const int *pos, size_t N, int nheads, int HS,
                            const float *cs) {
    cpu_rope_ctx c = {x, pos, cs, N, cpu_rows_per_task((size_t)nheads * (size_t)HS),
                      nheads, HS, false};
    cpu_parallel(cpu_rope_task, &c, (N + c.rows - 1) / c.rows);
}

static void cpu_rope_backward_cached(float *dx, const int *pos, size_t N, int nheads, int HS,
                                     const float *cs) {
    cpu_rope_ctx c = {dx, pos, cs, N, cpu_rows_per_task((size_t)nheads * (size_t)HS),
                      nheads, HS, true};
    cpu_parallel(cpu_rope_task, &c, (N + c.rows - 1) / c.rows);
}

/* rope without a caller's table: builds one for positions 0..max(pos) on
 * the heap and applies it; if that allocation fails, computes each angle
 * where it is used (the same fp32 values, slower). */
static void cpu_rope(float *x, const int *pos, size_t N, int nheads, int HS, float theta) {
    int npos = 1;
    for (size_t n = 0; n < N; n++)
        if (pos[n] >= npos) npos = pos[n] + 1;
    float *cs = malloc((size_t)npos * (size_t)HS * sizeof *cs);
    if (cs) {
        cpu_rope_table(cs, npos, HS, theta);
        cpu_rope_cached(x, pos, N, nheads, HS, cs);
        free(cs);
        return;
    }
    int half = HS / 2;
    size_t stride = (size_t)nheads * (size_t)HS;
    for (int i = 0; i < half; i++) {
        float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)HS);
        for (size_t n = 0; n < N; n++) {
            float angle = (float)pos[n] * inv_freq;
            float co = cosf(angle), si = sinf(angle);
            for (int h = 0; h < nheads; h++) {
                float *head = x + n * stride + (size_t)h * (size_t)HS;
                float a = head[i], b = head[i + half];
                head[i] = a * co - b * si;
                head[i + half] = b * co + a * si;
            }
        }
    }
}

/* Softmax of row[0..live) in place, row[live..width) set to zero. The exps
 * run four lanes at a time; the sum is in double (four accumulators). */
static void cpu_softmax_row(float *row, int live, int width) {
    float max = row[0];
    for (int j = 1; j < live; j++)
        if (row[j] > max) max = row[j];
    int j = cpu_avx512() ? cpu_exp_sub16(row, live, max) : 0;
    for (; j + 4 <= live; j += 4) {
        cpu_v4f v;
        memcpy(&v, row + j, sizeof v);
        v = cpu_exp4(v - max);
        memcpy(row + j, &v, sizeof v);
    }
    for (; j < live; j++) row[j] = cpu_exp1(row[j] - max);
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    for (j = 0; j + 4 <= live; j += 4) {
        s0 += row[j];
        s1 += row[j + 1];
        s2 += row[j + 2];
        s3 += row[j + 3];
    }
    for (; j < live; j++) s0 += row[j];
    float inv = (float)(1.0 / (s0 + s1 + s2 + s3));
    for (j = 0; j < live; j++) row[j] *= inv;
    for (j = live; j < width; j++) row[j] = 0.0f;
}

/* Query rows per attention block: the causal triangle is cut at block
 * granularity, so smaller blocks waste less of the upper triangle but make
 * smaller GEMMs. */
#define CPU_ATTN_BLOCK 64

typedef struct {
    float *out;
    const float *q, *k, *v;
    const int *lengths;
    int T, NH, NKV, HS, qb;
    float scale;
    float *scratch; /* qb * T floats per worker */
} cpu_attn_ctx;

/* One (sequence, head) pair. For each block of qb query rows starting at t0,
 * only keys 0..min(t0 + rows, len) can be live for any of its rows (causal,
 * and keys past the length are masked), so the scores are a rows x kend
 * product, scaled by 1/sqrt(HS) inside the sgemm; masked softmax per row;
 * then P V into the head's columns of out. Keys past len are never read,
 * so what sits in the padding cannot reach any row. */
static void cpu_attention_task(void *vctx, size_t task, int worker) {
    const cpu_attn_ctx *c = vctx;
    int b = (int)(task / (size_t)c->NH), h = (int)(task % (size_t)c->NH);
    int T = c->T, HS = c->HS, len = c->lengths[b];
    int qstride = c->NH * HS, kvstride = c->NKV * HS, group = c->NH / c->NKV;
    float *sc = c->scratch + (size_t)worker * (size_t)c->qb * (size_t)T;
    size_t qbase = (size_t)b * (size_t)T * (size_t)qstride + (size_t)h * (size_t)HS;
    size_t kvoff = (size_t)b * (size_t)T * (size_t)kvstride + (size_t)(h / group) * (size_t)HS;
    for (int t0 = 0; t0 < T; t0 += c->qb) {
        int rows = T - t0 < c->qb ? T - t0 : c->qb;
        int kend = t0 + rows < len ? t0 + rows : len;
        const float *qblk = c->q + qbase + (size_t)t0 * (size_t)qstride;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, kend, HS, c->scale, qblk,
                    qstride, c->k + kvoff, kvstride, 0.0f, sc, kend);
        for (int r = 0; r < rows; r++) {
            int t = t0 + r;
            int live = t < len ? t + 1 : len;
            cpu_softmax_row(sc + (size_t)r * (size_t)kend, live, kend);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, HS, kend, 1.0f, sc, kend,
                    c->v + kvoff, kvstride, 0.0f, c->out + qbase + (size_t)t0 * (size_t)qstride,
                    qstride);
    }
}

/* (sequence, head) pairs split over the pool, each worker with its own
 * slice of scratch; OpenBLAS is held to one thread meanwhile, so the small
 * per-block GEMMs run in the thread that asked and the pool's threads are
 * the only ones working. With fewer rows than workers (T < threads) the
 * scratch cannot be sliced and the pairs run on the caller alone. */
static void cpu_attention(float *out, const float *q, const float *k, const float *v,
                          const int *lengths, int B, int T, int NH, int NKV, int HS,
                          float *scratch) {
    size_t pairs = (size_t)B * (size_t)NH;
    int workers = cpu_pool_threads();
    if (workers > T) workers = 1;
    int qb = T / workers < CPU_ATTN_BLOCK ? T / workers : CPU_ATTN_BLOCK;
    cpu_attn_ctx c = {out, q, k, v, lengths, T, NH, NKV, HS, qb, 1.0f / sqrtf((float)HS),
                      scratch};
    int blas_threads = openblas_get_num_threads();
    if (blas_threads > 1) openblas_set_num_threads(1);
    if (workers > 1)
        cpu_parallel(cpu_attention_task, &c, pairs);
    else
        for (size_t t = 0; t < pairs; t++) cpu_attention_task(&c, t, 0);
    if (blas_threads > 1) openblas_set_num_threads(blas_threads);
}

typedef struct {
    float *dq, *dk, *dv;
    const float *dout, *q, *k, *v;
    const int *lengths;
    int T, NH, NKV, HS, qb;
    float scale;
    float *scratch; /* 2 * qb * T floats per worker */
} cpu_attn_bwd_ctx;

/* One (sequence, key-value head) pair: every query head of the group, so
 * the pair's dk and dv are written by this task alone. For each block of qb
 * query rows below the length: P = softmax(scale Q K^T) recomputed as the
 * forward computes it, then dV += P^T dO, dP = dO V^T,
 * dS = P * (dP - rowsum(P * dP)), dQ += scale dS K, dK += scale dS^T Q. */
static void cpu_attention_bwd_task(void *vctx, size_t task, int worker) {
    const cpu_attn_bwd_ctx *c = vctx;
    int b = (int)(task / (size_t)c->NKV), g = (int)(task % (size_t)c->NKV);
    int T = c->T, HS = c->HS, len = c->lengths[b];
    int qstride = c->NH * HS, kvstride = c->NKV * HS, group = c->NH / c->NKV;
    float *p = c->scratch + (size_t)worker * 2 * (size_t)c->qb * (size_t)T;
    float *dp = p + (size_t)c->qb * (size_t)T;
    size_t kvoff = (size_t)b * (size_t)T * (size_t)kvstride + (size_t)g * (size_t)HS;
    for (int h = g * group; h < (g + 1) * group; h++) {
        size_t qbase = (size_t)b * (size_t)T * (size_t)qstride + (size_t)h * (size_t)HS;
        for (int t0 = 0; t0 < len; t0 += c->qb) {
            int rows = len - t0 < c->qb ? len - t0 : c->qb;
            int kend = t0 + rows;
            size_t qoff = qbase + (size_t)t0 * (size_t)qstride;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, kend, HS, c->scale,
                        c->q + qoff, qstride, c->k + kvoff, kvstride, 0.0f, p, kend);
            for (int r = 0; r < rows; r++)
                cpu_softmax_row(p + (size_t)r * (size_t)kend, t0 + r + 1, kend);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kend, HS, rows, 1.0f, p, kend,
                        c->dout + qoff, qstride, 1.0f, c->dv + kvoff, kvstride);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, kend, HS, 1.0f,
                        c->dout + qoff, qstride, c->v + kvoff, kvstride, 0.0f, dp, kend);
            for (int r = 0; r < rows; r++) {
                float *pr = p + (size_t)r * (size_t)kend, *dpr = dp + (size_t)r * (size_t)kend;
                int live = t0 + r + 1;
                double dot = 0.0;
                for (int j = 0; j < live; j++) dot += (double)pr[j] * dpr[j];
                float fdot = (float)dot;
                /* Masked keys have p = 0, so their dS is 0 too. */
                for (int j = 0; j < kend; j++) dpr[j] = pr[j] * (dpr[j] - fdot);
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, HS, kend, c->scale, dp,
                        kend, c->k + kvoff, kvstride, 1.0f, c->dq + qoff, qstride);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kend, HS, rows, c->scale, dp,
                        kend, c->q + qoff, qstride, 1.0f, c->dk + kvoff, kvstride);
        }
    }
}

/* (sequence, key-value head) pairs over the pool, each worker with its own
 * two blocks of scratch (probabilities and their gradient); OpenBLAS held
 * to one thread as in the forward. */
static void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                   const float *q, const float *k, const float *v,
                                   const int *lengths, int B, int T, int NH, int NKV, int HS,
                                   float *scratch) {
    size_t pairs = (size_t)B * (size_t)NKV;
    int workers = cpu_pool_threads();
    if (workers > T) workers = 1;
    int qb = T / workers < CPU_ATTN_BLOCK ? T / workers : CPU_ATTN_BLOCK;
    cpu_attn_bwd_ctx c = {dq, dk, dv, dout, q, k, v, lengths, T, NH, NKV, HS, qb,
                          1.0f / sqrtf((float)HS), scratch};
    int blas_threads = openblas_get_num_threads();
    if (blas_threads > 1) openblas_set_num_threads(1);
    if (workers > 1)
        cpu_parallel(cpu_attention_bwd_task, &c, pairs);
    else
        for (size_t t = 0; t < pairs; t++) cpu_attention_bwd_task(&c, t, 0);
    if (blas_threads > 1) openblas_set_num_threads(blas_threads);
}

typedef struct {
    float *gate;
    const float *up;
    size_t n;
} cpu_swiglu_ctx;

/* Chunk task of gate = silu(gate) * up, four lanes at a time. */
static void cpu_swiglu_task(void *vctx, size_t task, int worker) {
    (void)worker;
    const cpu_swiglu_ctx *c = vctx;
    size_t i = task * CPU_CHUNK, end = i + CPU_CHUNK < c->n ? i + CPU_CHUNK : c->n;
    if (cpu_avx512()) i += cpu_silu_mul16(c->gate + i, c->up + i, end - i);
    for (; i + 4 <= end; i += 4) {
        cpu_v4f g, u;
        memcpy(&g, c->gate + i, sizeof g);
        memcpy(&u, c->up + i, sizeof u);
        g = g / (1.0f + cpu_exp4(-g)) * u;
        memcpy(c->gate + i, &g, sizeof g);
    }
    for (; i < end; i++) {
        float g = c->gate[i];
        c->gate[i] = g / (1.0f + cpu_exp1(-g)) * c->up[i];
    }
}

static void cpu_swiglu(float *gate, const float *up, size_t n) {
    cpu_swiglu_ctx c = {gate, up, n};
    cpu_parallel(cpu_swiglu_task, &c, cpu_chunks(n));
}

typedef struct {
    float *dgate, *dup;
    const float *dout, *gate, *up;
    size_t n;
} cpu_swiglu_bwd_ctx;

/* Chunk task of the swiglu backward: with s = sigmoid(g), silu(g) = g s
 * and silu'(g) = s (1 + g (1 - s)). dout is read before dgate is written,
 * so they may alias. */
static void cpu_swiglu_bwd_task(void *vctx, size_t task, int worker) {
    (void)worker;
    const cpu_swiglu_bwd_ctx *c = vctx;
    size_t i = task * CPU_CHUNK, end = i + CPU_CHUNK < c->n ? i + CPU_CHUNK : c->n;
    for (; i < end; i++) {
        float g = c->gate[i], d = c->dout[i], u = c->up[i];
        float sg = 1.0f / (1.0f + cpu_exp1(-g));
        c->dup[i] = d * (g * sg);
        c->dgate[i] = d * u * (sg * (1.0f + g * (1.0f - sg)));
    }
}

static void cpu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                                const float *up, size_t n) {
    cpu_swiglu_bwd_ctx c = {dgate, dup, dout, gate, up, n};
    cpu_parallel(cpu_swiglu_bwd_task, &c, cpu_chunks(n));
}

static void cpu_embedding(float *out, const int *tokens, const float *table, size_t N, size_t C) {
    for (size_t n = 0; n < N; n++)
        memcpy(out + n * C, table + (size_t)tokens[n] * C, C * sizeof *out);
}

/* Serial: repeated tokens add into the same row. */
static void cpu_embedding_backward(float *dtable, const float *dout, const int *tokens, size_t N,
                                   size_t C) {
    for (size_t n = 0; n < N; n++) {
        float *row = dtable + (size_t)tokens[n] * C;
        const float *d = dout + n * C;
        for (size_t i = 0; i < C; i++) row[i] += d[i];
    }
}

typedef struct {
    float *logits;
    double *row_loss;
    const int *targets;
    size_t N, V, rows;
    float scale;
} cpu_xent_ctx;

/* Rows [task*rows, ...) of the fused cross-entropy: exps in place with the
 * softmax's vector exp, the sum in double, the loss from the logsumexp (not
 * from log p, which underflows for confident wrong predictions), then the
 * row scaled into the gradient. */
static void cpu_xent_task(void *vctx, size_t task, int worker) {
    (void)worker;
    const cpu_xent_ctx *c = vctx;
    size_t V = c->V, end = (task + 1) * c->rows;
    int iv = (int)V;
    if (end > c->N) end = c->N;
    for (size_t n = task * c->rows; n < end; n++) {
        float *row = c->logits + n * V;
        int target = c->targets[n];
        if (target < 0) {
            memset(row, 0, V * sizeof *row);
            c->row_loss[n] = 0.0;
            continue;
        }
        float zt = row[target], max = row[0];
        for (int j = 1; j < iv; j++)
            if (row[j] > max) max = row[j];
        int j = cpu_avx512() ? cpu_exp_sub16(row, iv, max) : 0;
        for (; j + 4 <= iv; j += 4) {
            cpu_v4f e;
            memcpy(&e, row + j, sizeof e);
            e = cpu_exp4(e - max);
            memcpy(row + j, &e, sizeof e);
        }
        for (; j < iv; j++) row[j] = cpu_exp1(row[j] - max);
        double sum = 0.0;
        for (j = 0; j < iv; j++) sum += row[j];
        c->row_loss[n] = log(sum) + (double)max - (double)zt;
        float mul = (float)((double)c->scale / sum);
        for (j = 0; j < iv; j++) row[j] *= mul;
        row[target] -= c->scale;
    }
}

static void cpu_cross_entropy(float *logits, double *row_loss, const int *targets, size_t N,
                              size_t V, float scale) {
    cpu_xent_ctx c = {logits, row_loss, targets, N, V, cpu_rows_per_task(V), scale};
    cpu_parallel(cpu_xent_task, &c, (N + c.rows - 1) / c.rows);
}

static void cpu_residual_add(float *x, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

typedef struct {
    float *out;
    const float *x;
    size_t n;
    uint64_t key, threshold;
    float scale;
    bool accumulate;
} cpu_dropout_ctx;

/* Chunk task of cpu_dropout. */
static void cpu_dropout_task(void *vctx, size_t task, int worker) {
    (void)worker;
    const cpu_dropout_ctx *c = vctx;
    size_t i = task * CPU_CHUNK, end = i + CPU_CHUNK < c->n ? i + CPU_CHUNK : c->n;
    for (; i < end; i++) {
        float v = backend_dropout_keep(c->key, (uint64_t)i, c->threshold) ? c->x[i] * c->scale
                                                                           : 0.0f;
        c->out[i] = c->accumulate ? c->out[i] + v : v;
    }
}

static void cpu_dropout(float *out, const float *x, size_t n, uint64_t key, uint64_t threshold,
                        float scale, bool accumulate) {
    cpu_dropout_ctx c = {out, x, n, key, threshold, scale, accumulate};
    cpu_parallel(cpu_dropout_task, &c, cpu_chunks(n));
}

static const backend cpu_backend = {
    .name = "cpu",
    .host_memory = true,
    .alloc = cpu_alloc,
    .free_buf = cpu_free_buf,
    .upload = cpu_copy,
    .download = cpu_copy,
    .zero = cpu_zero,
    .copy = cpu_copy_floats,
    .scale = cpu_scale,
    .matmul = cpu_matmul,
    .matmul_backward = cpu_matmul_backward,
    .rmsnorm = cpu_rmsnorm,
    .rmsnorm_backward = cpu_rmsnorm_backward,
    .rope = cpu_rope,
    .rope_table = cpu_rope_table,
    .rope_cached = cpu_rope_cached,
    .rope_backward_cached = cpu_rope_backward_cached,
    .attention = cpu_attention,
    .attention_backward = cpu_attention_backward,
    .swiglu = cpu_swiglu,
    .swiglu_backward = cpu_swiglu_backward,
    .embedding = cpu_embedding,
    .embedding_backward = cpu_embedding_backward,
    .cross_entropy = cpu_cross_entropy,
    .residual_add = cpu_residual_add,
    .dropout = cpu_dropout,
};

const backend *backend_cpu(void) { return &cpu_backend; }
