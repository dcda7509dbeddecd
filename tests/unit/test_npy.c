/* test_npy.c - .npy reading and writing: round trips for each dtype and
 * header version, fortran order, float16 specials, and every kind of broken
 * file rejected with the right message (files written into a mkdtemp dir). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/npy.h"
#include "common/util.h"
#include "tests/unit/testutil.h"

static char test_dir[64];

static int setup_dir(void **state) {
    (void)state;
    return tu_mkdtemp(test_dir, sizeof test_dir, "npy");
}

static int teardown_dir(void **state) {
    (void)state;
    return tu_rmtree(test_dir);
}

static void path_in_dir(char *out, size_t outlen, const char *name) {
    snprintf(out, outlen, "%s/%s", test_dir, name);
}

/* Writes a file by hand: magic, version, a header dict (padded with spaces
 * and a newline as numpy does, unless raw_len is given) and data bytes.
 * Independent of npy_write_*, so the reader is not only checked against
 * its own writer. */
static void write_raw(const char *name, int major, const char *dict, const void *data,
                      size_t data_len, char *path, size_t pathlen) {
    path_in_dir(path, pathlen, name);
    unsigned char buf[4096];
    size_t prefix = major == 1 ? 10 : 12;
    size_t dict_len = strlen(dict);
    size_t total = prefix + dict_len + 1;
    size_t padded = (total + 63) / 64 * 64;
    assert_true(padded <= sizeof buf);
    memcpy(buf, "\x93NUMPY", 6);
    buf[6] = (unsigned char)major;
    buf[7] = 0;
    size_t hl = padded - prefix;
    buf[8] = (unsigned char)(hl & 0xff);
    buf[9] = (unsigned char)((hl >> 8) & 0xff);
    if (major != 1) {
        buf[10] = (unsigned char)((hl >> 16) & 0xff);
        buf[11] = (unsigned char)((hl >> 24) & 0xff);
    }
    memcpy(buf + prefix, dict, dict_len);
    memset(buf + prefix + dict_len, ' ', padded - total);
    buf[padded - 1] = '\n';
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, padded, f), padded);
    if (data_len) assert_int_equal(fwrite(data, 1, data_len, f), data_len);
    fclose(f);
}

static void write_bytes(const char *name, const void *data, size_t len, char *path,
                        size_t pathlen) {
    path_in_dir(path, pathlen, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (len) assert_int_equal(fwrite(data, 1, len, f), len);
    fclose(f);
}

/* Expects npy_read_f64 to fail with a message containing needle. */
static void expect_read_error(const char *path, const char *needle) {
    char err[ERR_LEN] = "";
    double *data = NULL;
    assert_int_equal(npy_read_f64(path, &data, NULL, err, sizeof err), -1);
    assert_null(data);
    if (!strstr(err, needle)) fail_msg("error \"%s\" does not contain \"%s\"", err, needle);
}

static void test_roundtrip_dtypes(void **state) {
    (void)state;
    const size_t rows = 7, cols = 5;
    double m[35];
    for (size_t i = 0; i < rows * cols; i++) m[i] = sin((double)i * 1.7) * 100.0 + 0.3;
    const npy_dtype dtypes[3] = {NPY_F64, NPY_F32, NPY_F16};
    for (int t = 0; t < 3; t++) {
        char path[PATH_MAX], err[ERR_LEN];
        path_in_dir(path, sizeof path, "rt.npy");
        assert_int_equal(npy_write_f64(path, dtypes[t], 2, m, rows, cols, err, sizeof err), 0);
        double *back = NULL;
        npy_header h;
        assert_int_equal(npy_read_f64(path, &back, &h, err, sizeof err), 0);
        assert_int_equal(h.rows, rows);
        assert_int_equal(h.cols, cols);
        assert_int_equal(h.ndim, 2);
        assert_int_equal(h.dtype, dtypes[t]);
        assert_int_equal(h.version, 1);
        assert_int_equal(h.data_offset % 64, 0);
        for (size_t i = 0; i < rows * cols; i++) {
            double want = dtypes[t] == NPY_F64   ? m[i]
                          : dtypes[t] == NPY_F32 ? (double)(float)m[i]
                                                 : npy_half_to_double(npy_double_to_half(m[i]));
            assert_true(back[i] == want);
        }
        /* float16 keeps 11 significant bits: within 2^-11 relative. */
        if (dtypes[t] == NPY_F16)
            for (size_t i = 0; i < rows * cols; i++)
                assert_true(fabs(back[i] - m[i]) <= fabs(m[i]) * 0x1p-11);
        free(back);
    }
}

static void test_roundtrip_f32_writer_and_1d(void **state) {
    (void)state;
    char path[PATH_MAX], err[ERR_LEN];
    float f[6] = {1.5f, -2.25f, 3e30f, -0.0f, 1e-40f, 7.0f};
    path_in_dir(path, sizeof path, "f32.npy");
    assert_int_equal(npy_write_f32(path, f, 3, 2, err, sizeof err), 0);
    double *back = NULL;
    npy_header h;
    assert_int_equal(npy_read_f64(path, &back, &h, err, sizeof err), 0);
    assert_int_equal(h.dtype, NPY_F32);
    for (int i = 0; i < 6; i++) assert_true(back[i] == (double)f[i]);
    assert_true(signbit(back[3]));
    free(back);

    /* 1-D (N,) reads as N x 1. */
    double v[4] = {1, 2, 3, 4};
    path_in_dir(path, sizeof path, "vec.npy");
    assert_int_equal(npy_write_f64(path, NPY_F64, 1, v, 4, 1, err, sizeof err), 0);
    assert_int_equal(npy_read_f64(path, &back, &h, err, sizeof err), 0);
    assert_int_equal(h.ndim, 1);
    assert_int_equal(h.rows, 4);
    assert_int_equal(h.cols, 1);
    assert_true(back[3] == 4.0);
    free(back);
    assert_int_equal(npy_write_f64(path, NPY_F64, 1, v, 2, 2, err, sizeof err), -1);
}

static void test_header_versions(void **state) {
    (void)state;
    double data[6] = {1, 2, 3, 4, 5, 6.5};
    for (int major = 1; major <= 3; major++) {
        char path[PATH_MAX], err[ERR_LEN];
        write_raw("v.npy", major, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }",
                  data, sizeof data, path, sizeof path);
        double *back = NULL;
        npy_header h;
        assert_int_equal(npy_read_f64(path, &back, &h, err, sizeof err), 0);
        assert_int_equal(h.version, major);
        assert_int_equal(h.rows, 2);
        assert_int_equal(h.cols, 3);
        for (int i = 0; i < 6; i++) assert_true(back[i] == data[i]);
        free(back);
    }
}

static void test_key_order_and_descr_forms(void **state) {
    (void)state;
    float data[2] = {0.5f, -8.0f};
    const char *dicts[] = {
        "{'shape': (2,), 'fortran_order': False, 'descr': '<f4'}",
        "{\"descr\": \"f4\", \"fortran_order\": False, \"shape\": (2, 1)}",
        "{'descr': '=f4', 'fortran_order': True, 'shape': (1, 2), }",
        "{'descr': '|f4', 'fortran_order': False, 'shape': (2L, 1L), }",
    };
    for (size_t k = 0; k < sizeof dicts / sizeof dicts[0]; k++) {
        char path[PATH_MAX], err[ERR_LEN];
        write_raw("k.npy", 1, dicts[k], data, sizeof data, path, sizeof path);
        double *back = NULL;
        npy_header h;
        if (npy_read_f64(path, &back, &h, err, sizeof err) != 0) fail_msg("%s: %s", dicts[k], err);
        assert_int_equal(h.dtype, NPY_F32);
        assert_true(back[0] == 0.5 && back[1] == -8.0);
        free(back);
    }
}

static void test_fortran_order(void **state) {
    (void)state;
    /* The 2 x 3 matrix [[1, 2, 3], [4, 5, 6]] stored column by column. */
    double colmajor[6] = {1, 4, 2, 5, 3, 6};
    char path[PATH_MAX], err[ERR_LEN];
    write_raw("f.npy", 1, "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }", colmajor,
              sizeof colmajor, path, sizeof path);
    double *back = NULL;
    npy_header h;
    assert_int_equal(npy_read_f64(path, &back, &h, err, sizeof err), 0);
    assert_true(h.fortran_order);
    for (int i = 0; i < 6; i++) assert_true(back[i] == (double)(i + 1));
    free(back);

    /* Side-by-side read into a wider buffer (stride 5, offset 2). */
    double wide[10];
    for (int i = 0; i < 10; i++) wide[i] = -1;
    assert_int_equal(npy_read_f64_into(path, &h, wide + 2, 5, err, sizeof err), 0);
    const double want[10] = {-1, -1, 1, 2, 3, -1, -1, 4, 5, 6};
    for (int i = 0; i < 10; i++) assert_true(wide[i] == want[i]);
}

static void test_half_specials(void **state) {
    (void)state;
    assert_true(npy_half_to_double(0x0000) == 0.0);
    assert_true(signbit(npy_half_to_double(0x8000)));
    assert_true(npy_half_to_double(0x0001) == 0x1p-24);          /* smallest subnormal */
    assert_true(npy_half_to_double(0x03ff) == 1023 * 0x1p-24);    /* largest subnormal */
    assert_true(npy_half_to_double(0x0400) == 0x1p-14);           /* smallest normal */
    assert_true(npy_half_to_double(0x3c00) == 1.0);
    assert_true(npy_half_to_double(0xc000) == -2.0);
    assert_true(npy_half_to_double(0x7bff) == 65504.0);
    assert_true(isinf(npy_half_to_double(0x7c00)) && npy_half_to_double(0x7c00) > 0);
    assert_true(isinf(npy_half_to_double(0xfc00)) && npy_half_to_double(0xfc00) < 0);
    assert_true(isnan(npy_half_to_double(0x7e00)));
    assert_true(isnan(npy_half_to_double(0x7c01)));

    assert_int_equal(npy_double_to_half(65504.0), 0x7bff);
    assert_int_equal(npy_double_to_half(65519.0), 0x7bff);
    assert_int_equal(npy_double_to_half(65520.0), 0x7c00);
    assert_int_equal(npy_double_to_half(-1e300), 0xfc00);
    assert_int_equal(npy_double_to_half(INFINITY), 0x7c00);
    assert_int_equal(npy_double_to_half(NAN) & 0x7c00, 0x7c00);
    assert_true((npy_double_to_half(NAN) & 0x03ff) != 0);
    assert_int_equal(npy_double_to_half(0x1p-25), 0x0000);      /* tie to even: 0 */
    assert_int_equal(npy_double_to_half(3 * 0x1p-25), 0x0002);  /* tie to even: 2 */
    assert_int_equal(npy_double_to_half(0x1p-26), 0x0000);
    assert_int_equal(npy_double_to_half(1.0 + 0x1p-11), 0x3c00); /* tie to even: 1.0 */
    assert_int_equal(npy_double_to_half(1.0 + 3 * 0x1p-11), 0x3c02);
    assert_int_equal(npy_double_to_half(-0.0), 0x8000);
    assert_int_equal(npy_double_to_half(2047 * 0x1p-25), 0x0400); /* rounds up into normals */

    /* Every non-NaN half survives the trip through double. */
    for (uint32_t v = 0; v < 0x10000; v++) {
        uint16_t hv = (uint16_t)v;
        if ((hv & 0x7c00) == 0x7c00 && (hv & 0x03ff)) continue;
        assert_int_equal(npy_double_to_half(npy_half_to_double(hv)), hv);
    }
}

static void test_half_file_specials(void **state) {
    (void)state;
    uint16_t raw[6] = {0x0001, 0x7c00, 0xfc00, 0x7e00, 0x3555, 0x8400};
    char path[PATH_MAX], err[ERR_LEN];
    write_raw("h.npy", 1, "{'descr': '<f2', 'fortran_order': False, 'shape': (3, 2), }", raw,
              sizeof raw, path, sizeof path);
    double *back = NULL;
    assert_int_equal(npy_read_f64(path, &back, NULL, err, sizeof err), 0);
    assert_true(back[0] == 0x1p-24);
    assert_true(isinf(back[1]) && back[1] > 0);
    assert_true(isinf(back[2]) && back[2] < 0);
    assert_true(isnan(back[3]));
    assert_true(fabs(back[4] - 1.0 / 3.0) < 1e-3);
    assert_true(back[5] == -0x1p-14);
    free(back);
}

static void test_rejects_bad_files(void **state) {
    (void)state;
    char path[PATH_MAX];
    double d[8] = {0};

    write_bytes("tiny.npy", "\x93NUM", 4, path, sizeof path);
    expect_read_error(path, "truncated header");

    write_bytes("magic.npy", "PK\x03\x04zipfile.....", 16, path, sizeof path);
    expect_read_error(path, "not an .npy file");

    write_raw("ver.npy", 4, "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", d, 8,
              path, sizeof path);
    expect_read_error(path, "unsupported .npy format version 4.0");

    /* The header announces more bytes than the file holds. */
    unsigned char shorthdr[20] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 200, 0, '{', '\'', 'd'};
    write_bytes("shorthdr.npy", shorthdr, sizeof shorthdr, path, sizeof path);
    expect_read_error(path, "truncated header");

    /* A v2 header length far beyond the limit is refused before reading it. */
    unsigned char huge[16] = {0x93, 'N', 'U', 'M', 'P', 'Y', 2, 0, 0, 0, 0x10, 0, '{', '}'};
    write_bytes("huge.npy", huge, sizeof huge, path, sizeof path);
    expect_read_error(path, "exceeds the limit");

    write_raw("be.npy", 1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", d, 8,
              path, sizeof path);
    expect_read_error(path, "big-endian dtype '>f4' is not supported");

    write_raw("int.npy", 1, "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }", d, 8,
              path, sizeof path);
    expect_read_error(path, "unsupported dtype '<i8'");

    write_raw("struct.npy", 1,
              "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", d, 4, path,
              sizeof path);
    expect_read_error(path, "structured");

    write_raw("3d.npy", 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2, 2), }", d,
              64, path, sizeof path);
    expect_read_error(path, "3-dimensional arrays are not supported");

    write_raw("0d.npy", 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (), }", d, 8, path,
              sizeof path);
    expect_read_error(path, "0-dimensional");

    write_raw("trunc.npy", 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }", d,
              24, path, sizeof path);
    expect_read_error(path, "truncated data");

    write_raw("trail.npy", 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }", d,
              24, path, sizeof path);
    expect_read_error(path, "8 unexpected bytes after the data");

    write_raw("noshape.npy", 1, "{'descr': '<f8', 'fortran_order': False, }", d, 8, path,
              sizeof path);
    expect_read_error(path, "missing 'shape'");

    write_raw("extra.npy", 1,
              "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), 'x': 1, }", d, 8, path,
              sizeof path);
    expect_read_error(path, "unexpected key 'x'");

    write_raw("dup.npy", 1, "{'descr': '<f8', 'descr': '<f8', 'shape': (1,), }", d, 8, path,
              sizeof path);
    expect_read_error(path, "unexpected key 'descr'");

    write_raw("badorder.npy", 1, "{'descr': '<f8', 'fortran_order': 0, 'shape': (1,), }", d, 8,
              path, sizeof path);
    expect_read_error(path, "bad 'fortran_order'");

    write_raw("negshape.npy", 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (-1,), }", d,
              8, path, sizeof path);
    expect_read_error(path, "bad 'shape'");

    write_raw("overflow.npy", 1,
              "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", d,
              8, path, sizeof path);
    expect_read_error(path, "too large");

    write_raw("bigdim.npy", 1,
              "{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
              d, 8, path, sizeof path);
    expect_read_error(path, "bad 'shape'");

    path_in_dir(path, sizeof path, "missing.npy");
    expect_read_error(path, "No such file");
}

/* The server parses a prefix of an uploaded file. */
static void test_parse_header_from_buffer(void **state) {
    (void)state;
    char path[PATH_MAX], err[ERR_LEN];
    double m[12] = {0};
    path_in_dir(path, sizeof path, "hdr.npy");
    assert_int_equal(npy_write_f64(path, NPY_F16, 2, m, 4, 3, err, sizeof err), 0);
    unsigned char buf[256];
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    ssize_t got = read(fd, buf, sizeof buf);
    assert_true(got > 64);
    npy_header h;
    assert_int_equal(npy_read_header_fd(fd, &h, err, sizeof err), 0);
    close(fd);
    assert_int_equal(h.rows, 4);
    assert_int_equal(h.cols, 3);
    assert_string_equal(npy_dtype_name(h.dtype), "float16");
    assert_int_equal(h.data_bytes, 24);
    memset(&h, 0, sizeof h);
    assert_int_equal(npy_parse_header(buf, (size_t)got, &h, err, sizeof err), 0);
    assert_int_equal(h.rows, 4);
    assert_int_equal(h.dtype, NPY_F16);
    /* A prefix shorter than the header says how much is missing. */
    assert_int_equal(npy_parse_header(buf, 40, &h, err, sizeof err), -1);
    assert_non_null(strstr(err, "truncated header (needs 128 bytes, have 40)"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_roundtrip_dtypes, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_roundtrip_f32_writer_and_1d, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_header_versions, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_key_order_and_descr_forms, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_fortran_order, setup_dir, teardown_dir),
        cmocka_unit_test(test_half_specials),
        cmocka_unit_test_setup_teardown(test_half_file_specials, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_rejects_bad_files, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_parse_header_from_buffer, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
