/* Patch embedding, cls token and position embedding (ViT's, as timm and MAE have it):
 * a p x p stride-p convolution with bias, done as im2col + GEMM; patches in row-major order; the
 * cls token in front; a learned position embedding added to all 1 + patches tokens. */
#include "vision/layers.h"

void embed_forward(tf_model *model, int batch, void *x, tf_dtype x_dtype) {
    const tf_backend *backend = model->backend;
    const tf_model_config *config = &model->config;
    const tf_param_layout *layout = &model->layout;
    model_op_class(model, TF_OP_OTHER);
    int patch_size = config->channels * config->patch * config->patch;

    backend->patch_im2col(model->patch_rows, model->images, batch, config->channels, config->img_size,
                          config->patch);
    backend->matmul(model->patch_tokens, model->patch_rows, model_param(model, layout->patch_weight),
                    &(tf_matmul_desc){.m = batch * model->patches, .n = config->dim, .k = patch_size,
                                      .transpose_b = true, .bias = model_param(model, layout->patch_bias)});
    backend->tokens_forward(x, x_dtype, model->patch_tokens, model_param(model, layout->cls_token),
                            model_param(model, layout->pos_embed), batch, model->patches, config->dim);
}

void embed_backward(tf_model *model, int batch) {
    const tf_backend *backend = model->backend;
    const tf_model_config *config = &model->config;
    const tf_param_layout *layout = &model->layout;
    model_op_class(model, TF_OP_OTHER);
    int patch_size = config->channels * config->patch * config->patch;
    int rows = batch * model->patches;

    backend->tokens_backward(model->d_patch_tokens, model_grad(model, layout->cls_token),
                             model_grad(model, layout->pos_embed), model->d_residual, batch, model->patches,
                             config->dim);
    backend->matmul(model_grad(model, layout->patch_weight), model->d_patch_tokens, model->patch_rows,
                    &(tf_matmul_desc){.m = config->dim, .n = patch_size, .k = rows, .transpose_a = true,
                                      .accumulate = true, .master_output = true});
    backend->bias_backward(model_grad(model, layout->patch_bias), model->d_patch_tokens, rows, config->dim);
}
