/* The layers of the model, each with its forward and backward side by side in its own file:
 * embed.c (patch embedding, cls token, position embedding), pattention.c (token-parameter
 * attention), block.c (one encoder block), head.c (pool, fc_norm, linear head, loss). They work on
 * the buffers of a tf_model (model.h) through its backend; model.c strings them together. */
#ifndef TF_VISION_LAYERS_H
#define TF_VISION_LAYERS_H

#include "vision/model.h"

#include <stdbool.h>

/* Marks the start of work of another class when profiling (see tf_op_profile). */
static inline void model_op_class(tf_model *model, tf_op_class op) {
    tf_op_profile *profile = model->profile;
    if (!profile || profile->marks >= TF_PROFILE_MARKS) return;
    if (profile->marks > 0 && profile->mark_class[profile->marks - 1] == op) return;
    model->backend->profile_mark(profile->marks);
    profile->mark_class[profile->marks++] = op;
}

/* The compute copy of parameter tensor `tensor`, its master copy, and its gradient (master). */
const void *model_param(const tf_model *model, int tensor);
const void *model_master_param(const tf_model *model, int tensor);
void *model_grad(const tf_model *model, int tensor);

/* images -> x, the tokens: model->residual (master) in training's form, model->stream (compute) in
 * inference's. */
void embed_forward(tf_model *model, int batch, void *x, tf_dtype x_dtype);
/* Reads model->d_residual (d loss / d tokens). */
void embed_backward(tf_model *model, int batch);

/* out = Pattention `which` of block `block` applied to in [rows, dim]; keeps its cache. */
void pattention_forward(tf_model *model, int block, int which, void *out, const void *in, int rows);
/* The inference form's (block_infer): where the model has centred key tokens for it
 * (model->centered_keys), `in` is the residual stream itself rather than its LayerNorm, and
 * model->stream_variance holds the LayerNorm's sigma^2 per row (unless its keys make it unneeded:
 * ffn_variance_skipped); out += the result with accumulate. */
void pattention_infer(tf_model *model, int block, int which, void *out, bool accumulate, const void *in, int rows);
/* pattention_infer whose result only reaches the logits through its mean over each image's patch
 * tokens: pooled [batch, dim] (master) += that mean, with in [batch * tokens, dim]
 * (block_infer_pooled says why this is cheaper). */
void pattention_infer_pooled(tf_model *model, int block, int which, void *pooled, const void *in, int batch);
/* Q, K and V of block `block` in the inference form where their keys bound var(x)
 * (qkv_variance_skipped): the block cache's q, k and v from the stream x, with no variance pass. */
void pattention_infer_qkv(tf_model *model, int block, const void *x, int rows);
/* From d_out, adds the key and value gradients, and writes (or adds, with accumulate) d_in. */
void pattention_backward(tf_model *model, int block, int which, void *d_in, bool accumulate, const void *d_out,
                         const void *in, int rows);

/* vision/variance_proof.c: whether centred keys (backend compute [n, dim]) prove eps var(x) below
 * half a unit in the last place of a row norm summed with precision_bits bits, for every row x
 * whose mean is within *mean_ratio standard deviations; and that proof for every FFN of the model
 * and every Q, K, V stacked, found again when the parameters have changed (model_infer). */
bool variance_proof_keys(const tf_backend *backend, const void *centered, int n, int dim, float eps,
                         int precision_bits, double *mean_ratio);
void variance_proof_update(tf_model *model);
/* The inference form skips the variance pass of the LayerNorm folded into block `block`'s FFN. */
static inline bool ffn_variance_skipped(const tf_model *model, int block) {
    return model->ffn_variance_invisible[block] && !model->read_every_variance;
}
/* ... and of the one folded into its Q, K and V (pattention_infer_qkv). */
static inline bool qkv_variance_skipped(const tf_model *model, int block) {
    return model->qkv_variance_bounded[block] && !model->read_every_variance;
}
/* The least share of their summed squared row norms that each of Q, K and V must have on a row for
 * the bound to hold there (variance_proof.c says why a quarter). */
#define TF_QKV_NORM_SHARE 0.25f

/* Block `block`: model->residual (its input) becomes its output, in place; it also writes the
 * next block's LN(x) (or, for the last block, nothing more). drop_scales: the master buffer
 * [depth, 2, batch], or NULL. */
void block_forward(tf_model *model, int block, int batch, const void *drop_scales);
/* The same block without drop path in its inference form, on model->stream (model_infer). */
void block_infer(tf_model *model, int block, int batch);
/* The last block in inference when the head averages the patch tokens (TF_POOL_AVG): instead of
 * the stream, it writes the head's input, model->pooled, the average of its output over each
 * image's patch tokens. */
void block_infer_pooled(tf_model *model, int block, int batch);
/* model->d_residual: d loss / d the block's output on entry, d loss / d its input on return. */
void block_backward(tf_model *model, int block, int batch, const void *drop_scales);

/* x (the last block's output: model->residual or model->stream, as embed_forward's) -> logits. */
void head_forward(tf_model *model, int batch, const void *x, tf_dtype x_dtype);
/* The head after its pool: model->pooled -> logits (head_forward's second half). */
void head_logits(tf_model *model, int batch);
/* d_logits -> d_residual (overwritten) and the head's gradients. */
void head_backward(tf_model *model, int batch);

#endif
