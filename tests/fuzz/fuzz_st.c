/* fuzz_st.c - fuzz target for the safetensors reader. The input is a whole
 * file.
 *
 * It goes through st_parse as raw bytes, then through st_open (the path the
 * loader takes: mmap of a file) as an in-memory file. Beyond "no crash, no
 * leak", it checks what st.h promises of an accepted file: every tensor has a
 * known dtype and count * itemsize == end - begin; sorted by offset, the
 * tensors tile the data section exactly; names are unique and st_find finds
 * each; float tensors convert to the values stored; and both ways of opening
 * agree. */
#include "tests/fuzz/fuzz.h"

#include <math.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/st.h"
#include "common/util.h"

static int fuzz_st_fd = -1;
static char fuzz_st_path[64];

/* Replaces the memfd's contents with data. Returns 0 or -1. */
static int fuzz_st_store(const uint8_t *data, size_t size) {
    if (fuzz_st_fd < 0) {
        fuzz_st_fd = memfd_create("fuzz_st", MFD_CLOEXEC);
        if (fuzz_st_fd < 0) return -1;
        snprintf(fuzz_st_path, sizeof fuzz_st_path, "/proc/self/fd/%d", fuzz_st_fd);
    }
    if (ftruncate(fuzz_st_fd, 0) != 0) return -1;
    size_t done = 0;
    while (done < size) {
        ssize_t w = pwrite(fuzz_st_fd, data + done, size - done, (off_t)done);
        if (w <= 0) return -1;
        done += (size_t)w;
    }
    return 0;
}

/* The element k of a float tensor, decoded here without st.c's loops. */
static float fuzz_st_element(const st_tensor *t, size_t k) {
    const uint8_t *p = t->data + k * st_dtype_size(t->dtype);
    if (t->dtype == ST_F32) {
        float f;
        memcpy(&f, p, sizeof f);
        return f;
    }
    uint16_t bits = (uint16_t)(p[0] | p[1] << 8);
    return t->dtype == ST_F16 ? st_f16_to_f32(bits) : st_bf16_to_f32(bits);
}

static void fuzz_st_check(const st_file *f, const uint8_t *data, size_t size) {
    FUZZ_CHECK(f->size == size && f->data_offset >= 8 && f->data_offset <= size);
    FUZZ_CHECK(f->data_offset - 8 <= ST_HEADER_MAX);
    size_t expect = 0;
    char err[ERR_LEN];
    for (size_t i = 0; i < f->ntensors; i++) {
        const st_tensor *t = &f->tensors[i];
        size_t itemsize = st_dtype_size(t->dtype), count = 1, bytes;
        FUZZ_CHECK(itemsize != 0);
        FUZZ_CHECK(t->ndim >= 0 && t->ndim <= ST_MAX_DIMS);
        for (int d = 0; d < t->ndim; d++)
            FUZZ_CHECK(!__builtin_mul_overflow(count, t->shape[d], &count));
        FUZZ_CHECK(count == t->count);
        FUZZ_CHECK(!__builtin_mul_overflow(count, itemsize, &bytes));
        FUZZ_CHECK(t->end - t->begin == bytes && t->begin == expect);
        FUZZ_CHECK(t->data == f->base + f->data_offset + t->begin);
        FUZZ_CHECK(f->base == data || f->map != NULL);
        expect = t->end;
        const st_tensor *found = st_find(f, t->name);
        FUZZ_CHECK(found != NULL && strcmp(found->name, t->name) == 0);
        /* Names are unique: the first match is this tensor. */
        FUZZ_CHECK(found == t);
        if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16) {
            FUZZ_CHECK(st_to_f32(f, t, NULL, err, sizeof err) == -1);
            continue;
        }
        /* The data lies inside the input, so count is bounded by size. */
        float *out = malloc((t->count ? t->count : 1) * sizeof *out);
        FUZZ_CHECK(out != NULL);
        FUZZ_CHECK(st_to_f32(f, t, out, err, sizeof err) == 0);
        for (size_t k = 0; k < t->count; k++) {
            float want = fuzz_st_element(t, k);
            FUZZ_CHECK(isnan(want) ? isnan(out[k]) : memcmp(&want, &out[k], sizeof want) == 0);
        }
        free(out);
    }
    FUZZ_CHECK(expect == size - f->data_offset);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    st_file a, b;
    char err[ERR_LEN];
    err[0] = '\0';
    int parsed = st_parse(data, size, "fuzz", &a, err, sizeof err);
    FUZZ_CHECK(parsed == 0 || parsed == -1);
    if (parsed != 0) {
        FUZZ_CHECK(err[0] != '\0' && memchr(err, '\0', sizeof err) && strstr(err, "fuzz"));
        FUZZ_CHECK(a.tensors == NULL && a.json == NULL && a.label == NULL);
    } else {
        fuzz_st_check(&a, data, size);
    }

    if (fuzz_st_store(data, size) != 0) {
        perror("fuzz_st: memfd");
        abort();
    }
    err[0] = '\0';
    int opened = st_open(fuzz_st_path, &b, err, sizeof err);
    FUZZ_CHECK(opened == parsed);
    if (opened == 0) {
        FUZZ_CHECK(b.map != NULL && b.ntensors == a.ntensors);
        fuzz_st_check(&b, b.base, size);
        for (size_t i = 0; i < b.ntensors; i++) {
            FUZZ_CHECK(strcmp(a.tensors[i].name, b.tensors[i].name) == 0 ||
                       a.tensors[i].begin == a.tensors[i].end);
            st_release(&b, &b.tensors[i]);
        }
        st_close(&b);
    } else {
        FUZZ_CHECK(err[0] != '\0');
    }
    if (parsed == 0) st_close(&a);
    return 0;
}
