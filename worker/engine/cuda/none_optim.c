/* none_optim.c - kernels.h's optimizer launchers in a worker built without
 * nvcc. train.c calls cuk_sumsq and cuk_adamw only on a GPU, which such a
 * build never opens (none.c's cuda_backend_open returns NULL), so these
 * exist for the link alone; called anyway, they enqueue nothing and refuse
 * with the reason, as every launcher refuses a shape it cannot run. */
#include "worker/engine/cuda/kernels.h"

#include "common/util.h"

#define NONE_OPTIM_WHY "built without CUDA (nvcc was not found at build time)"

int cuk_sumsq(double *sumsq, int *nonfinite, const float *x, size_t n, void *stream, char *err,
              size_t errlen) {
    (void)sumsq;
    (void)nonfinite;
    (void)x;
    (void)n;
    (void)stream;
    return err_set(err, errlen, "sumsq: %s", NONE_OPTIM_WHY);
}

int cuk_adamw(float *p, const float *grad, float *m, float *v, size_t n, float grad_scale,
              float decay_factor, float beta1, float one_minus_beta1, float beta2,
              float one_minus_beta2, float neg_step_size, float bias_correction2_sqrt, float eps,
              void *stream, char *err, size_t errlen) {
    (void)p;
    (void)grad;
    (void)m;
    (void)v;
    (void)n;
    (void)grad_scale;
    (void)decay_factor;
    (void)beta1;
    (void)one_minus_beta1;
    (void)beta2;
    (void)one_minus_beta2;
    (void)neg_step_size;
    (void)bias_correction2_sqrt;
    (void)eps;
    (void)stream;
    return err_set(err, errlen, "adamw: %s", NONE_OPTIM_WHY);
}
