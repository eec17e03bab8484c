/* The Pattention normalisation (DESIGN.md section 2), per row of A = X K^T:
 *   r = sqrt(sum_j A_j^2 + eps),  Z = tau A / r,  S = GELU(Z)  (exact erf GELU)
 * (eps times eps_scale[row] where one is given: kernels.h). Forward keeps r (fp32, per row) for backward; S is bf16.
 *
 * Backward. Z_i = tau A_i / r with r^2 = sum_k A_k^2 + eps, so dr/dA_j = A_j / r and
 *   dZ_i/dA_j = tau (delta_ij / r - A_i A_j / r^3).
 * With dZ = dS GELU'(Z), GELU'(z) = Phi(z) + z phi(z):
 *   dA_j = sum_i dZ_i dZ_i/dA_j = tau / r (dZ_j - A_j (A . dZ) / r^2).
 * One pass reads the row (A and dS) into registers and reduces A . dZ across the warp; the
 * second writes dA from the same registers, so dA may be the dS buffer itself. Backward also
 * writes S = GELU(tau A / r) again, from the kept r: the same float operations as forward, so
 * the same bits, for the value-token gradient, at the cost of one write instead of a separate
 * pass that reads A again.
 *
 * The row is held in registers as 16-byte chunks of 8 bf16, spread over one to eight warps
 * (row kernels, cuda_common.cuh). Rows whose width is not a multiple of 8, or wider than 8192,
 * or unaligned buffers, take a plain kernel (one warp per row) that reads the row twice. */
#include "kernels/cuda/cuda_common.cuh"

/* The eps of a row: eps, times eps_scale[row] where a scale is given (kernels.h). */
__device__ __forceinline__ float row_eps(float eps, const float *eps_scale, size_t row) {
    return eps_scale ? eps * eps_scale[row] : eps;
}

template <int CHUNKS, int WARPS>
__global__ __launch_bounds__(ROW_BLOCK_THREADS) void pattention_norm_forward_kernel(bf16 *s, float *row_norm,
                                                                                      const bf16 *a, int rows, int n,
                                                                                      float tau, float eps,
                                                                                      const float *eps_scale) {
    __shared__ float scratch[8];
    int row = row_of_thread<WARPS>(), t = row_thread_index<WARPS>();
    bool active = row < rows;
    int chunks = n >> 3;
    uint4 raw[CHUNKS];
    float sum = row_sum<WARPS>(load_row_chunks<CHUNKS, WARPS>(raw, a + (size_t)row * n, n, t, active), scratch);
    if (!active) return;
    float r = sqrtf(sum + row_eps(eps, eps_scale, row)), scale = tau / r;
    if (t == 0) row_norm[row] = r;
    uint4 *s_row = reinterpret_cast<uint4 *>(s + (size_t)row * n);
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        int index = c * 32 * WARPS + t;
        if (index < chunks) {
            float x[8];
            bf16x8_unpack(raw[c], x);
#pragma unroll
            for (int i = 0; i < 8; i++) x[i] = gelu_erf(x[i] * scale);
            s_row[index] = bf16x8_pack(x);
        }
    }
}

/* Three blocks an SM with up to 3 chunks a thread, two with 4 (80 and 128 registers): left to
 * itself the compiler takes more registers for fewer blocks. */
template <int CHUNKS, int WARPS>
__global__ __launch_bounds__(ROW_BLOCK_THREADS, CHUNKS <= 3 ? 3 : 2) void pattention_norm_backward_kernel(
    bf16 *da, bf16 *s, const bf16 *ds, const bf16 *a, const float *row_norm, int rows, int n, float tau) {
    __shared__ float scratch[8];
    int row = row_of_thread<WARPS>(), t = row_thread_index<WARPS>();
    bool active = row < rows;
    int chunks = n >> 3;
    const uint4 *a_row = reinterpret_cast<const uint4 *>(a + (size_t)row * n);
    const uint4 *ds_row = reinterpret_cast<const uint4 *>(ds + (size_t)row * n);
    uint4 raw_a[CHUNKS], raw_ds[CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        int index = c * 32 * WARPS + t;
        bool load = active && index < chunks;
        raw_a[c] = load ? a_row[index] : make_uint4(0, 0, 0, 0);
        raw_ds[c] = load ? ds_row[index] : make_uint4(0, 0, 0, 0);
    }
    float r = active ? row_norm[row] : 1.0f, scale = tau / r;
    float dz[CHUNKS * 8];
    uint4 raw_s[CHUNKS];
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        float x[8], g[8], recomputed[8];
        bf16x8_unpack(raw_a[c], x);
        bf16x8_unpack(raw_ds[c], g);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float z = x[i] * scale;
            tf_normal normal = tf_standard_normal(z);
            dz[c * 8 + i] = g[i] * gelu_erf_derivative_at(z, normal);
            recomputed[i] = gelu_erf_at(z, normal);
            dot = fmaf(x[i], dz[c * 8 + i], dot);
        }
        raw_s[c] = bf16x8_pack(recomputed);
    }
    /* Every read of the row happened above, before any write below: da may be ds. */
    dot = row_sum<WARPS>(dot, scratch);
    if (!active) return;
    float coefficient = dot / (r * r);
    uint4 *da_row = reinterpret_cast<uint4 *>(da + (size_t)row * n);
    uint4 *s_row = reinterpret_cast<uint4 *>(s + (size_t)row * n);
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        int index = c * 32 * WARPS + t;
        if (index < chunks) {
            float x[8], out[8];
            bf16x8_unpack(raw_a[c], x);
#pragma unroll
            for (int i = 0; i < 8; i++) out[i] = scale * (dz[c * 8 + i] - x[i] * coefficient);
            da_row[index] = bf16x8_pack(out);
            s_row[index] = raw_s[c];
        }
    }
}

/* r = sqrt(sum_j A_j^2 + eps) of one row (eps: the row's, from row_eps), summed by the 32 lanes
 * of a warp (the plain kernels). */
__device__ __forceinline__ float warp_row_norm(const bf16 *a_row, int n, int lane, float eps) {
    float sum = 0.0f;
    for (int j = lane; j < n; j += 32) {
        float x = bf16_load(a_row + j);
        sum = fmaf(x, x, sum);
    }
    return sqrtf(warp_sum(sum) + eps);
}

/* r and S of one row, by the 32 lanes of a warp, the row read from memory in each pass. */
__device__ __forceinline__ void warp_normalize_row(bf16 *s, float *row_norm, const bf16 *a, size_t row, int n,
                                                   int lane, float tau, float eps_row) {
    const bf16 *a_row = a + row * n;
    float r = warp_row_norm(a_row, n, lane, eps_row), scale = tau / r;
    if (lane == 0) row_norm[row] = r;
    for (int j = lane; j < n; j += 32) bf16_store(s + row * n + j, gelu_erf(bf16_load(a_row + j) * scale));
}

/* Any width and alignment: one warp per row. */
__global__ __launch_bounds__(ROW_BLOCK_THREADS) void pattention_norm_forward_plain_kernel(bf16 *s, float *row_norm,
                                                                                            const bf16 *a, int rows,
                                                                                            int n, float tau,
                                                                                            float eps,
                                                                                            const float *eps_scale) {
    int row = blockIdx.x * (ROW_BLOCK_THREADS / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    warp_normalize_row(s, row_norm, a, (size_t)row, n, lane, tau, row_eps(eps, eps_scale, row));
}

__global__ __launch_bounds__(ROW_BLOCK_THREADS) void pattention_norm_backward_plain_kernel(
    bf16 *da, bf16 *s, const bf16 *ds, const bf16 *a, const float *row_norm, int rows, int n, float tau) {
    int row = blockIdx.x * (ROW_BLOCK_THREADS / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const bf16 *a_row = a + (size_t)row * n, *ds_row = ds + (size_t)row * n;
    float r = row_norm[row], scale = tau / r;
    float dot = 0.0f;
    for (int j = lane; j < n; j += 32) {
        float x = bf16_load(a_row + j);
        dot = fmaf(x, bf16_load(ds_row + j) * gelu_erf_derivative(x * scale), dot);
    }
    /* The shuffle also orders every lane's reads of this row before any lane's writes, which
     * matters when da is ds. */
    dot = warp_sum(dot);
    float coefficient = dot / (r * r);
    for (int j = lane; j < n; j += 32) {
        float x = bf16_load(a_row + j), z = x * scale;
        tf_normal normal = tf_standard_normal(z);
        float dz = bf16_load(ds_row + j) * gelu_erf_derivative_at(z, normal);
        bf16_store(da + (size_t)row * n + j, scale * (dz - x * coefficient));
        bf16_store(s + (size_t)row * n + j, gelu_erf_at(z, normal));
    }
}

/* Forward fused with the average over an image's patch rows (kernels.h): one block per image, its
 * 8 / WARPS row groups taking the rows 1, 2, ... in turn, each thread summing S over its columns
 * in registers. Up to 3 chunks a thread fit 64 registers: four blocks an SM, so that B/16's 512
 * images are one wave (4 chunks would spill in 64). The pass is bound by the GELU's arithmetic,
 * not the memory: on the H100, 512 x 197 x 3072 takes 0.31 ms (0.45 with erff's GELU), the same
 * pass without the GELU 0.21 ms (the memory's rate; scripts/experiments/norm_experiments.cu), and
 * neither loads issued a row ahead nor more blocks an image made it faster. The groups' sums are
 * added in shared memory in a fixed order, so the result is the same bits run to run. */
template <int CHUNKS, int WARPS>
__global__ __launch_bounds__(ROW_BLOCK_THREADS, CHUNKS <= 3 ? 4 : 3) void pattention_norm_pool_kernel(
    bf16 *pooled_s, const bf16 *a, int tokens, int n, float tau, float eps, const float *eps_scale) {
    constexpr int GROUPS = (ROW_BLOCK_THREADS / 32) / WARPS, VALUES = CHUNKS * 8;
    __shared__ float scratch[8];
    __shared__ float group_sums[GROUPS > 1 ? VALUES * ROW_BLOCK_THREADS : 1];
    int group = (threadIdx.x >> 5) / WARPS, t = row_thread_index<WARPS>(), chunks = n >> 3;
    size_t first_row = (size_t)blockIdx.x * tokens;
    float sums[VALUES];
#pragma unroll
    for (int i = 0; i < VALUES; i++) sums[i] = 0.0f;
    /* Every group runs the same number of rounds: row_sum holds barriers. */
    for (int token = 1 + group; token - group < tokens; token += GROUPS) {
        uint4 raw[CHUNKS];
        float sum = load_row_chunks<CHUNKS, WARPS>(raw, a + (first_row + token) * n, n, t, token < tokens);
        sum = row_sum<WARPS>(sum, scratch);
        if (token >= tokens) continue;
        size_t row = first_row + token;
        float r = sqrtf(sum + row_eps(eps, eps_scale, row)), scale = tau / r;
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            float x[8];
            bf16x8_unpack(raw[c], x);
#pragma unroll
            for (int i = 0; i < 8; i++) sums[c * 8 + i] += gelu_erf(x[i] * scale);
        }
    }
    if (GROUPS > 1) {
        /* Value i of thread x at i * ROW_BLOCK_THREADS + x: a warp's accesses touch 32 banks. */
#pragma unroll
        for (int i = 0; i < VALUES; i++) group_sums[i * ROW_BLOCK_THREADS + threadIdx.x] = sums[i];
        __syncthreads();
        if (group != 0) return;
        for (int g = 1; g < GROUPS; g++)
#pragma unroll
            for (int i = 0; i < VALUES; i++) sums[i] += group_sums[i * ROW_BLOCK_THREADS + g * 32 * WARPS + t];
    }
    float inverse_count = 1.0f / (float)(tokens - 1);
    uint4 *out = reinterpret_cast<uint4 *>(pooled_s + (size_t)blockIdx.x * n);
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        int index = c * 32 * WARPS + t;
        if (index < chunks) {
            float x[8];
#pragma unroll
            for (int i = 0; i < 8; i++) x[i] = sums[c * 8 + i] * inverse_count;
            out[index] = bf16x8_pack(x);
        }
    }
}

/* Any width and alignment: the row norms first (one warp per row), then a thread per column of
 * an image summing down its patch rows (neighbouring threads read neighbouring columns). */
__global__ __launch_bounds__(ROW_BLOCK_THREADS) void pattention_row_norm_plain_kernel(float *row_norm,
                                                                                        const bf16 *a, int rows,
                                                                                        int n, float eps,
                                                                                        const float *eps_scale) {
    int row = blockIdx.x * (ROW_BLOCK_THREADS / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    float r = warp_row_norm(a + (size_t)row * n, n, lane, row_eps(eps, eps_scale, row));
    if (lane == 0) row_norm[row] = r;
}

__global__ __launch_bounds__(ROW_BLOCK_THREADS) void pattention_pool_plain_kernel(bf16 *pooled_s, const bf16 *a,
                                                                                    const float *row_norm,
                                                                                    int tokens, int n, float tau) {
    int image = blockIdx.y, j = blockIdx.x * ROW_BLOCK_THREADS + threadIdx.x;
    if (j >= n) return;
    size_t first_row = (size_t)image * tokens;
    float sum = 0.0f;
    for (int token = 1; token < tokens; token++) {
        size_t row = first_row + token;
        sum += gelu_erf(bf16_load(a + row * n + j) * (tau / row_norm[row]));
    }
    bf16_store(pooled_s + (size_t)image * n + j, sum / (float)(tokens - 1));
}

/* pattention_norm_recheck's Pattentions, by value: a kernel argument. */
struct norm_recheck_rows {
    bf16 *s[TF_NORM_RECHECK_MAX];
    float *row_norm[TF_NORM_RECHECK_MAX];
    const bf16 *a[TF_NORM_RECHECK_MAX];
    float tau[TF_NORM_RECHECK_MAX];
};

/* One thread per row checks the bound (kernels.h) from the row norms; the rows of a warp that fail
 * it (none in B/16 at initialisation) are then done again one at a time by the whole warp, which
 * reads x. One thread a row, not a warp: B/16's 100864 rows in one wave of blocks (a warp a row
 * took 16 us a call, 12 waves of warps that only read three numbers). The loops over the
 * Pattentions are unrolled to TF_NORM_RECHECK_MAX so that norms stays in the kernel's parameter
 * space (indexed at run time, it is copied to each thread's stack: 104 bytes). */
__global__ __launch_bounds__(ROW_BLOCK_THREADS) void pattention_norm_recheck_kernel(norm_recheck_rows norms,
                                                                                      int count, const bf16 *x,
                                                                                      int rows, int n, int dim,
                                                                                      float eps, float eps_ln,
                                                                                      float share) {
    int lane = threadIdx.x & 31, first = blockIdx.x * ROW_BLOCK_THREADS + (threadIdx.x & ~31);
    int row = first + lane;
    bool within = true;
    if (row < rows) {
        float squares[TF_NORM_RECHECK_MAX], total = 0.0f;
#pragma unroll
        for (int p = 0; p < TF_NORM_RECHECK_MAX; p++) {
            float r = p < count ? norms.row_norm[p][row] : 0.0f;
            squares[p] = r * r;
            total += squares[p];
        }
#pragma unroll
        for (int p = 0; p < TF_NORM_RECHECK_MAX; p++) within = within && (p >= count || squares[p] >= share * total);
    }
    for (unsigned redo = __ballot_sync(0xffffffffu, !within); redo; redo &= redo - 1) {
        size_t failed = (size_t)first + (size_t)(__ffs(redo) - 1);
        float variance = warp_row_variance(x + failed * dim, dim, lane, eps_ln);
#pragma unroll
        for (int p = 0; p < TF_NORM_RECHECK_MAX; p++)
            if (p < count)
                warp_normalize_row(norms.s[p], norms.row_norm[p], norms.a[p], failed, n, lane, norms.tau[p],
                                   eps * variance);
    }
}

#define PATTENTION_SHAPE "rows %d n %d tau %g", rows, n, (double)tau

extern "C" void cuda_pattention_norm_forward(void *s, void *row_norm, const void *a, int rows, int n, float tau,
                                             float eps, const void *eps_scale) {
    if (rows <= 0 || n <= 0) return;
    cudaStream_t stream = cuda_ctx.stream;
    bf16 *s_ = (bf16 *)s;
    float *r_ = (float *)row_norm;
    const bf16 *a_ = (const bf16 *)a;
    const float *e_ = (const float *)eps_scale;
    row_layout layout = plan_row(n, is_aligned16(s) && is_aligned16(a));
    unsigned grid = row_grid(rows, layout);
#define FORWARD_CASE(C, W)                                                                                         \
    pattention_norm_forward_kernel<C, W><<<grid, ROW_BLOCK_THREADS, 0, stream>>>(s_, r_, a_, rows, n, tau, eps, e_);
#define FORWARD_PLAIN                                                                                              \
    pattention_norm_forward_plain_kernel<<<grid, ROW_BLOCK_THREADS, 0, stream>>>(s_, r_, a_, rows, n, tau, eps,   \
                                                                                  e_);
    ROW_LAYOUT_SWITCH(layout, FORWARD_CASE, FORWARD_PLAIN)
#undef FORWARD_CASE
#undef FORWARD_PLAIN
    LAUNCH_CHECK("pattention_norm_forward_kernel", PATTENTION_SHAPE);
}

extern "C" void cuda_pattention_norm_backward(void *da, void *s, const void *ds, const void *a,
                                              const void *row_norm, int rows, int n, float tau) {
    if (rows <= 0 || n <= 0) return;
    cudaStream_t stream = cuda_ctx.stream;
    bf16 *da_ = (bf16 *)da, *s_ = (bf16 *)s;
    const bf16 *ds_ = (const bf16 *)ds, *a_ = (const bf16 *)a;
    const float *r_ = (const float *)row_norm;
    row_layout layout = plan_row(n, is_aligned16(da) && is_aligned16(s) && is_aligned16(ds) && is_aligned16(a));
    unsigned grid = row_grid(rows, layout);
#define BACKWARD_CASE(C, W)                                                                                        \
    pattention_norm_backward_kernel<C, W>                                                                          \
        <<<grid, ROW_BLOCK_THREADS, 0, stream>>>(da_, s_, ds_, a_, r_, rows, n, tau);
#define BACKWARD_PLAIN                                                                                             \
    pattention_norm_backward_plain_kernel<<<grid, ROW_BLOCK_THREADS, 0, stream>>>(da_, s_, ds_, a_, r_, rows, n, tau);
    ROW_LAYOUT_SWITCH(layout, BACKWARD_CASE, BACKWARD_PLAIN)
#undef BACKWARD_CASE
#undef BACKWARD_PLAIN
    LAUNCH_CHECK("pattention_norm_backward_kernel", PATTENTION_SHAPE);
}

extern "C" void cuda_pattention_norm_pool(void *pooled_s, void *row_norm, const void *a, int batch, int tokens,
                                          int n, float tau, float eps, const void *eps_scale) {
    if (batch <= 0 || tokens <= 1 || n <= 0) return;
    cudaStream_t stream = cuda_ctx.stream;
    int rows = batch * tokens;
    bf16 *p_ = (bf16 *)pooled_s;
    float *r_ = (float *)row_norm;
    const bf16 *a_ = (const bf16 *)a;
    const float *e_ = (const float *)eps_scale;
    row_layout layout = plan_row(n, is_aligned16(pooled_s) && is_aligned16(a));
#define POOL_CASE(C, W)                                                                                            \
    pattention_norm_pool_kernel<C, W><<<batch, ROW_BLOCK_THREADS, 0, stream>>>(p_, a_, tokens, n, tau, eps, e_);
#define POOL_PLAIN                                                                                                 \
    pattention_row_norm_plain_kernel<<<row_grid(rows, layout), ROW_BLOCK_THREADS, 0, stream>>>(r_, a_, rows, n,    \
                                                                                               eps, e_);          \
    pattention_pool_plain_kernel<<<dim3(ceil_div_u((size_t)n, ROW_BLOCK_THREADS), batch), ROW_BLOCK_THREADS, 0,   \
                                   stream>>>(p_, a_, r_, tokens, n, tau);
    ROW_LAYOUT_SWITCH(layout, POOL_CASE, POOL_PLAIN)
#undef POOL_CASE
#undef POOL_PLAIN
    LAUNCH_CHECK("pattention_norm_pool_kernel", "batch %d tokens %d n %d tau %g", batch, tokens, n, (double)tau);
}

extern "C" void cuda_pattention_norm_recheck(const tf_norm_rows *norms, int count, const void *x, int rows, int n,
                                             int dim, float eps, float eps_ln, float share) {
    if (rows <= 0 || n <= 0 || count <= 0) return;
    if (count > TF_NORM_RECHECK_MAX) {
        cuda_record_failure(__FILE__, __LINE__, "pattention_norm_recheck", "unsupported count",
                            "%d Pattentions, at most %d", count, TF_NORM_RECHECK_MAX);
        return;
    }
    norm_recheck_rows rows_of = {};
    for (int p = 0; p < count; p++) {
        rows_of.s[p] = (bf16 *)norms[p].s;
        rows_of.row_norm[p] = (float *)norms[p].row_norm;
        rows_of.a[p] = (const bf16 *)norms[p].a;
        rows_of.tau[p] = norms[p].tau;
    }
    unsigned grid = ceil_div_u((size_t)rows, ROW_BLOCK_THREADS);
    pattention_norm_recheck_kernel<<<grid, ROW_BLOCK_THREADS, 0, cuda_ctx.stream>>>(
        rows_of, count, (const bf16 *)x, rows, n, dim, eps, eps_ln, share);
    LAUNCH_CHECK("pattention_norm_recheck_kernel", "rows %d n %d dim %d count %d", rows, n, dim, count);
}
