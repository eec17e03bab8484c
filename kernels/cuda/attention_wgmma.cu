/* Launcher of the wgmma attention forward (attention_wgmma.cuh): compiled for sm_90a only
 * (CMakeLists.txt), so it runs on compute capability 9.0 and says no to every other GPU. Its TMA
 * descriptors (one per tensor: 64 columns of a head by `tokens` rows) come from the driver's
 * cuTensorMapEncodeTiled, found through the runtime (no link to libcuda), and are kept for the
 * last buffers seen: inference runs every block through the same q, k and v. */
#include <cuda.h>

#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/attention_wgmma.cuh"

typedef CUresult (*encode_tiled_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                    const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                    const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                    CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/* The encoder, once the device is known to run the kernel; NULL otherwise. */
static encode_tiled_fn wgmma_encoder(void) {
    static int checked;
    static encode_tiled_fn encode;
    if (checked) return encode;
    checked = 1;
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cuda_ctx.device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, cuda_ctx.device);
    if (major != 9 || minor != 0) return NULL;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void **)&encode, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
        encode = NULL;
    if (encode && cudaFuncSetAttribute(wgmma_attention::attention_forward_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       wgmma_attention::SMEM_BYTES) != cudaSuccess)
        encode = NULL;
    cudaGetLastError(); /* a refusal above is an answer, not an error of the next launch */
    return encode;
}

bool attention_wgmma_available(void) {
    return wgmma_encoder() != NULL;
}

/* Head columns of a [rows, width] bf16 tensor, boxes of 64 columns by `box_rows` rows. */
static bool encode_heads(CUtensorMap *map, encode_tiled_fn encode, const bf16 *x, int rows, int width,
                         int box_rows) {
    cuuint64_t dims[2] = {(cuuint64_t)width, (cuuint64_t)rows},
               strides[1] = {(cuuint64_t)width * sizeof(bf16)};
    cuuint32_t box[2] = {wgmma_attention::HEAD_DIM, (cuuint32_t)box_rows}, element_strides[2] = {1, 1};
    return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)x, dims, strides, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

bool attention_wgmma_forward(const attention_forward_args &args) {
    using namespace wgmma_attention;
    if (args.head_dim != HEAD_DIM || args.tokens < MIN_TOKENS || args.tokens > MAX_TOKENS) return false;
    const void *pointers[5] = {args.out, args.lse, args.q, args.k, args.v};
    for (const void *p : pointers)
        if (!is_aligned16(p)) return false;
    encode_tiled_fn encode = wgmma_encoder();
    if (!encode) return false;
    static struct {
        const bf16 *q, *k, *v;
        int rows, width, tokens;
        CUtensorMap maps[3];
    } last;
    int rows = args.batch * args.tokens, width = args.heads * HEAD_DIM;
    if (last.q != args.q || last.k != args.k || last.v != args.v || last.rows != rows ||
        last.width != width || last.tokens != args.tokens) {
        last.q = NULL; /* kept only once all three are made */
        if (!encode_heads(&last.maps[0], encode, args.q, rows, width, args.tokens) ||
            !encode_heads(&last.maps[1], encode, args.k, rows, width, args.tokens) ||
            !encode_heads(&last.maps[2], encode, args.v, rows, width, args.tokens))
            return false;
        last.q = args.q, last.k = args.k, last.v = args.v, last.rows = rows, last.width = width;
        last.tokens = args.tokens;
    }
    unit_args a = {args.out, args.lse, args.tokens, args.heads, args.scale * LOG2E};
    int units = args.batch * args.heads, grid = units < cuda_ctx.sm_count ? units : cuda_ctx.sm_count;
    attention_forward_kernel<<<grid, THREADS, SMEM_BYTES, cuda_ctx.stream>>>(last.maps[0], last.maps[1],
                                                                             last.maps[2], a, units);
    return true;
}
