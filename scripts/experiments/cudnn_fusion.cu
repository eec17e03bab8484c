/* Can a library GEMM write the Pattention's S directly? docs/performance.md ("A route through the
 * libraries") costs it: with the row norms known beforehand (from a Cholesky factor of Kc^T Kc),
 * the scores GEMM would only need tau / r per row and the erf GELU in its epilogue. cuBLASLt's
 * GELU epilogue is the tanh approximation, so this asks cuDNN's graph API, on the B/16 inference
 * shapes (100864 rows, K 768), against cuBLASLt's fastest of its top 8 in the same process:
 *
 *   plain     S = X W (bf16 out): cuDNN's matmul alone
 *   scaled    S = GELU_erf((X W) * scale[row]): the fused form the route needs
 *   sumsq     r2[row] = sum_n (X W)^2: the row norms from a GEMM's epilogue, S never written
 *
 * Every engine config the heuristics (modes A, B, fallback) offer that finalizes is timed; a
 * sample of S is checked against the host. Random bf16 operands (x uniform in [-0.5, 0.5),
 * weights in [-0.01, 0.01)).
 *
 * nvcc -O3 -arch=sm_90 -std=c++17 cudnn_fusion.cu -lcudnn -lcublasLt -o cudnn_fusion && ./cudnn_fusion */
#include <cublasLt.h>
#include <cudnn.h>
#include <cuda_bf16.h>
#include <cmath>
#include <cstring>
#include <vector>

#include "experiments.cuh"

static const int64_t ROWS = 100864, D = 768;
static const size_t WORKSPACE = (size_t)256 << 20;
static cudnnHandle_t handle;
static void *workspace;

#define CD(x)                                                                                                      \
    do {                                                                                                           \
        cudnnStatus_t s_ = (x);                                                                                    \
        if (s_ != CUDNN_STATUS_SUCCESS) {                                                                          \
            char last_[512];                                                                                       \
            cudnnGetLastErrorString(last_, sizeof last_);                                                          \
            printf("cuDNN %s at %s:%d: %s\n", cudnnGetErrorString(s_), __FILE__, __LINE__, last_);                 \
            return false;                                                                                          \
        }                                                                                                          \
    } while (0)

static cudnnBackendDescriptor_t make(cudnnBackendDescriptorType_t type) {
    cudnnBackendDescriptor_t d = NULL;
    if (cudnnBackendCreateDescriptor(type, &d) != CUDNN_STATUS_SUCCESS) printf("create %d failed\n", (int)type);
    return d;
}

static bool tensor(cudnnBackendDescriptor_t *t, int64_t uid, cudnnDataType_t type, int64_t m, int64_t n,
                   const int64_t strides[3], bool is_virtual) {
    int64_t dims[3] = {1, m, n}, alignment = 16;
    *t = make(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    CD(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type));
    CD(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 3, dims));
    CD(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 3, strides));
    CD(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid));
    CD(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment));
    CD(cudnnBackendSetAttribute(*t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual));
    CD(cudnnBackendFinalize(*t));
    return true;
}

static bool pointwise(std::vector<cudnnBackendDescriptor_t> &ops, cudnnPointwiseMode_t mode,
                      cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t y) {
    cudnnDataType_t compute = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t pw = make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    CD(cudnnBackendSetAttribute(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode));
    CD(cudnnBackendSetAttribute(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &compute));
    CD(cudnnBackendFinalize(pw));
    cudnnBackendDescriptor_t op = make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    CD(cudnnBackendSetAttribute(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &pw));
    CD(cudnnBackendSetAttribute(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x));
    if (b) CD(cudnnBackendSetAttribute(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b));
    CD(cudnnBackendSetAttribute(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y));
    CD(cudnnBackendFinalize(op));
    ops.push_back(op);
    return true;
}

enum { UID_X = 1, UID_W, UID_SCALE, UID_S, UID_R2, UID_VIRTUAL = 100 };
enum form { PLAIN, SCALED, SUMSQ };
static const char *form_names[] = {"plain", "scaled", "sumsq"};

/* The operation graph of one form for n output columns. */
static bool build_graph(cudnnBackendDescriptor_t *graph, form f, int64_t n) {
    std::vector<cudnnBackendDescriptor_t> ops;
    int64_t x_strides[3] = {ROWS * D, D, 1}, w_strides[3] = {D * n, 1, D}, s_strides[3] = {ROWS * n, n, 1};
    int64_t row_strides[3] = {ROWS, 1, 1};
    cudnnBackendDescriptor_t x, w, c, scale, scaled, s, squared, r2;
    int64_t next_virtual = UID_VIRTUAL;
    if (!tensor(&x, UID_X, CUDNN_DATA_BFLOAT16, ROWS, D, x_strides, false)) return false;
    if (!tensor(&w, UID_W, CUDNN_DATA_BFLOAT16, D, n, w_strides, false)) return false;
    if (f == PLAIN) {
        if (!tensor(&c, UID_S, CUDNN_DATA_BFLOAT16, ROWS, n, s_strides, false)) return false;
    } else if (!tensor(&c, next_virtual++, CUDNN_DATA_FLOAT, ROWS, n, s_strides, true)) {
        return false;
    }
    cudnnDataType_t compute = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t mm = make(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    CD(cudnnBackendSetAttribute(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &compute));
    CD(cudnnBackendFinalize(mm));
    cudnnBackendDescriptor_t op = make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    CD(cudnnBackendSetAttribute(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x));
    CD(cudnnBackendSetAttribute(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &w));
    CD(cudnnBackendSetAttribute(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &c));
    CD(cudnnBackendSetAttribute(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &mm));
    CD(cudnnBackendFinalize(op));
    ops.push_back(op);
    if (f == SCALED) {
        if (!tensor(&scale, UID_SCALE, CUDNN_DATA_FLOAT, ROWS, 1, row_strides, false) ||
            !tensor(&scaled, next_virtual++, CUDNN_DATA_FLOAT, ROWS, n, s_strides, true) ||
            !tensor(&s, UID_S, CUDNN_DATA_BFLOAT16, ROWS, n, s_strides, false) ||
            !pointwise(ops, CUDNN_POINTWISE_MUL, c, scale, scaled) ||
            !pointwise(ops, CUDNN_POINTWISE_GELU_FWD, scaled, NULL, s))
            return false;
    }
    if (f == SUMSQ) {
        if (!tensor(&squared, next_virtual++, CUDNN_DATA_FLOAT, ROWS, n, s_strides, true) ||
            !tensor(&r2, UID_R2, CUDNN_DATA_FLOAT, ROWS, 1, row_strides, false) ||
            !pointwise(ops, CUDNN_POINTWISE_MUL, c, c, squared))
            return false;
        cudnnReduceTensorOp_t add = CUDNN_REDUCE_TENSOR_ADD;
        cudnnBackendDescriptor_t red = make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
        CD(cudnnBackendSetAttribute(red, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &add));
        CD(cudnnBackendSetAttribute(red, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &compute));
        CD(cudnnBackendFinalize(red));
        cudnnBackendDescriptor_t rop = make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
        CD(cudnnBackendSetAttribute(rop, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &squared));
        CD(cudnnBackendSetAttribute(rop, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &r2));
        CD(cudnnBackendSetAttribute(rop, CUDNN_ATTR_OPERATION_REDUCTION_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &red));
        CD(cudnnBackendFinalize(rop));
        ops.push_back(rop);
    }
    *graph = make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    CD(cudnnBackendSetAttribute(*graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle));
    CD(cudnnBackendSetAttribute(*graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                (int64_t)ops.size(), ops.data()));
    CD(cudnnBackendFinalize(*graph));
    return true;
}

/* Every engine config of the heuristics' modes that finalizes into a plan, with its engine index. */
static void plans_of(cudnnBackendDescriptor_t graph, std::vector<cudnnBackendDescriptor_t> &plans,
                     std::vector<int64_t> &engines) {
    cudnnBackendHeurMode_t modes[3] = {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_B, CUDNN_HEUR_MODE_FALLBACK};
    for (cudnnBackendHeurMode_t mode : modes) {
        cudnnBackendDescriptor_t heur = make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
        cudnnBackendSetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph);
        cudnnBackendSetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
        if (cudnnBackendFinalize(heur) != CUDNN_STATUS_SUCCESS) {
            char last[512];
            cudnnGetLastErrorString(last, sizeof last);
            printf("    heuristics mode %d: none (%s)\n", (int)mode, last);
            continue;
        }
        int64_t count = 0;
        cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, NULL);
        if (count > 16) count = 16;
        std::vector<cudnnBackendDescriptor_t> configs(count);
        for (auto &c : configs) c = make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
        int64_t returned = 0;
        cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &returned,
                                 configs.data());
        for (int64_t i = 0; i < returned; i++) {
            cudnnBackendDescriptor_t engine = make(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
            int64_t got = 0, index = -1;
            if (cudnnBackendGetAttribute(configs[i], CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &got,
                                         &engine) == CUDNN_STATUS_SUCCESS)
                cudnnBackendGetAttribute(engine, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &got, &index);
            cudnnBackendDescriptor_t plan = make(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
            int64_t bytes = 0;
            cudnnStatus_t st = cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
            if (st == CUDNN_STATUS_SUCCESS)
                st = cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
                                              CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &configs[i]);
            if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendFinalize(plan);
            if (st == CUDNN_STATUS_SUCCESS)
                st = cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &got,
                                              &bytes);
            if (st != CUDNN_STATUS_SUCCESS || (size_t)bytes > WORKSPACE) {
                printf("    mode %d config %lld (engine %lld): %s\n", (int)mode, (long long)i, (long long)index,
                       st != CUDNN_STATUS_SUCCESS ? cudnnGetErrorString(st) : "workspace too large");
                continue;
            }
            plans.push_back(plan);
            engines.push_back(index);
        }
    }
}

/* The variant pack of one form's buffers (the scale and r2 only where the form has them). */
static bool make_pack(cudnnBackendDescriptor_t *pack, void *x, void *w, void *scale, void *s, void *r2) {
    int64_t uids[5] = {UID_X, UID_W, UID_SCALE, UID_S, UID_R2};
    void *pointers[5] = {x, w, scale, s, r2};
    int used = 0;
    int64_t u[5];
    void *p[5];
    for (int i = 0; i < 5; i++)
        if (pointers[i]) {
            u[used] = uids[i];
            p[used++] = pointers[i];
        }
    *pack = make(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    CD(cudnnBackendSetAttribute(*pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, used, u));
    CD(cudnnBackendSetAttribute(*pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, used, p));
    CD(cudnnBackendSetAttribute(*pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace));
    CD(cudnnBackendFinalize(*pack));
    return true;
}

static float bf16_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

/* S at a few (row, column) places against the host's float sums of the same bf16 operands. */
static double check_scaled(int64_t n, const void *x, const void *w, const float *scale_host, const void *s) {
    const int64_t rows[4] = {0, 12345, 77777, ROWS - 1};
    std::vector<__nv_bfloat16> xrow(D), wrow(D), srow(n);
    double worst = 0;
    for (int64_t row : rows) {
        CK(cudaMemcpy(xrow.data(), (const __nv_bfloat16 *)x + row * D, D * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(srow.data(), (const __nv_bfloat16 *)s + row * n, n * 2, cudaMemcpyDeviceToHost));
        for (int64_t col = 0; col < n; col += n / 16 + 1) {
            CK(cudaMemcpy(wrow.data(), (const __nv_bfloat16 *)w + col * D, D * 2, cudaMemcpyDeviceToHost));
            double a = 0;
            for (int64_t k = 0; k < D; k++) a += (double)bf16_to_float(xrow[k]) * bf16_to_float(wrow[k]);
            double z = a * scale_host[row], gelu = 0.5 * z * (1 + erf(z / sqrt(2.0)));
            double err = fabs(bf16_to_float(srow[col]) - gelu) / (fabs(gelu) + 1e-2);
            if (err > worst) worst = err;
        }
    }
    return worst;
}

int main() {
    CK(cudnnCreate(&handle));
    CK(cudaMalloc(&workspace, WORKSPACE));
    printf("cuDNN %zu, cuBLASLt %zu\n", cudnnGetVersion(), cublasLtGetVersion());
    int64_t n_max = 4 * D;
    void *x, *w, *s, *scale, *r2;
    CK(cudaMalloc(&x, ROWS * D * 2));
    CK(cudaMalloc(&w, n_max * D * 2));
    CK(cudaMalloc(&s, ROWS * n_max * 2));
    CK(cudaMalloc(&scale, ROWS * 4));
    CK(cudaMalloc(&r2, ROWS * 4));
    fill<<<1024, 256>>>((__nv_bfloat16 *)x, ROWS * D, 1, 1.0f);
    fill<<<1024, 256>>>((__nv_bfloat16 *)w, n_max * D, 2, 0.02f);
    std::vector<float> scale_host(ROWS);
    for (int64_t i = 0; i < ROWS; i++) scale_host[i] = 4.0f + (float)(i % 7); /* ~ tau / r */
    CK(cudaMemcpy(scale, scale_host.data(), ROWS * 4, cudaMemcpyHostToDevice));
    for (int64_t n : {n_max, D}) {
        /* cuBLASLt's fastest of its top 8 for S = X W^T, W stored n x D (the backend's layout) */
        float lt_ms = lt_gemm((int)ROWS, (int)n, (int)D, WORKSPACE)
                          .tune((const __nv_bfloat16 *)x, (const __nv_bfloat16 *)w, (__nv_bfloat16 *)s);
        double flops = 2.0 * ROWS * n * D;
        printf("n %lld: cuBLASLt %.4f ms (%.0f TFLOP/s)\n", (long long)n, lt_ms, flops / lt_ms / 1e9);
        for (form f : {PLAIN, SCALED, SUMSQ}) {
            cudnnBackendDescriptor_t graph;
            if (!build_graph(&graph, f, n)) {
                printf("  %s: graph not built\n", form_names[f]);
                continue;
            }
            std::vector<cudnnBackendDescriptor_t> plans;
            std::vector<int64_t> engines;
            plans_of(graph, plans, engines);
            if (plans.empty()) printf("  %s: no plan\n", form_names[f]);
            cudnnBackendDescriptor_t pack;
            if (!make_pack(&pack, x, w, f == SCALED ? scale : NULL, f == SUMSQ ? NULL : s, f == SUMSQ ? r2 : NULL))
                continue;
            for (size_t i = 0; i < plans.size(); i++) {
                cudnnStatus_t status = cudnnBackendExecute(handle, plans[i], pack);
                if (status != CUDNN_STATUS_SUCCESS) {
                    printf("  %s engine %lld: %s\n", form_names[f], (long long)engines[i], cudnnGetErrorString(status));
                    continue;
                }
                float ms = time_ms([&] { cudnnBackendExecute(handle, plans[i], pack); });
                CK(cudaDeviceSynchronize());
                char check[64] = "";
                if (f == SCALED) snprintf(check, sizeof check, ", S sample rel err %.1e", check_scaled(n, x, w, scale_host.data(), s));
                printf("  %-6s engine %3lld: %.4f ms (%.0f TFLOP/s, %.2fx cuBLASLt)%s\n", form_names[f],
                       (long long)engines[i], ms, flops / ms / 1e9, ms / lt_ms, check);
            }
        }
    }
    return 0;
}
