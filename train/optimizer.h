/* AdamW over the model's flat parameter buffer, with the EMA of the weights, optional global
 * gradient-norm clipping and a guard against non-finite gradients. The state (moments, EMA, step)
 * lives in backend memory beside the model and is saved with training checkpoints. */
#ifndef TF_TRAIN_OPTIMIZER_H
#define TF_TRAIN_OPTIMIZER_H

#include "common/config.h"
#include "vision/model.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    tf_optimizer_config config;
    void *m, *v;  /* master [layout.total] */
    void *ema;    /* master [layout.total], or NULL when ema_decay is 0 */
    tf_adamw_group *groups;
    int group_count;
    int64_t step; /* updates applied so far */
} tf_optimizer;

/* What one optimizer_step() did. */
typedef struct {
    double grad_norm; /* of the gradient as applied (after grad_scale, before clipping) */
    bool skipped;     /* the gradient was not finite: nothing was updated */
} tf_step_result;

tf_status optimizer_create(tf_optimizer *optimizer, const tf_model *model, const tf_optimizer_config *config);
void optimizer_destroy(tf_optimizer *optimizer, const tf_backend *backend);

/* Starts the EMA from the model's current weights. */
void optimizer_reset_ema(tf_optimizer *optimizer, const tf_model *model);

/* One AdamW update with learning rate lr from the model's gradients times grad_scale, then the
 * EMA update and the compute copy refresh. A non-finite gradient norm skips the update. */
tf_status optimizer_step(tf_optimizer *optimizer, tf_model *model, double lr, float grad_scale,
                         tf_step_result *result);

#endif
