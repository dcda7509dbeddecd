/* cka.h - centred kernel alignment between two representations of the same
 * N examples (Kornblith et al. 2019), on OpenBLAS, in float64.
 *
 * Contract:
 * - X is N x Dx, Y is N x Dy, both float64 row-major with a row stride, so two
 *   matrices read side by side into one N x (Dx + Dy) buffer can be passed as
 *   views (the feature-space product is then one dsyrk).
 * - Rows with a NaN in either matrix are dropped from both (in pairs) and
 *   counted. A +/-inf anywhere else is an error.
 * - Each column is centred in float64 (two passes, so a column offset by
 *   thousands, as LLaMA's massive activations are, keeps its small
 *   variations). Columns that are exactly constant are set to zero.
 * - linear: CKA = ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F), computed in feature
 *   space (cost ~ N (Dx + Dy)^2) or Gram space (cost ~ N^2 (Dx + Dy)),
 *   whichever is cheaper; both give the same number.
 * - debiased: HSIC_u of Song et al. 2007 on Grams with zeroed diagonals,
 *   HSIC_u = [tr(K~L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),
 *   CKA = HSIC_u(K,L) / sqrt(HSIC_u(K,K) HSIC_u(L,L)); for the linear kernel in
 *   feature space every term comes from X'X, Y'X, Y'Y, row squared norms and
 *   column sums, so it costs the same as the biased one. Needs n >= 4.
 * - rbf: K_ij = exp(-d_ij^2 / (2 threshold^2 median(d^2))), the median taken
 *   over the full N x N matrix of squared distances, zero diagonal included,
 *   as numpy's np.median(sq_distances) does in Kornblith et al.'s gram_rbf
 *   (found by selection on the upper triangle, not by sorting N^2 values).
 *   Then the biased HSIC of the doubly centred Grams, or HSIC_u if debiased.
 *   Needs two N x N matrices in memory.
 *
 * The inputs are modified in place (rows compacted, columns centred): the
 * caller passes buffers it owns and no longer needs. */
#ifndef STRATA_CKA_H
#define STRATA_CKA_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
/* The GPU path (worker/engine/cuda/cka.cu) is C++, where C11's <stdatomic.h>
 * is unavailable before C++23; std::atomic_int has the same size, alignment
 * and lock-free representation as C's atomic_int with GCC and Clang, so the
 * cancel flag crosses the language boundary unchanged. */
#include <atomic>
using std::atomic_int;
extern "C" {
#else
#include <stdatomic.h>
#endif

typedef enum { CKA_LINEAR = 0, CKA_RBF = 1 } cka_kernel;

/* Which formulation of linear CKA to use; AUTO picks the cheaper one. RBF
 * always works in Gram space. */
typedef enum { CKA_SPACE_AUTO = 0, CKA_SPACE_FEATURE = 1, CKA_SPACE_GRAM = 2 } cka_space;

typedef struct {
    cka_kernel kernel;
    bool debiased;
    double rbf_threshold; /* > 0; used by CKA_RBF only */
    cka_space space;      /* CKA_SPACE_AUTO unless testing or benchmarking */
} cka_options;

/* A row-major view: element (i, j) is data[i * stride + j]. */
typedef struct {
    double *data;
    size_t rows;
    size_t cols;
    size_t stride; /* >= cols */
} cka_matrix;

typedef struct {
    double cka;
    size_t n;            /* rows used */
    size_t dropped_rows; /* rows dropped because either input had a NaN */
    bool gram_space;     /* which formulation was used (for logs) */
} cka_result;

/* Computes CKA between x and y (both modified in place, see above). cancel
 * may be NULL; when it becomes non-zero the computation stops between the
 * large products and fails with "cancelled". Returns 0 with *res filled, or
 * -1 with err set: row-count mismatch, infinite value, too few rows, zero
 * variance, zero RBF bandwidth, a result that is not finite, out of memory. */
int cka_compute(cka_matrix *x, cka_matrix *y, const cka_options *opt, atomic_int *cancel,
                cka_result *res, char *err, size_t errlen);

/* The median of the full n x n matrix of squared distances whose strict
 * upper triangle (n(n-1)/2 values, >= 0) is in upper; the n diagonal zeros
 * are counted and every off-diagonal value twice, as np.median of the full
 * matrix would. upper is reordered. Exposed for tests. */
double cka_full_median(double *upper, size_t n);

/* ---- pieces shared with the GPU path (worker/engine/cuda/cka.cu), so both
 * compute the same maths from the same formulas ---- */

/* Everything cka_compute does before centring: checks the shapes and
 * options, drops rows with a NaN in either matrix (in pairs, compacting both
 * in place), refuses infinite values and too few rows. Fills res->n and
 * res->dropped_rows (the rest of *res zeroed). Returns 0, or -1 with err. */
int cka_prepare(cka_matrix *x, cka_matrix *y, const cka_options *opt, cka_result *res,
                char *err, size_t errlen);

/* The error cka_compute reports when centring found every column of x (or
 * y) constant: returns 0 when both have a varying column, else -1 with err. */
int cka_check_variance(size_t varying_x, size_t varying_y, char *err, size_t errlen);

/* Linear CKA in feature space from the products of the centred X (n, dx)
 * and Y (n, dy). The biased value needs the three squared Frobenius norms
 * only; the debiased one also the Gram diagonals kd = diag(XX'), ld (n), the
 * column sums ks = X'1 (dx), ls = Y'1 (dy), and k1 = X ks, l1 = Y ls (n). */
typedef struct {
    size_t n, dx, dy;
    double fxx, fyy, fxy; /* ||X'X||_F^2, ||Y'Y||_F^2, ||Y'X||_F^2 */
    const double *kd, *ks, *k1, *ld, *ls, *l1;
} cka_linear_parts;

/* *out = the biased or debiased linear CKA from p. Returns 0, or -1 with err
 * when a debiased self-HSIC is not positive. */
int cka_linear_finish(const cka_linear_parts *p, bool debiased, double *out, char *err,
                      size_t errlen);

/* Stores a finished value in res (value, gram_space). Returns 0, or -1 with
 * err when the value is not finite. */
int cka_set_result(cka_result *res, double value, bool gram_space, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
