/* GEMM through cuBLASLt: C = op(A) op(B) (+ bias) (+ C), bf16 A and B, fp32 accumulation,
 * C in bf16 (compute buffers) or fp32 (master buffers: parameter gradients, accumulated with
 * beta = 1).
 *
 * Our matrices are row-major, cuBLASLt's column-major. A row-major m x n matrix is the same
 * memory as a column-major n x m one, its transpose, so C = op(A) op(B) is computed as
 * C^T = op(B)^T op(A)^T: cuBLASLt's first operand is our B, its second our A, its output n x m
 * with leading dimension n:
 *   B stored k x n (no transpose_b) is column-major n x k, ld n: op N.
 *   B stored n x k (transpose_b)    is column-major k x n, ld k: op T.
 *   A stored m x k (no transpose_a) is column-major k x m, ld k: op N.
 *   A stored k x m (transpose_a)    is column-major m x k, ld m: op T.
 * The bias epilogue adds a vector along the rows of cuBLASLt's output (length n), which is our
 * bias added to every row of C.
 *
 * Descriptors and the algorithm are cached per (shape, transposes, output type, bias, pointer
 * alignment) in a small table, so a shape is planned once (at warm-up). The heuristic's first
 * choice is not always the fastest on our shapes (M ~ 10^5 rows against N, K of 768-3072), so
 * the first call of a shape times candidates on the call's own operands and keeps the fastest
 * (tune_plan): the heuristic's top 8, and its first algorithm with the tiles around the ones it
 * picks for such shapes (add_tile_variants). Timing ~80 candidates, most of them kernels not
 * loaded yet, costs ~0.8 s over B/16's inference shapes, so the choices go into the tuning record
 * (common/tuning_record.h, one file per cuBLASLt version and GPU) and a later process on the same
 * machine takes them from there: cuBLASLt documents its algorithm struct as safe to store and
 * restore with the same library version, and cublasLtMatmulAlgoCheck vets it again. */
#include "kernels/cuda/cuda_common.cuh"

extern "C" {
#include "common/log.h"
#include "common/tuning_record.h"
}

#include <errno.h>
#include <stdio.h>
#include <string.h>

enum { MATMUL_PLAN_CAPACITY = 1024, MATMUL_HEURISTIC_CANDIDATES = 8, MATMUL_CANDIDATES = 96, MATMUL_TIMED_RUNS = 3 };

typedef struct {
    int m, n, k;
    bool transpose_a, transpose_b, master_output, bias;
    int align_a, align_b, align_c; /* bytes, at most 16 */
} matmul_key;

typedef struct {
    matmul_key key;
    bool usable; /* false when planning failed (the failure is recorded once) */
    bool tuned;  /* algo is the fastest of the candidates, timed on a first call */
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t layout_a, layout_b, layout_c; /* cuBLASLt's A (our b), B (our a), C = D */
    cublasLtMatmulAlgo_t algo;
    cublasLtMatmulAlgo_t *candidates; /* [MATMUL_CANDIDATES] until tuned: the heuristic's order, then variants */
    int candidate_count;
} matmul_plan;

static matmul_plan plans[MATMUL_PLAN_CAPACITY];
static int plan_count;

static int pointer_alignment(const void *p) {
    uintptr_t address = (uintptr_t)p;
    int alignment = 16;
    while (alignment > 1 && (address % (uintptr_t)alignment) != 0) alignment >>= 1;
    return alignment;
}

#define MATMUL_SHAPE_FORMAT "matmul m=%d n=%d k=%d transpose_a=%d transpose_b=%d output=%s bias=%d"
#define MATMUL_SHAPE_ARGS(key)                                                                                     \
    (key).m, (key).n, (key).k, (int)(key).transpose_a, (int)(key).transpose_b,                                     \
        (key).master_output ? "F32" : "BF16", (int)(key).bias

static bool set_desc(cublasLtMatmulDesc_t op, cublasLtMatmulDescAttributes_t attribute, const void *value, size_t size,
                     const matmul_key *key) {
    return CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, attribute, value, size), "attribute %d of " MATMUL_SHAPE_FORMAT,
                        (int)attribute, MATMUL_SHAPE_ARGS(*key));
}

/* For M ~ 10^5 rows the heuristic offers a few tiles (on Hopper 128 x 160 first, then 128 x 128,
 * 128 x 256, ...: cuBLASLt's tiles are its m x n, ours N x M), but the last wave over M decides
 * much: tiles 128 x 136 to 128 x 176 in steps of 8, with clusters of two along either side, ran
 * 1.6-5.9% faster than the heuristic's best on every B/16 inference shape (docs/performance.md row 23).
 * So the heuristic's first algorithm joins the candidates with each of those tiles, both cluster
 * shapes and each custom option it has; cublasLtMatmulAlgoCheck drops what it does not support
 * for this shape and device, and the timing decides. */
static void add_tile_variants(matmul_plan *plan, const cublasLtMatmulAlgo_t *best) {
    static const uint32_t tiles[] = {CUBLASLT_MATMUL_TILE_128x128, CUBLASLT_MATMUL_TILE_128x136,
                                     CUBLASLT_MATMUL_TILE_128x144, CUBLASLT_MATMUL_TILE_128x152,
                                     CUBLASLT_MATMUL_TILE_128x160, CUBLASLT_MATMUL_TILE_128x168,
                                     CUBLASLT_MATMUL_TILE_128x176, CUBLASLT_MATMUL_TILE_128x184,
                                     CUBLASLT_MATMUL_TILE_128x192};
    static const uint16_t clusters[] = {CUBLASLT_CLUSTER_SHAPE_2x1x1, CUBLASLT_CLUSTER_SHAPE_1x2x1};
    int custom_max = 0;
    size_t written = 0;
    if (cublasLtMatmulAlgoCapGetAttribute(best, CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX, &custom_max, sizeof custom_max,
                                          &written) != CUBLAS_STATUS_SUCCESS)
        return;
    for (uint32_t tile : tiles)
        for (uint16_t cluster : clusters)
            for (uint32_t custom = 0; custom <= (uint32_t)custom_max && custom < 4; custom++) {
                if (plan->candidate_count == MATMUL_CANDIDATES) return;
                cublasLtMatmulAlgo_t variant = *best;
                cublasLtMatmulHeuristicResult_t check;
                if (cublasLtMatmulAlgoConfigSetAttribute(&variant, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile) ==
                        CUBLAS_STATUS_SUCCESS &&
                    cublasLtMatmulAlgoConfigSetAttribute(&variant, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster,
                                                         sizeof cluster) == CUBLAS_STATUS_SUCCESS &&
                    cublasLtMatmulAlgoConfigSetAttribute(&variant, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &custom,
                                                         sizeof custom) == CUBLAS_STATUS_SUCCESS &&
                    cublasLtMatmulAlgoCheck(cuda_ctx.lt, plan->op, plan->layout_a, plan->layout_b, plan->layout_c,
                                            plan->layout_c, &variant, &check) == CUBLAS_STATUS_SUCCESS &&
                    check.workspaceSize <= cuda_ctx.lt_workspace_bytes)
                    plan->candidates[plan->candidate_count++] = variant;
            }
}

/* The record file of this cuBLASLt and GPU; NULL when there is none to be had (said once). */
static const char *record_path(void) {
    static char path[1200];
    static int state; /* 0 not looked for, 1 ready, -1 none */
    if (state == 0) {
        cudaDeviceProp properties;
        char name[320];
        state = -1;
        if (cudaGetDeviceProperties(&properties, cuda_ctx.device) == cudaSuccess) {
            snprintf(name, sizeof name, "cublaslt-%zu-%s-%dsm.txt", cublasLtGetVersion(), properties.name,
                     cuda_ctx.sm_count);
            for (char *c = name; *c; c++)
                if (*c == ' ' || *c == '/') *c = '_';
            if (tuning_record_path(path, sizeof path, name)) state = 1;
        } else {
            cudaGetLastError();
        }
        if (state < 0)
            tf_log("no tuning record (set TF_TUNING_DIR to a writable directory): every process times its GEMM "
                   "algorithms again");
    }
    return state > 0 ? path : NULL;
}

static void record_key(const matmul_key *key, char *out, size_t size) {
    snprintf(out, size, MATMUL_SHAPE_FORMAT " align_a=%d align_b=%d align_c=%d", MATMUL_SHAPE_ARGS(*key), key->align_a,
             key->align_b, key->align_c);
}

/* The recorded choice of an earlier process, if it still passes cublasLtMatmulAlgoCheck. */
static bool take_recorded(matmul_plan *plan) {
    const char *path = record_path();
    char key[256];
    cublasLtMatmulAlgo_t algo;
    cublasLtMatmulHeuristicResult_t check;
    if (!path) return false;
    record_key(&plan->key, key, sizeof key);
    if (!tuning_record_find(path, key, &algo, sizeof algo) ||
        cublasLtMatmulAlgoCheck(cuda_ctx.lt, plan->op, plan->layout_a, plan->layout_b, plan->layout_c, plan->layout_c,
                                &algo, &check) != CUBLAS_STATUS_SUCCESS ||
        check.workspaceSize > cuda_ctx.lt_workspace_bytes)
        return false;
    plan->algo = algo;
    return true;
}

static void record_choice(const matmul_plan *plan) {
    static bool warned;
    const char *path = record_path();
    char key[256];
    if (!path) return;
    record_key(&plan->key, key, sizeof key);
    if (!tuning_record_add(path, key, &plan->algo, sizeof plan->algo) && !warned) {
        warned = true;
        tf_log("cannot add to the tuning record %s (%s): later processes will time their GEMM algorithms again", path,
               strerror(errno));
    }
}

/* The choice is made (timed, recorded earlier, or the only one): the candidates go. */
static void settle_plan(matmul_plan *plan) {
    free(plan->candidates);
    plan->candidates = NULL;
    plan->candidate_count = 0;
    plan->tuned = true;
}

/* Descriptors for one key and, unless the tuning record has this shape's choice, the candidate
 * algorithms to time. */
static bool plan_matmul(matmul_plan *plan) {
    const matmul_key *key = &plan->key;
    cudaDataType_t c_type = key->master_output ? CUDA_R_32F : CUDA_R_16BF;
    if (!CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), MATMUL_SHAPE_FORMAT,
                      MATMUL_SHAPE_ARGS(*key)))
        return false;
    cublasOperation_t op_a = key->transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t op_b = key->transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasLtEpilogue_t epilogue = key->bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    if (!set_desc(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a, key) ||
        !set_desc(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b, key) ||
        !set_desc(plan->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue, key))
        return false;
    if (key->bias) {
        int32_t bias_type = c_type; /* the bias has the output's dtype (kernels.h) */
        if (!set_desc(plan->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type, key)) return false;
    }
    /* cuBLASLt's A = our b: stored (rows x cols, ld) column-major as derived above. */
    uint64_t a_rows = key->transpose_b ? key->k : key->n, a_cols = key->transpose_b ? key->n : key->k;
    uint64_t b_rows = key->transpose_a ? key->m : key->k, b_cols = key->transpose_a ? key->k : key->m;
    if (!CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->layout_a, CUDA_R_16BF, a_rows, a_cols, (int64_t)a_rows),
                      "layout of B in " MATMUL_SHAPE_FORMAT, MATMUL_SHAPE_ARGS(*key)) ||
        !CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->layout_b, CUDA_R_16BF, b_rows, b_cols, (int64_t)b_rows),
                      "layout of A in " MATMUL_SHAPE_FORMAT, MATMUL_SHAPE_ARGS(*key)) ||
        !CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->layout_c, c_type, (uint64_t)key->n, (uint64_t)key->m,
                                                 (int64_t)key->n),
                      "layout of C in " MATMUL_SHAPE_FORMAT, MATMUL_SHAPE_ARGS(*key)))
        return false;

    cublasLtMatmulPreference_t preference;
    if (!CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference), MATMUL_SHAPE_FORMAT, MATMUL_SHAPE_ARGS(*key)))
        return false;
    uint64_t workspace = cuda_ctx.lt_workspace_bytes;
    uint32_t align_a = (uint32_t)key->align_b, align_b = (uint32_t)key->align_a, align_c = (uint32_t)key->align_c;
    bool ok = CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                                &workspace, sizeof workspace),
                           MATMUL_SHAPE_FORMAT, MATMUL_SHAPE_ARGS(*key)) &&
              CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                                &align_a, sizeof align_a),
                           MATMUL_SHAPE_FORMAT, MATMUL_SHAPE_ARGS(*key)) &&
              CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                                &align_b, sizeof align_b),
                           MATMUL_SHAPE_FORMAT, MATMUL_SHAPE_ARGS(*key)) &&
              CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                                &align_c, sizeof align_c),
                           MATMUL_SHAPE_FORMAT, MATMUL_SHAPE_ARGS(*key)) &&
              CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                                &align_c, sizeof align_c),
                           MATMUL_SHAPE_FORMAT, MATMUL_SHAPE_ARGS(*key));
    cublasLtMatmulHeuristicResult_t results[MATMUL_HEURISTIC_CANDIDATES];
    int returned = 0;
    if (ok)
        ok = CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(cuda_ctx.lt, plan->op, plan->layout_a, plan->layout_b,
                                                         plan->layout_c, plan->layout_c, preference,
                                                         MATMUL_HEURISTIC_CANDIDATES, results, &returned),
                          MATMUL_SHAPE_FORMAT " alignments A %d B %d C %d", MATMUL_SHAPE_ARGS(*key), key->align_a,
                          key->align_b, key->align_c);
    cublasLtMatmulPreferenceDestroy(preference);
    if (!ok) return false;
    if (returned == 0) {
        cuda_record_failure(__FILE__, __LINE__, "cublasLtMatmulAlgoGetHeuristic", "no algorithm",
                            MATMUL_SHAPE_FORMAT " alignments A %d B %d C %d", MATMUL_SHAPE_ARGS(*key), key->align_a,
                            key->align_b, key->align_c);
        return false;
    }
    plan->algo = results[0].algo;
    if (take_recorded(plan)) { /* an earlier process timed this shape */
        settle_plan(plan);
        return true;
    }
    plan->candidates = (cublasLtMatmulAlgo_t *)malloc(MATMUL_CANDIDATES * sizeof *plan->candidates);
    if (plan->candidates) { /* without them the heuristic's first choice serves */
        for (int i = 0; i < returned; i++)
            if (results[i].state == CUBLAS_STATUS_SUCCESS) plan->candidates[plan->candidate_count++] = results[i].algo;
        add_tile_variants(plan, &results[0].algo);
    }
    if (plan->candidate_count <= 1) settle_plan(plan); /* nothing to choose between */
    return true;
}

/* C = op(A) op(B) (+ C with accumulate) with the given algorithm, on the one stream. */
static cublasStatus_t run_matmul(const matmul_plan *plan, const cublasLtMatmulAlgo_t *algo, void *c, const void *a,
                                 const void *b, bool accumulate) {
    float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    return cublasLtMatmul(cuda_ctx.lt, plan->op, &alpha, b, plan->layout_a, a, plan->layout_b, &beta, c,
                          plan->layout_c, c, plan->layout_c, algo, cuda_ctx.lt_workspace, cuda_ctx.lt_workspace_bytes,
                          cuda_ctx.stream);
}

/* Times the candidates on this call's operands, keeps the fastest and records it. The runs write
 * C with beta = 0: harmless when the call overwrites C anyway, and into a scratch copy of C's size
 * when the call accumulates into it (parameter gradients: at most a few MB). Bias pointers are
 * set already. Failing to tune keeps the heuristic's first choice. */
static void tune_plan(matmul_plan *plan, void *c, const void *a, const void *b, bool accumulate) {
    void *target = c, *scratch = NULL;
    bool ready = true;
    if (accumulate) {
        size_t bytes = (size_t)plan->key.m * plan->key.n * (plan->key.master_output ? sizeof(float) : sizeof(bf16));
        ready = cudaMalloc(&scratch, bytes) == cudaSuccess;
        if (!ready) cudaGetLastError(); /* out of memory is not a failure of the run: keep the heuristic's choice */
        target = scratch;
    }
    if (ready) {
        /* A candidate that fails to launch is not chosen; that is not an error of the run. */
        int fastest = fastest_candidate(plan->candidate_count, MATMUL_TIMED_RUNS, [&](int i) {
            return run_matmul(plan, &plan->candidates[i], target, a, b, false) == CUBLAS_STATUS_SUCCESS;
        });
        if (fastest >= 0) {
            plan->algo = plan->candidates[fastest];
            record_choice(plan);
        }
    }
    if (scratch) cudaFree(scratch);
    settle_plan(plan);
}

static matmul_plan *find_plan(const matmul_key *key) {
    for (int i = 0; i < plan_count; i++)
        if (memcmp(&plans[i].key, key, sizeof *key) == 0) return &plans[i];
    if (plan_count == MATMUL_PLAN_CAPACITY) {
        cuda_record_failure(__FILE__, __LINE__, "matmul plan cache", "full",
                            "%d distinct GEMM shapes planned already; " MATMUL_SHAPE_FORMAT, MATMUL_PLAN_CAPACITY,
                            MATMUL_SHAPE_ARGS(*key));
        return NULL;
    }
    matmul_plan *plan = &plans[plan_count++];
    memset(plan, 0, sizeof *plan);
    plan->key = *key;
    plan->usable = plan_matmul(plan);
    return plan;
}

extern "C" void cuda_matmul(void *c, const void *a, const void *b, const tf_matmul_desc *desc) {
    if (desc->m <= 0 || desc->n <= 0) return;
    if (desc->k <= 0) { /* an empty sum: C = 0 (+ C) */
        if (!desc->accumulate)
            cuda_zero(c, (size_t)desc->m * desc->n * (desc->master_output ? sizeof(float) : sizeof(bf16)));
        return;
    }
    matmul_key key;
    memset(&key, 0, sizeof key); /* the key is compared with memcmp: no stray padding bytes */
    key.m = desc->m;
    key.n = desc->n;
    key.k = desc->k;
    key.transpose_a = desc->transpose_a;
    key.transpose_b = desc->transpose_b;
    key.master_output = desc->master_output;
    key.bias = desc->bias != NULL;
    key.align_a = pointer_alignment(a);
    key.align_b = pointer_alignment(b);
    key.align_c = pointer_alignment(c);
    matmul_plan *plan = find_plan(&key);
    if (!plan || !plan->usable) return;
    if (key.bias && !set_desc(plan->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &desc->bias, sizeof desc->bias, &key))
        return;
    if (!plan->tuned) tune_plan(plan, c, a, b, desc->accumulate);
    CUBLAS_CHECK(run_matmul(plan, &plan->algo, c, a, b, desc->accumulate),
                 MATMUL_SHAPE_FORMAT " accumulate=%d a=%p b=%p c=%p", MATMUL_SHAPE_ARGS(key), (int)desc->accumulate, a,
                 b, c);
    if (cuda_ctx.debug_sync) LAUNCH_CHECK("cublasLtMatmul", MATMUL_SHAPE_FORMAT, MATMUL_SHAPE_ARGS(key));
}
