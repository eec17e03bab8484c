/* Patch embedding and token assembly.
 *   im2col: images [batch, channels, size, size] -> patches [batch * (size/patch)^2,
 *           channels * patch * patch], patches in row-major order, each row in (channel, y, x)
 *           order, matching a conv weight [dim, channels, patch, patch]; the GEMM with that
 *           weight (and bias) follows in the model.
 *   tokens: x[b, 0] = cls + pos[0], x[b, 1 + i] = patch_tokens[b, i] + pos[1 + i], x in fp32
 *           (it starts the residual stream).
 *   backward: dpatch_tokens = dx of the patch positions (a strided copy); dpos[t] += sum over
 *           the batch of dx[b, t], dcls += sum over the batch of dx[b, 0] (fp32, one thread per
 *           element, no atomics). */
#include "kernels/cuda/cuda_common.cuh"

/* One thread per output element. */
__global__ void patch_im2col_kernel(bf16 *patches, const bf16 *images, int channels, int size, int patch,
                                    size_t count) {
    int grid_side = size / patch, patch_count = grid_side * grid_side, area = patch * patch;
    int cols = channels * area;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / cols;
        int col = (int)(i % cols);
        size_t b = row / patch_count;
        int p = (int)(row % patch_count), py = p / grid_side, px = p % grid_side;
        int c = col / area, y = col % area / patch, x = col % patch;
        patches[i] = images[((b * channels + c) * size + (size_t)py * patch + y) * size + (size_t)px * patch + x];
    }
}

/* Patch side a multiple of 8: 8 consecutive x of one patch row are contiguous on both sides. */
__global__ void patch_im2col_vector_kernel(bf16 *patches, const bf16 *images, int channels, int size, int patch,
                                           size_t chunk_count) {
    int grid_side = size / patch, patch_count = grid_side * grid_side, area = patch * patch;
    int cols = channels * area;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < chunk_count;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t element = i * 8;
        size_t row = element / cols;
        int col = (int)(element % cols);
        size_t b = row / patch_count;
        int p = (int)(row % patch_count), py = p / grid_side, px = p % grid_side;
        int c = col / area, y = col % area / patch, x = col % patch;
        size_t source = ((b * channels + c) * size + (size_t)py * patch + y) * size + (size_t)px * patch + x;
        reinterpret_cast<uint4 *>(patches)[i] = *reinterpret_cast<const uint4 *>(images + source);
    }
}

extern "C" void cuda_patch_im2col(void *patches, const void *images, int batch, int channels, int size, int patch) {
    if (batch <= 0 || patch <= 0) return;
    int grid_side = size / patch;
    size_t count = (size_t)batch * grid_side * grid_side * channels * patch * patch;
    if (patch % 8 == 0 && size % 8 == 0 && is_aligned16(patches) && is_aligned16(images))
        patch_im2col_vector_kernel<<<grid_for(count / 8, 256), 256, 0, cuda_ctx.stream>>>(
            (bf16 *)patches, (const bf16 *)images, channels, size, patch, count / 8);
    else
        patch_im2col_kernel<<<grid_for(count, 256), 256, 0, cuda_ctx.stream>>>((bf16 *)patches, (const bf16 *)images,
                                                                                 channels, size, patch, count);
    LAUNCH_CHECK("patch_im2col_kernel", "batch %d channels %d size %d patch %d", batch, channels, size, patch);
}

/* One thread per element of x; X is float (training's stream) or bf16 (inference's). */
template <typename X>
__global__ void tokens_forward_kernel(X *x, const bf16 *patch_tokens, const bf16 *cls, const bf16 *pos, int patches,
                                      int dim, size_t count) {
    int tokens = patches + 1;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        int d = (int)(i % dim);
        size_t row = i / dim;
        int t = (int)(row % tokens);
        size_t b = row / tokens;
        float value = t == 0 ? bf16_load(cls + d) : bf16_load(patch_tokens + (b * patches + t - 1) * dim + d);
        store_float(x + i, value + bf16_load(pos + (size_t)t * dim + d));
    }
}

template <typename X>
__global__ void tokens_forward_vector_kernel(X *x, const bf16 *patch_tokens, const bf16 *cls, const bf16 *pos,
                                             int patches, int dim, size_t chunk_count) {
    int tokens = patches + 1, dim_chunks = dim / 8;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < chunk_count;
         i += (size_t)gridDim.x * blockDim.x) {
        int d_chunk = (int)(i % dim_chunks);
        size_t row = i / dim_chunks;
        int t = (int)(row % tokens);
        size_t b = row / tokens;
        const uint4 *source = t == 0 ? reinterpret_cast<const uint4 *>(cls) + d_chunk
                                     : reinterpret_cast<const uint4 *>(patch_tokens + (b * patches + t - 1) * dim) +
                                           d_chunk;
        float value[8], position[8];
        bf16x8_unpack(*source, value);
        bf16x8_unpack(reinterpret_cast<const uint4 *>(pos + (size_t)t * dim)[d_chunk], position);
#pragma unroll
        for (int j = 0; j < 8; j++) value[j] += position[j];
        store_float8(x + i * 8, 0, value);
    }
}

template <typename X>
static void tokens_forward(X *x, const bf16 *patch_tokens, const bf16 *cls, const bf16 *pos, int batch, int patches,
                           int dim) {
    size_t count = (size_t)batch * (patches + 1) * dim;
    if (dim % 8 == 0 && is_aligned16(x) && is_aligned16(patch_tokens) && is_aligned16(cls) && is_aligned16(pos))
        tokens_forward_vector_kernel<<<grid_for(count / 8, 256), 256, 0, cuda_ctx.stream>>>(x, patch_tokens, cls, pos,
                                                                                          patches, dim, count / 8);
    else
        tokens_forward_kernel<<<grid_for(count, 256), 256, 0, cuda_ctx.stream>>>(x, patch_tokens, cls, pos, patches,
                                                                               dim, count);
}

extern "C" void cuda_tokens_forward(void *x, tf_dtype x_dtype, const void *patch_tokens, const void *cls,
                                    const void *pos, int batch, int patches, int dim) {
    if (batch <= 0 || dim <= 0) return;
    const bf16 *patch_tokens_ = (const bf16 *)patch_tokens, *cls_ = (const bf16 *)cls, *pos_ = (const bf16 *)pos;
    if (x_dtype == TF_DTYPE_BF16)
        tokens_forward((bf16 *)x, patch_tokens_, cls_, pos_, batch, patches, dim);
    else
        tokens_forward((float *)x, patch_tokens_, cls_, pos_, batch, patches, dim);
    LAUNCH_CHECK("tokens_forward_kernel", "batch %d patches %d dim %d x %s", batch, patches, dim,
                 tf_dtype_name(x_dtype));
}

/* One thread per (token, d): the sum over the batch (coalesced along d). */
__global__ void tokens_position_gradient_kernel(float *dcls, float *dpos, const bf16 *dx, int batch, int tokens,
                                                int dim) {
    size_t count = (size_t)tokens * dim, sample = count;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (int b = 0; b < batch; b++) sum += bf16_load(dx + b * sample + i);
        dpos[i] += sum;
        if (i < (size_t)dim) dcls[i] += sum;
    }
}

extern "C" void cuda_tokens_backward(void *dpatch_tokens, void *dcls, void *dpos, const void *dx, int batch,
                                     int patches, int dim) {
    if (batch <= 0 || dim <= 0) return;
    int tokens = patches + 1;
    size_t row_bytes = (size_t)dim * sizeof(bf16);
    if (patches > 0)
        CUDA_CHECK(cudaMemcpy2DAsync(dpatch_tokens, patches * row_bytes, (const bf16 *)dx + dim, tokens * row_bytes,
                                     patches * row_bytes, batch, cudaMemcpyDeviceToDevice, cuda_ctx.stream),
                   "tokens_backward batch %d patches %d dim %d", batch, patches, dim);
    size_t count = (size_t)tokens * dim;
    tokens_position_gradient_kernel<<<grid_for(count, 256), 256, 0, cuda_ctx.stream>>>(
        (float *)dcls, (float *)dpos, (const bf16 *)dx, batch, tokens, dim);
    LAUNCH_CHECK("tokens_position_gradient_kernel", "batch %d patches %d dim %d", batch, patches, dim);
}
