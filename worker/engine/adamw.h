/* adamw.h - the optimizer of train jobs: AdamW as torch.optim.AdamW, and
 * gradient clipping by global L2 norm as torch.nn.utils.clip_grad_norm_.
 *
 * Parameters and gradients are flat float32 arrays with the same layout (the
 * model's one allocation, or a LoRA adapter's); the optimizer trains the
 * elements inside a list of ranges and never reads or writes the others, so
 * frozen weights cost nothing. Each range says whether weight decay applies
 * to it (Hugging Face's Trainer exempts biases and norm weights).
 *
 * AdamW, for trainable element p with gradient g at step t (1-based), with
 * torch's non-foreach, amsgrad=False order of operations (PyTorch
 * torch/optim/adamw.py, _single_tensor_adamw):
 *
 *   p  = p * (1 - lr * wd)                 decoupled decay (wd 0: a no-op)
 *   m  = m * b1 + (1 - b1) * g
 *   v  = v * b2 + ((1 - b2) * g) * g
 *   step_size = lr / (1 - b1^t)            in double, like torch's Python
 *   denom     = sqrt(v) / sqrt(1 - b2^t) + eps
 *   p  = p + ((-step_size) * m) / denom
 *
 * Scalars (lr, betas, eps, the bias corrections) are computed in double and
 * rounded to float32 where they meet the tensors, as torch does; p, m and v
 * are float32, so the state is 8 bytes per trainable element. The result
 * matches torch to a few float32 ulps per step, not bit for bit: torch's
 * AVX2 kernels fuse the multiply-add in m's update, plain C does not.
 *
 * Clipping (adamw_clip_grad_norm): total = sqrt(sum over trainable elements
 * of g^2), accumulated in double (torch takes float32 norms per tensor, then
 * the norm of those: equal to about 1e-7 relative); then in float32, as
 * torch, coef = (1 / (total + 1e-6)) * max_norm, and the gradients are
 * multiplied by coef only when coef < 1.
 *
 * Checkpoints: adamw_serialize writes the state as a 64-byte header, the
 * ranges, then m and v as little-endian float32 (layout in adamw.c);
 * adamw_deserialize into an optimizer built with the same config and ranges
 * continues bit-identically. adamw_write_file / adamw_read_file do the same
 * through a FILE, for states too large to hold twice in memory. */
#ifndef STRATA_ADAMW_H
#define STRATA_ADAMW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Hugging Face TrainingArguments' defaults (adam_beta1, adam_beta2,
 * adam_epsilon, weight_decay). */
#define ADAMW_DEFAULT_BETA1 0.9
#define ADAMW_DEFAULT_BETA2 0.999
#define ADAMW_DEFAULT_EPS 1e-8
#define ADAMW_DEFAULT_WEIGHT_DECAY 0.0

typedef struct {
    double beta1;        /* in [0, 1) */
    double beta2;        /* in [0, 1) */
    double eps;          /* >= 0 */
    double weight_decay; /* >= 0; applied to ranges with decay set */
} adamw_config;

/* Elements [offset, offset + count) of the parameter array are trained. */
typedef struct {
    size_t offset;
    size_t count; /* > 0 */
    bool decay;   /* weight decay applies to these elements */
} adamw_range;

typedef struct adamw adamw;

/* The config with Hugging Face's defaults. */
adamw_config adamw_default_config(void);

/* Creates an optimizer at step 0 with zeroed moments for the given ranges,
 * which must be non-empty, in increasing order and not overlapping (they are
 * copied). Returns 0 and *out (free with adamw_free), or -1 with err naming
 * the bad value or the failed allocation. */
int adamw_new(const adamw_config *cfg, const adamw_range *ranges, size_t nranges, adamw **out,
              char *err, size_t errlen);

void adamw_free(adamw *opt);

/* Optimizer steps taken so far (t of the last step; 0 before the first). */
int64_t adamw_steps(const adamw *opt);

/* Trainable elements: the sum of the ranges' counts. */
size_t adamw_trainable(const adamw *opt);

/* The moments, packed in range order (adamw_trainable elements each); for
 * tests and diagnostics. The optimizer owns them. */
const float *adamw_exp_avg(const adamw *opt);
const float *adamw_exp_avg_sq(const adamw *opt);

/* sqrt(sum of g^2) over the trainable elements of grads, in double. */
double adamw_grad_norm(const adamw *opt, const float *grads);

/* Returns the pre-clip global norm of grads over the trainable elements and,
 * when max_norm > 0, scales those gradients as clip_grad_norm_ does (see
 * above). max_norm <= 0 turns clipping off (the norm is still returned). A
 * non-finite norm leaves grads unchanged (torch would multiply them by NaN):
 * the caller sees it in the return value and stops. */
double adamw_clip_grad_norm(const adamw *opt, float *grads, double max_norm);

/* One AdamW step with learning rate lr on the trainable elements of params,
 * using grads (same layout); increments the step count first. */
void adamw_step(adamw *opt, float *params, const float *grads, double lr);

/* Bytes adamw_serialize writes for this optimizer. */
size_t adamw_state_size(const adamw *opt);

/* Writes the state (step, config, ranges, m, v) into buf, which holds len >=
 * adamw_state_size(opt) bytes. Returns 0, or -1 with err if len is short. */
int adamw_serialize(const adamw *opt, void *buf, size_t len, char *err, size_t errlen);

/* Replaces opt's step and moments with a state written by adamw_serialize.
 * The state's config and ranges must equal opt's (a checkpoint of another
 * model or spec is refused, naming the difference); the length must be
 * exact. On failure opt is unchanged. Returns 0 or -1 with err. */
int adamw_deserialize(adamw *opt, const void *buf, size_t len, char *err, size_t errlen);

/* The same bytes as adamw_serialize, streamed to f from its current position
 * in chunks (no buffer the size of the state), then fflush'd; the caller
 * opens, syncs, renames and closes. Returns 0, or -1 with err on a write
 * error. */
int adamw_write_file(const adamw *opt, FILE *f, char *err, size_t errlen);

/* adamw_deserialize from f's current position to its end: the state must end
 * exactly there. Reads into new moment arrays and swaps them in only when all
 * is well, so on failure opt is unchanged (peak memory: the moments twice).
 * Returns 0 or -1 with err (refused header or ranges, truncated, trailing
 * bytes). */
int adamw_read_file(adamw *opt, FILE *f, char *err, size_t errlen);

/* --- the step's arithmetic for an update that runs elsewhere (a GPU) ---
 *
 * A caller that keeps params, grads and the moments in other memory (the
 * CUDA backend's kernels.h cuk_sumsq / cuk_adamw) still counts the steps,
 * computes the scalars and checkpoints through this optimizer: the host
 * decides, the device does the elementwise work with the same float32
 * scalars, so both reach the same values operation for operation. */

/* The float32 scalars of one AdamW step, computed in double from the
 * config, lr and the step count and rounded where torch rounds them (see
 * the formulas above). */
typedef struct {
    float beta1, one_minus_beta1;
    float beta2, one_minus_beta2;
    float neg_step_size;         /* (float)(-(lr / (1 - beta1^t))) */
    float bias_correction2_sqrt; /* (float)sqrt(1 - beta2^t) */
    float eps;
    float decay;                 /* (float)(1 - lr * weight_decay) */
} adamw_scalars;

/* Counts one step (the step count goes up by one, as in adamw_step) and
 * returns its scalars for learning rate lr. adamw_step is this followed by
 * the elementwise update over the ranges. */
adamw_scalars adamw_begin_step(adamw *opt, double lr);

/* The factor range r's parameters are multiplied by before the update:
 * s->decay when the range decays and weight_decay is not 0, else exactly
 * 1 (a multiplication by which changes nothing). r < the range count. */
float adamw_range_decay(const adamw *opt, size_t r, const adamw_scalars *s);

/* The ranges (the optimizer owns them) and their number in *nranges. The
 * moments are packed in this order: range r's start at the sum of the
 * counts before it. */
const adamw_range *adamw_ranges(const adamw *opt, size_t *nranges);

/* clip_grad_norm_'s coefficient for a total norm (computed over the
 * trainable elements in double) and max_norm, as adamw_clip_grad_norm
 * applies it: (1 / ((float)total + 1e-6f)) * (float)max_norm when that is
 * below 1; exactly 1 (no clipping) otherwise, when max_norm <= 0 or when
 * total is not finite. */
float adamw_clip_coef(double total, double max_norm);

/* The moments for import and export (a device copy downloaded into them
 * before adamw_write_file, or uploaded from them after adamw_read_file):
 * *m and *v, adamw_trainable floats each, packed in range order, owned by
 * the optimizer. */
void adamw_moments(adamw *opt, float **m, float **v);

#endif
