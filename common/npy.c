/* npy.c - see npy.h. The header dict is parsed by a small strict scanner
 * rather than a general Python-literal evaluator: it accepts exactly the
 * three keys numpy writes, in any order, and nothing else. */
#include "npy.h"

#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "npy.c assumes a little-endian host"
#endif

#define NPY_MAGIC "\x93NUMPY"
#define NPY_MAGIC_LEN 6
#define NPY_CHUNK (1u << 20)
#define NPY_MAX_DIMS 32

const char *npy_dtype_name(npy_dtype dtype) {
    switch (dtype) {
    case NPY_F16: return "float16";
    case NPY_F32: return "float32";
    case NPY_F64: return "float64";
    }
    return "unknown";
}

double npy_half_to_double(uint16_t h) {
    int sign = (h >> 15) & 1;
    int exponent = (h >> 10) & 0x1f;
    int mantissa = h & 0x3ff;
    double v;
    if (exponent == 0)
        v = ldexp((double)mantissa, -24); /* zero or subnormal: m * 2^-14 / 1024 */
    else if (exponent == 31)
        v = mantissa ? NAN : INFINITY;
    else
        v = ldexp((double)(mantissa + 1024), exponent - 25);
    return sign ? -v : v;
}

uint16_t npy_double_to_half(double d) {
    uint16_t sign = signbit(d) ? 0x8000 : 0;
    double a = fabs(d);
    if (isnan(d)) return (uint16_t)(sign | 0x7e00);
    /* 65520 is halfway between the largest half (65504) and 2^16: it and
     * everything above rounds to infinity. */
    if (a >= 65520.0) return (uint16_t)(sign | 0x7c00);
    if (a < ldexp(1.0, -14)) {
        /* Subnormal range: the result is q * 2^-24; rint rounds ties to even.
         * q == 1024 is the smallest normal, whose bit pattern is the same. */
        double q = rint(ldexp(a, 24));
        return (uint16_t)(sign | (uint16_t)q);
    }
    int e2;
    double m = frexp(a, &e2); /* a = m * 2^e2, m in [0.5, 1) */
    double q = rint(m * 2048.0); /* 11 significant bits incl. the hidden one */
    if (q >= 2048.0) {
        q = 1024.0;
        e2++;
    }
    int field = e2 - 1 + 15;
    if (field >= 31) return (uint16_t)(sign | 0x7c00);
    return (uint16_t)(sign | (uint16_t)(field << 10) | (uint16_t)((int)q - 1024));
}

/* ---- header parsing ---- */

typedef struct {
    const char *p;
    const char *end;
} npy_scan;

static void npy_skip_ws(npy_scan *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

/* Reads a quoted Python string literal (no escapes: numpy never writes any in
 * these fields) into out. Returns 0 or -1. */
static int npy_scan_string(npy_scan *s, char *out, size_t outlen) {
    if (s->p >= s->end || (*s->p != '\'' && *s->p != '"')) return -1;
    char quote = *s->p++;
    size_t n = 0;
    while (s->p < s->end && *s->p != quote) {
        if (*s->p == '\\' || n + 1 >= outlen) return -1;
        out[n++] = *s->p++;
    }
    if (s->p >= s->end) return -1;
    s->p++;
    out[n] = '\0';
    return 0;
}

static int npy_scan_word(npy_scan *s, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0) return -1;
    s->p += n;
    return 0;
}

/* Parses "(a, b, ...)" with an optional trailing comma. Returns the number of
 * dimensions (0..NPY_MAX_DIMS) or -1 when malformed or a size overflows. */
static int npy_scan_shape(npy_scan *s, size_t dims[NPY_MAX_DIMS]) {
    if (s->p >= s->end || *s->p != '(') return -1;
    s->p++;
    int ndim = 0;
    for (;;) {
        npy_skip_ws(s);
        if (s->p < s->end && *s->p == ')') {
            s->p++;
            return ndim;
        }
        if (s->p >= s->end || *s->p < '0' || *s->p > '9' || ndim >= NPY_MAX_DIMS) return -1;
        size_t v = 0;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9') {
            size_t digit = (size_t)(*s->p - '0');
            if (v > (SIZE_MAX - digit) / 10) return -1;
            v = v * 10 + digit;
            s->p++;
        }
        /* numpy writes Python ints; a 'L' suffix came from Python 2. */
        if (s->p < s->end && *s->p == 'L') s->p++;
        dims[ndim++] = v;
        npy_skip_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == ')') {
            s->p++;
            return ndim;
        }
        return -1;
    }
}

/* Maps a descr string to a dtype. Returns 0 or -1 with a specific message. */
static int npy_parse_descr(const char *descr, npy_header *h, char *err, size_t errlen) {
    const char *type = descr;
    if (*type == '>')
        return err_set(err, errlen,
                       "big-endian dtype '%s' is not supported (convert with "
                       "arr.astype('<%s'))",
                       descr, descr + 1);
    if (*type == '<' || *type == '=' || *type == '|') type++;
    if (strcmp(type, "f2") == 0 || strcmp(type, "e") == 0) {
        h->dtype = NPY_F16;
        h->itemsize = 2;
    } else if (strcmp(type, "f4") == 0 || strcmp(type, "f") == 0) {
        h->dtype = NPY_F32;
        h->itemsize = 4;
    } else if (strcmp(type, "f8") == 0 || strcmp(type, "d") == 0) {
        h->dtype = NPY_F64;
        h->itemsize = 8;
    } else {
        return err_set(err, errlen,
                       "unsupported dtype '%s' (need float16, float32 or float64)", descr);
    }
    return 0;
}

static uint32_t npy_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int npy_parse_header(const void *buf, size_t len, npy_header *h, char *err, size_t errlen) {
    const unsigned char *b = buf;
    memset(h, 0, sizeof *h);
    if (len < NPY_MAGIC_LEN + 2)
        return err_set(err, errlen, "truncated header (file has %zu bytes)", len);
    if (memcmp(b, NPY_MAGIC, NPY_MAGIC_LEN) != 0)
        return err_set(err, errlen, "not an .npy file (bad magic bytes)");
    int major = b[6], minor = b[7];
    if (minor != 0 || major < 1 || major > 3)
        return err_set(err, errlen, "unsupported .npy format version %d.%d", major, minor);
    size_t prefix = major == 1 ? 10 : 12;
    if (len < prefix) return err_set(err, errlen, "truncated header (file has %zu bytes)", len);
    size_t dict_len = major == 1 ? (size_t)(b[8] | b[9] << 8) : (size_t)npy_le32(b + 8);
    if (dict_len > NPY_HEADER_MAX - prefix)
        return err_set(err, errlen, "header of %zu bytes exceeds the limit of %d", dict_len,
                       NPY_HEADER_MAX);
    if (len < prefix + dict_len)
        return err_set(err, errlen, "truncated header (needs %zu bytes, have %zu)",
                       prefix + dict_len, len);
    h->version = major;
    h->data_offset = prefix + dict_len;

    npy_scan s = {(const char *)b + prefix, (const char *)b + prefix + dict_len};
    bool have_descr = false, have_order = false, have_shape = false;
    size_t dims[NPY_MAX_DIMS];
    int ndim = 0;
    npy_skip_ws(&s);
    if (s.p >= s.end || *s.p != '{') return err_set(err, errlen, "malformed header: no dict");
    s.p++;
    for (;;) {
        npy_skip_ws(&s);
        if (s.p < s.end && *s.p == '}') {
            s.p++;
            break;
        }
        char key[32];
        if (npy_scan_string(&s, key, sizeof key) != 0)
            return err_set(err, errlen, "malformed header: expected a quoted key");
        npy_skip_ws(&s);
        if (s.p >= s.end || *s.p != ':')
            return err_set(err, errlen, "malformed header: expected ':' after '%s'", key);
        s.p++;
        npy_skip_ws(&s);
        if (strcmp(key, "descr") == 0 && !have_descr) {
            char descr[32];
            if (s.p < s.end && *s.p == '[')
                return err_set(err, errlen, "unsupported dtype: structured arrays");
            if (npy_scan_string(&s, descr, sizeof descr) != 0)
                return err_set(err, errlen, "malformed header: bad 'descr'");
            if (npy_parse_descr(descr, h, err, errlen) != 0) return -1;
            have_descr = true;
        } else if (strcmp(key, "fortran_order") == 0 && !have_order) {
            if (npy_scan_word(&s, "True") == 0)
                h->fortran_order = true;
            else if (npy_scan_word(&s, "False") == 0)
                h->fortran_order = false;
            else
                return err_set(err, errlen, "malformed header: bad 'fortran_order'");
            have_order = true;
        } else if (strcmp(key, "shape") == 0 && !have_shape) {
            ndim = npy_scan_shape(&s, dims);
            if (ndim < 0) return err_set(err, errlen, "malformed header: bad 'shape'");
            have_shape = true;
        } else {
            return err_set(err, errlen, "malformed header: unexpected key '%s'", key);
        }
        npy_skip_ws(&s);
        if (s.p < s.end && *s.p == ',') {
            s.p++;
            continue;
        }
        if (s.p < s.end && *s.p == '}') {
            s.p++;
            break;
        }
        return err_set(err, errlen, "malformed header: expected ',' or '}'");
    }
    npy_skip_ws(&s);
    if (s.p != s.end) return err_set(err, errlen, "malformed header: text after the dict");
    if (!have_descr || !have_order || !have_shape)
        return err_set(err, errlen, "malformed header: missing '%s'",
                       !have_descr ? "descr" : !have_order ? "fortran_order" : "shape");
    if (ndim == 0 || ndim > 2)
        return err_set(err, errlen,
                       "%d-dimensional arrays are not supported (need a 1-D or 2-D matrix)",
                       ndim);
    h->ndim = ndim;
    h->rows = dims[0];
    h->cols = ndim == 2 ? dims[1] : 1;
    if (h->cols != 0 && h->rows > SIZE_MAX / h->cols / h->itemsize)
        return err_set(err, errlen, "shape (%zu, %zu) is too large", h->rows, h->cols);
    h->data_bytes = h->rows * h->cols * h->itemsize;
    return 0;
}

/* ---- reading ---- */

static int npy_pread_full(int fd, void *buf, size_t len, off_t off, size_t *got) {
    size_t n = 0;
    while (n < len) {
        ssize_t r = pread(fd, (char *)buf + n, len - n, off + (off_t)n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        n += (size_t)r;
    }
    *got = n;
    return 0;
}

int npy_read_header_fd(int fd, npy_header *h, char *err, size_t errlen) {
    struct stat st;
    if (fstat(fd, &st) != 0) return err_set(err, errlen, "stat: %s", strerror(errno));
    if (!S_ISREG(st.st_mode)) return err_set(err, errlen, "not a regular file");
    unsigned char *buf = malloc(NPY_HEADER_MAX);
    if (!buf) return err_set(err, errlen, "out of memory");
    size_t got = 0;
    int rc = -1;
    if (npy_pread_full(fd, buf, NPY_HEADER_MAX, 0, &got) != 0) {
        err_set(err, errlen, "read: %s", strerror(errno));
        goto out;
    }
    if (npy_parse_header(buf, got, h, err, errlen) != 0) goto out;
    size_t size = (size_t)st.st_size;
    size_t have = size - h->data_offset; /* parse succeeded, so size >= data_offset */
    if (have < h->data_bytes) {
        err_set(err, errlen, "truncated data: shape (%zu, %zu) %s needs %zu bytes, file has %zu",
                h->rows, h->cols, npy_dtype_name(h->dtype), h->data_bytes, have);
        goto out;
    }
    if (have > h->data_bytes) {
        err_set(err, errlen, "%zu unexpected bytes after the data of shape (%zu, %zu)",
                have - h->data_bytes, h->rows, h->cols);
        goto out;
    }
    rc = 0;
out:
    free(buf);
    return rc;
}

int npy_read_header(const char *path, npy_header *h, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_set(err, errlen, "open %s: %s", path, strerror(errno));
    char inner[ERR_LEN];
    int rc = npy_read_header_fd(fd, h, inner, sizeof inner);
    close(fd);
    if (rc != 0) return err_set(err, errlen, "%s: %s", path, inner);
    return 0;
}

/* Converts count elements of src (dtype) to double. */
static void npy_convert(npy_dtype dtype, const unsigned char *src, size_t count, double *dst) {
    size_t i;
    switch (dtype) {
    case NPY_F64: memcpy(dst, src, count * sizeof(double)); break;
    case NPY_F32:
        for (i = 0; i < count; i++) {
            float f;
            memcpy(&f, src + 4 * i, 4);
            dst[i] = (double)f;
        }
        break;
    case NPY_F16:
        for (i = 0; i < count; i++) {
            uint16_t v = (uint16_t)(src[2 * i] | src[2 * i + 1] << 8);
            dst[i] = npy_half_to_double(v);
        }
        break;
    }
}

/* Streams the data of an open file into dst. Elements arrive in storage
 * order (row-major, or column-major for fortran_order) and land at
 * dst[i * stride + j]. Row-major data is converted run by run straight into
 * the destination rows; column-major data goes through a small buffer and is
 * scattered. Returns 0 or -1. */
static int npy_stream_data(int fd, const npy_header *h, double *dst, size_t stride, char *err,
                           size_t errlen) {
    size_t per_chunk = NPY_CHUNK / h->itemsize;
    unsigned char *raw = malloc(per_chunk * h->itemsize);
    double *conv = h->fortran_order ? malloc(per_chunk * sizeof(double)) : NULL;
    int rc = -1;
    if (!raw || (h->fortran_order && !conv)) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    size_t total = h->rows * h->cols;
    size_t done = 0, i = 0, j = 0; /* (i, j) of the next element in storage order */
    while (done < total) {
        size_t count = total - done < per_chunk ? total - done : per_chunk;
        size_t got = 0;
        off_t off = (off_t)(h->data_offset + done * h->itemsize);
        if (npy_pread_full(fd, raw, count * h->itemsize, off, &got) != 0) {
            err_set(err, errlen, "read: %s", strerror(errno));
            goto out;
        }
        if (got != count * h->itemsize) {
            err_set(err, errlen, "truncated data (file shrank while reading)");
            goto out;
        }
        if (!h->fortran_order) {
            for (size_t k = 0; k < count;) {
                size_t run = h->cols - j < count - k ? h->cols - j : count - k;
                npy_convert(h->dtype, raw + k * h->itemsize, run, dst + i * stride + j);
                k += run;
                j += run;
                if (j == h->cols) {
                    j = 0;
                    i++;
                }
            }
        } else {
            npy_convert(h->dtype, raw, count, conv);
            for (size_t k = 0; k < count; k++) {
                dst[i * stride + j] = conv[k];
                if (++i == h->rows) {
                    i = 0;
                    j++;
                }
            }
        }
        done += count;
    }
    rc = 0;
out:
    free(raw);
    free(conv);
    return rc;
}

int npy_read_f64_into(const char *path, const npy_header *expect, double *dst, size_t stride,
                      char *err, size_t errlen) {
    char inner[ERR_LEN];
    npy_header h;
    int rc = -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_set(err, errlen, "open %s: %s", path, strerror(errno));
    if (npy_read_header_fd(fd, &h, inner, sizeof inner) != 0) {
        err_set(err, errlen, "%s: %s", path, inner);
        goto out;
    }
    if (h.rows != expect->rows || h.cols != expect->cols || h.dtype != expect->dtype ||
        stride < h.cols) {
        err_set(err, errlen, "%s changed while reading", path);
        goto out;
    }
    if (npy_stream_data(fd, &h, dst, stride, inner, sizeof inner) != 0) {
        err_set(err, errlen, "%s: %s", path, inner);
        goto out;
    }
    rc = 0;
out:
    close(fd);
    return rc;
}

int npy_read_f64(const char *path, double **out, npy_header *hout, char *err, size_t errlen) {
    npy_header h;
    if (npy_read_header(path, &h, err, errlen) != 0) return -1;
    size_t count = h.rows * h.cols;
    if (count > SIZE_MAX / sizeof(double))
        return err_set(err, errlen, "%s: shape (%zu, %zu) is too large", path, h.rows, h.cols);
    double *data = malloc(count ? count * sizeof(double) : 1);
    if (!data)
        return err_set(err, errlen, "%s: out of memory for %zu x %zu float64", path, h.rows,
                       h.cols);
    if (npy_read_f64_into(path, &h, data, h.cols ? h.cols : 1, err, errlen) != 0) {
        free(data);
        return -1;
    }
    *out = data;
    if (hout) *hout = h;
    return 0;
}

/* ---- writing ---- */

/* Formats a version 1.0 header padded so the data starts at a multiple of 64
 * bytes, as numpy does. Returns its length, or 0 if it does not fit. */
static size_t npy_format_header(unsigned char *out, size_t outlen, const char *descr, int ndim,
                                size_t rows, size_t cols) {
    char dict[256];
    int n = ndim == 1 ? snprintf(dict, sizeof dict,
                                 "{'descr': '%s', 'fortran_order': False, 'shape': (%zu,), }",
                                 descr, rows)
                      : snprintf(dict, sizeof dict,
                                 "{'descr': '%s', 'fortran_order': False, 'shape': (%zu, %zu), }",
                                 descr, rows, cols);
    if (n < 0 || (size_t)n >= sizeof dict) return 0;
    size_t dict_len = (size_t)n;
    size_t total = 10 + dict_len + 1; /* + '\n' */
    size_t padded = (total + 63) / 64 * 64;
    if (padded > outlen || padded - 10 > 65535) return 0;
    memcpy(out, NPY_MAGIC, NPY_MAGIC_LEN);
    out[6] = 1;
    out[7] = 0;
    out[8] = (unsigned char)((padded - 10) & 0xff);
    out[9] = (unsigned char)((padded - 10) >> 8);
    memcpy(out + 10, dict, dict_len);
    memset(out + 10 + dict_len, ' ', padded - total);
    out[padded - 1] = '\n';
    return padded;
}

static int npy_write_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Writes header + data produced by encode() chunk by chunk into a temp file
 * next to path, then renames it into place. */
typedef void (*npy_encode_fn)(const void *src, size_t first, size_t count, unsigned char *out);

static int npy_write_stream(const char *path, const char *descr, size_t itemsize, int ndim,
                            size_t rows, size_t cols, const void *src, npy_encode_fn encode,
                            char *err, size_t errlen) {
    unsigned char header[256];
    char tmp[PATH_MAX];
    unsigned char *chunk = NULL;
    int fd = -1, rc = -1;
    if (ndim != 1 && ndim != 2) return err_set(err, errlen, "ndim must be 1 or 2");
    if (ndim == 1 && cols != 1) return err_set(err, errlen, "a 1-D array must have 1 column");
    if (cols != 0 && rows > SIZE_MAX / cols / itemsize)
        return err_set(err, errlen, "shape (%zu, %zu) is too large", rows, cols);
    size_t hlen = npy_format_header(header, sizeof header, descr, ndim, rows, cols);
    if (hlen == 0) return err_set(err, errlen, "header does not fit");
    int n = snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path);
    if (n < 0 || (size_t)n >= sizeof tmp) return err_set(err, errlen, "path too long: %s", path);
    fd = mkstemp(tmp);
    if (fd < 0) return err_set(err, errlen, "create %s: %s", tmp, strerror(errno));
    size_t per_chunk = NPY_CHUNK / itemsize;
    chunk = malloc(per_chunk * itemsize);
    if (!chunk) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    if (npy_write_all(fd, header, hlen) != 0) goto io_error;
    size_t total = rows * cols;
    for (size_t done = 0; done < total;) {
        size_t count = total - done < per_chunk ? total - done : per_chunk;
        encode(src, done, count, chunk);
        if (npy_write_all(fd, chunk, count * itemsize) != 0) goto io_error;
        done += count;
    }
    if (fchmod(fd, 0644) != 0 || fsync(fd) != 0) goto io_error;
    if (close(fd) != 0) {
        fd = -1;
        goto io_error;
    }
    fd = -1;
    if (rename(tmp, path) != 0) goto io_error;
    util_fsync_parent(path);
    rc = 0;
    goto out;
io_error:
    err_set(err, errlen, "write %s: %s", path, strerror(errno));
out:
    if (fd >= 0) close(fd);
    if (rc != 0) unlink(tmp);
    free(chunk);
    return rc;
}

static void npy_encode_f64_as_f64(const void *src, size_t first, size_t count,
                                  unsigned char *out) {
    memcpy(out, (const double *)src + first, count * sizeof(double));
}

static void npy_encode_f64_as_f32(const void *src, size_t first, size_t count,
                                  unsigned char *out) {
    const double *d = (const double *)src + first;
    for (size_t i = 0; i < count; i++) {
        float f = (float)d[i];
        memcpy(out + 4 * i, &f, 4);
    }
}

static void npy_encode_f64_as_f16(const void *src, size_t first, size_t count,
                                  unsigned char *out) {
    const double *d = (const double *)src + first;
    for (size_t i = 0; i < count; i++) {
        uint16_t v = npy_double_to_half(d[i]);
        out[2 * i] = (unsigned char)(v & 0xff);
        out[2 * i + 1] = (unsigned char)(v >> 8);
    }
}

static void npy_encode_f32_as_f32(const void *src, size_t first, size_t count,
                                  unsigned char *out) {
    memcpy(out, (const float *)src + first, count * sizeof(float));
}

int npy_write_f64(const char *path, npy_dtype dtype, int ndim, const double *data, size_t rows,
                  size_t cols, char *err, size_t errlen) {
    switch (dtype) {
    case NPY_F64:
        return npy_write_stream(path, "<f8", 8, ndim, rows, cols, data, npy_encode_f64_as_f64,
                                err, errlen);
    case NPY_F32:
        return npy_write_stream(path, "<f4", 4, ndim, rows, cols, data, npy_encode_f64_as_f32,
                                err, errlen);
    case NPY_F16:
        return npy_write_stream(path, "<f2", 2, ndim, rows, cols, data, npy_encode_f64_as_f16,
                                err, errlen);
    }
    return err_set(err, errlen, "unknown dtype");
}

int npy_write_f32(const char *path, const float *data, size_t rows, size_t cols, char *err,
                  size_t errlen) {
    return npy_write_stream(path, "<f4", 4, 2, rows, cols, data, npy_encode_f32_as_f32, err,
                            errlen);
}
