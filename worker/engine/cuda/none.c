/* none.c - cuda.h in a worker built without nvcc: there is no GPU code in
 * the binary, so the worker has no GPUs and says why, and every job runs on
 * the CPU backend. This is the complete behaviour of a CPU-only build; the
 * Makefile links it instead of the .cu objects exactly when nvcc is
 * absent. */
#include "worker/engine/cuda/cuda.h"

#include "common/util.h"

#include <stdio.h>

#define NONE_WHY "this worker was built without CUDA support (nvcc was not found at build time)"

int cuda_devices(cuda_device_info *devs, int max, char *why, size_t whylen) {
    (void)devs;
    (void)max;
    if (why && whylen) snprintf(why, whylen, "%s", NONE_WHY);
    return 0;
}

const backend *cuda_backend_open(int device, cuda_precision precision, char *err,
                                 size_t errlen) {
    (void)device;
    (void)precision;
    err_set(err, errlen, "%s", NONE_WHY);
    return NULL;
}

/* Nothing can have been opened, so there is nothing to release. */
void cuda_backend_close(void) {}

int cuda_backend_register_weights(const float *w, size_t n, char *err, size_t errlen) {
    (void)w;
    (void)n;
    return err_set(err, errlen, "%s", NONE_WHY);
}

void cuda_backend_forget_weights(const float *w) { (void)w; }

int cuda_backend_upload_frozen(const float *host, size_t n, const float **key, char *err,
                               size_t errlen) {
    (void)host;
    (void)n;
    *key = NULL;
    return err_set(err, errlen, "%s", NONE_WHY);
}

/* No key can have been handed out. */
void cuda_backend_free_frozen(const float *key) { (void)key; }

bool cuda_backend_low_precision(void) { return false; }

int cuda_backend_memory(size_t *free_bytes, size_t *total_bytes, char *err, size_t errlen) {
    if (free_bytes) *free_bytes = 0;
    if (total_bytes) *total_bytes = 0;
    return err_set(err, errlen, "%s", NONE_WHY);
}

void *cuda_backend_stream(void) { return NULL; }

int cuda_backend_sync(char *err, size_t errlen) { return err_set(err, errlen, "%s", NONE_WHY); }
