/* The optimizer's kernels on fp32 master buffers.
 *
 * AdamW (PyTorch's torch.optim.AdamW, see tf_adamw_hyper in kernels.h) is one launch over all
 * parameter groups: each block takes 2048 elements of one group, the group found by a binary
 * search over the groups' first blocks. The group table is copied to the device when a new
 * table is seen (a different pointer, count or content; a host copy is kept to compare), which
 * happens at the first step. The update writes the fp32 master and, rounded to nearest even,
 * the bf16 compute copy. We do not round stochastically: the master copy is fp32, so rounding
 * errors of the bf16 copy do not accumulate from step to step.
 *
 * EMA: ema = decay ema + (1 - decay) master.
 * Sum of squares: each thread accumulates x^2 in double over a grid-stride range, blocks reduce
 * in double and write one partial each; the host adds the partials in a fixed order (the
 * result does not depend on timing). */
#include "kernels/cuda/cuda_common.cuh"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { ADAMW_THREADS = 256, ADAMW_ELEMENTS_PER_BLOCK = 2048 };

typedef struct {
    size_t offset, count;
    float lr_scale, weight_decay;
    unsigned first_block;
} adamw_device_group;

typedef struct {
    float lr, beta1, beta2, eps, grad_scale;
    float bias_correction1, bias_correction2; /* 1 - beta^step */
} adamw_scalars;

__global__ __launch_bounds__(ADAMW_THREADS) void adamw_kernel(float *master, bf16 *compute, const float *grad,
                                                                float *m, float *v,
                                                                const adamw_device_group *groups, int group_count,
                                                                adamw_scalars s) {
    unsigned block = blockIdx.x;
    int low = 0, high = group_count - 1; /* last group whose first block <= block */
    while (low < high) {
        int middle = (low + high + 1) / 2;
        if (groups[middle].first_block <= block)
            low = middle;
        else
            high = middle - 1;
    }
    adamw_device_group group = groups[low];
    float lr = s.lr * group.lr_scale;
    float decay = 1.0f - lr * group.weight_decay;
    float step_size = lr / s.bias_correction1;
    size_t start = (size_t)(block - group.first_block) * ADAMW_ELEMENTS_PER_BLOCK;
    for (int i = threadIdx.x; i < ADAMW_ELEMENTS_PER_BLOCK; i += ADAMW_THREADS) {
        size_t e = start + i;
        if (e >= group.count) break;
        size_t index = group.offset + e;
        float g = grad[index] * s.grad_scale;
        float p = master[index] * decay;
        float m_new = s.beta1 * m[index] + (1.0f - s.beta1) * g;
        float v_new = s.beta2 * v[index] + (1.0f - s.beta2) * g * g;
        p -= step_size * m_new / (sqrtf(v_new / s.bias_correction2) + s.eps);
        m[index] = m_new;
        v[index] = v_new;
        master[index] = p;
        if (compute) compute[index] = __float2bfloat16(p);
    }
}

/* The device copy of the last group table seen. */
static struct {
    const tf_adamw_group *source;
    int count, capacity;
    tf_adamw_group *host_copy;
    adamw_device_group *host_table, *device_table;
    unsigned total_blocks;
} adamw_table;

static bool adamw_table_matches(const tf_adamw_group *groups, int group_count) {
    return adamw_table.source == groups && adamw_table.count == group_count &&
           memcmp(adamw_table.host_copy, groups, (size_t)group_count * sizeof *groups) == 0;
}

static bool adamw_table_upload(const tf_adamw_group *groups, int group_count) {
    if (group_count > adamw_table.capacity) {
        if (adamw_table.device_table) cudaFree(adamw_table.device_table);
        adamw_table.device_table = NULL;
        free(adamw_table.host_copy);
        free(adamw_table.host_table);
        adamw_table.capacity = 0;
        adamw_table.host_copy = (tf_adamw_group *)malloc((size_t)group_count * sizeof *groups);
        adamw_table.host_table = (adamw_device_group *)malloc((size_t)group_count * sizeof(adamw_device_group));
        if (!adamw_table.host_copy || !adamw_table.host_table) {
            cuda_record_failure(__FILE__, __LINE__, "malloc", "out of host memory", "adamw group table of %d groups",
                                group_count);
            return false;
        }
        if (!CUDA_CHECK(cudaMalloc(&adamw_table.device_table, (size_t)group_count * sizeof(adamw_device_group)),
                        "adamw group table of %d groups", group_count))
            return false;
        adamw_table.capacity = group_count;
    }
    unsigned blocks = 0;
    for (int i = 0; i < group_count; i++) {
        adamw_device_group *g = &adamw_table.host_table[i];
        g->offset = groups[i].offset;
        g->count = groups[i].count;
        g->lr_scale = groups[i].lr_scale;
        g->weight_decay = groups[i].weight_decay;
        g->first_block = blocks;
        blocks += (unsigned)((groups[i].count + ADAMW_ELEMENTS_PER_BLOCK - 1) / ADAMW_ELEMENTS_PER_BLOCK);
    }
    /* A synchronous copy: the host table may change before the stream reaches the copy. */
    if (!CUDA_CHECK(cudaMemcpyAsync(adamw_table.device_table, adamw_table.host_table,
                                    (size_t)group_count * sizeof(adamw_device_group), cudaMemcpyHostToDevice,
                                    cuda_ctx.stream),
                    "adamw group table of %d groups", group_count) ||
        !CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream), "adamw group table of %d groups", group_count))
        return false;
    memcpy(adamw_table.host_copy, groups, (size_t)group_count * sizeof *groups);
    adamw_table.source = groups;
    adamw_table.count = group_count;
    adamw_table.total_blocks = blocks;
    return true;
}

extern "C" void cuda_adamw_update(void *master, void *compute, const void *grad, void *m, void *v,
                                  const tf_adamw_group *groups, int group_count, const tf_adamw_hyper *hyper) {
    if (group_count <= 0) return;
    if (!adamw_table_matches(groups, group_count) && !adamw_table_upload(groups, group_count)) return;
    if (adamw_table.total_blocks == 0) return;
    adamw_scalars s;
    s.lr = hyper->lr;
    s.beta1 = hyper->beta1;
    s.beta2 = hyper->beta2;
    s.eps = hyper->eps;
    s.grad_scale = hyper->grad_scale;
    s.bias_correction1 = (float)(1.0 - pow((double)hyper->beta1, (double)hyper->step));
    s.bias_correction2 = (float)(1.0 - pow((double)hyper->beta2, (double)hyper->step));
    adamw_kernel<<<adamw_table.total_blocks, ADAMW_THREADS, 0, cuda_ctx.stream>>>(
        (float *)master, (bf16 *)compute, (const float *)grad, (float *)m, (float *)v, adamw_table.device_table,
        group_count, s);
    LAUNCH_CHECK("adamw_kernel", "%d groups, %u blocks, step %d", group_count, adamw_table.total_blocks, hyper->step);
}

__global__ void ema_kernel(float *ema, const float *master, size_t n, float decay) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        ema[i] = decay * ema[i] + (1.0f - decay) * master[i];
}

__global__ void ema_vector_kernel(float4 *ema, const float4 *master, size_t n4, float decay) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
        float4 e = ema[i], p = master[i];
        e.x = decay * e.x + (1.0f - decay) * p.x;
        e.y = decay * e.y + (1.0f - decay) * p.y;
        e.z = decay * e.z + (1.0f - decay) * p.z;
        e.w = decay * e.w + (1.0f - decay) * p.w;
        ema[i] = e;
    }
}

extern "C" void cuda_ema_update(void *ema, const void *master, size_t n, float decay) {
    if (n == 0) return;
    if (is_aligned16(ema) && is_aligned16(master)) {
        size_t n4 = n / 4, tail = n - n4 * 4;
        if (n4)
            ema_vector_kernel<<<grid_for(n4, 256), 256, 0, cuda_ctx.stream>>>((float4 *)ema, (const float4 *)master,
                                                                               n4, decay);
        if (tail)
            ema_kernel<<<1, 32, 0, cuda_ctx.stream>>>((float *)ema + n4 * 4, (const float *)master + n4 * 4, tail,
                                                      decay);
    } else {
        ema_kernel<<<grid_for(n, 256), 256, 0, cuda_ctx.stream>>>((float *)ema, (const float *)master, n, decay);
    }
    LAUNCH_CHECK("ema_kernel", "n %zu decay %g", n, (double)decay);
}

enum { SUM_SQUARES_THREADS = 256 };

__global__ __launch_bounds__(SUM_SQUARES_THREADS) void sum_squares_kernel(double *partials, const float *x,
                                                                            size_t n) {
    __shared__ double scratch[SUM_SQUARES_THREADS / 32];
    double sum = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        double value = x[i];
        sum += value * value;
    }
    sum = warp_sum_double(sum);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < SUM_SQUARES_THREADS / 32; w++) total += scratch[w];
        partials[blockIdx.x] = total;
    }
}

extern "C" double cuda_sum_squares(const void *x, size_t n) {
    if (n == 0) return 0.0;
    size_t needed = (n + SUM_SQUARES_THREADS - 1) / SUM_SQUARES_THREADS;
    int blocks = needed < (size_t)cuda_ctx.reduce_partials_count ? (int)needed : cuda_ctx.reduce_partials_count;
    sum_squares_kernel<<<blocks, SUM_SQUARES_THREADS, 0, cuda_ctx.stream>>>(cuda_ctx.reduce_partials,
                                                                            (const float *)x, n);
    if (!LAUNCH_CHECK("sum_squares_kernel", "n %zu", n)) return NAN;
    if (!CUDA_CHECK(cudaMemcpyAsync(cuda_ctx.reduce_partials_host, cuda_ctx.reduce_partials, blocks * sizeof(double),
                                    cudaMemcpyDeviceToHost, cuda_ctx.stream),
                    "sum_squares n %zu", n) ||
        !CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream), "sum_squares n %zu", n))
        return NAN;
    double total = 0.0;
    for (int b = 0; b < blocks; b++) total += cuda_ctx.reduce_partials_host[b];
    return total;
}
