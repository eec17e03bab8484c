/* What every file of the CUDA backend shares: the one device context (stream, cuBLASLt and
 * cuDNN handles, workspaces), the checks that record the first failure, bf16 helpers, warp
 * reductions, and the declarations of the operations that backend.cu collects into the table.
 *
 * Failures: an operation cannot return an error (kernels.h), so every CUDA, cuBLASLt and cuDNN
 * return code goes through one of the CHECK macros below. The first failure is recorded with
 * the call's text, its result, the file and line, and a description of the arguments (shapes);
 * synchronize() returns it. Kernel launches are followed by LAUNCH_CHECK, which catches bad
 * launch configurations at once and, in debug-sync mode (tests), also waits for the kernel so
 * that a fault inside it is blamed on the operation that launched it. */
#ifndef TF_KERNELS_CUDA_COMMON_CUH
#define TF_KERNELS_CUDA_COMMON_CUH

extern "C" {
#include "kernels/kernels.h"
}
#include "kernels/cuda/cuda_backend.cuh"
#include "kernels/normal_cdf.h"

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <stdint.h>

/* ---- the device context, created once by tf_cuda_backend() (backend.cu) ---- */
typedef struct {
    bool ready;
    int device;
    int sm_count;
    int max_shared_per_block_optin; /* bytes a block may get after cudaFuncSetAttribute */
    cudaStream_t stream;            /* the one stream of every operation */
    /* upload_bytes() copies on a stream of its own, so that the next batch's pixels cross PCIe
     * while the current batch computes: it waits for pixels_read (recorded after each
     * images_normalize, the reader of uploaded pixels) and `stream` waits for upload_done. */
    cudaStream_t copy_stream;
    cudaEvent_t pixels_read, upload_done;
    cublasLtHandle_t lt;
    void *lt_workspace; /* 32 MiB, cuBLASLt's scratch on Hopper */
    size_t lt_workspace_bytes;
    cudnnHandle_t cudnn; /* NULL when cuDNN could not be opened */
    size_t cudnn_version;
    char cudnn_unavailable[256]; /* why the cuDNN attention path is off, "" when it is on */
    bool attention_prefer_cudnn; /* tf_cuda_attention_use_cudnn() */
    void *staging;               /* pinned host buffer for upload/download conversion */
    size_t staging_bytes;
    double *reduce_partials;      /* device: per-block partial sums of sum_squares */
    double *reduce_partials_host; /* pinned mirror */
    int reduce_partials_count;
    bool debug_sync; /* wait after every launch (tests) */
} cuda_context;

extern cuda_context cuda_ctx;

/* ---- failure recording (backend.cu) ---- */
void cuda_record_failure(const char *file, int line, const char *call, const char *result, const char *fmt,
                         ...) __attribute__((format(printf, 5, 6)));
bool cuda_has_failed(void);
/* The first failure as a tf_status (TF_OK when none): what synchronize() returns. */
tf_status cuda_failure_status(void);

/* Each check returns true when the call succeeded. The arguments after the call are a printf
 * format and its values describing what was being done (operation and shapes). */
bool cuda_check_runtime(cudaError_t err, const char *call, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
bool cuda_check_cublas(cublasStatus_t status, const char *call, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
bool cuda_check_cudnn(cudnnStatus_t status, const char *call, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
bool cuda_check_launch(const char *kernel, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define CUDA_CHECK(call, ...) cuda_check_runtime((call), #call, __FILE__, __LINE__, __VA_ARGS__)
#define CUBLAS_CHECK(call, ...) cuda_check_cublas((call), #call, __FILE__, __LINE__, __VA_ARGS__)
#define CUDNN_CHECK(call, ...) cuda_check_cudnn((call), #call, __FILE__, __LINE__, __VA_ARGS__)
/* After kernel<<<...>>>(...): LAUNCH_CHECK("kernel_name", "rows %d n %d", rows, n). */
#define LAUNCH_CHECK(kernel, ...) cuda_check_launch((kernel), __FILE__, __LINE__, __VA_ARGS__)

/* ---- small host helpers ---- */
static inline unsigned ceil_div_u(size_t a, size_t b) {
    return (unsigned)((a + b - 1) / b);
}
static inline bool is_aligned16(const void *p) {
    return ((uintptr_t)p & 15u) == 0;
}
/* Grid size for a grid-stride loop over n items of `per_block` each: enough blocks to fill the
 * GPU several times, never more than needed. */
static inline unsigned grid_for(size_t n, unsigned per_block) {
    size_t needed = (n + per_block - 1) / per_block;
    size_t cap = (size_t)cuda_ctx.sm_count * 16;
    if (needed > cap) needed = cap;
    return (unsigned)(needed ? needed : 1);
}

/* The fastest of `count` candidate ways to run one operation (cuBLASLt algorithms, cuDNN engine
 * configs: their heuristics do not always put it first), timed on the call's own operands at a
 * shape's first call: run(i) launches candidate i once on the backend's stream and returns false
 * when it cannot. Two rounds keep a long list cheap: each candidate runs once untimed (its first
 * launch loads its kernel) and once timed, then the FINALISTS quickest run timed_runs times more
 * and the fastest mean wins. Returns the index, or -1 when none ran (the caller keeps its first
 * choice). A failed candidate leaves no error behind. */
enum { FASTEST_CANDIDATE_FINALISTS = 4 };

/* Milliseconds of `runs` launches of candidate i, or a negative number when one failed. */
template <typename Run>
static float time_candidate(int i, int runs, Run &run, cudaEvent_t start, cudaEvent_t stop) {
    cudaEventRecord(start, cuda_ctx.stream);
    for (int r = 0; r < runs; r++)
        if (!run(i)) return -1.0f;
    cudaEventRecord(stop, cuda_ctx.stream);
    float ms = 0.0f;
    if (cudaEventSynchronize(stop) != cudaSuccess || cudaEventElapsedTime(&ms, start, stop) != cudaSuccess) return -1.0f;
    return ms / (float)runs;
}

template <typename Run>
static int fastest_candidate(int count, int timed_runs, Run run) {
    cudaEvent_t start, stop;
    if (cudaEventCreate(&start) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    if (cudaEventCreate(&stop) != cudaSuccess) {
        cudaEventDestroy(start);
        cudaGetLastError();
        return -1;
    }
    /* Round one: the quickest few single runs, kept in order. */
    int finalists[FASTEST_CANDIDATE_FINALISTS], finalist_count = 0;
    float finalist_ms[FASTEST_CANDIDATE_FINALISTS];
    for (int i = 0; i < count; i++) {
        if (!run(i)) continue;
        float ms = time_candidate(i, 1, run, start, stop);
        if (ms < 0.0f) continue;
        int place = finalist_count;
        while (place > 0 && finalist_ms[place - 1] > ms) place--;
        if (place == FASTEST_CANDIDATE_FINALISTS) continue;
        if (finalist_count < FASTEST_CANDIDATE_FINALISTS) finalist_count++;
        for (int j = finalist_count - 1; j > place; j--) {
            finalists[j] = finalists[j - 1];
            finalist_ms[j] = finalist_ms[j - 1];
        }
        finalists[place] = i;
        finalist_ms[place] = ms;
    }
    /* Round two: the finalists' means over timed_runs runs. */
    int fastest = -1;
    float fastest_ms = 0.0f;
    for (int f = 0; f < finalist_count; f++) {
        float ms = time_candidate(finalists[f], timed_runs, run, start, stop);
        if (ms >= 0.0f && (fastest < 0 || ms < fastest_ms)) {
            fastest = finalists[f];
            fastest_ms = ms;
        }
    }
    cudaEventDestroy(stop);
    cudaEventDestroy(start);
    cudaGetLastError();
    return fastest;
}

/* ---- bf16 and reductions on the device ---- */
typedef __nv_bfloat16 bf16;

/* 8 bf16 = 16 bytes, the unit of the vectorised loads. A bf16 is the top half of the float it
 * widens to: integer operations, one an element, where __bfloat1622float2's inline-asm cvt kept
 * the compiler from reusing a chunk unpacked before (the norm forward unpacked its row twice, 48
 * cvt for 24 elements). */
__device__ __forceinline__ void bf16x8_unpack(uint4 raw, float out[8]) {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(words[i] << 16);              /* the lower address: low half */
        out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint4 bf16x8_pack(const float in[8]) {
    uint4 raw;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    return raw;
}

/* The same unit, 8 elements, of an fp32 buffer (the residual stream): chunk `index` of a row is
 * two 16-byte loads or stores. */
__device__ __forceinline__ void f32x8_load(const float *row, int index, float out[8]) {
    const float4 *p = reinterpret_cast<const float4 *>(row) + 2 * index;
    float4 a = p[0], b = p[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
    out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

__device__ __forceinline__ void f32x8_store(float *row, int index, const float in[8]) {
    float4 *p = reinterpret_cast<float4 *>(row) + 2 * index;
    p[0] = make_float4(in[0], in[1], in[2], in[3]);
    p[1] = make_float4(in[4], in[5], in[6], in[7]);
}

__device__ __forceinline__ float bf16_load(const bf16 *p) {
    return __bfloat162float(*p);
}
__device__ __forceinline__ void bf16_store(bf16 *p, float v) {
    *p = __float2bfloat16(v);
}

/* An element, or chunk `index` of 8, of a buffer that is fp32 or bf16 as its type says: the
 * residual stream of the training form (fp32) and of the inference form (bf16). */
__device__ __forceinline__ float load_float(const float *p) { return *p; }
__device__ __forceinline__ float load_float(const bf16 *p) { return bf16_load(p); }
__device__ __forceinline__ void store_float(float *p, float v) { *p = v; }
__device__ __forceinline__ void store_float(bf16 *p, float v) { bf16_store(p, v); }
__device__ __forceinline__ void store_float8(float *row, int index, const float in[8]) { f32x8_store(row, index, in); }
__device__ __forceinline__ void store_float8(bf16 *row, int index, const float in[8]) {
    reinterpret_cast<uint4 *>(row)[index] = bf16x8_pack(in);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
__device__ __forceinline__ double warp_sum_double(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

/* var(x) + eps of a row of dim elements, summed by the 32 lanes of a warp: the mean, then the
 * squares about it (two reads of the row, no cancellation). */
__device__ __forceinline__ float warp_row_variance(const bf16 *x_row, int dim, int lane, float eps) {
    float sum = 0.0f, squares = 0.0f;
    for (int j = lane; j < dim; j += 32) sum += bf16_load(x_row + j);
    float mean = warp_sum(sum) / dim;
    for (int j = lane; j < dim; j += 32) {
        float centered = bf16_load(x_row + j) - mean;
        squares = fmaf(centered, centered, squares);
    }
    return warp_sum(squares) / dim + eps;
}

/* Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets
 * the result. scratch: __shared__ float[32]. */
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); /* scratch may still be read by a previous call */
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

/* Exact (erf) GELU through the standard normal distribution (kernels/normal_cdf.h says how and
 * why in that form): GELU(z) = z Phi(z), GELU'(z) = Phi(z) + z phi(z). A pass that needs both
 * evaluates the distribution once and calls the _at forms, which give the same bits as gelu_erf
 * and gelu_erf_derivative. */
__device__ __forceinline__ float gelu_erf_at(float z, tf_normal normal) {
    return z * normal.cdf;
}
__device__ __forceinline__ float gelu_erf_derivative_at(float z, tf_normal normal) {
    return normal.cdf + z * normal.pdf;
}
__device__ __forceinline__ float gelu_erf(float z) {
    return gelu_erf_at(z, tf_standard_normal(z));
}
__device__ __forceinline__ float gelu_erf_derivative(float z) {
    return gelu_erf_derivative_at(z, tf_standard_normal(z));
}

/* ---- row kernels ----
 * A row of n bf16 (n a multiple of 8, 16-byte aligned) is handled by ROW_WARPS warps: thread t
 * of the row's group holds 16-byte chunks t, t + 32 ROW_WARPS, ... in registers (ROW_CHUNKS of
 * them), so the group reads contiguous bytes at every step and each row is read once. Blocks
 * have 256 threads, 8 / ROW_WARPS rows each. */
enum { ROW_BLOCK_THREADS = 256 };

typedef struct {
    int chunks; /* 16-byte chunks per thread, 1..4; 0: use the plain kernel */
    int warps;  /* warps per row: 1, 2, 4 or 8 */
} row_layout;

static inline row_layout plan_row(int n, bool aligned) {
    row_layout layout = {0, 1};
    if (!aligned || n % 8 != 0 || n <= 0) return layout;
    int chunk_count = n / 8;
    for (int warps = 1; warps <= 8; warps *= 2) {
        int per_thread = (chunk_count + 32 * warps - 1) / (32 * warps);
        if (per_thread <= 4) {
            layout.chunks = per_thread;
            layout.warps = warps;
            return layout;
        }
    }
    return layout; /* wider than 8192: plain kernel */
}

static inline unsigned row_grid(int rows, row_layout layout) {
    int rows_per_block = (ROW_BLOCK_THREADS / 32) / layout.warps;
    return ceil_div_u((size_t)rows, (size_t)rows_per_block);
}

/* Which row of the block this thread serves, and its index within the row's group. Blocks take
 * the rows last first: a row pass mostly follows a GEMM that wrote its input first to last, whose
 * last tiles are still in the L2, and its own last writes (the first rows) are what the next
 * GEMM reads first (B/16 inference +0.3-0.4%, three A/B rounds). */
template <int WARPS>
__device__ __forceinline__ int row_of_thread(void) {
    return (gridDim.x - 1 - blockIdx.x) * ((ROW_BLOCK_THREADS / 32) / WARPS) + (threadIdx.x >> 5) / WARPS;
}
template <int WARPS>
__device__ __forceinline__ int row_thread_index(void) {
    return threadIdx.x % (32 * WARPS);
}

/* Thread t's chunks of a row of n bf16 into raw (zeros where the row has none, and for the whole
 * row when !active), and their sum of squares: this thread's share of |row|^2. */
template <int CHUNKS, int WARPS>
__device__ __forceinline__ float load_row_chunks(uint4 (&raw)[CHUNKS], const bf16 *row, int n, int t, bool active) {
    const uint4 *chunk = reinterpret_cast<const uint4 *>(row);
    int chunks = n >> 3;
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        int index = c * 32 * WARPS + t;
        raw[c] = active && index < chunks ? chunk[index] : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        float x[8];
        bf16x8_unpack(raw[c], x);
#pragma unroll
        for (int i = 0; i < 8; i++) sum = fmaf(x[i], x[i], sum);
    }
    return sum;
}

/* Sum over the WARPS warps of one row. Every thread of the block must call it (it may hold
 * barriers); scratch: __shared__ float[8]. */
template <int WARPS>
__device__ __forceinline__ float row_sum(float v, float *scratch) {
    v = warp_sum(v);
    if (WARPS == 1) return v;
    int warp = threadIdx.x >> 5, first = warp / WARPS * WARPS;
    __syncthreads(); /* readers of a previous call are done with scratch */
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; w++) total += scratch[first + w];
    return total;
}

/* switch (layout) { case (C, W): CASE(C, W) } over every layout plan_row() returns. */
#define ROW_LAYOUT_SWITCH(layout, CASE, PLAIN)                                                                     \
    switch ((layout).chunks * 16 + (layout).warps) {                                                               \
    case 1 * 16 + 1: CASE(1, 1) break;                                                                             \
    case 2 * 16 + 1: CASE(2, 1) break;                                                                             \
    case 3 * 16 + 1: CASE(3, 1) break;                                                                             \
    case 4 * 16 + 1: CASE(4, 1) break;                                                                             \
    case 3 * 16 + 2: CASE(3, 2) break;                                                                             \
    case 4 * 16 + 2: CASE(4, 2) break;                                                                             \
    case 3 * 16 + 4: CASE(3, 4) break;                                                                             \
    case 4 * 16 + 4: CASE(4, 4) break;                                                                             \
    case 3 * 16 + 8: CASE(3, 8) break;                                                                             \
    case 4 * 16 + 8: CASE(4, 8) break;                                                                             \
    default: PLAIN break;                                                                                          \
    }

/* ---- the operations, one file each (names as in kernels/cpu/) ---- */
extern "C" {
/* memory.cu */
tf_status cuda_alloc(void **buffer, size_t bytes, const char *what);
void cuda_free(void *buffer);
void cuda_zero(void *buffer, size_t bytes);
void cuda_copy(void *dst, const void *src, size_t bytes);
void cuda_upload(void *dst, tf_dtype dst_dtype, const float *src, size_t n);
void cuda_download(float *dst, const void *src, tf_dtype src_dtype, size_t n);
tf_status cuda_host_alloc(void **buffer, size_t bytes);
void cuda_host_free(void *buffer);
void cuda_upload_bytes(void *dst, const void *src, size_t bytes);
void cuda_convert(void *dst, tf_dtype dst_dtype, const void *src, tf_dtype src_dtype, size_t n);
tf_status cuda_synchronize(void);
size_t cuda_device_memory_in_use(void);
void cuda_profile_mark(int index);
double cuda_profile_elapsed_ms(int from, int to);
/* images.cu */
void cuda_images_normalize(void *images, const void *pixels, int batch, int channels, int size, const float *mean,
                           const float *std);
void cuda_mixup_images(void *images, int batch, size_t sample_size, float lambda);
void cuda_cutmix_images(void *images, int batch, int channels, int size, int y0, int y1, int x0, int x1);
/* matmul.cu */
void cuda_matmul(void *c, const void *a, const void *b, const tf_matmul_desc *desc);
/* pattention_norm.cu */
void cuda_pattention_norm_forward(void *s, void *row_norm, const void *a, int rows, int n, float tau, float eps,
                                  const void *eps_scale);
void cuda_pattention_norm_backward(void *da, void *s, const void *ds, const void *a, const void *row_norm, int rows,
                                   int n, float tau);
void cuda_pattention_norm_pool(void *pooled_s, void *row_norm, const void *a, int batch, int tokens, int n, float tau,
                               float eps, const void *eps_scale);
void cuda_pattention_norm_recheck(const tf_norm_rows *norms, int count, const void *x, int rows, int n, int dim,
                                  float eps, float eps_ln, float share);
/* keys_exceed.cu */
void cuda_keys_exceed(tf_keys_exceed *questions, int count, int dim);
/* attention.cu */
void cuda_attention_forward(void *out, void *lse, const void *q, const void *k, const void *v, int batch,
                            int tokens, int heads, int head_dim);
void cuda_attention_backward(void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                             const void *v, const void *out, const void *lse, int batch, int tokens, int heads,
                             int head_dim);
/* layernorm.cu */
void cuda_layernorm_forward(void *out, void *xhat, void *rstd, const void *x, const void *weight, const void *bias,
                            int rows, int dim, float eps);
void cuda_residual_layernorm_forward(void *residual_out, void *ln_out, void *rstd, const void *residual_in,
                                     const void *branch, const void *sample_scale, int rows, int dim,
                                     int rows_per_sample, float eps);
void cuda_layernorm_backward(void *dx, void *dweight, void *dbias, const void *dout, const void *xhat,
                             const void *rstd, const void *weight, int rows, int dim);
void cuda_center_rows(void *const *out, const void *const *x, const int *rows, int count, int dim);
void cuda_layernorm_variance(void *variance, const void *x, int rows, int dim, float eps);
/* residual.cu */
void cuda_residual_forward(void *out, const void *residual_in, const void *branch, const void *sample_scale,
                           int rows, int dim, int rows_per_sample);
void cuda_residual_backward(void *dbranch, const void *dout, const void *sample_scale, int rows, int dim,
                            int rows_per_sample);
/* patch_embed.cu */
void cuda_patch_im2col(void *patches, const void *images, int batch, int channels, int size, int patch);
void cuda_tokens_forward(void *x, tf_dtype x_dtype, const void *patch_tokens, const void *cls, const void *pos,
                         int batch, int patches, int dim);
void cuda_tokens_backward(void *dpatch_tokens, void *dcls, void *dpos, const void *dx, int batch, int patches,
                          int dim);
/* head.cu */
void cuda_token_pool_forward(void *out, const void *x, tf_dtype x_dtype, int batch, int tokens, int dim,
                             tf_pool pool);
void cuda_token_pool_backward(void *dx, const void *dout, int batch, int tokens, int dim, tf_pool pool);
void cuda_bias_backward(void *dbias, const void *dout, int rows, int dim);
/* cross_entropy.cu */
void cuda_cross_entropy_forward_backward(void *loss, void *dlogits, const void *logits, const void *target,
                                         int batch, int classes, float dloss_scale);
/* optimizer.cu */
void cuda_adamw_update(void *master, void *compute, const void *grad, void *m, void *v,
                       const tf_adamw_group *groups, int group_count, const tf_adamw_hyper *hyper);
void cuda_ema_update(void *ema, const void *master, size_t n, float decay);
double cuda_sum_squares(const void *x, size_t n);

/* attention_cudnn.cu: cuDNN's fused attention through the backend graph API. Each returns
 * false (with the reason in `why`, nothing recorded as a failure) when the graph for this shape
 * cannot be built, so that the caller falls back to our kernels. */
bool cudnn_attention_forward(void *out, void *lse, const void *q, const void *k, const void *v, int batch,
                             int tokens, int heads, int head_dim, char *why, size_t why_size);
bool cudnn_attention_backward(void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                              const void *v, const void *out, const void *lse, int batch, int tokens, int heads,
                              int head_dim, char *why, size_t why_size);
}

#endif
