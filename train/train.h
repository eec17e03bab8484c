/* The training loop: the MAE recipe (DESIGN.md section 3) over an ImageFolder tree, with periodic
 * evaluation, checkpoints every N steps and at each epoch end, exact resume, and a guard against
 * non-finite steps. train_run() is the whole of `tokenformer train` after argument parsing. */
#ifndef TF_TRAIN_TRAIN_H
#define TF_TRAIN_TRAIN_H

#include "common/config.h"
#include "common/error.h"

#include <stdbool.h>

typedef struct {
    char run_dir[TF_PATH_MAX];    /* where checkpoints, metrics and config.yaml go */
    bool resume;                  /* continue the run in run_dir from its latest checkpoint */
    char init_from[TF_PATH_MAX];  /* start from these weights (a grown model); "" = random init */
    char init_state[TF_PATH_MAX]; /* optimizer moments and EMA to start from; "" = fresh */
    int max_steps;                /* stop after this many optimizer steps (tests); 0 = the schedule's end */
} tf_train_options;

typedef enum {
    TF_TRAIN_FINISHED,    /* the schedule ran to its end */
    TF_TRAIN_INTERRUPTED, /* SIGINT/SIGTERM: a checkpoint was written after the current step */
    TF_TRAIN_STOPPED,     /* max_steps reached */
} tf_train_outcome;

tf_status train_run(const tf_config *config, const tf_train_options *options, tf_train_outcome *outcome);

#endif
