/* Pattention: attention of input tokens over learnable parameter tokens (DESIGN.md section 2).
 *
 *   A = X K^T                       K: key tokens [n, d_in], no scale, no bias
 *   Z = A tau / sqrt(sum_j A_j^2 + eps)   tau = sqrt(n_norm), per row
 *   S = GELU(Z)                     exact erf GELU
 *   out = S V                       V: value tokens [n, d_out]
 *
 * Backward, from dO = d loss / d out:
 *   dS = dO V^T,  dV += S^T dO
 *   dA = norm backward of dS (kernels.h gives the formula)
 *   dK += dA^T X, dX = dA K
 * A and the row norms are kept from forward; S is recomputed from them in backward (model.h
 * says why), by the same row pass that computes dA. The normalisation and GELU are one fused
 * row operation. */
#include "vision/layers.h"

#include <math.h>

static int pattention_tokens(const tf_model *model, int which) {
    return which == TF_PATT_FFN ? model->config.n_ffn : model->config.n_attn;
}

static float pattention_tau(const tf_model *model, int block, int which) {
    return sqrtf((float)model->config.n_norm[block][which]);
}

/* A = in keys^T into the cache (the first GEMM of every form). */
static void pattention_scores(tf_model *model, int block, int which, const void *keys, const void *in, int rows) {
    int n = pattention_tokens(model, which), dim = model->config.dim;
    model_op_class(model, TF_OP_PATTENTION_GEMM);
    model->backend->matmul(model->blocks[block].patt[which].scores, in, keys,
                           &(tf_matmul_desc){.m = rows, .n = n, .k = dim, .transpose_b = true});
}

/* The key tokens a Pattention's scores are taken against (centred ones in the inference form,
 * where the model has them) and the eps of its row norms, scaled per row by eps_scale if given. */
typedef struct {
    const void *keys;
    float eps;
    const void *eps_scale;
} keys_and_eps;

/* probs = S = GELU(norm(in keys^T)); A and the row norms stay in the cache. */
static void pattention_normed(tf_model *model, int block, int which, keys_and_eps norm, void *probs, const void *in,
                              int rows) {
    tf_pattention_cache *cache = &model->blocks[block].patt[which];
    pattention_scores(model, block, which, norm.keys, in, rows);
    model_op_class(model, TF_OP_PATTENTION_NORM);
    model->backend->pattention_norm_forward(probs, cache->row_norm, cache->scores, rows,
                                            pattention_tokens(model, which), pattention_tau(model, block, which),
                                            norm.eps, norm.eps_scale);
}

/* out = probs V (or out += probs V). */
static void pattention_values(tf_model *model, int block, int which, void *out, bool accumulate, const void *probs,
                              int rows) {
    model_op_class(model, TF_OP_PATTENTION_GEMM);
    model->backend->matmul(out, probs, model_param(model, model->layout.values[block][which]),
                           &(tf_matmul_desc){.m = rows, .n = model->config.dim, .k = pattention_tokens(model, which),
                                             .accumulate = accumulate});
}

/* out = S V (or out += S V) with S = GELU(norm(in keys^T)). */
static void pattention_apply(tf_model *model, int block, int which, keys_and_eps norm, void *out, bool accumulate,
                             const void *in, int rows) {
    pattention_normed(model, block, which, norm, model->probs, in, rows);
    pattention_values(model, block, which, out, accumulate, model->probs, rows);
}

void pattention_forward(tf_model *model, int block, int which, void *out, const void *in, int rows) {
    keys_and_eps plain = {model_param(model, model->layout.keys[block][which]), model->config.eps, NULL};
    pattention_apply(model, block, which, plain, out, false, in, rows);
}

/* With centred keys, the LayerNorm folded in scales eps by its sigma^2 = var(x) + eps_ln per row
 * (block.c), or by eps_ln alone where the keys prove eps var(x) below the row norms' precision
 * (variance_proof.c). */
static keys_and_eps infer_keys(const tf_model *model, int block, int which) {
    const void *centered = model->centered_keys[block][which];
    float eps = model->config.eps;
    if (!centered) return (keys_and_eps){model_param(model, model->layout.keys[block][which]), eps, NULL};
    if (which == TF_PATT_FFN && ffn_variance_skipped(model, block))
        return (keys_and_eps){centered, eps * TF_LAYERNORM_EPS, NULL};
    return (keys_and_eps){centered, eps, model->stream_variance};
}

void pattention_infer(tf_model *model, int block, int which, void *out, bool accumulate, const void *in, int rows) {
    pattention_apply(model, block, which, infer_keys(model, block, which), out, accumulate, in, rows);
}

/* The three norms with eps eps_ln alone, their S side by side in probs; the rows where the bound
 * does not hold done again with var(x) read (pattention_norm_recheck); then the value GEMMs. */
void pattention_infer_qkv(tf_model *model, int block, const void *x, int rows) {
    tf_block_cache *cache = &model->blocks[block];
    void *out[] = {cache->q, cache->k, cache->v};
    tf_norm_rows norms[TF_NORM_RECHECK_MAX];
    size_t slice = (size_t)rows * model->config.n_attn * tf_dtype_size(model->backend->compute_dtype);
    float eps = model->config.eps;
    for (int which = TF_PATT_Q; which <= TF_PATT_V; which++) {
        void *probs = (char *)model->probs + (size_t)which * slice;
        keys_and_eps norm = {model->centered_keys[block][which], eps * TF_LAYERNORM_EPS, NULL};
        pattention_normed(model, block, which, norm, probs, x, rows);
        norms[which] = (tf_norm_rows){probs, cache->patt[which].row_norm, cache->patt[which].scores,
                                      pattention_tau(model, block, which)};
    }
    model_op_class(model, TF_OP_PATTENTION_NORM);
    model->backend->pattention_norm_recheck(norms, TF_PATT_V + 1, x, rows, model->config.n_attn, model->config.dim,
                                            eps, TF_LAYERNORM_EPS, TF_QKV_NORM_SHARE);
    for (int which = TF_PATT_Q; which <= TF_PATT_V; which++)
        pattention_values(model, block, which, out[which], false, norms[which].s, rows);
}

void pattention_infer_pooled(tf_model *model, int block, int which, void *pooled, const void *in, int batch) {
    const tf_backend *backend = model->backend;
    tf_pattention_cache *cache = &model->blocks[block].patt[which];
    int n = pattention_tokens(model, which), dim = model->config.dim, tokens = model->tokens;
    keys_and_eps norm = infer_keys(model, block, which);

    pattention_scores(model, block, which, norm.keys, in, batch * tokens);
    /* mean(S) per image into probs (a buffer of batch * tokens rows, n wide, so it fits), then one
     * row per image through the value tokens, added to the pool in the master dtype. */
    model_op_class(model, TF_OP_PATTENTION_NORM);
    backend->pattention_norm_pool(model->probs, cache->row_norm, cache->scores, batch, tokens, n,
                                  pattention_tau(model, block, which), norm.eps, norm.eps_scale);
    model_op_class(model, TF_OP_PATTENTION_GEMM);
    backend->matmul(pooled, model->probs, model_param(model, model->layout.values[block][which]),
                    &(tf_matmul_desc){.m = batch, .n = dim, .k = n, .accumulate = true, .master_output = true});
}

void pattention_backward(tf_model *model, int block, int which, void *d_in, bool accumulate, const void *d_out,
                         const void *in, int rows) {
    const tf_backend *backend = model->backend;
    const tf_param_layout *layout = &model->layout;
    const tf_pattention_cache *cache = &model->blocks[block].patt[which];
    int n = pattention_tokens(model, which), dim = model->config.dim;
    int keys = layout->keys[block][which], values = layout->values[block][which];
    void *d_scores = model->d_scores;

    model_op_class(model, TF_OP_PATTENTION_GEMM);
    backend->matmul(d_scores, d_out, model_param(model, values),
                    &(tf_matmul_desc){.m = rows, .n = n, .k = dim, .transpose_b = true});
    /* dA in place of dS, and S again (forward's, from the kept A and row norms) into probs. */
    model_op_class(model, TF_OP_PATTENTION_NORM);
    backend->pattention_norm_backward(d_scores, model->probs, d_scores, cache->scores, cache->row_norm, rows, n,
                                      pattention_tau(model, block, which));
    model_op_class(model, TF_OP_PATTENTION_GEMM);
    backend->matmul(model_grad(model, values), model->probs, d_out,
                    &(tf_matmul_desc){.m = n, .n = dim, .k = rows, .transpose_a = true, .accumulate = true,
                                      .master_output = true});
    backend->matmul(model_grad(model, keys), d_scores, in,
                    &(tf_matmul_desc){.m = n, .n = dim, .k = rows, .transpose_a = true, .accumulate = true,
                                      .master_output = true});
    backend->matmul(d_in, d_scores, model_param(model, keys),
                    &(tf_matmul_desc){.m = rows, .n = dim, .k = n, .accumulate = accumulate});
}
