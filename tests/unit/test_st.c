/* test_st.c - the safetensors reader: files written here by hand (a header
 * string and data bytes, independent of st.c), read back value for value, and
 * every kind of malformed file refused with a message naming the file and the
 * tensor. Conversions: every binary16 value against npy.c's independent
 * half -> double, bfloat16 by its bit pattern. All comparisons are exact. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/npy.h"
#include "common/st.h"
#include "common/util.h"
#include "tests/unit/testutil.h"

static char test_dir[64];

static int setup_dir(void **state) {
    (void)state;
    return tu_mkdtemp(test_dir, sizeof test_dir, "st");
}

static int teardown_dir(void **state) {
    (void)state;
    return tu_rmtree(test_dir);
}

/* Writes [8-byte length][header][data] to test_dir/name. hlen_override, when
 * non-zero, is written as the length field instead of strlen(header). */
static void write_st(const char *name, const char *header, uint64_t hlen_override,
                     const void *data, size_t data_len, char *path, size_t pathlen) {
    snprintf(path, pathlen, "%s/%s", test_dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    uint64_t n = hlen_override ? hlen_override : strlen(header);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(n >> (8 * i));
    assert_int_equal(fwrite(len8, 1, 8, f), 8);
    size_t h = strlen(header);
    if (h) assert_int_equal(fwrite(header, 1, h, f), h);
    if (data_len) assert_int_equal(fwrite(data, 1, data_len, f), data_len);
    fclose(f);
}

/* Opens a file that must be refused; checks that err names the file and
 * holds every one of the given fragments. */
static void expect_refused(const char *name, const char *header, uint64_t hlen,
                           const void *data, size_t data_len, const char *frag1,
                           const char *frag2) {
    char path[PATH_MAX], err[ERR_LEN] = "";
    write_st(name, header, hlen, data, data_len, path, sizeof path);
    st_file f;
    assert_int_equal(st_open(path, &f, err, sizeof err), -1);
    if (!strstr(err, path) || !strstr(err, frag1) || (frag2 && !strstr(err, frag2)))
        fail_msg("%s: unexpected error: %s", name, err);
    assert_null(f.tensors);
    assert_null(f.map);
}

static void test_round_trip(void **state) {
    (void)state;
    /* A: F32 (2, 3) at 0..24, B: F16 (4) at 24..32, C: BF16 (2, 2) at
     * 32..40, D: I64 scalar at 40..48, E: F32 (0, 5) empty at 48..48.
     * The header has an odd length, so the data section is unaligned. */
    const char *hdr =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"B\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[24,32]},"
        "\"A\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
        "\"E\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[48,48]},"
        "\"D\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[40,48]},"
        "\"C\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[32,40]}}   ";
    assert_true(strlen(hdr) % 2 == 1);
    unsigned char data[48];
    const float a[6] = {1.5f, -2.25f, 3.0e-8f, 65504.0f, -0.0f, 1234.5678f};
    memcpy(data, a, sizeof a);
    const uint16_t b[4] = {0x3c00 /* 1 */, 0xc000 /* -2 */, 0x0001 /* 2^-24 */, 0x7bff};
    const uint16_t c[4] = {0x3f80 /* 1 */, 0xc040 /* -3 */, 0x4049 /* 3.140625 */, 0x0080};
    for (int i = 0; i < 4; i++) {
        data[24 + 2 * i] = (unsigned char)(b[i] & 0xff);
        data[25 + 2 * i] = (unsigned char)(b[i] >> 8);
        data[32 + 2 * i] = (unsigned char)(c[i] & 0xff);
        data[33 + 2 * i] = (unsigned char)(c[i] >> 8);
    }
    int64_t d = -42;
    memcpy(data + 40, &d, sizeof d);
    char path[PATH_MAX], err[ERR_LEN] = "";
    write_st("ok.safetensors", hdr, 0, data, sizeof data, path, sizeof path);

    st_file f;
    if (st_open(path, &f, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(f.ntensors, 5);
    assert_int_equal(f.data_offset, 8 + strlen(hdr));
    /* Sorted by offset: A, B, C, D then the empty E. */
    assert_string_equal(f.tensors[0].name, "A");
    assert_string_equal(f.tensors[4].name, "E");

    const st_tensor *t = st_find(&f, "A");
    assert_non_null(t);
    assert_int_equal(t->dtype, ST_F32);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], 2);
    assert_int_equal(t->shape[1], 3);
    assert_int_equal(t->count, 6);
    float out[6];
    assert_int_equal(st_to_f32(&f, t, out, err, sizeof err), 0);
    assert_memory_equal(out, a, sizeof a);

    t = st_find(&f, "B");
    assert_non_null(t);
    assert_int_equal(st_to_f32(&f, t, out, err, sizeof err), 0);
    assert_true(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0x1p-24f && out[3] == 65504.0f);

    t = st_find(&f, "C");
    assert_non_null(t);
    assert_int_equal(st_to_f32(&f, t, out, err, sizeof err), 0);
    assert_true(out[0] == 1.0f && out[1] == -3.0f && out[2] == 3.140625f);
    assert_true(out[3] == 0x1p-126f); /* bf16 0x0080: the smallest normal */

    t = st_find(&f, "D");
    assert_non_null(t);
    assert_int_equal(t->ndim, 0);
    assert_int_equal(t->count, 1);
    assert_int_equal(t->dtype, ST_I64);
    int64_t got;
    memcpy(&got, t->data, sizeof got);
    assert_int_equal(got, -42);
    /* Integers are not converted: the caller learns which tensor and dtype. */
    assert_int_equal(st_to_f32(&f, t, out, err, sizeof err), -1);
    assert_non_null(strstr(err, "tensor D"));
    assert_non_null(strstr(err, "I64"));

    t = st_find(&f, "E");
    assert_non_null(t);
    assert_int_equal(t->count, 0);
    assert_null(st_find(&f, "F"));
    assert_null(st_find(&f, "__metadata__"));
    st_close(&f);
    assert_null(f.map);
}

/* A tensor several pages long survives st_release: the pages come back
 * from the file when read again. */
static void test_release(void **state) {
    (void)state;
    size_t n = 5000; /* 20000 bytes: at least three whole pages */
    float *v = malloc(n * sizeof *v);
    assert_non_null(v);
    for (size_t i = 0; i < n; i++) v[i] = (float)i * 0.5f - 7.0f;
    char hdr[128], path[PATH_MAX], err[ERR_LEN];
    snprintf(hdr, sizeof hdr,
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[%zu],\"data_offsets\":[0,%zu]}}", n,
             n * sizeof *v);
    write_st("big.safetensors", hdr, 0, v, n * sizeof *v, path, sizeof path);
    st_file f;
    if (st_open(path, &f, err, sizeof err) != 0) fail_msg("%s", err);
    const st_tensor *t = st_find(&f, "w");
    assert_non_null(t);
    float *out = malloc(n * sizeof *out);
    assert_non_null(out);
    assert_int_equal(st_to_f32(&f, t, out, err, sizeof err), 0);
    st_release(&f, t);
    assert_memory_equal(out, v, n * sizeof *v);
    memset(out, 0, n * sizeof *out);
    assert_int_equal(st_to_f32(&f, t, out, err, sizeof err), 0);
    assert_memory_equal(out, v, n * sizeof *v);
    st_close(&f);
    free(out);
    free(v);
}

/* st_parse on a caller's buffer names the label in its errors. */
static void test_parse_buffer(void **state) {
    (void)state;
    const char *hdr = "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    size_t h = strlen(hdr);
    unsigned char buf[256] = {0};
    buf[0] = (unsigned char)h;
    memcpy(buf + 8, hdr, h);
    float one = 1.0f;
    memcpy(buf + 8 + h, &one, 4);
    st_file f;
    char err[ERR_LEN];
    assert_int_equal(st_parse(buf, 8 + h + 4, "mem", &f, err, sizeof err), 0);
    assert_int_equal(f.ntensors, 1);
    float out;
    assert_int_equal(st_to_f32(&f, st_find(&f, "x"), &out, err, sizeof err), 0);
    assert_true(out == 1.0f);
    st_release(&f, st_find(&f, "x")); /* no mapping: nothing to release */
    st_close(&f);
    /* One byte short: the tensor runs past the end. */
    assert_int_equal(st_parse(buf, 8 + h + 3, "mem", &f, err, sizeof err), -1);
    assert_non_null(strstr(err, "mem: tensor x"));
    assert_int_equal(st_parse(buf, 7, "mem", &f, err, sizeof err), -1);
    assert_non_null(strstr(err, "too short"));
}

static void test_errors(void **state) {
    (void)state;
    unsigned char z[64] = {0};
    char path[PATH_MAX], err[ERR_LEN];
    st_file f;

    /* Shorter than the length field. */
    snprintf(path, sizeof path, "%s/tiny.safetensors", test_dir);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    fwrite("\x02\0\0", 1, 3, fp);
    fclose(fp);
    assert_int_equal(st_open(path, &f, err, sizeof err), -1);
    assert_non_null(strstr(err, "too short"));

    expect_refused("hlen_beyond.safetensors", "{}", 1000, NULL, 0, "beyond the end", "truncated");
    expect_refused("hlen_huge.safetensors", "{}", (uint64_t)1 << 62, NULL, 0, "over the limit",
                   NULL);
    expect_refused("not_json.safetensors", "{\"a\":", 0, NULL, 0, "not valid JSON", NULL);
    expect_refused("not_object.safetensors", "[1,2]", 0, NULL, 0, "not a JSON object", NULL);
    expect_refused("dup.safetensors",
                   "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                   "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                   0, z, 8, "not valid JSON", "duplicate");
    expect_refused("dtype.safetensors",
                   "{\"w\":{\"dtype\":\"F17\",\"shape\":[1],\"data_offsets\":[0,4]}}", 0, z, 4,
                   "tensor w", "unknown dtype \"F17\"");
    expect_refused("dtype_type.safetensors",
                   "{\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 0, z, 4,
                   "tensor w", "dtype");
    expect_refused("neg_dim.safetensors",
                   "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 0, z, 4,
                   "tensor w", "shape[0]");
    expect_refused("dim_type.safetensors",
                   "{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 0, z, 4,
                   "tensor w", "shape[0]");
    expect_refused("dims.safetensors",
                   "{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],"
                   "\"data_offsets\":[0,4]}}",
                   0, z, 4, "tensor w", "9 dimensions");
    expect_refused("overflow.safetensors",
                   "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],"
                   "\"data_offsets\":[0,4]}}",
                   0, z, 4, "tensor w", "overflows");
    expect_refused("overflow_bytes.safetensors",
                   "{\"w\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],"
                   "\"data_offsets\":[0,4]}}",
                   0, z, 4, "tensor w", "overflows");
    expect_refused("size.safetensors",
                   "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 0, z,
                   12, "tensor w", "12 bytes of data");
    expect_refused("backwards.safetensors",
                   "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 0, z, 8,
                   "tensor w", "before begin");
    expect_refused("offsets3.safetensors",
                   "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 0, z, 8,
                   "tensor w", "data_offsets");
    expect_refused("offset_neg.safetensors",
                   "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 0, z, 4,
                   "tensor w", "non-negative");
    expect_refused("truncated.safetensors",
                   "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 0, z, 15,
                   "tensor w", "truncated");
    expect_refused("overlap.safetensors",
                   "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                   "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                   0, z, 12, "tensor b", "overlap");
    expect_refused("same_range.safetensors",
                   "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                   "\"b\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                   0, z, 8, "tensor", "overlap");
    expect_refused("hole.safetensors",
                   "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                   "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
                   0, z, 12, "tensor b", "hole");
    expect_refused("trailing.safetensors",
                   "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 0, z, 9,
                   "5 bytes", "after the last tensor");
    expect_refused("meta.safetensors",
                   "{\"__metadata__\":{\"n\":3},"
                   "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                   0, z, 4, "__metadata__", "n is not a string");
    expect_refused("entry.safetensors", "{\"a\":[1]}", 0, z, 0, "tensor a", "not an object");
    expect_refused("extra_key.safetensors",
                   "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 0,
                   z, 4, "tensor a", "unexpected keys");
    expect_refused("no_shape.safetensors",
                   "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 0, z, 4, "tensor a",
                   "shape");

    snprintf(path, sizeof path, "%s/absent.safetensors", test_dir);
    assert_int_equal(st_open(path, &f, err, sizeof err), -1);
    assert_non_null(strstr(err, "absent.safetensors"));
    assert_int_equal(st_open(test_dir, &f, err, sizeof err), -1);
    assert_non_null(strstr(err, "not a regular file"));
}

/* Every binary16 pattern against npy.c's conversion (written separately),
 * and the bfloat16 patterns that matter. */
static void test_conversions(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = st_f16_to_f32((uint16_t)h);
        double ref = npy_half_to_double((uint16_t)h);
        if (isnan(ref)) {
            assert_true(isnan(f));
            continue;
        }
        if ((double)f != ref || !signbit(f) != !signbit(ref))
            fail_msg("f16 0x%04x: %a, expected %a", h, (double)f, ref);
    }
    assert_true(st_bf16_to_f32(0x0000) == 0.0f && !signbit(st_bf16_to_f32(0x0000)));
    assert_true(st_bf16_to_f32(0x8000) == 0.0f && signbit(st_bf16_to_f32(0x8000)));
    assert_true(isinf(st_bf16_to_f32(0x7f80)) && st_bf16_to_f32(0x7f80) > 0);
    assert_true(isinf(st_bf16_to_f32(0xff80)) && st_bf16_to_f32(0xff80) < 0);
    assert_true(isnan(st_bf16_to_f32(0x7fc0)));
    assert_true(st_bf16_to_f32(0x0001) == 0x1p-133f); /* smallest subnormal */
    assert_true(st_bf16_to_f32(0x4280) == 64.0f);
    assert_true(st_bf16_to_f32(0xbe80) == -0.25f);
    assert_string_equal(st_dtype_name(ST_BF16), "BF16");
    assert_int_equal(st_dtype_size(ST_F64), 8);
    assert_int_equal(st_dtype_size(ST_F8_E4M3), 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_release, setup_dir, teardown_dir),
        cmocka_unit_test(test_parse_buffer),
        cmocka_unit_test_setup_teardown(test_errors, setup_dir, teardown_dir),
        cmocka_unit_test(test_conversions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
