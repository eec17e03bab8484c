/* keys_exceed (kernels.h) on the GPU: for each question, the stacked keys widened to double, their
 * Gram matrix Kc^T Kc by cuBLASLt in fp64, P Kc^T Kc P + 2 mu 11^T / d - mu I in place, and
 * cuSOLVER's Cholesky factorisation (dpotrf), whose info is 0 exactly when that matrix is positive
 * definite. The questions run one after another on the backend's stream into one scratch set, and
 * the answers come back in one copy at the end.
 *
 * Why on the GPU: on the CPU (OpenBLAS, 16 cores) B/16's 24 proofs took 0.51 s, paid by the first
 * model_infer of every set of parameters: a short eval of 13500 images ran 6019-6558 img/s
 * against 6641-7109 without them. Here each is a fp64 GEMM of 2.7-3.6 GFLOP and a 768 x 768
 * Cholesky: 20.9 ms for all 24 on the H100 (107 ms the first call of a process, which opens
 * cuSOLVER), and that eval ran 7348-8389 img/s (docs/performance.md, row 32).
 *
 * The sums are in another order than the CPU's (LAPACK's blocked dpotrf, OpenBLAS's dsyrk), so a
 * matrix within rounding of singular may be decided otherwise; B/16's margins are about 2x
 * (lambda d ~ 126-236 against 67), and tests/test_kernels_cuda.c asks both 0.1% either side. */
#include "kernels/cuda/cuda_common.cuh"

#include <cusolverDn.h>

#include <stdio.h>

static cusolverDnHandle_t solver; /* opened at the first call, on the backend's stream */

static bool solver_check(cusolverStatus_t status, const char *call, const char *file, int line, int dim) {
    if (status == CUSOLVER_STATUS_SUCCESS) return true;
    char result[64];
    snprintf(result, sizeof result, "cusolverStatus_t %d", (int)status);
    cuda_record_failure(file, line, call, result, "keys_exceed dim=%d", dim);
    return false;
}
#define SOLVER_CHECK(call, dim) solver_check((call), #call, __FILE__, __LINE__, (dim))

/* out (double [rows, dim]) = keys (bf16), and row_sums[row] = the row's sum. One warp a row. */
__global__ void keys_to_double_kernel(double *out, double *row_sums, const bf16 *keys, int rows, int dim) {
    int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const bf16 *key = keys + (size_t)row * dim;
    double *widened = out + (size_t)row * dim, sum = 0.0;
    for (int j = lane; j < dim; j += 32) {
        double value = __bfloat162float(key[j]);
        widened[j] = value;
        sum += value;
    }
    sum = warp_sum_double(sum);
    if (lane == 0) row_sums[row] = sum;
}

/* *out = the sum of values (squared, with square), by one block of 1024 threads in a fixed order. */
__global__ void sum_doubles_kernel(double *out, const double *values, int n, bool square) {
    __shared__ double warp_sums[32];
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        sum += square ? values[i] * values[i] : values[i];
    sum = warp_sum_double(sum);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        sum = warp_sum_double(threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.0);
        if (threadIdx.x == 0) *out = sum;
    }
}

/* row_sums[i] = the sum of the Gram matrix's row i. One warp a row. */
__global__ void gram_row_sums_kernel(double *row_sums, const double *gram, int dim) {
    int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32), lane = threadIdx.x & 31;
    if (row >= dim) return;
    double sum = 0.0;
    for (int j = lane; j < dim; j += 32)
        sum += gram[(size_t)row * dim + j];
    sum = warp_sum_double(sum);
    if (lane == 0) row_sums[row] = sum;
}

/* gram = P gram P + 2 mu 11^T / d - mu I, with gram's row sums and their total. */
__global__ void project_and_shift_kernel(double *gram, const double *row_sums, const double *total, int dim,
                                         double mu) {
    size_t index = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (index >= (size_t)dim * dim) return;
    int i = (int)(index / dim), j = (int)(index % dim);
    gram[index] += (*total / dim - row_sums[i] - row_sums[j] + 2.0 * mu) / dim - (i == j ? mu : 0.0);
}

/* gram (double [dim, dim]) = Kc^T Kc for keys (double [rows, dim], row-major): column-major, keys
 * are Kc^T (dim x rows), so the product is A A^T. */
static bool gram_matmul(double *gram, const double *keys, int rows, int dim) {
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t layout_keys = NULL, layout_gram = NULL;
    cublasLtMatmulPreference_t preference = NULL;
    cublasOperation_t transpose = CUBLAS_OP_T;
    const char *shape = "keys_exceed gram rows=%d dim=%d";
    bool ok =
        CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_64F, CUDA_R_64F), shape, rows, dim) &&
        CUBLAS_CHECK(
            cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &transpose, sizeof transpose),
            shape, rows, dim) &&
        CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_keys, CUDA_R_64F, dim, rows, dim), shape, rows,
                     dim) &&
        CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_gram, CUDA_R_64F, dim, dim, dim), shape, rows, dim) &&
        CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference), shape, rows, dim) &&
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
                         preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &cuda_ctx.lt_workspace_bytes,
                         sizeof cuda_ctx.lt_workspace_bytes),
                     shape, rows, dim);
    cublasLtMatmulHeuristicResult_t heuristic;
    int found = 0;
    if (ok)
        ok = CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(cuda_ctx.lt, op, layout_keys, layout_keys,
                                                         layout_gram, layout_gram, preference, 1, &heuristic,
                                                         &found),
                          shape, rows, dim);
    if (ok && found == 0) {
        cuda_record_failure(__FILE__, __LINE__, "cublasLtMatmulAlgoGetHeuristic", "no algorithm", shape, rows,
                            dim);
        ok = false;
    }
    const double one = 1.0, zero = 0.0;
    if (ok)
        ok = CUBLAS_CHECK(cublasLtMatmul(cuda_ctx.lt, op, &one, keys, layout_keys, keys, layout_keys, &zero,
                                         gram, layout_gram, gram, layout_gram, &heuristic.algo,
                                         cuda_ctx.lt_workspace, cuda_ctx.lt_workspace_bytes, cuda_ctx.stream),
                          shape, rows, dim);
    if (preference) cublasLtMatmulPreferenceDestroy(preference);
    if (layout_gram) cublasLtMatrixLayoutDestroy(layout_gram);
    if (layout_keys) cublasLtMatrixLayoutDestroy(layout_keys);
    if (op) cublasLtMatmulDescDestroy(op);
    return ok;
}

/* The device scratch of one call: the widest question's keys, the Gram matrix, row sums (of the
 * keys, then of the Gram matrix) and their total, dpotrf's workspace, and the answers. */
typedef struct {
    double *keys, *gram, *row_sums, *total, *work;
    int work_count;
    double *sums_squared; /* [count] */
    int *info;            /* [count] */
} scratch;

static bool scratch_alloc(scratch *s, int count, int most_rows, int dim) {
    cudaStream_t stream = cuda_ctx.stream;
    size_t sums = (size_t)(most_rows > dim ? most_rows : dim);
    const char *what = "keys_exceed scratch: count=%d rows=%d dim=%d";
#define SCRATCH(buffer, elements)                                                                            \
    CUDA_CHECK(cudaMallocAsync((void **)&(buffer), (size_t)(elements) * sizeof *(buffer), stream), what,     \
               count, most_rows, dim)
    return SCRATCH(s->keys, (size_t)most_rows * dim) && SCRATCH(s->gram, (size_t)dim * dim) &&
           SCRATCH(s->row_sums, sums) && SCRATCH(s->total, 1) && SCRATCH(s->sums_squared, count) &&
           SCRATCH(s->info, count) &&
           SOLVER_CHECK(
               cusolverDnDpotrf_bufferSize(solver, CUBLAS_FILL_MODE_UPPER, dim, s->gram, dim, &s->work_count),
               dim) &&
           SCRATCH(s->work, s->work_count);
#undef SCRATCH
}

static void scratch_free(scratch *s) {
    void *buffers[] = {s->keys, s->gram, s->row_sums, s->total, s->work, s->sums_squared, s->info};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++)
        if (buffers[i]) cudaFreeAsync(buffers[i], cuda_ctx.stream);
}

/* Queues question i's work; its answers land in s->sums_squared[i] and s->info[i]. */
static bool queue_question(scratch *s, const tf_keys_exceed *question, int i, int dim) {
    cudaStream_t stream = cuda_ctx.stream;
    int rows = question->parts * question->n;
    const char *shape = "keys_exceed rows=%d dim=%d";
    for (int part = 0; part < question->parts; part++) {
        size_t first = (size_t)part * question->n;
        keys_to_double_kernel<<<ceil_div_u((size_t)question->n * 32, 256), 256, 0, stream>>>(
            s->keys + first * dim, s->row_sums + first, (const bf16 *)question->keys[part], question->n, dim);
        if (!LAUNCH_CHECK("keys_to_double_kernel", shape, rows, dim)) return false;
    }
    sum_doubles_kernel<<<1, 1024, 0, stream>>>(s->sums_squared + i, s->row_sums, rows, true);
    if (!LAUNCH_CHECK("sum_doubles_kernel", shape, rows, dim) || !gram_matmul(s->gram, s->keys, rows, dim))
        return false;
    gram_row_sums_kernel<<<ceil_div_u((size_t)dim * 32, 256), 256, 0, stream>>>(s->row_sums, s->gram, dim);
    if (!LAUNCH_CHECK("gram_row_sums_kernel", shape, rows, dim)) return false;
    sum_doubles_kernel<<<1, 1024, 0, stream>>>(s->total, s->row_sums, dim, false);
    if (!LAUNCH_CHECK("sum_doubles_kernel", shape, rows, dim)) return false;
    project_and_shift_kernel<<<ceil_div_u((size_t)dim * dim, 256), 256, 0, stream>>>(
        s->gram, s->row_sums, s->total, dim, question->mu);
    if (!LAUNCH_CHECK("project_and_shift_kernel", shape, rows, dim)) return false;
    return SOLVER_CHECK(cusolverDnDpotrf(solver, CUBLAS_FILL_MODE_UPPER, dim, s->gram, dim, s->work,
                                         s->work_count, s->info + i),
                        dim);
}

static bool open_solver(void) {
    if (solver) return true;
    if (!SOLVER_CHECK(cusolverDnCreate(&solver), 0)) return false;
    if (SOLVER_CHECK(cusolverDnSetStream(solver, cuda_ctx.stream), 0)) return true;
    cusolverDnDestroy(solver);
    solver = NULL;
    return false;
}

void cuda_keys_exceed(tf_keys_exceed *questions, int count, int dim) {
    int most_rows = 0;
    for (int i = 0; i < count; i++) {
        questions[i].exceeds = false;
        questions[i].sums_norm = 0.0;
        if (questions[i].parts * questions[i].n > most_rows) most_rows = questions[i].parts * questions[i].n;
    }
    scratch s = {};
    bool queued = count > 0 && open_solver() && scratch_alloc(&s, count, most_rows, dim);
    for (int i = 0; i < count && queued; i++)
        queued = queue_question(&s, &questions[i], i, dim);
    double *sums_squared = (double *)malloc((size_t)count * sizeof *sums_squared);
    int *info = (int *)malloc((size_t)count * sizeof *info);
    const char *what = "keys_exceed answers: count=%d dim=%d";
    bool answered =
        queued && sums_squared && info &&
        CUDA_CHECK(cudaMemcpyAsync(sums_squared, s.sums_squared, (size_t)count * sizeof *sums_squared,
                                   cudaMemcpyDeviceToHost, cuda_ctx.stream),
                   what, count, dim) &&
        CUDA_CHECK(cudaMemcpyAsync(info, s.info, (size_t)count * sizeof *info, cudaMemcpyDeviceToHost,
                                   cuda_ctx.stream),
                   what, count, dim);
    scratch_free(&s);
    answered = CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream), what, count, dim) && answered;
    for (int i = 0; i < count && answered; i++) {
        questions[i].exceeds = info[i] == 0;
        questions[i].sums_norm = sqrt(sums_squared[i]);
    }
    free(sums_squared);
    free(info);
}
