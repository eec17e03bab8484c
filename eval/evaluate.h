/* Evaluation of a model over a data split: top-1 and top-5 accuracy, the mean cross-entropy
 * against the true labels, per-class accuracy and the confusion matrix. Used by the trainer's
 * periodic evaluation and by `tokenformer eval`, so both report the same numbers. */
#ifndef TF_EVAL_EVALUATE_H
#define TF_EVAL_EVALUATE_H

#include "dataloader/loader.h"
#include "vision/model.h"

#include <stdint.h>

typedef struct {
    int classes;
    int64_t images;
    int64_t top1_correct, top5_correct;
    double loss_sum;
    int64_t *class_images;  /* [classes] */
    int64_t *class_correct; /* [classes] top-1 */
    int64_t *confusion;     /* [classes, classes]: row = true class, column = prediction */
    double seconds;
    double wait_seconds; /* of seconds, blocked in the loader (the GPU idle unless work was queued) */
} tf_eval_result;

tf_status eval_result_init(tf_eval_result *result, int classes);
void eval_result_free(tf_eval_result *result);
/* Adds the counts of other into result. */
void eval_result_merge(tf_eval_result *result, const tf_eval_result *other);

/* Sums the counts of every rank's result (each evaluated its share of the split), so that every
 * rank holds the totals; nothing to do with one rank. */
typedef struct tf_dist tf_dist;
tf_status eval_result_all_reduce(tf_eval_result *result, tf_dist *dist);

/* Runs the loader's whole epoch `epoch` (an eval loader: every image once) through the model
 * without drop path, and accumulates into result (which eval_result_init() prepared). */
tf_status evaluate(tf_model *model, tf_loader *loader, tf_eval_result *result);

/* Counts one batch of logits [batch, classes] with true labels into result. */
void eval_count_batch(tf_eval_result *result, const float *logits, const int32_t *labels, int batch);

static inline double eval_top1(const tf_eval_result *result) {
    return result->images ? 100.0 * (double)result->top1_correct / (double)result->images : 0.0;
}
static inline double eval_top5(const tf_eval_result *result) {
    return result->images ? 100.0 * (double)result->top5_correct / (double)result->images : 0.0;
}
/* The share of the time spent waiting for the loader, in %: near 0 when the GPU sets the pace. */
static inline double eval_data_wait(const tf_eval_result *result) {
    return result->seconds > 0 ? 100.0 * result->wait_seconds / result->seconds : 0.0;
}
static inline double eval_loss(const tf_eval_result *result) {
    return result->images ? result->loss_sum / (double)result->images : 0.0;
}

#endif
