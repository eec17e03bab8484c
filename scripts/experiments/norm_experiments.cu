/* Is the Pattention norm pass (kernels/cuda/pattention_norm.cu) bound by memory or by the
 * arithmetic of its exact GELU? The same row kernels, forward and backward, with three GELUs:
 *
 *   erff      what the backend did until row 26 of docs/performance.md: Phi(z) = (1 + erff(z / sqrt 2)) / 2
 *   none      Phi(z) = z (not a GELU: the memory-bound floor of the same pass)
 *   erfc      Phi from erfc(|z| / sqrt 2) = t exp(-y^2 + P(t)), t = 1 / (1 + y / 2) (Numerical
 *             Recipes' erfcc, relative error < 1.2e-7 for every y >= 0), one reciprocal and one
 *             exp, no branch
 *
 * at B/16 inference's shapes (100864 rows, n 768 and 3072), with each variant's accuracy
 * against double-precision erfc over z in [-12, 12]. And the same question for the pass that
 * averages S over each image's patch rows instead of writing it (pool, 512 images x 197 x 3072),
 * which only reads A.
 *
 * nvcc -O3 -arch=sm_90 -I../.. norm_experiments.cu -o norm_experiments && ./norm_experiments
 * (the row helpers are the backend's, from kernels/cuda/cuda_common.cuh) */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>

#include "experiments.cuh"
#include "kernels/cuda/cuda_common.cuh"

enum { ERFF = 0, NONE = 1, ERFC = 2 };

template <int VARIANT>
__device__ __forceinline__ float cdf(float z) {
    if (VARIANT == ERFF) return 0.5f * (1.0f + erff(z * 0.70710678118654752f)); /* the backend's until row 26 */
    if (VARIANT == NONE) return z;
    float half_tail = 0.5f * erfc_positive(fabsf(z) * 0.70710678118654752f);
    return z < 0.0f ? half_tail : 1.0f - half_tail;
}

__device__ __forceinline__ float gelu_erf_from_cdf(float z, float cdf) {
    return z * cdf;
}
__device__ __forceinline__ float gelu_erf_derivative_from_cdf(float z, float cdf) {
    return cdf + z * (0.39894228040143268f * __expf(-0.5f * z * z));
}

template <int CHUNKS, int WARPS, int VARIANT>
__global__ __launch_bounds__(256) void forward(__nv_bfloat16 *s, float *row_norm, const __nv_bfloat16 *a, int rows,
                                               int n, float tau) {
    __shared__ float scratch[8];
    int row = blockIdx.x * (8 / WARPS) + (threadIdx.x >> 5) / WARPS, t = threadIdx.x % (32 * WARPS);
    bool active = row < rows;
    uint4 raw[CHUNKS];
    float sum = row_sum<WARPS>(load_row_chunks<CHUNKS, WARPS>(raw, a + (size_t)row * n, n, t, active), scratch);
    if (!active) return;
    float r = sqrtf(sum + 1e-6f), scale = tau / r;
    if (t == 0) row_norm[row] = r;
    uint4 *s_row = reinterpret_cast<uint4 *>(s + (size_t)row * n);
    for (int c = 0; c < CHUNKS; c++) {
        float x[8];
        bf16x8_unpack(raw[c], x);
        for (int i = 0; i < 8; i++) {
            float z = x[i] * scale;
            x[i] = gelu_erf_from_cdf(z, cdf<VARIANT>(z));
        }
        s_row[c * 32 * WARPS + t] = bf16x8_pack(x);
    }
}

template <int CHUNKS, int WARPS, int VARIANT>
__global__ __launch_bounds__(256) void backward(__nv_bfloat16 *da, __nv_bfloat16 *s, const __nv_bfloat16 *ds,
                                                const __nv_bfloat16 *a, const float *row_norm, int rows, int n,
                                                float tau) {
    __shared__ float scratch[8];
    int row = blockIdx.x * (8 / WARPS) + (threadIdx.x >> 5) / WARPS, t = threadIdx.x % (32 * WARPS);
    bool active = row < rows;
    const uint4 *a_row = reinterpret_cast<const uint4 *>(a + (size_t)row * n);
    const uint4 *ds_row = reinterpret_cast<const uint4 *>(ds + (size_t)row * n);
    uint4 raw_a[CHUNKS], raw_ds[CHUNKS], raw_s[CHUNKS];
    for (int c = 0; c < CHUNKS; c++) {
        raw_a[c] = active ? a_row[c * 32 * WARPS + t] : make_uint4(0, 0, 0, 0);
        raw_ds[c] = active ? ds_row[c * 32 * WARPS + t] : make_uint4(0, 0, 0, 0);
    }
    float r = active ? row_norm[row] : 1.0f, scale = tau / r;
    float dz[CHUNKS * 8], dot = 0.0f;
    for (int c = 0; c < CHUNKS; c++) {
        float x[8], g[8], again[8];
        bf16x8_unpack(raw_a[c], x);
        bf16x8_unpack(raw_ds[c], g);
        for (int i = 0; i < 8; i++) {
            float z = x[i] * scale, p = cdf<VARIANT>(z);
            dz[c * 8 + i] = g[i] * gelu_erf_derivative_from_cdf(z, p);
            again[i] = gelu_erf_from_cdf(z, p);
            dot = fmaf(x[i], dz[c * 8 + i], dot);
        }
        raw_s[c] = bf16x8_pack(again);
    }
    dot = row_sum<WARPS>(dot, scratch);
    if (!active) return;
    float coefficient = dot / (r * r);
    uint4 *da_row = reinterpret_cast<uint4 *>(da + (size_t)row * n);
    uint4 *s_row = reinterpret_cast<uint4 *>(s + (size_t)row * n);
    for (int c = 0; c < CHUNKS; c++) {
        float x[8], out[8];
        bf16x8_unpack(raw_a[c], x);
        for (int i = 0; i < 8; i++) out[i] = scale * (dz[c * 8 + i] - x[i] * coefficient);
        da_row[c * 32 * WARPS + t] = bf16x8_pack(out);
        s_row[c * 32 * WARPS + t] = raw_s[c];
    }
}

/* The mean of S over each image's patch rows (pattention_norm_pool, the last FFN of inference),
 * with the three GELUs. One block per image with PREFETCH false and SPLIT 1 is the backend's
 * form (sums in registers). PREFETCH true keeps the sums in shared memory so that the next row's
 * loads fit in the registers and are in flight while the current row is summed. SPLIT > 1 gives
 * each image SPLIT blocks, each a share of its rows, added into fp32 with atomics (not
 * deterministic: only to see what more blocks an SM would give). */
template <int VARIANT, bool PREFETCH, int SPLIT>
__global__ __launch_bounds__(256, 4) void pool(void *pooled, const __nv_bfloat16 *a, int tokens, int n, float tau) {
    constexpr int CHUNKS = 3, WARPS = 4, GROUPS = 8 / WARPS, VALUES = CHUNKS * 8, STRIDE = GROUPS * SPLIT;
    __shared__ float scratch[8];
    __shared__ float sums[VALUES * 256];
    int group = (threadIdx.x >> 5) / WARPS, t = threadIdx.x % (32 * WARPS);
    int image = blockIdx.x / SPLIT, first = 1 + blockIdx.x % SPLIT * GROUPS + group;
    size_t first_row = (size_t)image * tokens;
    float own[PREFETCH ? 1 : VALUES];
    for (int i = 0; i < VALUES; i++) {
        if (PREFETCH) sums[i * 256 + threadIdx.x] = 0.0f;
        else own[i] = 0.0f;
    }
    /* With PREFETCH, the next row's chunks and their squares are loaded a round ahead. */
    uint4 next[CHUNKS];
    auto load = [&](int token) {
        return load_row_chunks<CHUNKS, WARPS>(next, a + (first_row + token) * n, n, t, token < tokens);
    };
    float next_sum = PREFETCH ? load(first) : 0.0f;
    /* The groups of a block run the same rounds: row_sum holds barriers. */
    for (int token = first; token - group < tokens; token += STRIDE) {
        if (!PREFETCH) next_sum = load(token);
        uint4 raw[CHUNKS];
        for (int c = 0; c < CHUNKS; c++) raw[c] = next[c];
        float sum = next_sum;
        if (PREFETCH) next_sum = load(token + STRIDE);
        sum = row_sum<WARPS>(sum, scratch);
        if (token >= tokens) continue;
        float scale = tau / sqrtf(sum + 1e-6f);
        for (int c = 0; c < CHUNKS; c++) {
            float x[8];
            bf16x8_unpack(raw[c], x);
            for (int i = 0; i < 8; i++) {
                float z = x[i] * scale, g = gelu_erf_from_cdf(z, cdf<VARIANT>(z));
                if (PREFETCH) sums[(c * 8 + i) * 256 + threadIdx.x] += g;
                else own[c * 8 + i] += g;
            }
        }
    }
    if (!PREFETCH)
        for (int i = 0; i < VALUES; i++) sums[i * 256 + threadIdx.x] = own[i];
    if (SPLIT > 1) {
        float *out = (float *)pooled + (size_t)image * n;
        for (int c = 0; c < CHUNKS; c++)
            for (int i = 0; i < 8; i++)
                atomicAdd(out + (c * 32 * WARPS + t) * 8 + i, sums[(c * 8 + i) * 256 + threadIdx.x]);
        return;
    }
    __syncthreads();
    if (group != 0) return;
    uint4 *out = reinterpret_cast<uint4 *>((__nv_bfloat16 *)pooled + (size_t)image * n);
    for (int c = 0; c < CHUNKS; c++) {
        float x[8];
        for (int i = 0; i < 8; i++) {
            float total = 0.0f;
            for (int g = 0; g < GROUPS; g++) total += sums[(c * 8 + i) * 256 + g * 32 * WARPS + t];
            x[i] = total / (tokens - 1);
        }
        out[c * 32 * WARPS + t] = bf16x8_pack(x);
    }
}

template <int VARIANT, bool PREFETCH, int SPLIT = 1>
static void time_pool(const char *name, int batch, __nv_bfloat16 *a, void *pooled) {
    int tokens = 197, n = 3072;
    float ms = time_ms(
        [&] { pool<VARIANT, PREFETCH, SPLIT><<<batch * SPLIT, 256>>>(pooled, a, tokens, n, sqrtf(3072.0f)); }, 10, 2);
    CK(cudaGetLastError());
    char form[64];
    if (SPLIT > 1) snprintf(form, sizeof form, "(split %d, atomics)", SPLIT);
    else snprintf(form, sizeof form, "%s", PREFETCH ? "(prefetch, sums in smem)" : "(sums in registers)");
    printf("pool %-5s %-26s batch %d n %d: %.3f ms (%.0f GB/s)\n", name, form, batch, n, ms,
           2.0 * batch * tokens * n / ms / 1e6);
}

/* Worst error of GELU(z) and GELU'(z) against double precision, z in [-12, 12], relative where
 * the true value is at least 1e-3 in size and absolute below (where bf16 keeps nothing more:
 * 1 + erff(x) cancels to 0 for z below -5.5, and GELU' crosses zero at z = -0.75). */
template <int VARIANT>
__global__ void accuracy(float *worst, int points) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= points) return;
    float z = -12.0f + 24.0f * i / (points - 1);
    double zd = z, phi_d = 0.5 * erfc(-zd / 1.4142135623730951);
    double g_d = zd * phi_d, dg_d = phi_d + zd * 0.3989422804014327 * exp(-0.5 * zd * zd);
    float p = cdf<VARIANT>(z);
    float g = z * p, dg = p + z * (0.39894228040143268f * __expf(-0.5f * z * z));
    atomicMax((int *)&worst[0], __float_as_int((float)(fabs(g - g_d) / fmax(fabs(g_d), 1e-3))));
    atomicMax((int *)&worst[1], __float_as_int((float)(fabs(dg - dg_d) / fmax(fabs(dg_d), 1e-3))));
}

template <int CHUNKS, int WARPS, int VARIANT>
static void time_variant(const char *name, int rows, int n, __nv_bfloat16 *a, __nv_bfloat16 *s, __nv_bfloat16 *ds,
                         __nv_bfloat16 *da, float *row_norm) {
    unsigned grid = (rows + 8 / WARPS - 1) / (8 / WARPS);
    float tau = sqrtf((float)n);
    cudaEvent_t start, stop;
    CK(cudaEventCreate(&start));
    CK(cudaEventCreate(&stop));
    float best_forward = 1e9f, best_backward = 1e9f;
    for (int rep = 0; rep < 12; rep++) {
        float ms;
        CK(cudaEventRecord(start));
        forward<CHUNKS, WARPS, VARIANT><<<grid, 256>>>(s, row_norm, a, rows, n, tau);
        CK(cudaEventRecord(stop));
        CK(cudaEventSynchronize(stop));
        CK(cudaEventElapsedTime(&ms, start, stop));
        if (rep >= 2 && ms < best_forward) best_forward = ms;
        CK(cudaEventRecord(start));
        backward<CHUNKS, WARPS, VARIANT><<<grid, 256>>>(da, s, ds, a, row_norm, rows, n, tau);
        CK(cudaEventRecord(stop));
        CK(cudaEventSynchronize(stop));
        CK(cudaEventElapsedTime(&ms, start, stop));
        if (rep >= 2 && ms < best_backward) best_backward = ms;
    }
    CK(cudaGetLastError());
    double elements = (double)rows * n;
    float *worst;
    CK(cudaMallocManaged(&worst, 2 * sizeof(float)));
    worst[0] = worst[1] = 0.0f;
    int points = 1 << 22;
    accuracy<VARIANT><<<points / 256, 256>>>(worst, points);
    CK(cudaDeviceSynchronize());
    printf("%-5s rows %6d n %4d  forward %.3f ms (%.0f GB/s)  backward %.3f ms (%.0f GB/s)  worst err GELU %.2e "
           "GELU' %.2e\n",
           name, rows, n, best_forward, 4 * elements / best_forward / 1e6, best_backward,
           8 * elements / best_backward / 1e6, worst[0], worst[1]);
    CK(cudaFree(worst));
}

int main(void) {
    int rows = 100864;
    size_t elements = (size_t)rows * 3072;
    __nv_bfloat16 *a, *s, *ds, *da;
    float *row_norm;
    CK(cudaMalloc(&a, elements * 2));
    CK(cudaMalloc(&s, elements * 2));
    CK(cudaMalloc(&ds, elements * 2));
    CK(cudaMalloc(&da, elements * 2));
    CK(cudaMalloc(&row_norm, rows * sizeof(float)));
    fill<<<1024, 256>>>(a, elements, 1, 3.0f);
    fill<<<1024, 256>>>(ds, elements, 2, 3.0f);
    CK(cudaDeviceSynchronize());
    for (int round = 0; round < 2; round++) {
        time_pool<ERFF, true>("erff", 512, a, s);
        time_pool<NONE, true>("none", 512, a, s);
        time_pool<ERFC, true>("erfc", 512, a, s);
        time_pool<ERFF, false>("erff", 512, a, s);
        time_pool<NONE, false>("none", 512, a, s);
        time_pool<ERFF, false, 4>("erff", 512, a, da);
        time_pool<ERFF, false, 8>("erff", 512, a, da);
        time_pool<NONE, false, 8>("none", 512, a, da);
        time_pool<ERFC, false, 8>("erfc", 512, a, da);
    }
    time_variant<3, 4, ERFF>("erff", rows, 3072, a, s, ds, da, row_norm);
    time_variant<3, 4, NONE>("none", rows, 3072, a, s, ds, da, row_norm);
    time_variant<3, 4, ERFC>("erfc", rows, 3072, a, s, ds, da, row_norm);
    time_variant<3, 1, ERFF>("erff", rows, 768, a, s, ds, da, row_norm);
    time_variant<3, 1, NONE>("none", rows, 768, a, s, ds, da, row_norm);
    time_variant<3, 1, ERFC>("erfc", rows, 768, a, s, ds, da, row_norm);
    return 0;
}
