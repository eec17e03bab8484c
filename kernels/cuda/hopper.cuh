/* PTX wrappers of Hopper's asynchronous machinery (sm_90a): shared-memory addresses, mbarriers,
 * TMA loads and stores, bulk groups, named barriers, wgmma's matrix descriptor and its fence,
 * commit and wait; and on the host, the TMA descriptors of bf16 matrices those loads and stores
 * use. Used by the wgmma attention (attention_wgmma.cu[h]) and the experiments
 * scripts/experiments/attention_wgmma.cu and wgmma_gemm.cu. */
#ifndef TF_KERNELS_CUDA_HOPPER_CUH
#define TF_KERNELS_CUDA_HOPPER_CUH

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

__device__ __forceinline__ uint32_t smem_address(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
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
/* TMA: the box at (inner, outer) of the tensor map into shared memory, completing on bar. */
__device__ __forceinline__ void tma_load_2d(void *dst, const CUtensorMap *map, int inner, int outer,
                                            uint64_t *bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], "
                 "[%1, {%2, %3}], [%4];" ::"r"(smem_address(dst)),
                 "l"((uint64_t)map), "r"(inner), "r"(outer), "r"(smem_address(bar))
                 : "memory");
}
/* TMA: shared memory into the box at (inner, outer) of the tensor map, as one bulk group of the
 * calling thread (bulk_commit; bulk_wait_read before the shared memory is written again). */
__device__ __forceinline__ void tma_store_2d(const CUtensorMap *map, int inner, int outer, const void *src) {
    asm volatile(
        "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];" ::"l"((uint64_t)map),
        "r"(inner), "r"(outer), "r"(smem_address(src))
        : "memory");
}
__device__ __forceinline__ void bulk_commit() {
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
/* Waits until the calling thread's bulk groups but the last N have read their shared memory
 * (bulk_wait_read) or are complete (bulk_wait). */
template <int N> __device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
template <int N> __device__ __forceinline__ void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}
/* Orders this thread's ordinary shared-memory accesses before later ones of the async proxy (TMA,
 * wgmma). */
__device__ __forceinline__ void fence_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
/* Named barriers (0 is __syncthreads'): `threads` arrivals in all, counting those that wait. */
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
/* Shared-memory matrix descriptor of a tile in 128-byte swizzle whose rows are 64 bf16 (128 bytes,
 * one swizzle row), 8-row groups 1024 bytes apart (the TMA box layout). It serves K-major operands
 * (the reduction runs along a row) and, with 64 output columns, MN-major ones (the reduction runs
 * down the rows): either way the stride field is the 8-row group's and the leading field is unused
 * (measured for MN-major: right with any leading offset, wrong with a stride other than 1024). */
__device__ __forceinline__ uint64_t smem_descriptor(const void *p) {
    uint64_t address = smem_address(p);
    return ((address & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
/* Waits until at most N committed groups of this warp group's products are in flight. */
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

/* ---- host: TMA descriptors ---- */
typedef CUresult (*tensor_map_encoder)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                       const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                       const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                       CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/* The driver's cuTensorMapEncodeTiled, found through the runtime (no link to libcuda); NULL when
 * the driver has none. */
static inline tensor_map_encoder find_tensor_map_encoder(void) {
    void *encode = NULL;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &encode, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
        return NULL;
    return (tensor_map_encoder)encode;
}

/* A row-major [rows, cols] bf16 matrix read in boxes of 64 columns (128 bytes, the swizzle span)
 * by box_rows rows, in 128-byte swizzle (the layout smem_descriptor describes); false when the
 * driver refuses it. */
static inline bool encode_bf16_boxes(CUtensorMap *map, tensor_map_encoder encode, const void *base, int rows,
                                     int cols, int box_rows) {
    cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows}, strides[1] = {(cuuint64_t)cols * 2};
    cuuint32_t box[2] = {64, (cuuint32_t)box_rows}, element_strides[2] = {1, 1};
    return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)base, dims, strides, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

#endif
