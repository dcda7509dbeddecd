/* fuzz_npy.c - fuzz target for the .npy reader. The input is a whole file.
 *
 * It goes through npy_parse_header as raw bytes, then through the path the
 * worker takes for an uploaded artifact (npy_read_header_fd, npy_read_f64,
 * npy_read_f64_into) as an in-memory file (memfd, opened again by its
 * /proc/self/fd name, so nothing touches the disk). Beyond "no crash, no
 * leak", it checks what npy.h promises: an accepted header describes a 1-D or
 * 2-D float array whose offsets and sizes agree; a file is read only when it
 * holds exactly the data the header announces; and every element read equals
 * the one stored, wherever row-major or Fortran order put it. */
#include "tests/fuzz/fuzz.h"

#include <math.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/npy.h"
#include "common/util.h"

/* One memfd for the whole run: a fresh one per input would cost a syscall
 * storm and, under libFuzzer, file descriptors. */
static int fuzz_npy_fd = -1;
static char fuzz_npy_path[64];

/* Replaces the memfd's contents with data. Returns 0 or -1. */
static int fuzz_npy_store(const uint8_t *data, size_t size) {
    if (fuzz_npy_fd < 0) {
        fuzz_npy_fd = memfd_create("fuzz_npy", MFD_CLOEXEC);
        if (fuzz_npy_fd < 0) return -1;
        snprintf(fuzz_npy_path, sizeof fuzz_npy_path, "/proc/self/fd/%d", fuzz_npy_fd);
    }
    if (ftruncate(fuzz_npy_fd, 0) != 0) return -1;
    size_t done = 0;
    while (done < size) {
        ssize_t w = pwrite(fuzz_npy_fd, data + done, size - done, (off_t)done);
        if (w <= 0) return -1;
        done += (size_t)w;
    }
    return 0;
}

/* The element at storage index k of the data, converted independently of
 * npy.c's streaming code. */
static double fuzz_npy_element(const uint8_t *data, const npy_header *h, size_t k) {
    const uint8_t *p = data + h->data_offset + k * h->itemsize;
    switch (h->dtype) {
    case NPY_F16: return npy_half_to_double((uint16_t)(p[0] | p[1] << 8));
    case NPY_F32: {
        float f;
        memcpy(&f, p, sizeof f);
        return (double)f;
    }
    case NPY_F64: {
        double d;
        memcpy(&d, p, sizeof d);
        return d;
    }
    }
    abort();
}

/* Equal as stored values: bit for bit, except that any NaN equals any NaN
 * (float -> double conversion may quiet a signalling NaN). */
static int fuzz_npy_same(double a, double b) {
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    return memcmp(&a, &b, sizeof a) == 0;
}

/* Checks that m (rows x stride, file's cols used) holds the file's elements. */
static void fuzz_npy_check_values(const uint8_t *data, const npy_header *h, const double *m,
                                  size_t stride) {
    if (h->cols == 0) return;
    for (size_t i = 0; i < h->rows; i++)
        for (size_t j = 0; j < h->cols; j++) {
            size_t k = h->fortran_order ? j * h->rows + i : i * h->cols + j;
            FUZZ_CHECK(fuzz_npy_same(m[i * stride + j], fuzz_npy_element(data, h, k)));
        }
}

/* What an accepted header must satisfy, from npy.h. */
static void fuzz_npy_check_header(const npy_header *h, size_t size) {
    static const size_t itemsize[] = {2, 4, 8};
    FUZZ_CHECK(h->version >= 1 && h->version <= 3);
    FUZZ_CHECK(h->dtype == NPY_F16 || h->dtype == NPY_F32 || h->dtype == NPY_F64);
    FUZZ_CHECK(h->itemsize == itemsize[h->dtype]);
    FUZZ_CHECK(h->ndim == 1 || h->ndim == 2);
    FUZZ_CHECK(h->ndim == 2 || h->cols == 1);
    FUZZ_CHECK(h->data_offset <= size && h->data_offset <= NPY_HEADER_MAX);
    size_t count, bytes;
    FUZZ_CHECK(!__builtin_mul_overflow(h->rows, h->cols, &count));
    FUZZ_CHECK(!__builtin_mul_overflow(count, h->itemsize, &bytes));
    FUZZ_CHECK(bytes == h->data_bytes);
}

/* Every binary16 value but NaN survives half -> double -> half. */
static void fuzz_npy_check_halves(const uint8_t *data, size_t size) {
    for (size_t i = 0; i + 1 < size && i < 128; i += 2) {
        uint16_t bits = (uint16_t)(data[i] | data[i + 1] << 8);
        double d = npy_half_to_double(bits);
        uint16_t back = npy_double_to_half(d);
        if (isnan(d))
            FUZZ_CHECK((back & 0x7c00) == 0x7c00 && (back & 0x3ff) != 0);
        else
            FUZZ_CHECK(back == bits);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    npy_header h, again, fh;
    char err[ERR_LEN];
    double *m = NULL, *wide = NULL;

    fuzz_npy_check_halves(data, size);

    err[0] = '\0';
    int parsed = npy_parse_header(data, size, &h, err, sizeof err);
    FUZZ_CHECK(parsed == 0 || parsed == -1);
    if (parsed != 0) FUZZ_CHECK(err[0] != '\0' && memchr(err, '\0', sizeof err));
    if (parsed == 0) {
        fuzz_npy_check_header(&h, size);
        /* The header alone decides: its own bytes parse the same, one fewer
         * is a truncated header. */
        FUZZ_CHECK(npy_parse_header(data, h.data_offset, &again, err, sizeof err) == 0);
        FUZZ_CHECK(memcmp(&again, &h, sizeof h) == 0);
        FUZZ_CHECK(npy_parse_header(data, h.data_offset - 1, &again, err, sizeof err) == -1);
    }

    if (fuzz_npy_store(data, size) != 0) {
        perror("fuzz_npy: memfd");
        abort();
    }
    err[0] = '\0';
    int opened = npy_read_header_fd(fuzz_npy_fd, &fh, err, sizeof err);
    int complete = parsed == 0 && size - h.data_offset == h.data_bytes;
    FUZZ_CHECK((opened == 0) == complete);
    if (opened != 0) {
        FUZZ_CHECK(err[0] != '\0');
        goto out;
    }
    FUZZ_CHECK(memcmp(&fh, &h, sizeof h) == 0);

    npy_header rh;
    FUZZ_CHECK(npy_read_f64(fuzz_npy_path, &m, &rh, err, sizeof err) == 0);
    FUZZ_CHECK(memcmp(&rh, &h, sizeof h) == 0);
    /* A (N, 0) array holds nothing however large N is; only its shape
     * matters, and there are no values or columns to look at. */
    if (h.cols == 0) goto out;
    fuzz_npy_check_values(data, &h, m, h.cols);

    /* Side by side reading: the padding columns must stay untouched. */
    size_t stride = h.cols + 2;
    size_t cells = h.rows * stride;
    wide = malloc((cells ? cells : 1) * sizeof *wide);
    FUZZ_CHECK(wide != NULL);
    for (size_t k = 0; k < cells; k++) wide[k] = -7.25;
    FUZZ_CHECK(npy_read_f64_into(fuzz_npy_path, &h, wide, stride, err, sizeof err) == 0);
    fuzz_npy_check_values(data, &h, wide, stride);
    for (size_t i = 0; i < h.rows; i++)
        FUZZ_CHECK(wide[i * stride + h.cols] == -7.25 && wide[i * stride + h.cols + 1] == -7.25);
    /* A stride narrower than the file is refused, not overrun. */
    if (h.cols > 1)
        FUZZ_CHECK(npy_read_f64_into(fuzz_npy_path, &h, wide, h.cols - 1, err, sizeof err) == -1);

out:
    free(m);
    free(wide);
    return 0;
}
