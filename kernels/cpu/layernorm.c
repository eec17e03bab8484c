/* LayerNorm over the last dimension, biased variance, with or without weight and bias:
 *   mean = sum_j x_j / D,  var = sum_j (x_j - mean)^2 / D,  rstd = 1 / sqrt(var + eps),
 *   xhat = (x - mean) rstd,  out = xhat (* weight + bias).
 * The block LayerNorms are non-parametric and come fused with the residual add before them
 * (residual_layernorm_forward); the head's fc_norm has weight and bias. Row statistics are summed
 * in double (two passes, so no cancellation in the variance); rstd is kept for backward, which
 * reads xhat rather than x (a non-parametric out is xhat; a parametric forward writes it on
 * request). */
#include "kernels/cpu/cpu_real.h"

/* The mean of a row, summed in double. */
static double row_mean(const real *x, int dim) {
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < dim; j++)
        sum += x[j];
    return sum / dim;
}

/* var(x) + eps of a row: the squares about its mean (two passes, no cancellation), in double. */
static double row_variance(const real *x, int dim, double mean, float eps) {
    double squares = 0.0;
#pragma omp simd reduction(+ : squares)
    for (int j = 0; j < dim; j++)
        squares += ((double)x[j] - mean) * ((double)x[j] - mean);
    return squares / dim + (double)eps;
}

/* Normalises one row and stores rstd, and xhat when asked (xhat_out may be NULL); out may be x. */
static void normalize_row(real *out, real *xhat_out, real *rstd_out, const real *x, const real *weight,
                          const real *bias, int dim, float eps) {
    double mean = row_mean(x, dim);
    real rstd = (real)(1.0 / sqrt(row_variance(x, dim, mean, eps)));
    real mean_real = (real)mean;
    *rstd_out = rstd;
    if (xhat_out) {
#pragma omp simd
        for (int j = 0; j < dim; j++)
            xhat_out[j] = (x[j] - mean_real) * rstd;
    }
    if (weight) {
#pragma omp simd
        for (int j = 0; j < dim; j++)
            out[j] = (x[j] - mean_real) * rstd * weight[j] + bias[j];
    } else {
#pragma omp simd
        for (int j = 0; j < dim; j++)
            out[j] = (x[j] - mean_real) * rstd;
    }
}

void CPU_FN(layernorm_forward)(void *out_buffer, void *xhat_buffer, void *rstd_buffer, const void *x_buffer,
                               const void *weight, const void *bias, int rows, int dim, float eps) {
    real *out = out_buffer, *xhat = xhat_buffer, *rstd = rstd_buffer;
    const real *x = x_buffer;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) {
        size_t offset = (size_t)row * dim;
        normalize_row(out + offset, xhat ? xhat + offset : NULL, rstd + row, x + offset, weight, bias, dim, eps);
    }
}

/* residual_out = residual_in + scale[sample] branch, then its non-parametric LayerNorm.
 * Element-wise, so residual_out may be residual_in (the residual stream updated in place). */
void CPU_FN(residual_layernorm_forward)(void *residual_out_buffer, void *ln_out_buffer, void *rstd_buffer,
                                        const void *residual_in_buffer, const void *branch_buffer,
                                        const void *sample_scale_buffer, int rows, int dim, int rows_per_sample,
                                        float eps) {
    real *residual_out = residual_out_buffer, *ln_out = ln_out_buffer, *rstd = rstd_buffer;
    const real *residual_in = residual_in_buffer, *branch = branch_buffer,
               *sample_scale = sample_scale_buffer;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) {
        size_t offset = (size_t)row * dim;
        real scale = sample_scale ? sample_scale[row / rows_per_sample] : 1;
        real *sum_row = residual_out + offset;
        const real *in_row = residual_in + offset, *branch_row = branch + offset;
#pragma omp simd
        for (int j = 0; j < dim; j++)
            sum_row[j] = in_row[j] + scale * branch_row[j];
        normalize_row(ln_out + offset, NULL, rstd + row, sum_row, NULL, NULL, dim, eps);
    }
}

/* Backward, from xhat = (x - mean) rstd as forward computed it (for the blocks, their LayerNorm
 * output). With g = dout (* weight) the gradient reaching xhat,
 *   dx = rstd (g - mean_j(g) - xhat mean_j(g xhat)),
 *   dweight += sum_rows dout xhat,  dbias += sum_rows dout.
 * dx is accumulated (+=), as the residual stream's gradient arrives there too. The parameter
 * gradients are column sums, done in a second pass split by columns so that threads do not
 * write the same elements. */
void CPU_FN(layernorm_backward)(void *dx_buffer, void *dweight_buffer, void *dbias_buffer,
                                const void *dout_buffer, const void *xhat_buffer, const void *rstd_buffer,
                                const void *weight_buffer, int rows, int dim) {
    real *dx = dx_buffer, *dweight = dweight_buffer, *dbias = dbias_buffer;
    const real *dout = dout_buffer, *xhat = xhat_buffer, *rstd = rstd_buffer;
    const real *weight = weight_buffer;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) {
        size_t offset = (size_t)row * dim;
        const real *dout_row = dout + offset, *xhat_row = xhat + offset;
        real *dx_row = dx + offset;
        real row_rstd = rstd[row];
        double sum_g = 0.0, sum_g_xhat = 0.0;
#pragma omp simd reduction(+ : sum_g, sum_g_xhat)
        for (int j = 0; j < dim; j++) {
            real g = weight ? dout_row[j] * weight[j] : dout_row[j];
            sum_g += g;
            sum_g_xhat += (double)g * (double)xhat_row[j];
        }
        real mean_g = (real)(sum_g / dim), mean_g_xhat = (real)(sum_g_xhat / dim);
#pragma omp simd
        for (int j = 0; j < dim; j++) {
            real g = weight ? dout_row[j] * weight[j] : dout_row[j];
            dx_row[j] += row_rstd * (g - mean_g - xhat_row[j] * mean_g_xhat);
        }
    }
    if (!dweight && !dbias) return;
    enum { COLUMN_BLOCK = 32 };
#pragma omp parallel for schedule(static)
    for (int column0 = 0; column0 < dim; column0 += COLUMN_BLOCK) {
        int width = dim - column0 < COLUMN_BLOCK ? dim - column0 : COLUMN_BLOCK;
        double sum_dout_xhat[COLUMN_BLOCK] = {0}, sum_dout[COLUMN_BLOCK] = {0};
        for (int row = 0; row < rows; row++) {
            const real *dout_row = dout + (size_t)row * dim + column0,
                       *xhat_row = xhat + (size_t)row * dim + column0;
#pragma omp simd
            for (int j = 0; j < width; j++) {
                sum_dout_xhat[j] += (double)dout_row[j] * (double)xhat_row[j];
                sum_dout[j] += dout_row[j];
            }
        }
        for (int j = 0; j < width; j++) {
            if (dweight) dweight[column0 + j] += (real)sum_dout_xhat[j];
            if (dbias) dbias[column0 + j] += (real)sum_dout[j];
        }
    }
}

/* out[i] = x[i] minus its rows' means (kernels.h: the LayerNorm's centring, folded into key
 * tokens by the blocks' inference form). The mean is summed in double, as the LayerNorm's is. */
void CPU_FN(center_rows)(void *const *out_buffers, const void *const *x_buffers, const int *rows, int count,
                         int dim) {
    for (int i = 0; i < count; i++) {
        real *out = out_buffers[i];
        const real *x = x_buffers[i];
#pragma omp parallel for schedule(static)
        for (int row = 0; row < rows[i]; row++) {
            const real *x_row = x + (size_t)row * dim;
            real *out_row = out + (size_t)row * dim;
            real mean = (real)row_mean(x_row, dim);
#pragma omp simd
            for (int j = 0; j < dim; j++)
                out_row[j] = x_row[j] - mean;
        }
    }
}

/* sigma^2 = var(x) + eps per row (kernels.h), in double, two passes as normalize_row's. */
void CPU_FN(layernorm_variance)(void *variance_buffer, const void *x_buffer, int rows, int dim, float eps) {
    real *variance = variance_buffer;
    const real *x = x_buffer;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) {
        const real *x_row = x + (size_t)row * dim;
        variance[row] = (real)row_variance(x_row, dim, row_mean(x_row, dim), eps);
    }
}
