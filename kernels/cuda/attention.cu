/* Multi-head softmax attention (not causal, scale c = 1 / sqrt(head_dim)) on q, k, v, out of
 * layout [batch * tokens, heads * head_dim]: element (b, s, h, d) at ((b S + s) H + h) D + d.
 *
 * Four implementations, chosen per call: for the forward of 193-200 tokens at head_dim 64 on
 * Hopper (ViT at 224 pixels), our wgmma kernel (attention_wgmma.cu), the fastest there; cuDNN's
 * fused flash attention (attention_cudnn.cu), preferred otherwise when its graph can be built for
 * the shape; our tensor-core kernels (attention_mma.cu) for head_dim 32 and 64; and the plain
 * fp32 FMA kernels below for any head_dim up to 128 (simple rather than fast: shared-memory
 * tiles, no tensor cores).
 *
 * Forward, per (b, h, tile of 64 queries), online softmax over tiles of 64 keys in base 2:
 *   s = c log2(e) q.k,  m = running max,  l = running sum of 2^(s - m),  o = running sum of
 *   2^(s - m) v, rescaled by 2^(m_old - m_new) when the max grows; out = o / l and
 *   lse = ln(2) (m + log2 l), the natural log-sum-exp of the scaled scores (cuDNN's "stats").
 * Backward, with P = exp(c q.k - lse) recomputed from lse, dP = dO v, D_i = dO_i . O_i:
 *   dS = P (dP - D),  dV = P^T dO,  dK = c dS^T Q,  dQ = c dS K.
 * Two kernels: one per tile of 64 keys accumulates dK and dV over all query tiles; one per
 * tile of 64 queries accumulates dQ over all key tiles. That recomputes P and dP once more
 * than FlashAttention-2 does, in exchange for no atomics and a deterministic result.
 *
 * Thread layout of the FMA kernels: a 64 x 64 tile is shared by 16 x TX threads
 * (TX = THREADS / 16); thread (ty, tx) owns rows 4 ty .. 4 ty + 3 and columns tx, tx + TX, ...
 * The TX threads of a row group are consecutive lanes of one warp, so row reductions are
 * shuffles. Shared-memory rows are padded to an odd number of floats so that reads along a
 * column hit distinct banks. */
#include "kernels/cuda/attention.cuh"

extern "C" {
#include "common/log.h"
}

#include <math.h>
#include <stdio.h>
#include <string.h>

enum { TILE_PAD = ATTENTION_TILE + 1 };
#define TILE ATTENTION_TILE

/* A tile of 64 token rows of one head, as floats times `multiplier`; rows past the sequence and
 * columns past head_dim are zero. dst: [TILE][DMAX + 1]. */
template <int DMAX, int THREADS>
__device__ __forceinline__ void load_tile(float *dst, const bf16 *src, int b, int h, int s0, int tokens, int heads,
                                          int head_dim, float multiplier) {
    for (int index = threadIdx.x; index < TILE * DMAX; index += THREADS) {
        int r = index / DMAX, d = index % DMAX, s = s0 + r;
        float value = 0.0f;
        if (s < tokens && d < head_dim)
            value = bf16_load(src + token_head_offset(b, s, h, tokens, heads, head_dim) + d) * multiplier;
        dst[r * (DMAX + 1) + d] = value;
    }
}

/* Reductions over the TX consecutive lanes that share a row group. */
template <int TX>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
    for (int offset = TX / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
template <int TX>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int offset = TX / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

/* acc[i][j] += sum_d a[4 ty + i][d] b[tx + TX j][d]: a 64 x 64 tile of dot products. */
template <int DMAX, int TX>
__device__ __forceinline__ void tile_dot_rows(float acc[4][TILE / TX], const float *a, const float *b, int ty,
                                              int tx) {
    constexpr int STRIDE = DMAX + 1;
#pragma unroll 4
    for (int d = 0; d < DMAX; d++) {
        float av[4], bv[TILE / TX];
#pragma unroll
        for (int i = 0; i < 4; i++) av[i] = a[(4 * ty + i) * STRIDE + d];
#pragma unroll
        for (int j = 0; j < TILE / TX; j++) bv[j] = b[(tx + TX * j) * STRIDE + d];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < TILE / TX; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

/* acc[i][j] += sum_k p[4 ty + i][k] v[k][tx + TX j]: a (64 x 64) by (64 x DMAX) product.
 * p: [TILE][TILE_PAD]; v: [TILE][DMAX + 1]. */
template <int DMAX, int TX>
__device__ __forceinline__ void tile_times_values(float acc[4][DMAX / TX], const float *p, const float *v, int ty,
                                                  int tx) {
    constexpr int STRIDE = DMAX + 1;
#pragma unroll 4
    for (int k = 0; k < TILE; k++) {
        float pv[4], vv[DMAX / TX];
#pragma unroll
        for (int i = 0; i < 4; i++) pv[i] = p[(4 * ty + i) * TILE_PAD + k];
#pragma unroll
        for (int j = 0; j < DMAX / TX; j++) vv[j] = v[k * STRIDE + tx + TX * j];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < DMAX / TX; j++) acc[i][j] = fmaf(pv[i], vv[j], acc[i][j]);
    }
}

template <int DMAX, int THREADS>
__global__ __launch_bounds__(THREADS) void attention_forward_kernel(attention_forward_args args) {
    constexpr int TX = THREADS / 16, STRIDE = DMAX + 1;
    extern __shared__ float shared[];
    float *qs = shared, *ks = qs + TILE * STRIDE, *vs = ks + TILE * STRIDE, *ps = vs + TILE * STRIDE;
    int q0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    int ty = threadIdx.x / TX, tx = threadIdx.x % TX;
    int tokens = args.tokens;

    load_tile<DMAX, THREADS>(qs, args.q, b, h, q0, tokens, args.heads, args.head_dim, args.scale * LOG2E);
    float m[4], l[4], o[4][DMAX / TX];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < DMAX / TX; j++) o[i][j] = 0.0f;
    }
    for (int k0 = 0; k0 < tokens; k0 += TILE) {
        __syncthreads(); /* the previous tile is done with ks, vs, ps */
        load_tile<DMAX, THREADS>(ks, args.k, b, h, k0, tokens, args.heads, args.head_dim, 1.0f);
        load_tile<DMAX, THREADS>(vs, args.v, b, h, k0, tokens, args.heads, args.head_dim, 1.0f);
        __syncthreads();
        float s[4][TILE / TX];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < TILE / TX; j++) s[i][j] = 0.0f;
        tile_dot_rows<DMAX, TX>(s, qs, ks, ty, tx);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float row_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < TILE / TX; j++) {
                if (k0 + tx + TX * j >= tokens) s[i][j] = -INFINITY;
                row_max = fmaxf(row_max, s[i][j]);
            }
            float m_new = fmaxf(m[i], group_max<TX>(row_max)); /* finite: every tile has a key */
            float correction = exp2f(m[i] - m_new), row_sum = 0.0f;
#pragma unroll
            for (int j = 0; j < TILE / TX; j++) {
                float p = exp2f(s[i][j] - m_new);
                row_sum += p;
                ps[(4 * ty + i) * TILE_PAD + tx + TX * j] = p;
            }
            l[i] = l[i] * correction + group_sum<TX>(row_sum);
            m[i] = m_new;
#pragma unroll
            for (int j = 0; j < DMAX / TX; j++) o[i][j] *= correction;
        }
        __syncthreads();
        tile_times_values<DMAX, TX>(o, ps, vs, ty, tx);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int s_index = q0 + 4 * ty + i;
        if (s_index >= tokens) continue;
        float inverse = 1.0f / l[i];
        bf16 *out = args.out + token_head_offset(b, s_index, h, tokens, args.heads, args.head_dim);
#pragma unroll
        for (int j = 0; j < DMAX / TX; j++) {
            int d = tx + TX * j;
            if (d < args.head_dim) bf16_store(out + d, o[i][j] * inverse);
        }
        if (tx == 0) args.lse[((size_t)b * args.heads + h) * tokens + s_index] = (m[i] + log2f(l[i])) * LN2;
    }
}

/* D_i = dO_i . O_i, one thread per (b, s, h). */
__global__ void attention_delta_kernel(float *delta, const bf16 *dout, const bf16 *out, int batch, int tokens,
                                       int heads, int head_dim) {
    size_t count = (size_t)batch * tokens * heads;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        const bf16 *g = dout + i * head_dim, *o = out + i * head_dim;
        float sum = 0.0f;
        for (int d = 0; d < head_dim; d++) sum = fmaf(bf16_load(g + d), bf16_load(o + d), sum);
        int h = (int)(i % heads);
        size_t token = i / heads;
        int s = (int)(token % tokens);
        size_t b = token / tokens;
        delta[(b * heads + h) * tokens + s] = sum;
    }
}

/* Per (b, h, tile of 64 keys): dV = sum over queries of P^T dO, dK = c sum of dS^T Q. The
 * tiles are computed key-major (rows = keys, columns = queries). */
template <int DMAX, int THREADS>
__global__ __launch_bounds__(THREADS) void attention_backward_key_kernel(attention_backward_args args) {
    constexpr int TX = THREADS / 16, STRIDE = DMAX + 1;
    extern __shared__ float shared[];
    float *ks = shared, *vs = ks + TILE * STRIDE, *qs = vs + TILE * STRIDE, *dos = qs + TILE * STRIDE;
    float *pt = dos + TILE * STRIDE, *dst = pt + TILE * TILE_PAD, *lse2 = dst + TILE * TILE_PAD, *delta = lse2 + TILE;
    int k0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    int ty = threadIdx.x / TX, tx = threadIdx.x % TX;
    int tokens = args.tokens, heads = args.heads, head_dim = args.head_dim;
    const float *lse_bh = args.lse + ((size_t)b * heads + h) * tokens;
    const float *delta_bh = args.delta + ((size_t)b * heads + h) * tokens;

    /* K scaled by c log2(e): s below is in base 2, as lse2 = lse log2(e). */
    load_tile<DMAX, THREADS>(ks, args.k, b, h, k0, tokens, heads, head_dim, args.scale * LOG2E);
    load_tile<DMAX, THREADS>(vs, args.v, b, h, k0, tokens, heads, head_dim, 1.0f);
    float dk[4][DMAX / TX], dv[4][DMAX / TX];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < DMAX / TX; j++) dk[i][j] = dv[i][j] = 0.0f;

    for (int q0 = 0; q0 < tokens; q0 += TILE) {
        __syncthreads(); /* the previous tile is done with qs, dos, pt, dst */
        load_tile<DMAX, THREADS>(qs, args.q, b, h, q0, tokens, heads, head_dim, 1.0f);
        load_tile<DMAX, THREADS>(dos, args.dout, b, h, q0, tokens, heads, head_dim, 1.0f);
        for (int r = threadIdx.x; r < TILE; r += THREADS) {
            bool valid = q0 + r < tokens;
            lse2[r] = valid ? lse_bh[q0 + r] * LOG2E : INFINITY;
            delta[r] = valid ? delta_bh[q0 + r] : 0.0f;
        }
        __syncthreads();
        float s[4][TILE / TX], dp[4][TILE / TX];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < TILE / TX; j++) s[i][j] = dp[i][j] = 0.0f;
        tile_dot_rows<DMAX, TX>(s, ks, qs, ty, tx);
        tile_dot_rows<DMAX, TX>(dp, vs, dos, ty, tx);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            bool key_valid = k0 + 4 * ty + i < tokens;
#pragma unroll
            for (int j = 0; j < TILE / TX; j++) {
                int qi = tx + TX * j;
                float p = key_valid && q0 + qi < tokens ? exp2f(s[i][j] - lse2[qi]) : 0.0f;
                pt[(4 * ty + i) * TILE_PAD + qi] = p;
                dst[(4 * ty + i) * TILE_PAD + qi] = p * (dp[i][j] - delta[qi]);
            }
        }
        __syncthreads();
        tile_times_values<DMAX, TX>(dv, pt, dos, ty, tx);
        tile_times_values<DMAX, TX>(dk, dst, qs, ty, tx);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int s_index = k0 + 4 * ty + i;
        if (s_index >= tokens) continue;
        size_t offset = token_head_offset(b, s_index, h, tokens, heads, head_dim);
#pragma unroll
        for (int j = 0; j < DMAX / TX; j++) {
            int d = tx + TX * j;
            if (d < head_dim) {
                bf16_store(args.dk + offset + d, dk[i][j] * args.scale);
                bf16_store(args.dv + offset + d, dv[i][j]);
            }
        }
    }
}

/* Per (b, h, tile of 64 queries): dQ = c sum over keys of dS K. */
template <int DMAX, int THREADS>
__global__ __launch_bounds__(THREADS) void attention_backward_query_kernel(attention_backward_args args) {
    constexpr int TX = THREADS / 16, STRIDE = DMAX + 1;
    extern __shared__ float shared[];
    float *qs = shared, *dos = qs + TILE * STRIDE, *ks = dos + TILE * STRIDE, *vs = ks + TILE * STRIDE;
    float *ds = vs + TILE * STRIDE;
    int q0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    int ty = threadIdx.x / TX, tx = threadIdx.x % TX;
    int tokens = args.tokens, heads = args.heads, head_dim = args.head_dim;
    const float *lse_bh = args.lse + ((size_t)b * heads + h) * tokens;
    const float *delta_bh = args.delta + ((size_t)b * heads + h) * tokens;

    load_tile<DMAX, THREADS>(qs, args.q, b, h, q0, tokens, heads, head_dim, args.scale * LOG2E);
    load_tile<DMAX, THREADS>(dos, args.dout, b, h, q0, tokens, heads, head_dim, 1.0f);
    float lse2[4], delta[4], dq[4][DMAX / TX];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int s_index = q0 + 4 * ty + i;
        bool valid = s_index < tokens;
        lse2[i] = valid ? lse_bh[s_index] * LOG2E : INFINITY;
        delta[i] = valid ? delta_bh[s_index] : 0.0f;
#pragma unroll
        for (int j = 0; j < DMAX / TX; j++) dq[i][j] = 0.0f;
    }
    for (int k0 = 0; k0 < tokens; k0 += TILE) {
        __syncthreads(); /* the previous tile is done with ks, vs, ds */
        load_tile<DMAX, THREADS>(ks, args.k, b, h, k0, tokens, heads, head_dim, 1.0f);
        load_tile<DMAX, THREADS>(vs, args.v, b, h, k0, tokens, heads, head_dim, 1.0f);
        __syncthreads();
        float s[4][TILE / TX], dp[4][TILE / TX];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < TILE / TX; j++) s[i][j] = dp[i][j] = 0.0f;
        /* qs carries c log2(e); ks is plain, so the same tile serves the dQ product below. */
        tile_dot_rows<DMAX, TX>(s, qs, ks, ty, tx);
        tile_dot_rows<DMAX, TX>(dp, dos, vs, ty, tx);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < TILE / TX; j++) {
                int kj = tx + TX * j;
                float p = k0 + kj < tokens ? exp2f(s[i][j] - lse2[i]) : 0.0f;
                ds[(4 * ty + i) * TILE_PAD + kj] = p * (dp[i][j] - delta[i]);
            }
        __syncthreads();
        tile_times_values<DMAX, TX>(dq, ds, ks, ty, tx);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int s_index = q0 + 4 * ty + i;
        if (s_index >= tokens) continue;
        bf16 *dq_row = args.dq + token_head_offset(b, s_index, h, tokens, heads, head_dim);
#pragma unroll
        for (int j = 0; j < DMAX / TX; j++) {
            int d = tx + TX * j;
            if (d < head_dim) bf16_store(dq_row + d, dq[i][j] * args.scale);
        }
    }
}

/* ---- launching our kernels ---- */
template <int DMAX>
static size_t forward_shared_bytes(void) {
    return (size_t)(3 * TILE * (DMAX + 1) + TILE * TILE_PAD) * sizeof(float);
}
template <int DMAX>
static size_t backward_key_shared_bytes(void) {
    return (size_t)(4 * TILE * (DMAX + 1) + 2 * TILE * TILE_PAD + 2 * TILE) * sizeof(float);
}
template <int DMAX>
static size_t backward_query_shared_bytes(void) {
    return (size_t)(4 * TILE * (DMAX + 1) + TILE * TILE_PAD) * sizeof(float);
}

/* Raises a kernel's dynamic shared memory limit (once per kernel). */
static bool allow_shared(const void *kernel, size_t bytes, bool *done, const char *name) {
    if (*done) return true;
    if (!CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
                    "%s with %zu bytes of shared memory", name, bytes))
        return false;
    *done = true;
    return true;
}

template <int DMAX, int THREADS>
static void own_forward(const attention_forward_args &args) {
    static bool prepared;
    size_t bytes = forward_shared_bytes<DMAX>();
    if (!allow_shared((const void *)attention_forward_kernel<DMAX, THREADS>, bytes, &prepared,
                      "attention_forward_kernel"))
        return;
    dim3 grid(ceil_div_u((size_t)args.tokens, TILE), args.heads, args.batch);
    attention_forward_kernel<DMAX, THREADS><<<grid, THREADS, bytes, cuda_ctx.stream>>>(args);
}

template <int DMAX, int THREADS>
static void own_backward(const attention_backward_args &args) {
    static bool prepared_key, prepared_query;
    size_t key_bytes = backward_key_shared_bytes<DMAX>(), query_bytes = backward_query_shared_bytes<DMAX>();
    if (!allow_shared((const void *)attention_backward_key_kernel<DMAX, THREADS>, key_bytes, &prepared_key,
                      "attention_backward_key_kernel") ||
        !allow_shared((const void *)attention_backward_query_kernel<DMAX, THREADS>, query_bytes, &prepared_query,
                      "attention_backward_query_kernel"))
        return;
    dim3 grid(ceil_div_u((size_t)args.tokens, TILE), args.heads, args.batch);
    attention_backward_key_kernel<DMAX, THREADS><<<grid, THREADS, key_bytes, cuda_ctx.stream>>>(args);
    if (!LAUNCH_CHECK("attention_backward_key_kernel", "batch %d tokens %d heads %d head_dim %d", args.batch,
                      args.tokens, args.heads, args.head_dim))
        return;
    attention_backward_query_kernel<DMAX, THREADS><<<grid, THREADS, query_bytes, cuda_ctx.stream>>>(args);
}

/* The D_i buffer of backward, grown when a larger shape is seen (at warm-up). */
static float *delta_buffer;
static size_t delta_capacity;

static float *delta_workspace(size_t count) {
    if (count <= delta_capacity) return delta_buffer;
    if (delta_buffer) CUDA_CHECK(cudaFree(delta_buffer), "attention delta workspace");
    delta_buffer = NULL;
    delta_capacity = 0;
    if (!CUDA_CHECK(cudaMalloc(&delta_buffer, count * sizeof(float)), "attention delta workspace of %zu floats",
                    count))
        return NULL;
    delta_capacity = count;
    return delta_buffer;
}

/* Which of our kernels the last call ran: "own-mma" (tensor cores) or "own-fma". */
static const char *last_own = "own";

#define ATTENTION_FORMAT "batch %d tokens %d heads %d head_dim %d"
#define ATTENTION_SHAPE ATTENTION_FORMAT, batch, tokens, heads, head_dim

static attention_forward_args forward_args(void *out, void *lse, const void *q, const void *k, const void *v,
                                           int batch, int tokens, int heads, int head_dim) {
    attention_forward_args args;
    args.out = (bf16 *)out;
    args.lse = (float *)lse;
    args.q = (const bf16 *)q;
    args.k = (const bf16 *)k;
    args.v = (const bf16 *)v;
    args.batch = batch;
    args.tokens = tokens;
    args.heads = heads;
    args.head_dim = head_dim;
    args.scale = 1.0f / sqrtf((float)head_dim);
    return args;
}

static void own_attention_forward(void *out, void *lse, const void *q, const void *k, const void *v, int batch,
                                  int tokens, int heads, int head_dim) {
    attention_forward_args args = forward_args(out, lse, q, k, v, batch, tokens, heads, head_dim);
    const void *pointers[5] = {out, lse, q, k, v};
    if (attention_mma_supports(head_dim, pointers, 5)) {
        attention_mma_forward(args);
        last_own = "own-mma";
    } else {
        if (head_dim <= 32)
            own_forward<32, 128>(args);
        else if (head_dim <= 64)
            own_forward<64, 128>(args);
        else
            own_forward<128, 256>(args);
        last_own = "own-fma";
    }
    LAUNCH_CHECK("attention_forward_kernel", ATTENTION_SHAPE);
}

static void own_attention_backward(void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                                   const void *v, const void *out, const void *lse, int batch, int tokens, int heads,
                                   int head_dim) {
    size_t rows = (size_t)batch * heads * tokens;
    float *delta = delta_workspace(rows);
    if (!delta) return;
    attention_delta_kernel<<<grid_for(rows, 256), 256, 0, cuda_ctx.stream>>>(delta, (const bf16 *)dout,
                                                                              (const bf16 *)out, batch, tokens,
                                                                              heads, head_dim);
    if (!LAUNCH_CHECK("attention_delta_kernel", ATTENTION_SHAPE)) return;
    attention_backward_args args;
    args.dq = (bf16 *)dq;
    args.dk = (bf16 *)dk;
    args.dv = (bf16 *)dv;
    args.dout = (const bf16 *)dout;
    args.q = (const bf16 *)q;
    args.k = (const bf16 *)k;
    args.v = (const bf16 *)v;
    args.lse = (const float *)lse;
    args.delta = delta;
    args.batch = batch;
    args.tokens = tokens;
    args.heads = heads;
    args.head_dim = head_dim;
    args.scale = 1.0f / sqrtf((float)head_dim);
    const void *pointers[8] = {dq, dk, dv, dout, q, k, v, out};
    if (attention_mma_supports(head_dim, pointers, 8)) {
        attention_mma_backward(args);
        last_own = "own-mma";
    } else {
        if (head_dim <= 32)
            own_backward<32, 128>(args);
        else if (head_dim <= 64)
            own_backward<64, 128>(args);
        else
            own_backward<128, 256>(args);
        last_own = "own-fma";
    }
    LAUNCH_CHECK("attention_backward_query_kernel", ATTENTION_SHAPE);
}

/* ---- choosing the implementation ---- */
static const char *last_forward = "none", *last_backward = "none";
static char last_fallback_reason[1024];

static bool wgmma_allowed = true;

extern "C" bool tf_cuda_attention_use_wgmma(bool use) {
    wgmma_allowed = use;
    return use && attention_wgmma_available();
}

extern "C" bool tf_cuda_attention_use_cudnn(bool use) {
    cuda_ctx.attention_prefer_cudnn = use && cuda_ctx.cudnn && cuda_ctx.cudnn_unavailable[0] == '\0';
    return cuda_ctx.attention_prefer_cudnn;
}

extern "C" const char *tf_cuda_attention_cudnn_status(void) {
    if (!cuda_ctx.ready) return "the CUDA backend is not started";
    return cuda_ctx.cudnn_unavailable;
}

extern "C" const char *tf_cuda_attention_last_forward(void) {
    return last_forward;
}

extern "C" const char *tf_cuda_attention_last_backward(void) {
    return last_backward;
}

extern "C" const char *tf_cuda_attention_last_fallback_reason(void) {
    return last_fallback_reason;
}

static bool shape_supported(int batch, int tokens, int heads, int head_dim) {
    if (batch > 0 && tokens > 0 && heads > 0 && head_dim > 0 && head_dim <= 128 && heads <= 65535 && batch <= 65535)
        return true;
    cuda_record_failure(__FILE__, __LINE__, "attention", "unsupported shape",
                        ATTENTION_FORMAT " (our kernels take head_dim <= 128, heads and batch <= 65535)", batch,
                        tokens, heads, head_dim);
    return false;
}

/* cuDNN's tensors are declared 16-byte aligned; a view at another offset takes our kernels. */
static bool cudnn_alignment_ok(const void *const *pointers, int count) {
    for (int i = 0; i < count; i++)
        if (!is_aligned16(pointers[i])) {
            snprintf(last_fallback_reason, sizeof last_fallback_reason,
                     "a buffer is not 16-byte aligned (%p), which cuDNN's tensors are declared to be", pointers[i]);
            return false;
        }
    return true;
}

extern "C" void cuda_attention_forward(void *out, void *lse, const void *q, const void *k, const void *v, int batch,
                                       int tokens, int heads, int head_dim) {
    /* 193-200 tokens on Hopper (ViT at 224 pixels: 197): our wgmma kernel, which is faster than
     * cuDNN's there (docs/performance.md, rows 28 and 29). Its log-sum-exp is what cuDNN's backward reads. */
    if (wgmma_allowed && attention_wgmma_forward(forward_args(out, lse, q, k, v, batch, tokens, heads, head_dim))) {
        LAUNCH_CHECK("attention_forward_kernel (wgmma)", ATTENTION_SHAPE);
        last_forward = "own-wgmma";
        return;
    }
    const void *pointers[5] = {out, lse, q, k, v};
    if (cuda_ctx.attention_prefer_cudnn && cudnn_alignment_ok(pointers, 5)) {
        if (cudnn_attention_forward(out, lse, q, k, v, batch, tokens, heads, head_dim, last_fallback_reason,
                                    sizeof last_fallback_reason)) {
            last_forward = "cudnn";
            return;
        }
    }
    if (!shape_supported(batch, tokens, heads, head_dim)) return;
    own_attention_forward(out, lse, q, k, v, batch, tokens, heads, head_dim);
    last_forward = last_own;
}

extern "C" void cuda_attention_backward(void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                                        const void *v, const void *out, const void *lse, int batch, int tokens,
                                        int heads, int head_dim) {
    const void *pointers[9] = {dq, dk, dv, dout, q, k, v, out, lse};
    if (cuda_ctx.attention_prefer_cudnn && cudnn_alignment_ok(pointers, 9)) {
        if (cudnn_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, batch, tokens, heads, head_dim,
                                     last_fallback_reason, sizeof last_fallback_reason)) {
            last_backward = "cudnn";
            return;
        }
    }
    if (!shape_supported(batch, tokens, heads, head_dim)) return;
    own_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, batch, tokens, heads, head_dim);
    last_backward = last_own;
}
