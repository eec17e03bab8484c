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
 *   loaded    does the algorithm that wins a short burst on a cool card (how the backend picks,
 *             kernels/cuda/matmul.cu) also win on a card held at its power limit? Each of the
 *             heuristic's top 16 algorithms for the inference form's GEMM shapes, timed both ways:
 *             3 runs after 1 untimed, and inside a loop that alternates the GEMM with a
 *             norm-like memory pass (the model's duty cycle), 150 times before and 150 while timing
 *   search    beyond the heuristic's 8: every configuration cuBLASLt accepts for these shapes
 *             (each algorithm id's tiles and stage counts from its capabilities, cluster shapes
 *             auto/1x1/2x1/1x2/2x2/4x1/1x4, CTA swizzling on and off, no split-K), a quick timing
 *             of each, then the 12 fastest and the heuristic's pick re-timed in alternating rounds;
 *             search-train: the same for training's shapes at batch 256, parameter gradients included
 *
 * nvcc -O3 -arch=sm_90 gemm_experiments.cu -lcublasLt -lcurand -o gemm_experiments
 * ./gemm_experiments overlap qkv qkv-train residual loaded search search-train */
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <curand.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <chrono>
#include <random>
#include <utility>
#include <vector>

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
    bool add_bf16;    /* D = A op(B) + D with D bf16 (the inference form's stream), not fp32 */
    bool transpose_a; /* A stored [k, m] (parameter gradients: S^T dOut, dA^T X) */
} gemm_shape;

enum { MAX_ALGOS = 16 };

typedef struct {
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, d; /* cuBLASLt's A is our B (column-major view), its B our A */
    cublasLtMatmulAlgo_t algos[MAX_ALGOS];
    int algo_count, best;
    float beta;
} gemm_plan;

static void set_batch(cublasLtMatrixLayout_t layout, int batch, long long stride) {
    CK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
    CK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
}

static gemm_plan plan(const gemm_shape &s, int requested = 8) {
    gemm_plan p = {};
    CK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = s.b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, tb = s.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    CK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    if (s.sm_target)
        CK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &s.sm_target, sizeof s.sm_target));
    if (s.b_transposed) CK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, s.k, s.n, s.k));
    else CK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, s.n, s.k, s.n));
    if (s.transpose_a) CK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, s.m, s.k, s.m));
    else CK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, s.k, s.m, s.k));
    CK(cublasLtMatrixLayoutCreate(&p.d, s.accumulate && !s.add_bf16 ? CUDA_R_32F : CUDA_R_16BF, s.n, s.m, s.n));
    if (s.batch > 1) {
        set_batch(p.a, s.batch, s.stride_b);
        set_batch(p.b, s.batch, s.stride_a);
        set_batch(p.d, s.batch, s.stride_d);
    }
    p.beta = s.accumulate || s.add_bf16 ? 1.0f : 0.0f;
    cublasLtMatmulPreference_t preference;
    CK(cublasLtMatmulPreferenceCreate(&preference));
    uint64_t bytes = workspace_bytes;
    CK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes, sizeof bytes));
    cublasLtMatmulHeuristicResult_t results[MAX_ALGOS];
    if (requested > MAX_ALGOS) requested = MAX_ALGOS;
    CK(cublasLtMatmulAlgoGetHeuristic(lt, p.op, p.a, p.b, p.d, p.d, preference, requested, results, &p.algo_count));
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

static int algo_config(const cublasLtMatmulAlgo_t &algo, cublasLtMatmulAlgoConfigAttributes_t attribute) {
    int value = 0;
    size_t written = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&algo, attribute, &value, sizeof value, &written);
    return value;
}

/* An algorithm's configuration in one line (the cluster shape is a 16-bit attribute). */
static void describe(const cublasLtMatmulAlgo_t &algo, char *out, size_t size) {
    uint16_t cluster = 0;
    size_t written;
    cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof cluster, &written);
    snprintf(out, size, "id %3d tile %3d stages %3d cluster %2d swizzle %d custom %d", algo_config(algo, CUBLASLT_ALGO_CONFIG_ID),
             algo_config(algo, CUBLASLT_ALGO_CONFIG_TILE_ID), algo_config(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID), cluster,
             algo_config(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING), algo_config(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION));
}

/* GEMMs in a loop with a memory pass after each, as in the model; returns the GEMMs' mean time
 * over the last `timed` of `total` iterations (events around each GEMM). */
static float loaded_ms(const gemm_plan &p, int algo, const void *A, const void *B, void *Dm, const void *pass_in,
                       void *pass_out, size_t pass_vectors, int total, int timed) {
    static cudaEvent_t marks[2 * 512];
    if (!marks[0])
        for (cudaEvent_t &mark : marks) CK(cudaEventCreate(&mark));
    int grid = (int)((pass_vectors + 255) / 256);
    for (int i = 0; i < total; i++) {
        int t = i - (total - timed);
        if (t >= 0) CK(cudaEventRecord(marks[2 * t]));
        run(p, algo, A, B, Dm, 0);
        if (t >= 0) CK(cudaEventRecord(marks[2 * t + 1]));
        gelu_pass<<<grid, 256>>>((const uint4 *)pass_in, (uint4 *)pass_out, pass_vectors);
    }
    CK(cudaDeviceSynchronize());
    float sum = 0.0f;
    for (int t = 0; t < timed; t++) {
        float ms;
        CK(cudaEventElapsedTime(&ms, marks[2 * t], marks[2 * t + 1]));
        sum += ms;
    }
    return sum / timed;
}

static void experiment_loaded(curandGenerator_t generator) {
    int n_ffn = 4 * D;
    void *x = random_bf16((size_t)ROWS * D, 1.0f, generator);
    void *keys = random_bf16((size_t)n_ffn * D, 0.02f, generator), *values = random_bf16((size_t)n_ffn * D, 0.02f, generator);
    void *scores = random_bf16((size_t)ROWS * n_ffn, 1.0f, generator), *stream = random_bf16((size_t)ROWS * D, 1.0f, generator);
    void *pass_out, *scores_out;
    CK(cudaMalloc(&pass_out, (size_t)ROWS * n_ffn * 2));
    CK(cudaMalloc(&scores_out, (size_t)ROWS * n_ffn * 2));
    struct {
        const char *name;
        gemm_shape shape;
        const void *a, *b;
        void *d;
        int pass_width;
    } cases[] = {
        {"scores n 768 (Q, K, V, O)", {ROWS, D, D, 1, 0, true, false, 0, 0, 0, false}, x, keys, scores_out, D},
        {"scores n 3072 (FFN)", {ROWS, n_ffn, D, 1, 0, true, false, 0, 0, 0, false}, x, keys, scores_out, n_ffn},
        {"values K 768 (Q, K, V)", {ROWS, D, D, 1, 0, false, false, 0, 0, 0, false}, scores, values, scores_out, D},
        {"values K 768 + stream (O)", {ROWS, D, D, 1, 0, false, false, 0, 0, 0, true}, scores, values, stream, D},
        {"values K 3072 + stream (FFN)", {ROWS, D, n_ffn, 1, 0, false, false, 0, 0, 0, true}, scores, values, stream, n_ffn},
    };
    for (auto &c : cases) {
        gemm_plan p = plan(c.shape, MAX_ALGOS);
        double flops = 2.0 * c.shape.m * c.shape.n * c.shape.k;
        size_t pass_vectors = (size_t)ROWS * c.pass_width / 8;
        int total = 300, timed = 150;
        printf("loaded: %s, %d algorithms (burst: 3 runs after 1; loaded: GEMM + %zu MB pass, last %d of %d)\n",
               c.name, p.algo_count, pass_vectors * 32 / 1000000, timed, total);
        int burst_best = -1, loaded_best = -1;
        float burst_best_ms = 0, loaded_best_ms = 0, loaded_of_burst_best = 0;
        for (int i = 0; i < p.algo_count; i++) {
            run(p, i, c.a, c.b, c.d, 0);
            float burst = time_ms([&] { run(p, i, c.a, c.b, c.d, 0); }, 3, 0);
            float loaded = loaded_ms(p, i, c.a, c.b, c.d, scores, pass_out, pass_vectors, total, timed);
            char text[160];
            describe(p.algos[i], text, sizeof text);
            printf("  algo %2d: %s splitK %d | burst %.4f ms (%.0f TFLOP/s) loaded %.4f ms (%.0f)\n", i, text,
                   algo_config(p.algos[i], CUBLASLT_ALGO_CONFIG_SPLITK_NUM), burst, flops / burst / 1e9, loaded,
                   flops / loaded / 1e9);
            if (burst_best < 0 || burst < burst_best_ms) burst_best = i, burst_best_ms = burst;
            if (loaded_best < 0 || loaded < loaded_best_ms) loaded_best = i, loaded_best_ms = loaded;
        }
        /* The burst winner again under load, so both picks are compared at the same moment. */
        loaded_of_burst_best = loaded_ms(p, burst_best, c.a, c.b, c.d, scores, pass_out, pass_vectors, total, timed);
        float loaded_again = loaded_ms(p, loaded_best, c.a, c.b, c.d, scores, pass_out, pass_vectors, total, timed);
        printf("  burst picks %d, loaded picks %d; re-timed under load: %.4f against %.4f ms (%+.1f%%)\n", burst_best,
               loaded_best, loaded_of_burst_best, loaded_again, 100.0 * (loaded_again / loaded_of_burst_best - 1.0));
    }
}

/* Every configuration that cublasLtMatmulAlgoCheck accepts for the plan's shape. */
static std::vector<cublasLtMatmulAlgo_t> all_configs(const gemm_plan &p, cudaDataType_t d_type) {
    std::vector<cublasLtMatmulAlgo_t> configs;
    int ids[256], id_count = 0;
    CK(cublasLtMatmulAlgoGetIds(lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF, d_type, d_type, 256, ids,
                                &id_count));
    const uint16_t clusters[] = {CUBLASLT_CLUSTER_SHAPE_AUTO, CUBLASLT_CLUSTER_SHAPE_1x1x1, CUBLASLT_CLUSTER_SHAPE_2x1x1,
                                 CUBLASLT_CLUSTER_SHAPE_1x2x1, CUBLASLT_CLUSTER_SHAPE_2x2x1, CUBLASLT_CLUSTER_SHAPE_4x1x1,
                                 CUBLASLT_CLUSTER_SHAPE_1x4x1};
    for (int a = 0; a < id_count; a++) {
        cublasLtMatmulAlgo_t algo;
        if (cublasLtMatmulAlgoInit(lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF, d_type, d_type, ids[a],
                                   &algo) != CUBLAS_STATUS_SUCCESS)
            continue;
        size_t bytes = 0;
        uint32_t swizzle_support = 0;
        int custom_max = 0;
        auto cap_list = [&](cublasLtMatmulAlgoCapAttributes_t attribute, uint32_t undefined) {
            size_t needed = 0;
            cublasLtMatmulAlgoCapGetAttribute(&algo, attribute, NULL, 0, &needed);
            std::vector<uint32_t> list(needed / 4);
            if (!list.empty()) cublasLtMatmulAlgoCapGetAttribute(&algo, attribute, list.data(), list.size() * 4, &needed);
            else list.push_back(undefined);
            return list;
        };
        std::vector<uint32_t> tiles = cap_list(CUBLASLT_ALGO_CAP_TILE_IDS, CUBLASLT_MATMUL_TILE_UNDEFINED);
        std::vector<uint32_t> stages = cap_list(CUBLASLT_ALGO_CAP_STAGES_IDS, CUBLASLT_MATMUL_STAGES_UNDEFINED);
        int tile_count = (int)tiles.size(), stage_count = (int)stages.size();
        cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_CTA_SWIZZLING_SUPPORT, &swizzle_support,
                                          sizeof swizzle_support, &bytes);
        cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX, &custom_max, sizeof custom_max, &bytes);
        if (custom_max > 3) custom_max = 3;
        for (int t = 0; t < tile_count; t++)
            for (int st = 0; st < stage_count; st++)
                for (uint16_t cluster : clusters)
                    for (uint32_t swizzle = 0; swizzle <= (swizzle_support ? 1u : 0u); swizzle++)
                        for (uint32_t custom = 0; custom <= (uint32_t)custom_max; custom++) {
                            cublasLtMatmulAlgo_t c = algo;
                            cublasLtMatmulAlgoConfigSetAttribute(&c, CUBLASLT_ALGO_CONFIG_TILE_ID, &tiles[t], 4);
                            cublasLtMatmulAlgoConfigSetAttribute(&c, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages[st], 4);
                            cublasLtMatmulAlgoConfigSetAttribute(&c, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, 2);
                            cublasLtMatmulAlgoConfigSetAttribute(&c, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swizzle, 4);
                            cublasLtMatmulAlgoConfigSetAttribute(&c, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &custom, 4);
                            cublasLtMatmulHeuristicResult_t result;
                            if (cublasLtMatmulAlgoCheck(lt, p.op, p.a, p.b, p.d, p.d, &c, &result) == CUBLAS_STATUS_SUCCESS &&
                                result.workspaceSize <= workspace_bytes)
                                configs.push_back(c);
                        }
    }
    return configs;
}

/* train: training's shapes at batch 256 (50432 rows): the forward's and the backward's
 * activation GEMMs (dS = dOut V^T and dX = dA K have the scores' and the values' shapes) and the
 * parameter gradients (S^T dOut, dA^T X: K = the rows, fp32 accumulated). */
static void experiment_search(curandGenerator_t generator, bool train) {
    int n_ffn = 4 * D, rows = train ? ROWS / 2 : ROWS;
    void *x = random_bf16((size_t)rows * D, 1.0f, generator);
    void *keys = random_bf16((size_t)n_ffn * D, 0.02f, generator), *values = random_bf16((size_t)n_ffn * D, 0.02f, generator);
    void *scores = random_bf16((size_t)rows * n_ffn, 1.0f, generator), *stream = random_bf16((size_t)rows * D, 1.0f, generator);
    void *scores_out, *gradient;
    CK(cudaMalloc(&scores_out, (size_t)rows * n_ffn * 2));
    CK(cudaMalloc(&gradient, (size_t)n_ffn * D * 4));
    CK(cudaMemset(gradient, 0, (size_t)n_ffn * D * 4));
    struct search_case {
        const char *name;
        gemm_shape shape;
        const void *a, *b;
        void *d;
    };
    std::vector<search_case> cases;
    if (!train) {
        cases = {
            {"scores n 768 (Q, K, V, O)", {rows, D, D, 1, 0, true, false, 0, 0, 0, false, false}, x, keys, scores_out},
            {"scores n 3072 (FFN)", {rows, n_ffn, D, 1, 0, true, false, 0, 0, 0, false, false}, x, keys, scores_out},
            {"values K 768 (Q, K, V)", {rows, D, D, 1, 0, false, false, 0, 0, 0, false, false}, scores, values, scores_out},
            {"values K 768 + stream (O)", {rows, D, D, 1, 0, false, false, 0, 0, 0, true, false}, scores, values, stream},
            {"values K 3072 + stream (FFN)", {rows, D, n_ffn, 1, 0, false, false, 0, 0, 0, true, false}, scores, values,
             stream},
        };
    } else {
        cases = {
            {"train scores n 768, dS n 768", {rows, D, D, 1, 0, true, false, 0, 0, 0, false, false}, x, keys, scores_out},
            {"train scores n 3072, dS n 3072", {rows, n_ffn, D, 1, 0, true, false, 0, 0, 0, false, false}, x, keys,
             scores_out},
            {"train values K 768, dX K 768", {rows, D, D, 1, 0, false, false, 0, 0, 0, false, false}, scores, values,
             scores_out},
            {"train values K 3072, dX K 3072", {rows, D, n_ffn, 1, 0, false, false, 0, 0, 0, false, false}, scores, values,
             scores_out},
            {"train parameter gradient 768 x 768, K rows", {D, D, rows, 1, 0, false, true, 0, 0, 0, false, true}, scores,
             stream, gradient},
            {"train parameter gradient 3072 x 768, K rows", {n_ffn, D, rows, 1, 0, false, true, 0, 0, 0, false, true},
             scores, stream, gradient},
        };
    }
    for (auto &c : cases) {
        gemm_plan p = plan(c.shape, 8);
        double flops = 2.0 * c.shape.m * c.shape.n * c.shape.k;
        std::vector<cublasLtMatmulAlgo_t> configs =
            all_configs(p, c.shape.accumulate && !c.shape.add_bf16 ? CUDA_R_32F : CUDA_R_16BF);
        printf("search: %s: %zu configurations accepted\n", c.name, configs.size());
        std::vector<std::pair<float, int>> quick;
        auto run_algo = [&](const cublasLtMatmulAlgo_t &algo) {
            float one = 1.0f;
            return cublasLtMatmul(lt, p.op, &one, c.b, p.a, c.a, p.b, &p.beta, c.d, p.d, c.d, p.d, &algo, workspace,
                                  workspace_bytes, 0) == CUBLAS_STATUS_SUCCESS;
        };
        /* A fixed shuffle, so that a search cut short by its budget times a fair sample. */
        std::mt19937 shuffle_rng(1);
        std::shuffle(configs.begin(), configs.end(), shuffle_rng);
        auto started = std::chrono::steady_clock::now();
        for (size_t i = 0; i < configs.size(); i++) {
            if (std::chrono::steady_clock::now() - started > std::chrono::seconds(train ? 25 : 45)) break;
            if (!run_algo(configs[i])) continue;
            float ms = time_ms([&] { run_algo(configs[i]); }, 2, 0);
            quick.push_back({ms, (int)i});
        }
        cudaGetLastError();
        std::sort(quick.begin(), quick.end());
        /* Finalists: the 12 quickest and the heuristic's 8 (index -1 - h), timed in 5 alternating rounds. */
        std::vector<int> finalists;
        for (size_t i = 0; i < quick.size() && i < 12; i++) finalists.push_back(quick[i].second);
        for (int h = 0; h < p.algo_count; h++) finalists.push_back(-1 - h);
        std::vector<double> total(finalists.size(), 0.0);
        for (int round = 0; round < 5; round++)
            for (size_t f = 0; f < finalists.size(); f++) {
                const cublasLtMatmulAlgo_t &algo = finalists[f] >= 0 ? configs[finalists[f]] : p.algos[-1 - finalists[f]];
                total[f] += time_ms([&] { run_algo(algo); }, 10, 1);
            }
        printf("search: %s: %zu configurations accepted, %zu ran; finalists (mean of 5 rounds of 10 runs):\n", c.name,
               configs.size(), quick.size());
        for (size_t f = 0; f < finalists.size(); f++) {
            const cublasLtMatmulAlgo_t &algo = finalists[f] >= 0 ? configs[finalists[f]] : p.algos[-1 - finalists[f]];
            char text[160];
            describe(algo, text, sizeof text);
            double ms = total[f] / 5;
            /* Whether kernels/cuda/matmul.cu's add_tile_variants offers this one. */
            uint16_t cluster = 0;
            size_t written;
            cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof cluster,
                                                 &written);
            int tile = algo_config(algo, CUBLASLT_ALGO_CONFIG_TILE_ID);
            bool offered = algo_config(algo, CUBLASLT_ALGO_CONFIG_ID) == algo_config(p.algos[0], CUBLASLT_ALGO_CONFIG_ID) &&
                           (cluster == CUBLASLT_CLUSTER_SHAPE_2x1x1 || cluster == CUBLASLT_CLUSTER_SHAPE_1x2x1) &&
                           (tile == CUBLASLT_MATMUL_TILE_128x128 || tile == CUBLASLT_MATMUL_TILE_128x160 ||
                            tile == CUBLASLT_MATMUL_TILE_128x192 ||
                            (tile >= CUBLASLT_MATMUL_TILE_128x136 && tile <= CUBLASLT_MATMUL_TILE_128x184));
            if (finalists[f] >= 0)
                printf("  searched  %s  %.4f ms (%.0f TFLOP/s)%s\n", text, ms, flops / ms / 1e9,
                       offered ? " [a backend variant]" : "");
            else printf("  heuristic %d %s  %.4f ms (%.0f TFLOP/s)\n", -1 - finalists[f], text, ms, flops / ms / 1e9);
        }
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    CK(cublasLtCreate(&lt));
    CK(cudaMalloc(&workspace, workspace_bytes));
    curandGenerator_t generator;
    CK(curandCreateGenerator(&generator, CURAND_RNG_PSEUDO_DEFAULT));
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "overlap")) experiment_overlap(generator);
        else if (!strcmp(argv[i], "qkv")) experiment_qkv(generator, ROWS);
        else if (!strcmp(argv[i], "qkv-train")) experiment_qkv(generator, ROWS / 2);
        else if (!strcmp(argv[i], "residual")) experiment_residual(generator);
        else if (!strcmp(argv[i], "loaded")) experiment_loaded(generator);
        else if (!strcmp(argv[i], "search")) experiment_search(generator, false);
        else if (!strcmp(argv[i], "search-train")) experiment_search(generator, true);
        else printf("unknown experiment %s (overlap, qkv, qkv-train, residual, loaded, search, search-train)\n", argv[i]);
    }
    return 0;
}
