/* The residual connection with drop path:
 *   forward:  out = residual_in + scale[row / rows_per_sample] branch   (scale NULL: 1)
 *   backward: dbranch = scale[row / rows_per_sample] dout
 * (the residual's own gradient passes through unchanged). Forward adds a bf16 branch to the
 * fp32 residual stream (kernels.h says why fp32); backward is bf16 to bf16. Element-wise with
 * vector accesses when the width is a multiple of 8 and the buffers are 16-byte aligned; out may
 * be residual_in, dbranch may be dout. */
#include "kernels/cuda/cuda_common.cuh"

__device__ __forceinline__ float scale_of_row(const float *sample_scale, size_t row, int rows_per_sample) {
    return sample_scale ? sample_scale[row / (size_t)rows_per_sample] : 1.0f;
}

/* Chunk i: elements 8i .. 8i + 7, all in one row since dim is a multiple of 8. */
__global__ void residual_forward_vector_kernel(float *out, const float *residual_in, const bf16 *branch,
                                               const float *sample_scale, int dim, int rows_per_sample,
                                               size_t chunk_count) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < chunk_count;
         i += (size_t)gridDim.x * blockDim.x) {
        float scale = scale_of_row(sample_scale, i * 8 / (size_t)dim, rows_per_sample);
        float b[8], x[8];
        bf16x8_unpack(reinterpret_cast<const uint4 *>(branch)[i], b);
        f32x8_load(residual_in + i * 8, 0, x);
#pragma unroll
        for (int j = 0; j < 8; j++) x[j] = fmaf(scale, b[j], x[j]);
        f32x8_store(out + i * 8, 0, x);
    }
}

__global__ void residual_forward_plain_kernel(float *out, const float *residual_in, const bf16 *branch,
                                              const float *sample_scale, int dim, int rows_per_sample,
                                              size_t count) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
        out[i] = fmaf(scale_of_row(sample_scale, i / (size_t)dim, rows_per_sample), bf16_load(branch + i),
                      residual_in[i]);
}

__global__ void residual_backward_vector_kernel(bf16 *dbranch, const bf16 *dout, const float *sample_scale, int dim,
                                                int rows_per_sample, size_t chunk_count) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < chunk_count;
         i += (size_t)gridDim.x * blockDim.x) {
        float scale = scale_of_row(sample_scale, i * 8 / (size_t)dim, rows_per_sample);
        float g[8];
        bf16x8_unpack(reinterpret_cast<const uint4 *>(dout)[i], g);
#pragma unroll
        for (int j = 0; j < 8; j++) g[j] *= scale;
        reinterpret_cast<uint4 *>(dbranch)[i] = bf16x8_pack(g);
    }
}

__global__ void residual_backward_plain_kernel(bf16 *dbranch, const bf16 *dout, const float *sample_scale, int dim,
                                               int rows_per_sample, size_t count) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
        bf16_store(dbranch + i, scale_of_row(sample_scale, i / (size_t)dim, rows_per_sample) * bf16_load(dout + i));
}

#define RESIDUAL_SHAPE "rows %d dim %d rows_per_sample %d scaled %d", rows, dim, rows_per_sample, \
                       (int)(sample_scale != NULL)

extern "C" void cuda_residual_forward(void *out, const void *residual_in, const void *branch, const void *sample_scale,
                                      int rows, int dim, int rows_per_sample) {
    if (rows <= 0 || dim <= 0) return;
    if (rows_per_sample <= 0) rows_per_sample = 1;
    size_t count = (size_t)rows * dim;
    float *out_ = (float *)out;
    const float *in_ = (const float *)residual_in, *scale_ = (const float *)sample_scale;
    const bf16 *branch_ = (const bf16 *)branch;
    if (dim % 8 == 0 && is_aligned16(out) && is_aligned16(residual_in) && is_aligned16(branch))
        residual_forward_vector_kernel<<<grid_for(count / 8, 256), 256, 0, cuda_ctx.stream>>>(
            out_, in_, branch_, scale_, dim, rows_per_sample, count / 8);
    else
        residual_forward_plain_kernel<<<grid_for(count, 256), 256, 0, cuda_ctx.stream>>>(
            out_, in_, branch_, scale_, dim, rows_per_sample, count);
    LAUNCH_CHECK("residual_forward", RESIDUAL_SHAPE);
}

extern "C" void cuda_residual_backward(void *dbranch, const void *dout, const void *sample_scale, int rows, int dim,
                                       int rows_per_sample) {
    if (rows <= 0 || dim <= 0) return;
    size_t count = (size_t)rows * dim;
    if (!sample_scale) {
        cuda_copy(dbranch, dout, count * sizeof(bf16));
        return;
    }
    if (rows_per_sample <= 0) rows_per_sample = 1;
    bf16 *dbranch_ = (bf16 *)dbranch;
    const bf16 *dout_ = (const bf16 *)dout;
    const float *scale_ = (const float *)sample_scale;
    if (dim % 8 == 0 && is_aligned16(dbranch) && is_aligned16(dout))
        residual_backward_vector_kernel<<<grid_for(count / 8, 256), 256, 0, cuda_ctx.stream>>>(
            dbranch_, dout_, scale_, dim, rows_per_sample, count / 8);
    else
        residual_backward_plain_kernel<<<grid_for(count, 256), 256, 0, cuda_ctx.stream>>>(
            dbranch_, dout_, scale_, dim, rows_per_sample, count);
    LAUNCH_CHECK("residual_backward", RESIDUAL_SHAPE);
}
