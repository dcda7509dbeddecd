/* device.cu - which GPUs this process can use (cuda_devices) and how much
 * memory the calling thread's GPU has left (cuda_backend_memory).
 *
 * The device list is asked of the runtime once and cached: the first
 * cudaGetDeviceCount initialises the driver, which takes long enough that
 * a worker asking at every registration and claim should not pay it twice.
 * CUDA_VISIBLE_DEVICES is applied by the runtime itself, so the ordinals
 * here are the ones cudaSetDevice takes. */
#include "worker/engine/cuda/compat.cuh"
#include "worker/engine/cuda/cuda.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pthread_mutex_t device_mu = PTHREAD_MUTEX_INITIALIZER;
static bool device_probed;
static int device_count;
static cuda_device_info device_list[CUDA_MAX_DEVICES];
static char device_why[256];

/* Asks the runtime for the devices and fills the cache; called once, under
 * device_mu. A failure leaves device_count 0 with device_why saying why. */
static void device_probe(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(device_why, sizeof device_why, "no usable CUDA driver or GPU (%s)",
                 cudaGetErrorString(e));
        return;
    }
    if (n <= 0) {
        snprintf(device_why, sizeof device_why, "no GPU found");
        return;
    }
    int kept = 0;
    for (int i = 0; i < n && kept < CUDA_MAX_DEVICES; i++) {
        cudaDeviceProp prop;
        memset(&prop, 0, sizeof prop);
        e = cudaGetDeviceProperties(&prop, i);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            snprintf(device_why, sizeof device_why, "GPU %d cannot be queried (%s)", i,
                     cudaGetErrorString(e));
            continue;
        }
        cuda_device_info *d = &device_list[kept++];
        d->index = i;
        /* Names are short ("NVIDIA H200"); a longer one is cut at 95 bytes. */
        size_t len = strnlen(prop.name, sizeof prop.name);
        if (len >= sizeof d->name) len = sizeof d->name - 1;
        memcpy(d->name, prop.name, len);
        d->name[len] = '\0';
        d->memory_gb = (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0);
        d->major = prop.major;
        d->minor = prop.minor;
        d->multiprocessors = prop.multiProcessorCount;
    }
    device_count = kept;
    if (kept == 0 && !device_why[0]) snprintf(device_why, sizeof device_why, "no GPU found");
}

int cuda_devices(cuda_device_info *devs, int max, char *why, size_t whylen) {
    if (why && whylen) why[0] = '\0';
    const char *hide = getenv("STRATA_GPUS");
    if (hide && strcmp(hide, "none") == 0) {
        if (why && whylen) snprintf(why, whylen, "STRATA_GPUS=none hides every GPU");
        return 0;
    }
    pthread_mutex_lock(&device_mu);
    if (!device_probed) {
        device_probe();
        device_probed = true;
    }
    int n = device_count < max ? device_count : max;
    if (n < 0) n = 0;
    if (devs && n > 0) memcpy(devs, device_list, (size_t)n * sizeof *devs);
    if (device_count == 0 && why && whylen) snprintf(why, whylen, "%s", device_why);
    pthread_mutex_unlock(&device_mu);
    return n;
}

int cuda_backend_memory(size_t *free_bytes, size_t *total_bytes, char *err, size_t errlen) {
    size_t f = 0, t = 0;
    cudaError_t e = cudaMemGetInfo(&f, &t);
    if (free_bytes) *free_bytes = f;
    if (total_bytes) *total_bytes = t;
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (err && errlen) snprintf(err, errlen, "cudaMemGetInfo: %s", cudaGetErrorString(e));
        return -1;
    }
    return 0;
}
