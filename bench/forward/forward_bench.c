/* forward_bench.c - hidden-state extraction speed of strata's forward pass.
 *
 *   forward_bench MODEL_DIR BATCH_BIN ITERS OUT_NPY
 *
 * MODEL_DIR is a Hugging Face model folder (loaded with llama_load_hf).
 * BATCH_BIN holds int32 little-endian values: B, T, then B*T token ids
 * (right-padded rows), then B lengths. The forward runs once as a warm-up,
 * then ITERS timed times, then once more on a backend that times each op.
 * Every run pools, like a predict job's last_token pool, the last real token
 * of every hidden-state index 0..L through the hook; the pooled rows of the
 * last run go to OUT_NPY as a ((L+1)*B, C) float32 matrix, row l*B + b.
 * Prints one JSON object on stdout: tokens/s, per-iteration seconds, per-op
 * seconds, load time, peak RSS (VmHWM) and OpenBLAS's core and threads. */
#include "common/log.h"
#include "common/npy.h"
#include "common/util.h"
#include "worker/engine/backend.h"
#include "worker/engine/blas.h"
#include "worker/engine/forward.h"
#include "worker/engine/model.h"

#include <cblas.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#define BENCH_ITERS_MAX 1000

/* The pooled rows the hook fills: rows[(layer * B + b) * C ..]. */
typedef struct {
    const int *lengths;
    int B, C, L;
    float *rows;
} bench_pool;

/* Copies the last real token of every sequence of hidden state layer into
 * the pool. Returns 0, or -1 when the batch is not the one the pool is for. */
static int bench_hook(void *user, int layer, const float *x, int B, int T, int C, char *err,
                      size_t errlen) {
    bench_pool *p = user;
    if (B != p->B || C != p->C || layer < 0 || layer > p->L)
        return err_set(err, errlen, "hook got batch %d x %d x %d at layer %d, expected %d x %d",
                       B, T, C, layer, p->B, p->C);
    for (int b = 0; b < B; b++) {
        const float *row = x + ((size_t)b * (size_t)T + (size_t)(p->lengths[b] - 1)) * (size_t)C;
        memcpy(p->rows + ((size_t)layer * (size_t)B + (size_t)b) * (size_t)C, row,
               (size_t)C * sizeof(float));
    }
    return 0;
}

/* --- a backend that times every op of the CPU one ------------------------ */

enum { OP_MATMUL_QKV, OP_MATMUL_O, OP_MATMUL_GATE_UP, OP_MATMUL_DOWN, OP_ATTENTION,
       OP_RMSNORM, OP_ROPE, OP_SWIGLU, OP_EMBEDDING, OP_RESIDUAL, OP_COUNT };
static const char *const bench_op_names[OP_COUNT] = {
    "matmul_qkv", "matmul_o", "matmul_gate_up", "matmul_down", "attention",
    "rmsnorm", "rope", "swiglu", "embedding", "residual_add"};
static double bench_op_seconds[OP_COUNT];
/* Set before the timed run: which matmul is which is told by its shape. */
static size_t bench_dim_ff;

static void timed_matmul(float *out, const float *x, const float *w, size_t N, size_t in_dim,
                         size_t out_dim, bool accumulate) {
    double t0 = util_now_seconds();
    backend_cpu()->matmul(out, x, w, N, in_dim, out_dim, accumulate);
    int op = in_dim == bench_dim_ff ? OP_MATMUL_DOWN
             : out_dim == bench_dim_ff ? OP_MATMUL_GATE_UP
             : accumulate ? OP_MATMUL_O
                          : OP_MATMUL_QKV;
    bench_op_seconds[op] += util_now_seconds() - t0;
}

static void timed_rmsnorm(float *out, const float *x, const float *weight, size_t N, size_t C,
                          float eps) {
    double t0 = util_now_seconds();
    backend_cpu()->rmsnorm(out, x, weight, N, C, eps);
    bench_op_seconds[OP_RMSNORM] += util_now_seconds() - t0;
}

static void timed_rope(float *x, const int *pos, size_t N, int nheads, int HS, float theta) {
    double t0 = util_now_seconds();
    backend_cpu()->rope(x, pos, N, nheads, HS, theta);
    bench_op_seconds[OP_ROPE] += util_now_seconds() - t0;
}

static void timed_attention(float *out, const float *q, const float *k, const float *v,
                            const int *lengths, int B, int T, int NH, int NKV, int HS,
                            float *scratch) {
    double t0 = util_now_seconds();
    backend_cpu()->attention(out, q, k, v, lengths, B, T, NH, NKV, HS, scratch);
    bench_op_seconds[OP_ATTENTION] += util_now_seconds() - t0;
}

static void timed_swiglu(float *gate, const float *up, size_t n) {
    double t0 = util_now_seconds();
    backend_cpu()->swiglu(gate, up, n);
    bench_op_seconds[OP_SWIGLU] += util_now_seconds() - t0;
}

static void timed_embedding(float *out, const int *tokens, const float *table, size_t N,
                            size_t C) {
    double t0 = util_now_seconds();
    backend_cpu()->embedding(out, tokens, table, N, C);
    bench_op_seconds[OP_EMBEDDING] += util_now_seconds() - t0;
}

static void timed_residual_add(float *x, const float *y, size_t n) {
    double t0 = util_now_seconds();
    backend_cpu()->residual_add(x, y, n);
    bench_op_seconds[OP_RESIDUAL] += util_now_seconds() - t0;
}

/* The CPU backend with every op timed; host memory like the CPU one, so a
 * state sized for either serves both only through its own table (the bench
 * sizes one state per table). */
static backend bench_timed_backend(void) {
    backend b = *backend_cpu();
    b.name = "cpu-timed";
    b.matmul = timed_matmul;
    b.rmsnorm = timed_rmsnorm;
    b.rope = timed_rope;
    b.attention = timed_attention;
    b.swiglu = timed_swiglu;
    b.embedding = timed_embedding;
    b.residual_add = timed_residual_add;
    return b;
}

/* Reads BATCH_BIN (see the top comment) into *tokens (B*T) and *lengths (B),
 * both malloc'd for the caller. Returns 0 or -1 with err set. */
static int bench_read_batch(const char *path, int **tokens, int **lengths, int *B, int *T,
                            char *err, size_t errlen) {
    char *raw = NULL;
    size_t len = 0;
    int rc = -1;
    *tokens = *lengths = NULL;
    if (util_read_file(path, (size_t)1 << 30, &raw, &len, err, errlen) != 0) return -1;
    int32_t head[2];
    if (len < sizeof head) {
        err_set(err, errlen, "%s: %zu bytes, too short for a header", path, len);
        goto out;
    }
    memcpy(head, raw, sizeof head);
    if (head[0] < 1 || head[1] < 1 || head[0] > 4096 || head[1] > 65536) {
        err_set(err, errlen, "%s: batch %" PRId32 " x %" PRId32 " out of range", path, head[0],
                head[1]);
        goto out;
    }
    size_t n = (size_t)head[0] * (size_t)head[1];
    if (len != (2 + n + (size_t)head[0]) * sizeof(int32_t)) {
        err_set(err, errlen, "%s: %zu bytes, expected %zu for batch %d x %d", path, len,
                (2 + n + (size_t)head[0]) * sizeof(int32_t), head[0], head[1]);
        goto out;
    }
    *tokens = malloc(n * sizeof(int));
    *lengths = malloc((size_t)head[0] * sizeof(int));
    if (!*tokens || !*lengths) {
        err_set(err, errlen, "out of memory for the batch");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        int32_t v;
        memcpy(&v, raw + (2 + i) * sizeof v, sizeof v);
        (*tokens)[i] = v;
    }
    for (int b = 0; b < head[0]; b++) {
        int32_t v;
        memcpy(&v, raw + (2 + n + (size_t)b) * sizeof v, sizeof v);
        (*lengths)[b] = v;
    }
    *B = head[0];
    *T = head[1];
    rc = 0;
out:
    if (rc != 0) {
        free(*tokens);
        free(*lengths);
        *tokens = *lengths = NULL;
    }
    free(raw);
    return rc;
}

/* Peak resident set of this process in KiB: VmHWM from /proc/self/status,
 * which exec resets, else getrusage's ru_maxrss (on Linux that one keeps the
 * high-water mark of the process that forked us across exec, so a bench
 * started from a big parent would report the parent's). 0 if unknown. */
static long bench_peak_rss_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (f) {
        char line[256];
        long kb = -1;
        while (fgets(line, sizeof line, f))
            if (strncmp(line, "VmHWM:", 6) == 0) {
                char *end;
                kb = strtol(line + 6, &end, 10);
                if (end == line + 6) kb = -1;
                break;
            }
        fclose(f);
        if (kb >= 0) return kb;
    }
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? ru.ru_maxrss : 0;
}

int main(int argc, char **argv) {
    blas_setup(argc, argv);
    log_init("bench-forward");
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL_DIR BATCH_BIN ITERS OUT_NPY\n", argv[0]);
        return 2;
    }
    char err[512] = "";
    int rc = 1;
    llama_model m;
    memset(&m, 0, sizeof m);
    llama_state s, st;
    memset(&s, 0, sizeof s);
    memset(&st, 0, sizeof st);
    int *tokens = NULL, *lengths = NULL;
    float *rows = NULL;
    double *iter_s = NULL;
    int B = 0, T = 0;
    int64_t iters;
    if (util_parse_i64(argv[3], 1, BENCH_ITERS_MAX, &iters) != 0) {
        fprintf(stderr, "ITERS must be 1..%d\n", BENCH_ITERS_MAX);
        return 2;
    }
    if (bench_read_batch(argv[2], &tokens, &lengths, &B, &T, err, sizeof err) != 0) goto out;

    double t0 = util_now_seconds();
    if (llama_load_hf(argv[1], &m, err, sizeof err) != 0) goto out;
    double load_s = util_now_seconds() - t0;
    long rss_after_load = bench_peak_rss_kb();

    const backend *be = backend_cpu();
    if (llama_state_init(&s, be, &m.cfg, B, T, err, sizeof err) != 0) goto out;
    int L = m.cfg.num_hidden_layers, C = m.cfg.hidden_size;
    rows = calloc((size_t)(L + 1) * (size_t)B * (size_t)C, sizeof *rows);
    iter_s = calloc((size_t)iters, sizeof *iter_s);
    if (!rows || !iter_s) {
        err_set(err, sizeof err, "out of memory");
        goto out;
    }
    bench_pool pool = {.lengths = lengths, .B = B, .C = C, .L = L, .rows = rows};

    if (llama_forward(be, &m, &s, tokens, lengths, B, T, bench_hook, &pool, NULL, err,
                      sizeof err) != 0)
        goto out;
    double best = 0.0, total = 0.0;
    for (int64_t i = 0; i < iters; i++) {
        double a = util_now_seconds();
        if (llama_forward(be, &m, &s, tokens, lengths, B, T, bench_hook, &pool, NULL, err,
                          sizeof err) != 0)
            goto out;
        iter_s[i] = util_now_seconds() - a;
        total += iter_s[i];
        if (i == 0 || iter_s[i] < best) best = iter_s[i];
    }
    long rss_peak = bench_peak_rss_kb();

    /* One more run with each op timed, for the README's breakdown; its own
     * state so the timed table never sees buffers sized for another. */
    backend timed = bench_timed_backend();
    bench_dim_ff = (size_t)m.cfg.intermediate_size;
    llama_state_free(&s);
    if (llama_state_init(&st, &timed, &m.cfg, B, T, err, sizeof err) != 0) goto out;
    double ta = util_now_seconds();
    if (llama_forward(&timed, &m, &st, tokens, lengths, B, T, bench_hook, &pool, NULL, err,
                      sizeof err) != 0)
        goto out;
    double timed_total = util_now_seconds() - ta;

    if (npy_write_f32(argv[4], rows, (size_t)(L + 1) * (size_t)B, (size_t)C, err, sizeof err) !=
        0)
        goto out;

    long real_tokens = 0;
    for (int b = 0; b < B; b++) real_tokens += lengths[b];
    printf("{\"side\": \"strata\", \"B\": %d, \"T\": %d, \"real_tokens\": %ld, \"iters\": %" PRId64
           ", \"mean_s\": %.6f, \"best_s\": %.6f, \"tokens_per_s\": %.2f, "
           "\"best_tokens_per_s\": %.2f, \"load_s\": %.3f, \"rss_after_load_kb\": %ld, "
           "\"peak_rss_kb\": %ld, \"blas_core\": \"%s\", \"blas_threads\": %d, \"iter_s\": [",
           B, T, real_tokens, iters, total / (double)iters, best,
           (double)B * T * (double)iters / total, (double)B * T / best, load_s, rss_after_load,
           rss_peak, blas_core_name(), openblas_get_num_threads());
    for (int64_t i = 0; i < iters; i++) printf("%s%.6f", i ? ", " : "", iter_s[i]);
    printf("], \"timed_run_s\": %.6f, \"op_s\": {", timed_total);
    for (int op = 0; op < OP_COUNT; op++)
        printf("%s\"%s\": %.6f", op ? ", " : "", bench_op_names[op], bench_op_seconds[op]);
    printf("}}\n");
    rc = 0;
out:
    if (rc != 0) fprintf(stderr, "forward_bench: %s\n", err);
    llama_state_free(&s);
    llama_state_free(&st);
    llama_free(&m);
    free(tokens);
    free(lengths);
    free(rows);
    free(iter_s);
    return rc;
}
