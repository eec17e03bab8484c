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

/* Helpers of the tensor-core kernels (attention_mma.cu, attention_wgmma.cuh), whose accumulator
 * layouts give each thread two rows (g and g + 8) shared by the four lanes of a quad. */
/* bf16(low), bf16(high) as one 32-bit register: low in the lower half (the lower address). */
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
    __nv_bfloat162 v = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<uint32_t *>(&v);
}
/* 2^x; x = -inf gives 0 (the probabilities are in [0, 1], so flushing denormals changes nothing
 * that reaches bf16). */
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
/* Max and sum over the four lanes of a quad (lanes 4 g .. 4 g + 3). */
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

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
