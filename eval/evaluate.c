/* Top-1/top-5 evaluation (see evaluate.h). Logits come back to the host per batch; ranking ten or
 * a thousand classes there costs nothing next to the forward pass. */
#include "eval/evaluate.h"

#include "common/timer.h"
#include "train/dist.h"
#include "train/mixup.h"

#include <stdlib.h>
#include <string.h>

tf_status eval_result_init(tf_eval_result *result, int classes) {
    memset(result, 0, sizeof *result);
    result->classes = classes;
    result->class_images = calloc((size_t)classes, sizeof *result->class_images);
    result->class_correct = calloc((size_t)classes, sizeof *result->class_correct);
    result->confusion = calloc((size_t)classes * classes, sizeof *result->confusion);
    if (!result->class_images || !result->class_correct || !result->confusion)
        return tf_fail(TF_ERR_RUNTIME, "out of memory for the evaluation tables of %d classes", classes);
    return TF_OK;
}

void eval_result_free(tf_eval_result *result) {
    free(result->class_images);
    free(result->class_correct);
    free(result->confusion);
    memset(result, 0, sizeof *result);
}

void eval_result_merge(tf_eval_result *result, const tf_eval_result *other) {
    result->images += other->images;
    result->top1_correct += other->top1_correct;
    result->top5_correct += other->top5_correct;
    result->loss_sum += other->loss_sum;
    for (int c = 0; c < result->classes; c++) {
        result->class_images[c] += other->class_images[c];
        result->class_correct[c] += other->class_correct[c];
    }
    for (size_t i = 0; i < (size_t)result->classes * result->classes; i++) result->confusion[i] += other->confusion[i];
    if (other->seconds > result->seconds) result->seconds = other->seconds;
    if (other->wait_seconds > result->wait_seconds) result->wait_seconds = other->wait_seconds;
}

tf_status eval_result_all_reduce(tf_eval_result *result, tf_dist *dist) {
    if (dist_world_size(dist) == 1) return TF_OK;
    size_t classes = (size_t)result->classes;
    int64_t totals[3] = {result->images, result->top1_correct, result->top5_correct};
    TF_TRY(dist_all_reduce_host_i64(dist, totals, 3, TF_DIST_SUM));
    TF_TRY(dist_all_reduce_host_i64(dist, result->class_images, classes, TF_DIST_SUM));
    TF_TRY(dist_all_reduce_host_i64(dist, result->class_correct, classes, TF_DIST_SUM));
    TF_TRY(dist_all_reduce_host_i64(dist, result->confusion, classes * classes, TF_DIST_SUM));
    TF_TRY(dist_all_reduce_host_f64(dist, &result->loss_sum, 1, TF_DIST_SUM));
    TF_TRY(dist_all_reduce_host_f64(dist, &result->seconds, 1, TF_DIST_MAX));
    TF_TRY(dist_all_reduce_host_f64(dist, &result->wait_seconds, 1, TF_DIST_MAX));
    result->images = totals[0];
    result->top1_correct = totals[1];
    result->top5_correct = totals[2];
    return TF_OK;
}

/* Rank of the true class: how many classes score strictly higher (ties count for the label, as
 * a stable top-k would list the lower index first only when it is higher or equal). */
static int rank_of_label(const float *logits, int classes, int label, int *prediction) {
    int higher = 0, best = 0;
    for (int c = 0; c < classes; c++) {
        if (logits[c] > logits[label]) higher++;
        if (logits[c] > logits[best]) best = c;
    }
    *prediction = best;
    return higher;
}

void eval_count_batch(tf_eval_result *result, const float *logits, const int32_t *labels, int batch) {
    int classes = result->classes;
    for (int b = 0; b < batch; b++) {
        int label = labels[b], prediction;
        int rank = rank_of_label(logits + (size_t)b * classes, classes, label, &prediction);
        result->images++;
        result->class_images[label]++;
        result->confusion[(size_t)label * classes + prediction]++;
        if (prediction == label) {
            result->top1_correct++;
            result->class_correct[label]++;
        }
        if (rank < 5) result->top5_correct++;
    }
}

/* The loader's next batch (NULL at the end of the split), its pixels queued for upload. */
static tf_status load_next_batch(tf_model *model, tf_loader *loader, tf_batch **batch) {
    TF_TRY(loader_next_batch(loader, batch));
    if (!*batch) return TF_OK;
    if ((*batch)->count > model->max_batch) {
        int count = (*batch)->count;
        loader_release_batch(loader, *batch);
        *batch = NULL;
        return tf_fail(TF_ERR_RUNTIME, "evaluation batch of %d exceeds the model's %d", count, model->max_batch);
    }
    model_load_pixels(model, (*batch)->images, (*batch)->count);
    return TF_OK;
}

/* The rows a batch of `count` images runs at: its count, or on a backend that plans per shape
 * the size of the largest batch run before (the split's last, smaller batch), so that one batch
 * does not cost a new round of planning (~0.2 s at B/16 on the H100, the time of three batches).
 * The rows past the count hold earlier images or zeros, finite, and no result of theirs is read:
 * the model computes each image on its own (no batch statistics). */
static int forward_rows(const tf_model *model, int count, int largest_before) {
    return model->backend->plans_per_shape && largest_before > count ? largest_before : count;
}

/* Pipelined by one batch: while the GPU runs a batch's forward pass, the host waits for the
 * next batch and queues its upload, which crosses PCIe beside that work; only then are the
 * logits read. A batch goes back to the loader once its results are read (its upload done). */
tf_status evaluate(tf_model *model, tf_loader *loader, tf_eval_result *result) {
    int classes = model->config.classes, max_batch = model->max_batch;
    float *logits = malloc((size_t)max_batch * classes * sizeof *logits);
    float *targets = malloc((size_t)max_batch * classes * sizeof *targets);
    float *losses = malloc((size_t)max_batch * sizeof *losses);
    tf_status status = TF_OK;
    if (!logits || !targets || !losses) status = tf_fail(TF_ERR_RUNTIME, "out of memory for evaluation buffers");
    double start = tf_seconds(), wait_at_start = loader_stats(loader).wait_seconds;
    tf_batch *batch = NULL, *next = NULL;
    int rows = 0;
    if (status == TF_OK) status = loader_start_epoch(loader, 0, 0);
    if (status == TF_OK) status = load_next_batch(model, loader, &batch);
    while (status == TF_OK && batch) {
        rows = forward_rows(model, batch->count, rows);
        model_infer(model, rows);
        status = load_next_batch(model, loader, &next);
        mixup_targets(batch->labels, batch->count, classes, 0.0f, 1.0f, targets);
        if (status == TF_OK) status = model_loss(model, targets, batch->count, losses);
        if (status == TF_OK) status = model_logits(model, logits, batch->count);
        if (status == TF_OK) {
            eval_count_batch(result, logits, batch->labels, batch->count);
            for (int b = 0; b < batch->count; b++) result->loss_sum += losses[b];
        } else {
            model->backend->synchronize(); /* no result was read: its upload may still read the batch */
        }
        loader_release_batch(loader, batch);
        batch = next;
        next = NULL;
    }
    /* Left after a failure: the batch taken ahead, whose upload the synchronize above waited for. */
    loader_release_batch(loader, batch);
    result->seconds += tf_seconds() - start;
    result->wait_seconds += loader_stats(loader).wait_seconds - wait_at_start;
    free(logits);
    free(targets);
    free(losses);
    return status;
}
