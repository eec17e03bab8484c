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
 * lambda >= mu is decided by the backend's keys_exceed: a Cholesky factorisation in double of
 * P Kc^T Kc P + 2 mu 11^T / d - mu I, P = I - 11^T / d, which succeeds exactly when that matrix is
 * positive definite, that is when Kc^T Kc exceeds mu on every direction orthogonal to 1 (cuBLASLt
 * and cuSOLVER on the GPU, about 1 ms a proof; OpenBLAS and LAPACK on the CPU, where B/16's 24 took
 * 0.51 s on 16 cores). The keys are the GEMM's own (compute dtype, as stored), so the proof is
 * about the numbers it multiplies. B/16 at initialisation (keys of std 0.02): lambda d ~
 * (sqrt(3072) - sqrt(768))^2 0.02^2 d = 236 for the FFN's 3072 x 768 keys and (sqrt(2304) -
 * sqrt(768))^2 0.02^2 d = 126 for Q's, K's and V's stacked, against eps 2^26 = 67 in fp32. */
#include "vision/layers.h"

#include <math.h>

/* The question for keys of width dim: mu = eps 2^(p + 2) / d. */
static tf_keys_exceed proof_question(float eps, int precision_bits, int dim) {
    return (tf_keys_exceed){.mu = (double)eps * ldexp(1.0, precision_bits + 2) / dim};
}

/* The rows over which a proved question's bound holds: means within this many sigma (inf where
 * s = 0), or 0 where it was not proved. */
static double proof_mean_ratio(const tf_keys_exceed *question, int dim) {
    return question->exceeds ? sqrt(question->mu * dim) / (4.0 * question->sums_norm) : 0.0;
}

bool variance_proof_keys(const tf_backend *backend, const void *centered, int n, int dim, float eps,
                         int precision_bits, double *mean_ratio) {
    tf_keys_exceed question = proof_question(eps, precision_bits, dim);
    question.keys[0] = centered;
    question.parts = 1;
    question.n = n;
    backend->keys_exceed(&question, 1, dim);
    *mean_ratio = proof_mean_ratio(&question, dim);
    return question.exceeds;
}

int model_variance_passes_skipped(const tf_model *model) {
    int skipped = 0;
    for (int block = 0; block < model->config.depth; block++)
        skipped += ffn_variance_skipped(model, block) + qkv_variance_skipped(model, block);
    return skipped;
}

/* A block's FFN keys (index 2 block), or its Q, K and V keys stacked (index 2 block + 1), as
 * the question of the proof; parts 0 where a Pattention has no centred keys. */
static tf_keys_exceed block_question(const tf_model *model, int index, int precision_bits) {
    const tf_model_config *config = &model->config;
    tf_keys_exceed question = proof_question(config->eps, precision_bits, config->dim);
    int block = index / 2, first = index % 2 == 0 ? TF_PATT_FFN : TF_PATT_Q;
    question.parts = first == TF_PATT_FFN ? 1 : 3;
    question.n = first == TF_PATT_FFN ? config->n_ffn : config->n_attn;
    for (int part = 0; part < question.parts; part++) {
        question.keys[part] = model->centered_keys[block][first + part];
        if (!question.keys[part]) return (tf_keys_exceed){.parts = 0};
    }
    return question;
}

/* The keys of every block (model->centered_keys, written by this model_infer's centring), once per
 * set of parameters (model->params_generation), all in one call of keys_exceed. */
void variance_proof_update(tf_model *model) {
    if (model->proof_generation == model->params_generation) return;
    const tf_model_config *config = &model->config;
    int count = 2 * config->depth, asked = 0;
    int precision_bits = model->backend->master_dtype == TF_DTYPE_F64 ? 53 : 24;
    tf_keys_exceed questions[2 * TF_MAX_DEPTH];
    int index_of[2 * TF_MAX_DEPTH]; /* of each question asked: 2 block (FFN) or 2 block + 1 */
    for (int index = 0; index < count; index++) {
        tf_keys_exceed question = block_question(model, index, precision_bits);
        if (!question.parts) continue;
        index_of[asked] = index;
        questions[asked++] = question;
    }
    for (int block = 0; block < config->depth; block++) /* what stays so for keys not asked about */
        model->ffn_variance_invisible[block] = model->qkv_variance_bounded[block] = false;
    if (asked) model->backend->keys_exceed(questions, asked, config->dim);
    model->variance_proof_mean_ratio = INFINITY;
    for (int i = 0; i < asked; i++) {
        int index = index_of[i];
        bool *proved = index % 2 == 0 ? model->ffn_variance_invisible : model->qkv_variance_bounded;
        proved[index / 2] = questions[i].exceeds;
        double mean_ratio = proof_mean_ratio(&questions[i], config->dim);
        if (questions[i].exceeds && mean_ratio < model->variance_proof_mean_ratio)
            model->variance_proof_mean_ratio = mean_ratio;
    }
    model->proof_generation = model->params_generation;
}
