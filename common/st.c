/* st.c - see st.h. */
#include "common/st.h"

#include "common/util.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdbool.h>
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
