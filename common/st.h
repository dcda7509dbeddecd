/* st.h - reading and writing safetensors files (Hugging Face's tensor
 * container).
 *
 * Layout: an 8-byte little-endian header length N, N bytes of JSON
 *   {"name": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]},
 *    ..., "__metadata__": {"key": "value", ...}}
 * then the data section, to which every data_offsets pair is relative.
 *
 * Everything in the file is untrusted. A file is accepted only when: N is at
 * most ST_HEADER_MAX and fits in the file; the header is one JSON object with
 * unique keys; every tensor has a known dtype, a shape of at most ST_MAX_DIMS
 * non-negative dimensions whose element count times the item size equals
 * end - begin (overflow-checked); and the tensors, sorted by offset, cover the
 * data section exactly, with no hole, no overlap and nothing after the last
 * one (as the reference implementation requires).
 *
 * A file is mapped read-only and private (st_open); tensors point into the
 * mapping, and st_release lets the kernel drop a tensor's pages once it has
 * been converted, so a loader holds one working copy, not two. */
#ifndef STRATA_ST_H
#define STRATA_ST_H

#include <stddef.h>
#include <stdint.h>

/* Largest header accepted, in bytes (the reference implementation's limit). */
#define ST_HEADER_MAX (100u * 1000u * 1000u)
#define ST_MAX_DIMS 8

typedef enum {
    ST_BOOL,
    ST_U8,
    ST_I8,
    ST_F8_E5M2,
    ST_F8_E4M3,
    ST_I16,
    ST_U16,
    ST_F16,
    ST_BF16,
    ST_I32,
    ST_U32,
    ST_F32,
    ST_F64,
    ST_I64,
    ST_U64,
} st_dtype;

typedef struct {
    const char *name;           /* owned by the st_file */
    st_dtype dtype;
    int ndim;                   /* 0 (a scalar) .. ST_MAX_DIMS */
    size_t shape[ST_MAX_DIMS];
    size_t count;               /* product of shape (1 for a scalar) */
    size_t begin, end;          /* byte offsets in the data section */
    const unsigned char *data;  /* begin's address; may be unaligned */
} st_tensor;

typedef struct {
    char *label;                /* the path (or a caller's name) used in errors */
    st_tensor *tensors;         /* sorted by begin */
    size_t ntensors;
    const unsigned char *base;  /* the whole file */
    size_t size;
    size_t data_offset;         /* 8 + N */
    void *json;                 /* the parsed header (jansson), owns names */
    void *map;                  /* mmap'd region, or NULL when parsed from a buffer */
    size_t map_len;
} st_file;

/* "F32", "BF16", ... */
const char *st_dtype_name(st_dtype dtype);
/* Bytes per element (1, 2, 4 or 8). */
size_t st_dtype_size(st_dtype dtype);

/* Parses and checks a whole safetensors file held in buf[0..len), which the
 * caller keeps alive and unchanged while f is used; label names it in
 * errors. Returns 0 with *f filled (release with st_close), or -1 with err set
 * naming the label and, where one is at fault, the tensor. */
int st_parse(const void *buf, size_t len, const char *label, st_file *f, char *err,
             size_t errlen);

/* Opens path, maps it read-only (MAP_PRIVATE) and parses it as st_parse does.
 * Returns 0 or -1 with err set; on failure nothing stays mapped. */
int st_open(const char *path, st_file *f, char *err, size_t errlen);

/* The tensor called name, or NULL. */
const st_tensor *st_find(const st_file *f, const char *name);

/* Converts an F32, F16 or BF16 tensor's count elements to float32 in dst
 * (exact: every F16 and BF16 value is a float32). Returns 0, or -1 with err
 * naming the tensor when its dtype is another one. */
int st_to_f32(const st_file *f, const st_tensor *t, float *dst, char *err, size_t errlen);

/* Tells the kernel that t's bytes will not be read again, so the pages wholly
 * inside it leave resident memory (a no-op for a file parsed from a buffer). */
void st_release(const st_file *f, const st_tensor *t);

/* Unmaps and frees everything st_open/st_parse made; f may be zeroed. */
void st_close(st_file *f);

/* IEEE binary16 and bfloat16 to binary32, exact for every input. */
float st_f16_to_f32(uint16_t h);
float st_bf16_to_f32(uint16_t h);

/* ---- writing ---------------------------------------------------------- */

/* One tensor to write: count = product of shape float32 values at data,
 * stored as dtype (ST_F32, ST_F16 or ST_BF16; F16 and BF16 rounded to
 * nearest, ties to even, as torch's .to() does). data may be NULL only when
 * count is 0. */
typedef struct {
    const char *name;
    st_dtype dtype;
    int ndim;
    size_t shape[ST_MAX_DIMS];
    const float *data;
} st_out_tensor;

/* Writes the n tensors to path in the layout the reference implementation
 * (Hugging Face's safetensors) writes, byte for byte: tensors ordered by dtype
 * from widest to narrowest (F32, then BF16, then F16), then by name (bytewise);
 * data back to back in that order; the compact JSON header lists
 * "__metadata__" first (when metadata is non-NULL and non-empty) and then the
 * tensors in data order, and is padded with spaces to a multiple of 8 bytes.
 * metadata is a NULL-terminated list of key, value string pairs
 * ({"format", "pt", NULL}); its keys are written sorted (the reference keeps
 * them in a hash map, so no order is canonical).
 *
 * The file appears atomically: it is written to a temporary file beside path
 * and streamed (one tensor's converted bytes are never all in memory), fsync'd,
 * renamed over path, and the directory fsync'd. Returns 0, or -1 with err
 * naming the tensor at fault (an empty, repeated or reserved name, another
 * dtype, too many dimensions, a size that overflows) or the I/O failure; on
 * failure path is untouched and no temporary file is left. */
int st_write_file(const char *path, const st_out_tensor *tensors, size_t n,
                  const char *const *metadata, char *err, size_t errlen);

/* binary32 to IEEE binary16 and bfloat16, rounded to nearest even; overflow
 * gives infinity; NaN gives 0x7e00 with its sign (F16) and 0x7fc0 (BF16), as
 * torch does. */
uint16_t st_f32_to_f16(float f);
uint16_t st_f32_to_bf16(float f);

#endif
