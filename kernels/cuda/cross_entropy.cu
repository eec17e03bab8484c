/* Soft-target cross-entropy with its gradient, one block per row, all math in fp32:
 *   lse = log sum_c exp(logit_c),  loss = sum_c target_c (lse - logit_c)
 *   dlogits_c = dloss_scale (exp(logit_c - lse) - target_c)
 * Three passes over the row (max, sum of exponentials, loss and gradient). The logits are fp32
 * (a master buffer), the gradient bf16 (compute). */
#include "kernels/cuda/cuda_common.cuh"

enum { CROSS_ENTROPY_THREADS = 256 };

__global__ __launch_bounds__(CROSS_ENTROPY_THREADS) void cross_entropy_kernel(float *loss, bf16 *dlogits,
                                                                                const float *logits,
                                                                                const float *target, int classes,
                                                                                float dloss_scale) {
    __shared__ float scratch[32];
    size_t row = blockIdx.x;
    const float *l = logits + row * classes;
    const float *t = target + row * classes;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) m = fmaxf(m, l[c]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) sum += expf(l[c] - m);
    float lse = m + logf(block_sum(sum, scratch));
    float partial = 0.0f;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) {
        float logit = l[c], target_c = t[c];
        partial = fmaf(target_c, lse - logit, partial);
        if (dlogits) bf16_store(dlogits + row * classes + c, dloss_scale * (expf(logit - lse) - target_c));
    }
    partial = block_sum(partial, scratch);
    if (threadIdx.x == 0) loss[row] = partial;
}

extern "C" void cuda_cross_entropy_forward_backward(void *loss, void *dlogits, const void *logits, const void *target,
                                                    int batch, int classes, float dloss_scale) {
    if (batch <= 0 || classes <= 0) return;
    cross_entropy_kernel<<<batch, CROSS_ENTROPY_THREADS, 0, cuda_ctx.stream>>>(
        (float *)loss, (bf16 *)dlogits, (const float *)logits, (const float *)target, classes, dloss_scale);
    LAUNCH_CHECK("cross_entropy_kernel", "batch %d classes %d", batch, classes);
}
