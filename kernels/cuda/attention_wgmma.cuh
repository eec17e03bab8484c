/* Attention forward for 193-200 tokens and head_dim 64 (ViT-B/16 and L/16 at 224 pixels: 197) on
 * Hopper's asynchronous tensor-core path: TMA loads, mbarriers, wgmma. The kernel only: the
 * backend's launcher (attention_wgmma.cu) and scripts/experiments/attention_wgmma.cu include it;
 * it must be compiled for sm_90a.
 *
 * Why a kernel of our own: at this length a head's whole sequence is one tile. cuDNN's persistent
 * kernel runs B/16's 512 images x 12 heads in 0.33 ms with the DRAM 42-45% busy (620 MB: 0.21 ms
 * at 2.9 TB/s), and our mma.sync kernel (attention_mma.cu) was bound by the latency of its chains
 * of mma.sync and exponentials (docs/performance.md). Here one persistent CTA an SM takes
 * (image, head) units in turn:
 *   - warp group 0, one thread: loads a unit's Q, K and V rows (one TMA box of 64 columns by
 *     `tokens` rows each, 128-byte swizzle) into one of three stages, up to two units ahead;
 *   - warp groups 1 and 2 take the 64-row query tiles 0, 2 and 1, 3 of each unit: S = Q K^T with
 *     four wgmma m64n200k16 (K-major operands in shared memory), the keys past the sequence
 *     masked, the softmax over the whole row in registers (no online rescaling: every key is in
 *     the one tile), P rounded to bf16 in registers as the A operand of O = P V (thirteen wgmma
 *     m64n64k16 over 208 keys, V read MN-major from the same shared memory), then O / l written
 *     over the tile's Q rows (its scores are done with them) and stored by one TMA store, and the
 *     row's log-sum-exp, as the other kernels write them (attention.cuh). The two warp groups
 *     take turns to issue their P V products (two named barriers, FlashAttention-3's ping-pong),
 *     which keeps one's exponentials running while the other's products take the tensor cores
 *     (measured: 0.255 -> 0.246 ms for the TMA store, -> 0.237 with the turns, batch 512).
 * The accumulator layout of a warp group's m64nN product gives each thread rows g and g + 8 of its
 * warp's 16 (lane = 4 g + t) and the columns 8 j + 2 t, 8 j + 2 t + 1 of every 8-column block j,
 * which is the layout of the A operand from registers: the probabilities feed the second product
 * without leaving the registers.
 *
 * A stage holds Q, V and K in regions of 200 rows (25 KB: three stages fit the 227 KB an SM
 * gives), in that order because the products read past a region's rows: query tile 3 (rows
 * 192-255) reads on into V (rows past the sequence: computed, never stored), the second product's
 * last k step (keys 192-207) into K, where P is zero; V's rows past the sequence within its region
 * are zeroed once, so that 0 x V stays 0. K, the last region, is read to row 199 only. */
#ifndef TF_KERNELS_CUDA_ATTENTION_WGMMA_CUH
#define TF_KERNELS_CUDA_ATTENTION_WGMMA_CUH

#include <cuda.h>

#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/hopper.cuh"

namespace wgmma_attention {

enum {
    THREADS = 384,     /* a producer warp group and two consumer warp groups */
    TURN_BARRIER = 1,  /* + consumer: the named barrier a consumer waits at for its turn */
    STORE_BARRIER = 3, /* + consumer: its output tile is in shared memory */
    HEAD_DIM = 64,
    MIN_TOKENS = 193,
    MAX_TOKENS = 200,                      /* the first product's N */
    VALUE_KEYS = 208,                      /* keys of the second product: 13 k steps of 16 */
    ROW_BYTES = 128,                       /* one row of a head: 64 bf16, one 128-byte swizzle row */
    REGION_BYTES = MAX_TOKENS * ROW_BYTES, /* a multiple of the 1024-byte swizzle pattern */
    STAGE_BYTES = 3 * REGION_BYTES,        /* Q, V, K */
    STAGES = 3,
    SMEM_BYTES = STAGES * STAGE_BYTES + 2 * STAGES * 8 /* barriers */ + 1024 /* alignment */
};

/* Registers an asynchronous product writes or reads, pinned across its wait: without this the
 * compiler may read an accumulator before the wait, or reuse an operand register during it. */
__device__ __forceinline__ void pin(float *r, int n) {
#pragma unroll
    for (int i = 0; i < n; i++)
        asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void pin(uint32_t *r, int n) {
#pragma unroll
    for (int i = 0; i < n; i++)
        asm volatile("" : "+r"(r[i])::"memory");
}

#define F8(i)                                                                                                \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]),              \
        "+f"(d[i + 6]), "+f"(d[i + 7])

/* D (64 x 200, fp32, 100 registers a thread) (+)= A (64 x 16, shared, K-major) B^T (200 x 16,
 * shared, K-major). */
__device__ __forceinline__ void wgmma_m64n200k16_ss(float d[100], uint64_t desc_a, uint64_t desc_b,
                                                    int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %102, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n200k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
                 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
                 "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
                 "%96, %97, %98, %99"
                 "}, %100, %101, p, 1, 1, 0, 0;\n}\n"
                 : F8(0), F8(8), F8(16), F8(24), F8(32), F8(40), F8(48), F8(56), F8(64), F8(72), F8(80),
                   F8(88), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99])
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

/* D (64 x 64, fp32, 32 registers) (+)= A (64 x 16, bf16 pairs in registers) B (16 x 64, shared,
 * MN-major). */
__device__ __forceinline__ void wgmma_m64n64k16_rs(float d[32], const uint32_t a[4], uint64_t desc_b,
                                                   int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
                 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : F8(0), F8(8), F8(16), F8(24)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}
#undef F8

struct unit_args {
    float *lse;
    int tokens, heads;
    float scale2; /* softmax scale times log2(e) */
};

/* S = Q K^T of a query tile, issued as one group. */
__device__ __forceinline__ void issue_scores(float s[100], const uint8_t *stage, int tile) {
    const uint8_t *q = stage + tile * 64 * ROW_BYTES, *k = stage + 2 * REGION_BYTES;
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < HEAD_DIM / 16; step++)
        wgmma_m64n200k16_ss(s, smem_descriptor(q + 32 * step), smem_descriptor(k + 32 * step), step > 0);
    wgmma_commit();
}

/* A row's statistics: its maximum score and the sum of its exponentials. */
struct row_stats {
    float max0, max1, sum0, sum1;
};

/* P = exp(S - max) from the finished scores, and O = P V issued in this consumer's turn (two
 * groups): P is made in two halves, the first half's products issued before the second half's
 * exponentials. k step c of the second product is the key blocks 2c (a0, a1) and 2c + 1 (a2, a3),
 * i.e. p[4c ..]. */
__device__ __forceinline__ row_stats softmax_values(float s[100], uint32_t p[VALUE_KEYS / 4], float o[32],
                                                    const uint8_t *v, const unit_args &a, int consumer) {
    int t = threadIdx.x & 3;
    /* Keys past the sequence: in the last 8-column block only (193-200 tokens). */
#pragma unroll
    for (int e = 0; e < 4; e++)
        if (192 + 2 * t + (e & 1) >= a.tokens) s[96 + e] = -INFINITY;
    /* Row maxima and sums as trees over four partials: short dependency chains. */
    float part0[4], part1[4];
#pragma unroll
    for (int i = 0; i < 4; i++)
        part0[i] = part1[i] = -INFINITY;
#pragma unroll
    for (int j = 0; j < 25; j++) {
        part0[j & 3] = fmaxf(part0[j & 3], fmaxf(s[4 * j], s[4 * j + 1]));
        part1[j & 3] = fmaxf(part1[j & 3], fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    row_stats r;
    r.max0 = quad_max(fmaxf(fmaxf(part0[0], part0[1]), fmaxf(part0[2], part0[3])));
    r.max1 = quad_max(fmaxf(fmaxf(part1[0], part1[1]), fmaxf(part1[2], part1[3])));
    float shift0 = -r.max0 * a.scale2, shift1 = -r.max1 * a.scale2;
#pragma unroll
    for (int i = 0; i < 4; i++)
        part0[i] = part1[i] = 0.0f;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int first = half ? 14 : 0, last = half ? 25 : 14, steps = half ? 6 : 7;
#pragma unroll
        for (int j = first; j < last; j++) {
            float p00 = fast_exp2(fmaf(s[4 * j], a.scale2, shift0));
            float p01 = fast_exp2(fmaf(s[4 * j + 1], a.scale2, shift0));
            float p10 = fast_exp2(fmaf(s[4 * j + 2], a.scale2, shift1));
            float p11 = fast_exp2(fmaf(s[4 * j + 3], a.scale2, shift1));
            part0[j & 3] += p00 + p01;
            part1[j & 3] += p10 + p11;
            p[2 * j] = pack_pair(p00, p01);
            p[2 * j + 1] = pack_pair(p10, p11);
        }
        if (half) p[50] = p[51] = 0; /* keys 200-207 */
        if (half == 0) named_barrier_sync(TURN_BARRIER + consumer, 256);
        wgmma_fence();
#pragma unroll
        for (int c = half * 7; c < half * 7 + steps; c++)
            wgmma_m64n64k16_rs(o, p + 4 * c, smem_descriptor(v + c * 16 * ROW_BYTES), c > 0);
        wgmma_commit();
    }
    r.sum0 = quad_sum((part0[0] + part0[1]) + (part0[2] + part0[3]));
    r.sum1 = quad_sum((part1[0] + part1[1]) + (part1[2] + part1[3]));
    return r;
}

/* O / l and the log-sum-exp of the calling warp group's rows of a tile: rows tile * 64 + 16 warp
 * + g and + 8. O goes through the tile's Q rows in shared memory and one TMA store of the tile
 * (out_tail's box for the last tile, whose rows end with the sequence). */
__device__ __forceinline__ void store_tile(const float o[32], const row_stats &r, uint8_t *stage, int tile,
                                           int image, int head, const unit_args &a,
                                           const CUtensorMap *out_map, const CUtensorMap *out_tail,
                                           int consumer) {
    int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3, g = lane >> 2, t = lane & 3;
    int row0 = tile * 64 + warp * 16 + g, row1 = row0 + 8;
    float inverse0 = 1.0f / r.sum0, inverse1 = 1.0f / r.sum1;
    uint8_t *rows = stage + tile * 64 * ROW_BYTES;
    /* 128-byte swizzle: 16-byte chunk j of row r sits at chunk j ^ (r & 7), and r & 7 = g. */
    if (row0 < a.tokens) {
#pragma unroll
        for (int j = 0; j < 8; j++)
            *reinterpret_cast<uint32_t *>(rows + (row0 - tile * 64) * ROW_BYTES + 16 * (j ^ g) + 4 * t) =
                pack_pair(o[4 * j] * inverse0, o[4 * j + 1] * inverse0);
    }
    if (row1 < a.tokens) {
#pragma unroll
        for (int j = 0; j < 8; j++)
            *reinterpret_cast<uint32_t *>(rows + (row1 - tile * 64) * ROW_BYTES + 16 * (j ^ g) + 4 * t) =
                pack_pair(o[4 * j + 2] * inverse1, o[4 * j + 3] * inverse1);
    }
    fence_async_shared();
    named_barrier_sync(STORE_BARRIER + consumer, 128);
    if ((threadIdx.x & 127) == 0) {
        tma_store_2d((tile + 1) * 64 < a.tokens ? out_map : out_tail, head * HEAD_DIM,
                     image * a.tokens + tile * 64, rows);
        bulk_commit();
    }
    if (t == 0) {
        float *lse = a.lse + ((size_t)image * a.heads + head) * a.tokens;
        if (row0 < a.tokens) lse[row0] = (r.max0 * a.scale2 + log2f(r.sum0)) * LN2;
        if (row1 < a.tokens) lse[row1] = (r.max1 * a.scale2 + log2f(r.sum1)) * LN2;
    }
}

/* q, k, v, out: [batch * tokens, heads * 64] bf16 (head h in columns 64 h ..); lse: [batch, heads,
 * tokens]. The tensor maps' boxes are 64 columns by `tokens` rows (q, k, v), 64 rows (out_map) and
 * tokens - 192 rows (out_tail). */
__global__ __launch_bounds__(THREADS, 1) void attention_forward_kernel(
    const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
    const __grid_constant__ CUtensorMap v_map, const __grid_constant__ CUtensorMap out_map,
    const __grid_constant__ CUtensorMap out_tail, unit_args a, int units) {
    extern __shared__ uint8_t raw[];
    uint8_t *smem = reinterpret_cast<uint8_t *>(((uintptr_t)raw + 1023) & ~(uintptr_t)1023);
    uint64_t *full = reinterpret_cast<uint64_t *>(smem + STAGES * STAGE_BYTES), *empty = full + STAGES;
    /* Zero the stages once: V's rows past the sequence are never loaded and must stay finite. */
    for (int i = threadIdx.x; i < STAGES * STAGE_BYTES / 16; i += THREADS)
        reinterpret_cast<uint4 *>(smem)[i] = make_uint4(0, 0, 0, 0);
    fence_async_shared(); /* before the TMA's writes */
    int group = threadIdx.x >> 7;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            barrier_init(&full[s], 1);
            barrier_init(&empty[s], 2); /* one arrival per consumer warp group */
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (group == 0) {
        if (threadIdx.x != 0) return;
        uint32_t bytes = 3u * a.tokens * ROW_BYTES;
        int s = 0, round = 0;
        for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
            int image = unit / a.heads, head = unit - image * a.heads;
            if (round > 0) barrier_wait(&empty[s], (round - 1) & 1);
            uint8_t *stage = smem + s * STAGE_BYTES;
            barrier_expect_bytes(&full[s], bytes);
            tma_load_2d(stage, &q_map, head * HEAD_DIM, image * a.tokens, &full[s]);
            tma_load_2d(stage + REGION_BYTES, &v_map, head * HEAD_DIM, image * a.tokens, &full[s]);
            tma_load_2d(stage + 2 * REGION_BYTES, &k_map, head * HEAD_DIM, image * a.tokens, &full[s]);
            if (++s == STAGES) s = 0, round++;
        }
        return;
    }
    /* Each consumer walks its tiles (consumer, consumer + 2 of every unit) in one flat loop. */
    int consumer = group - 1, tiles = (a.tokens + 63) / 64;
    int unit = blockIdx.x, tile = consumer, s = 0, round = 0;
    float scores[100], o[32];
    uint32_t p[VALUE_KEYS / 4]; /* P in bf16 pairs, the second product's A operand */
    if (consumer == 1) named_barrier_arrive(TURN_BARRIER, 256); /* consumer 0 takes the first turn */
    while (unit < units) {
        int next_unit = unit, next_tile = tile + 2;
        if (next_tile >= tiles) next_tile = consumer, next_unit += gridDim.x;
        uint8_t *stage = smem + s * STAGE_BYTES;
        if (tile == consumer) barrier_wait(&full[s], round & 1);
        issue_scores(scores, stage, tile);
        wgmma_wait<0>();
        pin(scores, 100);
        row_stats r = softmax_values(scores, p, o, stage + REGION_BYTES, a, consumer);
        /* Hand the turn over, but for consumer 1's last: every wait then has its arrival. */
        if (consumer == 0 || next_unit < units) named_barrier_arrive(TURN_BARRIER + 1 - consumer, 256);
        wgmma_wait<0>();
        pin(o, 32);
        pin(p, VALUE_KEYS / 4);
        int image = unit / a.heads, head = unit - image * a.heads;
        store_tile(o, r, stage, tile, image, head, a, &out_map, &out_tail, consumer);
        if (next_unit != unit) {
            if ((threadIdx.x & 127) == 0) {
                bulk_wait_read<0>();       /* the stores have read their tiles */
                barrier_arrive(&empty[s]); /* the products are done too: the producer may refill it */
            }
            if (++s == STAGES) s = 0, round++;
        }
        unit = next_unit, tile = next_tile;
    }
    if ((threadIdx.x & 127) == 0) bulk_wait<0>();
}

} // namespace wgmma_attention

#endif
