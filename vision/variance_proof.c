/* When the inference form may skip a folded LayerNorm's variance pass (vision/block.c).
 *
 * The inference form reads the stream x instead of y = LayerNorm(x) and normalises A' = x Kc^T
 * (Kc: the key tokens, each minus its own mean) by r^2 = |A'|^2 + eps sigma^2, sigma^2 = var(x) +
 * eps_ln, so that tau A' / r is the definition's tau A / sqrt(|A|^2 + eps). sigma^2 costs a pass
 * over the stream per LayerNorm, 2 x depth a forward (B/16: 24 passes of 52 us; without them a
 * batch ran 2.5% faster), for a term that is almost always below the precision r^2 is summed in.
 * For the keys of an FFN it can be proved for every row at once:
 *
 *   Write x = xc + m 1 with xc orthogonal to 1 and |xc|^2 = d var(x). Then A' = Kc xc + m s, where
 *   s = Kc 1 holds the keys' row sums: zero but for the rounding of the centred keys to bf16, so
 *   m s is the folded form's own error (the definition has no such term). Let lambda be the least
 *   of |Kc u|^2 over unit vectors u orthogonal to 1, so |Kc xc|^2 >= lambda d var(x). On every row
 *   whose mean is within R = sqrt(lambda d) / (4 |s|) standard deviations, |m s| <= |Kc xc| / 4 and
 *   |A'|^2 >= (9/16) lambda d var(x). If lambda d >= eps 2^(p + 2), eps var(x) <= (8/9) 2^-(p + 1)
 *   |A'|^2: less than half a unit in the last place of a p-bit sum of squares even 10% off (A'
 *   rounded to bf16 moves it by under 1%), so r^2 is the same number without it. Only eps eps_ln
 *   stays (a row of zeros keeps Z = 0). A row with a larger mean is within 1/R of constant, and
 *   there the folded form's scores already differ from the definition's by more than a quarter,
 *   with or without eps var(x).
 *
 * Q, K and V read the same x. Their keys are square (768 x 768 in B/16), so each alone has lambda
 * near 0, but stacked (2304 x 768) they pass the same test, and then (9/16) lambda d var(x) <=
 * sum_p |A'_p|^2 <= sum_p r_p^2 over the three. On a row where each r_p^2 is at least a quarter of
 * that sum (TF_QKV_NORM_SHARE), eps var(x) <= (16/9) 2^-p r_p^2: without it r_p moves by at most
 * (8/9) 2^-p of itself, under one unit in its last place. Which rows those are is known only once
 * all three norms have run, so they run with eps eps_ln alone, their S side by side, and
 * pattention_norm_recheck does again, with var(x) read, the rows where a share is under a quarter
 * (none in B/16 at initialisation, where each is about a third), before the value GEMMs
 * (pattention_infer_qkv).
 *
 * On the GPU the norm pass sums r^2 in fp32 (p = 24): B/16's inference logits are bit for bit
 * those with every pass read (tests/test_torch_parity.py), Q's, K's and V's included. The CPU
 * backend sums in double and rounds r to fp32, so there an r may move by one unit in its last
 * place: 2.75e-7 on B/16's logits. In double (the fp64 backend, p = 53) no keys of a sensible size
 * pass.
 *
 * lambda >= mu is decided by a Cholesky factorisation (LAPACK's dpotrf, in double) of
 * P Kc^T Kc P + 2 mu 11^T / d - mu I, P = I - 11^T / d: it succeeds exactly when that matrix is
 * positive definite, that is when Kc^T Kc exceeds mu on every direction orthogonal to 1. The keys
 * are the GEMM's own (compute dtype, downloaded), so the proof is about the numbers it multiplies.
 * B/16 at initialisation (keys of std 0.02): lambda d ~ (sqrt(3072) - sqrt(768))^2 0.02^2 d = 236
 * for the FFN's 3072 x 768 keys and (sqrt(2304) - sqrt(768))^2 0.02^2 d = 126 for Q's, K's and V's
 * stacked, against eps 2^26 = 67 in fp32. */
#include "vision/layers.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

/* LAPACK's Cholesky factorisation (OpenBLAS exports it; the last argument is the length of the
 * character argument that Fortran passes hidden). */
extern void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info, size_t uplo_length);

/* Whether lambda (above) of the centred keys [n, dim] is at least mu; |s| into *sums_norm. */
static bool keys_exceed(const float *centered, int n, int dim, double mu, double *sums_norm) {
    double *keys = calloc((size_t)n * dim, sizeof *keys), *gram = malloc((size_t)dim * dim * sizeof *gram);
    double *row_sums = malloc((size_t)dim * sizeof *row_sums);
    bool exceeds = false;
    *sums_norm = 0.0;
    if (!keys || !gram || !row_sums) goto done;
    double sums_squared = 0.0;
    for (int i = 0; i < n; i++) {
        double sum = 0.0;
        for (int j = 0; j < dim; j++) {
            keys[(size_t)i * dim + j] = centered[(size_t)i * dim + j];
            sum += keys[(size_t)i * dim + j];
        }
        sums_squared += sum * sum;
    }
    *sums_norm = sqrt(sums_squared);
    /* Kc^T Kc: the upper triangle, then mirrored. */
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, dim, n, 1.0, keys, dim, 0.0, gram, dim);
    for (int i = 0; i < dim; i++)
        for (int j = 0; j < i; j++)
            gram[(size_t)i * dim + j] = gram[(size_t)j * dim + i];
    /* P Kc^T Kc P, plus 2 mu 11^T / d - mu I. */
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
    int info = 0;
    dpotrf_("U", &dim, gram, &dim, &info, 1);
    exceeds = info == 0;
done:
    free(keys), free(gram), free(row_sums);
    return exceeds;
}

bool variance_proof_keys(const float *centered, int n, int dim, float eps, int precision_bits,
                         double *mean_ratio) {
    double mu = (double)eps * ldexp(1.0, precision_bits + 2) / dim, sums_norm;
    bool proved = keys_exceed(centered, n, dim, mu, &sums_norm);
    *mean_ratio = proved ? sqrt(mu * dim) / (4.0 * sums_norm) : 0.0; /* inf where s = 0 */
    return proved;
}

int model_variance_passes_skipped(const tf_model *model) {
    int skipped = 0;
    for (int block = 0; block < model->config.depth; block++)
        skipped += ffn_variance_skipped(model, block) + qkv_variance_skipped(model, block);
    return skipped;
}

/* One proof: a block's FFN keys, or its Q, K and V keys stacked. */
typedef struct {
    int block, first, count, n; /* Pattentions first .. first + count - 1, n key tokens each */
    bool downloaded, proved;
    double mean_ratio;
} proof_task;

static proof_task proof_task_of(const tf_model *model, int index) {
    const tf_model_config *config = &model->config;
    bool ffn = index % 2 == 0;
    return (proof_task){.block = index / 2, .first = ffn ? TF_PATT_FFN : TF_PATT_Q, .count = ffn ? 1 : 3,
                        .n = ffn ? config->n_ffn : config->n_attn};
}

/* The task's keys, stacked, into keys (host), as the GEMMs read them. */
static bool download_task_keys(const tf_model *model, const proof_task *task, float *keys) {
    const tf_backend *backend = model->backend;
    size_t size = (size_t)task->n * model->config.dim;
    for (int which = task->first; which < task->first + task->count; which++) {
        const void *centered = model->centered_keys[task->block][which];
        if (!centered) return false;
        backend->download(keys + (size_t)(which - task->first) * size, centered, backend->compute_dtype, size);
    }
    return true;
}

/* The keys of every block (model->centered_keys, written by this model_infer's centring), once per
 * set of parameters (model->params_generation). The proofs run in waves of one per OpenMP thread,
 * each with single-threaded BLAS (OpenBLAS runs one thread inside a parallel region), and only a
 * wave's keys are on the host at a time. On the H100 machine's 16 cores, B/16's 24 proofs took
 * 0.51 s this way against 0.78 s one after another with every thread on each, and 0.94 s against
 * 23.7 s beside 15 busy processes (as a loader's workers can be), where threads that spin for each
 * other lose their cores. */
void variance_proof_update(tf_model *model) {
    if (model->proof_generation == model->params_generation) return;
    const tf_model_config *config = &model->config;
    int tasks = 2 * config->depth, wave = omp_get_max_threads();
    int precision_bits = model->backend->master_dtype == TF_DTYPE_F64 ? 53 : 24;
    size_t most = (size_t)(config->n_ffn > 3 * config->n_attn ? config->n_ffn : 3 * config->n_attn) * config->dim;
    float *keys = malloc((size_t)wave * most * sizeof *keys);
    proof_task *wave_tasks = calloc((size_t)wave, sizeof *wave_tasks);
    model->variance_proof_mean_ratio = INFINITY;
    for (int block = 0; block < config->depth; block++) /* what stays so without memory for the keys */
        model->ffn_variance_invisible[block] = model->qkv_variance_bounded[block] = false;
    for (int start = 0; start < tasks && keys && wave_tasks; start += wave) {
        int size = tasks - start < wave ? tasks - start : wave;
        for (int i = 0; i < size; i++) {
            wave_tasks[i] = proof_task_of(model, start + i);
            wave_tasks[i].downloaded = download_task_keys(model, &wave_tasks[i], keys + (size_t)i * most);
        }
#pragma omp parallel for schedule(dynamic)
        for (int i = 0; i < size; i++) {
            proof_task *task = &wave_tasks[i];
            if (task->downloaded)
                task->proved = variance_proof_keys(keys + (size_t)i * most, task->count * task->n, config->dim,
                                                   config->eps, precision_bits, &task->mean_ratio);
        }
        for (int i = 0; i < size; i++) {
            const proof_task *task = &wave_tasks[i];
            bool *proved = task->first == TF_PATT_FFN ? model->ffn_variance_invisible : model->qkv_variance_bounded;
            proved[task->block] = task->proved;
            if (task->proved && task->mean_ratio < model->variance_proof_mean_ratio)
                model->variance_proof_mean_ratio = task->mean_ratio;
        }
    }
    free(keys);
    free(wave_tasks);
    model->proof_generation = model->params_generation;
}
