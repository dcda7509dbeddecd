/* precision.c - the names of cuda_precision (cuda.h). Plain C, built into
 * every worker: job specs name a precision whether or not the worker has
 * CUDA, and the spec is checked before anything is placed on a GPU. */
#include "worker/engine/cuda/cuda.h"

#include "common/util.h"

#include <string.h>

static const char *const precision_names[] = {
    [CUDA_FP32] = "fp32",
    [CUDA_BF16] = "bf16",
    [CUDA_FP16] = "fp16",
};

#define PRECISION_COUNT (sizeof precision_names / sizeof precision_names[0])

const char *cuda_precision_name(cuda_precision p) {
    return (unsigned)p < PRECISION_COUNT ? precision_names[p] : "unknown";
}

int cuda_precision_parse(const char *name, cuda_precision *p, char *err, size_t errlen) {
    if (name) {
        for (size_t i = 0; i < PRECISION_COUNT; i++) {
            if (strcmp(name, precision_names[i]) == 0) {
                *p = (cuda_precision)i;
                return 0;
            }
        }
    }
    return err_set(err, errlen, "precision \"%s\" is not one of fp32, bf16, fp16",
                   name ? name : "(null)");
}
