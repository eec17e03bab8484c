/* CUDA backend memory: device buffers (cudaMalloc, zero-filled), copies on the one stream (the
 * pixel upload on a copy stream beside it), host fp32 <-> device conversions through the pinned
 * staging buffer, pinned host buffers for the loader's batch ring, dtype conversion on the
 * device, and synchronize(), which waits for the stream and returns the first recorded failure.
 *
 * Master buffers are fp32, compute buffers bf16 (round to nearest even); fp64 buffers exist
 * only on the CPU backend. */
#include "kernels/cuda/cuda_common.cuh"

#include <string.h>

static const char *dtype_name(tf_dtype dtype) {
    return tf_dtype_name(dtype);
}

static bool dtype_supported(tf_dtype dtype, const char *what, size_t n) {
    if (dtype == TF_DTYPE_F32 || dtype == TF_DTYPE_BF16) return true;
    cuda_record_failure(__FILE__, __LINE__, what, "unsupported dtype", "%s of %zu elements in dtype %s (the CUDA "
                        "backend has F32 and BF16 buffers only)", what, n, dtype_name(dtype));
    return false;
}

extern "C" tf_status cuda_alloc(void **buffer, size_t bytes, const char *what) {
    size_t rounded = bytes ? (bytes + 255) / 256 * 256 : 256;
    cudaError_t err = cudaMalloc(buffer, rounded);
    if (err != cudaSuccess) {
        *buffer = NULL;
        cudaGetLastError(); /* clear the (non-sticky) allocation error */
        size_t free_bytes = 0, total_bytes = 0;
        cudaMemGetInfo(&free_bytes, &total_bytes);
        return tf_fail(TF_ERR_RUNTIME, "out of GPU memory allocating %s (%.1f MiB): cudaMalloc: %s (%.2f GiB free of %.2f GiB)",
                       what, (double)bytes / (1 << 20), cudaGetErrorString(err), (double)free_bytes / (1 << 30),
                       (double)total_bytes / (1 << 30));
    }
    /* Buffers are made at start, so waiting here costs nothing and keeps "zero-filled" true for
     * any stream or host access that follows. */
    err = cudaMemsetAsync(*buffer, 0, rounded, cuda_ctx.stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(cuda_ctx.stream);
    if (err != cudaSuccess)
        return tf_fail(TF_ERR_RUNTIME, "zeroing %s (%.1f MiB): %s", what, (double)bytes / (1 << 20),
                       cudaGetErrorString(err));
    return TF_OK;
}

extern "C" void cuda_free(void *buffer) {
    if (!buffer) return;
    CUDA_CHECK(cudaFree(buffer), "free %p", buffer);
}

extern "C" void cuda_zero(void *buffer, size_t bytes) {
    CUDA_CHECK(cudaMemsetAsync(buffer, 0, bytes, cuda_ctx.stream), "zero %zu bytes at %p", bytes, buffer);
}

extern "C" void cuda_copy(void *dst, const void *src, size_t bytes) {
    if (bytes == 0 || dst == src) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda_ctx.stream),
               "copy %zu bytes %p -> %p", bytes, src, dst);
}

/* Host fp32 -> device: fp32 goes straight; bf16 is rounded on the host into the pinned staging
 * buffer, one chunk at a time (the wait per chunk frees the staging buffer for the next). */
extern "C" void cuda_upload(void *dst, tf_dtype dst_dtype, const float *src, size_t n) {
    if (!dtype_supported(dst_dtype, "upload", n) || n == 0) return;
    if (dst_dtype == TF_DTYPE_F32) {
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyHostToDevice, cuda_ctx.stream),
                   "upload %zu F32 elements to %p", n, dst);
        CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream), "upload %zu F32 elements to %p", n, dst);
        return;
    }
    size_t chunk = cuda_ctx.staging_bytes / sizeof(bf16);
    bf16 *staging = (bf16 *)cuda_ctx.staging;
    for (size_t start = 0; start < n; start += chunk) {
        size_t count = n - start < chunk ? n - start : chunk;
        for (size_t i = 0; i < count; i++) staging[i] = __float2bfloat16(src[start + i]);
        if (!CUDA_CHECK(cudaMemcpyAsync((bf16 *)dst + start, staging, count * sizeof(bf16), cudaMemcpyHostToDevice,
                                        cuda_ctx.stream),
                        "upload %zu BF16 elements to %p (chunk at %zu)", n, dst, start))
            return;
        if (!CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream), "upload %zu BF16 elements to %p", n, dst)) return;
    }
}

extern "C" void cuda_download(float *dst, const void *src, tf_dtype src_dtype, size_t n) {
    if (!dtype_supported(src_dtype, "download", n) || n == 0) return;
    if (src_dtype == TF_DTYPE_F32) {
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToHost, cuda_ctx.stream),
                   "download %zu F32 elements from %p", n, src);
        CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream), "download %zu F32 elements from %p", n, src);
        return;
    }
    size_t chunk = cuda_ctx.staging_bytes / sizeof(bf16);
    const bf16 *staging = (const bf16 *)cuda_ctx.staging;
    for (size_t start = 0; start < n; start += chunk) {
        size_t count = n - start < chunk ? n - start : chunk;
        if (!CUDA_CHECK(cudaMemcpyAsync(cuda_ctx.staging, (const bf16 *)src + start, count * sizeof(bf16),
                                        cudaMemcpyDeviceToHost, cuda_ctx.stream),
                        "download %zu BF16 elements from %p (chunk at %zu)", n, src, start))
            return;
        if (!CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream), "download %zu BF16 elements from %p", n, src))
            return;
        for (size_t i = 0; i < count; i++) dst[start + i] = __bfloat162float(staging[i]);
    }
}

extern "C" tf_status cuda_host_alloc(void **buffer, size_t bytes) {
    cudaError_t err = cudaHostAlloc(buffer, bytes ? bytes : 64, cudaHostAllocPortable);
    if (err != cudaSuccess) {
        *buffer = NULL;
        cudaGetLastError();
        return tf_fail(TF_ERR_RUNTIME, "cudaHostAlloc of %.1f MiB of pinned host memory: %s",
                       (double)bytes / (1 << 20), cudaGetErrorString(err));
    }
    return TF_OK;
}

extern "C" void cuda_host_free(void *buffer) {
    if (!buffer) return;
    CUDA_CHECK(cudaFreeHost(buffer), "free pinned host buffer %p", buffer);
}

/* On the copy stream (cuda_context): after the last images_normalize queued, before everything
 * queued from now on. With pinned src the copy engine runs it beside the kernels in flight. */
extern "C" void cuda_upload_bytes(void *dst, const void *src, size_t bytes) {
    if (bytes == 0) return;
    if (!CUDA_CHECK(cudaStreamWaitEvent(cuda_ctx.copy_stream, cuda_ctx.pixels_read, 0), "upload %zu bytes", bytes))
        return;
    if (!CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cuda_ctx.copy_stream),
                    "upload %zu bytes %p -> %p", bytes, src, dst))
        return;
    if (!CUDA_CHECK(cudaEventRecord(cuda_ctx.upload_done, cuda_ctx.copy_stream), "upload %zu bytes", bytes)) return;
    CUDA_CHECK(cudaStreamWaitEvent(cuda_ctx.stream, cuda_ctx.upload_done, 0), "upload %zu bytes", bytes);
}

__global__ void convert_f32_to_bf16_kernel(bf16 *dst, const float *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16(src[i]);
}

__global__ void convert_bf16_to_f32_kernel(float *dst, const bf16 *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

extern "C" void cuda_convert(void *dst, tf_dtype dst_dtype, const void *src, tf_dtype src_dtype, size_t n) {
    if (!dtype_supported(dst_dtype, "convert", n) || !dtype_supported(src_dtype, "convert", n) || n == 0) return;
    if (dst_dtype == src_dtype) {
        cuda_copy(dst, src, n * tf_dtype_size(dst_dtype));
        return;
    }
    unsigned grid = grid_for(n, 256);
    if (dst_dtype == TF_DTYPE_BF16) {
        convert_f32_to_bf16_kernel<<<grid, 256, 0, cuda_ctx.stream>>>((bf16 *)dst, (const float *)src, n);
        LAUNCH_CHECK("convert_f32_to_bf16_kernel", "convert %zu elements F32 -> BF16", n);
    } else {
        convert_bf16_to_f32_kernel<<<grid, 256, 0, cuda_ctx.stream>>>((float *)dst, (const bf16 *)src, n);
        LAUNCH_CHECK("convert_bf16_to_f32_kernel", "convert %zu elements BF16 -> F32", n);
    }
}

extern "C" size_t cuda_device_memory_in_use(void) {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) return 0;
    return total_bytes - free_bytes;
}

/* Profiling marks: events on the stream, made on first use (at a profiled warm-up step). */
static cudaEvent_t profile_events[TF_PROFILE_MARKS];

extern "C" void cuda_profile_mark(int index) {
    if (index < 0 || index >= TF_PROFILE_MARKS) return;
    if (!profile_events[index] && !CUDA_CHECK(cudaEventCreate(&profile_events[index]), "profile event %d", index))
        return;
    CUDA_CHECK(cudaEventRecord(profile_events[index], cuda_ctx.stream), "profile mark %d", index);
}

extern "C" double cuda_profile_elapsed_ms(int from, int to) {
    float ms = 0.0f;
    if (from < 0 || to < 0 || from >= TF_PROFILE_MARKS || to >= TF_PROFILE_MARKS || !profile_events[from] ||
        !profile_events[to])
        return 0.0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, profile_events[from], profile_events[to]), "profile marks %d..%d", from, to);
    return ms;
}

extern "C" tf_status cuda_synchronize(void) {
    /* The stream waits for every upload queued before its work, so it waits for the copy stream too. */
    CUDA_CHECK(cudaStreamSynchronize(cuda_ctx.stream), "synchronize (a failure here comes from an earlier "
               "asynchronous operation; tf_cuda_set_debug_sync(true) finds which)");
    return cuda_failure_status();
}
