/* cka_gpu.h - linear CKA on one NVIDIA GPU, for inputs large enough that the
 * CPU's products take long (worker/engine/cka.h is the contract; this path
 * computes the same numbers).
 *
 * What runs where:
 * - host: cka_prepare (shape and option checks, NaN rows dropped in pairs,
 *   inf refused), as on the CPU path;
 * - device: the columns centred in float64 (two passes relative to the first
 *   row, exactly constant columns zeroed, as cka.c does), the feature
 *   products [X Y]'[X Y] (one dsyrk), their squared Frobenius norms and, for
 *   the debiased estimator, the Gram diagonals, column sums and K 1 = X X'1,
 *   all reduced in double;
 * - host: the final formula (cka_linear_finish, shared with the CPU).
 *
 * Precision: float64 products where the GPU has fast float64 (compute
 * capability 6.0, 7.0, 8.0, 9.0, 10.0: P100, V100, A100, H100/H200, B200);
 * elsewhere (consumer and workstation cards, 1/32 or 1/64 rate float64) the
 * centred data are rounded to float32 and multiplied with float32
 * accumulation (never TF32), every reduction still in double. The float64
 * path matches the CPU to rounding (1e-9 relative); the float32 one to about
 * 1e-5 relative on typical activations.
 *
 * Only the linear kernel in feature space runs here: RBF, and linear CKA
 * forced into Gram space, are declined (cpu_may_run set) for the CPU path.
 * Feature space is used even where the CPU would pick Gram space (n < Dx +
 * Dy): the GPU's products cost n (Dx + Dy)^2 at tens of TFLOP/s, and the
 * (Dx + Dy)^2 product is the only large buffer beside the input.
 *
 * A call opens the device with cudaSetDevice, makes its own stream and
 * cuBLAS context and frees everything before returning, so it needs no
 * backend and may run on any thread. Declared in every build: a worker
 * built without nvcc links none_cka.c, which declines every call. */
#ifndef STRATA_CKA_GPU_H
#define STRATA_CKA_GPU_H

#include "worker/engine/cka.h"

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    CKA_GPU_AUTO = 0, /* float64 where the device has it at speed, else float32 */
    CKA_GPU_F64,      /* float64 products (cuBLAS dsyrk) */
    CKA_GPU_F32,      /* float32 products on float64-centred data */
} cka_gpu_precision;

/* One call's settings and what it did. */
typedef struct {
    int device;                  /* in: CUDA ordinal */
    cka_gpu_precision precision; /* in: AUTO unless testing */
    cka_gpu_precision used;      /* out: F64 or F32 once the device was chosen */
    /* out, on failure: true when the GPU could not do the work (declined
     * kernel or space, no CUDA, out of GPU memory, a CUDA error) and the CPU
     * path may run instead on the same matrices. They are then as
     * cka_prepare left them (NaN rows already dropped, not centred), so
     * res->dropped_rows must be added to what cka_compute reports. False
     * for the input's own errors and for cancellation. */
    bool cpu_may_run;
    char device_name[96]; /* out: the device's name, when it was opened */
} cka_gpu_call;

/* Computes linear CKA of x and y on call->device (see cka.h for the
 * contract; x and y are modified in place). cancel may be NULL; when it
 * becomes non-zero the computation stops between steps with "cancelled".
 * Returns 0 with *res filled (gram_space false), or -1 with err set and
 * call->cpu_may_run telling whether the CPU may take over. */
int cka_gpu_compute_with(cka_matrix *x, cka_matrix *y, const cka_options *opt,
                         cka_gpu_call *call, atomic_int *cancel, cka_result *res, char *err,
                         size_t errlen);

/* cka_gpu_compute_with on device with precision AUTO; on failure the caller
 * cannot tell a GPU problem from an input error, so runners use the _with
 * form. */
int cka_gpu_compute(cka_matrix *x, cka_matrix *y, const cka_options *opt, int device,
                    atomic_int *cancel, cka_result *res, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
