/* The batch-level image work that belongs on the GPU:
 *   normalize: images (bf16) = (pixels / 255 - mean[c]) / std[c] from uint8 pixels, computed as
 *              pixels * (1 / (255 std[c])) - mean[c] / std[c];
 *   mixup:     x[b] = lambda x[b] + (1 - lambda) x[batch - 1 - b], in place: one thread per pair
 *              (b, batch - 1 - b) reads both originals and writes both results;
 *   cutmix:    the box [y0, y1) x [x0, x1) of every channel is swapped between x[b] and
 *              x[batch - 1 - b], so each receives the other's original.
 * The middle sample of an odd batch is its own partner (mixup leaves it as it was, up to
 * rounding; cutmix does not touch it). */
#include "kernels/cuda/cuda_common.cuh"

enum { MAX_CHANNELS = 8 };

typedef struct {
    float scale[MAX_CHANNELS], shift[MAX_CHANNELS];
} channel_affine;

__global__ void images_normalize_kernel(bf16 *images, const uint8_t *pixels, int channels, size_t plane,
                                        size_t count, channel_affine affine) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(i / plane % channels);
        images[i] = __float2bfloat16(fmaf((float)pixels[i], affine.scale[c], -affine.shift[c]));
    }
}

/* 8 pixels per thread when a channel plane is a multiple of 8 (they share the channel). */
__global__ void images_normalize_vector_kernel(bf16 *images, const uint8_t *pixels, int channels, size_t plane,
                                               size_t chunk_count, channel_affine affine) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < chunk_count;
         i += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(i * 8 / plane % channels);
        uint2 raw = reinterpret_cast<const uint2 *>(pixels)[i];
        const uint8_t *p = reinterpret_cast<const uint8_t *>(&raw);
        float y[8];
#pragma unroll
        for (int j = 0; j < 8; j++) y[j] = fmaf((float)p[j], affine.scale[c], -affine.shift[c]);
        reinterpret_cast<uint4 *>(images)[i] = bf16x8_pack(y);
    }
}

extern "C" void cuda_images_normalize(void *images, const void *pixels, int batch, int channels, int size,
                                      const float *mean, const float *std) {
    if (batch <= 0 || channels <= 0 || size <= 0) return;
    if (channels > MAX_CHANNELS) {
        cuda_record_failure(__FILE__, __LINE__, "images_normalize", "too many channels",
                            "batch %d channels %d size %d (at most %d channels)", batch, channels, size, MAX_CHANNELS);
        return;
    }
    channel_affine affine;
    for (int c = 0; c < channels; c++) {
        affine.scale[c] = 1.0f / (255.0f * std[c]);
        affine.shift[c] = mean[c] / std[c];
    }
    size_t plane = (size_t)size * size, count = (size_t)batch * channels * plane;
    if (plane % 8 == 0 && is_aligned16(images) && ((uintptr_t)pixels & 7u) == 0)
        images_normalize_vector_kernel<<<grid_for(count / 8, 256), 256, 0, cuda_ctx.stream>>>(
            (bf16 *)images, (const uint8_t *)pixels, channels, plane, count / 8, affine);
    else
        images_normalize_kernel<<<grid_for(count, 256), 256, 0, cuda_ctx.stream>>>(
            (bf16 *)images, (const uint8_t *)pixels, channels, plane, count, affine);
    LAUNCH_CHECK("images_normalize_kernel", "batch %d channels %d size %d", batch, channels, size);
    /* The next upload_bytes may overwrite the pixels once this kernel has read them. */
    CUDA_CHECK(cudaEventRecord(cuda_ctx.pixels_read, cuda_ctx.stream), "images_normalize batch %d", batch);
}

/* One thread per (pair, element); the middle sample of an odd batch is its own pair and gets
 * the same formula, as on the CPU. */
__global__ void mixup_kernel(bf16 *images, int batch, size_t sample_size, float lambda) {
    size_t count = (size_t)((batch + 1) / 2) * sample_size;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        size_t b = i / sample_size, e = i % sample_size;
        bf16 *first = images + b * sample_size + e, *second = images + (batch - 1 - b) * sample_size + e;
        float x = bf16_load(first), y = bf16_load(second);
        bf16_store(first, lambda * x + (1.0f - lambda) * y);
        bf16_store(second, lambda * y + (1.0f - lambda) * x);
    }
}

extern "C" void cuda_mixup_images(void *images, int batch, size_t sample_size, float lambda) {
    if (batch < 1 || sample_size == 0) return;
    size_t count = (size_t)((batch + 1) / 2) * sample_size;
    mixup_kernel<<<grid_for(count, 256), 256, 0, cuda_ctx.stream>>>((bf16 *)images, batch, sample_size, lambda);
    LAUNCH_CHECK("mixup_kernel", "batch %d sample_size %zu lambda %g", batch, sample_size, (double)lambda);
}

/* One thread per (pair, channel, box pixel). */
__global__ void cutmix_kernel(bf16 *images, int batch, int channels, int size, int y0, int x0, int box_h, int box_w) {
    size_t box = (size_t)box_h * box_w, count = (size_t)(batch / 2) * channels * box;
    size_t plane = (size_t)size * size, sample = (size_t)channels * plane;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        size_t pair = i / (channels * box), rest = i % (channels * box);
        int c = (int)(rest / box), y = (int)(rest % box / box_w) + y0, x = (int)(rest % box_w) + x0;
        size_t offset = c * plane + (size_t)y * size + x;
        bf16 *first = images + pair * sample + offset, *second = images + (batch - 1 - pair) * sample + offset;
        bf16 keep = *first;
        *first = *second;
        *second = keep;
    }
}

extern "C" void cuda_cutmix_images(void *images, int batch, int channels, int size, int y0, int y1, int x0, int x1) {
    y0 = max(y0, 0);
    x0 = max(x0, 0);
    y1 = min(y1, size);
    x1 = min(x1, size);
    if (batch < 2 || y1 <= y0 || x1 <= x0) return;
    size_t count = (size_t)(batch / 2) * channels * (y1 - y0) * (x1 - x0);
    cutmix_kernel<<<grid_for(count, 256), 256, 0, cuda_ctx.stream>>>((bf16 *)images, batch, channels, size, y0, x0,
                                                                      y1 - y0, x1 - x0);
    LAUNCH_CHECK("cutmix_kernel", "batch %d channels %d size %d box y [%d, %d) x [%d, %d)", batch, channels, size, y0,
                 y1, x0, x1);
}
