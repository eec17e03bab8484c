/* The Pattention forward (DESIGN.md section 2) in two GEMMs of our own on Hopper, with the
 * normalisation inside them instead of a pass of its own over the scores:
 *
 *   scores:  A = X K^T (bf16 [rows, n], kept for backward), and for every 256-column tile of A
 *            each row's partial sum of squares, sum_j bf16(A_ij)^2, from the epilogue.
 *   values:  r = sqrt(sum of a row's partials + eps), out = GELU(tau A / r) V. Each tile of A is
 *            normalised in shared memory between TMA bringing it and wgmma reading it; the CTAs
 *            of the first column tile also write r (backward needs it).
 *
 * The norm pass that this replaces reads and writes 2 x 2 bytes per score at the memory's speed
 * (11.7 ms of B/16's 58 ms inference batch, docs/performance.md). The partial sums are written
 * per tile and summed in a fixed order, not with atomics, so results are the same run to run.
 *
 * One persistent kernel for both (the block measured in scripts/experiments/wgmma_gemm.cu):
 * C = A B^T, bf16 in, fp32 accumulation, bf16 out. One CTA per SM walks 128 x BN output tiles
 * (N fastest); a producer warp group (one thread of it issuing) loads 128 x 64 of A and BN x 64
 * of B per stage with TMA (128-byte swizzle) into a ring; two consumer warp groups multiply their
 * 64 rows each with wgmma, release a stage when the products reading it are done, and store
 * 64 x 64 boxes through two shared-memory buffers with TMA. The producer gives its registers to
 * the consumers (setmaxnreg: 24 and 240 a thread), which a 64 x 384 accumulator (192 a thread)
 * needs. CTAs run in clusters of two that take tiles stacked in M: each loads half of
 * the B tile and multicasts it to both. B is K-major for the scores (key tokens [n, d_in]) and
 * MN-major for the values (value tokens [n, d_out] as stored, wgmma reading them transposed).
 *
 * Needs sm_90a (wgmma, setmaxnreg): the kernels' bodies exist only in that build, and the host
 * takes this path only on a device of compute capability 9.0. Shapes: any rows (TMA fills and
 * clips the edges); n, d_in and d_out multiples of 8 and 16-byte aligned buffers (TMA's strides
 * and addresses). Anything else runs cuBLASLt, the norm pass and cuBLASLt, the same operations
 * one by one.
 *
 * Measured on the H100 (B/16 bench infer, batch 512, docs/performance.md): slower than cuBLASLt
 * and the norm pass (GEMMs and norm 42.9 ms a batch; fused 48.5 ms with the fast GELU, 53.7 with
 * erff), so it is off unless asked for (tf_cuda_pattention_use_fused, or TF_PATTENTION_FUSED=0/1
 * in the environment; 2 and 3 time the scores GEMM alone and the values GEMM without the norm). */
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/hopper.cuh"

#include <string.h>

namespace {

enum { BM = 128, BK = 64, CLUSTER = 2, THREADS = 384, BOX_BYTES = 64 * 64 * 2, SCORES_BN = 256 };
enum fused_mode { MODE_SCORES, MODE_VALUES };

template <int BN> struct tile_plan {
    static constexpr int a_bytes = BM * BK * 2, b_bytes = BN * BK * 2, stage_bytes = a_bytes + b_bytes;
    static constexpr int stages = BN == 256 ? 4 : 3; /* as many as 227 KB of shared memory hold */
    static constexpr int c_bytes = 2 * BOX_BYTES;    /* per consumer: two 64 x 64 boxes in turn */
    static constexpr int smem_bytes = stages * stage_bytes + 2 * c_bytes + 1024 /* alignment */ + 2 * stages * 8;
};

struct fused_args {
    int M, N, K;
    float *partials;   /* scores: written [N tiles][M]; values: read, partial_count of them */
    int partial_count; /* values: the scores' column tiles */
    float *row_norm;   /* values: r per row, written */
    float tau, eps;
};

/* GELU(z) = z Phi(z) with Abramowitz and Stegun's 7.1.28, erfc(x) = 1 / (1 + a1 x + ... + a6 x^6)^16
 * for x = |z| / sqrt 2 (the coefficients below include the 1 / sqrt 2): six FMAs, four squarings
 * and a reciprocal, branch-free, where erff costs about twice the instructions and takes one of
 * two branches per element. Against the exact erf GELU in fp32: absolute error below 6e-7 over
 * all z, relative below 2.7e-4 wherever |GELU(z)| > 1e-3 (a fifteenth of the bf16 rounding that
 * follows). Measured by tests/test_kernels_cuda.c through the whole Pattention. */
__device__ __forceinline__ float gelu_fast(float z) {
    float x = fabsf(z);
    float p = fmaf(x, 5.3829750000e-06f, 4.8890635643e-05f);
    p = fmaf(x, p, 3.8003575000e-05f);
    p = fmaf(x, p, 3.2776263241e-03f);
    p = fmaf(x, p, 2.1141006150e-02f);
    p = fmaf(x, p, 4.9867346967e-02f);
    p = fmaf(x, p, 1.0f);
    p *= p;
    p *= p;
    p *= p;
    p *= p;
    float half_tail = 0.5f * z * __fdividef(1.0f, p); /* z Phi(-|z|) */
    return z >= 0.0f ? z - half_tail : half_tail;
}

/* GELU(scale a) in place over this warp group's 64 x 64 of A (64 rows of 128 bytes, 16-byte
 * chunks permuted within each row by the swizzle, which an element-wise map can ignore). Thread
 * t takes half of row t / 2, starting at a chunk that rotates with the row so that the eight
 * threads of a quarter warp hit eight different bank groups. */
template <int GELU> __device__ __forceinline__ void normalise_rows(uint8_t *a, int t, float scale) {
    int row = t / 2;
    uint8_t *line = a + row * 128;
#pragma unroll
    for (int c = 0; c < 4; c++) {
        uint4 *chunk = reinterpret_cast<uint4 *>(line + (((t % 2) * 4 + c + row) & 7) * 16);
        float x[8];
        bf16x8_unpack(*chunk, x);
#pragma unroll
        for (int i = 0; i < 8; i++) x[i] = GELU ? gelu_fast(x[i] * scale) : gelu_erf(x[i] * scale);
        *chunk = bf16x8_pack(x);
    }
}

/* A consumer is done with a stage: tell both CTAs of the cluster, which both write it. */
__device__ __forceinline__ void release(uint64_t *empty_stage) {
    for (int cta = 0; cta < CLUSTER; cta++) {
        if (cta == (int)cluster_rank()) barrier_arrive(empty_stage);
        else barrier_arrive_in(empty_stage, cta);
    }
}

template <int MODE, int BN> __device__ __forceinline__ void load_b(uint8_t *b, const CUtensorMap *map_b, int n0, int k0,
                                                                   int rank, uint64_t *full) {
    if (MODE == MODE_SCORES) /* K-major: BN rows of 64 along K, this CTA's half of them */
        tma_load_2d_multicast(b + rank * (BN / CLUSTER) * BK * 2, map_b, k0, n0 + rank * (BN / CLUSTER), full, 3);
    else /* MN-major: BN / 64 boxes of 64 along N by 64 along K, this CTA's half of them */
        for (int j = 0; j < BN / 64 / CLUSTER; j++) {
            int box = rank * (BN / 64 / CLUSTER) + j;
            tma_load_2d_multicast(b + box * BOX_BYTES, map_b, n0 + 64 * box, k0, full, 3);
        }
}

template <int MODE, int BN, int GELU>
__device__ __forceinline__ void consume(uint8_t *smem, uint8_t *c_tile, uint64_t *full, uint64_t *empty,
                                        const CUtensorMap *map_c, const fused_args &args, int consumer, int rank,
                                        int groups, int n_tiles, int k_tiles) {
    typedef tile_plan<BN> plan;
    registers_increase<240>();
    int t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
    bool leader = t == 0;
    float d[BN / 2];
    int it = 0;
    for (int g = blockIdx.x / CLUSTER; g < groups; g += gridDim.x / CLUSTER) {
        int m0 = ((g / n_tiles) * CLUSTER + rank) * BM, n_tile = g % n_tiles, n0 = n_tile * BN;
        float scale = 0.0f; /* tau / r of row t / 2 of this consumer's 64 (0 past the last row: A is 0 there) */
        if (MODE == MODE_VALUES) {
            int row = m0 + consumer * 64 + t / 2;
            if (row < args.M) {
                float sum = 0.0f;
                for (int p = 0; p < args.partial_count; p++) sum += args.partials[(size_t)p * args.M + row];
                float r = sqrtf(sum + args.eps);
                scale = args.tau / r;
                if (n_tile == 0 && t % 2 == 0) args.row_norm[row] = r;
            }
        }
        for (int kt = 0; kt < k_tiles; kt++, it++) {
            int s = it % plan::stages;
            barrier_wait(&full[s], (it / plan::stages) & 1);
            uint8_t *a = smem + s * plan::stage_bytes + consumer * (64 * BK * 2);
            const uint8_t *b = smem + s * plan::stage_bytes + plan::a_bytes;
            if (MODE == MODE_VALUES && GELU != 2) {
                /* Runs while the previous stage's products are still in flight. */
                normalise_rows<GELU>(a, t, scale);
                fence_proxy_async();
                named_barrier_sync(1 + consumer, 128);
            }
            wgmma_fence();
#pragma unroll
            for (int k = 0; k < BK / 16; k++) {
                uint64_t desc_a = smem_descriptor_k_major(a + 32 * k);
                int accumulate = kt > 0 || k > 0;
                if (MODE == MODE_SCORES) {
                    wgmma_m64n256k16<0>(d, desc_a, smem_descriptor_k_major(b + 32 * k), accumulate);
                } else {
                    /* MN-major B: 16 k are two 8-k groups, 2048 bytes into each 64-wide block */
                    wgmma_m64n256k16<1>(d, desc_a, smem_descriptor_mn_major(b + 2048 * k, BOX_BYTES), accumulate);
                    if constexpr (BN == 384)
                        wgmma_m64n128k16<1>(d + 128, desc_a,
                                            smem_descriptor_mn_major(b + 4 * BOX_BYTES + 2048 * k, BOX_BYTES),
                                            accumulate);
                }
            }
            wgmma_commit();
            /* One group in flight: the previous k tile's products are done, so its stage is free. */
            wgmma_wait<1>();
            fence_accumulators<BN / 2>(d);
            if (kt > 0 && leader) release(&empty[(it - 1) % plan::stages]);
        }
        wgmma_wait<0>();
        fence_accumulators<BN / 2>(d);
        if (leader) release(&empty[(it - 1) % plan::stages]);

        /* Epilogue: 64 x BN leaves as 64 x 64 boxes through two buffers in turn, each refilled
         * once the TMA store before the last has read it. Thread (warp w, lane l) holds rows
         * 16 w + l / 4 and that + 8 (hopper.cuh); in a box with 128-byte swizzle, 16-byte chunk j
         * of row r sits at chunk j ^ (r % 8). */
        int r = warp * 16 + lane / 4;
        float sum_top = 0.0f, sum_bottom = 0.0f;
#pragma unroll
        for (int box = 0; box < BN / 64; box++) {
            uint8_t *box_base = c_tile + (box % 2) * BOX_BYTES;
            if (leader) tma_store_wait_read<1>();
            named_barrier_sync(1 + consumer, 128);
#pragma unroll
            for (int chunk = 0; chunk < 8; chunk++) {
                int i = box * 8 + chunk, within = 4 * (lane % 4);
                __nv_bfloat162 top = __floats2bfloat162_rn(d[4 * i], d[4 * i + 1]);
                __nv_bfloat162 bottom = __floats2bfloat162_rn(d[4 * i + 2], d[4 * i + 3]);
                *reinterpret_cast<__nv_bfloat162 *>(box_base + r * 128 + ((chunk ^ (r % 8)) * 16) + within) = top;
                *reinterpret_cast<__nv_bfloat162 *>(box_base + (r + 8) * 128 + ((chunk ^ ((r + 8) % 8)) * 16) +
                                                    within) = bottom;
                if (MODE == MODE_SCORES) { /* of the values as stored, as the norm pass sums them */
                    float2 u = __bfloat1622float2(top), v = __bfloat1622float2(bottom);
                    sum_top += u.x * u.x + u.y * u.y;
                    sum_bottom += v.x * v.x + v.y * v.y;
                }
            }
            fence_proxy_async();
            named_barrier_sync(1 + consumer, 128);
            if (leader) {
                tma_store_2d(map_c, box_base, n0 + 64 * box, m0 + 64 * consumer);
                tma_store_commit();
            }
        }
        if (MODE == MODE_SCORES) {
            for (int o = 1; o < 4; o <<= 1) {
                sum_top += __shfl_xor_sync(0xffffffffu, sum_top, o);
                sum_bottom += __shfl_xor_sync(0xffffffffu, sum_bottom, o);
            }
            int row = m0 + consumer * 64 + r;
            float *partial = args.partials + (size_t)n_tile * args.M;
            if (lane % 4 == 0 && row < args.M) partial[row] = sum_top;
            if (lane % 4 == 0 && row + 8 < args.M) partial[row + 8] = sum_bottom;
        }
    }
    if (leader) tma_store_wait_all();
}

template <int MODE, int BN, int GELU>
__global__ __launch_bounds__(THREADS, 1) void pattention_gemm_kernel(const __grid_constant__ CUtensorMap map_a,
                                                                     const __grid_constant__ CUtensorMap map_b,
                                                                     const __grid_constant__ CUtensorMap map_c,
                                                                     const fused_args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    typedef tile_plan<BN> plan;
    extern __shared__ uint8_t smem_raw[];
    uint8_t *smem = (uint8_t *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    uint8_t *c_tiles = smem + plan::stages * plan::stage_bytes;
    uint64_t *full = (uint64_t *)(c_tiles + 2 * plan::c_bytes), *empty = full + plan::stages;
    int consumer = threadIdx.x / 128, rank = (int)cluster_rank(); /* 2: the producer */
    int n_tiles = (args.N + BN - 1) / BN, k_tiles = (args.K + BK - 1) / BK;
    int m_tiles = (args.M + BM - 1) / BM, groups = (m_tiles + CLUSTER - 1) / CLUSTER * n_tiles;
    if (threadIdx.x == 0) {
        for (int s = 0; s < plan::stages; s++) {
            barrier_init(&full[s], 1);
            barrier_init(&empty[s], 2 * CLUSTER); /* both consumers of both CTAs, which all read the stage */
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    cluster_sync();

    if (consumer == 2) { /* producer: runs ahead across tiles, as far as the ring allows */
        registers_decrease<24>();
        if (threadIdx.x == 256) {
            int it = 0;
            for (int g = blockIdx.x / CLUSTER; g < groups; g += gridDim.x / CLUSTER) {
                int m0 = ((g / n_tiles) * CLUSTER + rank) * BM, n0 = (g % n_tiles) * BN;
                for (int kt = 0; kt < k_tiles; kt++, it++) {
                    int s = it % plan::stages;
                    if (it >= plan::stages) barrier_wait(&empty[s], ((it / plan::stages) & 1) ^ 1);
                    uint8_t *a = smem + s * plan::stage_bytes;
                    barrier_expect_bytes(&full[s], plan::stage_bytes);
                    tma_load_2d(a, &map_a, kt * BK, m0, &full[s]);
                    load_b<MODE, BN>(a + plan::a_bytes, &map_b, n0, kt * BK, rank, &full[s]);
                }
            }
        }
    } else {
        consume<MODE, BN, GELU>(smem, c_tiles + consumer * plan::c_bytes, full, empty, &map_c, args, consumer, rank,
                                groups, n_tiles, k_tiles);
    }
    /* No CTA may leave while its peer can still multicast into it or arrive on its barriers. The
     * cluster barrier is .aligned: the producer warp reconverges first. */
    __syncwarp();
    cluster_sync();
#endif
}

/* ---- host ---- */
typedef CUresult (*encode_tiled_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                                    const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                                    CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

struct fused_state {
    bool probed, available; /* compute capability 9.0, a build with sm_90a, the driver's encoder */
    bool enabled;           /* tf_cuda_pattention_use_fused; off: measured slower than cuBLASLt + the norm pass */
    int variant;            /* tf_cuda_pattention_fused_variant */
    bool last_fused;
    encode_tiled_fn encode;
    float *partials;
    size_t partials_bytes;
};
fused_state fused;

void probe() {
    fused.probed = true;
    const char *variant = getenv("TF_PATTENTION_FUSED"); /* measurements only: off, 0, 1, 2 */
    if (variant) {
        fused.enabled = strcmp(variant, "off") != 0;
        fused.variant = atoi(variant);
    }
#if defined(TF_CUDA_HOPPER_KERNELS)
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cuda_ctx.device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, cuda_ctx.device);
    cudaDriverEntryPointQueryResult found;
    void *encode = NULL;
    if (major == 9 && minor == 0 &&
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &encode, 12000, cudaEnableDefault, &found) ==
            cudaSuccess &&
        found == cudaDriverEntryPointSuccess && encode) {
        fused.encode = (encode_tiled_fn)encode;
        fused.available = true;
    }
#endif
}

/* A row-major [rows, cols] bf16 matrix read or written in boxes of box_cols x box_rows. */
bool tensor_map(CUtensorMap *map, const void *base, int rows, int cols, int box_cols, int box_rows,
                const char *what) {
    cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows}, strides[1] = {(cuuint64_t)cols * 2};
    cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows}, element_strides[2] = {1, 1};
    CUresult result = fused.encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)base, dims, strides, box,
                                   element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (result == CUDA_SUCCESS) return true;
    char code[32];
    snprintf(code, sizeof code, "CUresult %d", (int)result);
    cuda_record_failure(__FILE__, __LINE__, "cuTensorMapEncodeTiled", code, "Pattention %s [%d, %d], box %d x %d", what,
                        rows, cols, box_cols, box_rows);
    return false;
}

template <int MODE, int BN, int GELU>
void launch(const CUtensorMap &map_a, const CUtensorMap &map_b, const CUtensorMap &map_c, const fused_args &args) {
    typedef tile_plan<BN> plan;
    static int clusters; /* that fit at once, found on the first launch */
    auto kernel = pattention_gemm_kernel<MODE, BN, GELU>;
    cudaLaunchConfig_t config = {};
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = CLUSTER;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.blockDim = dim3(THREADS);
    config.dynamicSmemBytes = plan::smem_bytes;
    config.stream = cuda_ctx.stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
    if (!clusters) {
        config.gridDim = dim3(cuda_ctx.sm_count / CLUSTER * CLUSTER);
        if (!CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan::smem_bytes),
                        "Pattention GEMM, %d bytes of shared memory", plan::smem_bytes) ||
            !CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config), "Pattention GEMM clusters"))
            return;
        if (clusters < 1) clusters = 1;
    }
    int m_tiles = (args.M + BM - 1) / BM, groups = (m_tiles + CLUSTER - 1) / CLUSTER * ((args.N + BN - 1) / BN);
    config.gridDim = dim3((groups < clusters ? groups : clusters) * CLUSTER);
    CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, map_a, map_b, map_c, args),
               "Pattention %s GEMM M %d N %d K %d", MODE == MODE_SCORES ? "scores" : "values", args.M, args.N,
               args.K);
    LAUNCH_CHECK("pattention_gemm_kernel", "M %d N %d K %d", args.M, args.N, args.K);
}

bool fused_fits(const void *out, const void *a, const void *x, const void *keys, const void *values, int n,
                int dim_in, int dim_out) {
    if (!fused.probed) probe();
    return fused.available && fused.enabled && n % 8 == 0 && dim_in % 8 == 0 && dim_out % 8 == 0 &&
           is_aligned16(out) && is_aligned16(a) && is_aligned16(x) && is_aligned16(keys) && is_aligned16(values);
}

bool ensure_partials(size_t bytes) {
    if (bytes <= fused.partials_bytes) return true;
    if (fused.partials) cudaFree(fused.partials);
    fused.partials = NULL;
    fused.partials_bytes = 0;
    if (!CUDA_CHECK(cudaMalloc(&fused.partials, bytes), "Pattention row partial sums, %zu bytes", bytes)) return false;
    fused.partials_bytes = bytes;
    return true;
}

void run_fused(void *out, void *a, void *row_norm, const void *x, const void *keys, const void *values, int rows,
               int n, int dim_in, int dim_out, float tau, float eps) {
    int partial_count = (n + SCORES_BN - 1) / SCORES_BN;
    if (!ensure_partials((size_t)partial_count * rows * sizeof(float))) return;
    bool wide = dim_out % 384 == 0;
    CUtensorMap map_x, map_keys, map_a_out, map_a_in, map_values, map_out;
    if (!tensor_map(&map_x, x, rows, dim_in, 64, BM, "input") ||
        !tensor_map(&map_keys, keys, n, dim_in, 64, SCORES_BN / CLUSTER, "key tokens") ||
        !tensor_map(&map_a_out, a, rows, n, 64, 64, "scores (written)") ||
        !tensor_map(&map_a_in, a, rows, n, 64, BM, "scores (read)") ||
        !tensor_map(&map_values, values, n, dim_out, 64, 64, "value tokens") ||
        !tensor_map(&map_out, out, rows, dim_out, 64, 64, "output"))
        return;
    fused_args args = {rows, n, dim_in, fused.partials, partial_count, (float *)row_norm, tau, eps};
    launch<MODE_SCORES, SCORES_BN, 0>(map_x, map_keys, map_a_out, args);
    args.N = dim_out;
    args.K = n;
    if (fused.variant == 2) return; /* measurement: the scores GEMM alone */
    if (fused.variant == 3) { /* measurement: the values GEMM without the normalisation */
        launch<MODE_VALUES, 384, 2>(map_a_in, map_values, map_out, args);
        return;
    }
    if (fused.variant == 1) {
        if (wide) launch<MODE_VALUES, 384, 1>(map_a_in, map_values, map_out, args);
        else launch<MODE_VALUES, 256, 1>(map_a_in, map_values, map_out, args);
    } else {
        if (wide) launch<MODE_VALUES, 384, 0>(map_a_in, map_values, map_out, args);
        else launch<MODE_VALUES, 256, 0>(map_a_in, map_values, map_out, args);
    }
}

} // namespace

extern "C" bool tf_cuda_pattention_use_fused(bool use) {
    if (!fused.probed) probe();
    fused.enabled = use;
    return fused.available && use;
}

extern "C" void tf_cuda_pattention_fused_variant(int variant) {
    fused.variant = variant;
}

extern "C" bool tf_cuda_pattention_last_fused(void) {
    return fused.last_fused;
}

void cuda_pattention_forward(void *out, void *a, void *row_norm, void *s, const void *x, const void *keys,
                             const void *values, int rows, int n, int dim_in, int dim_out, float tau, float eps) {
    fused.last_fused = fused_fits(out, a, x, keys, values, n, dim_in, dim_out);
    if (fused.last_fused) {
        run_fused(out, a, row_norm, x, keys, values, rows, n, dim_in, dim_out, tau, eps);
        return;
    }
    tf_matmul_desc scores = {}, product = {};
    scores.m = rows, scores.n = n, scores.k = dim_in, scores.transpose_b = true;
    product.m = rows, product.n = dim_out, product.k = n;
    cuda_matmul(a, x, keys, &scores);
    cuda_pattention_norm_forward(s, row_norm, a, rows, n, tau, eps);
    cuda_matmul(out, s, values, &product);
}
