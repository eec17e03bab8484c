/* cuDNN's fused flash attention, reached from C++ through cuDNN's backend graph API.
 *
 * cuDNN recognises scaled dot-product attention as a graph of operations and runs the whole
 * graph as one fused kernel. We build, once per shape, the same graphs that NVIDIA's
 * cudnn-frontend (v1, its composite SDPA node) builds for a bf16, non-causal, dropout-free
 * attention (backward with a padding mask), then keep the execution plan. Tensors are 4-D
 * [b, h, s, d] views of our [batch * tokens, heads * head_dim] buffers (strides S H D, D, H D, 1).
 *
 * Forward (outputs O and the fp32 softmax statistics, lse = max + log sum exp, [b, h, s, 1]):
 *   S = matmul(Q, K^T) * scale;  (fallback graph: S = (row < seq_q && col < seq_kv) ? S : -inf)
 *   max = reduce_max(S);  E = exp(S - max);  sum = reduce_add(E);  stats = max + log(sum)
 *   P = E / sum (bf16);  O = matmul(P, V)
 * Backward (inputs also dO, O, stats; outputs dQ, dK, dV):
 *   softmax_sum = reduce_add(dO * O) * 1            (fp32 workspace tensor, [b, h, s, 1])
 *   P = exp(mask(matmul(Q, K^T) * scale) - stats)
 *   dV = matmul(P^T, dO);  dP = matmul(dO, V^T);  dS = (dP - softmax_sum) * P * scale
 *   dK = matmul(dS^T, Q);  dQ_accum = matmul(dS, K) (fp32 workspace);  dQ = identity(dQ_accum)
 * Every matmul of backward carries the sequence lengths (int32 [b, 1, 1, 1], all = tokens) as
 * M/N/K overrides and padding value 0. The padding mask with sequence lengths is what cuDNN
 * <= 9.15 needs for a backward whose length is not a multiple of 128 (197); it changes nothing
 * when every sequence is full. cuDNN 9.0 to 9.9 also need the mask applied a second time after
 * the statistics are subtracted in backward (the frontend's workaround, reproduced here).
 * Forward does without them: cuDNN 9.14 then picks a kernel 12% faster for B/16 (0.185 against
 * 0.210 ms, batch 256, H100); the masked graph is its fallback. A forward without statistics
 * (inference) is not offered by cuDNN 9.14 for these shapes, so forward always writes them.
 *
 * The heuristics offer several engine configs for a graph (B/16's forward: seven, five from mode A
 * and two from fallback, of two engines); the first run of a shape times every one that finalizes and keeps the fastest, as
 * the GEMMs do (matmul.cu).
 *
 * A shape whose graph cannot be built (or whose first execution fails) is remembered as
 * unusable with the reason; the caller then runs our own kernels (attention.cu). */
#include "kernels/cuda/cuda_common.cuh"

extern "C" {
#include "common/log.h"
}

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

enum { MAX_GRAPH_DESCRIPTORS = 160, MAX_GRAPH_OPS = 48, MAX_CUDNN_PLANS = 32, MAX_PLAN_CANDIDATES = 8,
       PLAN_TIMED_RUNS = 3 };

/* ---- building a graph ---- */
typedef struct {
    cudnnBackendDescriptor_t created[MAX_GRAPH_DESCRIPTORS]; /* kept while the plan lives */
    int created_count;
    cudnnBackendDescriptor_t ops[MAX_GRAPH_OPS];
    int op_count;
    int64_t next_virtual_uid;
    bool failed;
    char why[512];
} graph_builder;

typedef struct {
    cudnnBackendDescriptor_t desc;
    int64_t uid;
    cudnnDataType_t type;
    int64_t dims[4], strides[4];
} graph_tensor;

static void graph_fail(graph_builder *g, cudnnStatus_t status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void graph_fail(graph_builder *g, cudnnStatus_t status, const char *fmt, ...) {
    if (g->failed) return;
    g->failed = true;
    char what[256], last[256] = "";
    va_list args;
    va_start(args, fmt);
    vsnprintf(what, sizeof what, fmt, args);
    va_end(args);
    cudnnGetLastErrorString(last, sizeof last);
    snprintf(g->why, sizeof g->why, "%s: %s%s%s", what, cudnnGetErrorString(status), last[0] ? ": " : "", last);
}

static cudnnBackendDescriptor_t graph_create(graph_builder *g, cudnnBackendDescriptorType_t type, const char *name) {
    if (g->failed) return NULL;
    if (g->created_count == MAX_GRAPH_DESCRIPTORS) {
        graph_fail(g, CUDNN_STATUS_INTERNAL_ERROR, "too many descriptors creating %s", name);
        return NULL;
    }
    cudnnBackendDescriptor_t desc = NULL;
    cudnnStatus_t status = cudnnBackendCreateDescriptor(type, &desc);
    if (status != CUDNN_STATUS_SUCCESS) {
        graph_fail(g, status, "cudnnBackendCreateDescriptor(%s)", name);
        return NULL;
    }
    g->created[g->created_count++] = desc;
    return desc;
}

#define GRAPH_SET(g, desc, attribute, type, count, value)                                                           \
    graph_set((g), (desc), (attribute), (type), (count), (value), #attribute)

static void graph_set(graph_builder *g, cudnnBackendDescriptor_t desc, cudnnBackendAttributeName_t attribute,
                      cudnnBackendAttributeType_t type, int64_t count, const void *value, const char *name) {
    if (g->failed) return;
    cudnnStatus_t status = cudnnBackendSetAttribute(desc, attribute, type, count, value);
    if (status != CUDNN_STATUS_SUCCESS) graph_fail(g, status, "cudnnBackendSetAttribute(%s)", name);
}

static void graph_finalize(graph_builder *g, cudnnBackendDescriptor_t desc, const char *name) {
    if (g->failed) return;
    cudnnStatus_t status = cudnnBackendFinalize(desc);
    if (status != CUDNN_STATUS_SUCCESS) graph_fail(g, status, "cudnnBackendFinalize(%s)", name);
}

static void graph_destroy_all(graph_builder *g) {
    for (int i = 0; i < g->created_count; i++) cudnnBackendDestroyDescriptor(g->created[i]);
    g->created_count = 0;
}

static void set_dims(int64_t out[4], int64_t a, int64_t b, int64_t c, int64_t d) {
    out[0] = a;
    out[1] = b;
    out[2] = c;
    out[3] = d;
}

/* A tensor descriptor; uid 0 means virtual (an intermediate that never reaches memory). */
static graph_tensor graph_tensor_make(graph_builder *g, int64_t uid, cudnnDataType_t type, const int64_t dims[4],
                                      const int64_t strides[4], bool by_value) {
    graph_tensor t;
    memset(&t, 0, sizeof t);
    bool is_virtual = uid == 0;
    t.uid = is_virtual ? g->next_virtual_uid++ : uid;
    t.type = type;
    memcpy(t.dims, dims, sizeof t.dims);
    memcpy(t.strides, strides, sizeof t.strides);
    t.desc = graph_create(g, CUDNN_BACKEND_TENSOR_DESCRIPTOR, "tensor");
    int64_t alignment = 16;
    GRAPH_SET(g, t.desc, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &t.type);
    GRAPH_SET(g, t.desc, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, t.dims);
    GRAPH_SET(g, t.desc, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, t.strides);
    GRAPH_SET(g, t.desc, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &t.uid);
    GRAPH_SET(g, t.desc, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment);
    GRAPH_SET(g, t.desc, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) GRAPH_SET(g, t.desc, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    graph_finalize(g, t.desc, "tensor");
    return t;
}

/* A virtual tensor of the given type, shaped like `like` (the frontend's stride inference:
 * a pointwise output takes the strides of its first input of the same shape). */
static graph_tensor graph_virtual_like(graph_builder *g, cudnnDataType_t type, const graph_tensor *like) {
    return graph_tensor_make(g, 0, type, like->dims, like->strides, false);
}

static graph_tensor graph_virtual(graph_builder *g, cudnnDataType_t type, const int64_t dims[4],
                                  const int64_t strides[4]) {
    return graph_tensor_make(g, 0, type, dims, strides, false);
}

/* A scalar passed by value (its host address goes into the variant pack). */
static graph_tensor graph_scalar(graph_builder *g, int64_t uid, cudnnDataType_t type) {
    int64_t ones[4] = {1, 1, 1, 1};
    return graph_tensor_make(g, uid, type, ones, ones, true);
}

static void graph_add_op(graph_builder *g, cudnnBackendDescriptor_t op) {
    if (g->failed) return;
    if (g->op_count == MAX_GRAPH_OPS) {
        graph_fail(g, CUDNN_STATUS_INTERNAL_ERROR, "too many operations");
        return;
    }
    g->ops[g->op_count++] = op;
}

/* y = mode(x[, b[, t]]); axis >= 0 for GEN_INDEX. */
static void graph_pointwise(graph_builder *g, cudnnPointwiseMode_t mode, cudnnDataType_t compute,
                            const graph_tensor *x, const graph_tensor *b, const graph_tensor *t,
                            const graph_tensor *y, int64_t axis) {
    cudnnBackendDescriptor_t pw = graph_create(g, CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "pointwise");
    GRAPH_SET(g, pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    GRAPH_SET(g, pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &compute);
    if (axis >= 0) GRAPH_SET(g, pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    graph_finalize(g, pw, "pointwise");
    cudnnBackendDescriptor_t op = graph_create(g, CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "pointwise op");
    float one = 1.0f;
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &pw);
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x->desc);
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y->desc);
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one);
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one);
    if (b) GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b->desc);
    if (t) GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &t->desc);
    graph_finalize(g, op, "pointwise op");
    graph_add_op(g, op);
}

/* c = a b (batched over the first two dimensions), with optional M, N, K overrides. */
static void graph_matmul(graph_builder *g, const graph_tensor *a, const graph_tensor *b, const graph_tensor *c,
                         const graph_tensor *m_override, const graph_tensor *n_override,
                         const graph_tensor *k_override) {
    cudnnBackendDescriptor_t mm = graph_create(g, CUDNN_BACKEND_MATMUL_DESCRIPTOR, "matmul");
    cudnnDataType_t compute = CUDNN_DATA_FLOAT;
    double padding = 0.0;
    GRAPH_SET(g, mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &compute);
    GRAPH_SET(g, mm, CUDNN_ATTR_MATMUL_PADDING_VALUE, CUDNN_TYPE_DOUBLE, 1, &padding);
    graph_finalize(g, mm, "matmul");
    cudnnBackendDescriptor_t op = graph_create(g, CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "matmul op");
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &a->desc);
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b->desc);
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &c->desc);
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_MATMUL_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &mm);
    if (m_override)
        GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                  &m_override->desc);
    if (n_override)
        GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                  &n_override->desc);
    if (k_override)
        GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                  &k_override->desc);
    graph_finalize(g, op, "matmul op");
    graph_add_op(g, op);
}

static void graph_reduction(graph_builder *g, cudnnReduceTensorOp_t mode, const graph_tensor *x,
                            const graph_tensor *y) {
    cudnnBackendDescriptor_t red = graph_create(g, CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "reduction");
    cudnnDataType_t compute = CUDNN_DATA_FLOAT;
    GRAPH_SET(g, red, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode);
    GRAPH_SET(g, red, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &compute);
    graph_finalize(g, red, "reduction");
    cudnnBackendDescriptor_t op = graph_create(g, CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "reduction op");
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x->desc);
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y->desc);
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &red);
    graph_finalize(g, op, "reduction op");
    graph_add_op(g, op);
}

static void graph_reshape(graph_builder *g, const graph_tensor *x, const graph_tensor *y) {
    cudnnBackendDescriptor_t op = graph_create(g, CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, "reshape op");
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x->desc);
    GRAPH_SET(g, op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y->desc);
    graph_finalize(g, op, "reshape op");
    graph_add_op(g, op);
}

/* scores masked outside (row < seq_q && col < seq_kv), as the frontend's padding_mask. */
static graph_tensor graph_padding_mask(graph_builder *g, const graph_tensor *scores, const graph_tensor *seq_q,
                                       const graph_tensor *seq_kv, const graph_tensor *negative_infinity) {
    graph_tensor row = graph_virtual_like(g, CUDNN_DATA_INT32, scores);
    graph_pointwise(g, CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, scores, NULL, NULL, &row, 2);
    graph_tensor col = graph_virtual_like(g, CUDNN_DATA_INT32, scores);
    graph_pointwise(g, CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, scores, NULL, NULL, &col, 3);
    graph_tensor row_ok = graph_virtual_like(g, CUDNN_DATA_BOOLEAN, &row);
    graph_pointwise(g, CUDNN_POINTWISE_CMP_LT, CUDNN_DATA_BOOLEAN, &row, seq_q, NULL, &row_ok, -1);
    graph_tensor col_ok = graph_virtual_like(g, CUDNN_DATA_BOOLEAN, &col);
    graph_pointwise(g, CUDNN_POINTWISE_CMP_LT, CUDNN_DATA_BOOLEAN, &col, seq_kv, NULL, &col_ok, -1);
    graph_tensor keep = graph_virtual_like(g, CUDNN_DATA_BOOLEAN, &row_ok);
    graph_pointwise(g, CUDNN_POINTWISE_LOGICAL_AND, CUDNN_DATA_BOOLEAN, &row_ok, &col_ok, NULL, &keep, -1);
    graph_tensor masked = graph_virtual_like(g, CUDNN_DATA_FLOAT, scores);
    graph_pointwise(g, CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, scores, negative_infinity, &keep, &masked,
                    -1);
    return masked;
}

/* Operation graph -> heuristics (mode A, then fallback) -> every engine config that finalizes
 * into an execution plan, in the heuristics' order, up to MAX_PLAN_CANDIDATES (the first run of a
 * shape times them: execute_plan). The plans are not in g->created: the caller keeps them.
 * Returns how many; 0 with g->why when none. */
static int graph_build_plans(graph_builder *g, cudnnBackendDescriptor_t *candidates, int64_t *workspace_bytes) {
    if (g->failed) return 0;
    int found = 0;
    cudnnBackendDescriptor_t graph = graph_create(g, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "operation graph");
    GRAPH_SET(g, graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &cuda_ctx.cudnn);
    GRAPH_SET(g, graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, g->op_count, g->ops);
    graph_finalize(g, graph, "operation graph");
    char tried[512] = "";
    cudnnBackendHeurMode_t modes[2] = {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK};
    for (int mode_index = 0; mode_index < 2 && !g->failed && found < MAX_PLAN_CANDIDATES; mode_index++) {
        cudnnBackendDescriptor_t heuristics = graph_create(g, CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "heuristics");
        GRAPH_SET(g, heuristics, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph);
        GRAPH_SET(g, heuristics, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &modes[mode_index]);
        graph_finalize(g, heuristics, "heuristics");
        if (g->failed) return 0;
        int64_t count = 0;
        cudnnStatus_t status = cudnnBackendGetAttribute(heuristics, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                        CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, NULL);
        if (status != CUDNN_STATUS_SUCCESS) {
            graph_fail(g, status, "cudnnBackendGetAttribute(CUDNN_ATTR_ENGINEHEUR_RESULTS count)");
            return 0;
        }
        if (count > 16) count = 16;
        cudnnBackendDescriptor_t configs[16];
        for (int64_t i = 0; i < count; i++)
            configs[i] = graph_create(g, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "engine config");
        if (g->failed) return 0;
        int64_t returned = 0;
        if (count > 0) {
            status = cudnnBackendGetAttribute(heuristics, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                              count, &returned, configs);
            if (status != CUDNN_STATUS_SUCCESS) {
                graph_fail(g, status, "cudnnBackendGetAttribute(CUDNN_ATTR_ENGINEHEUR_RESULTS)");
                return 0;
            }
        }
        for (int64_t i = 0; i < returned && found < MAX_PLAN_CANDIDATES; i++) {
            cudnnBackendDescriptor_t plan = NULL;
            status = cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan);
            if (status != CUDNN_STATUS_SUCCESS) {
                graph_fail(g, status, "cudnnBackendCreateDescriptor(execution plan)");
                return 0;
            }
            status = cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1,
                                              &cuda_ctx.cudnn);
            if (status == CUDNN_STATUS_SUCCESS)
                status = cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
                                                  CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &configs[i]);
            if (status == CUDNN_STATUS_SUCCESS) status = cudnnBackendFinalize(plan);
            int64_t returned_count = 0;
            if (status == CUDNN_STATUS_SUCCESS)
                status = cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1,
                                                  &returned_count, &workspace_bytes[found]);
            if (status == CUDNN_STATUS_SUCCESS) {
                candidates[found++] = plan;
                continue;
            }
            char last[160] = "";
            cudnnGetLastErrorString(last, sizeof last);
            size_t used = strlen(tried);
            snprintf(tried + used, sizeof tried - used, "%s[heuristic %s config %lld: %s%s%s]", used ? " " : "",
                     mode_index == 0 ? "A" : "fallback", (long long)i, cudnnGetErrorString(status),
                     last[0] ? " " : "", last);
            cudnnBackendDestroyDescriptor(plan);
        }
    }
    if (found == 0)
        graph_fail(g, CUDNN_STATUS_NOT_SUPPORTED, "no engine config finalizes into an execution plan %s",
                   tried[0] ? tried : "(the heuristics returned none)");
    return found;
}

/* ---- the plans, one per (shape, direction) ---- */
enum {
    UID_Q = 1,
    UID_K,
    UID_V,
    UID_O,
    UID_STATS,
    UID_SEQ_Q,
    UID_SEQ_KV,
    UID_SCALE,
    UID_NEG_INF,
    UID_DO,
    UID_DQ,
    UID_DK,
    UID_DV,
    UID_ONE,
    UID_SOFTMAX_SUM,
    UID_DQ_ACCUM,
    UID_NEG_INF_SECOND,
    UID_FIRST_VIRTUAL = 1000
};

typedef struct {
    int batch, tokens, heads, head_dim;
    bool backward;
    bool padded; /* the graph has the sequence lengths and the padding mask */
    bool usable;
    char why[1024];
    cudnnBackendDescriptor_t plan; /* the one run: the fastest candidate once tuned */
    int64_t workspace_bytes;
    /* Engine configs still to time (none once timed or when there is only one). */
    cudnnBackendDescriptor_t candidates[MAX_PLAN_CANDIDATES];
    int64_t candidate_workspace[MAX_PLAN_CANDIDATES];
    int candidate_count;
    bool second_mask; /* the 9.0-9.9 backward workaround is in the graph */
    bool dq_direct;   /* backward writes dQ from the matmul (no fp32 accumulator tensor) */
    graph_builder *builder; /* the descriptors the plan was made from, kept alive with it */
    /* Scalars passed by value: their addresses go into the variant pack, so they live here. */
    float scale, negative_infinity, one;
} cudnn_plan;

static cudnn_plan plans[MAX_CUDNN_PLANS];
static int plan_count;

/* Device memory shared by all plans, grown when a larger shape is seen (at warm-up). */
static struct {
    void *workspace;
    size_t workspace_bytes;
    int *seq_lens; /* [batch], all = tokens, for the shape last filled */
    int seq_batch, seq_tokens, seq_capacity;
    float *softmax_sum, *dq_accum;
    size_t softmax_sum_count, dq_accum_count;
} shared;

static bool grow(void **buffer, size_t *capacity, size_t needed, const char *what) {
    if (needed <= *capacity) return true;
    if (*buffer) CUDA_CHECK(cudaFree(*buffer), "%s", what);
    *buffer = NULL;
    *capacity = 0;
    if (!CUDA_CHECK(cudaMalloc(buffer, needed), "cuDNN attention %s of %zu bytes", what, needed)) return false;
    *capacity = needed;
    return true;
}

/* The int32 sequence lengths [batch] (all = tokens) for the padding mask. */
static int *sequence_lengths(int batch, int tokens) {
    if (shared.seq_batch == batch && shared.seq_tokens == tokens) return shared.seq_lens;
    size_t capacity = (size_t)shared.seq_capacity * sizeof(int);
    if (!grow((void **)&shared.seq_lens, &capacity, (size_t)batch * sizeof(int), "sequence lengths")) return NULL;
    shared.seq_capacity = (int)(capacity / sizeof(int));
    int *host = (int *)cuda_ctx.staging; /* free between synchronous uses */
    for (int b = 0; b < batch; b++) host[b] = tokens;
    if (!CUDA_CHECK(cudaMemcpyAsync(shared.seq_lens, host, (size_t)batch * sizeof(int), cudaMemcpyHostToDevice,
                                    cuda_ctx.stream),
                    "cuDNN attention sequence lengths batch %d", batch) ||
        !CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream), "cuDNN attention sequence lengths batch %d", batch))
        return NULL;
    shared.seq_batch = batch;
    shared.seq_tokens = tokens;
    return shared.seq_lens;
}

/* Q, K, V, O and their gradients: [b, h, s, d] views of [b * s, h * d]. */
static void bshd_strides(int64_t strides[4], int tokens, int heads, int head_dim) {
    set_dims(strides, (int64_t)tokens * heads * head_dim, head_dim, (int64_t)heads * head_dim, 1);
}

/* K^T (or V^T): [b, h, d, s] views of the same memory. */
static void bshd_transposed_strides(int64_t strides[4], int tokens, int heads, int head_dim) {
    set_dims(strides, (int64_t)tokens * heads * head_dim, head_dim, 1, (int64_t)heads * head_dim);
}

static void build_forward(graph_builder *g, cudnn_plan *p) {
    int64_t b = p->batch, h = p->heads, s = p->tokens, d = p->head_dim;
    int64_t dims[4], strides[4], dims_t[4], strides_t[4];
    set_dims(dims, b, h, s, d);
    bshd_strides(strides, p->tokens, p->heads, p->head_dim);
    set_dims(dims_t, b, h, d, s);
    bshd_transposed_strides(strides_t, p->tokens, p->heads, p->head_dim);
    int64_t score_dims[4], score_strides[4], row_dims[4], row_strides[4], seq_dims[4], ones[4];
    set_dims(score_dims, b, h, s, s);
    set_dims(score_strides, h * s * s, s * s, s, 1);
    set_dims(row_dims, b, h, s, 1);
    set_dims(row_strides, h * s, s, 1, 1);
    set_dims(seq_dims, b, 1, 1, 1);
    set_dims(ones, 1, 1, 1, 1);

    graph_tensor q = graph_tensor_make(g, UID_Q, CUDNN_DATA_BFLOAT16, dims, strides, false);
    graph_tensor kt = graph_tensor_make(g, UID_K, CUDNN_DATA_BFLOAT16, dims_t, strides_t, false);
    graph_tensor v = graph_tensor_make(g, UID_V, CUDNN_DATA_BFLOAT16, dims, strides, false);
    graph_tensor o = graph_tensor_make(g, UID_O, CUDNN_DATA_BFLOAT16, dims, strides, false);
    graph_tensor stats = graph_tensor_make(g, UID_STATS, CUDNN_DATA_FLOAT, row_dims, row_strides, false);
    graph_tensor scale = graph_scalar(g, UID_SCALE, CUDNN_DATA_FLOAT);
    graph_tensor seq_q = {}, seq_kv = {};
    if (p->padded) {
        seq_q = graph_tensor_make(g, UID_SEQ_Q, CUDNN_DATA_INT32, seq_dims, ones, false);
        seq_kv = graph_tensor_make(g, UID_SEQ_KV, CUDNN_DATA_INT32, seq_dims, ones, false);
    }
    const graph_tensor *lengths_q = p->padded ? &seq_q : NULL, *lengths_kv = p->padded ? &seq_kv : NULL;

    graph_tensor scores = graph_virtual(g, CUDNN_DATA_FLOAT, score_dims, score_strides);
    graph_matmul(g, &q, &kt, &scores, lengths_q, lengths_kv, NULL);
    graph_tensor scaled = graph_virtual_like(g, CUDNN_DATA_FLOAT, &scores);
    graph_pointwise(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, &scores, &scale, NULL, &scaled, -1);
    graph_tensor masked = scaled;
    if (p->padded) {
        graph_tensor negative_infinity = graph_scalar(g, UID_NEG_INF, CUDNN_DATA_FLOAT);
        masked = graph_padding_mask(g, &scaled, &seq_q, &seq_kv, &negative_infinity);
    }

    /* softmax with statistics */
    graph_tensor row_max = graph_virtual(g, CUDNN_DATA_FLOAT, row_dims, row_strides);
    graph_reduction(g, CUDNN_REDUCE_TENSOR_MAX, &masked, &row_max);
    graph_tensor shifted = graph_virtual_like(g, CUDNN_DATA_FLOAT, &masked);
    graph_pointwise(g, CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, &masked, &row_max, NULL, &shifted, -1);
    graph_tensor exponentials = graph_virtual_like(g, CUDNN_DATA_FLOAT, &shifted);
    graph_pointwise(g, CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, &shifted, NULL, NULL, &exponentials, -1);
    graph_tensor row_sum = graph_virtual(g, CUDNN_DATA_FLOAT, row_dims, row_strides);
    graph_reduction(g, CUDNN_REDUCE_TENSOR_ADD, &exponentials, &row_sum);
    graph_tensor log_sum = graph_virtual(g, CUDNN_DATA_FLOAT, row_dims, row_strides);
    graph_pointwise(g, CUDNN_POINTWISE_LOG, CUDNN_DATA_FLOAT, &row_sum, NULL, NULL, &log_sum, -1);
    graph_pointwise(g, CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, &row_max, &log_sum, NULL, &stats, -1);
    /* The probabilities enter the second matmul in the input type (bf16), as cuDNN requires. */
    graph_tensor probabilities = graph_virtual_like(g, CUDNN_DATA_BFLOAT16, &exponentials);
    graph_pointwise(g, CUDNN_POINTWISE_DIV, CUDNN_DATA_FLOAT, &exponentials, &row_sum, NULL, &probabilities, -1);

    graph_matmul(g, &probabilities, &v, &o, lengths_q, NULL, lengths_kv);
}

static void build_backward(graph_builder *g, cudnn_plan *p) {
    int64_t b = p->batch, h = p->heads, s = p->tokens, d = p->head_dim;
    int64_t dims[4], strides[4], dims_t[4], strides_t[4];
    set_dims(dims, b, h, s, d);
    bshd_strides(strides, p->tokens, p->heads, p->head_dim);
    set_dims(dims_t, b, h, d, s);
    bshd_transposed_strides(strides_t, p->tokens, p->heads, p->head_dim);
    int64_t score_dims[4], score_strides[4], transposed_score_strides[4], row_dims[4], row_strides[4];
    int64_t seq_dims[4], ones[4], accum_strides[4], product_strides[4];
    set_dims(score_dims, b, h, s, s);
    set_dims(score_strides, h * s * s, s * s, s, 1);
    set_dims(transposed_score_strides, h * s * s, s * s, 1, s);
    set_dims(row_dims, b, h, s, 1);
    set_dims(row_strides, h * s, s, 1, 1);
    set_dims(seq_dims, b, 1, 1, 1);
    set_dims(ones, 1, 1, 1, 1);
    set_dims(accum_strides, h * s * d, s * d, d, 1);
    set_dims(product_strides, h * s * d, s * d, h * d, 1); /* the frontend's strides for dO * O */

    graph_tensor q = graph_tensor_make(g, UID_Q, CUDNN_DATA_BFLOAT16, dims, strides, false);
    graph_tensor kt = graph_tensor_make(g, UID_K, CUDNN_DATA_BFLOAT16, dims_t, strides_t, false);
    graph_tensor vt = graph_tensor_make(g, UID_V, CUDNN_DATA_BFLOAT16, dims_t, strides_t, false);
    graph_tensor o = graph_tensor_make(g, UID_O, CUDNN_DATA_BFLOAT16, dims, strides, false);
    graph_tensor d_o = graph_tensor_make(g, UID_DO, CUDNN_DATA_BFLOAT16, dims, strides, false);
    graph_tensor stats = graph_tensor_make(g, UID_STATS, CUDNN_DATA_FLOAT, row_dims, row_strides, false);
    graph_tensor dq = graph_tensor_make(g, UID_DQ, CUDNN_DATA_BFLOAT16, dims, strides, false);
    graph_tensor dk = graph_tensor_make(g, UID_DK, CUDNN_DATA_BFLOAT16, dims, strides, false);
    graph_tensor dv = graph_tensor_make(g, UID_DV, CUDNN_DATA_BFLOAT16, dims, strides, false);
    graph_tensor seq_q = graph_tensor_make(g, UID_SEQ_Q, CUDNN_DATA_INT32, seq_dims, ones, false);
    graph_tensor seq_kv = graph_tensor_make(g, UID_SEQ_KV, CUDNN_DATA_INT32, seq_dims, ones, false);
    graph_tensor scale = graph_scalar(g, UID_SCALE, CUDNN_DATA_FLOAT);
    graph_tensor negative_infinity = graph_scalar(g, UID_NEG_INF, CUDNN_DATA_FLOAT);
    graph_tensor one = graph_scalar(g, UID_ONE, CUDNN_DATA_FLOAT);

    /* softmax_sum = sum_d dO * O (times 1: the frontend's dropout-free graph keeps the multiply) */
    graph_tensor product = graph_virtual(g, CUDNN_DATA_FLOAT, dims, product_strides);
    graph_pointwise(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, &d_o, &o, NULL, &product, -1);
    graph_tensor product_sum = graph_virtual(g, CUDNN_DATA_FLOAT, row_dims, row_strides);
    graph_reduction(g, CUDNN_REDUCE_TENSOR_ADD, &product, &product_sum);
    graph_tensor softmax_sum = graph_tensor_make(g, UID_SOFTMAX_SUM, CUDNN_DATA_FLOAT, row_dims, row_strides, false);
    graph_pointwise(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, &product_sum, &one, NULL, &softmax_sum, -1);

    /* P recomputed from the statistics */
    graph_tensor scores = graph_virtual(g, CUDNN_DATA_FLOAT, score_dims, score_strides);
    graph_matmul(g, &q, &kt, &scores, &seq_q, &seq_kv, NULL);
    graph_tensor scaled = graph_virtual_like(g, CUDNN_DATA_FLOAT, &scores);
    graph_pointwise(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, &scores, &scale, NULL, &scaled, -1);
    graph_tensor masked = graph_padding_mask(g, &scaled, &seq_q, &seq_kv, &negative_infinity);
    graph_tensor shifted = graph_virtual_like(g, CUDNN_DATA_FLOAT, &masked);
    graph_pointwise(g, CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, &masked, &stats, NULL, &shifted, -1);
    if (p->second_mask) {
        graph_tensor negative_infinity_second = graph_scalar(g, UID_NEG_INF_SECOND, CUDNN_DATA_FLOAT);
        shifted = graph_padding_mask(g, &shifted, &seq_q, &seq_kv, &negative_infinity_second);
    }
    graph_tensor probabilities = graph_virtual_like(g, CUDNN_DATA_FLOAT, &shifted);
    graph_pointwise(g, CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, &shifted, NULL, NULL, &probabilities, -1);

    /* dV = P^T dO */
    int64_t transposed_dims[4];
    set_dims(transposed_dims, b, h, s, s);
    graph_tensor probabilities_t = graph_virtual(g, CUDNN_DATA_BFLOAT16, transposed_dims, transposed_score_strides);
    graph_reshape(g, &probabilities, &probabilities_t);
    graph_matmul(g, &probabilities_t, &d_o, &dv, &seq_kv, NULL, &seq_q);

    /* dS = (dO V^T - softmax_sum) P scale */
    graph_tensor dp = graph_virtual(g, CUDNN_DATA_FLOAT, score_dims, score_strides);
    graph_matmul(g, &d_o, &vt, &dp, &seq_q, &seq_kv, NULL);
    graph_tensor centred = graph_virtual_like(g, CUDNN_DATA_FLOAT, &dp);
    graph_pointwise(g, CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, &dp, &softmax_sum, NULL, &centred, -1);
    graph_tensor weighted = graph_virtual_like(g, CUDNN_DATA_FLOAT, &centred);
    graph_pointwise(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, &centred, &probabilities, NULL, &weighted, -1);
    graph_tensor ds = graph_virtual_like(g, CUDNN_DATA_FLOAT, &weighted);
    graph_pointwise(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, &weighted, &scale, NULL, &ds, -1);

    /* dK = dS^T Q */
    graph_tensor ds_t = graph_virtual(g, CUDNN_DATA_BFLOAT16, transposed_dims, transposed_score_strides);
    graph_reshape(g, &ds, &ds_t);
    graph_matmul(g, &ds_t, &q, &dk, &seq_kv, NULL, &seq_q);

    /* dQ = dS K, through an fp32 accumulator (the frontend's default) or, in the variant that
     * the frontend uses for deterministic backward, straight into dQ */
    graph_tensor k = graph_virtual(g, CUDNN_DATA_FLOAT, dims, strides);
    graph_reshape(g, &kt, &k);
    if (p->dq_direct) {
        graph_matmul(g, &ds, &k, &dq, &seq_q, NULL, &seq_kv);
        return;
    }
    graph_tensor dq_accum = graph_tensor_make(g, UID_DQ_ACCUM, CUDNN_DATA_FLOAT, dims, accum_strides, false);
    graph_matmul(g, &ds, &k, &dq_accum, &seq_q, NULL, &seq_kv);
    graph_pointwise(g, CUDNN_POINTWISE_IDENTITY, CUDNN_DATA_FLOAT, &dq_accum, NULL, NULL, &dq, -1);
}

/* Keeps p->plan, destroys the other candidates. */
static void drop_other_candidates(cudnn_plan *p) {
    for (int i = 0; i < p->candidate_count; i++)
        if (p->candidates[i] != p->plan) cudnnBackendDestroyDescriptor(p->candidates[i]);
    p->candidate_count = 0;
}

/* The plan for a shape and direction: found, or built now (once). */
static cudnn_plan *find_plan(int batch, int tokens, int heads, int head_dim, bool backward) {
    for (int i = 0; i < plan_count; i++) {
        cudnn_plan *p = &plans[i];
        if (p->batch == batch && p->tokens == tokens && p->heads == heads && p->head_dim == head_dim &&
            p->backward == backward)
            return p;
    }
    if (plan_count == MAX_CUDNN_PLANS) return NULL;
    cudnn_plan *p = &plans[plan_count++];
    memset(p, 0, sizeof *p);
    p->batch = batch;
    p->tokens = tokens;
    p->heads = heads;
    p->head_dim = head_dim;
    p->backward = backward;
    p->scale = 1.0f / sqrtf((float)head_dim);
    size_t version = cuda_ctx.cudnn_version;
    p->negative_infinity = version < 91000 ? -3.402823466e38f : -INFINITY; /* older cuDNN prefers lowest */
    p->one = 1.0f;
    p->second_mask = backward && version >= 90000 && version < 91000;

    if (head_dim % 8 != 0 || head_dim > 256) {
        snprintf(p->why, sizeof p->why, "cuDNN fused attention needs head_dim a multiple of 8 and <= 256 (got %d)",
                 head_dim);
    } else {
        /* Backward tries the frontend's default graph, then its deterministic variant; forward
         * tries the graph without the padding mask, then the one with it. */
        for (int variant = 0; variant < 2 && !p->usable; variant++) {
            graph_builder *g = (graph_builder *)calloc(1, sizeof *g);
            if (!g) {
                snprintf(p->why, sizeof p->why, "out of host memory");
                break;
            }
            g->next_virtual_uid = UID_FIRST_VIRTUAL;
            p->dq_direct = backward && variant == 1;
            p->padded = backward || variant == 1;
            if (backward)
                build_backward(g, p);
            else
                build_forward(g, p);
            p->candidate_count = graph_build_plans(g, p->candidates, p->candidate_workspace);
            if (p->candidate_count > 0) {
                p->plan = p->candidates[0];
                p->workspace_bytes = p->candidate_workspace[0];
                p->usable = true;
                /* Before 9.6 backward's dQ accumulator is zeroed by the caller before each run, so
                 * repeated runs would not give the same dQ: that backward keeps the first config. */
                if (p->candidate_count == 1 || (backward && !p->dq_direct && version < 90600))
                    drop_other_candidates(p);
                p->builder = g;
            } else {
                size_t used = strlen(p->why);
                snprintf(p->why + used, sizeof p->why - used, "%s%s%s", used ? "; " : "",
                         backward ? (variant == 0 ? "with dQ accumulator: " : "dQ direct: ")
                                  : (variant == 0 ? "without padding mask: " : "with padding mask: "),
                         g->why);
                graph_destroy_all(g);
                free(g);
            }
        }
    }
    if (!p->usable)
        tf_log("cuDNN attention %s not available for batch %d tokens %d heads %d head_dim %d: %s; using own "
               "kernels",
               backward ? "backward" : "forward", batch, tokens, heads, head_dim, p->why);
    return p;
}

typedef struct {
    int64_t uids[16];
    void *pointers[16];
    int count;
} variant_entries;

static void add_entry(variant_entries *entries, int64_t uid, const void *pointer) {
    entries->uids[entries->count] = uid;
    entries->pointers[entries->count] = (void *)pointer;
    entries->count++;
}

/* Runs `plan` on the variant pack's pointers; on failure *step names the call that failed. */
static cudnnStatus_t run_plan(cudnnBackendDescriptor_t plan, variant_entries *entries, const char **step) {
    cudnnBackendDescriptor_t pack = NULL;
    cudnnStatus_t status = cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack);
    void *workspace = shared.workspace;
    *step = "cudnnBackendCreateDescriptor(variant pack)";
    if (status == CUDNN_STATUS_SUCCESS) {
        *step = "CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS";
        status = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, entries->count,
                                          entries->uids);
    }
    if (status == CUDNN_STATUS_SUCCESS) {
        *step = "CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS";
        status = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                                          entries->count, entries->pointers);
    }
    if (status == CUDNN_STATUS_SUCCESS) {
        *step = "CUDNN_ATTR_VARIANT_PACK_WORKSPACE";
        status = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace);
    }
    if (status == CUDNN_STATUS_SUCCESS) {
        *step = "cudnnBackendFinalize(variant pack)";
        status = cudnnBackendFinalize(pack);
    }
    if (status == CUDNN_STATUS_SUCCESS) {
        *step = "cudnnBackendExecute";
        status = cudnnBackendExecute(cuda_ctx.cudnn, plan, pack);
    }
    if (pack) cudnnBackendDestroyDescriptor(pack);
    return status;
}

/* The first run of a shape times every engine config that finalized, on this call's own
 * buffers (a run only writes the call's outputs, so repeating it is harmless), and keeps the
 * fastest; the heuristics' first choice is not always it. Failing to time keeps the first. */
static void tune_plan(cudnn_plan *p, variant_entries *entries) {
    int fastest = fastest_candidate(p->candidate_count, PLAN_TIMED_RUNS, [&](int i) {
        const char *step;
        return run_plan(p->candidates[i], entries, &step) == CUDNN_STATUS_SUCCESS;
    });
    if (fastest >= 0) {
        p->plan = p->candidates[fastest];
        p->workspace_bytes = p->candidate_workspace[fastest];
    }
    drop_other_candidates(p);
}

/* Runs a plan; false (with the reason, and the plan marked unusable) when cuDNN refuses. */
static bool execute_plan(cudnn_plan *p, variant_entries *entries) {
    if (p->candidate_count > 0) {
        int64_t most = 0;
        for (int i = 0; i < p->candidate_count; i++)
            if (p->candidate_workspace[i] > most) most = p->candidate_workspace[i];
        if (!grow(&shared.workspace, &shared.workspace_bytes, (size_t)most, "workspace")) return false;
        tune_plan(p, entries);
    }
    if (!grow(&shared.workspace, &shared.workspace_bytes, (size_t)p->workspace_bytes, "workspace")) return false;
    const char *step;
    cudnnStatus_t status = run_plan(p->plan, entries, &step);
    if (status == CUDNN_STATUS_SUCCESS) {
        if (cuda_ctx.debug_sync)
            LAUNCH_CHECK("cuDNN attention", "%s batch %d tokens %d heads %d head_dim %d",
                         p->backward ? "backward" : "forward", p->batch, p->tokens, p->heads, p->head_dim);
        return true;
    }
    char last[256] = "";
    cudnnGetLastErrorString(last, sizeof last);
    snprintf(p->why, sizeof p->why, "%s: %s%s%s", step, cudnnGetErrorString(status), last[0] ? ": " : "", last);
    p->usable = false;
    tf_log("cuDNN attention %s failed to run for batch %d tokens %d heads %d head_dim %d: %s; using own kernels",
           p->backward ? "backward" : "forward", p->batch, p->tokens, p->heads, p->head_dim, p->why);
    return false;
}

static bool refuse(const cudnn_plan *p, char *why, size_t why_size) {
    snprintf(why, why_size, "%s", p ? p->why : "too many attention shapes for the cuDNN plan cache");
    return false;
}

extern "C" bool cudnn_attention_forward(void *out, void *lse, const void *q, const void *k, const void *v, int batch,
                                        int tokens, int heads, int head_dim, char *why, size_t why_size) {
    if (!cuda_ctx.cudnn) return refuse(NULL, why, why_size);
    cudnn_plan *p = find_plan(batch, tokens, heads, head_dim, false);
    if (!p || !p->usable) return refuse(p, why, why_size);
    variant_entries entries = {};
    add_entry(&entries, UID_Q, q);
    add_entry(&entries, UID_K, k);
    add_entry(&entries, UID_V, v);
    add_entry(&entries, UID_O, out);
    add_entry(&entries, UID_STATS, lse);
    add_entry(&entries, UID_SCALE, &p->scale);
    if (p->padded) {
        int *seq = sequence_lengths(batch, tokens);
        if (!seq) return refuse(p, why, why_size);
        add_entry(&entries, UID_SEQ_Q, seq);
        add_entry(&entries, UID_SEQ_KV, seq);
        add_entry(&entries, UID_NEG_INF, &p->negative_infinity);
    }
    if (!execute_plan(p, &entries)) return refuse(p, why, why_size);
    return true;
}

extern "C" bool cudnn_attention_backward(void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                                         const void *v, const void *out, const void *lse, int batch, int tokens,
                                         int heads, int head_dim, char *why, size_t why_size) {
    if (!cuda_ctx.cudnn) return refuse(NULL, why, why_size);
    cudnn_plan *p = find_plan(batch, tokens, heads, head_dim, true);
    if (!p || !p->usable) return refuse(p, why, why_size);
    int *seq = sequence_lengths(batch, tokens);
    size_t rows = (size_t)batch * heads * tokens;
    size_t sum_bytes = shared.softmax_sum_count * sizeof(float), accum_bytes = shared.dq_accum_count * sizeof(float);
    size_t accum_needed = p->dq_direct ? 0 : rows * head_dim * sizeof(float);
    if (!seq || !grow((void **)&shared.softmax_sum, &sum_bytes, rows * sizeof(float), "softmax_sum") ||
        !grow((void **)&shared.dq_accum, &accum_bytes, accum_needed, "dQ accumulator"))
        return refuse(p, why, why_size);
    shared.softmax_sum_count = sum_bytes / sizeof(float);
    shared.dq_accum_count = accum_bytes / sizeof(float);
    /* cuDNN before 9.6 expects the dQ accumulator zeroed by the caller. */
    if (!p->dq_direct && cuda_ctx.cudnn_version < 90600)
        CUDA_CHECK(cudaMemsetAsync(shared.dq_accum, 0, rows * head_dim * sizeof(float), cuda_ctx.stream),
                   "cuDNN attention dQ accumulator");
    variant_entries entries = {};
    add_entry(&entries, UID_Q, q);
    add_entry(&entries, UID_K, k);
    add_entry(&entries, UID_V, v);
    add_entry(&entries, UID_O, out);
    add_entry(&entries, UID_DO, dout);
    add_entry(&entries, UID_STATS, lse);
    add_entry(&entries, UID_DQ, dq);
    add_entry(&entries, UID_DK, dk);
    add_entry(&entries, UID_DV, dv);
    add_entry(&entries, UID_SEQ_Q, seq);
    add_entry(&entries, UID_SEQ_KV, seq);
    add_entry(&entries, UID_SCALE, &p->scale);
    add_entry(&entries, UID_NEG_INF, &p->negative_infinity);
    add_entry(&entries, UID_ONE, &p->one);
    add_entry(&entries, UID_SOFTMAX_SUM, shared.softmax_sum);
    if (!p->dq_direct) add_entry(&entries, UID_DQ_ACCUM, shared.dq_accum);
    if (p->second_mask) add_entry(&entries, UID_NEG_INF_SECOND, &p->negative_infinity);
    if (!execute_plan(p, &entries)) return refuse(p, why, why_size);
    return true;
}
