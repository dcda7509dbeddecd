/* test_cudaemu_emu.c - the CUDA emulator itself (tests/cuda_emu/), through
 * the kernels of tests/cuda_emu/selftest.cc: block reductions over shared
 * memory and __syncthreads, warp shuffles, atomics, 2-D/3-D grid indexing,
 * dynamic shared memory and its poison, threads that exit before a barrier,
 * bf16/fp16 conversions against numpy/torch (tests/fixtures/cuda_emu/), the
 * cudart subset, gemm_emu.c against naive products, the launches and
 * kernels that must abort (in a forked child, which must die of SIGABRT),
 * and the schedules (STRATA_EMU_SCHEDULE): the orders they run blocks and
 * threads in, and a racy kernel that forward passes and reverse and
 * shuffle catch. */
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/cuda_emu/half_bits.h"
#include "tests/cuda_emu/selftest.h"
#include "tests/unit/testutil.h"
#include "worker/engine/cuda/gemm.h"

/* Deterministic inputs in [-1, 1) (xorshift), so that failures reproduce. */
static void fill(float *x, size_t n, uint32_t seed)
{
    uint32_t s = seed * 2654435761u + 1u;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        x[i] = (float)((double)s / 2147483648.0 - 1.0);
    }
}

static void test_block_sum(void **state)
{
    (void)state;
    const unsigned blocks[] = {32, 256, 1024};
    const size_t sizes[] = {1, 31, 1000, 5000};
    char err[256];
    for (size_t b = 0; b < sizeof blocks / sizeof blocks[0]; b++)
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
            unsigned block = blocks[b];
            size_t n = sizes[k];
            size_t grid = (n + block - 1) / block;
            float *x = malloc(n * sizeof *x), *sums = malloc(grid * sizeof *sums);
            assert_non_null(x);
            assert_non_null(sums);
            fill(x, n, (uint32_t)(n + block));
            double total = -1;
            assert_int_equal(emu_st_block_sum(x, n, block, sums, &total, err, sizeof err), 0);
            double want_total = 0;
            for (size_t g = 0; g < grid; g++) {
                double want = 0;
                for (size_t i = g * block; i < n && i < (g + 1) * block; i++)
                    want += x[i];
                want_total += want;
                assert_true(fabs(sums[g] - want) <= 1e-4 * (1 + fabs(want)));
            }
            assert_true(fabs(total - want_total) <= 1e-4 * (1 + fabs(want_total)));
            free(x);
            free(sums);
        }
}

static void test_warp_shuffles(void **state)
{
    (void)state;
    enum { NT = 96 };
    float x[NT], xs[NT], ds[NT], d16[NT], sy[NT];
    int ix[NT];
    unsigned ud[NT];
    double dx[NT];
    char err[256];
    fill(x, NT, 7);
    /* Small integers: every summation order gives the same float. */
    for (int i = 0; i < NT; i++)
        x[i] = (float)(int)(x[i] * 100);
    assert_int_equal(emu_st_warp(x, NT, xs, ds, d16, ix, ud, dx, sy, err, sizeof err), 0);
    for (int w = 0; w < NT / 32; w++) {
        float sum = 0;
        for (int l = 0; l < 32; l++)
            sum += x[32 * w + l];
        for (int l = 0; l < 32; l++) {
            int t = 32 * w + l;
            assert_true(xs[t] == sum);
            /* the down tree: lane l holds the sum of lanes l.. of its
             * subtree, lanes past 31 contributing their own values again */
            if (l == 0)
                assert_true(ds[t] == sum);
            assert_true(d16[t] == (l < 16 ? x[t + 16] : x[t]));
            assert_int_equal(ix[t], 3 * (32 * w + (l ^ 5)));
            assert_int_equal(ud[t], 7u * (unsigned)(l < 31 ? t + 1 : t));
            assert_true(dx[t] == (double)x[32 * w + (l ^ 31)] * 1e10 + (32 * w + (l ^ 31)));
            assert_true(sy[t] == x[32 * w + (l + 1) % 32]);
        }
        /* lane 31 of the down tree: its own value plus itself at every
         * step (16, 8, 4, 2, 1 all fall outside the warp): 32 * x */
        assert_true(ds[32 * w + 31] == 32 * x[32 * w + 31]);
    }
}

static void test_grid_indices(void **state)
{
    (void)state;
    const unsigned shapes[][6] = {
        {3, 1, 1, 64, 1, 1}, {2, 3, 1, 8, 4, 1}, {2, 2, 3, 4, 2, 3}, {1, 1, 1, 1024, 1, 1},
        {5, 1, 2, 1, 1, 1},  {1, 2, 1, 2, 2, 64}};
    char err[256];
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const unsigned *d = shapes[s];
        size_t per_block = (size_t)d[3] * d[4] * d[5];
        size_t total = (size_t)d[0] * d[1] * d[2] * per_block;
        unsigned *count = malloc(total * sizeof *count);
        unsigned *idx = malloc(6 * total * sizeof *idx);
        unsigned wrong = 99;
        assert_non_null(count);
        assert_non_null(idx);
        assert_int_equal(emu_st_indices(d[0], d[1], d[2], d[3], d[4], d[5], count, idx, &wrong,
                                         err, sizeof err),
                         0);
        assert_int_equal(wrong, 0);
        for (size_t id = 0; id < total; id++) {
            size_t b = id / per_block, t = id % per_block;
            assert_int_equal(count[id], 1);
            assert_int_equal(idx[6 * id + 0], b % d[0]);
            assert_int_equal(idx[6 * id + 1], (b / d[0]) % d[1]);
            assert_int_equal(idx[6 * id + 2], b / ((size_t)d[0] * d[1]));
            assert_int_equal(idx[6 * id + 3], t % d[3]);
            assert_int_equal(idx[6 * id + 4], (t / d[3]) % d[4]);
            assert_int_equal(idx[6 * id + 5], t / ((size_t)d[3] * d[4]));
        }
        free(count);
        free(idx);
    }
}

static void test_dynamic_shared_memory(void **state)
{
    (void)state;
    enum { N = 200, BLOCK = 64 };
    float x[N], out[N], first[N];
    char err[256];
    fill(x, N, 3);
    assert_int_equal(emu_st_dyn_smem(x, N, BLOCK, out, first, err, sizeof err), 0);
    for (size_t i = 0; i < N; i++) {
        size_t b = i / BLOCK, t = i % BLOCK;
        size_t mirror = b * BLOCK + (BLOCK - 1 - t);
        assert_true(out[i] == (mirror < N ? x[mirror] : 0.0f));
        /* never written before this read: the poison, in every block */
        assert_true(isnan(first[i]));
    }
}

static void test_big_dynamic_shared_memory(void **state)
{
    (void)state;
    /* The opt-in is process-wide in the emulator: keep it out of this
     * process so the no-opt-in case below still aborts. */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        char err[256];
        double sum = 0;
        int rc = emu_st_big_smem(200 * 1024, &sum, err, sizeof err);
        _exit(rc == 0 && sum == 200.0 * 1024 / 4 ? 0 : 1);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

static void test_exited_threads_do_not_block_barriers(void **state)
{
    (void)state;
    float x[1024];
    char err[256];
    for (int i = 0; i < 1024; i++)
        x[i] = (float)(i % 13);
    const unsigned cases[][2] = {{64, 64}, {64, 1}, {256, 100}, {1024, 1000}, {33, 17}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        float want = 0, sum = -1;
        for (unsigned i = 0; i < cases[c][1]; i++)
            want += x[i];
        assert_int_equal(emu_st_partial_exit(x, cases[c][0], cases[c][1], &sum, err, sizeof err),
                         0);
        assert_true(sum == want);
    }
}

static bool f32_is_nan_bits16(uint16_t h, bool bf16)
{
    return bf16 ? ((h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0)
                : ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0);
}

static void test_half_conversions_match_numpy_and_torch(void **state)
{
    (void)state;
    char path[4096];
    npy_header hx, hf, hb;
    tu_fixture_path(path, sizeof path, "cuda_emu/x.npy");
    double *xd = tu_read_npy(path, &hx);
    tu_fixture_path(path, sizeof path, "cuda_emu/f16_bits.npy");
    double *f16 = tu_read_npy(path, &hf);
    tu_fixture_path(path, sizeof path, "cuda_emu/bf16_bits.npy");
    double *bf16 = tu_read_npy(path, &hb);
    size_t n = hx.rows * hx.cols;
    assert_int_equal(hf.rows * hf.cols, n);
    assert_int_equal(hb.rows * hb.cols, n);
    assert_true(n > 9000);
    float *x = malloc(n * sizeof *x), *bfb = malloc(n * sizeof *bfb), *hbk = malloc(n * sizeof *hbk);
    uint16_t *bf = malloc(n * sizeof *bf), *h = malloc(n * sizeof *h);
    assert_true(x && bfb && hbk && bf && h);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)xd[i];
    char err[256];
    assert_int_equal(emu_st_convert(x, n, bf, h, bfb, hbk, err, sizeof err), 0);
    size_t nans = 0, subnormals = 0, infs = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t want_h = (uint16_t)f16[i], want_b = (uint16_t)bf16[i];
        if (isnan(x[i])) {
            nans++;
            assert_true(f32_is_nan_bits16(h[i], false));
            assert_true(f32_is_nan_bits16(bf[i], true));
            assert_true(isnan(bfb[i]) && isnan(hbk[i]));
            continue;
        }
        if (h[i] != want_h || bf[i] != want_b)
            fail_msg("x[%zu] = %a: fp16 0x%04x (numpy 0x%04x), bf16 0x%04x (torch 0x%04x)", i,
                     (double)x[i], h[i], want_h, bf[i], want_b);
        if ((want_h & 0x7c00u) == 0 && (want_h & 0x3ffu) != 0)
            subnormals++;
        if ((want_h & 0x7fffu) == 0x7c00u)
            infs++;
        /* widening is exact: the same value numpy/torch give back */
        assert_true(hbk[i] == half_bits_f16_to_f32(want_h));
        assert_true(bfb[i] == half_bits_bf16_to_f32(want_b));
    }
    /* the fixture reaches the cases that matter */
    assert_true(nans > 10);
    assert_true(subnormals > 50);
    assert_true(infs > 100);
    /* widening against its definition for every fp16 pattern */
    for (uint32_t b = 0; b < 65536; b++) {
        uint16_t hbits = (uint16_t)b;
        float v = half_bits_f16_to_f32(hbits);
        int e = (b >> 10) & 31, m = b & 1023;
        double want = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
        if (b & 0x8000u)
            want = -want;
        if (e == 31)
            assert_true(m ? isnan(v) : isinf(v) && (v < 0) == ((b & 0x8000u) != 0));
        else
            assert_true((double)v == want);
        if (e != 31)
            assert_int_equal(half_bits_f16_from_f32(v), hbits); /* exact round trip */
    }
    free(x);
    free(bfb);
    free(hbk);
    free(bf);
    free(h);
    free(xd);
    free(f16);
    free(bf16);
}

static void test_cudart(void **state)
{
    (void)state;
    char what[256];
    int failed = emu_st_cudart(what, sizeof what);
    if (failed != 0)
        fail_msg("%d cudart checks failed, first: %s", failed, what);
}

/* C (M, N) = alpha op(A) op(B) + beta C in double from float operands. */
static void naive_gemm(bool ta, bool tb, size_t M, size_t N, size_t K, float alpha,
                       const float *A, size_t lda, const float *B, size_t ldb, float beta,
                       const float *C0, size_t ldc, double *out)
{
    for (size_t i = 0; i < M; i++)
        for (size_t j = 0; j < N; j++) {
            double acc = 0;
            for (size_t k = 0; k < K; k++) {
                double a = ta ? A[k * lda + i] : A[i * lda + k];
                double b = tb ? B[j * ldb + k] : B[k * ldb + j];
                acc += a * b;
            }
            out[i * N + j] = alpha * acc + (beta != 0 ? beta * (double)C0[i * ldc + j] : 0);
        }
}

static void test_gemm_emu(void **state)
{
    (void)state;
    char err[256];
    gemm_ctx *g = NULL;
    assert_int_equal(gemm_ctx_new(NULL, 1 << 20, &g, err, sizeof err), 0);
    assert_non_null(g);
    const size_t M = 7, N = 5, K = 9, pad = 3;
    for (int type = GEMM_F32; type <= GEMM_F16; type++)
        for (int t = 0; t < 4; t++) {
            bool ta = t & 1, tb = t & 2;
            size_t arows = ta ? K : M, acols = ta ? M : K, lda = acols + pad;
            size_t brows = tb ? N : K, bcols = tb ? K : N, ldb = bcols + pad, ldc = N + pad;
            float A[(9 + 3) * 9], B[(9 + 3) * 9], C[7 * 8], C0[7 * 8];
            uint16_t A16[sizeof A / sizeof A[0]], B16[sizeof B / sizeof B[0]];
            double want[7 * 5];
            fill(A, arows * lda, 11 + (uint32_t)t);
            fill(B, brows * ldb, 23 + (uint32_t)t);
            fill(C0, M * ldc, 5);
            /* operands as the library reads them: rounded to the type */
            for (size_t i = 0; i < arows * lda; i++) {
                A16[i] = type == GEMM_BF16 ? half_bits_bf16_from_f32(A[i])
                                           : half_bits_f16_from_f32(A[i]);
                if (type == GEMM_BF16)
                    A[i] = half_bits_bf16_to_f32(A16[i]);
                else if (type == GEMM_F16)
                    A[i] = half_bits_f16_to_f32(A16[i]);
            }
            for (size_t i = 0; i < brows * ldb; i++) {
                B16[i] = type == GEMM_BF16 ? half_bits_bf16_from_f32(B[i])
                                           : half_bits_f16_from_f32(B[i]);
                if (type == GEMM_BF16)
                    B[i] = half_bits_bf16_to_f32(B16[i]);
                else if (type == GEMM_F16)
                    B[i] = half_bits_f16_to_f32(B16[i]);
            }
            const void *pa = type == GEMM_F32 ? (const void *)A : (const void *)A16;
            const void *pb = type == GEMM_F32 ? (const void *)B : (const void *)B16;
            for (int beta_case = 0; beta_case < 2; beta_case++) {
                float beta = beta_case ? 0.5f : 0.0f;
                memcpy(C, C0, sizeof C);
                if (!beta_case)
                    for (size_t i = 0; i < M * ldc; i++)
                        C[i] = NAN; /* beta 0: C is output only */
                naive_gemm(ta, tb, M, N, K, 1.5f, A, lda, B, ldb, beta, C0, ldc, want);
                assert_int_equal(gemm_run(g, (gemm_type)type, ta, tb, M, N, K, 1.5f, pa, lda, pb,
                                          ldb, beta, C, ldc, err, sizeof err),
                                 0);
                for (size_t i = 0; i < M; i++)
                    for (size_t j = 0; j < N; j++)
                        assert_true(fabs(C[i * ldc + j] - want[i * N + j]) <= 1e-5);
            }
        }
    /* refusals */
    float a[4] = {0}, c[4] = {0};
    assert_int_equal(gemm_run(g, GEMM_F32, false, false, 2, 2, 2, 1, a, 1, a, 2, 0, c, 2, err,
                              sizeof err),
                     -1); /* lda < K */
    assert_int_equal(gemm_run(g, GEMM_F32, false, false, (size_t)1 << 31, 1, 1, 1, a, 1, a, 1,
                              0, c, 1, err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "int"));
    assert_int_equal(gemm_run(g, (gemm_type)9, false, false, 1, 1, 1, 1, a, 1, a, 1, 0, c, 1,
                              err, sizeof err),
                     -1);

    /* float64 products for CKA */
    enum { R = 6, N1 = 4, N2 = 3 };
    double X[R * N1], Y[R * N2], S[N1 * N1], P[N1 * N2];
    for (int i = 0; i < R * N1; i++)
        X[i] = sin(i + 1.0);
    for (int i = 0; i < R * N2; i++)
        Y[i] = cos(i * 0.7);
    for (int i = 0; i < N1 * N1; i++)
        S[i] = 1.0;
    for (int i = 0; i < N1 * N2; i++)
        P[i] = 2.0;
    assert_int_equal(gemm_dsyrk_t(g, R, N1, 2.0, X, N1, 0.5, S, N1, err, sizeof err), 0);
    assert_int_equal(gemm_dgemm_tn(g, R, N1, N2, 1.0, X, N1, Y, N2, -1.0, P, N2, err, sizeof err),
                     0);
    for (int i = 0; i < N1; i++) {
        for (int j = 0; j < N1; j++) {
            double acc = 0;
            for (int r = 0; r < R; r++)
                acc += X[r * N1 + i] * X[r * N1 + j];
            assert_true(fabs(S[i * N1 + j] - (2.0 * acc + 0.5)) <= 1e-12);
        }
        for (int j = 0; j < N2; j++) {
            double acc = 0;
            for (int r = 0; r < R; r++)
                acc += X[r * N1 + i] * Y[r * N2 + j];
            assert_true(fabs(P[i * N2 + j] - (acc - 2.0)) <= 1e-12);
        }
    }
    gemm_ctx_free(g);
}

/* Runs fn in a child with stderr captured; the child must die of SIGABRT
 * and have said something containing expect. */
static void expect_abort(void (*fn)(void), const char *expect)
{
    char path[] = "/tmp/strata-cudaemu-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fd, STDERR_FILENO);
        fn();
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    char msg[4096];
    ssize_t got = pread(fd, msg, sizeof msg - 1, 0);
    close(fd);
    unlink(path);
    msg[got > 0 ? got : 0] = '\0';
    if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGABRT)
        fail_msg("child did not abort (status 0x%x); stderr: %s", status, msg);
    if (strstr(msg, expect) == NULL)
        fail_msg("abort message lacks \"%s\": %s", expect, msg);
}

static void test_stack_overflow_faults(void **state)
{
    (void)state;
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0)
            dup2(devnull, STDERR_FILENO);
        emu_st_die_stack_overflow();
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    /* killed by SIGSEGV, or ASan's report and exit(1): anything but success */
    assert_false(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

typedef struct {
    float x[3000];
    float sums[3000 / 256 + 1];
    double total;
    int rc;
} block_sum_job;

static void *block_sum_thread(void *arg)
{
    block_sum_job *job = arg;
    char err[256];
    for (int round = 0; round < 20 && job->rc == 0; round++)
        job->rc = emu_st_block_sum(job->x, 3000, 256, job->sums, &job->total, err, sizeof err);
    return NULL;
}

/* Jobs run on several OS threads at once, each launching its own kernels:
 * shared memory, fibers and the current launch are per thread. */
static void test_concurrent_launches_from_threads(void **state)
{
    (void)state;
    enum { NT = 3 };
    static block_sum_job jobs[NT];
    pthread_t th[NT];
    for (int j = 0; j < NT; j++) {
        for (int i = 0; i < 3000; i++)
            jobs[j].x[i] = (float)((i * (j + 1)) % 17);
        jobs[j].rc = 0;
        assert_int_equal(pthread_create(&th[j], NULL, block_sum_thread, &jobs[j]), 0);
    }
    for (int j = 0; j < NT; j++)
        assert_int_equal(pthread_join(th[j], NULL), 0);
    for (int j = 0; j < NT; j++) {
        assert_int_equal(jobs[j].rc, 0);
        double want = 0;
        for (int i = 0; i < 3000; i++)
            want += jobs[j].x[i];
        assert_true(jobs[j].total == want);
        for (int b = 0; b < 3000 / 256 + 1; b++) {
            float s = 0;
            for (int i = b * 256; i < 3000 && i < (b + 1) * 256; i++)
                s += jobs[j].x[i];
            assert_true(jobs[j].sums[b] == s);
        }
    }
}

static void test_refused_launches_abort(void **state)
{
    (void)state;
    expect_abort(emu_st_die_block_too_big, "1025 threads");
    expect_abort(emu_st_die_zero_grid, "zero dimension");
    expect_abort(emu_st_die_smem_too_big, "232449 bytes");
    expect_abort(emu_st_die_smem_no_optin, "cudaFuncSetAttribute");
}

static void test_hangs_and_undefined_warps_abort(void **state)
{
    (void)state;
    expect_abort(emu_st_die_deadlock, "deadlock in kernel st_deadlock_kernel");
    expect_abort(emu_st_die_divergent_bar, "divergent");
    expect_abort(emu_st_die_shfl_exited, "lane 7 exited");
    expect_abort(emu_st_die_partial_warp, "only 16 lanes");
}

/* The schedule a test found, put back by schedule_restore so that the
 * tests after it run under the one the process was started with. */
typedef struct {
    char name[16];
    uint64_t seed;
} saved_schedule;

static saved_schedule schedule_save(void)
{
    saved_schedule s;
    snprintf(s.name, sizeof s.name, "%s", emu_st_schedule_get(&s.seed));
    return s;
}

static void schedule_restore(const saved_schedule *s)
{
    assert_int_equal(emu_st_schedule_set(s->name, s->seed), 0);
}

/* Mismatches of emu_st_neighbour's output against x[t - 1] (x[0] at 0). */
static unsigned neighbour_mismatches(const float *x, unsigned n, int with_barrier)
{
    float out[256];
    char err[256];
    assert_true(n <= 256);
    if (emu_st_neighbour(x, n, with_barrier, out, err, sizeof err) != 0)
        fail_msg("emu_st_neighbour: %s", err);
    unsigned bad = 0;
    for (unsigned t = 0; t < n; t++)
        if (!(out[t] == x[t == 0 ? 0 : t - 1]))
            bad++;
    return bad;
}

/* The point of the schedules: a shared-memory read without its barrier
 * passes in the forward order (the writer, thread t - 1, always ran first)
 * and fails in reverse (every reader runs before its writer: all 255 read
 * the poison) and in shuffled orders; with the barrier, every order gives
 * the right answer. */
static void test_racy_kernel_caught_by_reverse_and_shuffle(void **state)
{
    (void)state;
    enum { N = 256 };
    float x[N];
    fill(x, N, 11);
    saved_schedule saved = schedule_save();
    assert_int_equal(emu_st_schedule_set("forward", 0), 0);
    assert_int_equal(neighbour_mismatches(x, N, 0), 0);
    assert_int_equal(emu_st_schedule_set("reverse", 0), 0);
    assert_int_equal(neighbour_mismatches(x, N, 0), N - 1);
    for (uint64_t seed = 1; seed <= 4; seed++) {
        assert_int_equal(emu_st_schedule_set("shuffle", seed), 0);
        unsigned bad = neighbour_mismatches(x, N, 0);
        /* a reader runs before its writer about half the time */
        assert_true(bad >= N / 4 && bad <= 3 * N / 4);
    }
    const char *names[] = {"forward", "reverse", "shuffle", "shuffle"};
    for (size_t k = 0; k < 4; k++) {
        assert_int_equal(emu_st_schedule_set(names[k], 100 + k), 0);
        assert_int_equal(neighbour_mismatches(x, N, 1), 0);
    }
    schedule_restore(&saved);
}

/* Threads of emu_st_two_sums whose sum1 or sum2 differ from the exact
 * sums (x holds small integers: every order of addition is exact). */
static unsigned two_sums_wrong(const float *x, unsigned n, int with_barrier)
{
    float s1[256], s2[256];
    char err[256];
    assert_true(n <= 256);
    if (emu_st_two_sums(x, n, with_barrier, s1, s2, err, sizeof err) != 0)
        fail_msg("emu_st_two_sums: %s", err);
    float want = 0;
    for (unsigned t = 0; t < n; t++)
        want += x[t];
    unsigned bad = 0;
    for (unsigned t = 0; t < n; t++)
        bad += !(s1[t] == want && s2[t] == 2 * want);
    return bad;
}

/* A race between warps: the missing barrier before a reused reduction
 * array is written. forward's lockstep warps hide it; reverse runs the last
 * warp through both sums before the others read the first, so warps 0..6
 * read its second partial in the first sum; shuffle catches it at some
 * seeds (when the warp that runs first is not the last to be read), and
 * the barrier fixes it in every schedule. */
static void test_warp_run_ahead_race_caught(void **state)
{
    (void)state;
    enum { N = 256 };
    float x[N];
    for (unsigned t = 0; t < N; t++)
        x[t] = (float)(t % 7);
    saved_schedule saved = schedule_save();
    assert_int_equal(emu_st_schedule_set("forward", 0), 0);
    assert_int_equal(two_sums_wrong(x, N, 0), 0);
    assert_int_equal(emu_st_schedule_set("reverse", 0), 0);
    assert_int_equal(two_sums_wrong(x, N, 0), N - 32);
    unsigned caught = 0;
    for (uint64_t seed = 1; seed <= 8; seed++) {
        assert_int_equal(emu_st_schedule_set("shuffle", seed), 0);
        caught += two_sums_wrong(x, N, 0) > 0;
    }
    assert_true(caught >= 4);
    const char *names[] = {"forward", "reverse", "shuffle", "shuffle"};
    for (size_t k = 0; k < 4; k++) {
        assert_int_equal(emu_st_schedule_set(names[k], 200 + k), 0);
        assert_int_equal(two_sums_wrong(x, N, 1), 0);
    }
    schedule_restore(&saved);
}

/* Ranks from emu_st_order under the current schedule. */
typedef struct {
    unsigned block[64];
    unsigned r0[64 * 96];
    unsigned r1[64 * 96];
} order_ranks;

static void order_run(order_ranks *o, unsigned nb, unsigned nt)
{
    char err[256];
    assert_true(nb <= 64 && nt <= 96);
    if (emu_st_order(nb, nt, o->block, o->r0, o->r1, err, sizeof err) != 0)
        fail_msg("emu_st_order: %s", err);
}

static bool is_permutation(const unsigned *v, unsigned n)
{
    bool seen[96 * 64] = {false};
    for (unsigned i = 0; i < n; i++) {
        if (v[i] >= n || seen[v[i]])
            return false;
        seen[v[i]] = true;
    }
    return true;
}

/* What each schedule does to the order of blocks and of a block's threads
 * (before and after a barrier), and that the kernels of the other tests
 * give their exact answers in reverse and shuffled orders too (warp
 * shuffles keep their semantics in every order). */
static void test_schedule_orders(void **state)
{
    enum { NB = 40, NT = 96 };
    static order_ranks a, b;
    saved_schedule saved = schedule_save();

    assert_int_equal(emu_st_schedule_set("forward", 0), 0);
    order_run(&a, NB, NT);
    for (unsigned k = 0; k < NB; k++)
        assert_int_equal(a.block[k], k);
    for (unsigned i = 0; i < NB * NT; i++) {
        assert_int_equal(a.r0[i], i % NT);
        assert_int_equal(a.r1[i], i % NT);
    }

    assert_int_equal(emu_st_schedule_set("reverse", 0), 0);
    order_run(&a, NB, NT);
    for (unsigned k = 0; k < NB; k++)
        assert_int_equal(a.block[k], NB - 1 - k);
    for (unsigned i = 0; i < NB * NT; i++) {
        assert_int_equal(a.r0[i], NT - 1 - i % NT);
        assert_int_equal(a.r1[i], NT - 1 - i % NT);
    }

    assert_int_equal(emu_st_schedule_set("shuffle", 7), 0);
    order_run(&a, NB, NT);
    assert_true(is_permutation(a.block, NB));
    unsigned in_place = 0, rounds_differ = 0;
    for (unsigned k = 0; k < NB; k++)
        in_place += a.block[k] == k;
    assert_true(in_place < NB / 4);
    for (unsigned k = 0; k < NB; k++) {
        assert_true(is_permutation(a.r0 + k * NT, NT));
        assert_true(is_permutation(a.r1 + k * NT, NT));
        rounds_differ += memcmp(a.r0 + k * NT, a.r1 + k * NT, NT * sizeof(unsigned)) != 0;
    }
    /* a new order at every scheduling point, not one per block */
    assert_int_equal(rounds_differ, NB);
    /* the same seed and launch: the same orders (runs compare bit for bit) */
    order_run(&b, NB, NT);
    assert_memory_equal(&a, &b, sizeof a);
    assert_int_equal(emu_st_schedule_set("shuffle", 8), 0);
    order_run(&b, NB, NT);
    assert_true(memcmp(a.block, b.block, sizeof a.block) != 0);
    assert_true(memcmp(a.r0, b.r0, sizeof a.r0) != 0);
    /* one block, and grids whose size is no power of two */
    const unsigned shapes[][2] = {{1, 32}, {3, 33}, {17, 64}, {64, 1}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        order_run(&b, shapes[s][0], shapes[s][1]);
        assert_true(is_permutation(b.block, shapes[s][0]));
    }

    const char *names[] = {"reverse", "shuffle"};
    for (size_t k = 0; k < 2; k++) {
        assert_int_equal(emu_st_schedule_set(names[k], 3 + k), 0);
        test_block_sum(state);
        test_warp_shuffles(state);
        test_grid_indices(state);
        test_dynamic_shared_memory(state);
        test_exited_threads_do_not_block_barriers(state);
    }
    schedule_restore(&saved);
}

static void die_bad_schedule(void)
{
    setenv("STRATA_EMU_SCHEDULE", "backwards", 1);
    emu_st_schedule_reload();
}

static void die_bad_seed(void)
{
    setenv("STRATA_EMU_SCHEDULE", "shuffle", 1);
    setenv("STRATA_EMU_SEED", "12x", 1);
    emu_st_schedule_reload();
}

/* Sets or (value NULL) unsets an environment variable. */
static void env_put(const char *name, const char *value)
{
    if (value != NULL)
        assert_int_equal(setenv(name, value, 1), 0);
    else
        assert_int_equal(unsetenv(name), 0);
}

/* STRATA_EMU_SCHEDULE / STRATA_EMU_SEED: names, seeds in decimal and hex,
 * the defaults, and values it must refuse rather than run forward. */
static void test_schedule_environment(void **state)
{
    (void)state;
    char old_sched[64] = "", old_seed[64] = "";
    const char *v = getenv("STRATA_EMU_SCHEDULE");
    bool had_sched = v != NULL;
    if (had_sched)
        snprintf(old_sched, sizeof old_sched, "%s", v);
    v = getenv("STRATA_EMU_SEED");
    bool had_seed = v != NULL;
    if (had_seed)
        snprintf(old_seed, sizeof old_seed, "%s", v);
    saved_schedule saved = schedule_save();
    uint64_t seed = 0;

    env_put("STRATA_EMU_SCHEDULE", "reverse");
    env_put("STRATA_EMU_SEED", "0x10");
    emu_st_schedule_reload();
    assert_string_equal(emu_st_schedule_get(&seed), "reverse");
    assert_true(seed == 16);
    env_put("STRATA_EMU_SCHEDULE", "shuffle");
    env_put("STRATA_EMU_SEED", "18446744073709551615");
    emu_st_schedule_reload();
    assert_string_equal(emu_st_schedule_get(&seed), "shuffle");
    assert_true(seed == UINT64_MAX);
    env_put("STRATA_EMU_SCHEDULE", "");
    env_put("STRATA_EMU_SEED", NULL);
    emu_st_schedule_reload();
    assert_string_equal(emu_st_schedule_get(&seed), "forward");
    assert_true(seed == 0x5eed5eedu);
    env_put("STRATA_EMU_SCHEDULE", NULL);
    emu_st_schedule_reload();
    assert_string_equal(emu_st_schedule_get(NULL), "forward");
    assert_int_equal(emu_st_schedule_set("sideways", 1), -1);
    expect_abort(die_bad_schedule, "STRATA_EMU_SCHEDULE=backwards: expected forward, reverse");
    expect_abort(die_bad_seed, "STRATA_EMU_SEED=12x");

    env_put("STRATA_EMU_SCHEDULE", had_sched ? old_sched : NULL);
    env_put("STRATA_EMU_SEED", had_seed ? old_seed : NULL);
    emu_st_schedule_reload();
    uint64_t back = 0;
    assert_string_equal(emu_st_schedule_get(&back), saved.name);
    assert_true(back == saved.seed);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_block_sum),
        cmocka_unit_test(test_warp_shuffles),
        cmocka_unit_test(test_grid_indices),
        cmocka_unit_test(test_dynamic_shared_memory),
        cmocka_unit_test(test_big_dynamic_shared_memory),
        cmocka_unit_test(test_exited_threads_do_not_block_barriers),
        cmocka_unit_test(test_half_conversions_match_numpy_and_torch),
        cmocka_unit_test(test_cudart),
        cmocka_unit_test(test_gemm_emu),
        cmocka_unit_test(test_concurrent_launches_from_threads),
        cmocka_unit_test(test_stack_overflow_faults),
        cmocka_unit_test(test_refused_launches_abort),
        cmocka_unit_test(test_hangs_and_undefined_warps_abort),
        cmocka_unit_test(test_racy_kernel_caught_by_reverse_and_shuffle),
        cmocka_unit_test(test_warp_run_ahead_race_caught),
        cmocka_unit_test(test_schedule_orders),
        cmocka_unit_test(test_schedule_environment),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
