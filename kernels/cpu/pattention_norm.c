/* The Pattention normalisation (DESIGN.md section 2): between A = X K^T and out = S V, each row
 * of scores is scaled to a fixed norm and passed through GELU:
 *   r = sqrt(sum_j A_j^2 + eps),  Z = tau A / r,  S = GELU(Z)  (exact erf GELU),
 * eps scaled per row when eps_scale is given (kernels.h).
 * The row norms r are kept for backward, which recomputes Z and S from A rather than storing them.
 * Row sums are accumulated in double in both builds. */
#include "kernels/cpu/cpu_real.h"

/* r = sqrt(sum_j A_j^2 + eps_row) of row `row` of a, the sum in double. */
static real row_norm_of(const real *a, size_t row, int n, double eps_row) {
    const real *a_row = a + row * n;
    double sum_squares = 0.0;
#pragma omp simd reduction(+ : sum_squares)
    for (int j = 0; j < n; j++)
        sum_squares += (double)a_row[j] * (double)a_row[j];
    return (real)sqrt(sum_squares + eps_row);
}

/* eps e_row, e_row = eps_scale[row] or 1 without a scale (kernels.h). */
static double row_eps(float eps, const real *eps_scale, size_t row) {
    return (double)eps * (eps_scale ? (double)eps_scale[row] : 1.0);
}

/* r and S of one row. Z is computed from the stored (rounded) r so that backward recomputes the
 * same Z. */
static void normalize_row(real *s, real *row_norm, const real *a, size_t row, int n, float tau, double eps_row) {
    const real *a_row = a + row * n;
    real *s_row = s + row * n;
    real r = row_norm_of(a, row, n, eps_row);
    real scale = (real)tau / r;
    row_norm[row] = r;
#pragma omp simd
    for (int j = 0; j < n; j++)
        s_row[j] = cpu_gelu(scale * a_row[j]);
}

void CPU_FN(pattention_norm_forward)(void *s_buffer, void *row_norm_buffer, const void *a_buffer, int rows,
                                     int n, float tau, float eps, const void *eps_scale_buffer) {
    const real *eps_scale = eps_scale_buffer;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++)
        normalize_row(s_buffer, row_norm_buffer, a_buffer, (size_t)row, n, tau, row_eps(eps, eps_scale, row));
}

/* Whether row `row` holds the bound (kernels.h): each r_p^2 at least share times their sum. */
static bool row_within_share(const tf_norm_rows *norms, int count, size_t row, float share) {
    double squares[TF_NORM_RECHECK_MAX], total = 0.0;
    for (int p = 0; p < count; p++) {
        double r = ((const real *)norms[p].row_norm)[row];
        squares[p] = r * r;
        total += squares[p];
    }
    for (int p = 0; p < count; p++)
        if (squares[p] < share * total) return false;
    return true;
}

void CPU_FN(pattention_norm_recheck)(const tf_norm_rows *norms, int count, const void *x_buffer, int rows, int n,
                                     int dim, float eps, float eps_ln, float share) {
    const real *x = x_buffer;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) {
        if (row_within_share(norms, count, (size_t)row, share)) continue;
        real variance;
        CPU_FN(layernorm_variance)(&variance, x + (size_t)row * dim, 1, dim, eps_ln);
        for (int p = 0; p < count; p++)
            normalize_row(norms[p].s, norms[p].row_norm, norms[p].a, (size_t)row, n, norms[p].tau,
                          (double)eps * (double)variance);
    }
}

/* Backward. With dZ_j = dS_j GELU'(Z_j), and for one row
 *   r = sqrt(sum_k A_k^2 + eps),   dr / dA_i = A_i / r,
 *   Z_j = tau A_j / r,   dZ_j / dA_i = tau delta_ij / r - tau A_j A_i / r^3,
 * so
 *   dA_i = sum_j dZ_j dZ_j/dA_i = tau / r dZ_i - tau A_i / r^3 sum_j A_j dZ_j
 *        = tau / r (dZ_i - A_i (A . dZ) / r^2),
 * where r^2 includes eps. GELU'(z) = Phi(z) + z phi(z) (cpu_real.h). Two passes per row: the
 * first writes dZ into da and sums A . dZ (in double), the second finishes dA in place. Each
 * element of ds is read before the same element of da is written, so da may be ds. The first
 * pass also writes S with forward's expression and the kept r, so it is forward's S exactly. */
void CPU_FN(pattention_norm_backward)(void *da_buffer, void *s_buffer, const void *ds_buffer, const void *a_buffer,
                                      const void *row_norm_buffer, int rows, int n, float tau) {
    real *da = da_buffer, *s = s_buffer;
    const real *ds = ds_buffer, *a = a_buffer, *row_norm = row_norm_buffer;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) {
        const real *a_row = a + (size_t)row * n;
        const real *ds_row = ds + (size_t)row * n;
        real *da_row = da + (size_t)row * n, *s_row = s + (size_t)row * n;
        real r = row_norm[row];
        real scale = (real)tau / r;
        double a_dot_dz = 0.0;
#pragma omp simd reduction(+ : a_dot_dz)
        for (int j = 0; j < n; j++) {
            real z = scale * a_row[j], cdf = cpu_normal_cdf(z);
            real dz = ds_row[j] * cpu_gelu_derivative_from_cdf(z, cdf);
            s_row[j] = cpu_gelu_from_cdf(z, cdf);
            da_row[j] = dz;
            a_dot_dz += (double)a_row[j] * (double)dz;
        }
        real projection = (real)(a_dot_dz / ((double)r * (double)r));
#pragma omp simd
        for (int j = 0; j < n; j++)
            da_row[j] = scale * (da_row[j] - a_row[j] * projection);
    }
}

/* Forward fused with the average over each image's patch rows (kernels.h): the row norms first,
 * into row_norm, then each image's column sums of S over blocks of columns, in double. */
void CPU_FN(pattention_norm_pool)(void *pooled_buffer, void *row_norm_buffer, const void *a_buffer, int batch,
                                  int tokens, int n, float tau, float eps, const void *eps_scale_buffer) {
    enum { COLUMNS = 256 };
    real *pooled = pooled_buffer, *row_norm = row_norm_buffer;
    const real *a = a_buffer, *eps_scale = eps_scale_buffer;
    int rows = batch * tokens, column_blocks = (n + COLUMNS - 1) / COLUMNS;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++)
        row_norm[row] = row_norm_of(a, (size_t)row, n, row_eps(eps, eps_scale, row));
#pragma omp parallel for schedule(static)
    for (int task = 0; task < batch * column_blocks; task++) {
        int image = task / column_blocks, first = task % column_blocks * COLUMNS;
        int width = n - first < COLUMNS ? n - first : COLUMNS;
        double sums[COLUMNS] = {0};
        for (int token = 1; token < tokens; token++) {
            size_t row = (size_t)image * tokens + (size_t)token;
            const real *a_row = a + row * n + first;
            real scale = (real)tau / row_norm[row];
            for (int j = 0; j < width; j++)
                sums[j] += (double)cpu_gelu(scale * a_row[j]);
        }
        for (int j = 0; j < width; j++)
            pooled[(size_t)image * n + first + j] = (real)(sums[j] / (tokens - 1));
    }
}
