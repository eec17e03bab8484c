/* The CUDA backend's table and its one-time start: the device, the stream every operation
 * runs on, the cuBLASLt handle and its 32 MiB workspace, the cuDNN handle (optional: without
 * it attention runs on our own kernels), the pinned staging buffer of upload/download and the
 * reduction scratch of sum_squares. Also the failure record: operations cannot return errors,
 * so the first failed call is kept here (call text, result, file:line, shapes) and
 * synchronize() returns it. */
#include "kernels/cuda/cuda_common.cuh"

extern "C" {
#include "common/log.h"
}

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

cuda_context cuda_ctx;

static tf_backend cuda_table;

enum { LT_WORKSPACE_BYTES = 32 << 20, STAGING_BYTES = 32 << 20, REDUCE_BLOCKS_PER_SM = 8 };

/* ---- failure record ---- */
static pthread_mutex_t failure_lock = PTHREAD_MUTEX_INITIALIZER;
static char first_failure[2048];
static int failure_count;

void cuda_record_failure(const char *file, int line, const char *call, const char *result, const char *fmt, ...) {
    char detail[768];
    va_list args;
    va_start(args, fmt);
    vsnprintf(detail, sizeof detail, fmt, args);
    va_end(args);
    pthread_mutex_lock(&failure_lock);
    if (failure_count++ == 0)
        snprintf(first_failure, sizeof first_failure, "CUDA backend: %s failed: %s [%s] at %s:%d", call, result,
                 detail, file, line);
    pthread_mutex_unlock(&failure_lock);
}

bool cuda_has_failed(void) {
    pthread_mutex_lock(&failure_lock);
    bool failed = failure_count > 0;
    pthread_mutex_unlock(&failure_lock);
    return failed;
}

/* The first failure as a tf_status (TF_OK when none), for synchronize(). */
tf_status cuda_failure_status(void) {
    pthread_mutex_lock(&failure_lock);
    tf_status status = TF_OK;
    if (failure_count == 1)
        status = tf_fail(TF_ERR_RUNTIME, "%s", first_failure);
    else if (failure_count > 1)
        status = tf_fail(TF_ERR_RUNTIME, "%s (and %d later failures)", first_failure, failure_count - 1);
    pthread_mutex_unlock(&failure_lock);
    return status;
}

static void record_va(const char *file, int line, const char *call, const char *result, const char *fmt,
                      va_list args) {
    char detail[768];
    vsnprintf(detail, sizeof detail, fmt, args);
    cuda_record_failure(file, line, call, result, "%s", detail);
}

bool cuda_check_runtime(cudaError_t err, const char *call, const char *file, int line, const char *fmt, ...) {
    if (err == cudaSuccess) return true;
    char result[256];
    snprintf(result, sizeof result, "%s (%s, %d)", cudaGetErrorString(err), cudaGetErrorName(err), (int)err);
    va_list args;
    va_start(args, fmt);
    record_va(file, line, call, result, fmt, args);
    va_end(args);
    return false;
}

bool cuda_check_cublas(cublasStatus_t status, const char *call, const char *file, int line, const char *fmt, ...) {
    if (status == CUBLAS_STATUS_SUCCESS) return true;
    char result[256];
    snprintf(result, sizeof result, "%s (%d)", cublasLtGetStatusString(status), (int)status);
    va_list args;
    va_start(args, fmt);
    record_va(file, line, call, result, fmt, args);
    va_end(args);
    return false;
}

bool cuda_check_cudnn(cudnnStatus_t status, const char *call, const char *file, int line, const char *fmt, ...) {
    if (status == CUDNN_STATUS_SUCCESS) return true;
    char last[256] = "";
    cudnnGetLastErrorString(last, sizeof last);
    char result[512];
    snprintf(result, sizeof result, "%s (%d)%s%s", cudnnGetErrorString(status), (int)status, last[0] ? ": " : "",
             last);
    va_list args;
    va_start(args, fmt);
    record_va(file, line, call, result, fmt, args);
    va_end(args);
    return false;
}

bool cuda_check_launch(const char *kernel, const char *file, int line, const char *fmt, ...) {
    cudaError_t err = cudaGetLastError();
    const char *when = "launch of";
    if (err == cudaSuccess && cuda_ctx.debug_sync) {
        err = cudaStreamSynchronize(cuda_ctx.stream);
        when = "kernel (debug sync after)";
    }
    if (err == cudaSuccess) return true;
    char call[256], result[256];
    snprintf(call, sizeof call, "%s %s", when, kernel);
    snprintf(result, sizeof result, "%s (%s, %d)", cudaGetErrorString(err), cudaGetErrorName(err), (int)err);
    va_list args;
    va_start(args, fmt);
    record_va(file, line, call, result, fmt, args);
    va_end(args);
    return false;
}

/* ---- extras of cuda_backend.cuh ---- */
extern "C" void tf_cuda_reset_failure(void) {
    pthread_mutex_lock(&failure_lock);
    failure_count = 0;
    first_failure[0] = '\0';
    pthread_mutex_unlock(&failure_lock);
}

extern "C" void tf_cuda_set_debug_sync(bool on) {
    cuda_ctx.debug_sync = on;
}

extern "C" cudaStream_t tf_cuda_stream(void) {
    return cuda_ctx.stream;
}

extern "C" void tf_cuda_fill_bytes(void *buffer, int value, size_t bytes) {
    CUDA_CHECK(cudaMemsetAsync(buffer, value, bytes, cuda_ctx.stream), "fill %zu bytes at %p with 0x%02x", bytes,
               buffer, value & 0xff);
}

/* ---- start ---- */
__global__ void probe_kernel(int *out) {
    if (out) *out = 1;
}

/* Fails (tf_fail) with what is wrong when no GPU is usable. */
static tf_status open_device(void) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess)
        return tf_fail(TF_ERR_RUNTIME, "no usable CUDA GPU: cudaGetDeviceCount: %s (%s)", cudaGetErrorString(err),
                       cudaGetErrorName(err));
    if (count == 0) return tf_fail(TF_ERR_RUNTIME, "no usable CUDA GPU: cudaGetDeviceCount found 0 devices");
    err = cudaGetDevice(&cuda_ctx.device);
    if (err != cudaSuccess)
        return tf_fail(TF_ERR_RUNTIME, "no usable CUDA GPU: cudaGetDevice: %s", cudaGetErrorString(err));
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cuda_ctx.device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, cuda_ctx.device);
    cudaDeviceGetAttribute(&cuda_ctx.sm_count, cudaDevAttrMultiProcessorCount, cuda_ctx.device);
    cudaDeviceGetAttribute(&cuda_ctx.max_shared_per_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                           cuda_ctx.device);
    /* The kernels are built for sm_90 only: a launch tells whether this GPU can run them. */
    probe_kernel<<<1, 1>>>(NULL);
    err = cudaGetLastError();
    if (err == cudaSuccess) err = cudaDeviceSynchronize();
    if (err != cudaSuccess)
        return tf_fail(TF_ERR_RUNTIME,
                       "CUDA GPU %d (compute capability %d.%d) cannot run this build's kernels (built for "
                       "CMAKE_CUDA_ARCHITECTURES, default 90): %s",
                       cuda_ctx.device, major, minor, cudaGetErrorString(err));
    return TF_OK;
}

static tf_status open_libraries(void) {
    cudaError_t err = cudaStreamCreateWithFlags(&cuda_ctx.stream, cudaStreamNonBlocking);
    if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&cuda_ctx.copy_stream, cudaStreamNonBlocking);
    if (err != cudaSuccess) return tf_fail(TF_ERR_RUNTIME, "cudaStreamCreateWithFlags: %s", cudaGetErrorString(err));
    err = cudaEventCreateWithFlags(&cuda_ctx.pixels_read, cudaEventDisableTiming);
    if (err == cudaSuccess) err = cudaEventCreateWithFlags(&cuda_ctx.upload_done, cudaEventDisableTiming);
    if (err != cudaSuccess) return tf_fail(TF_ERR_RUNTIME, "cudaEventCreateWithFlags: %s", cudaGetErrorString(err));
    cublasStatus_t lt = cublasLtCreate(&cuda_ctx.lt);
    if (lt != CUBLAS_STATUS_SUCCESS)
        return tf_fail(TF_ERR_RUNTIME, "cublasLtCreate: %s", cublasLtGetStatusString(lt));
    cuda_ctx.lt_workspace_bytes = LT_WORKSPACE_BYTES;
    err = cudaMalloc(&cuda_ctx.lt_workspace, cuda_ctx.lt_workspace_bytes);
    if (err != cudaSuccess)
        return tf_fail(TF_ERR_RUNTIME, "cudaMalloc of the cuBLASLt workspace (32 MiB): %s", cudaGetErrorString(err));
    cuda_ctx.staging_bytes = STAGING_BYTES;
    err = cudaMallocHost(&cuda_ctx.staging, cuda_ctx.staging_bytes);
    if (err != cudaSuccess)
        return tf_fail(TF_ERR_RUNTIME, "cudaMallocHost of the staging buffer (32 MiB): %s", cudaGetErrorString(err));
    cuda_ctx.reduce_partials_count = cuda_ctx.sm_count * REDUCE_BLOCKS_PER_SM;
    size_t partial_bytes = (size_t)cuda_ctx.reduce_partials_count * sizeof(double);
    err = cudaMalloc(&cuda_ctx.reduce_partials, partial_bytes);
    if (err == cudaSuccess) err = cudaMallocHost(&cuda_ctx.reduce_partials_host, partial_bytes);
    if (err != cudaSuccess)
        return tf_fail(TF_ERR_RUNTIME, "allocating the reduction scratch: %s", cudaGetErrorString(err));
    return TF_OK;
}

/* cuDNN is optional: without it (or with a version whose fused attention is known to be
 * broken) attention runs on our kernels. */
static void open_cudnn(void) {
    cuda_ctx.cudnn_version = cudnnGetVersion();
    cudnnStatus_t status = cudnnCreate(&cuda_ctx.cudnn);
    if (status != CUDNN_STATUS_SUCCESS) {
        cuda_ctx.cudnn = NULL;
        snprintf(cuda_ctx.cudnn_unavailable, sizeof cuda_ctx.cudnn_unavailable, "cudnnCreate: %s",
                 cudnnGetErrorString(status));
        return;
    }
    status = cudnnSetStream(cuda_ctx.cudnn, cuda_ctx.stream);
    if (status != CUDNN_STATUS_SUCCESS) {
        snprintf(cuda_ctx.cudnn_unavailable, sizeof cuda_ctx.cudnn_unavailable, "cudnnSetStream: %s",
                 cudnnGetErrorString(status));
        return;
    }
    size_t v = cuda_ctx.cudnn_version;
    if (v < 90000)
        snprintf(cuda_ctx.cudnn_unavailable, sizeof cuda_ctx.cudnn_unavailable,
                 "cuDNN %zu.%zu.%zu is older than 9.0, whose attention graphs this backend builds", v / 10000,
                 v / 100 % 100, v % 100);
    else if (v == 91000 || v == 91001)
        snprintf(cuda_ctx.cudnn_unavailable, sizeof cuda_ctx.cudnn_unavailable,
                 "cuDNN 9.10.0 and 9.10.1 have a broken attention backward");
    else
        cuda_ctx.cudnn_unavailable[0] = '\0';
}

static void fill_table(tf_backend *t) {
    memset(t, 0, sizeof *t);
    t->name = "cuda";
    t->master_dtype = TF_DTYPE_F32;
    t->compute_dtype = TF_DTYPE_BF16;
    t->plans_per_shape = true;
    t->alloc = cuda_alloc;
    t->free = cuda_free;
    t->zero = cuda_zero;
    t->copy = cuda_copy;
    t->upload = cuda_upload;
    t->download = cuda_download;
    t->host_alloc = cuda_host_alloc;
    t->host_free = cuda_host_free;
    t->upload_bytes = cuda_upload_bytes;
    t->convert = cuda_convert;
    t->synchronize = cuda_synchronize;
    t->device_memory_in_use = cuda_device_memory_in_use;
    t->profile_mark = cuda_profile_mark;
    t->profile_elapsed_ms = cuda_profile_elapsed_ms;
    t->images_normalize = cuda_images_normalize;
    t->mixup_images = cuda_mixup_images;
    t->cutmix_images = cuda_cutmix_images;
    t->matmul = cuda_matmul;
    t->pattention_norm_forward = cuda_pattention_norm_forward;
    t->pattention_norm_backward = cuda_pattention_norm_backward;
    t->pattention_norm_pool = cuda_pattention_norm_pool;
    t->pattention_norm_recheck = cuda_pattention_norm_recheck;
    t->keys_exceed = cuda_keys_exceed;
    t->attention_forward = cuda_attention_forward;
    t->attention_backward = cuda_attention_backward;
    t->layernorm_forward = cuda_layernorm_forward;
    t->residual_layernorm_forward = cuda_residual_layernorm_forward;
    t->layernorm_backward = cuda_layernorm_backward;
    t->center_rows = cuda_center_rows;
    t->layernorm_variance = cuda_layernorm_variance;
    t->residual_forward = cuda_residual_forward;
    t->residual_backward = cuda_residual_backward;
    t->patch_im2col = cuda_patch_im2col;
    t->tokens_forward = cuda_tokens_forward;
    t->tokens_backward = cuda_tokens_backward;
    t->token_pool_forward = cuda_token_pool_forward;
    t->token_pool_backward = cuda_token_pool_backward;
    t->bias_backward = cuda_bias_backward;
    t->cross_entropy_forward_backward = cuda_cross_entropy_forward_backward;
    t->adamw_update = cuda_adamw_update;
    t->ema_update = cuda_ema_update;
    t->sum_squares = cuda_sum_squares;
}

extern "C" tf_status tf_cuda_backend(const tf_backend **backend) {
    static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&start_lock);
    tf_status status = TF_OK;
    if (!cuda_ctx.ready) {
        status = open_device();
        if (status == TF_OK) status = open_libraries();
        if (status == TF_OK) {
            open_cudnn();
            cuda_ctx.attention_prefer_cudnn = cuda_ctx.cudnn_unavailable[0] == '\0';
            fill_table(&cuda_table);
            cuda_ctx.ready = true;
            size_t v = cuda_ctx.cudnn_version;
            if (cuda_ctx.attention_prefer_cudnn)
                tf_log("CUDA backend on GPU %d (%d SMs); attention through cuDNN %zu.%zu.%zu, own kernels as "
                       "fallback",
                       cuda_ctx.device, cuda_ctx.sm_count, v / 10000, v / 100 % 100, v % 100);
            else
                tf_log("CUDA backend on GPU %d (%d SMs); attention on own kernels (cuDNN unavailable: %s)",
                       cuda_ctx.device, cuda_ctx.sm_count, cuda_ctx.cudnn_unavailable);
        }
    }
    pthread_mutex_unlock(&start_lock);
    if (status != TF_OK) return status;
    *backend = &cuda_table;
    return TF_OK;
}
