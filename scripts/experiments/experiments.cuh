/* What the experiments share: CK() stops at the first failing CUDA, cuBLASLt or driver call
 * (any of them returns 0 on success), naming the code, file and line; time_ms() times a body
 * of launches with CUDA events on the default stream; fill() writes uniform random bf16;
 * erfc_positive() is a branch-free erfc for the GELU variants. */
#ifndef TF_SCRIPTS_EXPERIMENTS_CUH
#define TF_SCRIPTS_EXPERIMENTS_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                                                      \
    do {                                                                                                           \
        int e_ = (int)(x);                                                                                         \
        if (e_ != 0) {                                                                                             \
            printf("error %d at %s:%d\n", e_, __FILE__, __LINE__);                                                 \
            exit(1);                                                                                               \
        }                                                                                                          \
    } while (0)

/* Milliseconds per call of `body`, averaged over `reps` calls after `warmup` untimed ones. */
template <typename F> static float time_ms(F body, int reps = 10, int warmup = 2) {
    static cudaEvent_t start, stop;
    if (!start) {
        CK(cudaEventCreate(&start));
        CK(cudaEventCreate(&stop));
    }
    for (int r = 0; r < warmup; r++) body();
    CK(cudaEventRecord(start));
    for (int r = 0; r < reps; r++) body();
    CK(cudaEventRecord(stop));
    CK(cudaEventSynchronize(stop));
    float ms;
    CK(cudaEventElapsedTime(&ms, start, stop));
    return ms / reps;
}

/* x[i] uniform on [-scale / 2, scale / 2), from a hash of i and seed (no generator state). */
__global__ void fill(__nv_bfloat16 *x, size_t count, uint32_t seed, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed * 0x9E3779B9u;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        h *= 3266489917u;
        h ^= h >> 16;
        x[i] = __float2bfloat16(((h & 0xffffff) / 16777216.0f - 0.5f) * scale);
    }
}

/* erfc(y) for y >= 0 as t exp(-y^2 + P(t)), t = 1 / (1 + y / 2) (Numerical Recipes' erfcc,
 * relative error < 1.2e-7): one reciprocal and one exp, no branch. */
__device__ __forceinline__ float erfc_positive(float y) {
    float t = __fdividef(1.0f, fmaf(0.5f, y, 1.0f));
    float p = fmaf(t, 0.17087277f, -0.82215223f);
    p = fmaf(t, p, 1.48851587f);
    p = fmaf(t, p, -1.13520398f);
    p = fmaf(t, p, 0.27886807f);
    p = fmaf(t, p, -0.18628806f);
    p = fmaf(t, p, 0.09678418f);
    p = fmaf(t, p, 0.37409196f);
    p = fmaf(t, p, 1.00002368f);
    p = fmaf(t, p, -1.26551223f);
    return t * __expf(fmaf(-y, y, p));
}

#endif
