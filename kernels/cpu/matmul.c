/* GEMM of the CPU backend: C = op(A) op(B) (+ bias) (+ C), row-major, through CBLAS.
 *
 * OpenBLAS runs each call on its own thread pool, so this file has no OpenMP around the GEMM
 * (calling CBLAS inside an OpenMP region would nest the two pools). A bias is added to C before
 * the GEMM, which then runs with beta = 1; that costs one pass over C instead of a second GEMM. */
#include "kernels/cpu/cpu_real.h"

#include <string.h>

/* C = bias in every row (start of a non-accumulating GEMM) or C += bias (accumulating one). */
static void add_bias_rows(real *c, const real *bias, int m, int n, bool overwrite) {
#pragma omp parallel for schedule(static)
    for (int row = 0; row < m; row++) {
        real *c_row = c + (size_t)row * n;
        if (overwrite)
            memcpy(c_row, bias, (size_t)n * sizeof(real));
        else
            for (int j = 0; j < n; j++)
                c_row[j] += bias[j];
    }
}

void CPU_FN(matmul)(void *c_buffer, const void *a_buffer, const void *b_buffer, const tf_matmul_desc *desc) {
    real *c = c_buffer;
    const real *a = a_buffer, *b = b_buffer;
    int m = desc->m, n = desc->n, k = desc->k;
    if (m <= 0 || n <= 0) return;
    real beta = desc->accumulate ? 1 : 0;
    if (desc->bias) {
        add_bias_rows(c, desc->bias, m, n, !desc->accumulate);
        beta = 1;
    }
    if (k <= 0) { /* op(A) op(B) is the zero matrix; CBLAS would still want valid leading dimensions */
        if (beta == 0) memset(c, 0, (size_t)m * n * sizeof(real));
        return;
    }
    /* Row-major leading dimensions are the stored row lengths. */
    int lda = desc->transpose_a ? m : k;
    int ldb = desc->transpose_b ? k : n;
    cblas_gemm(CblasRowMajor, desc->transpose_a ? CblasTrans : CblasNoTrans,
               desc->transpose_b ? CblasTrans : CblasNoTrans, m, n, k, 1, a, lda, b, ldb, beta, c, n);
}
