/* Patch embedding and token assembly. The patch projection itself (a stride-patch convolution)
 * is a GEMM of im2col's patch matrix with the conv weight viewed as [dim, channels * patch^2];
 * tokens_forward then prepends the cls token and adds the position embedding. */
#include "kernels/cpu/cpu_real.h"

#include <string.h>

/* patches[b * G^2 + gy * G + gx, (c * patch + y) * patch + x] = images[b, c, gy * patch + y, gx * patch + x]
 * with G = size / patch patches per side: row-major patches, each in (channel, y, x) order. */
void CPU_FN(patch_im2col)(void *patches_buffer, const void *images_buffer, int batch, int channels, int size,
                          int patch) {
    real *patches = patches_buffer;
    const real *images = images_buffer;
    const int grid = size / patch, patch_size = channels * patch * patch;
#pragma omp parallel for schedule(static)
    for (int patch_row = 0; patch_row < batch * grid; patch_row++) { /* one row of patches: (b, gy) */
        int b = patch_row / grid, gy = patch_row % grid;
        for (int gx = 0; gx < grid; gx++) {
            real *out = patches + ((size_t)patch_row * grid + gx) * patch_size;
            for (int c = 0; c < channels; c++)
                for (int y = 0; y < patch; y++) {
                    const real *in =
                        images + (((size_t)b * channels + c) * size + gy * patch + y) * size + gx * patch;
                    memcpy(out + ((size_t)c * patch + y) * patch, in, (size_t)patch * sizeof(real));
                }
        }
    }
}

/* x[b, 0] = cls + pos[0];  x[b, 1 + i] = patch_tokens[b, i] + pos[1 + i]. The stream's dtype is
 * this backend's one dtype, whichever form the model runs. */
void CPU_FN(tokens_forward)(void *x_buffer, tf_dtype x_dtype, const void *patch_tokens_buffer,
                            const void *cls_buffer, const void *pos_buffer, int batch, int patches, int dim) {
    (void)x_dtype;
    real *x = x_buffer;
    const real *patch_tokens = patch_tokens_buffer, *cls = cls_buffer, *pos = pos_buffer;
    const int tokens = patches + 1;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < batch * tokens; row++) {
        int b = row / tokens, t = row % tokens;
        const real *source = t == 0 ? cls : patch_tokens + ((size_t)b * patches + t - 1) * dim;
        const real *pos_row = pos + (size_t)t * dim;
        real *x_row = x + (size_t)row * dim;
#pragma omp simd
        for (int j = 0; j < dim; j++)
            x_row[j] = source[j] + pos_row[j];
    }
}

/* dpatch_tokens[b, i] = dx[b, 1 + i] (overwritten);  dpos[t] += sum_b dx[b, t];
 * dcls += sum_b dx[b, 0]. Threads split the positions, so each dpos row has one writer. */
void CPU_FN(tokens_backward)(void *dpatch_tokens_buffer, void *dcls_buffer, void *dpos_buffer,
                             const void *dx_buffer, int batch, int patches, int dim) {
    real *dpatch_tokens = dpatch_tokens_buffer, *dcls = dcls_buffer, *dpos = dpos_buffer;
    const real *dx = dx_buffer;
    const int tokens = patches + 1;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tokens; t++) {
        real *dpos_row = dpos + (size_t)t * dim;
        for (int b = 0; b < batch; b++) {
            const real *dx_row = dx + ((size_t)b * tokens + t) * dim;
#pragma omp simd
            for (int j = 0; j < dim; j++)
                dpos_row[j] += dx_row[j];
            if (t > 0)
                memcpy(dpatch_tokens + ((size_t)b * patches + t - 1) * dim, dx_row,
                       (size_t)dim * sizeof(real));
            if (t == 0) {
#pragma omp simd
                for (int j = 0; j < dim; j++)
                    dcls[j] += dx_row[j];
            }
        }
    }
}
