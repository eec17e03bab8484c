/* The residual connection with drop path:
 *   forward:  out = residual_in + scale[row / rows_per_sample] branch   (scale NULL: 1)
 *   backward: dbranch = scale[row / rows_per_sample] dout
 * (the residual's own gradient passes through unchanged). Element-wise in fp32 with 16-byte
 * accesses when the width is a multiple of 8 and the buffers are aligned; out may be
 * residual_in, dbranch may be dout. */
#include "kernels/cuda/cuda_common.cuh"

/* out = base + scale[row] * branch, or (base NULL) out = scale[row] * branch. */
__global__ void scaled_add_vector_kernel(bf16 *out, const bf16 *base, const bf16 *branch, const float *sample_scale,
                                         int dim, int rows_per_sample, size_t chunk_count) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < chunk_count;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i * 8 / (size_t)dim;
        float scale = sample_scale ? sample_scale[row / (size_t)rows_per_sample] : 1.0f;
        float b[8], x[8];
        bf16x8_unpack(reinterpret_cast<const uint4 *>(branch)[i], b);
        if (base)
            bf16x8_unpack(reinterpret_cast<const uint4 *>(base)[i], x);
        else
#pragma unroll
            for (int j = 0; j < 8; j++) x[j] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) x[j] = fmaf(scale, b[j], x[j]);
        reinterpret_cast<uint4 *>(out)[i] = bf16x8_pack(x);
    }
}

__global__ void scaled_add_plain_kernel(bf16 *out, const bf16 *base, const bf16 *branch, const float *sample_scale,
                                        int dim, int rows_per_sample, size_t count) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / (size_t)dim;
        float scale = sample_scale ? sample_scale[row / (size_t)rows_per_sample] : 1.0f;
        float x = base ? bf16_load(base + i) : 0.0f;
        bf16_store(out + i, fmaf(scale, bf16_load(branch + i), x));
    }
}

static void scaled_add(const char *what, bf16 *out, const bf16 *base, const bf16 *branch, const float *sample_scale,
                       int rows, int dim, int rows_per_sample) {
    if (rows <= 0 || dim <= 0) return;
    if (rows_per_sample <= 0) rows_per_sample = 1;
    size_t count = (size_t)rows * dim;
    bool vector = dim % 8 == 0 && is_aligned16(out) && is_aligned16(branch) && (!base || is_aligned16(base));
    if (vector) {
        scaled_add_vector_kernel<<<grid_for(count / 8, 256), 256, 0, cuda_ctx.stream>>>(
            out, base, branch, sample_scale, dim, rows_per_sample, count / 8);
    } else {
        scaled_add_plain_kernel<<<grid_for(count, 256), 256, 0, cuda_ctx.stream>>>(out, base, branch, sample_scale,
                                                                                     dim, rows_per_sample, count);
    }
    LAUNCH_CHECK(what, "rows %d dim %d rows_per_sample %d scaled %d", rows, dim, rows_per_sample,
                 (int)(sample_scale != NULL));
}

extern "C" void cuda_residual_forward(void *out, const void *residual_in, const void *branch, const void *sample_scale,
                                      int rows, int dim, int rows_per_sample) {
    scaled_add("residual_forward", (bf16 *)out, (const bf16 *)residual_in, (const bf16 *)branch,
               (const float *)sample_scale, rows, dim, rows_per_sample);
}

extern "C" void cuda_residual_backward(void *dbranch, const void *dout, const void *sample_scale, int rows, int dim,
                                       int rows_per_sample) {
    if (rows <= 0 || dim <= 0) return;
    if (!sample_scale) {
        cuda_copy(dbranch, dout, (size_t)rows * dim * sizeof(bf16));
        return;
    }
    scaled_add("residual_backward", (bf16 *)dbranch, NULL, (const bf16 *)dout, (const float *)sample_scale, rows, dim,
               rows_per_sample);
}
