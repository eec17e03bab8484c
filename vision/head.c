/* The classification head: pool the final tokens (mean of the patch tokens, or the cls token),
 * a parametric LayerNorm (timm's fc_norm), and a linear layer with bias to the class logits,
 * which are kept in the master dtype (fp32). */
#include "vision/layers.h"

void head_forward(tf_model *model, int batch, const void *x, tf_dtype x_dtype) {
    const tf_model_config *config = &model->config;
    model_op_class(model, TF_OP_OTHER);
    model->backend->token_pool_forward(model->pooled, x, x_dtype, batch, model->tokens, config->dim, config->pool);
    head_logits(model, batch);
}

void head_logits(tf_model *model, int batch) {
    const tf_backend *backend = model->backend;
    const tf_model_config *config = &model->config;
    const tf_param_layout *layout = &model->layout;
    model_op_class(model, TF_OP_OTHER);
    /* fc_norm's backward reads its normalised input (xhat), which the parametric output is not. */
    backend->layernorm_forward(model->head_ln, model->training ? model->head_xhat : NULL, model->head_ln_rstd,
                               model->pooled, model_param(model, layout->fc_norm_weight),
                               model_param(model, layout->fc_norm_bias), batch, config->dim, TF_LAYERNORM_EPS);
    /* fp32 logits, so the loss and its gradient see them unrounded; the bias then is the master one. */
    backend->matmul(model->logits, model->head_ln, model_param(model, layout->head_weight),
                    &(tf_matmul_desc){.m = batch, .n = config->classes, .k = config->dim, .transpose_b = true,
                                      .master_output = true, .bias = model_master_param(model, layout->head_bias)});
}

void head_backward(tf_model *model, int batch) {
    const tf_backend *backend = model->backend;
    const tf_model_config *config = &model->config;
    const tf_param_layout *layout = &model->layout;
    model_op_class(model, TF_OP_OTHER);
    int dim = config->dim, classes = config->classes;

    backend->matmul(model_grad(model, layout->head_weight), model->d_logits, model->head_ln,
                    &(tf_matmul_desc){.m = classes, .n = dim, .k = batch, .transpose_a = true, .accumulate = true,
                                      .master_output = true});
    backend->bias_backward(model_grad(model, layout->head_bias), model->d_logits, batch, classes);
    backend->matmul(model->d_head_ln, model->d_logits, model_param(model, layout->head_weight),
                    &(tf_matmul_desc){.m = batch, .n = dim, .k = classes});
    /* layernorm_backward adds into its dx, and d_pooled has no other contribution. */
    backend->zero(model->d_pooled, (size_t)batch * dim * tf_dtype_size(backend->compute_dtype));
    backend->layernorm_backward(model->d_pooled, model_grad(model, layout->fc_norm_weight),
                                model_grad(model, layout->fc_norm_bias), model->d_head_ln, model->head_xhat,
                                model->head_ln_rstd, model_param(model, layout->fc_norm_weight), batch, dim);
    backend->token_pool_backward(model->d_residual, model->d_pooled, batch, model->tokens, dim, config->pool);
}
