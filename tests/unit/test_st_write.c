/* test_st_write.c - the safetensors writer (st_write_file): the tensors of
 * tests/reference/st_write/fixtures/input.safetensors written with the dtypes
 * gen_st_write.py used must give expected.safetensors byte for byte (the layout
 * Hugging Face's library writes, F16/BF16 rounded by torch); written files
 * read back through st_open value for value; every binary16 and every bfloat16
 * value survives f32 -> half -> f32 exactly; bad tensors are refused with
 * nothing left behind. All comparisons are exact. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/st.h"
#include "common/util.h"

static char test_dir[64];

static int setup_dir(void **state) {
    (void)state;
    snprintf(test_dir, sizeof test_dir, "/tmp/strata-stw-XXXXXX");
    return mkdtemp(test_dir) ? 0 : -1;
}

/* The directory holds plain files only (the tests' outputs). */
static int teardown_dir(void **state) {
    (void)state;
    DIR *d = opendir(test_dir);
    if (!d) return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char p[PATH_MAX + 256];
        snprintf(p, sizeof p, "%s/%s", test_dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    return rmdir(test_dir);
}

/* Entries in test_dir (temporary files must not outlive a write). */
static int count_entries(void) {
    DIR *d = opendir(test_dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) n++;
    closedir(d);
    return n;
}

/* The table of gen_st_write.py's TARGET. */
static const struct {
    const char *name;
    st_dtype dtype;
} targets[] = {
    {"model.layers.1.mlp.up_proj.weight", ST_F32},
    {"model.layers.0.self_attn.q_proj.weight", ST_BF16},
    {"lm_head.weight", ST_F16},
    {"b.scalar", ST_F32},
    {"a.empty", ST_BF16},
    {"model.norm.weight", ST_F16},
    {"\xc3\xa9t\xc3\xa9.weight", ST_F32},
    {"quote\"name", ST_BF16},
    {"model.layers.0.self_attn.k_proj.weight", ST_BF16},
};
#define NTARGETS (sizeof targets / sizeof targets[0])

/* tests/reference/st_write/fixtures/file, found from this source file (tests
 * run from the repository root, where __FILE__ is relative). */
static void fixture(char *out, size_t outlen, const char *file) {
    char src[PATH_MAX];
    snprintf(src, sizeof src, "%s", __FILE__);
    char *slash = strrchr(src, '/');
    if (slash)
        *slash = '\0';
    else
        snprintf(src, sizeof src, ".");
    int n = snprintf(out, outlen, "%.3000s/../reference/st_write/fixtures/%s", src, file);
    if (n < 0 || (size_t)n >= outlen) fail_msg("fixture path too long: %s", file);
}

static unsigned char *read_all(const char *path, size_t *len) {
    char err[ERR_LEN];
    char *data = NULL;
    if (util_read_file(path, 1 << 20, &data, len, err, sizeof err) != 0) fail_msg("%s", err);
    return (unsigned char *)data;
}

/* Loads the fixture's float32 inputs into outs (names from targets). */
static void load_inputs(st_file *in, st_out_tensor *outs, float **values) {
    char path[PATH_MAX], err[ERR_LEN];
    fixture(path, sizeof path, "input.safetensors");
    if (st_open(path, in, err, sizeof err) != 0) fail_msg("%s", err);
    for (size_t i = 0; i < NTARGETS; i++) {
        const st_tensor *t = st_find(in, targets[i].name);
        if (!t) fail_msg("input has no %s", targets[i].name);
        values[i] = malloc((t->count ? t->count : 1) * sizeof(float));
        assert_non_null(values[i]);
        assert_int_equal(st_to_f32(in, t, values[i], err, sizeof err), 0);
        memset(&outs[i], 0, sizeof outs[i]);
        outs[i].name = targets[i].name;
        outs[i].dtype = targets[i].dtype;
        outs[i].ndim = t->ndim;
        memcpy(outs[i].shape, t->shape, sizeof t->shape);
        outs[i].data = values[i];
    }
}

/* Same bytes as the Python writer, and the values read back as written. */
static void test_matches_reference(void **state) {
    (void)state;
    st_file in;
    st_out_tensor outs[NTARGETS];
    float *values[NTARGETS];
    load_inputs(&in, outs, values);

    char path[PATH_MAX], want_path[PATH_MAX], err[ERR_LEN];
    snprintf(path, sizeof path, "%s/out.safetensors", test_dir);
    const char *const meta[] = {"format", "pt", NULL};
    if (st_write_file(path, outs, NTARGETS, meta, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(count_entries(), 1);

    fixture(want_path, sizeof want_path, "expected.safetensors");
    size_t got_len, want_len;
    unsigned char *got = read_all(path, &got_len), *want = read_all(want_path, &want_len);
    assert_int_equal(got_len, want_len);
    for (size_t i = 0; i < want_len; i++)
        if (got[i] != want[i]) fail_msg("byte %zu: 0x%02x, reference 0x%02x", i, got[i], want[i]);
    free(got);
    free(want);

    st_file back;
    if (st_open(path, &back, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(back.data_offset % 8, 0);
    assert_int_equal(back.ntensors, NTARGETS);
    for (size_t i = 0; i < NTARGETS; i++) {
        const st_tensor *t = st_find(&back, targets[i].name);
        assert_non_null(t);
        assert_int_equal(t->dtype, targets[i].dtype);
        assert_int_equal(t->ndim, outs[i].ndim);
        float *v = malloc((t->count ? t->count : 1) * sizeof(float));
        assert_non_null(v);
        assert_int_equal(st_to_f32(&back, t, v, err, sizeof err), 0);
        for (size_t k = 0; k < t->count; k++) {
            float src = values[i][k];
            float expect = targets[i].dtype == ST_F32    ? src
                           : targets[i].dtype == ST_F16 ? st_f16_to_f32(st_f32_to_f16(src))
                                                        : st_bf16_to_f32(st_f32_to_bf16(src));
            if (isnan(expect)) {
                assert_true(isnan(v[k]));
                continue;
            }
            if (memcmp(&v[k], &expect, sizeof expect) != 0)
                fail_msg("%s[%zu]: %.9g, expected %.9g", targets[i].name, k, v[k], expect);
            if (targets[i].dtype == ST_F32) continue;
            /* rounding moved the value by at most half a unit of the stored
             * precision (relative 2^-11 for F16 normals, 2^-8 for BF16) */
            double tol = targets[i].dtype == ST_F16 ? 0x1p-11 : 0x1p-8;
            if (isfinite(v[k]) && fabs(v[k]) >= 0x1p-14)
                assert_true(fabs((double)v[k] - src) <= tol * fabs((double)src));
        }
        free(v);
    }
    st_close(&back);
    for (size_t i = 0; i < NTARGETS; i++) free(values[i]);
    st_close(&in);
    assert_int_equal(unlink(path), 0);
}

/* f32 -> f16 -> f32 is the identity on every binary16 value (NaNs stay NaN),
 * and on every bfloat16 value for bf16; and a few values between them round
 * to nearest, ties to even. */
static void test_conversions(void **state) {
    (void)state;
    for (uint32_t h = 0; h <= 0xffff; h++) {
        float f = st_f16_to_f32((uint16_t)h);
        uint16_t back = st_f32_to_f16(f);
        if (isnan(f)) {
            assert_int_equal(back, (h & 0x8000u) | 0x7e00u);
            continue;
        }
        if (back != h) fail_msg("f16 0x%04x -> %.9g -> 0x%04x", h, f, back);
        float b = st_bf16_to_f32((uint16_t)h);
        uint16_t bback = st_f32_to_bf16(b);
        if (isnan(b))
            assert_int_equal(bback, 0x7fc0);
        else if (bback != h)
            fail_msg("bf16 0x%04x -> %.9g -> 0x%04x", h, b, bback);
    }
    /* halfway between consecutive halves: to the even one */
    assert_int_equal(st_f32_to_f16(1.0f + 0x1p-11f), 0x3c00);
    assert_int_equal(st_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);
    assert_int_equal(st_f32_to_f16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);
    assert_int_equal(st_f32_to_f16(65504.0f), 0x7bff);
    assert_int_equal(st_f32_to_f16(65519.996f), 0x7bff);
    assert_int_equal(st_f32_to_f16(65520.0f), 0x7c00);
    assert_int_equal(st_f32_to_f16(-INFINITY), 0xfc00);
    assert_int_equal(st_f32_to_f16(0x1p-25f), 0x0000);
    assert_int_equal(st_f32_to_f16(0x1p-25f + 0x1p-40f), 0x0001);
    assert_int_equal(st_f32_to_f16(0x1p-14f - 0x1p-25f), 0x0400); /* up into the normals */
    assert_int_equal(st_f32_to_f16(-0.0f), 0x8000);
    assert_int_equal(st_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
    assert_int_equal(st_f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
    assert_int_equal(st_f32_to_bf16(3.4028235e38f), 0x7f80);
}

/* An empty file (no tensors, no metadata) is the reference's "{}" padded. */
static void test_empty(void **state) {
    (void)state;
    char path[PATH_MAX], err[ERR_LEN];
    snprintf(path, sizeof path, "%s/empty.safetensors", test_dir);
    if (st_write_file(path, NULL, 0, NULL, err, sizeof err) != 0) fail_msg("%s", err);
    size_t len;
    unsigned char *got = read_all(path, &len);
    static const unsigned char want[] = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '};
    assert_int_equal(len, sizeof want);
    assert_memory_equal(got, want, sizeof want);
    free(got);
    assert_int_equal(unlink(path), 0);
}

/* Each bad input is refused naming the tensor; the old file is untouched and
 * no temporary file stays. */
static void test_refused(void **state) {
    (void)state;
    char path[PATH_MAX], err[ERR_LEN];
    snprintf(path, sizeof path, "%s/keep.safetensors", test_dir);
    float one = 1.0f;
    st_out_tensor ok = {.name = "w", .dtype = ST_F32, .ndim = 1, .shape = {1}, .data = &one};
    if (st_write_file(path, &ok, 1, NULL, err, sizeof err) != 0) fail_msg("%s", err);
    size_t len0;
    unsigned char *before = read_all(path, &len0);

    st_out_tensor bad[2] = {ok, ok};
    bad[1].dtype = ST_F16; /* same name, another dtype: still a repeat */
    assert_int_equal(st_write_file(path, bad, 2, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "w: name repeated"));

    bad[1] = ok;
    bad[1].name = "x";
    bad[1].dtype = ST_I64;
    assert_int_equal(st_write_file(path, bad, 2, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "x: dtype I64"));

    bad[1].dtype = ST_BF16;
    bad[1].name = "__metadata__";
    assert_int_equal(st_write_file(path, bad, 2, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "__metadata__: reserved"));

    bad[1].name = "\xff\xfe";
    assert_int_equal(st_write_file(path, bad, 2, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "not UTF-8"));

    bad[1].name = "big";
    bad[1].ndim = 3;
    bad[1].shape[0] = bad[1].shape[1] = bad[1].shape[2] = (size_t)1 << 30;
    assert_int_equal(st_write_file(path, bad, 2, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "big: shape overflows"));

    bad[1].ndim = ST_MAX_DIMS + 1;
    assert_int_equal(st_write_file(path, bad, 2, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "big: 9 dimensions"));

    bad[1].ndim = 1;
    bad[1].shape[0] = 2;
    bad[1].data = NULL;
    assert_int_equal(st_write_file(path, bad, 2, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "big: no data"));

    const char *const dup_meta[] = {"format", "pt", "format", "np", NULL};
    assert_int_equal(st_write_file(path, &ok, 1, dup_meta, err, sizeof err), -1);
    assert_non_null(strstr(err, "format: key repeated"));

    char missing[PATH_MAX];
    snprintf(missing, sizeof missing, "%s/no/such/dir/x.safetensors", test_dir);
    assert_int_equal(st_write_file(missing, &ok, 1, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "no/such/dir"));

    size_t len1;
    unsigned char *after = read_all(path, &len1);
    assert_int_equal(len0, len1);
    assert_memory_equal(before, after, len0);
    free(before);
    free(after);
    assert_int_equal(count_entries(), 1);
    assert_int_equal(unlink(path), 0);
}

/* A tensor larger than the 64 KiB conversion chunk, several metadata keys
 * given out of order (written sorted), read back exactly. */
static void test_large_and_metadata(void **state) {
    (void)state;
    char path[PATH_MAX], err[ERR_LEN];
    snprintf(path, sizeof path, "%s/big.safetensors", test_dir);
    size_t n = 3 * 65536 + 7;
    float *v = malloc(n * sizeof *v);
    assert_non_null(v);
    uint32_t s = 12345;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        v[i] = ((float)(s >> 8) / 16777216.0f - 0.5f) * 3.0f;
    }
    st_out_tensor t[2] = {
        {.name = "h", .dtype = ST_F16, .ndim = 2, .shape = {n / 7, 7}, .data = v},
        {.name = "f", .dtype = ST_F32, .ndim = 1, .shape = {n}, .data = v},
    };
    const char *const meta[] = {"z", "last", "a", "first\n", NULL};
    if (st_write_file(path, t, 2, meta, err, sizeof err) != 0) fail_msg("%s", err);
    st_file f;
    if (st_open(path, &f, err, sizeof err) != 0) fail_msg("%s", err);
    const char *header = (const char *)f.base + 8;
    static const char want_header[] = "{\"__metadata__\":{\"a\":\"first\\n\",\"z\":\"last\"},\"f\":";
    if (strncmp(header, want_header, sizeof want_header - 1) != 0) fail_msg("header: %.80s", header);
    float *back = malloc(n * sizeof *back);
    assert_non_null(back);
    const st_tensor *tf = st_find(&f, "f"), *th = st_find(&f, "h");
    assert_non_null(tf);
    assert_non_null(th);
    assert_int_equal(th->count, n / 7 * 7);
    assert_int_equal(st_to_f32(&f, tf, back, err, sizeof err), 0);
    assert_memory_equal(back, v, n * sizeof *v);
    assert_int_equal(st_to_f32(&f, th, back, err, sizeof err), 0);
    for (size_t i = 0; i < th->count; i++) {
        float want = st_f16_to_f32(st_f32_to_f16(v[i]));
        if (back[i] != want) fail_msg("h[%zu]: %.9g, expected %.9g", i, back[i], want);
    }
    st_close(&f);
    free(back);
    free(v);
    assert_int_equal(unlink(path), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_reference),
        cmocka_unit_test(test_conversions),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_large_and_metadata),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
