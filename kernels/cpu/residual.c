/* The residual connection with drop path: out = residual_in + scale[sample] branch, where the
 * per-sample scale is 0 (path dropped) or 1 / keep_prob, or 1 everywhere when NULL. Its backward
 * for the branch is the same scaling of dout; the residual's own gradient passes through.
 * Element-wise, so out may be residual_in and dbranch may be dout. */
#include "kernels/cpu/cpu_real.h"

void CPU_FN(residual_forward)(void *out_buffer, const void *residual_in_buffer, const void *branch_buffer,
                              const void *sample_scale_buffer, int rows, int dim, int rows_per_sample) {
    real *out = out_buffer;
    const real *residual_in = residual_in_buffer, *branch = branch_buffer,
               *sample_scale = sample_scale_buffer;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) {
        size_t offset = (size_t)row * dim;
        real scale = sample_scale ? sample_scale[row / rows_per_sample] : 1;
#pragma omp simd
        for (int j = 0; j < dim; j++)
            out[offset + j] = residual_in[offset + j] + scale * branch[offset + j];
    }
}

void CPU_FN(residual_backward)(void *dbranch_buffer, const void *dout_buffer, const void *sample_scale_buffer,
                               int rows, int dim, int rows_per_sample) {
    real *dbranch = dbranch_buffer;
    const real *dout = dout_buffer, *sample_scale = sample_scale_buffer;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) {
        size_t offset = (size_t)row * dim;
        real scale = sample_scale ? sample_scale[row / rows_per_sample] : 1;
#pragma omp simd
        for (int j = 0; j < dim; j++)
            dbranch[offset + j] = scale * dout[offset + j];
    }
}
