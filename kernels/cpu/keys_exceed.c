/* keys_exceed (kernels.h): whether the stacked keys Kc exceed mu on every direction orthogonal to
 * 1, by LAPACK's Cholesky factorisation (dpotrf, in double) of P Kc^T Kc P + 2 mu 11^T / d - mu I.
 *
 * The questions run side by side, one per OpenMP thread, each with single-threaded BLAS (OpenBLAS
 * runs one thread inside a parallel region). On the H100 machine's 16 cores, B/16's 24 took
 * 0.51 s this way against 0.78 s one after another with every thread on each, and 0.94 s against
 * 23.7 s beside 15 busy processes (as a loader's workers can be), where threads that spin for
 * each other lose their cores. */
#include "kernels/cpu/cpu_real.h"

#include <stdlib.h>

/* LAPACK's Cholesky factorisation (OpenBLAS exports it; the last argument is the length of the
 * character argument that Fortran passes hidden). */
extern void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info, size_t uplo_length);

/* The stacked keys in double, [parts * n, dim]; |Kc 1| into question->sums_norm. */
static void stack_keys(double *keys, tf_keys_exceed *question, int dim) {
    double sums_squared = 0.0;
    for (int part = 0; part < question->parts; part++) {
        const real *source = question->keys[part];
        for (int i = 0; i < question->n; i++) {
            double *row = keys + ((size_t)part * question->n + i) * dim, sum = 0.0;
            for (int j = 0; j < dim; j++) {
                row[j] = source[(size_t)i * dim + j];
                sum += row[j];
            }
            sums_squared += sum * sum;
        }
    }
    question->sums_norm = sqrt(sums_squared);
}

/* gram (the upper triangle of Kc^T Kc, mirrored) becomes P gram P + 2 mu 11^T / d - mu I. */
static void project_and_shift(double *gram, double *row_sums, int dim, double mu) {
    for (int i = 0; i < dim; i++)
        for (int j = 0; j < i; j++)
            gram[(size_t)i * dim + j] = gram[(size_t)j * dim + i];
    double total = 0.0;
    for (int i = 0; i < dim; i++) {
        double sum = 0.0;
        for (int j = 0; j < dim; j++)
            sum += gram[(size_t)i * dim + j];
        row_sums[i] = sum;
        total += sum;
    }
    for (int i = 0; i < dim; i++)
        for (int j = 0; j < dim; j++)
            gram[(size_t)i * dim + j] +=
                (total / dim - row_sums[i] - row_sums[j] + 2.0 * mu) / dim - (i == j ? mu : 0.0);
}

/* Without memory for it the answer is false: the inference form then reads the variance. */
static void answer(tf_keys_exceed *question, int dim) {
    int rows = question->parts * question->n;
    double *keys = malloc((size_t)rows * dim * sizeof *keys),
           *gram = malloc((size_t)dim * dim * sizeof *gram);
    double *row_sums = malloc((size_t)dim * sizeof *row_sums);
    question->exceeds = false;
    question->sums_norm = 0.0;
    if (keys && gram && row_sums) {
        stack_keys(keys, question, dim);
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, dim, rows, 1.0, keys, dim, 0.0, gram, dim);
        project_and_shift(gram, row_sums, dim, question->mu);
        int info = 0;
        dpotrf_("U", &dim, gram, &dim, &info, 1);
        question->exceeds = info == 0;
    }
    free(keys), free(gram), free(row_sums);
}

void CPU_FN(keys_exceed)(tf_keys_exceed *questions, int count, int dim) {
#pragma omp parallel for schedule(dynamic)
    for (int i = 0; i < count; i++)
        answer(&questions[i], dim);
}
