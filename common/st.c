/* st.c - see st.h. */
#include "common/st.h"

#include "common/buf.h"
#include "common/util.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    const char *name;
    st_dtype dtype;
    size_t size;
} st_dtype_info;

/* Every dtype the format defines, so a file of another kind is told apart
 * from a malformed one ("dtype I64 is not supported here" comes from the
 * caller, not "unknown dtype"). */
static const st_dtype_info st_dtypes[] = {
    {"BOOL", ST_BOOL, 1},         {"U8", ST_U8, 1},   {"I8", ST_I8, 1},
    {"F8_E5M2", ST_F8_E5M2, 1},   {"F8_E4M3", ST_F8_E4M3, 1},
    {"I16", ST_I16, 2},           {"U16", ST_U16, 2}, {"F16", ST_F16, 2},
    {"BF16", ST_BF16, 2},         {"I32", ST_I32, 4}, {"U32", ST_U32, 4},
    {"F32", ST_F32, 4},           {"F64", ST_F64, 8}, {"I64", ST_I64, 8},
    {"U64", ST_U64, 8},
};
#define ST_NDTYPES (sizeof st_dtypes / sizeof st_dtypes[0])

const char *st_dtype_name(st_dtype dtype) {
    for (size_t i = 0; i < ST_NDTYPES; i++)
        if (st_dtypes[i].dtype == dtype) return st_dtypes[i].name;
    return "?";
}

size_t st_dtype_size(st_dtype dtype) {
    for (size_t i = 0; i < ST_NDTYPES; i++)
        if (st_dtypes[i].dtype == dtype) return st_dtypes[i].size;
    return 0;
}

float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | mant << 13; /* inf, or NaN keeping its payload */
    } else if (exp == 0) {
        /* Zero or subnormal: mant * 2^-24, exact in float32. */
        float v = (float)mant * 0x1p-24f;
        return sign ? -v : v;
    } else {
        bits = sign | (exp + 112u) << 23 | mant << 13; /* rebias 15 -> 127 */
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

float st_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static int st_tensor_cmp(const void *a, const void *b) {
    const st_tensor *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* A JSON integer in [0, SIZE_MAX], into *out. Returns 0 or -1. */
static int st_json_size(const json_t *v, size_t *out) {
    if (!json_is_integer(v)) return -1;
    json_int_t i = json_integer_value(v);
    if (i < 0 || (unsigned long long)i > SIZE_MAX) return -1;
    *out = (size_t)i;
    return 0;
}

/* Checks one header entry and fills t (all but data). Returns 0 or -1. */
static int st_parse_tensor(const char *label, const char *name, json_t *desc, size_t data_len,
                           st_tensor *t, char *err, size_t errlen) {
    if (!json_is_object(desc))
        return err_set(err, errlen, "%s: tensor %s: entry is not an object", label, name);
    json_t *dtype = json_object_get(desc, "dtype");
    json_t *shape = json_object_get(desc, "shape");
    json_t *offsets = json_object_get(desc, "data_offsets");
    if (!json_is_string(dtype))
        return err_set(err, errlen, "%s: tensor %s: dtype missing or not a string", label, name);
    if (!json_is_array(shape))
        return err_set(err, errlen, "%s: tensor %s: shape missing or not an array", label, name);
    if (!json_is_array(offsets) || json_array_size(offsets) != 2)
        return err_set(err, errlen, "%s: tensor %s: data_offsets must be [begin, end]", label,
                       name);
    if (json_object_size(desc) != 3)
        return err_set(err, errlen,
                       "%s: tensor %s: unexpected keys (only dtype, shape, data_offsets)", label,
                       name);

    memset(t, 0, sizeof *t);
    t->name = name;
    const char *dname = json_string_value(dtype);
    size_t itemsize = 0;
    for (size_t i = 0; i < ST_NDTYPES; i++)
        if (strcmp(st_dtypes[i].name, dname) == 0) {
            t->dtype = st_dtypes[i].dtype;
            itemsize = st_dtypes[i].size;
        }
    if (itemsize == 0)
        return err_set(err, errlen, "%s: tensor %s: unknown dtype \"%.32s\"", label, name, dname);

    size_t ndim = json_array_size(shape);
    if (ndim > ST_MAX_DIMS)
        return err_set(err, errlen, "%s: tensor %s: %zu dimensions (at most %d)", label, name,
                       ndim, ST_MAX_DIMS);
    t->ndim = (int)ndim;
    t->count = 1;
    for (size_t i = 0; i < ndim; i++) {
        if (st_json_size(json_array_get(shape, i), &t->shape[i]) != 0)
            return err_set(err, errlen, "%s: tensor %s: shape[%zu] is not a non-negative integer",
                           label, name, i);
        if (__builtin_mul_overflow(t->count, t->shape[i], &t->count))
            return err_set(err, errlen, "%s: tensor %s: shape overflows", label, name);
    }
    size_t nbytes;
    if (__builtin_mul_overflow(t->count, itemsize, &nbytes))
        return err_set(err, errlen, "%s: tensor %s: shape overflows", label, name);

    if (st_json_size(json_array_get(offsets, 0), &t->begin) != 0 ||
        st_json_size(json_array_get(offsets, 1), &t->end) != 0)
        return err_set(err, errlen, "%s: tensor %s: data_offsets are not non-negative integers",
                       label, name);
    if (t->end < t->begin)
        return err_set(err, errlen, "%s: tensor %s: data_offsets end %zu before begin %zu", label,
                       name, t->end, t->begin);
    if (t->end > data_len)
        return err_set(err, errlen,
                       "%s: tensor %s: data_offsets end %zu beyond the data section (%zu bytes); "
                       "file truncated?",
                       label, name, t->end, data_len);
    if (t->end - t->begin != nbytes)
        return err_set(err, errlen,
                       "%s: tensor %s: %zu bytes of data for a %s shape of %zu elements "
                       "(%zu bytes)",
                       label, name, t->end - t->begin, dname, t->count, nbytes);
    return 0;
}

/* Checks that the sorted tensors tile [0, data_len) exactly. */
static int st_check_coverage(const st_file *f, size_t data_len, char *err, size_t errlen) {
    size_t expect = 0;
    for (size_t i = 0; i < f->ntensors; i++) {
        const st_tensor *t = &f->tensors[i];
        if (t->begin > expect)
            return err_set(err, errlen, "%s: tensor %s: hole in the data section before offset %zu",
                           f->label, t->name, t->begin);
        if (t->begin < expect)
            return err_set(err, errlen,
                           "%s: tensor %s: data_offsets [%zu, %zu] overlap the previous tensor "
                           "(which ends at %zu)",
                           f->label, t->name, t->begin, t->end, expect);
        expect = t->end;
    }
    if (expect != data_len)
        return err_set(err, errlen,
                       "%s: %zu bytes in the data section after the last tensor (ends at %zu)",
                       f->label, data_len - expect, expect);
    return 0;
}

int st_parse(const void *buf, size_t len, const char *label, st_file *f, char *err,
             size_t errlen) {
    memset(f, 0, sizeof *f);
    if (!label) label = "safetensors";
    f->label = strdup(label);
    if (!f->label) return err_set(err, errlen, "%s: out of memory", label);
    const unsigned char *p = buf;
    if (len < 8) {
        err_set(err, errlen, "%s: %zu bytes, too short for a safetensors header", label, len);
        goto fail;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | p[i];
    if (n > ST_HEADER_MAX) {
        err_set(err, errlen, "%s: header length %llu over the limit of %u bytes", label,
                (unsigned long long)n, ST_HEADER_MAX);
        goto fail;
    }
    if (n > len - 8) {
        err_set(err, errlen, "%s: header length %llu beyond the end of the file (%zu bytes); "
                "file truncated?", label, (unsigned long long)n, len);
        goto fail;
    }
    f->base = p;
    f->size = len;
    f->data_offset = 8 + (size_t)n;
    size_t data_len = len - f->data_offset;

    json_error_t jerr;
    json_t *root = json_loadb((const char *)p + 8, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        err_set(err, errlen, "%s: header is not valid JSON: %s (offset %d)", label, jerr.text,
                jerr.position);
        goto fail;
    }
    f->json = root;
    if (!json_is_object(root)) {
        err_set(err, errlen, "%s: header is not a JSON object", label);
        goto fail;
    }
    size_t cap = json_object_size(root);
    f->tensors = calloc(cap ? cap : 1, sizeof *f->tensors);
    if (!f->tensors) {
        err_set(err, errlen, "%s: out of memory", label);
        goto fail;
    }
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        if (strcmp(key, "__metadata__") == 0) {
            /* The format allows string values only. */
            if (!json_is_object(value)) {
                err_set(err, errlen, "%s: __metadata__ is not an object", label);
                goto fail;
            }
            const char *mkey;
            json_t *mval;
            json_object_foreach(value, mkey, mval) {
                if (!json_is_string(mval)) {
                    err_set(err, errlen, "%s: __metadata__ value for %s is not a string", label,
                            mkey);
                    goto fail;
                }
            }
            continue;
        }
        st_tensor *t = &f->tensors[f->ntensors];
        if (st_parse_tensor(label, key, value, data_len, t, err, errlen) != 0) goto fail;
        t->data = p + f->data_offset + t->begin;
        f->ntensors++;
    }
    qsort(f->tensors, f->ntensors, sizeof *f->tensors, st_tensor_cmp);
    if (st_check_coverage(f, data_len, err, errlen) != 0) goto fail;
    return 0;
fail:
    st_close(f);
    return -1;
}

int st_open(const char *path, st_file *f, char *err, size_t errlen) {
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_set(err, errlen, "open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return err_set(err, errlen, "%s is not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    if (size < 8) {
        close(fd);
        return err_set(err, errlen, "%s: %zu bytes, too short for a safetensors header", path,
                       size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int saved = errno;
    close(fd);
    if (map == MAP_FAILED) return err_set(err, errlen, "mmap %s: %s", path, strerror(saved));
    if (st_parse(map, size, path, f, err, errlen) != 0) {
        munmap(map, size);
        return -1;
    }
    f->map = map;
    f->map_len = size;
    return 0;
}

const st_tensor *st_find(const st_file *f, const char *name) {
    for (size_t i = 0; i < f->ntensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

int st_to_f32(const st_file *f, const st_tensor *t, float *dst, char *err, size_t errlen) {
    const unsigned char *s = t->data;
    switch (t->dtype) {
    case ST_F32:
        memcpy(dst, s, t->count * sizeof(float)); /* the source may be unaligned */
        return 0;
    case ST_F16:
        for (size_t i = 0; i < t->count; i++)
            dst[i] = st_f16_to_f32((uint16_t)(s[2 * i] | s[2 * i + 1] << 8));
        return 0;
    case ST_BF16:
        for (size_t i = 0; i < t->count; i++)
            dst[i] = st_bf16_to_f32((uint16_t)(s[2 * i] | s[2 * i + 1] << 8));
        return 0;
    default:
        return err_set(err, errlen, "%s: tensor %s: dtype %s (expected F32, F16 or BF16)",
                       f->label, t->name, st_dtype_name(t->dtype));
    }
}

void st_release(const st_file *f, const st_tensor *t) {
    if (!f->map || t->end == t->begin) return;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) return;
    uintptr_t lo = (uintptr_t)t->data, hi = lo + (t->end - t->begin);
    uintptr_t first = (lo + (uintptr_t)page - 1) / (uintptr_t)page * (uintptr_t)page;
    uintptr_t last = hi / (uintptr_t)page * (uintptr_t)page;
    /* Only pages wholly inside the tensor: a neighbour's bytes stay. Failure
     * costs memory, not correctness, so it is not reported. */
    if (last > first) madvise((void *)first, last - first, MADV_DONTNEED);
}

void st_close(st_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->map_len);
    json_decref(f->json);
    free(f->tensors);
    free(f->label);
    memset(f, 0, sizeof *f);
}

/* ---- writing ---------------------------------------------------------- */

uint16_t st_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    /* Adding 0x7fff plus the lowest kept bit rounds to nearest, ties to even;
     * a carry out of the mantissa moves the exponent (to inf at the top). */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

uint16_t st_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;
    /* 65520 is halfway between 65504 (the largest half) and 65536: it and
     * everything above round to infinity. */
    if (a >= 0x477ff000u) return sign | 0x7c00u;
    if (a < 0x38800000u) {
        /* Below 2^-14: a subnormal half, mant * 2^-24. Scaling by 2^24 is
         * exact, and lrintf rounds to nearest even; 1024 is the smallest
         * normal's encoding, so rounding up into it needs no special case. */
        float mag;
        memcpy(&mag, &a, sizeof mag);
        return sign | (uint16_t)lrintf(mag * 0x1p24f);
    }
    uint32_t h = ((a >> 23) - 112u) << 10 | (a >> 13 & 0x3ffu); /* rebias 127 -> 15 */
    uint32_t rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return sign | (uint16_t)h;
}

/* Order of the reference implementation: wider dtype first, then name. */
static int st_out_cmp(const st_out_tensor *x, const st_out_tensor *y) {
    if (x->dtype != y->dtype) return x->dtype > y->dtype ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Insertion sort of indices (a header holds thousands of tensors at most and
 * qsort has no context argument). */
static void st_out_sort(const st_out_tensor *t, size_t *order, size_t n) {
    for (size_t i = 0; i < n; i++) order[i] = i;
    for (size_t i = 1; i < n; i++) {
        size_t v = order[i], j = i;
        while (j > 0 && st_out_cmp(&t[order[j - 1]], &t[v]) > 0) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = v;
    }
}

/* Appends s as a JSON string the way serde_json (and Python's json with
 * ensure_ascii=False) writes it: UTF-8 kept, quote, backslash and control
 * characters escaped, \u00xx in lowercase. Returns 0 or -1 (b freed). */
static int st_json_string(buf_t *b, const char *s) {
    if (buf_append(b, "\"", 1) != 0) return -1;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        const char *esc = NULL;
        switch (*p) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        default: break;
        }
        int rc;
        if (esc)
            rc = buf_append(b, esc, strlen(esc));
        else if (*p < 0x20)
            rc = buf_printf(b, "\\u%04x", (unsigned)*p);
        else
            rc = buf_append(b, p, 1);
        if (rc != 0) return -1;
    }
    return buf_append(b, "\"", 1);
}

/* True when s is valid UTF-8 (jansson's check, which the reader applies). */
static bool st_utf8_ok(const char *s) {
    json_t *j = json_string(s);
    json_decref(j);
    return j != NULL;
}

static int st_name_cmp(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Checks every tensor (name, dtype, shape, data) and fills order with the
 * data order. Returns 0 or -1 with err naming the tensor. */
static int st_out_check(const st_out_tensor *t, size_t n, size_t *order, char *err,
                        size_t errlen) {
    for (size_t i = 0; i < n; i++) {
        if (!t[i].name || !t[i].name[0])
            return err_set(err, errlen, "tensor %zu: empty name", i);
        if (strcmp(t[i].name, "__metadata__") == 0 || !st_utf8_ok(t[i].name))
            return err_set(err, errlen, "tensor %.200s: reserved or not UTF-8", t[i].name);
        if (t[i].dtype != ST_F32 && t[i].dtype != ST_F16 && t[i].dtype != ST_BF16)
            return err_set(err, errlen, "tensor %.200s: dtype %s (writes F32, F16 or BF16)",
                           t[i].name, st_dtype_name(t[i].dtype));
        if (t[i].ndim < 0 || t[i].ndim > ST_MAX_DIMS)
            return err_set(err, errlen, "tensor %.200s: %d dimensions (0..%d)", t[i].name,
                           t[i].ndim, ST_MAX_DIMS);
        size_t count = 1;
        for (int d = 0; d < t[i].ndim; d++)
            if (__builtin_mul_overflow(count, t[i].shape[d], &count))
                return err_set(err, errlen, "tensor %.200s: shape overflows", t[i].name);
        if (__builtin_mul_overflow(count, (size_t)4, &count))
            return err_set(err, errlen, "tensor %.200s: shape overflows", t[i].name);
        if (count > 0 && !t[i].data)
            return err_set(err, errlen, "tensor %.200s: no data", t[i].name);
    }
    /* Repeats are found among the names sorted alone: the data order puts
     * the same name under two dtypes apart. */
    const char **names = malloc((n ? n : 1) * sizeof *names);
    if (!names) return err_set(err, errlen, "out of memory");
    for (size_t i = 0; i < n; i++) names[i] = t[i].name;
    qsort(names, n, sizeof *names, st_name_cmp);
    for (size_t i = 1; i < n; i++)
        if (strcmp(names[i - 1], names[i]) == 0) {
            err_set(err, errlen, "tensor %.200s: name repeated", names[i]);
            free(names);
            return -1;
        }
    free(names);
    st_out_sort(t, order, n);
    return 0;
}

static size_t st_out_count(const st_out_tensor *t) {
    size_t count = 1;
    for (int d = 0; d < t->ndim; d++) count *= t->shape[d]; /* checked in st_out_check */
    return count;
}

/* Builds the padded header (without its length prefix) into b. Returns 0, or
 * -1 with err set (b freed). */
static int st_out_header(const st_out_tensor *t, const size_t *order, size_t n,
                         const char *const *metadata, buf_t *b, char *err, size_t errlen) {
    size_t npairs = 0;
    if (metadata)
        while (metadata[2 * npairs]) {
            if (!metadata[2 * npairs + 1] || !st_utf8_ok(metadata[2 * npairs]) ||
                !st_utf8_ok(metadata[2 * npairs + 1]))
                return err_set(err, errlen, "metadata %.200s: no value or not UTF-8",
                               metadata[2 * npairs]);
            npairs++;
        }
    int rc = buf_append(b, "{", 1);
    if (rc == 0 && npairs > 0) {
        rc = buf_append(b, "\"__metadata__\":{", 16);
        /* keys in sorted order, found by repeated minimum (a handful of keys) */
        const char *last = NULL;
        for (size_t k = 0; rc == 0 && k < npairs; k++) {
            size_t best = npairs;
            for (size_t j = 0; j < npairs; j++) {
                const char *key = metadata[2 * j];
                if (last && strcmp(key, last) <= 0) continue;
                if (best == npairs || strcmp(key, metadata[2 * best]) < 0) best = j;
            }
            if (best == npairs)
                return err_set(err, errlen, "metadata %.200s: key repeated", last);
            if (k > 0) rc = buf_append(b, ",", 1);
            if (rc == 0) rc = st_json_string(b, metadata[2 * best]);
            if (rc == 0) rc = buf_append(b, ":", 1);
            if (rc == 0) rc = st_json_string(b, metadata[2 * best + 1]);
            last = metadata[2 * best];
        }
        if (rc == 0) rc = buf_append(b, "}", 1);
    }
    size_t offset = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const st_out_tensor *x = &t[order[i]];
        size_t bytes = st_out_count(x) * st_dtype_size(x->dtype);
        if (npairs > 0 || i > 0) rc = buf_append(b, ",", 1);
        if (rc == 0) rc = st_json_string(b, x->name);
        if (rc == 0) rc = buf_printf(b, ":{\"dtype\":\"%s\",\"shape\":[", st_dtype_name(x->dtype));
        for (int d = 0; rc == 0 && d < x->ndim; d++)
            rc = buf_printf(b, "%s%zu", d ? "," : "", x->shape[d]);
        if (rc == 0 && __builtin_add_overflow(offset, bytes, &(size_t){0}))
            return err_set(err, errlen, "tensor %.200s: file size overflows", x->name);
        if (rc == 0)
            rc = buf_printf(b, "],\"data_offsets\":[%zu,%zu]}", offset, offset + bytes);
        offset += bytes;
    }
    if (rc == 0) rc = buf_append(b, "}", 1);
    while (rc == 0 && b->len % 8 != 0) rc = buf_append(b, " ", 1);
    if (rc != 0)
        return err_set(err, errlen, "safetensors header over %u bytes or out of memory",
                       ST_HEADER_MAX);
    return 0;
}

/* write(2) all of len bytes, retrying short writes and EINTR. */
static int st_write_all(int fd, const void *data, size_t len) {
    const unsigned char *p = data;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Streams one tensor's bytes, little-endian, converted chunk by chunk. */
static int st_write_tensor(int fd, const st_out_tensor *t, unsigned char *chunk,
                           size_t chunk_len) {
    size_t count = st_out_count(t), size = st_dtype_size(t->dtype);
    size_t per = chunk_len / size;
    for (size_t at = 0; at < count; at += per) {
        size_t m = count - at < per ? count - at : per;
        const float *src = t->data + at;
        for (size_t i = 0; i < m; i++) {
            uint32_t v;
            if (t->dtype == ST_F32)
                memcpy(&v, &src[i], sizeof v);
            else
                v = t->dtype == ST_F16 ? st_f32_to_f16(src[i]) : st_f32_to_bf16(src[i]);
            for (size_t k = 0; k < size; k++) chunk[i * size + k] = (unsigned char)(v >> (8 * k));
        }
        if (st_write_all(fd, chunk, m * size) != 0) return -1;
    }
    return 0;
}

int st_write_file(const char *path, const st_out_tensor *tensors, size_t n,
                  const char *const *metadata, char *err, size_t errlen) {
    int rc = -1, fd = -1;
    size_t *order = NULL;
    unsigned char *chunk = NULL;
    char tmp[PATH_MAX];
    tmp[0] = '\0';
    buf_t header;
    buf_init(&header, ST_HEADER_MAX);
    order = malloc((n ? n : 1) * sizeof *order);
    chunk = malloc(1u << 16);
    if (!order || !chunk) {
        err_set(err, errlen, "%s: out of memory", path);
        goto out;
    }
    if (st_out_check(tensors, n, order, err, errlen) != 0 ||
        st_out_header(tensors, order, n, metadata, &header, err, errlen) != 0)
        goto out;
    int w = snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path);
    if (w < 0 || (size_t)w >= sizeof tmp) {
        tmp[0] = '\0';
        err_set(err, errlen, "path too long: %s", path);
        goto out;
    }
    fd = mkstemp(tmp);
    if (fd < 0) {
        err_set(err, errlen, "create %s: %s", tmp, strerror(errno));
        tmp[0] = '\0';
        goto out;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)header.len >> (8 * i));
    if (st_write_all(fd, len8, 8) != 0 || st_write_all(fd, header.data, header.len) != 0)
        goto io;
    for (size_t i = 0; i < n; i++)
        if (st_write_tensor(fd, &tensors[order[i]], chunk, 1u << 16) != 0) goto io;
    if (fchmod(fd, 0644) != 0 || fsync(fd) != 0) goto io;
    int closed = close(fd);
    fd = -1;
    if (closed != 0 || rename(tmp, path) != 0) goto io;
    tmp[0] = '\0';
    util_fsync_parent(path);
    rc = 0;
    goto out;
io:
    err_set(err, errlen, "write %s: %s", path, strerror(errno));
out:
    if (fd >= 0) close(fd);
    if (tmp[0]) unlink(tmp);
    buf_free(&header);
    free(order);
    free(chunk);
    return rc;
}
