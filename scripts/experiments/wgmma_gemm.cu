/* A Hopper GEMM of our own (TMA, mbarriers, wgmma, warp specialisation), the building block of
 * the fused Pattention kernels that docs/performance.md says 10500 img/s needs, measured against
 * cuBLASLt on the Pattention's first GEMMs at B/16 inference's 100864 rows:
 *
 *   C [M, N] bf16 = A [M, K] B [N, K]^T   (A: tokens, B: key tokens, both K-major, fp32 accumulate)
 *
 * with one of the epilogues of the enum below: C alone, C and the row sums of squares (the norm's
 * reduction), the row sums alone (|x R^T|^2, the row norms known ahead of the scores GEMM), or
 * S = GELU(tau C / r) written by the GEMM itself from known row sums, in three schedules.
 *
 * Persistent: one CTA per SM walks the output tiles (N fastest, so the CTAs running at once share
 * A tiles and all of B stays in L2). Warp group 0 loads A and 256 x 64 of B per stage with TMA
 * (128-byte swizzle) into a ring, running ahead into the next tile while the consumers finish one;
 * warp groups 1 and 2 multiply with wgmma m64n256k16 (accumulators in registers), release a stage
 * when the products reading it are done, and store C as 64 x 64 boxes through shared memory with
 * TMA (cp.async.bulk.tensor). Cooperative: both consumers share a 128 x 256 tile; ping-pong: each
 * owns alternate 64 x 256 tiles; deferred: cooperative, with a tile's GELU and stores worked off
 * during the next tile's products; epilogue warps (gemm_gelu_kernel): the spare warps of the
 * producer's warp group do the GELU and stores of the tile the MMA warp groups staged, or two warp
 * groups of their own (gemm_gelu_kernel<..., true>, 640 threads). With clusters of 2, the two CTAs take
 * tiles stacked in M, each loads half of B and multicasts it to both, and a stage is free once the
 * consumers of both CTAs released it (a plain remote mbarrier.arrive: with .release.cluster
 * semantics clusters of 2 ran at 441-512 TFLOP/s).
 *
 * Measured on the H100 (docs/performance.md): C bit-identical to cuBLASLt's at 94-97% of its rate
 * (clusters of 2); the row sums cost 3-9%; the GELU epilogue costs 0.31-0.65 ms on N 3072 in every
 * schedule, two epilogue warp groups of their own included, which closes the routes that needed it.
 *
 * nvcc -O3 -I../.. -gencode arch=compute_90a,code=sm_90a wgmma_gemm.cu -lcublasLt -o wgmma_gemm && ./wgmma_gemm
 * ./wgmma_gemm profile   # the N 3072 kernels once each, clusters of 1, for ncu --kernel-name regex:gemm_kernel
 * ./wgmma_gemm groups    # cuBLASLt and the epilogue warp groups' kernel (gemm_gelu_kernel<..., true>) alone */
#include <cublasLt.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <cmath>
#include <vector>

#include "experiments.cuh"
#include "kernels/cuda/hopper.cuh"

enum { BN = 256, BK = 64, THREADS = 384, B_STAGE_BYTES = BN * BK * 2, BOX_BYTES = 64 * 64 * 2 };

/* What a consumer's epilogue does with its 64 x 256 fp32 products D:
 *   STORE        C = bf16(D)
 *   STORE_SUMSQ  C = bf16(D), row_sumsq[m] += sum of bf16(D)^2 over the tile's columns
 *   SUMSQ        row_sumsq[m] += sum of D^2 (C not written: |x R^T|^2, the row norm ahead of time)
 *   GELU         C = bf16(GELU(tau D / sqrt(row_sumsq[m] + eps))), exact erf GELU: the Pattention's
 *                S written by the scores GEMM itself once the row norms are known
 *   GELU_DEFERRED (cooperative) the same from bf16(D), worked off during the next tile's
 *                products (consume_deferred); _FAST with a branch-free erfc in place of erff;
 *                DEFERRED_COPY the same structure with C = bf16(D), no normalisation or GELU */
enum { STORE, STORE_SUMSQ, SUMSQ, GELU, GELU_DEFERRED, GELU_DEFERRED_FAST, DEFERRED_COPY };

/* Cooperative: both consumer warp groups multiply one 128 x 256 tile (64 rows each) and run their
 * epilogues at the same time, with the tensor cores idle. Ping-pong: each consumer owns whole
 * 64 x 256 tiles, alternate ones, so that one's epilogue runs while the other's products do.
 * C leaves through two 64 x 64 boxes a consumer, in turn; the deferred epilogue keeps a consumer's
 * whole 64 x 256 tile there (four boxes) until the next tile's products are done, for which the
 * ring gives up a stage. */
template <bool PINGPONG, bool DEFERRED = false> struct layout {
    static constexpr int tile_m = PINGPONG ? 64 : 128, stages = DEFERRED ? 3 : 4;
    static constexpr int a_stage_bytes = tile_m * BK * 2, stage_bytes = a_stage_bytes + B_STAGE_BYTES;
    static constexpr int c_tile_bytes = (DEFERRED ? 4 : 2) * BOX_BYTES; /* per consumer */
    static constexpr int smem_bytes = stages * stage_bytes + 2 * c_tile_bytes + 1024 /* alignment */ + 2 * stages * 8;
};

typedef __nv_bfloat16 bf16;

/* ---- PTX wrappers (the shared ones: kernels/cuda/hopper.cuh) ---- */
__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return rank;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
/* Arrive on the barrier at the same shared-memory offset in CTA `cta` of the cluster. Plain
 * arrive: .release.cluster here made every k tile wait for cluster-wide visibility (-35%). */
__device__ __forceinline__ void barrier_arrive_in(uint64_t *bar, uint32_t cta) {
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_address(bar)), "r"(cta));
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}
/* TMA into the same offset of every CTA in mask, each CTA's barrier at bar's offset completing. */
__device__ __forceinline__ void tma_load_2d_multicast(void *dst, const CUtensorMap *map, int inner, int outer,
                                                      uint64_t *bar, uint16_t mask) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%2, %3}], [%4], %5;"
                 ::"r"(smem_address(dst)), "l"((uint64_t)map), "r"(inner), "r"(outer), "r"(smem_address(bar)), "h"(mask)
                 : "memory");
}
template <int R> __device__ __forceinline__ void registers_decrease() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R> __device__ __forceinline__ void registers_increase() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}

/* Eight accumulators as read-write asm operands. */
#define F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
              "+f"(d[i + 6]), "+f"(d[i + 7])

/* D (64 x 256, fp32, 128 registers a thread) += A (64 x 16, shared) B^T (256 x 16, shared). */
__device__ __forceinline__ void wgmma_m64n256k16(float d[128], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
                 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
                 "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
                 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
                 "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
                 "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
                 : F8(0), F8(8), F8(16), F8(24), F8(32), F8(40), F8(48), F8(56),
                   F8(64), F8(72), F8(80), F8(88), F8(96), F8(104), F8(112), F8(120)
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

/* D (64 x 128, 64 registers) += A (64 x 16) B^T (128 x 16). Two of these make the 64 x 256 product
 * above with the same accumulator layout (d[64..127] are columns 128-255): ptxas checks a wgmma's
 * registers against the kernel's entry budget, not the setmaxnreg region it sits in, so at 640
 * threads (96 registers at entry) m64n256 does not compile and two m64n128 do. */
__device__ __forceinline__ void wgmma_m64n128k16(float *d, uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : F8(0), F8(8), F8(16), F8(24), F8(32), F8(40), F8(48), F8(56)
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
#undef F8

/* A consumer is done with a stage: tell every CTA that writes it (all of the cluster). */
template <int CLUSTER> __device__ __forceinline__ void release(uint64_t *empty_stage) {
    if (CLUSTER == 1) barrier_arrive(empty_stage);
    else
        for (int cta = 0; cta < CLUSTER; cta++) {
            if (cta == (int)cluster_rank()) barrier_arrive(empty_stage);
            else barrier_arrive_in(empty_stage, cta);
        }
}

/* Keeps the accumulators in registers across the asm statements (they are "+f" operands). */
__device__ __forceinline__ void fence_accumulators(float d[128]) {
#pragma unroll
    for (int i = 0; i < 128; i++) asm volatile("" : "+f"(d[i])::"memory");
}

/* One tile's products into d: k tiles from ring position `it`, A at a_offset in each stage; a
 * stage is released once the products reading it are done (one wgmma group stays in flight), and
 * between(kt) runs while k tile kt's wgmmas are in flight. */
template <int CLUSTER, typename L, typename Between, bool SPLIT = false>
__device__ __forceinline__ void tile_products(float d[128], uint8_t *smem, uint64_t *full, uint64_t *empty,
                                              int a_offset, int it, int k_tiles, Between between) {
    bool leader = threadIdx.x % 128 == 0;
    for (int kt = 0; kt < k_tiles; kt++, it++) {
        int s = it % L::stages;
        barrier_wait(&full[s], (it / L::stages) & 1);
        const uint8_t *a = smem + s * L::stage_bytes + a_offset, *b = smem + s * L::stage_bytes + L::a_stage_bytes;
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < BK / 16; k++) {
            if (SPLIT) { /* B's rows 128-255 start 128 rows of 128 bytes further */
                wgmma_m64n128k16(d, smem_descriptor(a + 32 * k), smem_descriptor(b + 32 * k), kt > 0 || k > 0);
                wgmma_m64n128k16(d + 64, smem_descriptor(a + 32 * k), smem_descriptor(b + 128 * 128 + 32 * k),
                                 kt > 0 || k > 0);
            } else {
                wgmma_m64n256k16(d, smem_descriptor(a + 32 * k), smem_descriptor(b + 32 * k), kt > 0 || k > 0);
            }
        }
        wgmma_commit();
        between(kt);
        wgmma_wait<1>();
        fence_accumulators(d);
        if (kt > 0 && leader) release<CLUSTER>(&empty[(it - 1) % L::stages]);
    }
    wgmma_wait<0>();
    fence_accumulators(d);
    if (leader) release<CLUSTER>(&empty[(it - 1) % L::stages]);
}

template <int CLUSTER, int EPILOGUE, bool PINGPONG>
__device__ __forceinline__ void consume(uint8_t *smem, uint8_t *c_tiles, uint64_t *full, uint64_t *empty,
                                        const CUtensorMap *map_c, float *row_sumsq, float tau, float eps,
                                        int consumer, int rank, int cluster, int clusters, int groups, int n_tiles,
                                        int k_tiles);

/* The producer (thread 0 of warp group 0): runs ahead across tiles, as far as the ring allows. */
template <int CLUSTER, typename L>
__device__ __forceinline__ void produce(uint8_t *smem, uint64_t *full, uint64_t *empty, const CUtensorMap *map_a,
                                        const CUtensorMap *map_b, int rank, int cluster, int clusters, int groups,
                                        int n_tiles, int k_tiles, int multicast) {
    if (threadIdx.x != 0) return;
    int it = 0;
    for (int g = cluster; g < groups; g += clusters) {
        int m0 = ((g / n_tiles) * CLUSTER + rank) * L::tile_m, n0 = (g % n_tiles) * BN;
        for (int kt = 0; kt < k_tiles; kt++, it++) {
            int s = it % L::stages;
            if (it >= L::stages) barrier_wait(&empty[s], ((it / L::stages) & 1) ^ 1);
            uint8_t *a = smem + s * L::stage_bytes, *b = a + L::a_stage_bytes;
            barrier_expect_bytes(&full[s], L::stage_bytes);
            tma_load_2d(a, map_a, kt * BK, m0, &full[s]);
            if (CLUSTER > 1 && multicast)
                tma_load_2d_multicast(b + rank * (BN / CLUSTER) * BK * 2, map_b, kt * BK, n0 + rank * (BN / CLUSTER),
                                      &full[s], (1 << CLUSTER) - 1);
            else /* every slice of B ourselves (multicast 0: the cluster's handshake alone) */
                for (int h = 0; h < CLUSTER; h++)
                    tma_load_2d(b + h * (BN / CLUSTER) * BK * 2, map_b, kt * BK, n0 + h * (BN / CLUSTER), &full[s]);
        }
    }
}

template <int CLUSTER, int GELU_FORM>
__device__ __forceinline__ void consume_deferred(uint8_t *smem, uint8_t *c_tiles, uint64_t *full, uint64_t *empty,
                                                 const CUtensorMap *map_c, const float *row_sumsq, float tau,
                                                 float eps, int consumer, int rank, int cluster, int clusters,
                                                 int groups, int n_tiles, int k_tiles);

template <int CLUSTER, int EPILOGUE, bool PINGPONG>
__global__ __launch_bounds__(THREADS, 1) void gemm_kernel(const __grid_constant__ CUtensorMap map_a,
                                                          const __grid_constant__ CUtensorMap map_b,
                                                          const __grid_constant__ CUtensorMap map_c,
                                                          float *row_sumsq, float tau, float eps, int M, int N, int K,
                                                          int multicast) {
    typedef layout<PINGPONG, (EPILOGUE >= GELU_DEFERRED)> L;
    enum { STAGES = L::stages };
    extern __shared__ uint8_t smem_raw[];
    uint8_t *smem = (uint8_t *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    uint8_t *c_tiles = smem + STAGES * L::stage_bytes; /* per consumer: swizzled 64 x 64 bf16 boxes */
    uint64_t *full = (uint64_t *)(c_tiles + 2 * L::c_tile_bytes), *empty = full + STAGES;
    int group = threadIdx.x / 128, n_tiles = N / BN, k_tiles = K / BK;
    /* A cluster of CLUSTER CTAs takes CLUSTER tiles stacked in M with the same n0: each CTA loads
     * 1 / CLUSTER of the B tile and multicasts it to all, so B crosses L2 once per cluster. */
    int rank = CLUSTER > 1 ? (int)cluster_rank() : 0, cluster = blockIdx.x / CLUSTER, clusters = gridDim.x / CLUSTER;
    int groups = (M / L::tile_m / CLUSTER) * n_tiles; /* cluster-sized groups of tiles */
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            barrier_init(&full[s], 1);
            /* the consumers of every CTA that writes the stage: both (cooperative) or one (ping-pong) */
            barrier_init(&empty[s], (PINGPONG ? 1 : 2) * CLUSTER);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if (CLUSTER > 1) cluster_sync();
    else __syncthreads();

    if (group == 0) {
        registers_decrease<40>();
        produce<CLUSTER, L>(smem, full, empty, &map_a, &map_b, rank, cluster, clusters, groups, n_tiles, k_tiles,
                            multicast);
    } else if constexpr (EPILOGUE >= GELU_DEFERRED) {
        static_assert(!PINGPONG, "the deferred epilogue is cooperative");
        consume_deferred<CLUSTER, EPILOGUE - GELU_DEFERRED>(smem, c_tiles, full, empty, &map_c, row_sumsq, tau,
                                                                  eps, group - 1, rank, cluster, clusters, groups,
                                                                  n_tiles, k_tiles);
    } else {
        consume<CLUSTER, EPILOGUE, PINGPONG>(smem, c_tiles, full, empty, &map_c, row_sumsq, tau, eps, group - 1, rank,
                                             cluster, clusters, groups, n_tiles, k_tiles);
    }
    /* No CTA may leave while a peer can still multicast into it or arrive on its barriers. The
     * cluster barrier is .aligned: the producer warp reconverges first. */
    __syncwarp();
    if (CLUSTER > 1) cluster_sync();
}

__device__ __forceinline__ float gelu_erf(float z) { return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f)); }

/* A consumer's 64 x 256 products leave its registers (see the enum above for what EPILOGUE does).
 * Accumulator fragment of m64nN: thread (warp w, lane l) holds rows 16 w + l / 4 and that + 8,
 * columns 8 i + 2 (l % 4) + {0, 1}: d[4 i + {0, 1}] on the first row, d[4 i + {2, 3}] on the second.
 * C leaves as four 64 x 64 boxes through two buffers in turn, each refilled once the TMA store
 * before the last has read it. In a 64 x 64 box with 128-byte swizzle, 16-byte chunk j of row r
 * sits at chunk j ^ (r % 8). */
template <int EPILOGUE>
__device__ __forceinline__ void epilogue(float d[128], uint8_t *c_tile, const CUtensorMap *map_c, float *row_sumsq,
                                         float tau, float eps, int m0, int n0, int consumer) {
    int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32, r = warp * 16 + lane / 4;
    bool leader = threadIdx.x % 128 == 0;
    float sum_top = 0.0f, sum_bottom = 0.0f;
    if (EPILOGUE == GELU) {
        float scale_top = tau * rsqrtf(row_sumsq[m0 + r] + eps), scale_bottom = tau * rsqrtf(row_sumsq[m0 + r + 8] + eps);
#pragma unroll
        for (int i = 0; i < 32; i++) {
            d[4 * i] = gelu_erf(d[4 * i] * scale_top);
            d[4 * i + 1] = gelu_erf(d[4 * i + 1] * scale_top);
            d[4 * i + 2] = gelu_erf(d[4 * i + 2] * scale_bottom);
            d[4 * i + 3] = gelu_erf(d[4 * i + 3] * scale_bottom);
        }
    }
    if (EPILOGUE == SUMSQ) {
#pragma unroll
        for (int i = 0; i < 32; i++) {
            sum_top = fmaf(d[4 * i], d[4 * i], fmaf(d[4 * i + 1], d[4 * i + 1], sum_top));
            sum_bottom = fmaf(d[4 * i + 2], d[4 * i + 2], fmaf(d[4 * i + 3], d[4 * i + 3], sum_bottom));
        }
    } else {
#pragma unroll
        for (int box = 0; box < BN / 64; box++) {
            uint8_t *box_base = c_tile + (box % 2) * BOX_BYTES;
            if (leader) bulk_wait_read<1>();
            named_barrier_sync(1 + consumer, 128);
#pragma unroll
            for (int chunk = 0; chunk < 8; chunk++) {
                int i = box * 8 + chunk, within = 4 * (lane % 4);
                __nv_bfloat162 top = __floats2bfloat162_rn(d[4 * i], d[4 * i + 1]);
                __nv_bfloat162 bottom = __floats2bfloat162_rn(d[4 * i + 2], d[4 * i + 3]);
                *reinterpret_cast<__nv_bfloat162 *>(box_base + r * 128 + ((chunk ^ (r % 8)) * 16) + within) = top;
                *reinterpret_cast<__nv_bfloat162 *>(box_base + (r + 8) * 128 + ((chunk ^ ((r + 8) % 8)) * 16) +
                                                    within) = bottom;
                if (EPILOGUE == STORE_SUMSQ) {
                    float2 t = __bfloat1622float2(top), b = __bfloat1622float2(bottom);
                    sum_top += t.x * t.x + t.y * t.y;
                    sum_bottom += b.x * b.x + b.y * b.y;
                }
            }
            fence_async_shared();
            named_barrier_sync(1 + consumer, 128);
            if (leader) {
                tma_store_2d(map_c, n0 + 64 * box, m0, box_base);
                bulk_commit();
            }
        }
    }
    if (EPILOGUE == STORE_SUMSQ || EPILOGUE == SUMSQ) {
        for (int o = 1; o < 4; o <<= 1) {
            sum_top += __shfl_xor_sync(0xffffffffu, sum_top, o);
            sum_bottom += __shfl_xor_sync(0xffffffffu, sum_bottom, o);
        }
        if (lane % 4 == 0) {
            atomicAdd(&row_sumsq[m0 + r], sum_top);
            atomicAdd(&row_sumsq[m0 + r + 8], sum_bottom);
        }
    }
}

/* Ping-pong order: consumer c may start the products of its tile j only once the other has
 * waited for every stage of tile j - 1. Without it a consumer could wait on a stage two fills
 * ahead of the ring, whose parity reads as complete. Named barriers 3 and 4, one per consumer:
 * the other consumer arrives (128 threads), this one waits (128). */
__device__ __forceinline__ void turn_wait(int consumer) { named_barrier_sync(3 + consumer, 256); }
__device__ __forceinline__ void turn_pass(int consumer) {
    named_barrier_arrive(3 + (1 - consumer), 256);
}

template <int CLUSTER, int EPILOGUE, bool PINGPONG>
__device__ __forceinline__ void consume(uint8_t *smem, uint8_t *c_tiles, uint64_t *full, uint64_t *empty,
                                        const CUtensorMap *map_c, float *row_sumsq, float tau, float eps,
                                        int consumer, int rank, int cluster, int clusters, int groups, int n_tiles,
                                        int k_tiles) {
    typedef layout<PINGPONG> L;
    registers_increase<232>();
    bool leader = threadIdx.x % 128 == 0;
    uint8_t *c_tile = c_tiles + consumer * L::c_tile_bytes;
    float d[128];
    int tiles = (groups - cluster + clusters - 1) / clusters; /* this CTA's */
    for (int j = PINGPONG ? consumer : 0; j < tiles; j += PINGPONG ? 2 : 1) {
        int g = cluster + j * clusters;
        int m0 = ((g / n_tiles) * CLUSTER + rank) * L::tile_m + (PINGPONG ? 0 : 64 * consumer), n0 = (g % n_tiles) * BN;
        if (PINGPONG && j > 0) turn_wait(consumer);
        /* ping-pong: the other consumer may start once this one has waited for its last stage */
        tile_products<CLUSTER, L>(d, smem, full, empty, PINGPONG ? 0 : consumer * (64 * BK * 2), j * k_tiles, k_tiles,
                                  [&](int kt) {
                                      if (PINGPONG && kt == k_tiles - 1 && j + 1 < tiles) turn_pass(consumer);
                                  });
        epilogue<EPILOGUE>(d, c_tile, map_c, row_sumsq, tau, eps, m0, n0, consumer);
    }
    if (leader) bulk_wait<0>();
}

/* The GELU through experiments.cuh's branch-free erfc (norm_experiments.cu's erfc variant). */
__device__ __forceinline__ float gelu_erfc(float z) {
    float half_erfc = 0.5f * erfc_positive(fabsf(z) * 0.70710678118654752f);
    return z * (z >= 0.0f ? 1.0f - half_erfc : half_erfc);
}

/* chunk ^ row8, in a volatile asm statement so that the compiler computes it where it is used:
 * otherwise it hoists the 64 shared-memory addresses of a tile's chunks out of the tile loop, holds
 * them in registers beside the 128 accumulators, and spills. */
__device__ __forceinline__ int swizzled_chunk(int chunk, int row8) {
    int x;
    asm volatile("xor.b32 %0, %1, %2;" : "=r"(x) : "r"(chunk), "r"(row8));
    return x;
}

/* bf16(x) in the low half, bf16(y) in the high half */
__device__ __forceinline__ uint32_t pack_bf16x2(float x, float y) {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t *>(&v);
}
__device__ __forceinline__ uint32_t shared_load(uint32_t address) {
    uint32_t x;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(x) : "r"(address));
    return x;
}
__device__ __forceinline__ void shared_store(uint32_t address, uint32_t x) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(address), "r"(x) : "memory");
}
/* GELU_FORM 0: erff, 1: the erfc above, 2: none (the packed pair as it is) */
template <int GELU_FORM> __device__ __forceinline__ uint32_t gelu_pair(uint32_t packed, float scale) {
    if (GELU_FORM == 2) return packed;
    __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162 *>(&packed);
    float2 z = __bfloat1622float2(v);
    z.x *= scale, z.y *= scale;
    if (GELU_FORM == 1) z.x = gelu_erfc(z.x), z.y = gelu_erfc(z.y);
    else z.x = gelu_erf(z.x), z.y = gelu_erf(z.y);
    v = __floats2bfloat162_rn(z.x, z.y);
    return *reinterpret_cast<uint32_t *>(&v);
}

/* Units [first, last) of a tile staged in the consumer's four boxes, normalised, through the GELU
 * and written back in place; a box leaves by TMA once its last unit is in. Unit u is chunks 2 u
 * and 2 u + 1, chunk c being the thread's bf16 pairs in columns 8 c + 2 (l % 4) + {0, 1} of rows
 * r and r + 8, as the packing wrote them: two chunks at once so that their 8 GELUs overlap (the
 * drain sits on the warp's path between two k tiles' wgmmas, so its latency counts, not only its
 * instructions). Each thread reads only what it wrote itself, so only the store needs the warp
 * group's barrier. A plain loop: unrolled into an unrolled k loop, the kernel's code outgrew the
 * instruction cache and ran 6-7 times slower. */
template <int GELU_FORM>
__device__ __forceinline__ void drain_units(int first, int last, uint8_t *c_tile, const CUtensorMap *map_c, int m0,
                                            int n0, float scale_top, float scale_bottom, int consumer) {
    int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32, r = warp * 16 + lane / 4, within = 4 * (lane % 4);
    bool leader = threadIdx.x % 128 == 0;
    uint32_t tile = smem_address(c_tile) + r * 128 + within;
#pragma unroll 1
    for (int u = first; u < last; u++) {
        int box = u / 4, chunk = 2 * (u % 4);
        uint32_t first_at = tile + box * BOX_BYTES + swizzled_chunk(chunk, r % 8) * 16; /* (r + 8) % 8 == r % 8 */
        uint32_t second_at = tile + box * BOX_BYTES + swizzled_chunk(chunk + 1, r % 8) * 16;
        uint32_t x0 = shared_load(first_at), x1 = shared_load(first_at + 8 * 128);
        uint32_t x2 = shared_load(second_at), x3 = shared_load(second_at + 8 * 128);
        shared_store(first_at, gelu_pair<GELU_FORM>(x0, scale_top));
        shared_store(first_at + 8 * 128, gelu_pair<GELU_FORM>(x1, scale_bottom));
        shared_store(second_at, gelu_pair<GELU_FORM>(x2, scale_top));
        shared_store(second_at + 8 * 128, gelu_pair<GELU_FORM>(x3, scale_bottom));
        if (chunk == 6) {
            fence_async_shared();
            named_barrier_sync(1 + consumer, 128);
            if (leader) {
                tma_store_2d(map_c, n0 + 64 * box, m0, c_tile + box * BOX_BYTES);
                bulk_commit();
            }
        }
    }
}

/* The cooperative consumer with the GELU epilogue deferred into the next tile's mainloop: a
 * tile's products leave the accumulators as bf16 (A rounded as the scores GEMM would write it)
 * into the consumer's four boxes, and their normalisation, GELU and stores run a few chunks per
 * k tile while the next tile's wgmmas are in flight, so the tensor cores wait only for the
 * packing. */
template <int CLUSTER, int GELU_FORM>
__device__ __forceinline__ void consume_deferred(uint8_t *smem, uint8_t *c_tiles, uint64_t *full, uint64_t *empty,
                                                 const CUtensorMap *map_c, const float *row_sumsq, float tau,
                                                 float eps, int consumer, int rank, int cluster, int clusters,
                                                 int groups, int n_tiles, int k_tiles) {
    typedef layout<false, true> L;
    registers_increase<232>();
    int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32, r = warp * 16 + lane / 4, within = 4 * (lane % 4);
    bool leader = threadIdx.x % 128 == 0;
    uint8_t *c_tile = c_tiles + consumer * L::c_tile_bytes;
    float d[128];
    int pending_m0 = -1, pending_n0 = 0;
    float pending_top = 0.0f, pending_bottom = 0.0f;
    int tiles = (groups - cluster + clusters - 1) / clusters;
    /* 16 units a tile spread over the k tiles: `base` each, one more for the first `extra` */
    int base = 16 / k_tiles, extra = 16 % k_tiles;
    for (int j = 0; j < tiles; j++) {
        int g = cluster + j * clusters;
        int m0 = ((g / n_tiles) * CLUSTER + rank) * L::tile_m + 64 * consumer, n0 = (g % n_tiles) * BN;
        /* this tile's row scales, loaded now so that the loads are long done when it is drained */
        float scale_top = tau * rsqrtf(row_sumsq[m0 + r] + eps), scale_bottom = tau * rsqrtf(row_sumsq[m0 + r + 8] + eps);
        tile_products<CLUSTER, L>(d, smem, full, empty, consumer * (64 * BK * 2), j * k_tiles, k_tiles, [&](int kt) {
            if (pending_m0 < 0) return;
            int first = kt * base + min(kt, extra);
            drain_units<GELU_FORM>(first, first + base + (kt < extra), c_tile, map_c, pending_m0, pending_n0,
                                   pending_top, pending_bottom, consumer);
        });
        /* the boxes are free once the previous tile's stores have read them */
        if (leader) bulk_wait_read<0>();
        named_barrier_sync(1 + consumer, 128);
#pragma unroll
        for (int i = 0; i < 32; i++) {
            uint8_t *box_base = c_tile + (i / 8) * BOX_BYTES;
            int chunk = i % 8;
            *reinterpret_cast<__nv_bfloat162 *>(box_base + r * 128 + ((chunk ^ (r % 8)) * 16) + within) =
                __floats2bfloat162_rn(d[4 * i], d[4 * i + 1]);
            *reinterpret_cast<__nv_bfloat162 *>(box_base + (r + 8) * 128 + ((chunk ^ ((r + 8) % 8)) * 16) + within) =
                __floats2bfloat162_rn(d[4 * i + 2], d[4 * i + 3]);
        }
        pending_m0 = m0, pending_n0 = n0, pending_top = scale_top, pending_bottom = scale_bottom;
    }
    if (pending_m0 >= 0)
        drain_units<GELU_FORM>(0, 16, c_tile, map_c, pending_m0, pending_n0, pending_top, pending_bottom, consumer);
    if (leader) bulk_wait<0>();
}

/* ---- epilogue warps ----
 * The GELU epilogue on warps of its own: the two MMA warp groups stage each 64 x 256 of raw
 * products (bf16) in shared memory and go straight on to the next tile, while warps 1-3 of the
 * producer's warp group (idle otherwise: one thread of warp 0 issues all loads) normalise, apply
 * the GELU and store by TMA. No setmaxnreg: ptxas compiles every warp to the entry budget (168 at
 * 384 threads; with two more warp groups, 640 threads, it had 96 and refused the wgmma), so more
 * epilogue warps would leave the accumulators without registers. staged_full[c] completes when MMA
 * warp group c has written a tile (128 arrivals), staged_empty[c] when the stores have read it. */
template <int CLUSTER, bool SPLIT = false>
__device__ __forceinline__ void mma_to_staging(uint8_t *smem, uint8_t *c_tiles, uint64_t *full, uint64_t *empty,
                                               uint64_t *staged_full, uint64_t *staged_empty, int consumer, int rank,
                                               int cluster, int clusters, int groups, int n_tiles, int k_tiles) {
    typedef layout<false, true> L;
    int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32, r = warp * 16 + lane / 4, within = 4 * (lane % 4);
    uint32_t tile = smem_address(c_tiles + consumer * L::c_tile_bytes) + r * 128 + within;
    float d[128];
    int tiles = (groups - cluster + clusters - 1) / clusters;
    for (int j = 0; j < tiles; j++) {
        auto nothing = [](int) {};
        tile_products<CLUSTER, L, decltype(nothing), SPLIT>(d, smem, full, empty, consumer * (64 * BK * 2), j * k_tiles,
                                                            k_tiles, nothing);
        if (j > 0) barrier_wait(&staged_empty[consumer], (j - 1) & 1);
#pragma unroll
        for (int i = 0; i < 32; i++) {
            uint32_t at = tile + (i / 8) * BOX_BYTES + swizzled_chunk(i % 8, r % 8) * 16; /* (r + 8) % 8 == r % 8 */
            shared_store(at, pack_bf16x2(d[4 * i], d[4 * i + 1]));
            shared_store(at + 8 * 128, pack_bf16x2(d[4 * i + 2], d[4 * i + 3]));
        }
        barrier_arrive(&staged_full[consumer]);
    }
}

/* The epilogue's WORKERS threads from threadIdx.x FIRST on (warps 1-3 of the producer's warp group,
 * or two warp groups of their own): the 128 row scales into shared memory, then the staged tile's
 * eight 64 x 64 boxes (four a consumer) chunk by chunk, then the eight TMA stores. */
template <int CLUSTER, int GELU_FORM, int WORKERS, int FIRST>
__device__ __forceinline__ void staged_gelu(uint8_t *c_tiles, float *scales, uint64_t *staged_full,
                                            uint64_t *staged_empty, const CUtensorMap *map_c, const float *row_sumsq,
                                            float tau, float eps, int rank, int cluster, int clusters, int groups,
                                            int n_tiles) {
    typedef layout<false, true> L;
    int t = threadIdx.x - FIRST;
    bool leader = t == 0;
    uint32_t tiles_at = smem_address(c_tiles);
    int tiles = (groups - cluster + clusters - 1) / clusters;
    for (int j = 0; j < tiles; j++) {
        int g = cluster + j * clusters;
        int m0 = ((g / n_tiles) * CLUSTER + rank) * L::tile_m, n0 = (g % n_tiles) * BN;
        named_barrier_sync(3, WORKERS); /* the previous tile's scales are no longer read */
        for (int row = t; row < 128; row += WORKERS) scales[row] = tau * rsqrtf(row_sumsq[m0 + row] + eps);
        named_barrier_sync(3, WORKERS);
        barrier_wait(&staged_full[0], j & 1);
        barrier_wait(&staged_full[1], j & 1);
#pragma unroll 1
        for (int box = 0; box < 8; box++) { /* consumer box / 4, columns 64 (box % 4) */
            uint32_t box_at = tiles_at + (box / 4) * L::c_tile_bytes + (box % 4) * BOX_BYTES;
#pragma unroll 2
            for (int item = t; item < 512; item += WORKERS) { /* 64 rows x 8 chunks */
                int row = item / 8, chunk = item % 8;
                uint32_t at = box_at + row * 128 + swizzled_chunk(chunk, row % 8) * 16;
                float scale = scales[(box / 4) * 64 + row];
                uint32_t x0, x1, x2, x3;
                asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
                             : "=r"(x0), "=r"(x1), "=r"(x2), "=r"(x3) : "r"(at));
                x0 = gelu_pair<GELU_FORM>(x0, scale), x1 = gelu_pair<GELU_FORM>(x1, scale);
                x2 = gelu_pair<GELU_FORM>(x2, scale), x3 = gelu_pair<GELU_FORM>(x3, scale);
                asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(at), "r"(x0), "r"(x1), "r"(x2), "r"(x3)
                             : "memory");
            }
        }
        fence_async_shared();
        named_barrier_sync(3, WORKERS);
        if (leader) {
            for (int box = 0; box < 8; box++)
                tma_store_2d(map_c, n0 + 64 * (box % 4), m0 + 64 * (box / 4),
                             c_tiles + (box / 4) * L::c_tile_bytes + (box % 4) * BOX_BYTES);
            bulk_commit();
            bulk_wait_read<0>();
            barrier_arrive(&staged_empty[0]);
            barrier_arrive(&staged_empty[1]);
        }
    }
    if (leader) bulk_wait<0>();
}

/* The shared memory of the staged-epilogue kernels: the ring (3 stages), the staged tile (two
 * consumers' four 64 x 64 boxes), the ring's and the staging's barriers and the 128 row scales.
 * Barriers set up by thread 0 and made visible to the cluster before anyone uses them. */
struct staged_shared {
    uint8_t *smem, *c_tiles;
    uint64_t *full, *empty, *staged_full, *staged_empty;
    float *scales;
};
template <int CLUSTER> __device__ __forceinline__ staged_shared staged_shared_init(uint8_t *smem_raw) {
    typedef layout<false, true> L;
    staged_shared sh;
    sh.smem = (uint8_t *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    sh.c_tiles = sh.smem + L::stages * L::stage_bytes;
    sh.full = (uint64_t *)(sh.c_tiles + 2 * L::c_tile_bytes), sh.empty = sh.full + L::stages;
    sh.staged_full = sh.empty + L::stages, sh.staged_empty = sh.staged_full + 2;
    sh.scales = (float *)(sh.staged_empty + 2);
    if (threadIdx.x == 0) {
        for (int s = 0; s < L::stages; s++) {
            barrier_init(&sh.full[s], 1);
            barrier_init(&sh.empty[s], 2 * CLUSTER);
        }
        for (int c = 0; c < 2; c++) {
            barrier_init(&sh.staged_full[c], 128);
            barrier_init(&sh.staged_empty[c], 1);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if (CLUSTER > 1) cluster_sync();
    else __syncthreads();
    return sh;
}

/* WIDE: two warp groups of epilogue of their own (640 threads). setmaxnreg moves registers only
 * between warp groups of the CTA, within its entry budget (96 a thread at 640 threads: 61440): the
 * producer's warp group goes down to 32 (24 spilled), the epilogue's to 64, and the MMA warp groups
 * up to 160 (152 spilled; 168 with 56 for the epilogue measured the same or slower; asking for
 * more than the budget left setmaxnreg.inc waiting forever). 96 at entry is too few for the 128
 * accumulators of a m64n256 wgmma, which ptxas checks against the entry budget whatever the
 * setmaxnreg before it, so the products are two m64n128 wgmmas (wgmma_m64n128k16). */
enum { WIDE_THREADS = 640 };
template <int CLUSTER, int GELU_FORM, bool WIDE>
__global__ __launch_bounds__(WIDE ? (int)WIDE_THREADS : (int)THREADS, 1) void gemm_gelu_kernel(
    const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
    const __grid_constant__ CUtensorMap map_c, const float *row_sumsq, float tau, float eps, int M, int N, int K) {
    typedef layout<false, true> L;
    extern __shared__ uint8_t smem_raw[];
    staged_shared sh = staged_shared_init<CLUSTER>(smem_raw);
    int group = threadIdx.x / 128, n_tiles = N / BN, k_tiles = K / BK;
    int rank = CLUSTER > 1 ? (int)cluster_rank() : 0, cluster = blockIdx.x / CLUSTER, clusters = gridDim.x / CLUSTER;
    int groups = (M / L::tile_m / CLUSTER) * n_tiles;
    bool epilogue = WIDE ? group >= 3 : group == 0 && threadIdx.x >= 32;
    if (epilogue) {
        if (WIDE) registers_decrease<64>();
        staged_gelu<CLUSTER, GELU_FORM, WIDE ? 256 : 96, WIDE ? 384 : 32>(
            sh.c_tiles, sh.scales, sh.staged_full, sh.staged_empty, &map_c, row_sumsq, tau, eps, rank, cluster,
            clusters, groups, n_tiles);
    } else if (group == 0) {
        if (WIDE) registers_decrease<32>();
        produce<CLUSTER, L>(sh.smem, sh.full, sh.empty, &map_a, &map_b, rank, cluster, clusters, groups, n_tiles,
                            k_tiles, 1);
    } else {
        if (WIDE) registers_increase<160>();
        mma_to_staging<CLUSTER, WIDE>(sh.smem, sh.c_tiles, sh.full, sh.empty, sh.staged_full, sh.staged_empty,
                                      group - 1, rank, cluster, clusters, groups, n_tiles, k_tiles);
    }
    __syncwarp();
    if (CLUSTER > 1) cluster_sync();
}

/* ---- host ---- */
/* A row-major [rows, cols] bf16 matrix, read in boxes of box_rows x 64 with 128-byte swizzle. */
static CUtensorMap tensor_map(tensor_map_encoder encode, const bf16 *base, int rows, int cols, int box_rows) {
    CUtensorMap map;
    CK(!encode_bf16_boxes(&map, encode, base, rows, cols, box_rows));
    return map;
}

static void compare(const char *what, const bf16 *x, const bf16 *reference, size_t count) {
    std::vector<bf16> hx(count), hr(count);
    CK(cudaMemcpy(hx.data(), x, count * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hr.data(), reference, count * 2, cudaMemcpyDeviceToHost));
    double worst = 0, scale = 0, sum = 0;
    for (size_t i = 0; i < count; i++) scale = fmax(scale, fabs((double)__bfloat162float(hr[i])));
    for (size_t i = 0; i < count; i++) {
        double diff = fabs((double)__bfloat162float(hx[i]) - __bfloat162float(hr[i]));
        worst = fmax(worst, diff);
        sum += diff;
    }
    printf("  %s against cuBLASLt: worst |difference| %.3e, mean %.3e (largest |value| %.3f)\n", what, worst,
           sum / count, scale);
}

/* S = GELU(tau C / sqrt(row_sumsq + eps)) from cuBLASLt's C: what the GELU epilogue should write. */
__global__ void gelu_reference(bf16 *s, const bf16 *c, const float *row_sumsq, float tau, float eps, int M, int N) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)M * N; i += (size_t)gridDim.x * blockDim.x) {
        float z = __bfloat162float(c[i]) * (tau * rsqrtf(row_sumsq[i / N] + eps));
        s[i] = __float2bfloat16(0.5f * z * (1.0f + erff(z * 0.70710678118654752f)));
    }
}

/* Our kernel with clusters of CLUSTER CTAs, cooperative or ping-pong, with each epilogue; leaves
 * row_sumsq = |row of A B^T|^2 (fp32 products) and the GELU epilogue's S in C for the checks. */
static bool profiling = false, groups_only = false;

/* under Nsight Compute (`profile`): each kernel once, untimed */
template <typename Launches> static float timed(Launches launches) {
    if (!profiling) return time_ms(launches);
    launches();
    CK(cudaDeviceSynchronize());
    return 0.0f;
}

/* gemm_gelu_kernel's three forms (erff, erfc, none: C copied through the epilogue), each checked,
 * with the epilogue on the producer's spare warps or on warp groups of its own (WIDE); config as
 * for the cooperative kernel, its shared memory and block size set for these calls. */
template <int CLUSTER, bool WIDE>
static void staged_forms(cudaLaunchConfig_t config, const CUtensorMap &map_a, const CUtensorMap &map_b,
                         const CUtensorMap &map_c, const bf16 *C, const bf16 *C_ref, const bf16 *S_ref,
                         const float *row_sumsq, float tau, float eps, int M, int N, int K) {
    config.dynamicSmemBytes = layout<false, true>::smem_bytes + 32 + 512; /* + the staging's barriers and scales */
    config.blockDim = dim3(WIDE ? (int)WIDE_THREADS : (int)THREADS);
    const char *where = WIDE ? "epilogue warp groups" : "epilogue warps";
    auto form = [&](auto kernel, const char *what, const bf16 *reference) {
        CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, config.dynamicSmemBytes));
        float t = timed([&] { CK(cudaLaunchKernelEx(&config, kernel, map_a, map_b, map_c, row_sumsq, tau, eps, M, N, K)); });
        CK(cudaDeviceSynchronize());
        char label[64];
        snprintf(label, sizeof label, "%s, %s", what, where);
        compare(label, C, reference, (size_t)M * N);
        return t;
    };
    float erff_ms = form(gemm_gelu_kernel<CLUSTER, 0, WIDE>, "S (erff)", S_ref);
    float erfc_ms = form(gemm_gelu_kernel<CLUSTER, 1, WIDE>, "S (erfc)", S_ref);
    float copy_ms = form(gemm_gelu_kernel<CLUSTER, 2, WIDE>, "C copied", C_ref);
    printf("  ours, clusters of %d: S from %s %.3f ms (erff), %.3f (erfc); C copied through them %.3f\n", CLUSTER,
           where, erff_ms, erfc_ms, copy_ms);
}

template <int CLUSTER, bool PINGPONG>
static void ours(tensor_map_encoder encode, const bf16 *A, const bf16 *B, bf16 *C, const bf16 *C_ref, bf16 *S_ref,
                 float *row_sumsq, int M, int N, int K) {
    typedef layout<PINGPONG> L;
    CUtensorMap map_a = tensor_map(encode, A, M, K, L::tile_m), map_b = tensor_map(encode, B, N, K, BN / CLUSTER);
    CUtensorMap map_c = tensor_map(encode, C, M, N, 64);
    CK(cudaFuncSetAttribute(gemm_kernel<CLUSTER, STORE, PINGPONG>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::smem_bytes));
    CK(cudaFuncSetAttribute(gemm_kernel<CLUSTER, STORE_SUMSQ, PINGPONG>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::smem_bytes));
    CK(cudaFuncSetAttribute(gemm_kernel<CLUSTER, SUMSQ, PINGPONG>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::smem_bytes));
    CK(cudaFuncSetAttribute(gemm_kernel<CLUSTER, GELU, PINGPONG>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::smem_bytes));
    if constexpr (!PINGPONG) {
        int deferred_smem = layout<false, true>::smem_bytes;
        CK(cudaFuncSetAttribute(gemm_kernel<CLUSTER, GELU_DEFERRED, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, deferred_smem));
        CK(cudaFuncSetAttribute(gemm_kernel<CLUSTER, GELU_DEFERRED_FAST, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, deferred_smem));
        CK(cudaFuncSetAttribute(gemm_kernel<CLUSTER, DEFERRED_COPY, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, deferred_smem));
    }
    cudaLaunchConfig_t config = {};
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = CLUSTER;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.blockDim = dim3(THREADS);
    config.dynamicSmemBytes = L::smem_bytes;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int sms, clusters = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    config.gridDim = dim3(sms / CLUSTER * CLUSTER);
    CK(cudaOccupancyMaxActiveClusters(&clusters, gemm_kernel<CLUSTER, STORE, PINGPONG>, &config));
    config.gridDim = dim3(std::min(clusters, (M / L::tile_m / CLUSTER) * (N / BN)) * CLUSTER);
    float tau = sqrtf((float)N), eps = 1e-6f;
    double flops = 2.0 * M * N * K;
#define OURS(E) CK(cudaLaunchKernelEx(&config, gemm_kernel<CLUSTER, E, PINGPONG>, map_a, map_b, map_c, row_sumsq, tau, eps, M, N, K, 1))
    if (groups_only) { /* `groups`: the row sums, then the epilogue warp groups' kernel alone */
        CK(cudaMemsetAsync(row_sumsq, 0, (size_t)M * 4));
        OURS(SUMSQ);
        gelu_reference<<<1024, 256>>>(S_ref, C_ref, row_sumsq, tau, eps, M, N);
        staged_forms<CLUSTER, true>(config, map_a, map_b, map_c, C, C_ref, S_ref, row_sumsq, tau, eps, M, N, K);
        return;
    }
    float store = timed([&] { OURS(STORE); });
    CK(cudaDeviceSynchronize());
    compare("C", C, C_ref, (size_t)M * N);
    float memset_ms = timed([&] { CK(cudaMemsetAsync(row_sumsq, 0, (size_t)M * 4)); });
    float store_sumsq = timed([&] {
        CK(cudaMemsetAsync(row_sumsq, 0, (size_t)M * 4));
        OURS(STORE_SUMSQ);
    });
    float sumsq = timed([&] {
        CK(cudaMemsetAsync(row_sumsq, 0, (size_t)M * 4));
        OURS(SUMSQ);
    });
    CK(cudaDeviceSynchronize());
    float gelu = timed([&] { OURS(GELU); }); /* the row sums of the SUMSQ runs, as the scores GEMM would find them */
    CK(cudaDeviceSynchronize());
    printf("  ours, %s, clusters of %d (%u CTAs): C %.3f ms (%.0f TFLOP/s); C and row sums %.3f; row sums alone %.3f "
           "(memset %.3f in both); S = GELU(tau C / r) %.3f\n",
           PINGPONG ? "ping-pong" : "cooperative", CLUSTER, config.gridDim.x, store, flops / store / 1e9, store_sumsq,
           sumsq, memset_ms, gelu);
    gelu_reference<<<1024, 256>>>(S_ref, C_ref, row_sumsq, tau, eps, M, N);
    compare("S", C, S_ref, (size_t)M * N);
    if constexpr (!PINGPONG) {
        config.dynamicSmemBytes = layout<false, true>::smem_bytes;
        float deferred = timed([&] { OURS(GELU_DEFERRED); });
        CK(cudaDeviceSynchronize());
        compare("S, deferred (erff)", C, S_ref, (size_t)M * N);
        float fast = timed([&] { OURS(GELU_DEFERRED_FAST); });
        CK(cudaDeviceSynchronize());
        compare("S, deferred (erfc)", C, S_ref, (size_t)M * N);
        float copy = timed([&] { OURS(DEFERRED_COPY); });
        CK(cudaDeviceSynchronize());
        compare("C, deferred copy", C, C_ref, (size_t)M * N);
        /* the epilogue on warps of its own */
        staged_forms<CLUSTER, false>(config, map_a, map_b, map_c, C, C_ref, S_ref, row_sumsq, tau, eps, M, N, K);
        staged_forms<CLUSTER, true>(config, map_a, map_b, map_c, C, C_ref, S_ref, row_sumsq, tau, eps, M, N, K);
        config.dynamicSmemBytes = L::smem_bytes;
        float again = timed([&] { OURS(STORE); });
        printf("  ours, cooperative, clusters of %d: S with the GELU deferred into the next tile's products %.3f ms "
               "(erff), %.3f (erfc); the same structure copying C %.3f; C again %.3f\n", CLUSTER, deferred, fast, copy,
               again);
    }
#undef OURS
}

static void measure(tensor_map_encoder encode, int M, int N, int K) {
    bf16 *A, *B, *C, *C_ref, *S_ref;
    float *row_sumsq;
    CK(cudaMalloc(&A, (size_t)M * K * 2));
    CK(cudaMalloc(&B, (size_t)N * K * 2));
    CK(cudaMalloc(&C, (size_t)M * N * 2));
    CK(cudaMalloc(&C_ref, (size_t)M * N * 2));
    CK(cudaMalloc(&S_ref, (size_t)M * N * 2));
    CK(cudaMalloc(&row_sumsq, (size_t)M * 4));
    fill<<<1024, 256>>>(A, (size_t)M * K, 1, 2.0f);
    fill<<<1024, 256>>>(B, (size_t)N * K, 2, 0.2f);
    double flops = 2.0 * M * N * K;
    lt_gemm lt(M, N, K);
    float lt_best = lt.tune(A, B, C_ref);
    printf("M %d N %d K %d: cuBLASLt %.3f ms (%.0f TFLOP/s)\n", M, N, K, lt_best, flops / lt_best / 1e9);
    ours<1, false>(encode, A, B, C, C_ref, S_ref, row_sumsq, M, N, K);
    if (profiling) return; /* (buffers left to the process's end) */
    ours<2, false>(encode, A, B, C, C_ref, S_ref, row_sumsq, M, N, K);
    if (!groups_only) {
        ours<1, true>(encode, A, B, C, C_ref, S_ref, row_sumsq, M, N, K);
        ours<2, true>(encode, A, B, C, C_ref, S_ref, row_sumsq, M, N, K);
    }
    float again = time_ms([&] { lt.run(A, B, C_ref, lt.best); });
    printf("  cuBLASLt again, after ours: %.3f ms\n", again);

    /* The row sums of squares (fp32 products) against the same sums over cuBLASLt's bf16 C. */
    std::vector<bf16> h(std::min<size_t>((size_t)M, 4096) * N);
    std::vector<float> sums(std::min(M, 4096));
    CK(cudaMemcpy(h.data(), C_ref, h.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(sums.data(), row_sumsq, sums.size() * 4, cudaMemcpyDeviceToHost));
    double worst = 0;
    for (size_t r = 0; r < sums.size(); r++) {
        double s = 0;
        for (int j = 0; j < N; j++) {
            double v = __bfloat162float(h[r * N + j]);
            s += v * v;
        }
        worst = fmax(worst, fabs(sums[r] - s) / s);
    }
    printf("  row sums of squares (first %zu rows) against the host's over cuBLASLt's bf16 C: worst relative %.3e\n",
           sums.size(), worst);
    CK(cudaFree(A));
    CK(cudaFree(B));
    CK(cudaFree(C));
    CK(cudaFree(C_ref));
    CK(cudaFree(S_ref));
    CK(cudaFree(row_sumsq));
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* each line out as it is printed, should a kernel hang */
    tensor_map_encoder encode = find_tensor_map_encoder();
    if (!encode) {
        printf("cuTensorMapEncodeTiled not found\n");
        return 1;
    }
    /* `profile`: the FFN shape's kernels once each, clusters of 1, for ncu */
    profiling = argc > 1 && !strcmp(argv[1], "profile");
    groups_only = argc > 1 && !strcmp(argv[1], "groups");
    int M = argc > 1 && !profiling && !groups_only ? atoi(argv[1]) : 100864;
    measure(encode, M, 3072, 768); /* FFN: 3072 key tokens */
    if (profiling) return 0;
    measure(encode, M, 768, 768);  /* Q, K, V, O: 768 key tokens */
    return 0;
}
