/* What the CUDA backend offers beyond the tf_backend table, for tests and benchmarks. Plain C
 * declarations (the file is included by the C test and benchmark programs as well as by the
 * backend's own CUDA C++ files).
 *
 * Attention has two implementations: cuDNN's fused flash attention (built through cuDNN's
 * backend graph API, once per shape) and our own flash-style kernels (attention.cu,
 * attention_mma.cu, attention_wgmma.cu). cuDNN is preferred when it can be opened, except for the
 * forward our wgmma kernel takes (193-200 tokens, head_dim 64, Hopper), which is faster; a shape
 * whose cuDNN graph cannot be built falls back to our kernels, with one log line saying why. */
#ifndef TF_KERNELS_CUDA_BACKEND_CUH
#define TF_KERNELS_CUDA_BACKEND_CUH

#include <cuda_runtime.h>

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Prefer cuDNN (true) or our kernels (false) for the attention that follows; returns whether
 * cuDNN will be tried (false when it is unavailable, see tf_cuda_attention_cudnn_status). */
bool tf_cuda_attention_use_cudnn(bool use);

/* Let the wgmma forward take the shapes it can (true, the default) or not (false: tests and
 * benchmarks of the other implementations); returns whether it will (false on a GPU other than
 * compute capability 9.0). */
bool tf_cuda_attention_use_wgmma(bool use);

/* "" when cuDNN attention is available, otherwise why not. */
const char *tf_cuda_attention_cudnn_status(void);

/* Which implementation the last attention_forward / attention_backward used: "cudnn",
 * "own-wgmma" (forward only), "own-mma" (our tensor-core kernels, head_dim 32 and 64) or
 * "own-fma" (our plain kernels). */
const char *tf_cuda_attention_last_forward(void);
const char *tf_cuda_attention_last_backward(void);

/* Why the last attention call that preferred cuDNN ran on our kernels ("" if none did). */
const char *tf_cuda_attention_last_fallback_reason(void);

/* Wait after every kernel launch, so that a fault is blamed on the operation that caused it. */
void tf_cuda_set_debug_sync(bool on);

/* Forgets the recorded failure (tests, after reporting it), so that later operations are judged
 * on their own. An error that breaks the CUDA context cannot be forgotten this way. */
void tf_cuda_reset_failure(void);

/* The stream every operation runs on (for events in benchmarks). */
cudaStream_t tf_cuda_stream(void);

/* Fills bytes of a device buffer with one byte value (tests poison outputs with 0xff: NaN in
 * both bf16 and fp32). */
void tf_cuda_fill_bytes(void *buffer, int value, size_t bytes);

#ifdef __cplusplus
}
#endif

#endif
