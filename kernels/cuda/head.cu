/* The head's pooling and the bias gradient of every linear layer.
 *   pool forward:  out[b] = mean of x[b, 1..tokens-1] (TF_POOL_AVG) or x[b, 0] (TF_POOL_CLS),
 *                  fp32 in and out (the residual stream and the head LayerNorm's input)
 *   pool backward: dx[b, t] = dout[b] / (tokens - 1) for t >= 1 and 0 at t = 0 (avg), or
 *                  dout[b] at t = 0 and 0 elsewhere (cls); all of dx is written.
 *   bias backward: dbias (fp32, accumulated) += column sums of dout: blocks of columns x slabs of
 *                  rows, each summed in fp32 and added with one atomic per column per slab. */
#include "kernels/cuda/cuda_common.cuh"

/* One thread per (b, d): the mean over tokens (coalesced along d), summed in fp32 whether the
 * stream X is (training's fp32 or inference's bf16). */
template <typename X>
__global__ void token_pool_forward_kernel(float *out, const X *x, int batch, int tokens, int dim, int cls) {
    size_t count = (size_t)batch * dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        size_t b = i / dim;
        int d = (int)(i % dim);
        const X *sample = x + b * tokens * dim + d;
        if (cls) {
            out[i] = load_float(sample);
            continue;
        }
        float sum = 0.0f;
        for (int t = 1; t < tokens; t++) sum += load_float(sample + (size_t)t * dim);
        out[i] = tokens > 1 ? sum / (tokens - 1) : 0.0f;
    }
}

__global__ void token_pool_backward_kernel(bf16 *dx, const bf16 *dout, int batch, int tokens, int dim, int cls) {
    size_t count = (size_t)batch * tokens * dim;
    float inverse = tokens > 1 ? 1.0f / (tokens - 1) : 0.0f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        int d = (int)(i % dim);
        size_t row = i / dim;
        int t = (int)(row % tokens);
        size_t b = row / tokens;
        float g = bf16_load(dout + b * dim + d);
        float value = cls ? (t == 0 ? g : 0.0f) : (t == 0 ? 0.0f : g * inverse);
        bf16_store(dx + i, value);
    }
}

extern "C" void cuda_token_pool_forward(void *out, const void *x, tf_dtype x_dtype, int batch, int tokens, int dim,
                                        tf_pool pool) {
    if (batch <= 0 || dim <= 0) return;
    size_t count = (size_t)batch * dim;
    unsigned grid = grid_for(count, 256);
    int cls = pool == TF_POOL_CLS;
    if (x_dtype == TF_DTYPE_BF16)
        token_pool_forward_kernel<<<grid, 256, 0, cuda_ctx.stream>>>((float *)out, (const bf16 *)x, batch, tokens,
                                                                     dim, cls);
    else
        token_pool_forward_kernel<<<grid, 256, 0, cuda_ctx.stream>>>((float *)out, (const float *)x, batch, tokens,
                                                                     dim, cls);
    LAUNCH_CHECK("token_pool_forward_kernel", "batch %d tokens %d dim %d pool %d x %s", batch, tokens, dim, (int)pool,
                 tf_dtype_name(x_dtype));
}

extern "C" void cuda_token_pool_backward(void *dx, const void *dout, int batch, int tokens, int dim, tf_pool pool) {
    if (batch <= 0 || dim <= 0 || tokens <= 0) return;
    size_t count = (size_t)batch * tokens * dim;
    token_pool_backward_kernel<<<grid_for(count, 256), 256, 0, cuda_ctx.stream>>>(
        (bf16 *)dx, (const bf16 *)dout, batch, tokens, dim, pool == TF_POOL_CLS);
    LAUNCH_CHECK("token_pool_backward_kernel", "batch %d tokens %d dim %d pool %d", batch, tokens, dim, (int)pool);
}

enum { BIAS_ROWS_PER_SLAB = 256 };

/* blockIdx.x: 256 columns; blockIdx.y: a slab of rows. */
__global__ void bias_backward_kernel(float *dbias, const bf16 *dout, int rows, int dim) {
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= dim) return;
    int first = blockIdx.y * BIAS_ROWS_PER_SLAB, last = min(rows, first + BIAS_ROWS_PER_SLAB);
    float sum = 0.0f;
    for (int r = first; r < last; r++) sum += bf16_load(dout + (size_t)r * dim + d);
    atomicAdd(dbias + d, sum);
}

extern "C" void cuda_bias_backward(void *dbias, const void *dout, int rows, int dim) {
    if (rows <= 0 || dim <= 0) return;
    dim3 grid(ceil_div_u((size_t)dim, 256), ceil_div_u((size_t)rows, BIAS_ROWS_PER_SLAB));
    bias_backward_kernel<<<grid, 256, 0, cuda_ctx.stream>>>((float *)dbias, (const bf16 *)dout, rows, dim);
    LAUNCH_CHECK("bias_backward_kernel", "rows %d dim %d", rows, dim);
}
