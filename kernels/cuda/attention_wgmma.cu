/* Launcher of the wgmma attention forward (attention_wgmma.cuh): compiled for sm_90a only
 * (CMakeLists.txt), so it runs on compute capability 9.0 and says no to every other GPU. Its TMA
 * descriptors (hopper.cuh: q, k and v in boxes of a head's 64 columns by `tokens` rows, the output
 * in boxes of 64 rows and of the last tile's tokens - 192) are kept for the last buffers seen:
 * inference runs every block through the same q, k, v and output. */
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/attention_wgmma.cuh"

#include <string.h>

/* The encoder, once the device is known to run the kernel; NULL otherwise. */
static tensor_map_encoder wgmma_encoder(void) {
    static int checked;
    static tensor_map_encoder encode;
    if (checked) return encode;
    checked = 1;
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cuda_ctx.device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, cuda_ctx.device);
    if (major != 9 || minor != 0) return NULL;
    encode = find_tensor_map_encoder();
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

bool attention_wgmma_forward(const attention_forward_args &args) {
    using namespace wgmma_attention;
    if (args.head_dim != HEAD_DIM || args.tokens < MIN_TOKENS || args.tokens > MAX_TOKENS ||
        args.batch <= 0 || args.heads <= 0)
        return false;
    const void *pointers[5] = {args.out, args.lse, args.q, args.k, args.v};
    for (const void *p : pointers)
        if (!is_aligned16(p)) return false;
    tensor_map_encoder encode = wgmma_encoder();
    if (!encode) return false;
    static struct {
        const void *buffers[4]; /* q, k, v, out */
        int rows, width, tokens;
        CUtensorMap maps[5]; /* q, k, v, out, out's last tile */
    } last;
    int rows = args.batch * args.tokens, width = args.heads * HEAD_DIM;
    const void *buffers[4] = {args.q, args.k, args.v, args.out};
    if (memcmp(last.buffers, buffers, sizeof buffers) || last.rows != rows || last.width != width ||
        last.tokens != args.tokens) {
        last.rows = 0; /* kept only once all five are made */
        for (int i = 0; i < 5; i++) {
            int box_rows = i < 3 ? args.tokens : i == 3 ? 64 : args.tokens - 192;
            if (!encode_bf16_boxes(&last.maps[i], encode, buffers[i < 4 ? i : 3], rows, width, box_rows))
                return false;
        }
        memcpy(last.buffers, buffers, sizeof buffers);
        last.rows = rows, last.width = width, last.tokens = args.tokens;
    }
    unit_args a = {args.lse, args.tokens, args.heads, args.scale * LOG2E};
    int units = args.batch * args.heads, grid = units < cuda_ctx.sm_count ? units : cuda_ctx.sm_count;
    attention_forward_kernel<<<grid, THREADS, SMEM_BYTES, cuda_ctx.stream>>>(
        last.maps[0], last.maps[1], last.maps[2], last.maps[3], last.maps[4], a, units);
    return true;
}
