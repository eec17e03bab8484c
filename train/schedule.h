/* The learning-rate schedule of MAE's recipe, per iteration: linear warmup from 0, then a cosine
 * from the peak to min_lr (MAE's util/lr_sched.py adjust_learning_rate). */
#ifndef TF_TRAIN_SCHEDULE_H
#define TF_TRAIN_SCHEDULE_H

#include "common/config.h"

#include <stdint.h>

/* The learning rate of optimizer step `step` (0-based) with steps_per_epoch steps an epoch: the
 * fractional epoch e = step / steps_per_epoch; e < warmup: peak e / warmup; after:
 * min + (peak - min) (1 + cos(pi (e - warmup) / (epochs - warmup))) / 2. */
double schedule_learning_rate(const tf_config *config, int64_t step, int64_t steps_per_epoch);

#endif
