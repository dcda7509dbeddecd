/* kernels.h - strata's own CUDA kernels, one launcher per backend op (see
 * backend.h for each op's exact semantics: the kernels implement the same
 * maths as cpu.c and are checked against it), plus the pieces the CUDA
 * backend needs around cuBLAS (precision conversions) and the optimizer.
 *
 * Every pointer is device memory (under the emulator, host memory). stream
 * is a cudaStream_t passed as void * so that C code can call these. A
 * launcher only enqueues work; it returns 0, or -1 with err set when the
 * shape is outside what the kernel handles (launch.h says what that is)
 * and nothing was enqueued. Launch failures are the caller's to check
 * (cudaGetLastError), as with any kernel launch. */
#ifndef STRATA_CUDA_KERNELS_H
#define STRATA_CUDA_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* x (n) *= a */
int cuk_scale(float *x, size_t n, float a, void *stream, char *err, size_t errlen);
/* x (n) += y (n) */
int cuk_residual_add(float *x, const float *y, size_t n, void *stream, char *err, size_t errlen);

/* backend.h rmsnorm / rmsnorm_backward (dweight may be NULL). */
int cuk_rmsnorm(float *out, const float *x, const float *weight, size_t N, size_t C, float eps,
                void *stream, char *err, size_t errlen);
int cuk_rmsnorm_backward(float *dx, float *dweight, const float *dout, const float *x,
                         const float *weight, size_t N, size_t C, float eps, void *stream,
                         char *err, size_t errlen);

/* backend.h rope_cached (inverse false) and rope_backward_cached (inverse
 * true), reading the (npos, HS/2, 2) cos/sin table cs. */
int cuk_rope_cached(float *x, const int *pos, size_t N, int nheads, int HS, const float *cs,
                    bool inverse, void *stream, char *err, size_t errlen);

/* backend.h attention / attention_backward (scratch as there: T*T and
 * 2*T*T floats, which the kernels may use or ignore). */
int cuk_attention(float *out, const float *q, const float *k, const float *v, const int *lengths,
                  int B, int T, int NH, int NKV, int HS, float *scratch, void *stream, char *err,
                  size_t errlen);
int cuk_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                           const float *k, const float *v, const int *lengths, int B, int T,
                           int NH, int NKV, int HS, float *scratch, void *stream, char *err,
                           size_t errlen);

/* backend.h swiglu / swiglu_backward. */
int cuk_swiglu(float *gate, const float *up, size_t n, void *stream, char *err, size_t errlen);
int cuk_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n, void *stream, char *err, size_t errlen);

/* backend.h embedding / embedding_backward. */
int cuk_embedding(float *out, const int *tokens, const float *table, size_t N, size_t C,
                  void *stream, char *err, size_t errlen);
int cuk_embedding_backward(float *dtable, const float *dout, const int *tokens, size_t N,
                           size_t C, void *stream, char *err, size_t errlen);

/* backend.h cross_entropy (row_loss is device memory, N doubles). */
int cuk_cross_entropy(float *logits, double *row_loss, const int *targets, size_t N, size_t V,
                      float scale, void *stream, char *err, size_t errlen);

/* backend.h dropout (same mask as backend_dropout_keep). */
int cuk_dropout(float *out, const float *x, size_t n, uint64_t key, uint64_t threshold,
                float scale, bool accumulate, void *stream, char *err, size_t errlen);

/* dst (n) = src (n) rounded to bfloat16 / IEEE half (round to nearest
 * even; fp16 saturates to +-inf past 65504 as __float2half does). dst is
 * uint16_t so that C callers need no CUDA types. */
int cuk_to_bf16(uint16_t *dst, const float *src, size_t n, void *stream, char *err,
                size_t errlen);
int cuk_to_fp16(uint16_t *dst, const float *src, size_t n, void *stream, char *err,
                size_t errlen);

/* *sumsq (one device double) += sum of x[i]^2 over n floats, and *nonfinite
 * (one device int) is set to 1 if any x[i] is inf or NaN (left alone
 * otherwise): gradient clipping's global norm and fp16 loss scaling's
 * overflow check in one pass. */
int cuk_sumsq(double *sumsq, int *nonfinite, const float *x, size_t n, void *stream, char *err,
              size_t errlen);

/* One AdamW step over n trainable elements, in adamw.h's order of
 * operations with its scalars precomputed on the host in double and
 * rounded to float as adamw.c does:
 *   g  = grad * grad_scale              (clipping / loss-scale undo; 1: none)
 *   p  = p * decay_factor               (1 - lr * wd; 1 where no decay)
 *   m  = m * beta1 + (1 - beta1) * g
 *   v  = v * beta2 + ((1 - beta2) * g) * g
 *   p  = p + (neg_step_size * m) / (sqrtf(v) / bias_correction2_sqrt + eps)
 * p, grad, m, v are float32 (n each). */
int cuk_adamw(float *p, const float *grad, float *m, float *v, size_t n, float grad_scale,
              float decay_factor, float beta1, float one_minus_beta1, float beta2,
              float one_minus_beta2, float neg_step_size, float bias_correction2_sqrt, float eps,
              void *stream, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
