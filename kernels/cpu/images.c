/* The input batch on the device side: uint8 pixels to normalised images, and timm's batch-mode
 * mixup and cutmix, which pair sample b with sample batch - 1 - b (the batch reversed). Both are
 * done in place by visiting each pair once, so the pasted values are always the originals. */
#include "kernels/cpu/cpu_real.h"

#include <stdint.h>

/* images = (pixels / 255 - mean[c]) / std[c], computed in that order. */
void CPU_FN(images_normalize)(void *images_buffer, const void *pixels_buffer, int batch, int channels,
                              int size, const float *mean, const float *std) {
    real *images = images_buffer;
    const uint8_t *pixels = pixels_buffer;
    const size_t plane = (size_t)size * size;
#pragma omp parallel for schedule(static)
    for (int image_channel = 0; image_channel < batch * channels; image_channel++) {
        int c = image_channel % channels;
        const real channel_mean = mean[c], channel_std = std[c];
        const uint8_t *in = pixels + image_channel * plane;
        real *out = images + image_channel * plane;
#pragma omp simd
        for (size_t i = 0; i < plane; i++)
            out[i] = ((real)in[i] / (real)255 - channel_mean) / channel_std;
    }
}

/* x[b] = lambda x[b] + (1 - lambda) x[batch - 1 - b]. With an odd batch the middle sample is its
 * own partner and gets the same formula. */
void CPU_FN(mixup_images)(void *images_buffer, int batch, size_t sample_size, float lambda) {
    real *images = images_buffer;
    const real keep = lambda, mix = (real)(1.0 - (double)lambda);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < (batch + 1) / 2; b++) {
        real *x = images + (size_t)b * sample_size;
        real *partner = images + (size_t)(batch - 1 - b) * sample_size;
#pragma omp simd
        for (size_t i = 0; i < sample_size; i++) {
            real x_i = x[i], partner_i = partner[i];
            x[i] = keep * x_i + mix * partner_i;
            partner[i] = keep * partner_i + mix * x_i;
        }
    }
}

/* The box [y0, y1) x [x0, x1) of every channel is exchanged between x[b] and x[batch - 1 - b]:
 * each receives the other's original pixels. The middle sample of an odd batch keeps its own. */
void CPU_FN(cutmix_images)(void *images_buffer, int batch, int channels, int size, int y0, int y1, int x0,
                           int x1) {
    real *images = images_buffer;
    const size_t sample_size = (size_t)channels * size * size;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < batch / 2; b++) {
        real *sample = images + (size_t)b * sample_size;
        real *partner = images + (size_t)(batch - 1 - b) * sample_size;
        for (int c = 0; c < channels; c++)
            for (int y = y0; y < y1; y++) {
                size_t row = ((size_t)c * size + y) * size;
#pragma omp simd
                for (int x = x0; x < x1; x++) {
                    real value = sample[row + x];
                    sample[row + x] = partner[row + x];
                    partner[row + x] = value;
                }
            }
    }
}
