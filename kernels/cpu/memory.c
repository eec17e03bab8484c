/* CPU backend memory: host allocations, and conversions between host fp32 and the backend's
 * real type. The CPU has nothing asynchronous, so synchronize() only reports the first failure. */
#include "kernels/cpu/cpu_real.h"

#include "common/timer.h"

#include <stdlib.h>
#include <string.h>

tf_status CPU_FN(alloc)(void **buffer, size_t bytes, const char *what) {
    /* 64-byte alignment for vector loads; calloc semantics so buffers start zeroed. */
    size_t rounded = (bytes + 63) / 64 * 64;
    *buffer = aligned_alloc(64, rounded ? rounded : 64);
    if (!*buffer)
        return tf_fail(TF_ERR_RUNTIME, "out of host memory allocating %s (%.1f MiB)", what,
                       (double)bytes / (1 << 20));
    memset(*buffer, 0, rounded ? rounded : 64);
    return TF_OK;
}

void CPU_FN(free)(void *buffer) {
    free(buffer);
}

void CPU_FN(zero)(void *buffer, size_t bytes) {
    memset(buffer, 0, bytes);
}

void CPU_FN(copy)(void *dst, const void *src, size_t bytes) {
    memmove(dst, src, bytes);
}

void CPU_FN(upload_bytes)(void *dst, const void *src, size_t bytes) {
    memcpy(dst, src, bytes);
}

/* The CPU backend has no bf16 buffers, so every dtype here is this build's real or fp32. */
static double load_element(const void *src, tf_dtype dtype, size_t i) {
    return dtype == TF_DTYPE_F64 ? ((const double *)src)[i] : (double)((const float *)src)[i];
}

static void store_element(void *dst, tf_dtype dtype, size_t i, double value) {
    if (dtype == TF_DTYPE_F64)
        ((double *)dst)[i] = value;
    else
        ((float *)dst)[i] = (float)value;
}

void CPU_FN(upload)(void *dst, tf_dtype dst_dtype, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++) store_element(dst, dst_dtype, i, src[i]);
}

void CPU_FN(download)(float *dst, const void *src, tf_dtype src_dtype, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = (float)load_element(src, src_dtype, i);
}

void CPU_FN(convert)(void *dst, tf_dtype dst_dtype, const void *src, tf_dtype src_dtype, size_t n) {
    if (dst_dtype == src_dtype) {
        memmove(dst, src, n * tf_dtype_size(dst_dtype));
        return;
    }
    for (size_t i = 0; i < n; i++) store_element(dst, dst_dtype, i, load_element(src, src_dtype, i));
}

size_t CPU_FN(device_memory_in_use)(void) {
    return 0; /* host memory is not a device's */
}

/* CPU operations are done when they return, so a mark is the clock now. */
static double profile_marks[TF_PROFILE_MARKS];

void CPU_FN(profile_mark)(int index) {
    if (index >= 0 && index < TF_PROFILE_MARKS) profile_marks[index] = 1e3 * tf_seconds();
}

double CPU_FN(profile_elapsed_ms)(int from, int to) {
    return profile_marks[to] - profile_marks[from];
}

tf_status CPU_FN(synchronize)(void) {
    return TF_OK; /* CPU operations cannot fail after their buffers exist */
}

tf_status CPU_FN(host_alloc)(void **buffer, size_t bytes) {
    return CPU_FN(alloc)(buffer, bytes, "host batch buffer");
}

void CPU_FN(host_free)(void *buffer) {
    free(buffer);
}
