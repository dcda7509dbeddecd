/* cka.c - see cka.h. Shapes: X (n, dx), Y (n, dy); Grams K, L (n, n);
 * feature products X'X (dx, dx), Y'Y (dy, dy), X'Y (dx, dy). */
#include "worker/engine/cka.h"

#include "common/util.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One unbiased or biased HSIC's ingredients for a pair of Grams (K, L):
 * trace = tr(K~L~), sum_k = 1'K~1, sum_l = 1'L~1, cross = 1'K~L~1. */
typedef struct {
    double trace, sum_k, sum_l, cross;
} cka_hsic_terms;

static bool cka_cancelled(atomic_int *cancel, char *err, size_t errlen) {
    if (cancel && atomic_load(cancel)) {
        err_set(err, errlen, "cancelled");
        return true;
    }
    return false;
}

/* Song et al. 2007, eq. (5). */
static double cka_hsic_unbiased(const cka_hsic_terms *t, double n) {
    return (t->trace + t->sum_k * t->sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * t->cross) /
           (n * (n - 3));
}

/* True when any of row[0..cols) is NaN or +/-inf. Tests the exponent bits
 * with integer operations so the common all-finite row costs one streaming
 * pass that the compiler can vectorise. */
static bool cka_row_nonfinite(const double *row, size_t cols) {
    uint64_t bad = 0;
    for (size_t j = 0; j < cols; j++) {
        uint64_t bits;
        memcpy(&bits, &row[j], sizeof bits);
        bad |= (uint64_t)((bits & 0x7ff0000000000000ull) == 0x7ff0000000000000ull);
    }
    return bad != 0;
}

static bool cka_row_has_nan(const double *row, size_t cols) {
    for (size_t j = 0; j < cols; j++)
        if (isnan(row[j])) return true;
    return false;
}

/* Drops rows with a NaN in either matrix (compacting both in place), rejects
 * infinite values. Returns 0 or -1. */
static int cka_drop_nan_rows(cka_matrix *x, cka_matrix *y, size_t *dropped, char *err,
                             size_t errlen) {
    size_t kept = 0;
    for (size_t i = 0; i < x->rows; i++) {
        double *xr = x->data + i * x->stride, *yr = y->data + i * y->stride;
        bool bad_x = cka_row_nonfinite(xr, x->cols), bad_y = cka_row_nonfinite(yr, y->cols);
        if (bad_x || bad_y) {
            if (cka_row_has_nan(xr, x->cols) || cka_row_has_nan(yr, y->cols)) continue;
            const double *row = bad_x ? xr : yr;
            size_t cols = bad_x ? x->cols : y->cols, j = 0;
            while (j < cols && !isinf(row[j])) j++;
            return err_set(err, errlen, "%s has an infinite value at row %zu, column %zu",
                           bad_x ? "x" : "y", i, j);
        }
        if (kept != i) {
            memmove(x->data + kept * x->stride, xr, x->cols * sizeof(double));
            memmove(y->data + kept * y->stride, yr, y->cols * sizeof(double));
        }
        kept++;
    }
    *dropped = x->rows - kept;
    x->rows = y->rows = kept;
    return 0;
}

/* Centres every column of m in place. The mean is accumulated relative to
 * the first row (sum of x_ij - x_0j), so a column offset by thousands, as
 * LLaMA's massive activations are, keeps its small variations: the sum sees
 * only the spread, never the offset. The same pass finds exactly constant
 * columns (every difference zero), which become exact zeros. Sets *varying to
 * the number of non-constant columns. Returns 0, or -1 when out of memory. */
static int cka_centre(cka_matrix *m, size_t *varying) {
    size_t n = m->rows, d = m->cols;
    double *sum = calloc(d ? 2 * d : 1, sizeof *sum);
    if (!sum) return -1;
    double *spread = sum + d; /* sum of |x_ij - x_0j| */
    const double *first = m->data;
    for (size_t i = 1; i < n; i++) {
        const double *row = m->data + i * m->stride;
        for (size_t j = 0; j < d; j++) {
            double diff = row[j] - first[j];
            sum[j] += diff;
            spread[j] += fabs(diff);
        }
    }
    /* mean_j = x_0j + sum_j / n, kept as x_0j and sum_j / n, and subtracted
     * in that order so no large intermediate is rounded. */
    *varying = 0;
    for (size_t j = 0; j < d; j++) {
        sum[j] /= (double)n;
        if (spread[j] != 0) (*varying)++;
    }
    /* Row 0 is the reference: centre the later rows first. */
    for (size_t i = n; i-- > 0;) {
        double *row = m->data + i * m->stride;
        for (size_t j = 0; j < d; j++)
            row[j] = spread[j] != 0 ? (row[j] - first[j]) - sum[j] : 0.0;
    }
    free(sum);
    return 0;
}

/* Squared Frobenius norm of a symmetric d x d matrix of which only the upper
 * triangle (row-major, leading dimension ld) is valid. */
static double cka_sym_frob2(const double *c, size_t d, size_t ld) {
    double diag = 0, off = 0;
    for (size_t i = 0; i < d; i++) {
        const double *row = c + i * ld;
        diag += row[i] * row[i];
        for (size_t j = i + 1; j < d; j++) off += row[j] * row[j];
    }
    return diag + 2.0 * off;
}

static double cka_frob2(const double *c, size_t rows, size_t cols, size_t ld) {
    double s = 0;
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < cols; j++) s += c[i * ld + j] * c[i * ld + j];
    return s;
}

/* Row squared norms (the Gram diagonal) into kdiag (n), column sums into
 * colsum (d), and K1 = X colsum into k1 (n). */
static void cka_linear_stats(const cka_matrix *m, double *kdiag, double *colsum, double *k1) {
    memset(colsum, 0, m->cols * sizeof(double));
    for (size_t i = 0; i < m->rows; i++) {
        const double *row = m->data + i * m->stride;
        double s = 0;
        for (size_t j = 0; j < m->cols; j++) {
            s += row[j] * row[j];
            colsum[j] += row[j];
        }
        kdiag[i] = s;
    }
    cblas_dgemv(CblasRowMajor, CblasNoTrans, (int)m->rows, (int)m->cols, 1.0, m->data,
                (int)m->stride, colsum, 1, 0.0, k1, 1);
}

/* Debiased terms for linear Grams K = XX', L = YY' from feature-space
 * quantities: with zeroed diagonals, tr(K~L~) = ||Y'X||^2 - sum_i K_ii L_ii,
 * 1'K~1 = ||X'1||^2 - tr(K), and K~1 = X(X'1) - diag(K). */
static cka_hsic_terms cka_linear_terms(double frob2_cross, size_t n, const double *kd,
                                       const double *ks, size_t dk, const double *k1,
                                       const double *ld, const double *ls, size_t dl,
                                       const double *l1) {
    cka_hsic_terms t = {frob2_cross, 0, 0, 0};
    double s2 = 0, tr = 0;
    for (size_t j = 0; j < dk; j++) s2 += ks[j] * ks[j];
    for (size_t i = 0; i < n; i++) tr += kd[i];
    t.sum_k = s2 - tr;
    s2 = tr = 0;
    for (size_t j = 0; j < dl; j++) s2 += ls[j] * ls[j];
    for (size_t i = 0; i < n; i++) tr += ld[i];
    t.sum_l = s2 - tr;
    for (size_t i = 0; i < n; i++) {
        t.trace -= kd[i] * ld[i];
        t.cross += (k1[i] - kd[i]) * (l1[i] - ld[i]);
    }
    return t;
}

int cka_linear_finish(const cka_linear_parts *p, bool debiased, double *out, char *err,
                      size_t errlen) {
    if (!debiased) {
        *out = p->fxy / (sqrt(p->fxx) * sqrt(p->fyy));
        return 0;
    }
    cka_hsic_terms txy =
        cka_linear_terms(p->fxy, p->n, p->kd, p->ks, p->dx, p->k1, p->ld, p->ls, p->dy, p->l1);
    cka_hsic_terms txx =
        cka_linear_terms(p->fxx, p->n, p->kd, p->ks, p->dx, p->k1, p->kd, p->ks, p->dx, p->k1);
    cka_hsic_terms tyy =
        cka_linear_terms(p->fyy, p->n, p->ld, p->ls, p->dy, p->l1, p->ld, p->ls, p->dy, p->l1);
    double hxy = cka_hsic_unbiased(&txy, (double)p->n);
    double hxx = cka_hsic_unbiased(&txx, (double)p->n);
    double hyy = cka_hsic_unbiased(&tyy, (double)p->n);
    if (!(hxx > 0) || !(hyy > 0))
        return err_set(err, errlen,
                       "the debiased HSIC of %s with itself is not positive (%g): too few rows "
                       "for the debiased estimator",
                       !(hxx > 0) ? "x" : "y", !(hxx > 0) ? hxx : hyy);
    *out = hxy / sqrt(hxx * hyy);
    return 0;
}

/* Linear CKA in feature space. Returns 0 or -1. */
static int cka_linear_feature(cka_matrix *x, cka_matrix *y, bool debiased, atomic_int *cancel,
                              double *out, char *err, size_t errlen) {
    size_t n = x->rows, dx = x->cols, dy = y->cols;
    bool joint = y->data == x->data + dx && x->stride == y->stride && x->stride == dx + dy;
    double *prod = NULL, *sxx = NULL, *syy = NULL, *sxy = NULL, *stats = NULL;
    size_t ldxx, ldyy, ldxy;
    int rc = -1;
    if (joint) {
        /* [X Y]'[X Y] = [[X'X, X'Y], [., Y'Y]] in one call: (dx+dy, dx+dy). */
        size_t d = dx + dy;
        prod = malloc(d * d * sizeof(double));
        if (!prod) goto oom;
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)n, 1.0, x->data,
                    (int)x->stride, 0.0, prod, (int)d);
        sxx = prod;
        syy = prod + dx * d + dx;
        sxy = prod + dx;
        ldxx = ldyy = ldxy = d;
    } else {
        prod = malloc((dx * dx + dy * dy + dx * dy) * sizeof(double));
        if (!prod) goto oom;
        sxx = prod;
        syy = prod + dx * dx;
        sxy = syy + dy * dy;
        ldxx = dx;
        ldyy = dy;
        ldxy = dy;
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)dx, (int)n, 1.0, x->data,
                    (int)x->stride, 0.0, sxx, (int)dx);
        if (cka_cancelled(cancel, err, errlen)) goto out;
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)dy, (int)n, 1.0, y->data,
                    (int)y->stride, 0.0, syy, (int)dy);
        if (cka_cancelled(cancel, err, errlen)) goto out;
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)dx, (int)dy, (int)n, 1.0,
                    x->data, (int)x->stride, y->data, (int)y->stride, 0.0, sxy, (int)dy);
    }
    if (cka_cancelled(cancel, err, errlen)) goto out;
    cka_linear_parts parts = {n, dx, dy, cka_sym_frob2(sxx, dx, ldxx), cka_sym_frob2(syy, dy, ldyy),
                              cka_frob2(sxy, dx, dy, ldxy), NULL, NULL, NULL, NULL, NULL, NULL};
    if (debiased) {
        /* kd, k1 (n) and ks (dx) for X; the same for Y. */
        stats = malloc((4 * n + dx + dy) * sizeof(double));
        if (!stats) goto oom;
        double *kd = stats, *k1 = kd + n, *ld = k1 + n, *l1 = ld + n, *ks = l1 + n, *ls = ks + dx;
        cka_linear_stats(x, kd, ks, k1);
        cka_linear_stats(y, ld, ls, l1);
        parts.kd = kd;
        parts.ks = ks;
        parts.k1 = k1;
        parts.ld = ld;
        parts.ls = ls;
        parts.l1 = l1;
    }
    rc = cka_linear_finish(&parts, debiased, out, err, errlen);
    goto out;
oom:
    err_set(err, errlen, "out of memory for the %zu x %zu and %zu x %zu feature products", dx, dx,
            dy, dy);
out:
    free(prod);
    free(stats);
    return rc;
}

/* K = M M' (n, n), full symmetric. */
static void cka_gram_linear(const cka_matrix *m, double *k) {
    size_t n = m->rows;
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)n, (int)m->cols, 1.0, m->data,
                (int)m->stride, 0.0, k, (int)n);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < i; j++) k[i * n + j] = k[j * n + i];
}

static void cka_swap(double *a, ptrdiff_t i, ptrdiff_t j) {
    double t = a[i];
    a[i] = a[j];
    a[j] = t;
}

/* Returns the k-th smallest of a[0..n) (0-based), partially reordering a so
 * that everything after position k is >= it (Hoare quickselect, median of
 * three). a holds no NaN. */
static double cka_select(double *a, size_t n, size_t k) {
    ptrdiff_t lo = 0, hi = (ptrdiff_t)n - 1, target = (ptrdiff_t)k;
    while (lo < hi) {
        ptrdiff_t mid = lo + (hi - lo) / 2;
        if (a[mid] < a[lo]) cka_swap(a, lo, mid);
        if (a[hi] < a[lo]) cka_swap(a, lo, hi);
        if (a[hi] < a[mid]) cka_swap(a, mid, hi);
        double pivot = a[mid];
        ptrdiff_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                cka_swap(a, i, j);
                i++;
                j--;
            }
        }
        /* [lo, j] <= pivot, (j, i) == pivot, [i, hi] >= pivot */
        if (target <= j)
            hi = j;
        else if (target >= i)
            lo = i;
        else
            return a[target];
    }
    return a[target];
}

double cka_full_median(double *upper, size_t n) {
    size_t m = n * n, count = n * (n - 1) / 2;
    /* Rank r of the full matrix: the n zeros come first, then each upper
     * value twice in ascending order. */
    size_t lo_rank = (m - 1) / 2, hi_rank = m / 2;
    double lo_val, hi_val;
    if (hi_rank < n) return 0.0;
    size_t hi_pos = (hi_rank - n) / 2;
    if (lo_rank < n) {
        lo_val = 0.0;
        hi_val = cka_select(upper, count, hi_pos);
    } else {
        size_t lo_pos = (lo_rank - n) / 2;
        lo_val = cka_select(upper, count, lo_pos);
        hi_val = lo_val;
        if (hi_pos != lo_pos) {
            /* select left the larger values after lo_pos: take their minimum */
            hi_val = upper[lo_pos + 1];
            for (size_t i = lo_pos + 2; i < count; i++)
                if (upper[i] < hi_val) hi_val = upper[i];
        }
    }
    return (lo_val + hi_val) / 2.0;
}

/* K (n, n) := exp(-d^2 / (2 t^2 median(d^2))) for the rows of m. Returns 0,
 * or -1 when the bandwidth is zero or memory runs out. */
static int cka_gram_rbf(const cka_matrix *m, double threshold, const char *name, double *k,
                        char *err, size_t errlen) {
    size_t n = m->rows;
    double *sq = malloc(n * sizeof(double));
    double *upper = malloc((n * (n - 1) / 2 + 1) * sizeof(double));
    int rc = -1;
    if (!sq || !upper) {
        err_set(err, errlen, "out of memory for the rbf Gram of %s", name);
        goto out;
    }
    cka_gram_linear(m, k);
    for (size_t i = 0; i < n; i++) sq[i] = k[i * n + i];
    size_t u = 0;
    for (size_t i = 0; i < n; i++) {
        k[i * n + i] = 0.0;
        for (size_t j = i + 1; j < n; j++) {
            double d2 = sq[i] + sq[j] - 2.0 * k[i * n + j];
            if (d2 < 0) d2 = 0; /* rounding on near-identical rows */
            k[i * n + j] = k[j * n + i] = d2;
            upper[u++] = d2;
        }
    }
    double median = cka_full_median(upper, n);
    if (!(median > 0)) {
        err_set(err, errlen,
                "rbf bandwidth is zero for %s: the median squared distance between rows is 0",
                name);
        goto out;
    }
    double scale = -1.0 / (2.0 * threshold * threshold * median);
    for (size_t i = 0; i < n * n; i++) k[i] = exp(k[i] * scale);
    rc = 0;
out:
    free(sq);
    free(upper);
    return rc;
}

/* H K H for a full symmetric K (n, n), in place. Returns 0, or -1 when out
 * of memory (K untouched). */
static int cka_centre_gram(double *k, size_t n) {
    double *mean = malloc(n * sizeof(double));
    double grand = 0;
    if (!mean) return -1;
    for (size_t i = 0; i < n; i++) {
        double s = 0;
        for (size_t j = 0; j < n; j++) s += k[i * n + j];
        mean[i] = s / (double)n;
        grand += mean[i];
    }
    grand /= (double)n;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++) k[i * n + j] += grand - mean[i] - mean[j];
    free(mean);
    return 0;
}

/* Biased: tr(KL) of centred Grams. Unbiased: the Song et al. terms with
 * the diagonals ignored (as if zeroed). */
static double cka_gram_hsic(const double *k, const double *l, size_t n, bool debiased) {
    if (!debiased) {
        double s = 0;
        for (size_t i = 0; i < n * n; i++) s += k[i] * l[i];
        return s;
    }
    cka_hsic_terms t = {0, 0, 0, 0};
    for (size_t i = 0; i < n; i++) {
        double rk = 0, rl = 0;
        for (size_t j = 0; j < n; j++) {
            if (j == i) continue;
            double a = k[i * n + j], b = l[i * n + j];
            t.trace += a * b;
            rk += a;
            rl += b;
        }
        t.sum_k += rk;
        t.sum_l += rl;
        t.cross += rk * rl;
    }
    return cka_hsic_unbiased(&t, (double)n);
}

/* CKA from two Grams (linear or rbf). Returns 0 or -1. */
static int cka_gram_space(cka_matrix *x, cka_matrix *y, const cka_options *opt,
                          atomic_int *cancel, double *out, char *err, size_t errlen) {
    size_t n = x->rows;
    if (n > SIZE_MAX / n / 2 / sizeof(double))
        return err_set(err, errlen, "%zu rows are too many for Gram space", n);
    double *k = malloc(n * n * sizeof(double));
    double *l = malloc(n * n * sizeof(double));
    int rc = -1;
    if (!k || !l) {
        err_set(err, errlen, "out of memory for two %zu x %zu Gram matrices", n, n);
        goto out;
    }
    if (opt->kernel == CKA_RBF) {
        if (cka_gram_rbf(x, opt->rbf_threshold, "x", k, err, errlen) != 0) goto out;
        if (cka_cancelled(cancel, err, errlen)) goto out;
        if (cka_gram_rbf(y, opt->rbf_threshold, "y", l, err, errlen) != 0) goto out;
        if (!opt->debiased && (cka_centre_gram(k, n) != 0 || cka_centre_gram(l, n) != 0)) {
            err_set(err, errlen, "out of memory");
            goto out;
        }
    } else {
        /* Columns are centred, so XX' is already doubly centred. */
        cka_gram_linear(x, k);
        if (cka_cancelled(cancel, err, errlen)) goto out;
        cka_gram_linear(y, l);
    }
    if (cka_cancelled(cancel, err, errlen)) goto out;
    double hxy = cka_gram_hsic(k, l, n, opt->debiased);
    double hxx = cka_gram_hsic(k, k, n, opt->debiased);
    double hyy = cka_gram_hsic(l, l, n, opt->debiased);
    if (!(hxx > 0) || !(hyy > 0)) {
        err_set(err, errlen, "the %sHSIC of %s with itself is not positive (%g)%s",
                opt->debiased ? "debiased " : "", !(hxx > 0) ? "x" : "y",
                !(hxx > 0) ? hxx : hyy,
                opt->debiased ? ": too few rows for the debiased estimator" : "");
        goto out;
    }
    *out = hxy / sqrt(hxx * hyy);
    rc = 0;
out:
    free(k);
    free(l);
    return rc;
}

int cka_prepare(cka_matrix *x, cka_matrix *y, const cka_options *opt, cka_result *res,
                char *err, size_t errlen) {
    memset(res, 0, sizeof *res);
    if (x->rows != y->rows)
        return err_set(err, errlen, "x has %zu rows, y has %zu", x->rows, y->rows);
    if (x->cols == 0 || y->cols == 0)
        return err_set(err, errlen, "%s has no columns", x->cols == 0 ? "x" : "y");
    if (x->stride < x->cols || y->stride < y->cols)
        return err_set(err, errlen, "bad matrix stride");
    if (opt->kernel == CKA_RBF && !(opt->rbf_threshold > 0))
        return err_set(err, errlen, "rbf_threshold must be positive");
    if (opt->space == CKA_SPACE_FEATURE && opt->kernel == CKA_RBF)
        return err_set(err, errlen, "the rbf kernel is computed in Gram space only");
    if ((size_t)INT32_MAX < x->rows || (size_t)INT32_MAX < x->stride ||
        (size_t)INT32_MAX < y->stride)
        return err_set(err, errlen, "matrix dimensions exceed the BLAS index range");
    size_t dropped = 0;
    if (cka_drop_nan_rows(x, y, &dropped, err, errlen) != 0) return -1;
    size_t n = x->rows;
    res->dropped_rows = dropped;
    res->n = n;
    size_t need = opt->debiased ? 4 : 2;
    if (n < need) {
        if (opt->debiased)
            return err_set(err, errlen,
                           "too few rows for the debiased estimator (need 4, have %zu%s)", n,
                           dropped ? " after dropping rows with NaN" : "");
        return err_set(err, errlen, "too few rows (need 2, have %zu%s)", n,
                       dropped ? " after dropping rows with NaN" : "");
    }
    return 0;
}

int cka_check_variance(size_t varying_x, size_t varying_y, char *err, size_t errlen) {
    if (varying_x == 0) return err_set(err, errlen, "x has zero variance (every column is constant)");
    if (varying_y == 0) return err_set(err, errlen, "y has zero variance (every column is constant)");
    return 0;
}

int cka_set_result(cka_result *res, double value, bool gram_space, char *err, size_t errlen) {
    if (!isfinite(value)) return err_set(err, errlen, "CKA is not finite (%g)", value);
    res->cka = value;
    res->gram_space = gram_space;
    return 0;
}

int cka_compute(cka_matrix *x, cka_matrix *y, const cka_options *opt, atomic_int *cancel,
                cka_result *res, char *err, size_t errlen) {
    if (cka_prepare(x, y, opt, res, err, errlen) != 0) return -1;
    size_t n = x->rows;
    size_t varying_x = 0, varying_y = 0;
    if (cka_centre(x, &varying_x) != 0 || cka_centre(y, &varying_y) != 0)
        return err_set(err, errlen, "out of memory");
    if (cka_check_variance(varying_x, varying_y, err, errlen) != 0) return -1;
    if (cka_cancelled(cancel, err, errlen)) return -1;

    double value = NAN;
    int rc;
    /* Feature space ~ n (dx + dy)^2 flops, Gram space ~ n^2 (dx + dy). */
    bool gram = opt->kernel == CKA_RBF || n < x->cols + y->cols;
    if (opt->space != CKA_SPACE_AUTO) gram = opt->space == CKA_SPACE_GRAM;
    if (gram)
        rc = cka_gram_space(x, y, opt, cancel, &value, err, errlen);
    else
        rc = cka_linear_feature(x, y, opt->debiased, cancel, &value, err, errlen);
    if (rc != 0) return -1;
    return cka_set_result(res, value, gram, err, errlen);
}
