/* Hopper (sm_90a) building blocks for GEMMs of our own: TMA (cp.async.bulk.tensor), mbarriers,
 * clusters and wgmma, as thin PTX wrappers. Used by pattention_fused.cu and by the experiment
 * it grew from (scripts/experiments/wgmma_gemm.cu). Everything here needs sm_90a: callers
 * compile their kernels' bodies only when __CUDA_ARCH_FEAT_SM90_ALL is defined. */
#ifndef TF_KERNELS_CUDA_HOPPER_CUH
#define TF_KERNELS_CUDA_HOPPER_CUH

#include <cuda.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ uint32_t smem_address(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* ---- mbarriers ---- */
__device__ __forceinline__ void barrier_init(uint64_t *bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(count));
}
__device__ __forceinline__ void barrier_expect_bytes(uint64_t *bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void barrier_arrive(uint64_t *bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_address(bar)) : "memory");
}
__device__ __forceinline__ void barrier_wait(uint64_t *bar, int parity) {
    asm volatile("{\n.reg .pred done;\nwait_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra wait_%=;\n}\n" ::"r"(smem_address(bar)),
                 "r"(parity)
                 : "memory");
}
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

/* ---- clusters ---- */
__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return rank;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
/* Arrive on the barrier at the same shared-memory offset in CTA `cta` of the cluster. Plain
 * arrive: with .release.cluster every arrive waited for cluster-wide visibility of the thread's
 * memory operations, and clusters of 2 ran a third slower (docs/performance.md). */
__device__ __forceinline__ void barrier_arrive_in(uint64_t *bar, uint32_t cta) {
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_address(bar)), "r"(cta));
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

/* ---- TMA ---- */
/* The box at (inner, outer) of the tensor map into shared memory, completing on bar. */
__device__ __forceinline__ void tma_load_2d(void *dst, const CUtensorMap *map, int inner, int outer, uint64_t *bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];" ::"r"(smem_address(dst)),
                 "l"((uint64_t)map), "r"(inner), "r"(outer), "r"(smem_address(bar))
                 : "memory");
}
/* The same into the same offset of every CTA in mask, each CTA's barrier at bar's offset completing. */
__device__ __forceinline__ void tma_load_2d_multicast(void *dst, const CUtensorMap *map, int inner, int outer,
                                                      uint64_t *bar, uint16_t mask) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(smem_address(dst)),
                 "l"((uint64_t)map), "r"(inner), "r"(outer), "r"(smem_address(bar)), "h"(mask)
                 : "memory");
}
__device__ __forceinline__ void tma_store_2d(const CUtensorMap *map, const void *src, int inner, int outer) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];" ::"l"((uint64_t)map),
                 "r"(inner), "r"(outer), "r"(smem_address(src))
                 : "memory");
}
__device__ __forceinline__ void tma_store_commit() {
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
/* Wait until at most N committed stores still read shared memory. */
template <int N> __device__ __forceinline__ void tma_store_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void tma_store_wait_all() {
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
/* Writes to shared memory by ordinary stores, made visible to TMA and wgmma (the async proxy). */
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

/* ---- shared-memory matrix descriptors for wgmma, 128-byte swizzle ----
 * K-major (rows of 64 bf16 along K, as TMA writes a box 64 wide): 8-row groups 1024 bytes apart.
 * MN-major (rows of 64 bf16 along M or N, one per k): 8-k groups 1024 bytes apart, blocks of 64
 * along M or N `mn_block_bytes` apart. */
__device__ __forceinline__ uint64_t smem_descriptor_k_major(const void *p) {
    uint64_t address = smem_address(p);
    return ((address & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ uint64_t smem_descriptor_mn_major(const void *p, uint32_t mn_block_bytes) {
    uint64_t address = smem_address(p);
    return ((address & 0x3FFFF) >> 4) | ((uint64_t)(mn_block_bytes >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) |
           (1ull << 62);
}

/* ---- wgmma ---- */
__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
template <int R> __device__ __forceinline__ void registers_decrease() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R> __device__ __forceinline__ void registers_increase() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}

#define WGMMA_D8(i)                                                                                                \
    "+f"(d[(i) + 0]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3]), "+f"(d[(i) + 4]), "+f"(d[(i) + 5]),   \
        "+f"(d[(i) + 6]), "+f"(d[(i) + 7])
#define WGMMA_D64(i)                                                                                               \
    WGMMA_D8(i), WGMMA_D8((i) + 8), WGMMA_D8((i) + 16), WGMMA_D8((i) + 24), WGMMA_D8((i) + 32), WGMMA_D8((i) + 40), \
        WGMMA_D8((i) + 48), WGMMA_D8((i) + 56)
#define WGMMA_R16(a) "%" #a "0, %" #a "1, %" #a "2, %" #a "3, %" #a "4, %" #a "5, %" #a "6, %" #a "7, %" #a "8, %" #a "9, "

/* D (64 x 256 fp32, 128 registers a thread) += A (64 x 16, shared) B^T (256 x 16, shared, K-major
 * or, with TRANS_B, MN-major). The accumulator fragment: thread (warp w, lane l) of the warp
 * group holds rows 16 w + l / 4 and that + 8, columns 8 i + 2 (l % 4) + {0, 1}: d[4 i + {0, 1}] on
 * the first row, d[4 i + {2, 3}] on the second. */
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n256k16(float *d, uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, " WGMMA_R16(1) WGMMA_R16(2) WGMMA_R16(3) WGMMA_R16(4)
                     WGMMA_R16(5) WGMMA_R16(6) WGMMA_R16(7) WGMMA_R16(8) WGMMA_R16(9) WGMMA_R16(10) WGMMA_R16(11)
                 "%120, %121, %122, %123, %124, %125, %126, %127"
                 "}, %128, %129, p, 1, 1, 0, %131;\n}\n"
                 : WGMMA_D64(0), WGMMA_D64(64)
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
}
/* The same for 64 x 128 (64 registers a thread). */
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16(float *d, uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, " WGMMA_R16(1) WGMMA_R16(2) WGMMA_R16(3) WGMMA_R16(4)
                     WGMMA_R16(5) "%60, %61, %62, %63"
                 "}, %64, %65, p, 1, 1, 0, %67;\n}\n"
                 : WGMMA_D64(0)
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
}

/* Keeps accumulators in registers across the asm statements that read them asynchronously. */
template <int N> __device__ __forceinline__ void fence_accumulators(float *d) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

#endif
