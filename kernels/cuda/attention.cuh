/* What the files of our own attention kernels share (attention.cu: dispatch and the plain FMA
 * kernels; attention_mma.cu: the tensor-core kernels for head_dim 32 and 64). Layout of q, k,
 * v, out: element (b, s, h, d) at ((b S + s) H + h) D + d; lse and delta: [b, h, s]. */
#ifndef TF_KERNELS_CUDA_ATTENTION_CUH
#define TF_KERNELS_CUDA_ATTENTION_CUH

#include "kernels/cuda/cuda_common.cuh"

enum { ATTENTION_TILE = 64 }; /* queries and keys per tile */

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

typedef struct {
    bf16 *out;
    float *lse;
    const bf16 *q, *k, *v;
    int batch, tokens, heads, head_dim;
    float scale;
} attention_forward_args;

typedef struct {
    bf16 *dq, *dk, *dv;
    const bf16 *dout, *q, *k, *v;
    const float *lse;
    const float *delta; /* D_i = dO_i . O_i, [batch, heads, tokens] */
    int batch, tokens, heads, head_dim;
    float scale;
} attention_backward_args;

/* Where (b, s, h, 0) lives. */
__device__ __forceinline__ size_t token_head_offset(int b, int s, int h, int tokens, int heads, int head_dim) {
    return (((size_t)b * tokens + s) * heads + h) * head_dim;
}

/* The tensor-core kernels take head_dim 32 or 64 with 16-byte aligned buffers. */
bool attention_mma_supports(int head_dim, const void *const *pointers, int count);
/* Launch on cuda_ctx.stream (launch errors are checked by the caller). */
void attention_mma_forward(const attention_forward_args &args);
void attention_mma_backward(const attention_backward_args &args);

/* The forward on Hopper's wgmma (attention_wgmma.cu, compiled for sm_90a): 193-200 tokens,
 * head_dim 64, 16-byte aligned buffers, a GPU of compute capability 9.0. Launches on
 * cuda_ctx.stream and returns true, or launches nothing and returns false. */
bool attention_wgmma_available(void);
bool attention_wgmma_forward(const attention_forward_args &args);

#endif
