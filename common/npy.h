/* npy.h - reading and writing NumPy .npy files (format versions 1.0, 2.0, 3.0).
 *
 * Supported element types: little-endian IEEE float16, float32 and float64
 * ('<f2', '<f4', '<f8'; also '=fN', '|fN' and bare 'fN', which on the
 * little-endian hosts we build for mean the same). Big-endian ('>fN') and every
 * other dtype are rejected with a message that names the dtype.
 *
 * Shapes: 2-D arrays are N rows (examples) x D columns. A 1-D array of shape
 * (N,) is read as N x 1 (N examples with one feature each), because the rows
 * of an .npy are always the examples in strata. 0-D and ndim > 2 are rejected.
 * fortran_order True is accepted and converted to row-major order on read.
 *
 * The header is untrusted: its total size (magic, version, length field and
 * the dict) is bounded by NPY_HEADER_MAX, and the file must hold exactly
 * N * D * itemsize data bytes after it (no more, no less). */
#ifndef STRATA_NPY_H
#define STRATA_NPY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Largest header we accept, in bytes, counted from the start of the file.
 * numpy itself refuses headers over 10000 bytes by default. */
#define NPY_HEADER_MAX 65536

typedef enum { NPY_F16 = 0, NPY_F32 = 1, NPY_F64 = 2 } npy_dtype;

typedef struct {
    npy_dtype dtype;
    size_t itemsize;      /* 2, 4 or 8 */
    int ndim;             /* 1 or 2, as stored */
    size_t rows;          /* shape[0] */
    size_t cols;          /* shape[1], or 1 for a 1-D array */
    bool fortran_order;
    int version;          /* 1, 2 or 3 */
    size_t data_offset;   /* bytes before the first element */
    size_t data_bytes;    /* rows * cols * itemsize (checked for overflow) */
} npy_header;

/* "float16", "float32" or "float64". */
const char *npy_dtype_name(npy_dtype dtype);

/* Parses a header from the first len bytes of a file. Returns 0, or -1 with
 * err set: not an .npy file, unsupported version/dtype/shape, malformed dict,
 * or "truncated header" when len is too short to hold the header it
 * announces (a caller reading a prefix can read NPY_HEADER_MAX bytes). */
int npy_parse_header(const void *buf, size_t len, npy_header *h, char *err, size_t errlen);

/* Reads and parses the header of the open file fd (from offset 0, with
 * pread, so the file position is unchanged) and checks that the file size is
 * exactly data_offset + data_bytes. Returns 0, or -1 with err set. */
int npy_read_header_fd(int fd, npy_header *h, char *err, size_t errlen);

/* Same as npy_read_header_fd for a path. */
int npy_read_header(const char *path, npy_header *h, char *err, size_t errlen);

/* Reads a whole .npy file into one malloc'd float64 row-major rows x cols
 * buffer (*out, caller frees). The file is streamed through a small chunk
 * buffer, so peak memory is the float64 result plus about 1 MiB. h may be NULL.
 * Returns 0, or -1 with err set (*out untouched). */
int npy_read_f64(const char *path, double **out, npy_header *h, char *err, size_t errlen);

/* Like npy_read_f64, but converts into caller memory: element (i, j) goes to
 * dst[i * stride + j]; stride >= the file's cols; dst holds rows * stride
 * doubles. The header must have been read from the same file (expect), so
 * two matrices can be read side by side into one buffer. */
int npy_read_f64_into(const char *path, const npy_header *expect, double *dst, size_t stride,
                      char *err, size_t errlen);

/* Writes a rows x cols row-major float64 matrix as an .npy of the given dtype
 * (converted with round-to-nearest-even), version 1.0 header, atomically
 * (temp file + rename). ndim is 1 (cols must be 1) or 2. Returns 0 or -1. */
int npy_write_f64(const char *path, npy_dtype dtype, int ndim, const double *data, size_t rows,
                  size_t cols, char *err, size_t errlen);

/* Writes a rows x cols row-major float32 matrix as '<f4' (for predict jobs'
 * hidden states, which the engine holds in float32). Returns 0 or -1. */
int npy_write_f32(const char *path, const float *data, size_t rows, size_t cols, char *err,
                  size_t errlen);

/* IEEE binary16 <-> binary64, handling subnormals, infinities and NaN. The
 * narrowing conversion rounds to nearest, ties to even, and overflows to inf. */
double npy_half_to_double(uint16_t h);
uint16_t npy_double_to_half(double d);

#endif
