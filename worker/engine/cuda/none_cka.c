/* none_cka.c - cka_gpu.h in a worker built without nvcc: there is no GPU
 * code in the binary, so every call declines before touching its inputs and
 * the CPU path (cka_compute) runs instead. The Makefile links this instead
 * of cka.cu exactly when nvcc is absent. */
#include "worker/engine/cuda/cka_gpu.h"

#include "common/util.h"

#include <string.h>

#define NONE_CKA_WHY "this worker was built without CUDA support (nvcc was not found at build time)"

int cka_gpu_compute_with(cka_matrix *x, cka_matrix *y, const cka_options *opt,
                         cka_gpu_call *call, atomic_int *cancel, cka_result *res, char *err,
                         size_t errlen) {
    (void)x;
    (void)y;
    (void)opt;
    (void)cancel;
    memset(res, 0, sizeof *res);
    call->used = call->precision;
    call->cpu_may_run = true;
    call->device_name[0] = '\0';
    return err_set(err, errlen, "%s", NONE_CKA_WHY);
}

int cka_gpu_compute(cka_matrix *x, cka_matrix *y, const cka_options *opt, int device,
                    atomic_int *cancel, cka_result *res, char *err, size_t errlen) {
    cka_gpu_call call;
    memset(&call, 0, sizeof call);
    call.device = device;
    return cka_gpu_compute_with(x, y, opt, &call, cancel, res, err, errlen);
}
