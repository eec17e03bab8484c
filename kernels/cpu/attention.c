/* Multi-head softmax attention of the CPU backend, not causal:
 *   out_i = sum_j P_ij v_j,  P_ij = exp(s_ij - lse_i),  s_ij = q_i . k_j / sqrt(head_dim),
 *   lse_i = log sum_j exp(s_ij),
 * for every (batch, head) pair; head h of a token is columns [h D, (h + 1) D) of its row.
 *
 * One OpenMP iteration per (batch, head) pair: a pair owns its columns of out, dq, dk and dv, so
 * pairs never write the same memory. Inside a pair everything is small matrix products
 * (tokens x tokens x head_dim), done by block_product() on tiles copied to the stack: contiguous,
 * zero-padded to whole vectors (TILE_LANES columns) so that the products need no remainder loops,
 * and with keys and values also stored transposed so that every product runs along contiguous
 * rows. Queries are processed ROW_BLOCK at a time. The stack holds about 5 x tokens x head_dim
 * reals per thread (270 KiB in fp32 for 197 tokens of 64 dimensions). */
#include "kernels/cpu/cpu_real.h"

#include <string.h>

/* One strip of TILE_LANES reals (64 bytes: one AVX-512 register, two AVX2 ones), as a GCC vector
 * type: left to itself the vectoriser turns block_product() the wrong way round (across rows,
 * gathering the left operand), so the strip is spelled out. Loads and stores go through memcpy,
 * which allows any alignment. */
typedef real tile_vector __attribute__((vector_size(64)));
#define TILE_LANES ((int)(sizeof(tile_vector) / sizeof(real)))
/* Query rows per block: each vector of the right-hand matrix is used ROW_BLOCK times per load. */
#define ROW_BLOCK 8

static int round_up(int x, int multiple) {
    return (x + multiple - 1) / multiple * multiple;
}

/* out[r, c] = alpha sum_p a[r a_row + p a_inner] b[p ldb + c]   (or += with accumulate)
 * for r < ROW_BLOCK and c < width, width a multiple of TILE_LANES. The accumulators of one
 * column strip (ROW_BLOCK vectors) stay in registers over the whole inner loop. */
static inline void block_product(real *restrict out, int ldo, const real *restrict a, int a_row, int a_inner,
                                 const real *restrict b, int ldb, int inner, int width, real alpha,
                                 bool accumulate) {
    for (int c0 = 0; c0 < width; c0 += TILE_LANES) {
        tile_vector sums[ROW_BLOCK];
        for (int r = 0; r < ROW_BLOCK; r++)
            sums[r] = (tile_vector){0};
        for (int p = 0; p < inner; p++) {
            tile_vector b_strip;
            memcpy(&b_strip, b + (size_t)p * ldb + c0, sizeof b_strip);
            for (int r = 0; r < ROW_BLOCK; r++)
                sums[r] += a[r * a_row + p * a_inner] * b_strip;
        }
        for (int r = 0; r < ROW_BLOCK; r++) {
            real *out_strip = out + (size_t)r * ldo + c0;
            tile_vector result = alpha * sums[r];
            if (accumulate) {
                tile_vector previous;
                memcpy(&previous, out_strip, sizeof previous);
                result += previous;
            }
            memcpy(out_strip, &result, sizeof result);
        }
    }
}

/* tile[t, d] = x[token t, column d] for t < tokens, d < head_dim; zero elsewhere ([rows, cols]). */
static void gather_tile(real *tile, int rows, int cols, const real *x, int row_stride, int tokens,
                        int head_dim) {
    memset(tile, 0, (size_t)rows * cols * sizeof(real));
    for (int t = 0; t < tokens && t < rows; t++)
        memcpy(tile + (size_t)t * cols, x + (size_t)t * row_stride, (size_t)head_dim * sizeof(real));
}

/* tile[d, t] = x[token t, column d]; zero elsewhere ([rows = padded head_dim, cols = padded tokens]). */
static void gather_tile_transposed(real *tile, int rows, int cols, const real *x, int row_stride, int tokens,
                                   int head_dim) {
    memset(tile, 0, (size_t)rows * cols * sizeof(real));
    for (int t = 0; t < tokens; t++)
        for (int d = 0; d < head_dim; d++)
            tile[(size_t)d * cols + t] = x[(size_t)t * row_stride + d];
}

/* The tile's first tokens rows and head_dim columns, back into a strided buffer. */
static void scatter_tile(real *x, int row_stride, const real *tile, int cols, int tokens, int head_dim) {
    for (int t = 0; t < tokens; t++)
        memcpy(x + (size_t)t * row_stride, tile + (size_t)t * cols, (size_t)head_dim * sizeof(real));
}

/* Softmax of the first `valid` entries of a score row, written as probabilities (zero beyond);
 * returns the log-sum-exp. */
static real softmax_row(real *row, int valid, int padded) {
    real max = row[0];
    for (int j = 1; j < valid; j++)
        max = row[j] > max ? row[j] : max;
    real sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < valid; j++) {
        row[j] = cpu_exp(row[j] - max);
        sum += row[j];
    }
    real inverse_sum = 1 / sum;
    for (int j = 0; j < valid; j++)
        row[j] *= inverse_sum;
    for (int j = valid; j < padded; j++)
        row[j] = 0;
    return max + real_log(sum);
}

void CPU_FN(attention_forward)(void *out_buffer, void *lse_buffer, const void *q_buffer, const void *k_buffer,
                               const void *v_buffer, int batch, int tokens, int heads, int head_dim) {
    real *out = out_buffer, *lse = lse_buffer;
    const real *q = q_buffer, *k = k_buffer, *v = v_buffer;
    const int row_stride = heads * head_dim;
    const int padded_tokens = round_up(tokens, TILE_LANES), padded_dim = round_up(head_dim, TILE_LANES);
    const real scale = (real)(1.0 / sqrt((double)head_dim));
#pragma omp parallel for schedule(static)
    for (int pair = 0; pair < batch * heads; pair++) {
        int b = pair / heads, h = pair % heads;
        size_t base = (size_t)b * tokens * row_stride + (size_t)h * head_dim; /* token 0, head h */
        real keys_transposed[padded_dim * padded_tokens];                     /* [d, j] */
        real values[padded_tokens * padded_dim];                              /* [j, d] */
        real queries[ROW_BLOCK * padded_dim];
        real probabilities[ROW_BLOCK * padded_tokens];
        real outputs[ROW_BLOCK * padded_dim];
        gather_tile_transposed(keys_transposed, padded_dim, padded_tokens, k + base, row_stride, tokens,
                               head_dim);
        gather_tile(values, padded_tokens, padded_dim, v + base, row_stride, tokens, head_dim);
        for (int i0 = 0; i0 < tokens; i0 += ROW_BLOCK) {
            int block_rows = tokens - i0 < ROW_BLOCK ? tokens - i0 : ROW_BLOCK;
            gather_tile(queries, ROW_BLOCK, padded_dim, q + base + (size_t)i0 * row_stride, row_stride,
                        block_rows, head_dim);
            /* scores = scale q K^T, then softmax per row */
            block_product(probabilities, padded_tokens, queries, padded_dim, 1, keys_transposed,
                          padded_tokens, head_dim, padded_tokens, scale, false);
            for (int r = 0; r < block_rows; r++)
                lse[(size_t)pair * tokens + i0 + r] =
                    softmax_row(probabilities + r * padded_tokens, tokens, padded_tokens);
            /* out = P V */
            block_product(outputs, padded_dim, probabilities, padded_tokens, 1, values, padded_dim, tokens,
                          padded_dim, 1, false);
            scatter_tile(out + base + (size_t)i0 * row_stride, row_stride, outputs, padded_dim, block_rows,
                         head_dim);
        }
    }
}

/* Backward, the standard one with the probabilities recomputed from lse:
 *   dv_j = sum_i P_ij dout_i
 *   dP_ij = dout_i . v_j,   D_i = dout_i . out_i  (= sum_j P_ij dP_ij)
 *   dS_ij = P_ij (dP_ij - D_i)              (softmax backward)
 *   dq_i = scale sum_j dS_ij k_j,   dk_j = scale sum_i dS_ij q_i.
 * For each block of queries: P and dS rows, dq of the block, and rank-ROW_BLOCK updates of the
 * pair's dk and dv tiles (dS^T q and P^T dout), which are written out at the end. */
void CPU_FN(attention_backward)(void *dq_buffer, void *dk_buffer, void *dv_buffer, const void *dout_buffer,
                                const void *q_buffer, const void *k_buffer, const void *v_buffer,
                                const void *out_buffer, const void *lse_buffer, int batch, int tokens,
                                int heads, int head_dim) {
    real *dq = dq_buffer, *dk = dk_buffer, *dv = dv_buffer;
    const real *dout = dout_buffer, *q = q_buffer, *k = k_buffer, *v = v_buffer, *out = out_buffer;
    const real *lse = lse_buffer;
    const int row_stride = heads * head_dim;
    const int padded_tokens = round_up(tokens, TILE_LANES), padded_dim = round_up(head_dim, TILE_LANES);
    const real scale = (real)(1.0 / sqrt((double)head_dim));
#pragma omp parallel for schedule(static)
    for (int pair = 0; pair < batch * heads; pair++) {
        int b = pair / heads, h = pair % heads;
        size_t base = (size_t)b * tokens * row_stride + (size_t)h * head_dim;
        real keys[padded_tokens * padded_dim];              /* [j, d] */
        real keys_transposed[padded_dim * padded_tokens];   /* [d, j] */
        real values_transposed[padded_dim * padded_tokens]; /* [d, j] */
        real dkeys[padded_tokens * padded_dim], dvalues[padded_tokens * padded_dim];
        real queries[ROW_BLOCK * padded_dim], douts[ROW_BLOCK * padded_dim], dqueries[ROW_BLOCK * padded_dim];
        real probabilities[ROW_BLOCK * padded_tokens], dscores[ROW_BLOCK * padded_tokens];
        gather_tile(keys, padded_tokens, padded_dim, k + base, row_stride, tokens, head_dim);
        gather_tile_transposed(keys_transposed, padded_dim, padded_tokens, k + base, row_stride, tokens,
                               head_dim);
        gather_tile_transposed(values_transposed, padded_dim, padded_tokens, v + base, row_stride, tokens,
                               head_dim);
        memset(dkeys, 0, sizeof dkeys);
        memset(dvalues, 0, sizeof dvalues);
        for (int i0 = 0; i0 < tokens; i0 += ROW_BLOCK) {
            int block_rows = tokens - i0 < ROW_BLOCK ? tokens - i0 : ROW_BLOCK;
            size_t block_base = base + (size_t)i0 * row_stride;
            gather_tile(queries, ROW_BLOCK, padded_dim, q + block_base, row_stride, block_rows, head_dim);
            gather_tile(douts, ROW_BLOCK, padded_dim, dout + block_base, row_stride, block_rows, head_dim);
            /* P = exp(scale q K^T - lse); dP = dout V^T */
            block_product(probabilities, padded_tokens, queries, padded_dim, 1, keys_transposed,
                          padded_tokens, head_dim, padded_tokens, scale, false);
            block_product(dscores, padded_tokens, douts, padded_dim, 1, values_transposed, padded_tokens,
                          head_dim, padded_tokens, 1, false);
            for (int r = 0; r < ROW_BLOCK; r++) {
                real *p_row = probabilities + r * padded_tokens, *ds_row = dscores + r * padded_tokens;
                if (r >= block_rows) { /* padding rows contribute nothing to dk, dv */
                    memset(p_row, 0, (size_t)padded_tokens * sizeof(real));
                    memset(ds_row, 0, (size_t)padded_tokens * sizeof(real));
                    continue;
                }
                real row_lse = lse[(size_t)pair * tokens + i0 + r];
                const real *dout_row = douts + r * padded_dim,
                           *out_row = out + block_base + (size_t)r * row_stride;
                real dout_dot_out = 0;
#pragma omp simd reduction(+ : dout_dot_out)
                for (int d = 0; d < head_dim; d++)
                    dout_dot_out += dout_row[d] * out_row[d];
#pragma omp simd
                for (int j = 0; j < tokens; j++) {
                    p_row[j] = cpu_exp(p_row[j] - row_lse);
                    ds_row[j] = p_row[j] * (ds_row[j] - dout_dot_out);
                }
                for (int j = tokens; j < padded_tokens; j++)
                    p_row[j] = ds_row[j] = 0;
            }
            /* dq = scale dS K */
            block_product(dqueries, padded_dim, dscores, padded_tokens, 1, keys, padded_dim, tokens,
                          padded_dim, scale, false);
            scatter_tile(dq + block_base, row_stride, dqueries, padded_dim, block_rows, head_dim);
            /* dk += scale dS^T q, dv += P^T dout: ROW_BLOCK key rows at a time, inner size ROW_BLOCK */
            for (int j0 = 0; j0 < tokens; j0 += ROW_BLOCK) {
                block_product(dkeys + (size_t)j0 * padded_dim, padded_dim, dscores + j0, 1, padded_tokens,
                              queries, padded_dim, ROW_BLOCK, padded_dim, scale, true);
                block_product(dvalues + (size_t)j0 * padded_dim, padded_dim, probabilities + j0, 1,
                              padded_tokens, douts, padded_dim, ROW_BLOCK, padded_dim, 1, true);
            }
        }
        scatter_tile(dk + base, row_stride, dkeys, padded_dim, tokens, head_dim);
        scatter_tile(dv + base, row_stride, dvalues, padded_dim, tokens, head_dim);
    }
}
