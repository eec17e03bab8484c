/* Multi-head softmax attention of the CPU backend, not causal:
 *   out_i = sum_j P_ij v_j,  P_ij = exp(s_ij - lse_i),  s_ij = q_i . k_j / sqrt(head_dim),
 *   lse_i = log sum_j exp(s_ij),
 * for every (batch, head) pair; head h of a token is columns [h D, (h + 1) D) of its row.
 *
 * One OpenMP iteration per (batch, head) pair: a pair owns its columns of out, dq, dk and dv, so
 * the pairs never write the same memory. Inside a pair the keys (and, for backward, the values)
 * are first copied into a transposed [head_dim, tokens] tile on the stack, so that the score row
 * of a query is a sum of head_dim contiguous axpy's over tokens, which vectorises; stack use is
 * 2 * head_dim * tokens reals per thread (100 KiB in fp32 for 197 tokens of 64 dims). */
#include "kernels/cpu/cpu_real.h"

/* tile[d * tokens + j] = x[token j of this pair, head column d]. */
static void gather_transposed(real *tile, const real *x, int tokens, int row_stride, int head_dim) {
    for (int j = 0; j < tokens; j++)
        for (int d = 0; d < head_dim; d++) tile[(size_t)d * tokens + j] = x[(size_t)j * row_stride + d];
}

/* scores[j] = scale * q . k_j for all j, with the keys as a transposed tile. */
static void score_row(real *scores, const real *q_row, const real *keys_transposed, int tokens, int head_dim,
                      real scale) {
    for (int j = 0; j < tokens; j++) scores[j] = 0;
    for (int d = 0; d < head_dim; d++) {
        real q_d = q_row[d] * scale;
        const real *key_column = keys_transposed + (size_t)d * tokens;
#pragma omp simd
        for (int j = 0; j < tokens; j++) scores[j] += q_d * key_column[j];
    }
}

static real row_max(const real *x, int n) {
    real max = x[0];
#pragma omp simd reduction(max : max)
    for (int j = 1; j < n; j++) max = x[j] > max ? x[j] : max;
    return max;
}

void CPU_FN(attention_forward)(void *out_buffer, void *lse_buffer, const void *q_buffer, const void *k_buffer,
                               const void *v_buffer, int batch, int tokens, int heads, int head_dim) {
    real *out = out_buffer, *lse = lse_buffer;
    const real *q = q_buffer, *k = k_buffer, *v = v_buffer;
    const int row_stride = heads * head_dim;
    const real scale = (real)(1.0 / sqrt((double)head_dim));
#pragma omp parallel for schedule(static)
    for (int pair = 0; pair < batch * heads; pair++) {
        int b = pair / heads, h = pair % heads;
        size_t base = (size_t)b * tokens * row_stride + (size_t)h * head_dim; /* token 0, head h */
        real keys_transposed[head_dim * tokens];
        real probabilities[tokens];
        real accumulator[head_dim];
        gather_transposed(keys_transposed, k + base, tokens, row_stride, head_dim);
        for (int i = 0; i < tokens; i++) {
            score_row(probabilities, q + base + (size_t)i * row_stride, keys_transposed, tokens, head_dim, scale);
            real max = row_max(probabilities, tokens);
            real sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < tokens; j++) {
                probabilities[j] = real_vector_exp(probabilities[j] - max);
                sum += probabilities[j];
            }
            for (int d = 0; d < head_dim; d++) accumulator[d] = 0;
            for (int j = 0; j < tokens; j++) {
                const real *v_row = v + base + (size_t)j * row_stride;
                real p = probabilities[j];
#pragma omp simd
                for (int d = 0; d < head_dim; d++) accumulator[d] += p * v_row[d];
            }
            real inverse_sum = 1 / sum;
            real *out_row = out + base + (size_t)i * row_stride;
            for (int d = 0; d < head_dim; d++) out_row[d] = accumulator[d] * inverse_sum;
            lse[(size_t)pair * tokens + i] = max + real_log(sum);
        }
    }
}

/* Backward, the standard one with the probabilities recomputed from lse:
 *   dv_j = sum_i P_ij dout_i
 *   dP_ij = dout_i . v_j,   D_i = dout_i . out_i  (= sum_j P_ij dP_ij)
 *   dS_ij = P_ij (dP_ij - D_i)              (softmax backward)
 *   dq_i = scale sum_j dS_ij k_j,   dk_j = scale sum_i dS_ij q_i.
 * Queries are visited one at a time; dk and dv of the pair are accumulated in place in their
 * output rows, which only this pair touches. */
void CPU_FN(attention_backward)(void *dq_buffer, void *dk_buffer, void *dv_buffer, const void *dout_buffer,
                                const void *q_buffer, const void *k_buffer, const void *v_buffer,
                                const void *out_buffer, const void *lse_buffer, int batch, int tokens, int heads,
                                int head_dim) {
    real *dq = dq_buffer, *dk = dk_buffer, *dv = dv_buffer;
    const real *dout = dout_buffer, *q = q_buffer, *k = k_buffer, *v = v_buffer, *out = out_buffer;
    const real *lse = lse_buffer;
    const int row_stride = heads * head_dim;
    const real scale = (real)(1.0 / sqrt((double)head_dim));
#pragma omp parallel for schedule(static)
    for (int pair = 0; pair < batch * heads; pair++) {
        int b = pair / heads, h = pair % heads;
        size_t base = (size_t)b * tokens * row_stride + (size_t)h * head_dim;
        real keys_transposed[head_dim * tokens];
        real values_transposed[head_dim * tokens];
        real probabilities[tokens];
        real dscores[tokens];
        gather_transposed(keys_transposed, k + base, tokens, row_stride, head_dim);
        gather_transposed(values_transposed, v + base, tokens, row_stride, head_dim);
        for (int j = 0; j < tokens; j++) {
            real *dk_row = dk + base + (size_t)j * row_stride, *dv_row = dv + base + (size_t)j * row_stride;
            for (int d = 0; d < head_dim; d++) dk_row[d] = dv_row[d] = 0;
        }
        for (int i = 0; i < tokens; i++) {
            size_t row = base + (size_t)i * row_stride;
            const real *q_row = q + row, *dout_row = dout + row, *out_row = out + row;
            real row_lse = lse[(size_t)pair * tokens + i];
            score_row(probabilities, q_row, keys_transposed, tokens, head_dim, scale);
#pragma omp simd
            for (int j = 0; j < tokens; j++) probabilities[j] = real_vector_exp(probabilities[j] - row_lse);
            /* dP_ij = dout_i . v_j for all j (scale 1), then dS in place. */
            score_row(dscores, dout_row, values_transposed, tokens, head_dim, 1);
            real dout_dot_out = 0;
#pragma omp simd reduction(+ : dout_dot_out)
            for (int d = 0; d < head_dim; d++) dout_dot_out += dout_row[d] * out_row[d];
#pragma omp simd
            for (int j = 0; j < tokens; j++) dscores[j] = probabilities[j] * (dscores[j] - dout_dot_out);
            real *dq_row = dq + row;
            for (int d = 0; d < head_dim; d++) dq_row[d] = 0;
            for (int j = 0; j < tokens; j++) {
                size_t row_j = base + (size_t)j * row_stride;
                const real *k_row = k + row_j;
                real *dk_row = dk + row_j, *dv_row = dv + row_j;
                real ds = dscores[j] * scale, p = probabilities[j];
#pragma omp simd
                for (int d = 0; d < head_dim; d++) {
                    dq_row[d] += ds * k_row[d];
                    dk_row[d] += ds * q_row[d];
                    dv_row[d] += p * dout_row[d];
                }
            }
        }
    }
}
