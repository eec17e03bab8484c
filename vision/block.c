/* One pre-norm encoder block (DESIGN.md section 2), five Pattentions and softmax attention:
 *
 *   y = LN(x);  q, k, v = P_q(y), P_k(y), P_v(y)
 *   x' = x + DropPath(P_o(MHSA(q, k, v)))
 *   x'' = x' + DropPath(P_ffn(LN(x')))
 *
 * LayerNorms are non-parametric. Each residual add is fused with the LayerNorm that follows it:
 * the first add with LN(x'), the second with the next block's first LN, so LN(x) of block 0 is the
 * only standalone one. The residual stream x is one fp32 buffer updated in place (kernels.h says
 * why fp32); backward needs only the LayerNorms' outputs. Drop path multiplies a branch per sample
 * by 0 or 1/keep (model_drop_scales). */
#include "vision/layers.h"

#include <stddef.h>

/* The drop-path scales of one branch of one block, or NULL when not dropping. */
static const void *branch_scales(const tf_model *model, const void *drop_scales, int block, int branch, int batch) {
    if (!drop_scales) return NULL;
    size_t offset = ((size_t)block * 2 + (size_t)branch) * (size_t)batch;
    return (const char *)drop_scales + offset * tf_dtype_size(model->backend->master_dtype);
}

void block_forward(tf_model *model, int block, int batch, const void *drop_scales) {
    const tf_backend *backend = model->backend;
    const tf_model_config *config = &model->config;
    tf_block_cache *cache = &model->blocks[block];
    int tokens = model->tokens, rows = batch * tokens, dim = config->dim;

    model_op_class(model, TF_OP_LAYERNORM);
    if (block == 0)
        backend->layernorm_forward(cache->ln1, NULL, cache->ln1_rstd, model->residual, NULL, NULL, rows, dim,
                                   TF_LAYERNORM_EPS);
    pattention_forward(model, block, TF_PATT_Q, cache->q, cache->ln1, rows);
    pattention_forward(model, block, TF_PATT_K, cache->k, cache->ln1, rows);
    pattention_forward(model, block, TF_PATT_V, cache->v, cache->ln1, rows);
    model_op_class(model, TF_OP_ATTENTION);
    backend->attention_forward(cache->attention, cache->attention_lse, cache->q, cache->k, cache->v, batch, tokens,
                               config->heads, dim / config->heads);
    pattention_forward(model, block, TF_PATT_O, model->branch, cache->attention, rows);
    model_op_class(model, TF_OP_LAYERNORM);
    backend->residual_layernorm_forward(model->residual, cache->ln2, cache->ln2_rstd, model->residual, model->branch,
                                        branch_scales(model, drop_scales, block, 0, batch), rows, dim, tokens,
                                        TF_LAYERNORM_EPS);

    pattention_forward(model, block, TF_PATT_FFN, model->branch, cache->ln2, rows);
    const void *ffn_scales = branch_scales(model, drop_scales, block, 1, batch);
    model_op_class(model, TF_OP_LAYERNORM);
    if (block + 1 < config->depth) {
        tf_block_cache *next = &model->blocks[block + 1];
        backend->residual_layernorm_forward(model->residual, next->ln1, next->ln1_rstd, model->residual,
                                            model->branch, ffn_scales, rows, dim, tokens, TF_LAYERNORM_EPS);
    } else {
        backend->residual_forward(model->residual, model->residual, model->branch, ffn_scales, rows, dim, tokens);
    }
}

/* The inference form. A non-parametric LayerNorm is y = (x - mean(x)) / sigma(x), and a
 * Pattention reads y only through A = y K^T and the row normalisation A tau / sqrt(|A|^2 + eps):
 *   (x - mean(x)) K^T = x Kc^T with Kc = K minus each key token's own mean (centred once per
 *   forward), and with A' = x Kc^T = sigma A the normalisation is A' tau / sqrt(|A'|^2 + eps
 *   sigma^2): the LayerNorm's 1 / sigma cancels but for eps, which the norm pass scales per row.
 * So Q, K, V and the FFN read the residual stream itself with centred keys, a pass that only
 * reads the stream gives sigma^2 per row, and P_o's and the FFN's value GEMMs add their outputs to
 * the stream (beta = 1): instead of 2 x depth LayerNorm passes that read and write the stream
 * (12 bytes an element with the fp32 stream), 2 x depth that read it (2 bytes in bf16). The
 * stream is a compute buffer here (bf16 on CUDA), as a GEMM operand must be; in training it is
 * fp32 for the gradients' sake (kernels.h), which inference has none of. Without the eps scaling
 * the logits moved by up to 1e-4 relative (a fresh small model, whose stream has sigma ~ 0.1).
 * Where a block's FFN keys prove eps var(x) below the row norms' precision (variance_proof.c:
 * B/16's, which are 3072 x 768), the pass before the FFN is skipped; where its Q, K and V keys
 * stacked bound var(x) by their row norms, so is the pass before them (pattention_infer_qkv, which
 * reads x again on the rows the bound does not cover): all 24 of B/16's at initialisation.
 * Here the attention branch, up to the stream's variance for the FFN's folded LayerNorm; the FFN
 * in block_infer and block_infer_pooled. */
static void attention_branch_infer(tf_model *model, int block, int batch) {
    const tf_backend *backend = model->backend;
    const tf_model_config *config = &model->config;
    tf_block_cache *cache = &model->blocks[block];
    int tokens = model->tokens, rows = batch * tokens, dim = config->dim;
    void *x = model->stream;

    if (qkv_variance_skipped(model, block)) {
        pattention_infer_qkv(model, block, x, rows); /* their keys bound var(x) */
    } else {
        model_op_class(model, TF_OP_LAYERNORM);
        backend->layernorm_variance(model->stream_variance, x, rows, dim, TF_LAYERNORM_EPS);
        pattention_infer(model, block, TF_PATT_Q, cache->q, false, x, rows);
        pattention_infer(model, block, TF_PATT_K, cache->k, false, x, rows);
        pattention_infer(model, block, TF_PATT_V, cache->v, false, x, rows);
    }
    model_op_class(model, TF_OP_ATTENTION);
    backend->attention_forward(cache->attention, cache->attention_lse, cache->q, cache->k, cache->v, batch, tokens,
                               config->heads, dim / config->heads);
    pattention_infer(model, block, TF_PATT_O, x, true, cache->attention, rows);
    if (ffn_variance_skipped(model, block)) return; /* its keys prove eps var(x) invisible */
    model_op_class(model, TF_OP_LAYERNORM);
    backend->layernorm_variance(model->stream_variance, x, rows, dim, TF_LAYERNORM_EPS);
}

void block_infer(tf_model *model, int block, int batch) {
    void *x = model->stream;
    attention_branch_infer(model, block, batch);
    /* Reads x with its first GEMM and adds to it with its last, in queue order. */
    pattention_infer(model, block, TF_PATT_FFN, x, true, x, batch * model->tokens);
}

/* The head averages the last block's output x'' = x' + P_ffn(LN(x')) over the patch tokens, and
 * P_ffn's last step is linear: mean(x'') = mean(x') + mean(S) V. So the FFN's norm pass writes
 * mean(S), one row per image, instead of S, and its value GEMM multiplies that row instead of 197
 * (B/16: a 100864 x 768 x 3072 GEMM and the write and read of S, 1.2 GB, become a pass that only
 * reads A and a GEMM of batch rows). Exact up to rounding: S and the sum are not rounded to bf16
 * per token on the way. */
void block_infer_pooled(tf_model *model, int block, int batch) {
    const tf_model_config *config = &model->config;
    void *x = model->stream;
    attention_branch_infer(model, block, batch);
    model_op_class(model, TF_OP_OTHER);
    model->backend->token_pool_forward(model->pooled, x, model->backend->compute_dtype, batch, model->tokens,
                                       config->dim, TF_POOL_AVG);
    pattention_infer_pooled(model, block, TF_PATT_FFN, model->pooled, x, batch);
}

/* d loss / d branch output: the residual gradient scaled per sample, or the residual gradient
 * itself when nothing is dropped. */
static const void *branch_gradient(tf_model *model, const void *scales, int rows) {
    if (!scales) return model->d_residual;
    model_op_class(model, TF_OP_OTHER);
    model->backend->residual_backward(model->d_branch, model->d_residual, scales, rows, model->config.dim,
                                      model->tokens);
    return model->d_branch;
}

void block_backward(tf_model *model, int block, int batch, const void *drop_scales) {
    const tf_backend *backend = model->backend;
    const tf_model_config *config = &model->config;
    tf_block_cache *cache = &model->blocks[block];
    int tokens = model->tokens, rows = batch * tokens, dim = config->dim;

    /* FFN branch: x'' = x' + s * P_ffn(LN(x')). */
    const void *d_ffn = branch_gradient(model, branch_scales(model, drop_scales, block, 1, batch), rows);
    pattention_backward(model, block, TF_PATT_FFN, model->d_ln, false, d_ffn, cache->ln2, rows);
    model_op_class(model, TF_OP_LAYERNORM);
    backend->layernorm_backward(model->d_residual, NULL, NULL, model->d_ln, cache->ln2, cache->ln2_rstd, NULL, rows,
                                dim);

    /* Attention branch: x' = x + s * P_o(MHSA(P_q(y), P_k(y), P_v(y))), y = LN(x). */
    const void *d_out = branch_gradient(model, branch_scales(model, drop_scales, block, 0, batch), rows);
    pattention_backward(model, block, TF_PATT_O, model->d_attention, false, d_out, cache->attention, rows);
    model_op_class(model, TF_OP_ATTENTION);
    backend->attention_backward(model->d_q, model->d_k, model->d_v, model->d_attention, cache->q, cache->k, cache->v,
                                cache->attention, cache->attention_lse, batch, tokens, config->heads,
                                dim / config->heads);
    pattention_backward(model, block, TF_PATT_Q, model->d_ln, false, model->d_q, cache->ln1, rows);
    pattention_backward(model, block, TF_PATT_K, model->d_ln, true, model->d_k, cache->ln1, rows);
    pattention_backward(model, block, TF_PATT_V, model->d_ln, true, model->d_v, cache->ln1, rows);
    model_op_class(model, TF_OP_LAYERNORM);
    backend->layernorm_backward(model->d_residual, NULL, NULL, model->d_ln, cache->ln1, cache->ln1_rstd, NULL, rows,
                                dim);
}
