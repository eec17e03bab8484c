/* A training run's directory and its checkpoints, made so that no kill loses more than the steps
 * since the last checkpoint:
 *
 *   RUN/config.yaml                  the resolved config of the run
 *   RUN/metrics.jsonl                one JSON record per log interval and per evaluation
 *   RUN/checkpoint-00001234/         model.safetensors + state.safetensors of optimizer step 1234
 *   RUN/latest -> checkpoint-00001234
 *   RUN/model.safetensors -> latest/model.safetensors
 *   RUN/state.safetensors -> latest/state.safetensors
 *
 * A checkpoint directory is written completely under a temporary name and renamed into place,
 * then `latest` is switched by renaming a new symlink over it, so `latest` always names a complete
 * pair. The state file holds the AdamW moments ("adamw.m.<name>", "adamw.v.<name>"), the EMA
 * ("ema.<name>") and the training progress (metadata "progress"). */
#ifndef TF_TRAIN_RUN_DIR_H
#define TF_TRAIN_RUN_DIR_H

#include "common/config.h"
#include "train/optimizer.h"
#include "vision/checkpoint.h"
#include "vision/model.h"

#include <stdint.h>
#include <stdio.h>

/* Where a run stands: enough, with the model and optimizer, to continue it exactly. */
typedef struct {
    int64_t step;           /* optimizer steps taken (skipped non-finite steps included) */
    int epoch;              /* the epoch the next step belongs to */
    int64_t epoch_batches;  /* loader batches of that epoch already consumed on each rank */
    uint64_t seed;
    int64_t skipped_steps;  /* non-finite steps skipped so far */
} tf_train_progress;

/* Creates RUN if needed and writes RUN/config.yaml. */
tf_status run_dir_prepare(const char *run_dir, const tf_config *config);

/* Saves model, optimizer state and progress as checkpoint-<step>, points `latest` at it, and
 * removes older checkpoint directories beyond the newest keep. The model file's metadata also
 * records the step, the epoch and the eval crop_pct of the run (for `tokenformer eval`). */
tf_status run_dir_save_checkpoint(const char *run_dir, const tf_model *model, const tf_optimizer *optimizer,
                                  const tf_train_progress *progress, const tf_class_names *classes,
                                  const char *growth_history, float crop_pct, int keep);

/* The path of RUN/latest/<file> when RUN has a checkpoint; an error naming RUN otherwise. */
tf_status run_dir_latest(const char *run_dir, const char *file, char *path, size_t path_size);

/* Writes a training state file (the moments and EMA are host fp32 [layout.total]; ema may be NULL;
 * optimizer_step counts the AdamW updates applied, for the bias corrections). */
tf_status train_state_save(const char *path, const tf_param_layout *layout, const float *m, const float *v,
                           const float *ema, int64_t optimizer_step, const tf_train_progress *progress);

/* Loads a training state file into the optimizer (moments, EMA when both have one, step) and
 * progress (may be NULL). The tensors must match the model's layout. */
tf_status train_state_load(const char *path, const tf_model *model, tf_optimizer *optimizer,
                           tf_train_progress *progress);

/* Opens RUN/metrics.jsonl for appending; when resuming at `step`, first drops records of later
 * steps (written after the checkpoint the run resumes from). */
tf_status run_dir_open_metrics(const char *run_dir, int64_t resume_step, FILE **metrics);

#endif
