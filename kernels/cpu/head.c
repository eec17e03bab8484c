/* The classification head's own operations: pooling the tokens of an image into one vector (the
 * mean of the patch tokens, or the cls token) and the bias gradient of a linear layer (the column
 * sums of its output gradient). */
#include "kernels/cpu/cpu_real.h"

/* out[b] = mean over t = 1 .. tokens-1 of x[b, t] (TF_POOL_AVG) or x[b, 0] (TF_POOL_CLS). The
 * stream's dtype is this backend's one dtype, whichever form the model runs. */
void CPU_FN(token_pool_forward)(void *out_buffer, const void *x_buffer, tf_dtype x_dtype, int batch, int tokens,
                                int dim, tf_pool pool) {
    (void)x_dtype;
    real *out = out_buffer;
    const real *x = x_buffer;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < batch; b++) {
        const real *x_sample = x + (size_t)b * tokens * dim;
        real *out_row = out + (size_t)b * dim;
        if (pool == TF_POOL_CLS) {
            for (int j = 0; j < dim; j++)
                out_row[j] = x_sample[j];
            continue;
        }
        for (int j = 0; j < dim; j++)
            out_row[j] = 0;
        for (int t = 1; t < tokens; t++) {
            const real *x_row = x_sample + (size_t)t * dim;
#pragma omp simd
            for (int j = 0; j < dim; j++)
                out_row[j] += x_row[j];
        }
        real inverse_count = (real)1 / (real)(tokens - 1);
        for (int j = 0; j < dim; j++)
            out_row[j] *= inverse_count;
    }
}

/* dx[b, t] = dout[b] / (tokens - 1) for t >= 1 and 0 for the cls token (TF_POOL_AVG), or
 * dout[b] for the cls token and 0 elsewhere (TF_POOL_CLS). Every element of dx is written. */
void CPU_FN(token_pool_backward)(void *dx_buffer, const void *dout_buffer, int batch, int tokens, int dim,
                                 tf_pool pool) {
    real *dx = dx_buffer;
    const real *dout = dout_buffer;
    const real inverse_count = (real)1 / (real)(tokens - 1);
#pragma omp parallel for schedule(static)
    for (int row = 0; row < batch * tokens; row++) {
        int b = row / tokens, t = row % tokens;
        const real *dout_row = dout + (size_t)b * dim;
        real *dx_row = dx + (size_t)row * dim;
        bool pooled = pool == TF_POOL_CLS ? t == 0 : t > 0;
        if (!pooled) {
            for (int j = 0; j < dim; j++)
                dx_row[j] = 0;
            continue;
        }
        real factor = pool == TF_POOL_CLS ? 1 : inverse_count;
#pragma omp simd
        for (int j = 0; j < dim; j++)
            dx_row[j] = factor * dout_row[j];
    }
}

/* dbias[j] += sum_rows dout[row, j], summed in double. Threads split the columns (blocks of 32),
 * so each element of dbias has one writer; a thread reads its block of every row. */
void CPU_FN(bias_backward)(void *dbias_buffer, const void *dout_buffer, int rows, int dim) {
    real *dbias = dbias_buffer;
    const real *dout = dout_buffer;
    enum { COLUMN_BLOCK = 32 };
#pragma omp parallel for schedule(static)
    for (int column0 = 0; column0 < dim; column0 += COLUMN_BLOCK) {
        int width = dim - column0 < COLUMN_BLOCK ? dim - column0 : COLUMN_BLOCK;
        double sums[COLUMN_BLOCK] = {0};
        for (int row = 0; row < rows; row++) {
            const real *dout_row = dout + (size_t)row * dim + column0;
#pragma omp simd
            for (int j = 0; j < width; j++)
                sums[j] += dout_row[j];
        }
        for (int j = 0; j < width; j++)
            dbias[column0 + j] += (real)sums[j];
    }
}
