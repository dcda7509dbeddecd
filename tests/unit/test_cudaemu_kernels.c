/* test_cudaemu_kernels - every kernel of worker/engine/cuda/kernels.cu
 * (all but attention) run under the CUDA emulator (tests/cuda_emu) on
 * random inputs (fixed seeds, no zeros) and compared with the CPU backend's
 * op (cpu.c), adamw.c, or a double-precision sum.
 *
 * Tolerances: exact (bitwise) where the arithmetic is the same operation
 * for operation (scale, residual_add, rope, embedding, dropout, the 16-bit
 * conversions, adamw); 1e-5 relative where the only difference is expf
 * against cpu.c's polynomial exp (swiglu and its backward, cross-entropy's
 * gradient), measured per element against max(|want|, 1e-3 max |want|) so
 * that values near zero are judged on the row's scale; 2e-6 for rmsnorm,
 * whose double sums are only reordered; 1e-5 normwise for the backward
 * sums (rmsnorm_backward, embedding_backward); 1e-12 for sumsq against a
 * double sum. Under the emulator device pointers are host pointers, so
 * the arrays are malloc'd and the stream is NULL. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/cuda_emu/half_bits.h"
#include "tests/unit/testutil.h"
#include "worker/engine/adamw.h"
#include "worker/engine/backend.h"
#include "worker/engine/cuda/kernels.h"

/* xorshift64*: reproducible inputs. */
static uint64_t rng_state;

static void rng_seed(uint64_t s) { rng_state = s * 0x9E3779B97F4A7C15ULL + 1; }

static uint64_t rng_next(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

/* Uniform in [-amp, amp] with |v| >= amp / 1000: never zero. */
static float rng_float(float amp) {
    double u = (double)(rng_next() >> 11) / 9007199254740992.0 * 2.0 - 1.0;
    if (fabs(u) < 1e-3) u = u < 0 ? -1e-3 : 1e-3;
    return (float)(u * amp);
}

/* Not tu_rand_floats: these inputs come from xorshift64*, reseeded per test
 * (rng_seed), and are never zero, as the header promises; splitmix64 would
 * change every input the tolerances were measured on. */
static float *rand_floats(size_t n, float amp) {
    float *x = malloc((n ? n : 1) * sizeof *x);
    assert_non_null(x);
    for (size_t i = 0; i < n; i++) x[i] = rng_float(amp);
    return x;
}

static void expect_exact(const float *got, const float *want, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], sizeof got[i]) != 0)
            fail_msg("%s[%zu]: got %.9g, want %.9g", what, i, (double)got[i], (double)want[i]);
}

/* Per element |got - want| <= rtol * max(|want|, 1e-3 * max |want|). */
static void expect_close(const float *got, const float *want, size_t n, double rtol,
                         const char *what) {
    double maxabs = 0.0;
    for (size_t i = 0; i < n; i++)
        if (fabs(want[i]) > maxabs) maxabs = fabs(want[i]);
    for (size_t i = 0; i < n; i++) {
        double ref = fabs(want[i]) > 1e-3 * maxabs ? fabs(want[i]) : 1e-3 * maxabs;
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= rtol * ref))
            fail_msg("%s[%zu]: got %.9g, want %.9g (rel %.3g > %.3g)", what, i, (double)got[i],
                     (double)want[i], d / ref, rtol);
    }
}

/* max |got - want| <= rtol * max |want|. */
static void expect_normwise(const float *got, const float *want, size_t n, double rtol,
                            const char *what) {
    double maxabs = 0.0, maxd = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (fabs(want[i]) > maxabs) maxabs = fabs(want[i]);
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= maxd)) maxd = d; /* NaN propagates */
    }
    if (!(maxd <= rtol * maxabs))
        fail_msg("%s: max error %.3g > %.3g * max %.3g", what, maxd, rtol, maxabs);
}

static const backend *cpu(void) { return backend_cpu(); }

static void test_scale_residual(void **state) {
    (void)state;
    char err[256];
    rng_seed(1);
    size_t n = 1003;
    float *x = rand_floats(n + 1, 3.0f), *y = rand_floats(n + 1, 3.0f);
    /* x: aligned (four at a time); x + 1: one at a time. */
    for (int off = 0; off < 2; off++) {
        float *want = tu_dup_floats(x + off, n), *got = tu_dup_floats(x + off, n);
        cpu()->scale(want, n, 0.37f);
        assert_int_equal(cuk_scale(got, n, 0.37f, NULL, err, sizeof err), 0);
        expect_exact(got, want, n, "scale");
        cpu()->residual_add(want, y + off, n);
        assert_int_equal(cuk_residual_add(got, y + off, n, NULL, err, sizeof err), 0);
        expect_exact(got, want, n, "residual_add");
        /* n = 0 enqueues nothing and succeeds */
        assert_int_equal(cuk_scale(got, 0, 5.0f, NULL, err, sizeof err), 0);
        expect_exact(got, want, n, "scale n=0");
        free(want);
        free(got);
    }
    free(x);
    free(y);
}

static void test_swiglu(void **state) {
    (void)state;
    char err[256];
    rng_seed(2);
    size_t n = 1031;
    float *gate = rand_floats(n + 1, 6.0f), *up = rand_floats(n + 1, 2.0f);
    float *dout = rand_floats(n + 1, 1.0f);
    for (int off = 0; off < 2; off++) {
        float *want = tu_dup_floats(gate + off, n), *got = tu_dup_floats(gate + off, n);
        cpu()->swiglu(want, up + off, n);
        assert_int_equal(cuk_swiglu(got, up + off, n, NULL, err, sizeof err), 0);
        expect_close(got, want, n, 1e-5, "swiglu");

        float *dg_w = malloc(n * sizeof(float)), *du_w = malloc(n * sizeof(float));
        float *dg_g = malloc(n * sizeof(float)), *du_g = malloc(n * sizeof(float));
        assert_true(dg_w && du_w && dg_g && du_g);
        cpu()->swiglu_backward(dg_w, du_w, dout + off, gate + off, up + off, n);
        assert_int_equal(cuk_swiglu_backward(dg_g, du_g, dout + off, gate + off, up + off, n,
                                             NULL, err, sizeof err),
                         0);
        expect_close(dg_g, dg_w, n, 1e-5, "swiglu_backward dgate");
        expect_close(du_g, du_w, n, 1e-5, "swiglu_backward dup");
        /* dgate may be dout */
        float *inplace = tu_dup_floats(dout + off, n);
        assert_int_equal(cuk_swiglu_backward(inplace, du_g, inplace, gate + off, up + off, n,
                                             NULL, err, sizeof err),
                         0);
        expect_exact(inplace, dg_g, n, "swiglu_backward dgate in place");
        free(inplace);
        free(dg_w);
        free(du_w);
        free(dg_g);
        free(du_g);
        free(want);
        free(got);
    }
    free(gate);
    free(up);
    free(dout);
}

static void test_rmsnorm(void **state) {
    (void)state;
    char err[256];
    rng_seed(3);
    const size_t Cs[] = {72, 75, 1000};
    for (size_t k = 0; k < sizeof Cs / sizeof Cs[0]; k++) {
        size_t N = 5, C = Cs[k];
        float *x = rand_floats(N * C, 2.0f), *w = rand_floats(C, 1.5f);
        float *want = malloc(N * C * sizeof(float)), *got = malloc(N * C * sizeof(float));
        assert_true(want && got);
        cpu()->rmsnorm(want, x, w, N, C, 1e-5f);
        assert_int_equal(cuk_rmsnorm(got, x, w, N, C, 1e-5f, NULL, err, sizeof err), 0);
        expect_close(got, want, N * C, 2e-6, "rmsnorm");
        /* out may be x */
        float *inplace = tu_dup_floats(x, N * C);
        assert_int_equal(cuk_rmsnorm(inplace, inplace, w, N, C, 1e-5f, NULL, err, sizeof err),
                         0);
        expect_exact(inplace, got, N * C, "rmsnorm in place");
        free(inplace);
        free(x);
        free(w);
        free(want);
        free(got);
    }
}

/* dx and dweight accumulate into random starting values; C = 8192 needs
 * 64 KiB of dweight partials (the opt-in path), C = 75 the scalar one. */
static void test_rmsnorm_backward(void **state) {
    (void)state;
    char err[256];
    rng_seed(4);
    const size_t Ns[] = {5, 37, 3}, Cs[] = {72, 75, 8192};
    for (size_t k = 0; k < sizeof Cs / sizeof Cs[0]; k++) {
        size_t N = Ns[k], C = Cs[k];
        float *x = rand_floats(N * C, 2.0f), *w = rand_floats(C, 1.5f);
        float *dout = rand_floats(N * C, 1.0f);
        float *dx0 = rand_floats(N * C, 0.5f), *dw0 = rand_floats(C, 0.5f);
        float *dx_w = tu_dup_floats(dx0, N * C), *dw_w = tu_dup_floats(dw0, C);
        float *dx_g = tu_dup_floats(dx0, N * C), *dw_g = tu_dup_floats(dw0, C);
        cpu()->rmsnorm_backward(dx_w, dw_w, dout, x, w, N, C, 1e-5f);
        assert_int_equal(
            cuk_rmsnorm_backward(dx_g, dw_g, dout, x, w, N, C, 1e-5f, NULL, err, sizeof err), 0);
        expect_close(dx_g, dx_w, N * C, 1e-5, "rmsnorm_backward dx");
        expect_normwise(dx_g, dx_w, N * C, 1e-6, "rmsnorm_backward dx");
        expect_normwise(dw_g, dw_w, C, 1e-5, "rmsnorm_backward dweight");
        /* dweight NULL leaves it alone; dx NULL computes dweight only */
        float *dx_only = tu_dup_floats(dx0, N * C), *dw_only = tu_dup_floats(dw0, C);
        assert_int_equal(cuk_rmsnorm_backward(dx_only, NULL, dout, x, w, N, C, 1e-5f, NULL, err,
                                              sizeof err),
                         0);
        expect_exact(dx_only, dx_g, N * C, "rmsnorm_backward dx without dweight");
        assert_int_equal(cuk_rmsnorm_backward(NULL, dw_only, dout, x, w, N, C, 1e-5f, NULL, err,
                                              sizeof err),
                         0);
        expect_normwise(dw_only, dw_w, C, 1e-5, "rmsnorm_backward dweight without dx");
        free(dx_only);
        free(dw_only);
        free(x);
        free(w);
        free(dout);
        free(dx0);
        free(dw0);
        free(dx_w);
        free(dw_w);
        free(dx_g);
        free(dw_g);
    }
}

static void test_rope(void **state) {
    (void)state;
    char err[256];
    rng_seed(5);
    size_t N = 7;
    int nheads = 3, HS = 10, npos = 40;
    float *cs = malloc((size_t)npos * (size_t)HS * sizeof(float));
    assert_non_null(cs);
    cpu()->rope_table(cs, npos, HS, 10000.0f);
    int pos[7];
    for (size_t n = 0; n < N; n++) pos[n] = (int)(rng_next() % (uint64_t)npos);
    pos[3] = npos - 1;
    size_t len = N * (size_t)nheads * (size_t)HS;
    float *x = rand_floats(len, 2.0f);
    float *want = tu_dup_floats(x, len), *got = tu_dup_floats(x, len);
    cpu()->rope_cached(want, pos, N, nheads, HS, cs);
    assert_int_equal(cuk_rope_cached(got, pos, N, nheads, HS, cs, false, NULL, err, sizeof err),
                     0);
    expect_exact(got, want, len, "rope_cached");
    cpu()->rope_backward_cached(want, pos, N, nheads, HS, cs);
    assert_int_equal(cuk_rope_cached(got, pos, N, nheads, HS, cs, true, NULL, err, sizeof err),
                     0);
    expect_exact(got, want, len, "rope_backward_cached");
    /* the inverse undoes the rotation to rounding */
    expect_close(got, x, len, 1e-5, "rope round trip");
    /* an odd head size is refused and nothing runs */
    float *before = tu_dup_floats(got, len);
    assert_int_equal(cuk_rope_cached(got, pos, N, nheads, 9, cs, false, NULL, err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "HS = 9"));
    expect_exact(got, before, len, "rope refused");
    free(before);
    free(cs);
    free(x);
    free(want);
    free(got);
}

static void test_embedding(void **state) {
    (void)state;
    char err[256];
    rng_seed(6);
    const size_t Cs[] = {72, 75};
    for (size_t k = 0; k < sizeof Cs / sizeof Cs[0]; k++) {
        size_t N = 23, C = Cs[k], V = 11;
        int tokens[23];
        for (size_t n = 0; n < N; n++) tokens[n] = (int)(rng_next() % V);
        tokens[4] = tokens[9] = tokens[17] = 7; /* repeated at least three times */
        tokens[0] = 0;
        tokens[22] = (int)V - 1;
        float *table = rand_floats(V * C, 1.0f);
        float *want = malloc(N * C * sizeof(float)), *got = malloc(N * C * sizeof(float));
        assert_true(want && got);
        cpu()->embedding(want, tokens, table, N, C);
        assert_int_equal(cuk_embedding(got, tokens, table, N, C, NULL, err, sizeof err), 0);
        expect_exact(got, want, N * C, "embedding");

        float *dout = rand_floats(N * C, 1.0f), *d0 = rand_floats(V * C, 0.5f);
        float *dw = tu_dup_floats(d0, V * C), *dg = tu_dup_floats(d0, V * C);
        cpu()->embedding_backward(dw, dout, tokens, N, C);
        assert_int_equal(cuk_embedding_backward(dg, dout, tokens, N, C, NULL, err, sizeof err),
                         0);
        expect_normwise(dg, dw, V * C, 1e-6, "embedding_backward");
        /* token 7's row got every one of its rows */
        for (size_t i = 0; i < C; i++) {
            double s = d0[7 * C + i];
            for (size_t n = 0; n < N; n++)
                if (tokens[n] == 7) s += dout[n * C + i];
            assert_true(fabs(dg[7 * C + i] - s) <= 1e-5 * (fabs(s) + 1.0));
        }
        free(table);
        free(want);
        free(got);
        free(dout);
        free(d0);
        free(dw);
        free(dg);
    }
}

/* Rows with targets, rows with -1 (zeros, loss 0); V = 103 keeps rows in
 * shared memory, V = 60000 (past 227 KiB) reads them from global memory. */
static void test_cross_entropy(void **state) {
    (void)state;
    char err[256];
    rng_seed(7);
    const size_t Ns[] = {6, 3}, Vs[] = {103, 60000};
    for (size_t k = 0; k < 2; k++) {
        size_t N = Ns[k], V = Vs[k];
        int targets[6];
        for (size_t n = 0; n < N; n++) targets[n] = (int)(rng_next() % V);
        targets[1] = -1;
        targets[N - 1] = (int)V - 1;
        float *logits = rand_floats(N * V, 8.0f);
        logits[targets[0]] = 12.0f; /* a confident row */
        float *want = tu_dup_floats(logits, N * V), *got = tu_dup_floats(logits, N * V);
        double loss_w[6], loss_g[6];
        for (size_t n = 0; n < N; n++) loss_g[n] = 123.0;
        float scale = 1.0f / 5.0f;
        cpu()->cross_entropy(want, loss_w, targets, N, V, scale);
        assert_int_equal(
            cuk_cross_entropy(got, loss_g, targets, N, V, scale, NULL, err, sizeof err), 0);
        for (size_t n = 0; n < N; n++) {
            if (targets[n] < 0) {
                assert_true(loss_g[n] == 0.0);
                for (size_t j = 0; j < V; j++) assert_true(got[n * V + j] == 0.0f);
                continue;
            }
            assert_true(loss_w[n] > 0.0);
            if (!(fabs(loss_g[n] - loss_w[n]) <= 1e-6 * loss_w[n]))
                fail_msg("V %zu row %zu: loss %.12g, want %.12g", V, n, loss_g[n], loss_w[n]);
            char what[64];
            snprintf(what, sizeof what, "cross_entropy V %zu row %zu", V, n);
            expect_close(got + n * V, want + n * V, V, 1e-5, what);
            /* a gradient row of softmax - onehot sums to zero */
            double s = 0.0;
            for (size_t j = 0; j < V; j++) s += got[n * V + j];
            assert_true(fabs(s) <= 1e-5 * scale);
        }
        free(logits);
        free(want);
        free(got);
    }
    double loss;
    float row[4] = {1, 2, 3, 4};
    int t = 0;
    assert_int_equal(cuk_cross_entropy(row, &loss, &t, 1, 0, 1.0f, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "V = 0"));
}

/* The kernel's mask equals backend_dropout_keep's on every index, for
 * several keys and drop rates, and the op equals cpu.c's. */
static void test_dropout(void **state) {
    (void)state;
    char err[256];
    rng_seed(8);
    size_t n = 100003;
    float *ones = malloc((n + 1) * sizeof(float)), *mask = malloc((n + 1) * sizeof(float));
    assert_true(ones && mask);
    for (size_t i = 0; i <= n; i++) ones[i] = 1.0f;
    const double ps[] = {0.1, 0.5, 0.9};
    for (int k = 0; k < 3; k++) {
        uint64_t key = rng_next();
        uint64_t threshold = (uint64_t)(ps[k] * 9007199254740992.0);
        /* mask + 1 runs the one-at-a-time path */
        float *m = k == 1 ? mask + 1 : mask;
        const float *o = k == 1 ? ones + 1 : ones;
        assert_int_equal(cuk_dropout(m, o, n, key, threshold, 1.0f, false, NULL, err, sizeof err),
                         0);
        size_t kept = 0;
        for (size_t i = 0; i < n; i++) {
            bool want = backend_dropout_keep(key, i, threshold);
            if ((m[i] == 1.0f) != want || (m[i] != 1.0f && m[i] != 0.0f))
                fail_msg("p %g element %zu: kernel %g, backend_dropout_keep %d", ps[k], i,
                         (double)m[i], want);
            kept += want;
        }
        /* the mask is not degenerate: close to 1 - p kept */
        assert_true(fabs((double)kept / (double)n - (1.0 - ps[k])) < 0.01);

        float *x = rand_floats(n, 2.0f), *base = rand_floats(n, 1.0f);
        float scale = (float)(1.0 / (1.0 - ps[k]));
        float *want = tu_dup_floats(base, n), *got = tu_dup_floats(base, n);
        cpu()->dropout(want, x, n, key, threshold, scale, true);
        assert_int_equal(cuk_dropout(got, x, n, key, threshold, scale, true, NULL, err, sizeof err),
                         0);
        expect_exact(got, want, n, "dropout accumulate");
        cpu()->dropout(want, x, n, key, threshold, scale, false);
        assert_int_equal(
            cuk_dropout(got, x, n, key, threshold, scale, false, NULL, err, sizeof err), 0);
        expect_exact(got, want, n, "dropout");
        /* out may equal x without accumulate */
        assert_int_equal(cuk_dropout(x, x, n, key, threshold, scale, false, NULL, err, sizeof err),
                         0);
        expect_exact(x, want, n, "dropout in place");
        free(x);
        free(base);
        free(want);
        free(got);
    }
    free(ones);
    free(mask);
}

static void test_half_conversions(void **state) {
    (void)state;
    char err[256];
    rng_seed(9);
    size_t n = 2003;
    float *x = malloc((n + 1) * sizeof(float));
    assert_non_null(x);
    for (size_t i = 0; i <= n; i++) {
        /* magnitudes from 2^-30 (fp16 subnormals and underflow) to 2^20
         * (past fp16's 65504) */
        float mag = ldexpf(1.0f + fabsf(rng_float(1.0f)), (int)(rng_next() % 51) - 30);
        x[i] = rng_next() & 1 ? -mag : mag;
    }
    const float special[] = {1.0f, -2.5f, 65504.0f, 65520.0f, 70000.0f, -1e30f,
                             1.00390625f /* bf16 tie, even: 1 */, 1.01171875f /* tie, up */,
                             INFINITY, NAN, 5.96046448e-08f, 3.0e-08f};
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) x[i] = special[i];
    uint16_t *got = malloc((n + 1) * sizeof(uint16_t));
    assert_non_null(got);
    for (int off = 0; off < 2; off++) {
        assert_int_equal(cuk_to_bf16(got, x + off, n, NULL, err, sizeof err), 0);
        for (size_t i = 0; i < n; i++)
            if (got[i] != half_bits_bf16_from_f32(x[i + off]))
                fail_msg("bf16 of %.9g: 0x%04x, want 0x%04x", (double)x[i + off], got[i],
                         half_bits_bf16_from_f32(x[i + off]));
        assert_int_equal(cuk_to_fp16(got, x + off, n, NULL, err, sizeof err), 0);
        for (size_t i = 0; i < n; i++)
            if (got[i] != half_bits_f16_from_f32(x[i + off]))
                fail_msg("fp16 of %.9g: 0x%04x, want 0x%04x", (double)x[i + off], got[i],
                         half_bits_f16_from_f32(x[i + off]));
    }
    /* known values, independent of the emulator's conversions */
    assert_int_equal(cuk_to_bf16(got, special, 9, NULL, err, sizeof err), 0);
    const uint16_t bf[] = {0x3F80, 0xC020, 0x4780, 0x4780, 0x4789, 0xF14A, 0x3F80, 0x3F82, 0x7F80};
    for (int i = 0; i < 9; i++) assert_int_equal(got[i], bf[i]);
    assert_int_equal(cuk_to_fp16(got, special, 9, NULL, err, sizeof err), 0);
    const uint16_t hf[] = {0x3C00, 0xC100, 0x7BFF, 0x7C00, 0x7C00, 0xFC00, 0x3C04, 0x3C0C, 0x7C00};
    for (int i = 0; i < 9; i++) assert_int_equal(got[i], hf[i]);
    free(x);
    free(got);
}

static void test_sumsq(void **state) {
    (void)state;
    char err[256];
    rng_seed(10);
    size_t n = 100003;
    float *x = rand_floats(n + 1, 3.0f);
    for (int off = 0; off < 2; off++) {
        double want = 1.5;
        for (size_t i = 0; i < n; i++) want += (double)x[i + off] * x[i + off];
        double got = 1.5;
        int nonfinite = 0;
        assert_int_equal(cuk_sumsq(&got, &nonfinite, x + off, n, NULL, err, sizeof err), 0);
        if (!(fabs(got - want) <= 1e-12 * want)) fail_msg("sumsq %.17g, want %.17g", got, want);
        assert_int_equal(nonfinite, 0);
    }
    float keep = x[77777];
    x[77777] = INFINITY;
    double s = 0.0;
    int nonfinite = 0;
    assert_int_equal(cuk_sumsq(&s, &nonfinite, x, n, NULL, err, sizeof err), 0);
    assert_int_equal(nonfinite, 1);
    assert_true(isinf(s));
    x[77777] = keep;
    x[n - 1] = NAN; /* in the ragged tail */
    nonfinite = 0;
    assert_int_equal(cuk_sumsq(&s, &nonfinite, x, n, NULL, err, sizeof err), 0);
    assert_int_equal(nonfinite, 1);
    /* a flag already set stays set */
    x[n - 1] = 1.0f;
    assert_int_equal(cuk_sumsq(&s, &nonfinite, x, n, NULL, err, sizeof err), 0);
    assert_int_equal(nonfinite, 1);
    free(x);
}

/* Two AdamW steps with weight decay against adamw.c's adamw_step, bit for
 * bit; the scalars derived as adamw_step derives them. */
static void test_adamw(void **state) {
    (void)state;
    char err[256];
    rng_seed(11);
    size_t n = 1003;
    adamw_config cfg = adamw_default_config();
    cfg.weight_decay = 0.01;
    adamw_range range = {0, n, true};
    adamw *opt = NULL;
    assert_int_equal(adamw_new(&cfg, &range, 1, &opt, err, sizeof err), 0);
    float *p_w = rand_floats(n, 1.0f), *p_g = tu_dup_floats(p_w, n), *p0 = tu_dup_floats(p_w, n);
    float *m = calloc(n, sizeof(float)), *v = calloc(n, sizeof(float));
    assert_true(m && v);
    const double lrs[] = {1e-3, 3e-4};
    for (int t = 1; t <= 2; t++) {
        float *grad = rand_floats(n, 0.05f);
        double lr = lrs[t - 1];
        float grad_scale = t == 2 ? 0.5f : 1.0f;
        /* adamw.c sees the gradient already scaled (clipping scales in
         * place), the kernel scales it itself: the same float product. */
        float *scaled = tu_dup_floats(grad, n);
        for (size_t i = 0; i < n; i++) scaled[i] *= grad_scale;
        adamw_step(opt, p_w, scaled, lr);
        double bc1 = 1.0 - pow(cfg.beta1, t), bc2 = 1.0 - pow(cfg.beta2, t);
        assert_int_equal(cuk_adamw(p_g, grad, m, v, n, grad_scale,
                                   (float)(1.0 - lr * cfg.weight_decay), (float)cfg.beta1,
                                   (float)(1.0 - cfg.beta1), (float)cfg.beta2,
                                   (float)(1.0 - cfg.beta2), (float)(-(lr / bc1)),
                                   (float)sqrt(bc2), (float)cfg.eps, NULL, err, sizeof err),
                         0);
        expect_exact(p_g, p_w, n, "adamw params");
        expect_exact(m, adamw_exp_avg(opt), n, "adamw exp_avg");
        expect_exact(v, adamw_exp_avg_sq(opt), n, "adamw exp_avg_sq");
        free(grad);
        free(scaled);
    }
    /* the parameters moved (every element, by a step near lr) */
    for (size_t i = 0; i < n; i++) assert_true(p_g[i] != p0[i]);
    free(p0);
    adamw_free(opt);
    free(p_w);
    free(p_g);
    free(m);
    free(v);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scale_residual),   cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_rmsnorm),          cmocka_unit_test(test_rmsnorm_backward),
        cmocka_unit_test(test_rope),             cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_cross_entropy),    cmocka_unit_test(test_dropout),
        cmocka_unit_test(test_half_conversions), cmocka_unit_test(test_sumsq),
        cmocka_unit_test(test_adamw),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
