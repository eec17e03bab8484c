/* What the experiments share: CK() stops at the first failing CUDA, cuBLASLt or driver call
 * (any of them returns 0 on success), naming the code, file and line; time_ms() times a body
 * of launches with CUDA events on the default stream; fill() writes uniform random bf16;
 * erfc_positive() is a branch-free erfc for the GELU variants; lt_gemm is the cuBLASLt baseline
 * the GEMM experiments measure against. */
#ifndef TF_SCRIPTS_EXPERIMENTS_CUH
#define TF_SCRIPTS_EXPERIMENTS_CUH

#include <cublasLt.h>
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

/* cuBLASLt's row-major C [M, N] = A [M, K] B [N, K]^T in bf16 (fp32 accumulation, the backend's
 * layout for the Pattention's scores GEMM), run with one of the heuristic's top 8 algorithms;
 * tune() times them on the given operands and keeps the fastest (gemm_experiments.cu searches
 * beyond those 8). */
struct lt_gemm {
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algos[8];
    int count = 0, best = 0;
    void *workspace;
    size_t workspace_bytes;
    lt_gemm(int M, int N, int K, size_t workspace_bytes = 32u << 20) : workspace_bytes(workspace_bytes) {
        CK(cublasLtCreate(&lt));
        CK(cudaMalloc(&workspace, workspace_bytes));
        CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &n, sizeof n));
        CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, K, N, K));
        CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, K, M, K));
        CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, N, M, N));
        cublasLtMatmulPreference_t preference;
        CK(cublasLtMatmulPreferenceCreate(&preference));
        uint64_t bytes = workspace_bytes;
        CK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes,
                                                sizeof bytes));
        cublasLtMatmulHeuristicResult_t results[8];
        CK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, preference, 8, results, &count));
        cublasLtMatmulPreferenceDestroy(preference);
        for (int i = 0; i < count; i++) algos[i] = results[i].algo;
    }
    ~lt_gemm() {
        cublasLtMatrixLayoutDestroy(la);
        cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc);
        cublasLtMatmulDescDestroy(op);
        cudaFree(workspace);
        cublasLtDestroy(lt);
    }
    void run(const __nv_bfloat16 *A, const __nv_bfloat16 *B, __nv_bfloat16 *C, int algo) {
        float one = 1.0f, zero = 0.0f;
        CK(cublasLtMatmul(lt, op, &one, B, la, A, lb, &zero, C, lc, C, lc, &algos[algo], workspace, workspace_bytes, 0));
    }
    /* Milliseconds of the fastest algorithm, which becomes `best` and leaves its C. */
    float tune(const __nv_bfloat16 *A, const __nv_bfloat16 *B, __nv_bfloat16 *C) {
        float fastest = 1e30f;
        for (int i = 0; i < count; i++) {
            float ms = time_ms([&] { run(A, B, C, i); });
            if (ms < fastest) fastest = ms, best = i;
        }
        run(A, B, C, best);
        return fastest;
    }
};

#endif
