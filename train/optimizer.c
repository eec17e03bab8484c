/* AdamW + EMA + clipping (see optimizer.h). The update itself is one backend operation over all
 * parameter groups; this file decides its inputs. */
#include "train/optimizer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

tf_status optimizer_create(tf_optimizer *optimizer, const tf_model *model, const tf_optimizer_config *config) {
    const tf_backend *backend = model->backend;
    size_t bytes = model->layout.total * tf_dtype_size(backend->master_dtype);
    memset(optimizer, 0, sizeof *optimizer);
    optimizer->config = *config;
    TF_TRY(backend->alloc(&optimizer->m, bytes, "AdamW first moments"));
    TF_TRY(backend->alloc(&optimizer->v, bytes, "AdamW second moments"));
    if (config->ema_decay > 0.0f) {
        TF_TRY(backend->alloc(&optimizer->ema, bytes, "EMA weights"));
        optimizer_reset_ema(optimizer, model);
    }
    optimizer->groups = calloc((size_t)model->layout.count, sizeof *optimizer->groups);
    if (!optimizer->groups) return tf_fail(TF_ERR_RUNTIME, "out of memory for optimizer groups");
    optimizer->group_count = param_adamw_groups(&model->layout, &model->config, config->weight_decay,
                                                config->layer_decay, optimizer->groups);
    return TF_OK;
}

void optimizer_destroy(tf_optimizer *optimizer, const tf_backend *backend) {
    backend->free(optimizer->m);
    backend->free(optimizer->v);
    if (optimizer->ema) backend->free(optimizer->ema);
    free(optimizer->groups);
    memset(optimizer, 0, sizeof *optimizer);
}

void optimizer_reset_ema(tf_optimizer *optimizer, const tf_model *model) {
    if (optimizer->ema)
        model->backend->copy(optimizer->ema, model->params,
                             model->layout.total * tf_dtype_size(model->backend->master_dtype));
}

tf_status optimizer_step(tf_optimizer *optimizer, tf_model *model, double lr, float grad_scale,
                         tf_step_result *result) {
    const tf_backend *backend = model->backend;
    const tf_optimizer_config *config = &optimizer->config;
    double norm = sqrt(backend->sum_squares(model->grads, model->layout.total)) * grad_scale;
    TF_TRY(backend->synchronize());
    result->grad_norm = norm;
    result->skipped = !isfinite(norm);
    if (result->skipped) return TF_OK;

    float scale = grad_scale;
    if (config->clip_grad > 0.0f && norm > config->clip_grad) scale *= (float)(config->clip_grad / (norm + 1e-6));
    optimizer->step++;
    tf_adamw_hyper hyper = {
        .lr = (float)lr,
        .beta1 = config->beta1,
        .beta2 = config->beta2,
        .eps = config->eps,
        .grad_scale = scale,
        .step = (int)optimizer->step,
    };
    void *compute = model->params_compute != model->params ? model->params_compute : NULL;
    backend->adamw_update(model->params, compute, model->grads, optimizer->m, optimizer->v, optimizer->groups,
                          optimizer->group_count, &hyper);
    model_params_changed(model);
    if (optimizer->ema) backend->ema_update(optimizer->ema, model->params, model->layout.total, config->ema_decay);
    return backend->synchronize();
}
