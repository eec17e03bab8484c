/* LayerNorm over the last dimension (biased variance), non-parametric inside the blocks and
 * parametric at the head (fc_norm), with the residual add of the block fused into the next
 * LayerNorm:
 *   forward:  xhat = (x - mean) rstd,  rstd = 1 / sqrt(var + eps),  out = xhat (* w + b)
 *   residual: x = residual_in + scale[sample] branch, written back as residual_out (fp32)
 *   backward: with g = dout (* w),
 *             dx += rstd (g - mean(g) - xhat mean(g xhat)),
 *             dw += sum over rows of dout xhat,  db += sum over rows of dout.
 * x and the residual stream are fp32 (kernels.h says why), out and everything of backward bf16;
 * backward reads xhat, not x. Statistics are fp32; the row is read once into registers (row
 * kernels, cuda_common.cuh: chunks of 8 elements), and the mean and variance are two reductions
 * over those registers (no E[x^2] - E[x]^2 cancellation). dw and db are summed in registers over
 * the rows a block visits, then added to the fp32 master gradients with one atomic per column
 * per block. */
#include "kernels/cuda/cuda_common.cuh"

typedef struct {
    bf16 *out, *xhat; /* xhat may be NULL */
    float *rstd;
    const float *x;     /* the input, or residual_in */
    const bf16 *branch;
    const float *sample_scale;
    float *residual_out;
    int rows_per_sample;
    const bf16 *weight, *bias;
    int rows, dim;
    float eps;
} layernorm_forward_args;

template <int CHUNKS, int WARPS, bool RESIDUAL, bool AFFINE>
__global__ __launch_bounds__(ROW_BLOCK_THREADS) void layernorm_forward_kernel(layernorm_forward_args args) {
    __shared__ float scratch_mean[8], scratch_var[8];
    int row = row_of_thread<WARPS>(), t = row_thread_index<WARPS>();
    bool active = row < args.rows;
    int chunks = args.dim >> 3;
    size_t row_offset = (size_t)row * args.dim;
    const float *x_row = args.x + row_offset;
    float x[CHUNKS][8];
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        int index = c * 32 * WARPS + t;
        if (active && index < chunks)
            f32x8_load(x_row, index, x[c]);
        else
#pragma unroll
            for (int i = 0; i < 8; i++) x[c][i] = 0.0f;
    }
    if (RESIDUAL) {
        const uint4 *branch_row = reinterpret_cast<const uint4 *>(args.branch + row_offset);
        float *residual_row = args.residual_out + row_offset;
        float scale = active && args.sample_scale ? args.sample_scale[row / args.rows_per_sample] : 1.0f;
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            int index = c * 32 * WARPS + t;
            if (active && index < chunks) {
                float branch[8];
                bf16x8_unpack(branch_row[index], branch);
#pragma unroll
                for (int i = 0; i < 8; i++) x[c][i] = fmaf(scale, branch[i], x[c][i]);
                f32x8_store(residual_row, index, x[c]);
            }
        }
    }
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++)
#pragma unroll
        for (int i = 0; i < 8; i++) sum += x[c][i];
    float mean = row_sum<WARPS>(sum, scratch_mean) / args.dim;
    float squares = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        int index = c * 32 * WARPS + t;
        if (index < chunks)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float d = x[c][i] - mean;
                squares = fmaf(d, d, squares);
            }
    }
    float rstd = rsqrtf(row_sum<WARPS>(squares, scratch_var) / args.dim + args.eps);
    if (!active) return;
    if (t == 0) args.rstd[row] = rstd;
    uint4 *out_row = reinterpret_cast<uint4 *>(args.out + row_offset);
    uint4 *xhat_row = args.xhat ? reinterpret_cast<uint4 *>(args.xhat + row_offset) : NULL;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        int index = c * 32 * WARPS + t;
        if (index < chunks) {
            float y[8], w[8], b[8];
            if (AFFINE) {
                bf16x8_unpack(reinterpret_cast<const uint4 *>(args.weight)[index], w);
                bf16x8_unpack(reinterpret_cast<const uint4 *>(args.bias)[index], b);
            }
#pragma unroll
            for (int i = 0; i < 8; i++) y[i] = (x[c][i] - mean) * rstd;
            if (xhat_row) xhat_row[index] = bf16x8_pack(y);
            if (AFFINE)
#pragma unroll
                for (int i = 0; i < 8; i++) y[i] = fmaf(y[i], w[i], b[i]);
            out_row[index] = bf16x8_pack(y);
        }
    }
}

/* Any width and alignment: one warp per row, reading the row from memory in each pass. */
__global__ __launch_bounds__(ROW_BLOCK_THREADS) void layernorm_forward_plain_kernel(layernorm_forward_args args) {
    int row = blockIdx.x * (ROW_BLOCK_THREADS / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= args.rows) return;
    size_t row_offset = (size_t)row * args.dim;
    const float *x = args.x + row_offset;
    if (args.branch) {
        float scale = args.sample_scale ? args.sample_scale[row / args.rows_per_sample] : 1.0f;
        for (int j = lane; j < args.dim; j += 32)
            args.residual_out[row_offset + j] = fmaf(scale, bf16_load(args.branch + row_offset + j), x[j]);
        __syncwarp(); /* the sums below read what the lanes stored */
        x = args.residual_out + row_offset;
    }
    float sum = 0.0f;
    for (int j = lane; j < args.dim; j += 32) sum += x[j];
    float mean = warp_sum(sum) / args.dim;
    float squares = 0.0f;
    for (int j = lane; j < args.dim; j += 32) {
        float d = x[j] - mean;
        squares = fmaf(d, d, squares);
    }
    float rstd = rsqrtf(warp_sum(squares) / args.dim + args.eps);
    if (lane == 0) args.rstd[row] = rstd;
    for (int j = lane; j < args.dim; j += 32) {
        float y = (x[j] - mean) * rstd;
        if (args.xhat) bf16_store(args.xhat + row_offset + j, y);
        if (args.weight) y = fmaf(y, bf16_load(args.weight + j), bf16_load(args.bias + j));
        bf16_store(args.out + row_offset + j, y);
    }
}

#define LAYERNORM_SHAPE "rows %d dim %d eps %g residual %d affine %d", args.rows, args.dim, (double)args.eps, \
                        (int)(args.branch != NULL), (int)(args.weight != NULL)

static void launch_layernorm_forward(const layernorm_forward_args &args, bool aligned) {
    cudaStream_t stream = cuda_ctx.stream;
    row_layout layout = plan_row(args.dim, aligned);
    unsigned grid = row_grid(args.rows, layout);
    bool residual = args.branch != NULL, affine = args.weight != NULL;
#define FORWARD_CASE(C, W)                                                                                         \
    if (residual)                                                                                                  \
        layernorm_forward_kernel<C, W, true, false><<<grid, ROW_BLOCK_THREADS, 0, stream>>>(args);                 \
    else if (affine)                                                                                               \
        layernorm_forward_kernel<C, W, false, true><<<grid, ROW_BLOCK_THREADS, 0, stream>>>(args);                 \
    else                                                                                                           \
        layernorm_forward_kernel<C, W, false, false><<<grid, ROW_BLOCK_THREADS, 0, stream>>>(args);
#define FORWARD_PLAIN layernorm_forward_plain_kernel<<<grid, ROW_BLOCK_THREADS, 0, stream>>>(args);
    ROW_LAYOUT_SWITCH(layout, FORWARD_CASE, FORWARD_PLAIN)
#undef FORWARD_CASE
#undef FORWARD_PLAIN
    LAUNCH_CHECK("layernorm_forward_kernel", LAYERNORM_SHAPE);
}

extern "C" void cuda_layernorm_forward(void *out, void *xhat, void *rstd, const void *x, const void *weight,
                                       const void *bias, int rows, int dim, float eps) {
    if (rows <= 0 || dim <= 0) return;
    layernorm_forward_args args = {};
    args.out = (bf16 *)out;
    args.xhat = (bf16 *)xhat;
    args.rstd = (float *)rstd;
    args.x = (const float *)x;
    args.weight = (const bf16 *)weight;
    args.bias = (const bf16 *)bias;
    args.rows = rows;
    args.dim = dim;
    args.eps = eps;
    args.rows_per_sample = 1;
    bool aligned = is_aligned16(out) && is_aligned16(x) && is_aligned16(xhat) &&
                   (!weight || (is_aligned16(weight) && is_aligned16(bias)));
    launch_layernorm_forward(args, aligned);
}

extern "C" void cuda_residual_layernorm_forward(void *residual_out, void *ln_out, void *rstd, const void *residual_in,
                                                const void *branch, const void *sample_scale, int rows, int dim,
                                                int rows_per_sample, float eps) {
    if (rows <= 0 || dim <= 0) return;
    layernorm_forward_args args = {};
    args.out = (bf16 *)ln_out;
    args.rstd = (float *)rstd;
    args.x = (const float *)residual_in;
    args.branch = (const bf16 *)branch;
    args.sample_scale = (const float *)sample_scale;
    args.residual_out = (float *)residual_out;
    args.rows_per_sample = rows_per_sample > 0 ? rows_per_sample : 1;
    args.rows = rows;
    args.dim = dim;
    args.eps = eps;
    bool aligned = is_aligned16(ln_out) && is_aligned16(residual_in) && is_aligned16(branch) &&
                   is_aligned16(residual_out);
    launch_layernorm_forward(args, aligned);
}

/* ---- backward ---- */
typedef struct {
    bf16 *dx;
    float *dweight, *dbias;
    const bf16 *dout, *xhat;
    const float *rstd;
    const bf16 *weight;
    int rows, dim;
} layernorm_backward_args;

template <int CHUNKS, int WARPS, bool AFFINE>
__global__ __launch_bounds__(ROW_BLOCK_THREADS) void layernorm_backward_kernel(layernorm_backward_args args) {
    __shared__ float scratch_g[8], scratch_gx[8];
    constexpr int ROWS_PER_BLOCK = (ROW_BLOCK_THREADS / 32) / WARPS;
    int t = row_thread_index<WARPS>(), local_row = (threadIdx.x >> 5) / WARPS;
    int chunks = args.dim >> 3;
    float w[CHUNKS][8], dw[CHUNKS][8], db[CHUNKS][8];
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        int index = c * 32 * WARPS + t;
        if (AFFINE) bf16x8_unpack(index < chunks ? reinterpret_cast<const uint4 *>(args.weight)[index]
                                                 : make_uint4(0, 0, 0, 0), w[c]);
#pragma unroll
        for (int i = 0; i < 8; i++) dw[c][i] = db[c][i] = 0.0f;
    }
    /* Blocks stride over the rows (block-uniform trip count: row_sum may hold barriers). */
    for (int base = blockIdx.x * ROWS_PER_BLOCK; base < args.rows; base += gridDim.x * ROWS_PER_BLOCK) {
        int row = base + local_row;
        bool active = row < args.rows;
        size_t row_offset = (size_t)row * args.dim;
        float x[CHUNKS][8], dy[CHUNKS][8];
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            int index = c * 32 * WARPS + t;
            bool load = active && index < chunks;
            bf16x8_unpack(load ? reinterpret_cast<const uint4 *>(args.xhat + row_offset)[index]
                               : make_uint4(0, 0, 0, 0),
                          x[c]);
            bf16x8_unpack(load ? reinterpret_cast<const uint4 *>(args.dout + row_offset)[index]
                               : make_uint4(0, 0, 0, 0),
                          dy[c]);
        }
        float rstd = active ? args.rstd[row] : 0.0f;
        float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
        for (int c = 0; c < CHUNKS; c++)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float g = AFFINE ? dy[c][i] * w[c][i] : dy[c][i];
                sum_g += g;
                sum_gx = fmaf(g, x[c][i], sum_gx);
            }
        float mean_g = row_sum<WARPS>(sum_g, scratch_g) / args.dim;
        float mean_gx = row_sum<WARPS>(sum_gx, scratch_gx) / args.dim;
        if (!active) continue;
        uint4 *dx_row = reinterpret_cast<uint4 *>(args.dx + row_offset);
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            int index = c * 32 * WARPS + t;
            if (index < chunks) {
                float dx[8];
                bf16x8_unpack(dx_row[index], dx);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    float g = AFFINE ? dy[c][i] * w[c][i] : dy[c][i];
                    dx[i] += rstd * (g - mean_g - x[c][i] * mean_gx);
                    if (AFFINE) {
                        dw[c][i] = fmaf(dy[c][i], x[c][i], dw[c][i]);
                        db[c][i] += dy[c][i];
                    }
                }
                dx_row[index] = bf16x8_pack(dx);
            }
        }
    }
    if constexpr (AFFINE) {
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            int index = c * 32 * WARPS + t;
            if (index < chunks)
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    atomicAdd(args.dweight + index * 8 + i, dw[c][i]);
                    atomicAdd(args.dbias + index * 8 + i, db[c][i]);
                }
        }
    }
}

/* Any width and alignment: one warp per row, with one atomic per element for dw and db. */
__global__ __launch_bounds__(ROW_BLOCK_THREADS) void layernorm_backward_plain_kernel(layernorm_backward_args args) {
    int row = blockIdx.x * (ROW_BLOCK_THREADS / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= args.rows) return;
    size_t row_offset = (size_t)row * args.dim;
    float rstd = args.rstd[row];
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (int j = lane; j < args.dim; j += 32) {
        float xhat = bf16_load(args.xhat + row_offset + j);
        float g = bf16_load(args.dout + row_offset + j) * (args.weight ? bf16_load(args.weight + j) : 1.0f);
        sum_g += g;
        sum_gx = fmaf(g, xhat, sum_gx);
    }
    float mean_g = warp_sum(sum_g) / args.dim, mean_gx = warp_sum(sum_gx) / args.dim;
    for (int j = lane; j < args.dim; j += 32) {
        float xhat = bf16_load(args.xhat + row_offset + j);
        float dy = bf16_load(args.dout + row_offset + j);
        float g = dy * (args.weight ? bf16_load(args.weight + j) : 1.0f);
        bf16 *dx = args.dx + row_offset + j;
        bf16_store(dx, bf16_load(dx) + rstd * (g - mean_g - xhat * mean_gx));
        if (args.dweight) {
            atomicAdd(args.dweight + j, dy * xhat);
            atomicAdd(args.dbias + j, dy);
        }
    }
}

extern "C" void cuda_layernorm_backward(void *dx, void *dweight, void *dbias, const void *dout, const void *xhat,
                                        const void *rstd, const void *weight, int rows, int dim) {
    if (rows <= 0 || dim <= 0) return;
    layernorm_backward_args args = {};
    args.dx = (bf16 *)dx;
    args.dout = (const bf16 *)dout;
    args.xhat = (const bf16 *)xhat;
    args.rstd = (const float *)rstd;
    args.rows = rows;
    args.dim = dim;
    bool affine = weight != NULL && dweight != NULL && dbias != NULL;
    if (weight) args.weight = (const bf16 *)weight;
    if (affine) {
        args.dweight = (float *)dweight;
        args.dbias = (float *)dbias;
    }
    bool aligned = is_aligned16(dx) && is_aligned16(dout) && is_aligned16(xhat) && (!weight || is_aligned16(weight));
    /* With a weight gradient, blocks stride over rows to sum dw, db in registers; the grid
     * fills the GPU a few times over. The plain kernel ignores a weight without gradients. */
    row_layout layout = plan_row(dim, aligned && (affine || weight == NULL));
    unsigned grid = row_grid(rows, layout);
    if (affine && layout.chunks && grid > (unsigned)cuda_ctx.sm_count * 4) grid = cuda_ctx.sm_count * 4;
    cudaStream_t stream = cuda_ctx.stream;
#define BACKWARD_CASE(C, W)                                                                                        \
    if (affine)                                                                                                    \
        layernorm_backward_kernel<C, W, true><<<grid, ROW_BLOCK_THREADS, 0, stream>>>(args);                       \
    else                                                                                                           \
        layernorm_backward_kernel<C, W, false><<<grid, ROW_BLOCK_THREADS, 0, stream>>>(args);
#define BACKWARD_PLAIN layernorm_backward_plain_kernel<<<grid, ROW_BLOCK_THREADS, 0, stream>>>(args);
    ROW_LAYOUT_SWITCH(layout, BACKWARD_CASE, BACKWARD_PLAIN)
#undef BACKWARD_CASE
#undef BACKWARD_PLAIN
    LAUNCH_CHECK("layernorm_backward_kernel", "rows %d dim %d affine %d", rows, dim, (int)affine);
}

/* out[i] (bf16) = x[i] (fp32) minus its rows' means, one warp per row: the key tokens of the
 * blocks' inference form (kernels.h), a few MB each, all of a model's in one launch per
 * CENTER_BATCH matrices (blockIdx.y picks the matrix; blocks past its rows return). For B/16 one
 * launch each took 0.30 ms a forward (48 of 5-10 us); one launch 0.13 ms, the 300 MB it moves. */
enum { CENTER_BATCH = 64 };
typedef struct {
    bf16 *out[CENTER_BATCH];
    const float *x[CENTER_BATCH];
    int rows[CENTER_BATCH];
} center_batch;

__global__ __launch_bounds__(ROW_BLOCK_THREADS) void center_rows_kernel(center_batch batch, int dim) {
    int matrix = blockIdx.y, lane = threadIdx.x & 31;
    int row = blockIdx.x * (ROW_BLOCK_THREADS / 32) + (threadIdx.x >> 5);
    if (row >= batch.rows[matrix]) return;
    const float *x_row = batch.x[matrix] + (size_t)row * dim;
    bf16 *out_row = batch.out[matrix] + (size_t)row * dim;
    float sum = 0.0f;
    for (int j = lane; j < dim; j += 32) sum += x_row[j];
    float mean = warp_sum(sum) / dim;
    for (int j = lane; j < dim; j += 32) bf16_store(out_row + j, x_row[j] - mean);
}

extern "C" void cuda_center_rows(void *const *out, const void *const *x, const int *rows, int count, int dim) {
    if (dim <= 0) return;
    for (int first = 0; first < count; first += CENTER_BATCH) {
        center_batch batch;
        int matrices = count - first < CENTER_BATCH ? count - first : CENTER_BATCH, most_rows = 0;
        for (int i = 0; i < matrices; i++) {
            batch.out[i] = (bf16 *)out[first + i];
            batch.x[i] = (const float *)x[first + i];
            batch.rows[i] = rows[first + i];
            if (rows[first + i] > most_rows) most_rows = rows[first + i];
        }
        if (most_rows == 0) continue;
        dim3 grid(ceil_div_u((size_t)most_rows, ROW_BLOCK_THREADS / 32), (unsigned)matrices);
        center_rows_kernel<<<grid, ROW_BLOCK_THREADS, 0, cuda_ctx.stream>>>(batch, dim);
        LAUNCH_CHECK("center_rows_kernel", "%d matrices from %d, at most %d rows, dim %d", matrices, first, most_rows,
                     dim);
    }
}

/* sigma^2 = var(x) + eps of bf16 rows (kernels.h): the row in registers as the other row kernels
 * hold it, then the mean and the squares about it, two reductions. */
template <int CHUNKS, int WARPS>
__global__ __launch_bounds__(ROW_BLOCK_THREADS) void layernorm_variance_kernel(float *variance, const bf16 *x,
                                                                                 int rows, int dim, float eps) {
    __shared__ float scratch[8];
    int row = row_of_thread<WARPS>(), t = row_thread_index<WARPS>();
    bool active = row < rows;
    int chunks = dim >> 3;
    const uint4 *x_row = reinterpret_cast<const uint4 *>(x + (size_t)row * dim);
    float values[CHUNKS][8];
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        int index = c * 32 * WARPS + t;
        bf16x8_unpack(active && index < chunks ? x_row[index] : make_uint4(0, 0, 0, 0), values[c]);
#pragma unroll
        for (int i = 0; i < 8; i++) sum += values[c][i];
    }
    float mean = row_sum<WARPS>(sum, scratch) / dim, squares = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++)
        if (c * 32 * WARPS + t < chunks)
#pragma unroll
            for (int i = 0; i < 8; i++) squares = fmaf(values[c][i] - mean, values[c][i] - mean, squares);
    squares = row_sum<WARPS>(squares, scratch);
    if (active && t == 0) variance[row] = squares / dim + eps;
}

__global__ __launch_bounds__(ROW_BLOCK_THREADS) void layernorm_variance_plain_kernel(float *variance, const bf16 *x,
                                                                                       int rows, int dim, float eps) {
    int row = blockIdx.x * (ROW_BLOCK_THREADS / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    float row_variance = warp_row_variance(x + (size_t)row * dim, dim, lane, eps);
    if (lane == 0) variance[row] = row_variance;
}

extern "C" void cuda_layernorm_variance(void *variance, const void *x, int rows, int dim, float eps) {
    if (rows <= 0 || dim <= 0) return;
    float *variance_ = (float *)variance;
    const bf16 *x_ = (const bf16 *)x;
    row_layout layout = plan_row(dim, is_aligned16(x));
    unsigned grid = row_grid(rows, layout);
    cudaStream_t stream = cuda_ctx.stream;
#define VARIANCE_CASE(C, W)                                                                                        \
    layernorm_variance_kernel<C, W><<<grid, ROW_BLOCK_THREADS, 0, stream>>>(variance_, x_, rows, dim, eps);
#define VARIANCE_PLAIN                                                                                             \
    layernorm_variance_plain_kernel<<<grid, ROW_BLOCK_THREADS, 0, stream>>>(variance_, x_, rows, dim, eps);
    ROW_LAYOUT_SWITCH(layout, VARIANCE_CASE, VARIANCE_PLAIN)
#undef VARIANCE_CASE
#undef VARIANCE_PLAIN
    LAUNCH_CHECK("layernorm_variance_kernel", "rows %d dim %d", rows, dim);
}
