/* Three measurements behind docs/performance.md's "Experiments toward 10500 img/s": could the
 * B/16 inference batch (512 images, 100864 token rows, d 768) lose its elementwise passes, or
 * hide them, with cuBLASLt alone? Random bf16 operands (constant ones run GEMMs ~10% faster:
 * less power), each GEMM the fastest of the heuristic's top 8 algorithms.
 *
 *   overlap   a GEMM and a memory-bound pass on two streams at once, with the GEMM restricted
 *             to fewer SMs (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET), against one after the other
 *   qkv       the Q, K and V Pattentions' GEMMs as three, as one strided batch of three, and
 *             (first GEMM) as one GEMM three times as wide; qkv-train: the same at training's
 *             batch of 256 (50432 rows)
 *   residual  the second GEMMs of P_o (K 768) and the FFN (K 3072) writing bf16, against
 *             accumulating into the fp32 residual stream (C = D, beta 1), which would take the
 *             add out of the LayerNorm pass
 *
 * nvcc -O3 -arch=sm_90 gemm_experiments.cu -lcublasLt -lcurand -o gemm_experiments
 * ./gemm_experiments overlap qkv qkv-train residual */
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <curand.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "experiments.cuh"

enum { ROWS = 100864, D = 768 };
static cublasLtHandle_t lt;
static void *workspace;
static const size_t workspace_bytes = 32u << 20;

/* Row-major D_b[m, n] = A_b[m, k] op(B_b) (+ D_b when accumulate, fp32 D), b < batch;
 * B stored [n, k] when b_transposed (key tokens), else [k, n] (value tokens); strides in elements. */
typedef struct {
    int m, n, k, batch, sm_target;
    bool b_transposed, accumulate;
    long long stride_a, stride_b, stride_d;
} gemm_shape;

typedef struct {
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, d; /* cuBLASLt's A is our B (column-major view), its B our A */
    cublasLtMatmulAlgo_t algos[8];
    int algo_count, best;
    float beta;
} gemm_plan;

static void set_batch(cublasLtMatrixLayout_t layout, int batch, long long stride) {
    CK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
    CK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
}

static gemm_plan plan(const gemm_shape &s) {
    gemm_plan p = {};
    CK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = s.b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
    CK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    if (s.sm_target)
        CK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &s.sm_target, sizeof s.sm_target));
    if (s.b_transposed) CK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, s.k, s.n, s.k));
    else CK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, s.n, s.k, s.n));
    CK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, s.k, s.m, s.k));
    CK(cublasLtMatrixLayoutCreate(&p.d, s.accumulate ? CUDA_R_32F : CUDA_R_16BF, s.n, s.m, s.n));
    if (s.batch > 1) {
        set_batch(p.a, s.batch, s.stride_b);
        set_batch(p.b, s.batch, s.stride_a);
        set_batch(p.d, s.batch, s.stride_d);
    }
    p.beta = s.accumulate ? 1.0f : 0.0f;
    cublasLtMatmulPreference_t preference;
    CK(cublasLtMatmulPreferenceCreate(&preference));
    uint64_t bytes = workspace_bytes;
    CK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes, sizeof bytes));
    cublasLtMatmulHeuristicResult_t results[8];
    CK(cublasLtMatmulAlgoGetHeuristic(lt, p.op, p.a, p.b, p.d, p.d, preference, 8, results, &p.algo_count));
    if (p.algo_count == 0) {
        printf("no cuBLASLt algorithm for m %d n %d k %d\n", s.m, s.n, s.k);
        exit(1);
    }
    for (int i = 0; i < p.algo_count; i++) p.algos[i] = results[i].algo;
    return p;
}

static void run(const gemm_plan &p, int algo, const void *A, const void *B, void *Dm, cudaStream_t stream) {
    float one = 1.0f;
    CK(cublasLtMatmul(lt, p.op, &one, B, p.a, A, p.b, &p.beta, Dm, p.d, Dm, p.d, &p.algos[algo], workspace,
                      workspace_bytes, stream));
}

/* Keeps the fastest algorithm of the plan; returns its time. */
static float tune(gemm_plan &p, const void *A, const void *B, void *Dm) {
    float best = 1e30f;
    for (int i = 0; i < p.algo_count; i++) {
        float ms = time_ms([&] { run(p, i, A, B, Dm, 0); });
        if (ms < best) best = ms, p.best = i;
    }
    return best;
}

__global__ void to_bf16(const float *x, __nv_bfloat16 *y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16(x[i]);
}

static void *random_bf16(size_t n, float std, curandGenerator_t generator) {
    float *scratch;
    void *out;
    CK(cudaMalloc(&scratch, n * sizeof(float)));
    CK(cudaMalloc(&out, n * 2));
    CK(curandGenerateNormal(generator, scratch, n + (n & 1), 0.0f, std)); /* curand wants an even count */
    to_bf16<<<1024, 256>>>(scratch, (__nv_bfloat16 *)out, n);
    CK(cudaFree(scratch));
    return out;
}

/* A memory-bound pass like the Pattention norm's: read bf16, GELU, write bf16. */
__global__ void gelu_pass(const uint4 *in, uint4 *out, size_t count) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        uint4 v = in[i];
        __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&v);
        for (int j = 0; j < 4; j++) {
            float2 f = __bfloat1622float2(h[j]);
            f.x = 0.5f * f.x * (1.0f + erff(f.x * 0.70710678f));
            f.y = 0.5f * f.y * (1.0f + erff(f.y * 0.70710678f));
            h[j] = __float22bfloat162_rn(f);
        }
        out[i] = v;
    }
}

/* Half a batch: the FFN's first GEMM (50432 x 3072, K 768) and a pass over its output. */
static void experiment_overlap(curandGenerator_t generator) {
    int rows = ROWS / 2, n = 4 * D, sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    void *y = random_bf16((size_t)rows * D, 1.0f, generator), *keys = random_bf16((size_t)n * D, 0.02f, generator);
    void *scores = random_bf16((size_t)rows * n, 1.0f, generator), *pass_out, *gemm_out;
    CK(cudaMalloc(&pass_out, (size_t)rows * n * 2));
    CK(cudaMalloc(&gemm_out, (size_t)rows * n * 2));
    size_t vectors = (size_t)rows * n / 8;
    int lowest, highest;
    CK(cudaDeviceGetStreamPriorityRange(&lowest, &highest));
    cudaStream_t gemm_stream, pass_stream;
    CK(cudaStreamCreateWithPriority(&gemm_stream, cudaStreamNonBlocking, highest));
    CK(cudaStreamCreateWithPriority(&pass_stream, cudaStreamNonBlocking, lowest));
    auto pass = [&](int grid, cudaStream_t stream) {
        gelu_pass<<<grid, 256, 0, stream>>>((const uint4 *)scores, (uint4 *)pass_out, vectors);
    };
    int full_grid = (int)((vectors + 255) / 256);
    float pass_alone = time_ms([&] { pass(full_grid, 0); });
    printf("overlap: pass alone %.3f ms (%.0f GB/s); GEMM at full width, then the two together per SM target:\n",
           pass_alone, 4.0 * rows * n / pass_alone / 1e6);
    float serial = 0.0f;
    for (int target : {0, 124, 116, 108, 100}) {
        gemm_plan p = plan({rows, n, D, 1, target, true, false, 0, 0, 0});
        float gemm_alone = tune(p, y, keys, gemm_out);
        if (target == 0) serial = gemm_alone + pass_alone;
        for (int grid : {full_grid, 256}) { /* 256 blocks of 256 threads: 32 SMs' worth */
            float together = time_ms([&] {
                cudaEvent_t fork, join;
                CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
                CK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
                CK(cudaEventRecord(fork, 0));
                CK(cudaStreamWaitEvent(gemm_stream, fork));
                CK(cudaStreamWaitEvent(pass_stream, fork));
                run(p, p.best, y, keys, gemm_out, gemm_stream);
                pass(grid, pass_stream);
                CK(cudaEventRecord(join, pass_stream));
                CK(cudaStreamWaitEvent(gemm_stream, join));
                CK(cudaEventRecord(fork, gemm_stream));
                CK(cudaStreamWaitEvent(0, fork));
                CK(cudaEventDestroy(fork));
                CK(cudaEventDestroy(join));
            });
            printf("  SM target %3d: GEMM alone %.3f ms; with the pass (grid %6d) %.3f ms, one after the other at "
                   "full width %.3f ms: %+.0f%%\n",
                   target ? target : sms, gemm_alone, grid, together, serial, 100.0 * (together / serial - 1.0));
        }
    }
}

static void experiment_qkv(curandGenerator_t generator, int rows) {
    long long param_stride = 2LL * D * D; /* q.key, q.value, k.key, k.value, v.key, v.value */
    void *y = random_bf16((size_t)rows * D, 1.0f, generator), *params = random_bf16(6 * (size_t)D * D, 0.02f, generator);
    void *scores = random_bf16(3 * (size_t)rows * D, 1.0f, generator), *outputs;
    CK(cudaMalloc(&outputs, 3 * (size_t)rows * D * 2));
    double flops = 2.0 * rows * D * D;
    gemm_plan one = plan({rows, D, D, 1, 0, true, false, 0, 0, 0});
    gemm_plan batched = plan({rows, D, D, 3, 0, true, false, 0, param_stride, (long long)rows * D});
    gemm_plan wide = plan({rows, 3 * D, D, 1, 0, true, false, 0, 0, 0});
    gemm_plan one_second = plan({rows, D, D, 1, 0, false, false, 0, 0, 0});
    gemm_plan batched_second =
        plan({rows, D, D, 3, 0, false, false, (long long)rows * D, param_stride, (long long)rows * D});
    float t_one = tune(one, y, params, scores), t_batched = tune(batched, y, params, scores);
    float t_wide = tune(wide, y, params, scores);
    float t_one_second = tune(one_second, scores, params, outputs);
    float t_batched_second = tune(batched_second, scores, params, outputs);
    printf("qkv, %d rows: A = Y K^T   three GEMMs %.3f ms (%.0f TFLOP/s) | batched %.3f ms (%.0f) | width 2304 %.3f ms (%.0f)\n",
           rows, 3 * t_one, flops / t_one / 1e9, t_batched, 3 * flops / t_batched / 1e9, t_wide, 3 * flops / t_wide / 1e9);
    printf("qkv, %d rows: out = S V   three GEMMs %.3f ms (%.0f TFLOP/s) | batched %.3f ms (%.0f)\n", rows, 3 * t_one_second,
           flops / t_one_second / 1e9, t_batched_second, 3 * flops / t_batched_second / 1e9);
}

static void experiment_residual(curandGenerator_t generator) {
    void *probs = random_bf16((size_t)ROWS * 4 * D, 1.0f, generator), *values = random_bf16(4 * (size_t)D * D, 0.02f, generator);
    void *out;
    CK(cudaMalloc(&out, (size_t)ROWS * D * 4));
    CK(cudaMemset(out, 0, (size_t)ROWS * D * 4));
    double saved_ms = 465e6 / 2.85e12 * 1e3; /* fp32 read + write less in the LayerNorm pass, at its 2.85 TB/s */
    for (int k : {(int)D, 4 * (int)D}) {
        gemm_plan plain = plan({ROWS, D, k, 1, 0, false, false, 0, 0, 0});
        gemm_plan fused = plan({ROWS, D, k, 1, 0, false, true, 0, 0, 0});
        float t_plain = tune(plain, probs, values, out), t_fused = tune(fused, probs, values, out);
        double flops = 2.0 * ROWS * D * k;
        printf("residual: K %4d  bf16 out %.3f ms (%.0f TFLOP/s) | fp32 residual += %.3f ms (%.0f TFLOP/s): %+.3f ms "
               "in the GEMM against %.3f ms less in the LayerNorm\n",
               k, t_plain, flops / t_plain / 1e9, t_fused, flops / t_fused / 1e9, t_fused - t_plain, saved_ms);
    }
}

int main(int argc, char **argv) {
    CK(cublasLtCreate(&lt));
    CK(cudaMalloc(&workspace, workspace_bytes));
    curandGenerator_t generator;
    CK(curandCreateGenerator(&generator, CURAND_RNG_PSEUDO_DEFAULT));
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "overlap")) experiment_overlap(generator);
        else if (!strcmp(argv[i], "qkv")) experiment_qkv(generator, ROWS);
        else if (!strcmp(argv[i], "qkv-train")) experiment_qkv(generator, ROWS / 2);
        else if (!strcmp(argv[i], "residual")) experiment_residual(generator);
        else printf("unknown experiment %s (overlap, qkv, qkv-train, residual)\n", argv[i]);
    }
    return 0;
}
