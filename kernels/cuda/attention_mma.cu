/* Our attention on tensor cores, for head_dim 32 and 64 (the model's head sizes): the same
 * algorithm as the plain kernels of attention.cu (FlashAttention-2 forward with the online
 * softmax in base 2; backward as one kernel per key tile for dK, dV and one per query tile
 * for dQ, no atomics), with every product done by mma.sync m16n8k16 (bf16 inputs, fp32
 * accumulation). P and dS enter their products rounded to bf16, as in cuDNN and
 * FlashAttention; the softmax statistics stay fp32.
 *
 * A CTA has 4 warps and a tile of 64 rows; each warp owns 16 rows. Fragment layouts of
 * m16n8k16 (lane = 4 g + t):
 *   A (16 x 16, row-major): {a0,a1} = A[g][2t, 2t+1], {a2,a3} = A[g+8][2t, 2t+1],
 *                           {a4,a5} = A[g][2t+8, 2t+9], {a6,a7} = A[g+8][2t+8, 2t+9]
 *   B (16 x 8):             {b0,b1} = B[2t, 2t+1][g],  {b2,b3} = B[2t+8, 2t+9][g]
 *   C (16 x 8, fp32):       {c0,c1} = C[g][2t, 2t+1], {c2,c3} = C[g+8][2t, 2t+1]
 * so two neighbouring 16 x 8 accumulator blocks of scores are exactly the A fragment of the
 * next product (scores x values), and a B operand whose k index runs along a row of shared
 * memory is one 32-bit load per pair. In the backward kernels, operands needed the other way
 * round are stored transposed in shared memory when their tile is loaded, and shared-memory rows
 * are padded by 8 bf16 (16 bytes), which spreads the 8 g-rows of a fragment load over distinct
 * banks; the forward kernels read their fragments through ldmatrix (see "forward" below). */
#include "kernels/cuda/attention.cuh"

enum { MMA_THREADS = 128, ROW_PAD = 8 };
#define TILE ATTENTION_TILE

__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Two bf16 at p (p even): the lower address in the low half. */
__device__ __forceinline__ uint32_t load_pair(const bf16 *p) {
    return *reinterpret_cast<const uint32_t *>(p);
}

/* The A fragment of rows [row0, row0 + 16) and columns [col0, col0 + 16) of a row-major tile
 * with row stride `stride` (bf16). */
__device__ __forceinline__ void load_a_fragment(uint32_t a[4], const bf16 *tile, int stride, int row0, int col0,
                                                int g, int t) {
    const bf16 *top = tile + (row0 + g) * stride + col0 + 2 * t, *bottom = top + 8 * stride;
    a[0] = load_pair(top);
    a[1] = load_pair(bottom);
    a[2] = load_pair(top + 8);
    a[3] = load_pair(bottom + 8);
}

/* The A fragment (16 rows x 16 columns 16 kc .. 16 kc + 15) made from the accumulator blocks
 * 2 kc and 2 kc + 1 (columns 8 apart). */
__device__ __forceinline__ void accumulators_to_a(uint32_t a[4], const float low[4], const float high[4]) {
    a[0] = pack_pair(low[0], low[1]);
    a[1] = pack_pair(low[2], low[3]);
    a[2] = pack_pair(high[0], high[1]);
    a[3] = pack_pair(high[2], high[3]);
}

/* 64 token rows of one head into shared memory, row-major [64][D + ROW_PAD], rows past the
 * sequence zero. 16-byte loads (head_dim == D, buffers 16-byte aligned). */
template <int D>
__device__ __forceinline__ void load_rows(bf16 *dst, const bf16 *src, int b, int h, int s0, int tokens, int heads) {
    constexpr int CHUNKS = D / 8, STRIDE = D + ROW_PAD;
    for (int c = threadIdx.x; c < TILE * CHUNKS; c += MMA_THREADS) {
        int r = c / CHUNKS, part = c % CHUNKS, s = s0 + r;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (s < tokens) value = *reinterpret_cast<const uint4 *>(src + token_head_offset(b, s, h, tokens, heads, D) + part * 8);
        *reinterpret_cast<uint4 *>(dst + r * STRIDE + part * 8) = value;
    }
}

/* The same rows transposed: [D][64 + ROW_PAD], element (d, r). */
template <int D>
__device__ __forceinline__ void load_rows_transposed(bf16 *dst, const bf16 *src, int b, int h, int s0, int tokens,
                                                     int heads) {
    constexpr int CHUNKS = D / 8, STRIDE = TILE + ROW_PAD;
    for (int c = threadIdx.x; c < TILE * CHUNKS; c += MMA_THREADS) {
        int r = c / CHUNKS, part = c % CHUNKS, s = s0 + r;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (s < tokens) value = *reinterpret_cast<const uint4 *>(src + token_head_offset(b, s, h, tokens, heads, D) + part * 8);
        const bf16 *e = reinterpret_cast<const bf16 *>(&value);
#pragma unroll
        for (int i = 0; i < 8; i++) dst[(part * 8 + i) * STRIDE + r] = e[i];
    }
}

/* ---- forward ----
 * Each warp owns a unit of 16 query rows (A fragments straight from global memory, rows past
 * the sequence zero) and walks the keys in chunks of 64 (`attend`): scores, online softmax,
 * o += p v, with no bounds checks in a full chunk and the last, shorter chunk a body of its
 * own per count of 8-key blocks (so that no product waits behind a branch). K and V come into
 * shared memory by cp.async; fragments come out through ldmatrix: K's rows are the scores' B
 * operand as they are, V's through the transposing form. A row of D bf16 is D / 8 chunks of 16
 * bytes, stored swizzled (`swizzled`) so that the 8 rows an ldmatrix reads fall in distinct
 * banks without padding.
 * Two kernels: for sequences that fit in shared memory (ViT's 197 tokens) one CTA per (image,
 * head) loads K and V once and its four warps take the units in turn
 * (attention_forward_whole_kernel); longer ones go by tiles of 64 queries per CTA, loading K
 * and V 64 rows at a time (attention_forward_mma_kernel). Measured on the H100 (512 x 12
 * heads x 197 x 64, whole sequence): 0.356 ms, against cuDNN's 0.337 (so cuDNN stays first)
 * and 0.646 for a first form with a branch per 8-key block; bound by the latency of its
 * dependent products and exponentials (3 CTAs an SM; 4, or two units of queries a warp sharing
 * each K and V fragment, ran slower). docs/performance.md, "Attention of our own". */
__device__ __forceinline__ void cp_async16(void *shared, const void *global) {
    unsigned address = (unsigned)__cvta_generic_to_shared(shared);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const bf16 *shared) {
    unsigned address = (unsigned)__cvta_generic_to_shared(shared);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_transposed(uint32_t r[4], const bf16 *shared) {
    unsigned address = (unsigned)__cvta_generic_to_shared(shared);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

/* WHOLE_BLOCKS_PER_SM: 53 KB of shared memory and up to 168 registers a thread for B/16's 197
 * tokens (4 CTAs spill registers and ran 3% slower) */
enum { WHOLE_MAX_TOKENS = 256, RESCALE_LOG2 = 8, WHOLE_BLOCKS_PER_SM = 3 };

__host__ __device__ static inline int padded_to_16(int tokens) {
    return (tokens + 15) / 16 * 16;
}

/* Element (row, column) of a [rows][D] tile whose 16-byte chunks are swizzled: chunk c of a row
 * is stored at c ^ (line % chunks) where line counts 128-byte lines (D = 64: one row a line,
 * D = 32: two), so 8 consecutive rows cover the 8 bank groups. */
template <int D>
__device__ __forceinline__ int swizzled(int row, int column) {
    constexpr int CHUNKS = D / 8, ROWS_PER_LINE = 64 / D;
    return row * D + (((column / 8) ^ ((row / ROWS_PER_LINE) % CHUNKS)) * 8) + column % 8;
}

/* Issue the loads of rows [first, end) of K and V of (b, h) into tiles whose row 0 is row
 * tile_start of the sequence (a multiple of 8); rows at or past the sequence's end are written
 * zero (their probabilities are zero, and 0 x garbage could be NaN). The caller commits and
 * waits for the cp.async group. */
template <int D>
__device__ __forceinline__ void load_key_rows(bf16 *ks, bf16 *vs, const attention_forward_args &args, int b, int h,
                                              int tile_start, int first, int end) {
    /* thread i copies chunk i % CHUNKS of rows first + i / CHUNKS + ROWS_PER_PASS j; the
     * swizzle repeats every 8 rows, so its place in a row is the same for all of them */
    constexpr int CHUNKS = D / 8, ROWS_PER_PASS = MMA_THREADS / CHUNKS;
    int part = threadIdx.x % CHUNKS, start = first + threadIdx.x / CHUNKS;
    int start_at = swizzled<D>(start - tile_start, part * 8);
    size_t row_stride = (size_t)args.heads * D, head_start = token_head_offset(b, 0, h, args.tokens, args.heads, D);
    const bf16 *k_src = args.k + head_start + part * 8, *v_src = args.v + head_start + part * 8;
    for (int r = start; r < end; r += ROWS_PER_PASS) {
        int at = start_at + (r - start) * D;
        if (r < args.tokens) {
            cp_async16(ks + at, k_src + r * row_stride);
            cp_async16(vs + at, v_src + r * row_stride);
        } else {
            *reinterpret_cast<uint4 *>(ks + at) = make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4 *>(vs + at) = make_uint4(0, 0, 0, 0);
        }
    }
}

/* Chunk c of `chunks` is in shared memory for every thread of the CTA (all threads call it). */
__device__ __forceinline__ void wait_for_chunk(int c, int chunks) {
    switch (chunks - 1 - c) { /* groups that may still be in flight */
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    }
    __syncthreads();
}

/* The A fragments of query rows q0 .. q0 + 15 (rows past the sequence zero). */
template <int D>
__device__ __forceinline__ void load_query_fragments(uint32_t qa[D / 16][4], const attention_forward_args &args, int b,
                                                     int h, int q0, int g, int t) {
    int top = q0 + g, bottom = top + 8;
    const bf16 *top_row = args.q + token_head_offset(b, top, h, args.tokens, args.heads, D) + 2 * t;
    const bf16 *bottom_row = args.q + token_head_offset(b, bottom, h, args.tokens, args.heads, D) + 2 * t;
    bool top_valid = top < args.tokens, bottom_valid = bottom < args.tokens;
#pragma unroll
    for (int kc = 0; kc < D / 16; kc++) {
        qa[kc][0] = top_valid ? __ldg(reinterpret_cast<const unsigned *>(top_row + kc * 16)) : 0u;
        qa[kc][1] = bottom_valid ? __ldg(reinterpret_cast<const unsigned *>(bottom_row + kc * 16)) : 0u;
        qa[kc][2] = top_valid ? __ldg(reinterpret_cast<const unsigned *>(top_row + kc * 16 + 8)) : 0u;
        qa[kc][3] = bottom_valid ? __ldg(reinterpret_cast<const unsigned *>(bottom_row + kc * 16 + 8)) : 0u;
    }
}

/* Where this lane's ldmatrix rows start within 8 (K) or 16 (V) rows of a tile whose first row
 * is a multiple of 8: the swizzle depends on the row modulo 8 only, so these offsets hold for
 * every such tile. K: matrices = columns 16 kc + 0-7, 8-15, 16-23, 24-31 of 8 keys, for kc =
 * 0, 2, ...; V (transposed): keys 0-7 and 8-15 of 8 dims, then of the next 8, for dims 16 j. */
template <int D>
struct fragment_offsets {
    int k[D / 32], v[D / 16];
};

template <int D>
__device__ __forceinline__ fragment_offsets<D> lane_fragment_offsets(int lane) {
    fragment_offsets<D> f;
    int v_row = lane % 8 + ((lane / 8) % 2) * 8, v_column = (lane / 16) * 8;
#pragma unroll
    for (int i = 0; i < D / 32; i++) f.k[i] = swizzled<D>(lane % 8, i * 32 + (lane / 8) * 8);
#pragma unroll
    for (int j = 0; j < D / 16; j++) f.v[j] = swizzled<D>(v_row, j * 16 + v_column);
    return f;
}

/* What a warp carries through the chunks of one 16-row unit of queries: the output so far, the
 * running maximum of the raw scores and this thread's share of the row sums (rows g, g + 8). */
template <int D>
struct query_unit {
    uint32_t qa[D / 16][4];
    float o[D / 8][4], m[2], l[2];
};

/* v[0] = max (SUM false) or sum (SUM true) of v[0 .. N), as a tree: short dependency chains. */
template <int N, bool SUM>
__device__ __forceinline__ float tree_reduce(float v[N]) {
#pragma unroll
    for (int stride = 1; stride < N; stride *= 2)
#pragma unroll
        for (int i = 0; i + stride < N; i += 2 * stride) v[i] = SUM ? v[i] + v[i + stride] : fmaxf(v[i], v[i + stride]);
    return v[0];
}

/* The keys k0 .. k0 + 8 BLOCKS - 1, rows 0 .. of k_tile and v_tile, for one unit: scores,
 * online softmax in base 2 (scores kept unscaled, the scale folded into the exponent), o += p v.
 * TAIL: keys at or past `tokens` get probability 0. */
template <int D, int BLOCKS, bool TAIL>
__device__ __forceinline__ void attend_chunk(query_unit<D> &u, const bf16 *k_tile, const bf16 *v_tile,
                                             const fragment_offsets<D> &f, int k0, int tokens, float scale2,
                                             int lane) {
    int t = lane % 4;
    float s[BLOCKS + (BLOCKS & 1)][4];
#pragma unroll
    for (int nb = 0; nb < BLOCKS; nb++) {
        s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc += 2) {
            uint32_t kb[4];
            ldmatrix_x4(kb, k_tile + nb * 8 * D + f.k[kc / 2]);
            mma_16816(s[nb], u.qa[kc], kb[0], kb[1]);
            mma_16816(s[nb], u.qa[kc + 1], kb[2], kb[3]);
        }
    }
    if (TAIL)
#pragma unroll
        for (int nb = 0; nb < BLOCKS; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (k0 + nb * 8 + 2 * t + (e & 1) >= tokens) s[nb][e] = -INFINITY;
    /* The reference maximum m moves only when a row's scores exceed it by more than
     * 2^RESCALE_LOG2 (softmax does not depend on it; probabilities up to 2^8 are exact enough
     * in fp32 and bf16): after the first chunk a ViT's rows almost never rescale o and l. */
    float row_max[2];
    bool grows = false;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float part[BLOCKS];
#pragma unroll
        for (int nb = 0; nb < BLOCKS; nb++) part[nb] = fmaxf(s[nb][2 * r], s[nb][2 * r + 1]);
        row_max[r] = quad_max(tree_reduce<BLOCKS, false>(part));
        grows |= (row_max[r] - u.m[r]) * scale2 > RESCALE_LOG2; /* m = -inf before the first chunk */
    }
    if (__any_sync(0xffffffffu, grows))
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float m_new = fmaxf(u.m[r], row_max[r]); /* finite: every chunk has a key */
            float correction = fast_exp2((u.m[r] - m_new) * scale2); /* 0 at the first chunk */
            u.m[r] = m_new;
            u.l[r] *= correction;
#pragma unroll
            for (int nb = 0; nb < D / 8; nb++) {
                u.o[nb][2 * r] *= correction;
                u.o[nb][2 * r + 1] *= correction;
            }
        }
    float shift[2] = {-u.m[0] * scale2, -u.m[1] * scale2};
#pragma unroll
    for (int nb = 0; nb < BLOCKS; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[nb][e] = fast_exp2(fmaf(s[nb][e], scale2, shift[e >> 1]));
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float part[BLOCKS];
#pragma unroll
        for (int nb = 0; nb < BLOCKS; nb++) part[nb] = s[nb][2 * r] + s[nb][2 * r + 1];
        u.l[r] += tree_reduce<BLOCKS, true>(part);
    }
    if (BLOCKS & 1) s[BLOCKS][0] = s[BLOCKS][1] = s[BLOCKS][2] = s[BLOCKS][3] = 0.0f;
    /* o += p v, 16 keys a step */
#pragma unroll
    for (int kc = 0; kc < (BLOCKS + 1) / 2; kc++) {
        uint32_t pa[4];
        accumulators_to_a(pa, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
        for (int nb = 0; nb < D / 8; nb += 2) {
            uint32_t vb[4];
            ldmatrix_x4_transposed(vb, v_tile + kc * 16 * D + f.v[nb / 2]);
            mma_16816(u.o[nb], pa, vb[0], vb[1]);
            mma_16816(u.o[nb + 1], pa, vb[2], vb[3]);
        }
    }
}

/* The chunk of keys from k0 (rows 0 .. of k_tile and v_tile) for one unit: a full one of TILE
 * keys, or the last, shorter one at its count of 8-key blocks. */
template <int D>
__device__ __forceinline__ void attend(query_unit<D> &u, const bf16 *k_tile, const bf16 *v_tile,
                                       const fragment_offsets<D> &f, int k0, int tokens, float scale2, int lane) {
    int keys = tokens - k0;
    if (keys >= TILE) {
        attend_chunk<D, TILE / 8, false>(u, k_tile, v_tile, f, k0, tokens, scale2, lane);
        return;
    }
    switch ((keys + 7) / 8) {
    case 1: attend_chunk<D, 1, true>(u, k_tile, v_tile, f, k0, tokens, scale2, lane); break;
    case 2: attend_chunk<D, 2, true>(u, k_tile, v_tile, f, k0, tokens, scale2, lane); break;
    case 3: attend_chunk<D, 3, true>(u, k_tile, v_tile, f, k0, tokens, scale2, lane); break;
    case 4: attend_chunk<D, 4, true>(u, k_tile, v_tile, f, k0, tokens, scale2, lane); break;
    case 5: attend_chunk<D, 5, true>(u, k_tile, v_tile, f, k0, tokens, scale2, lane); break;
    case 6: attend_chunk<D, 6, true>(u, k_tile, v_tile, f, k0, tokens, scale2, lane); break;
    default: attend_chunk<D, 7, true>(u, k_tile, v_tile, f, k0, tokens, scale2, lane); break;
    }
}

template <int D>
__device__ __forceinline__ void start_unit(query_unit<D> &u, const attention_forward_args &args, int b, int h, int q0,
                                           int lane) {
    load_query_fragments<D>(u.qa, args, b, h, q0, lane / 4, lane % 4);
    u.m[0] = u.m[1] = -INFINITY;
    u.l[0] = u.l[1] = 0.0f;
#pragma unroll
    for (int nb = 0; nb < D / 8; nb++) u.o[nb][0] = u.o[nb][1] = u.o[nb][2] = u.o[nb][3] = 0.0f;
}

template <int D>
__device__ __forceinline__ void finish_unit(query_unit<D> &u, const attention_forward_args &args, int b, int h, int q0,
                                            float scale2, int lane) {
    int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; r++) u.l[r] = quad_sum(u.l[r]);
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int s_index = q0 + g + 8 * r;
        if (s_index >= args.tokens) continue;
        float inverse = 1.0f / u.l[r];
        bf16 *out_row = args.out + token_head_offset(b, s_index, h, args.tokens, args.heads, D);
#pragma unroll
        for (int nb = 0; nb < D / 8; nb++)
            *reinterpret_cast<__nv_bfloat162 *>(out_row + nb * 8 + 2 * t) =
                __floats2bfloat162_rn(u.o[nb][2 * r] * inverse, u.o[nb][2 * r + 1] * inverse);
        if (t == 0)
            args.lse[((size_t)b * args.heads + h) * args.tokens + s_index] = (u.m[r] * scale2 + log2f(u.l[r])) * LN2;
    }
}

/* Any length: a CTA takes 64 queries (warp w: 16 w .. 16 w + 15) and walks K and V in tiles
 * of 64 rows. */
template <int D>
__global__ __launch_bounds__(MMA_THREADS) void attention_forward_mma_kernel(attention_forward_args args) {
    __shared__ __align__(16) bf16 ks[TILE * D], vs[TILE * D];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int q0 = blockIdx.x * TILE + warp * 16, h = blockIdx.y, b = blockIdx.z, tokens = args.tokens;
    int padded = padded_to_16(tokens);
    float scale2 = args.scale * LOG2E;
    fragment_offsets<D> f = lane_fragment_offsets<D>(lane);
    query_unit<D> u;
    start_unit<D>(u, args, b, h, q0, lane);
    for (int k0 = 0; k0 < tokens; k0 += TILE) {
        __syncthreads(); /* every warp is done with the previous tiles */
        load_key_rows<D>(ks, vs, args, b, h, k0, k0, min(k0 + TILE, padded));
        asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
        __syncthreads();
        attend<D>(u, ks, vs, f, k0, tokens, scale2, lane);
    }
    finish_unit<D>(u, args, b, h, q0, scale2, lane);
}

/* Whole sequences: one cp.async group per 64 rows of K and V, all issued at once; warp w takes
 * the units of 16 queries w, w + 4, ..., its first unit waiting for each group as it arrives,
 * so computing starts after the first 64 rows. */
template <int D>
__global__ __launch_bounds__(MMA_THREADS, WHOLE_BLOCKS_PER_SM) void attention_forward_whole_kernel(
    attention_forward_args args) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int h = blockIdx.x, b = blockIdx.y, tokens = args.tokens, padded = padded_to_16(tokens);
    int chunks = (tokens + TILE - 1) / TILE;
    bf16 *ks = reinterpret_cast<bf16 *>(shared_bytes), *vs = ks + padded * D;
    float scale2 = args.scale * LOG2E;
    for (int r0 = 0; r0 < padded; r0 += TILE) {
        load_key_rows<D>(ks, vs, args, b, h, 0, r0, min(r0 + TILE, padded));
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    fragment_offsets<D> f = lane_fragment_offsets<D>(lane);
    constexpr int STEP = 16 * (MMA_THREADS / 32);

    int q0 = warp * 16;
    query_unit<D> u;
    if (q0 < tokens) start_unit<D>(u, args, b, h, q0, lane);
    for (int c = 0; c < chunks; c++) {
        wait_for_chunk(c, chunks);
        if (q0 < tokens) attend<D>(u, ks + c * TILE * D, vs + c * TILE * D, f, c * TILE, tokens, scale2, lane);
    }
    if (q0 < tokens) finish_unit<D>(u, args, b, h, q0, scale2, lane);
    for (q0 += STEP; q0 < tokens; q0 += STEP) {
        start_unit<D>(u, args, b, h, q0, lane);
        for (int c = 0; c < chunks; c++)
            attend<D>(u, ks + c * TILE * D, vs + c * TILE * D, f, c * TILE, tokens, scale2, lane);
        finish_unit<D>(u, args, b, h, q0, scale2, lane);
    }
}

/* ---- backward: dK and dV, per tile of 64 keys (warp w: keys 16 w .. 16 w + 15) ----
 * Key-major: S^T = K Q^T and dP^T = V dO^T (16 keys x 64 queries per warp), then
 * P^T = 2^(S^T c log2 e - lse2), dS^T = P^T (dP^T - D), dV += P^T dO, dK += dS^T Q. */
template <int D>
__global__ __launch_bounds__(MMA_THREADS) void attention_backward_key_mma_kernel(attention_backward_args args) {
    constexpr int RS = D + ROW_PAD, TS = TILE + ROW_PAD;
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    bf16 *ks = reinterpret_cast<bf16 *>(shared_bytes), *vs = ks + TILE * RS, *qs = vs + TILE * RS;
    bf16 *dos = qs + TILE * RS, *qt = dos + TILE * RS, *dot = qt + D * TS;
    float *lse2 = reinterpret_cast<float *>(dot + D * TS), *delta = lse2 + TILE;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int k0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z, tokens = args.tokens, heads = args.heads;
    float scale2 = args.scale * LOG2E;
    const float *lse_bh = args.lse + ((size_t)b * heads + h) * tokens;
    const float *delta_bh = args.delta + ((size_t)b * heads + h) * tokens;

    load_rows<D>(ks, args.k, b, h, k0, tokens, heads);
    load_rows<D>(vs, args.v, b, h, k0, tokens, heads);
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int nb = 0; nb < D / 8; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[nb][e] = dv[nb][e] = 0.0f;
    bool key_valid[2] = {k0 + warp * 16 + g < tokens, k0 + warp * 16 + g + 8 < tokens};

    for (int q0 = 0; q0 < tokens; q0 += TILE) {
        __syncthreads(); /* every warp is done with the previous query tile */
        load_rows<D>(qs, args.q, b, h, q0, tokens, heads);
        load_rows_transposed<D>(qt, args.q, b, h, q0, tokens, heads);
        load_rows<D>(dos, args.dout, b, h, q0, tokens, heads);
        load_rows_transposed<D>(dot, args.dout, b, h, q0, tokens, heads);
        for (int r = threadIdx.x; r < TILE; r += MMA_THREADS) {
            bool valid = q0 + r < tokens;
            lse2[r] = valid ? lse_bh[q0 + r] * LOG2E : INFINITY;
            delta[r] = valid ? delta_bh[q0 + r] : 0.0f;
        }
        __syncthreads();
        float st[TILE / 8][4], dpt[TILE / 8][4];
#pragma unroll
        for (int nb = 0; nb < TILE / 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) st[nb][e] = dpt[nb][e] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++) {
            uint32_t ka[4], va[4];
            load_a_fragment(ka, ks, RS, warp * 16, kc * 16, g, t);
            load_a_fragment(va, vs, RS, warp * 16, kc * 16, g, t);
#pragma unroll
            for (int nb = 0; nb < TILE / 8; nb++) {
                const bf16 *q_row = qs + (nb * 8 + g) * RS + kc * 16 + 2 * t;
                const bf16 *do_row = dos + (nb * 8 + g) * RS + kc * 16 + 2 * t;
                mma_16816(st[nb], ka, load_pair(q_row), load_pair(q_row + 8));
                mma_16816(dpt[nb], va, load_pair(do_row), load_pair(do_row + 8));
            }
        }
#pragma unroll
        for (int nb = 0; nb < TILE / 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int q = nb * 8 + 2 * t + (e & 1);
                float p = key_valid[e >> 1] ? exp2f(st[nb][e] * scale2 - lse2[q]) : 0.0f; /* lse2 = inf past the end */
                st[nb][e] = p;
                dpt[nb][e] = p * (dpt[nb][e] - delta[q]);
            }
#pragma unroll
        for (int kc = 0; kc < TILE / 16; kc++) {
            uint32_t pa[4], dsa[4];
            accumulators_to_a(pa, st[2 * kc], st[2 * kc + 1]);
            accumulators_to_a(dsa, dpt[2 * kc], dpt[2 * kc + 1]);
#pragma unroll
            for (int nb = 0; nb < D / 8; nb++) {
                const bf16 *do_t = dot + (nb * 8 + g) * TS + kc * 16 + 2 * t;
                const bf16 *q_t = qt + (nb * 8 + g) * TS + kc * 16 + 2 * t;
                mma_16816(dv[nb], pa, load_pair(do_t), load_pair(do_t + 8));
                mma_16816(dk[nb], dsa, load_pair(q_t), load_pair(q_t + 8));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int s_index = k0 + warp * 16 + g + 8 * r;
        if (s_index >= tokens) continue;
        size_t offset = token_head_offset(b, s_index, h, tokens, heads, D);
#pragma unroll
        for (int nb = 0; nb < D / 8; nb++) {
            *reinterpret_cast<__nv_bfloat162 *>(args.dk + offset + nb * 8 + 2 * t) =
                __floats2bfloat162_rn(dk[nb][2 * r] * args.scale, dk[nb][2 * r + 1] * args.scale);
            *reinterpret_cast<__nv_bfloat162 *>(args.dv + offset + nb * 8 + 2 * t) =
                __floats2bfloat162_rn(dv[nb][2 * r], dv[nb][2 * r + 1]);
        }
    }
}

/* ---- backward: dQ, per tile of 64 queries (warp w: queries 16 w .. 16 w + 15) ----
 * S = Q K^T, dP = dO V^T, P = 2^(S c log2 e - lse2), dS = P (dP - D), dQ += dS K. */
template <int D>
__global__ __launch_bounds__(MMA_THREADS) void attention_backward_query_mma_kernel(attention_backward_args args) {
    constexpr int RS = D + ROW_PAD, TS = TILE + ROW_PAD;
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    bf16 *qs = reinterpret_cast<bf16 *>(shared_bytes), *dos = qs + TILE * RS, *ks = dos + TILE * RS;
    bf16 *vs = ks + TILE * RS, *kt = vs + TILE * RS;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int q0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z, tokens = args.tokens, heads = args.heads;
    float scale2 = args.scale * LOG2E;
    const float *lse_bh = args.lse + ((size_t)b * heads + h) * tokens;
    const float *delta_bh = args.delta + ((size_t)b * heads + h) * tokens;

    load_rows<D>(qs, args.q, b, h, q0, tokens, heads);
    load_rows<D>(dos, args.dout, b, h, q0, tokens, heads);
    __syncthreads();
    uint32_t qa[D / 16][4], oa[D / 16][4];
#pragma unroll
    for (int kc = 0; kc < D / 16; kc++) {
        load_a_fragment(qa[kc], qs, RS, warp * 16, kc * 16, g, t);
        load_a_fragment(oa[kc], dos, RS, warp * 16, kc * 16, g, t);
    }
    float lse2[2], delta[2], dq[D / 8][4];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int s_index = q0 + warp * 16 + g + 8 * r;
        bool valid = s_index < tokens;
        lse2[r] = valid ? lse_bh[s_index] * LOG2E : INFINITY;
        delta[r] = valid ? delta_bh[s_index] : 0.0f;
    }
#pragma unroll
    for (int nb = 0; nb < D / 8; nb++) dq[nb][0] = dq[nb][1] = dq[nb][2] = dq[nb][3] = 0.0f;

    for (int k0 = 0; k0 < tokens; k0 += TILE) {
        __syncthreads(); /* every warp is done with the previous key tile */
        load_rows<D>(ks, args.k, b, h, k0, tokens, heads);
        load_rows<D>(vs, args.v, b, h, k0, tokens, heads);
        load_rows_transposed<D>(kt, args.k, b, h, k0, tokens, heads);
        __syncthreads();
        float s[TILE / 8][4], dp[TILE / 8][4];
#pragma unroll
        for (int nb = 0; nb < TILE / 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[nb][e] = dp[nb][e] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++)
#pragma unroll
            for (int nb = 0; nb < TILE / 8; nb++) {
                const bf16 *k_row = ks + (nb * 8 + g) * RS + kc * 16 + 2 * t;
                const bf16 *v_row = vs + (nb * 8 + g) * RS + kc * 16 + 2 * t;
                mma_16816(s[nb], qa[kc], load_pair(k_row), load_pair(k_row + 8));
                mma_16816(dp[nb], oa[kc], load_pair(v_row), load_pair(v_row + 8));
            }
#pragma unroll
        for (int nb = 0; nb < TILE / 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                bool valid = k0 + nb * 8 + 2 * t + (e & 1) < tokens;
                float p = valid ? exp2f(s[nb][e] * scale2 - lse2[e >> 1]) : 0.0f;
                dp[nb][e] = p * (dp[nb][e] - delta[e >> 1]);
            }
#pragma unroll
        for (int kc = 0; kc < TILE / 16; kc++) {
            uint32_t dsa[4];
            accumulators_to_a(dsa, dp[2 * kc], dp[2 * kc + 1]);
#pragma unroll
            for (int nb = 0; nb < D / 8; nb++) {
                const bf16 *k_t = kt + (nb * 8 + g) * TS + kc * 16 + 2 * t;
                mma_16816(dq[nb], dsa, load_pair(k_t), load_pair(k_t + 8));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int s_index = q0 + warp * 16 + g + 8 * r;
        if (s_index >= tokens) continue;
        bf16 *dq_row = args.dq + token_head_offset(b, s_index, h, tokens, heads, D);
#pragma unroll
        for (int nb = 0; nb < D / 8; nb++)
            *reinterpret_cast<__nv_bfloat162 *>(dq_row + nb * 8 + 2 * t) =
                __floats2bfloat162_rn(dq[nb][2 * r] * args.scale, dq[nb][2 * r + 1] * args.scale);
    }
}

/* ---- launching ---- */
template <int D>
static size_t key_shared_bytes(void) {
    return (size_t)(4 * TILE * (D + ROW_PAD) + 2 * D * (TILE + ROW_PAD)) * sizeof(bf16) + 2 * TILE * sizeof(float);
}
template <int D>
static size_t query_shared_bytes(void) {
    return (size_t)(4 * TILE * (D + ROW_PAD) + D * (TILE + ROW_PAD)) * sizeof(bf16);
}

bool attention_mma_supports(int head_dim, const void *const *pointers, int count) {
    if (head_dim != 32 && head_dim != 64) return false;
    for (int i = 0; i < count; i++)
        if (!is_aligned16(pointers[i])) return false;
    return true;
}

template <int D>
static bool raise_shared_limit(const void *kernel, size_t bytes, bool *done, const char *name) {
    if (*done || bytes <= 48 * 1024) return true;
    if (!CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
                    "%s<%d> with %zu bytes of shared memory", name, D, bytes))
        return false;
    *done = true;
    return true;
}

template <int D>
static size_t whole_shared_bytes(int tokens) {
    return (size_t)2 * padded_to_16(tokens) * D * sizeof(bf16);
}

template <int D>
static void forward_launch(const attention_forward_args &args) {
    if (args.tokens <= WHOLE_MAX_TOKENS) {
        static bool ready;
        if (!raise_shared_limit<D>((const void *)attention_forward_whole_kernel<D>,
                                   whole_shared_bytes<D>(WHOLE_MAX_TOKENS), &ready, "attention_forward_whole_kernel"))
            return;
        dim3 grid(args.heads, args.batch);
        attention_forward_whole_kernel<D>
            <<<grid, MMA_THREADS, whole_shared_bytes<D>(args.tokens), cuda_ctx.stream>>>(args);
        return;
    }
    dim3 grid(ceil_div_u((size_t)args.tokens, TILE), args.heads, args.batch);
    attention_forward_mma_kernel<D><<<grid, MMA_THREADS, 0, cuda_ctx.stream>>>(args);
}

template <int D>
static void backward_launch(const attention_backward_args &args) {
    static bool key_ready, query_ready;
    size_t key_bytes = key_shared_bytes<D>(), query_bytes = query_shared_bytes<D>();
    if (!raise_shared_limit<D>((const void *)attention_backward_key_mma_kernel<D>, key_bytes, &key_ready,
                               "attention_backward_key_mma_kernel") ||
        !raise_shared_limit<D>((const void *)attention_backward_query_mma_kernel<D>, query_bytes, &query_ready,
                               "attention_backward_query_mma_kernel"))
        return;
    dim3 grid(ceil_div_u((size_t)args.tokens, TILE), args.heads, args.batch);
    attention_backward_key_mma_kernel<D><<<grid, MMA_THREADS, key_bytes, cuda_ctx.stream>>>(args);
    if (!LAUNCH_CHECK("attention_backward_key_mma_kernel", "batch %d tokens %d heads %d head_dim %d", args.batch,
                      args.tokens, args.heads, args.head_dim))
        return;
    attention_backward_query_mma_kernel<D><<<grid, MMA_THREADS, query_bytes, cuda_ctx.stream>>>(args);
}

void attention_mma_forward(const attention_forward_args &args) {
    if (args.head_dim == 32)
        forward_launch<32>(args);
    else
        forward_launch<64>(args);
}

void attention_mma_backward(const attention_backward_args &args) {
    if (args.head_dim == 32)
        backward_launch<32>(args);
    else
        backward_launch<64>(args);
}
