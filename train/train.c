/* The training loop (see train.h). One optimizer step:
 *
 *   zero gradients
 *   for each micro-batch of the step:
 *       batch = loader_next_batch(); model_load_pixels()  uint8 images, labels -> normalised (done
 *                                                    already when the previous micro-batch took it)
 *       mix = mixup_draw(); targets = smoothed, mixed one-hot; mixup_images()
 *       model_forward(drop-path scales)              logits
 *       the next micro-batch of the epoch: loader_next_batch(); model_load_pixels()
 *       model_backward(targets, 1 / global batch)    loss, gradients +=
 *   optimizer_step(lr from the schedule)             AdamW, EMA; non-finite steps are skipped
 *
 * Every random draw comes from a generator named by (seed, step, micro-batch) or (seed, epoch,
 * sample), so a run resumed from a checkpoint repeats exactly what the uninterrupted run did.
 *
 * Data parallel (train/dist.h): one process per GPU, each with its share of every batch; the
 * gradients are summed over the ranks before the update (the loss is already scaled by 1 / global
 * batch): during the backward pass of a step's last micro-batch, each layer's gradients go into an
 * all-reduce as soon as they are final, overlapping the backward of the layers below. The ranks
 * also agree on the loss and on stopping, so that they take the same decisions.
 * Rank 0 alone writes checkpoints, metrics and log lines. */
#include "train/train.h"

#include "common/log.h"
#include "common/path.h"
#include "common/timer.h"
#include "dataloader/loader.h"
#include "eval/evaluate.h"
#include "train/dist.h"
#include "train/mixup.h"
#include "train/optimizer.h"
#include "train/run_dir.h"
#include "train/schedule.h"
#include "vision/checkpoint.h"
#include "vision/model.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    tf_config config;
    tf_train_options options;
    tf_dist *dist;        /* the process group (world size 1 without a launcher) */
    bool stop_requested;  /* some rank got SIGINT/SIGTERM: all stop after this step */
    tf_dist_gradient_sum gradient_sum; /* the gradient hook's all-reduce of each step's last micro-batch */
    const tf_backend *backend;
    tf_dataset train_set, val_set;
    tf_loader *train_loader, *val_loader;
    tf_model model;
    tf_optimizer optimizer;
    tf_class_names classes;
    char *growth_history;
    tf_train_progress progress;
    FILE *metrics;
    int rank, world_size;
    int micro_batch;      /* images per forward/backward on this rank */
    int accumulation;     /* micro-batches per optimizer step on this rank */
    int64_t steps_per_epoch;
    float *targets;       /* host [micro_batch, classes] */
    float *drop_scales;   /* host [depth, 2, micro_batch] */
    tf_batch *loaded;     /* the next micro-batch, already in model->images (see train_micro_batch) */
    int consecutive_bad_steps;
} tf_trainer;

/* Statistics of the steps since the last log line. */
typedef struct {
    double start_time, loss_sum, grad_norm_sum, wait_at_start;
    int steps;
    int64_t images;
} tf_log_interval;

static volatile sig_atomic_t stop_signal;

static void on_stop_signal(int signal_number) {
    stop_signal = signal_number;
}

/* ---- setup ----------------------------------------------------------------------------------- */

static tf_status open_datasets(tf_trainer *trainer) {
    const tf_data_config *data = &trainer->config.data;
    if (!data->root[0])
        return tf_fail(TF_ERR_USAGE, "no data set: give --data ROOT or data.root in the config");
    TF_TRY(dataset_open(&trainer->train_set, data->root, data->train_split, data->train_limit));
    TF_TRY(dataset_open(&trainer->val_set, data->root, data->val_split, data->val_limit));
    const tf_dataset *train = &trainer->train_set, *val = &trainer->val_set;
    if (train->class_count != val->class_count)
        return tf_fail(TF_ERR_USAGE, "%s has %d classes but %s has %d", train->directory, train->class_count,
                       val->directory, val->class_count);
    for (int c = 0; c < train->class_count; c++)
        if (strcmp(train->class_names[c], val->class_names[c]) != 0)
            return tf_fail(TF_ERR_USAGE, "class %d is '%s' in %s but '%s' in %s", c, train->class_names[c],
                           train->directory, val->class_names[c], val->directory);
    return class_names_copy(&trainer->classes, train->class_count, train->class_names);
}

static tf_status plan_batches(tf_trainer *trainer) {
    const tf_schedule_config *schedule = &trainer->config.schedule;
    int per_rank = schedule->batch / trainer->world_size;
    int micro = schedule->micro_batch ? schedule->micro_batch : per_rank;
    if (per_rank * trainer->world_size != schedule->batch || micro < 1 || per_rank % micro != 0)
        return tf_fail(TF_ERR_USAGE,
                       "schedule.batch %d must split into %d rank(s) x a whole number of micro-batches of %d",
                       schedule->batch, trainer->world_size, micro);
    trainer->micro_batch = micro;
    trainer->accumulation = per_rank / micro;
    return TF_OK;
}

/* The model's shape: from the checkpoint being continued or grown, else from the config. The
 * drop-path rate is a training choice and always comes from the config. */
static tf_status model_config_for_run(tf_trainer *trainer, tf_checkpoint *checkpoint, bool *from_checkpoint) {
    char path[TF_PATH_MAX];
    *from_checkpoint = false;
    if (trainer->options.resume)
        TF_TRY(run_dir_latest(trainer->options.run_dir, "model.safetensors", path, sizeof path));
    else if (trainer->options.init_from[0])
        TF_TRY(path_format(path, sizeof path, "%s", trainer->options.init_from));
    else
        return TF_OK;
    TF_TRY(checkpoint_load(path, checkpoint));
    float drop_path = trainer->config.model.drop_path;
    trainer->config.model = checkpoint->config;
    trainer->config.model.drop_path = drop_path;
    *from_checkpoint = true;
    free(trainer->growth_history);
    trainer->growth_history = strdup(checkpoint->growth_history);
    return TF_OK;
}

static tf_status create_model(tf_trainer *trainer) {
    tf_checkpoint checkpoint;
    bool from_checkpoint;
    TF_TRY(model_config_for_run(trainer, &checkpoint, &from_checkpoint));
    const tf_model_config *model_config = &trainer->config.model;
    tf_status status = TF_OK;
    if (model_config->classes != trainer->classes.count)
        status = tf_fail(TF_ERR_USAGE, "the model has %d classes but %s has %d class folders: set model.classes",
                         model_config->classes, trainer->train_set.directory, trainer->classes.count);
    if (status == TF_OK) status = model_create(&trainer->model, model_config, trainer->backend, trainer->micro_batch, true);
    if (status == TF_OK && from_checkpoint) {
        for (int c = 0; c < trainer->classes.count && status == TF_OK; c++)
            if (strcmp(checkpoint.classes.names[c], trainer->classes.names[c]) != 0)
                status = tf_fail(TF_ERR_USAGE, "the checkpoint's class %d is '%s' but the data set's is '%s'", c,
                                 checkpoint.classes.names[c], trainer->classes.names[c]);
        if (status == TF_OK) model_set_params(&trainer->model, checkpoint.params);
    } else if (status == TF_OK) {
        status = model_init_params(&trainer->model, trainer->config.run.seed);
    }
    if (from_checkpoint) checkpoint_free(&checkpoint);
    return status;
}

static tf_status create_optimizer(tf_trainer *trainer) {
    TF_TRY(optimizer_create(&trainer->optimizer, &trainer->model, &trainer->config.optimizer));
    trainer->progress = (tf_train_progress){.seed = trainer->config.run.seed};
    if (trainer->options.resume) {
        char path[TF_PATH_MAX];
        TF_TRY(run_dir_latest(trainer->options.run_dir, "state.safetensors", path, sizeof path));
        TF_TRY(train_state_load(path, &trainer->model, &trainer->optimizer, &trainer->progress));
        if (trainer->progress.seed != trainer->config.run.seed)
            return tf_fail(TF_ERR_USAGE, "%s was made with seed %" PRIu64 " but the config says %llu", path,
                           trainer->progress.seed, trainer->config.run.seed);
    } else if (trainer->options.init_state[0]) {
        /* The moments arrive warmed up, so AdamW's step (its bias corrections) carries on with them;
         * restarting it would inflate the first updates (m / (1 - 0.9) over sqrt(v / (1 - 0.95)):
         * 2.2x). The learning-rate schedule starts afresh from the config regardless. */
        TF_TRY(train_state_load(trainer->options.init_state, &trainer->model, &trainer->optimizer, NULL));
    }
    return TF_OK;
}

static tf_status create_loaders(tf_trainer *trainer) {
    const tf_config *config = &trainer->config;
    tf_loader_options options = {
        .transform = TF_TRANSFORM_TRAIN,
        .batch_size = trainer->micro_batch,
        .image_size = config->model.img_size,
        .crop_pct = config->data.crop_pct,
        .augment = config->augment,
        .seed = config->run.seed,
        .rank = trainer->rank,
        .world_size = trainer->world_size,
        .workers = config->data.workers,
        .shuffle = true,
        .drop_last = true,
        .host_alloc = trainer->backend->host_alloc,
        .host_free = trainer->backend->host_free,
    };
    TF_TRY(loader_create(&trainer->train_loader, &trainer->train_set, &options));
    options.transform = TF_TRANSFORM_EVAL;
    options.shuffle = options.drop_last = false;
    TF_TRY(loader_create(&trainer->val_loader, &trainer->val_set, &options));
    trainer->steps_per_epoch = loader_batches_per_epoch(trainer->train_loader) / trainer->accumulation;
    if (trainer->steps_per_epoch < 1)
        return tf_fail(TF_ERR_USAGE, "%s has %" PRId64 " images, fewer than one optimizer step of %d",
                       trainer->train_set.directory, trainer->train_set.count, config->schedule.batch);
    return TF_OK;
}

static tf_status allocate_host_buffers(tf_trainer *trainer) {
    size_t batch = (size_t)trainer->micro_batch;
    trainer->targets = malloc(batch * (size_t)trainer->config.model.classes * sizeof *trainer->targets);
    trainer->drop_scales = malloc((size_t)trainer->config.model.depth * 2 * batch * sizeof *trainer->drop_scales);
    if (!trainer->targets || !trainer->drop_scales) return tf_fail(TF_ERR_RUNTIME, "out of host memory");
    return TF_OK;
}

static void log_start(const tf_trainer *trainer) {
    const tf_config *config = &trainer->config;
    tf_log("device: %s; model: %zu parameters, %.1f MiB of %s memory", trainer->backend->name,
           trainer->model.layout.total, (double)model_memory_bytes(&trainer->model) / (1 << 20),
           trainer->backend->name);
    tf_log("data: %" PRId64 " training images in %s, %" PRId64 " validation images in %s, %d classes",
           trainer->train_set.count, trainer->train_set.directory, trainer->val_set.count,
           trainer->val_set.directory, trainer->classes.count);
    tf_log("batch %d = %d rank(s) x %d micro-batch(es) of %d; %" PRId64 " steps per epoch, %d epochs; peak lr %.3g",
           config->schedule.batch, trainer->world_size, trainer->accumulation, trainer->micro_batch,
           trainer->steps_per_epoch, config->schedule.epochs, config->optimizer.lr);
    tf_log("run directory: %s (resolved config in config.yaml)", trainer->options.run_dir);
    if (trainer->options.resume)
        tf_log("resuming at step %" PRId64 " (epoch %d, batch %" PRId64 ")", trainer->progress.step,
               trainer->progress.epoch, trainer->progress.epoch_batches);
}

/* A new run must not silently overwrite the checkpoints of an earlier one in the same directory. */
static tf_status check_run_dir_is_new(const tf_train_options *options) {
    char path[TF_PATH_MAX];
    if (options->resume || run_dir_latest(options->run_dir, "model.safetensors", path, sizeof path) != TF_OK)
        return TF_OK;
    return tf_fail(TF_ERR_USAGE, "%s already holds a run with checkpoints: continue it with --resume %s, or give "
                                 "another --out",
                   options->run_dir, options->run_dir);
}

/* The process group, first of all, so that any later failure on one rank reaches all of them. */
static tf_status open_process_group(tf_trainer *trainer) {
    char extra[3 * TF_PATH_MAX + 64];
    snprintf(extra, sizeof extra, "resume=%d init=%s state=%s max_steps=%d", trainer->options.resume,
             trainer->options.init_from, trainer->options.init_state, trainer->options.max_steps);
    uint64_t fingerprint;
    TF_TRY(dist_config_fingerprint(&trainer->config, extra, &fingerprint));
    TF_TRY(dist_join(&trainer->dist, fingerprint)); /* selects this rank's GPU */
    trainer->rank = dist_rank(trainer->dist);
    trainer->world_size = dist_world_size(trainer->dist);
    return TF_OK;
}

/* Every rank holds the same weights: same init, same summed gradients, same updates. Checked
 * bit for bit after setup and at every checkpoint: a 64-bit hash of the fp32 parameters must be
 * the same on all ranks (the maxima of its halves and of their negations agree). */
static tf_status check_replicas(tf_trainer *trainer) {
    if (trainer->world_size == 1) return TF_OK;
    size_t count = trainer->model.layout.total;
    float *host = malloc(count * sizeof *host);
    if (!host) return tf_fail(TF_ERR_RUNTIME, "out of host memory for the parameters' checksum");
    trainer->backend->download(host, trainer->model.params, trainer->backend->master_dtype, count);
    uint64_t hash = dist_hash(host, count * sizeof *host, TF_DIST_HASH_START);
    free(host);
    int64_t high = (int64_t)(hash >> 32), low = (int64_t)(hash & 0xffffffffu);
    int64_t extremes[4] = {high, low, -high, -low};
    TF_TRY(dist_all_reduce_host_i64(trainer->dist, extremes, 4, TF_DIST_MAX));
    if (extremes[0] != -extremes[2] || extremes[1] != -extremes[3])
        return tf_fail(TF_ERR_RUNTIME,
                       "the ranks' parameters differ at step %" PRId64 " (rank %d's checksum %016" PRIx64 ")",
                       trainer->progress.step, trainer->rank, hash);
    if (dist_is_main(trainer->dist))
        tf_log("step %" PRId64 ": parameters bit-identical on all %d ranks (checksum %016" PRIx64 ")",
               trainer->progress.step, trainer->world_size, hash);
    return TF_OK;
}

static tf_status trainer_open(tf_trainer *trainer) {
    const tf_config *config = &trainer->config;
    bool main_rank = dist_is_main(trainer->dist);
    TF_TRY(check_run_dir_is_new(&trainer->options));
    /* Several ranks need their GPUs: no quiet fallback to the CPU. */
    TF_TRY(tf_backend_open(trainer->world_size > 1 ? TF_DEVICE_CUDA : config->run.device, config->run.threads,
                           &trainer->backend));
    TF_TRY(open_datasets(trainer));
    TF_TRY(plan_batches(trainer));
    TF_TRY(create_model(trainer));
    trainer->gradient_sum = (tf_dist_gradient_sum){.dist = trainer->dist, .grads = trainer->model.grads};
    TF_TRY(create_optimizer(trainer));
    TF_TRY(create_loaders(trainer));
    TF_TRY(allocate_host_buffers(trainer));
    TF_TRY(check_replicas(trainer));
    if (main_rank) {
        TF_TRY(run_dir_prepare(trainer->options.run_dir, &trainer->config));
        TF_TRY(run_dir_open_metrics(trainer->options.run_dir, trainer->options.resume ? trainer->progress.step : -1,
                                    &trainer->metrics));
        log_start(trainer);
    }
    return TF_OK;
}

static void trainer_close(tf_trainer *trainer) {
    if (trainer->metrics) fclose(trainer->metrics);
    if (trainer->loaded) { /* a stop after its step: its pixels' copy may still be running */
        trainer->backend->synchronize();
        loader_release_batch(trainer->train_loader, trainer->loaded);
    }
    if (trainer->train_loader) loader_destroy(trainer->train_loader);
    if (trainer->val_loader) loader_destroy(trainer->val_loader);
    if (trainer->backend) {
        if (trainer->optimizer.m) optimizer_destroy(&trainer->optimizer, trainer->backend);
        if (trainer->model.params) model_destroy(&trainer->model);
    }
    dataset_close(&trainer->train_set);
    dataset_close(&trainer->val_set);
    class_names_free(&trainer->classes);
    free(trainer->growth_history);
    free(trainer->targets);
    free(trainer->drop_scales);
}

/* ---- one step -------------------------------------------------------------------------------- */

/* Takes the next loader batch and queues its copy and normalisation into model->images. */
static tf_status load_batch(tf_trainer *trainer, tf_batch **batch) {
    TF_TRY(loader_next_batch(trainer->train_loader, batch));
    if (!*batch) return tf_fail(TF_ERR_RUNTIME, "the loader ended the epoch early");
    model_load_pixels(&trainer->model, (*batch)->images, (*batch)->count);
    return TF_OK;
}

/* Whether the epoch's whole optimizer steps hold a micro-batch after this one. */
static bool epoch_has_next_micro_batch(const tf_trainer *trainer, int micro) {
    int64_t next = trainer->progress.epoch_batches + micro + 1;
    return next < trainer->steps_per_epoch * trainer->accumulation;
}

static tf_status train_micro_batch(tf_trainer *trainer, int micro, double *loss) {
    const tf_config *config = &trainer->config;
    tf_model *model = &trainer->model;
    tf_batch *batch = trainer->loaded;
    trainer->loaded = NULL;
    if (!batch) TF_TRY(load_batch(trainer, &batch));

    uint64_t stream = (uint64_t)trainer->rank * (uint64_t)trainer->accumulation + (uint64_t)micro;
    tf_rng rng = tf_rng_make(config->run.seed, TF_RNG_STEP, (uint64_t)trainer->progress.step, stream);
    int count = batch->count;
    tf_mix mix = mixup_draw(&config->augment, config->model.img_size, &rng);
    mixup_targets(batch->labels, count, config->model.classes, config->augment.label_smoothing, mix.lambda,
                  trainer->targets);
    mixup_images(trainer->backend, model->images, count, config->model.channels, config->model.img_size, &mix);

    const float *drop_scales = NULL;
    if (config->model.drop_path > 0.0f) {
        model_drop_scales(&config->model, count, &rng, trainer->drop_scales);
        drop_scales = trainer->drop_scales;
    }
    model_forward(model, count, drop_scales);
    /* The next micro-batch crosses to the device while this one's backward runs, so that it does
     * not meet an idle GPU (model->images is read only by the forward's first operation). Only
     * when the loader has it ready: waiting for it here would hold back this backward. */
    tf_status status = TF_OK;
    if (epoch_has_next_micro_batch(trainer, micro) && loader_next_batch_ready(trainer->train_loader))
        status = load_batch(trainer, &trainer->loaded);
    if (status == TF_OK)
        status = model_backward(model, trainer->targets, count, 1.0f / (float)config->schedule.batch, loss);
    else
        trainer->backend->synchronize(); /* this batch's pixels may still be in the copy */
    /* Only now: the pixels' upload is asynchronous, and reading the loss waited for it. */
    loader_release_batch(trainer->train_loader, batch);
    return status;
}

/* Non-finite steps are skipped; too many in a row end the run with the last good checkpoint. */
static tf_status check_step(tf_trainer *trainer, double loss, const tf_step_result *result) {
    if (!result->skipped && isfinite(loss)) {
        trainer->consecutive_bad_steps = 0;
        return TF_OK;
    }
    trainer->progress.skipped_steps++;
    trainer->consecutive_bad_steps++;
    tf_log("step %" PRId64 ": non-finite loss %g or gradient norm %g; update skipped (%d in a row, %" PRId64
           " in all)",
           trainer->progress.step, loss, result->grad_norm, trainer->consecutive_bad_steps,
           trainer->progress.skipped_steps);
    if (trainer->consecutive_bad_steps >= trainer->config.run.max_bad_steps)
        return tf_fail(TF_ERR_RUNTIME,
                       "%d non-finite steps in a row at step %" PRId64 "; stopping. The last good checkpoint is in "
                       "%s/latest; lower the learning rate or enable optimizer.clip_grad and --resume",
                       trainer->consecutive_bad_steps, trainer->progress.step, trainer->options.run_dir);
    return TF_OK;
}

/* Waits for the gradient all-reduces, and makes every rank see the same mean loss and the same
 * stop request, so that all skip a non-finite step or stop after this one together. */
static tf_status reduce_over_ranks(tf_trainer *trainer, double *loss_sum) {
    if (trainer->world_size == 1) {
        trainer->stop_requested = stop_signal != 0;
        return TF_OK;
    }
    TF_TRY(trainer->gradient_sum.status);
    TF_TRY(dist_all_reduce_wait(trainer->dist));
    double agreed[2] = {*loss_sum, stop_signal ? 1.0 : 0.0};
    TF_TRY(dist_all_reduce_host_f64(trainer->dist, agreed, 2, TF_DIST_SUM));
    *loss_sum = agreed[0];
    trainer->stop_requested = agreed[1] > 0.0;
    return TF_OK;
}

static tf_status train_step(tf_trainer *trainer, tf_log_interval *interval) {
    model_zero_grads(&trainer->model);
    double loss_sum = 0.0;
    for (int micro = 0; micro < trainer->accumulation; micro++) {
        bool last = micro == trainer->accumulation - 1;
        if (trainer->world_size > 1)
            model_set_gradient_hook(&trainer->model, last ? dist_gradient_ready : NULL, &trainer->gradient_sum);
        double loss;
        TF_TRY(train_micro_batch(trainer, micro, &loss));
        loss_sum += loss;
    }
    TF_TRY(reduce_over_ranks(trainer, &loss_sum));
    double loss = loss_sum / ((double)trainer->accumulation * trainer->world_size);
    double lr = schedule_learning_rate(&trainer->config, trainer->progress.step, trainer->steps_per_epoch);
    tf_step_result result = {0};
    if (isfinite(loss)) TF_TRY(optimizer_step(&trainer->optimizer, &trainer->model, lr, 1.0f, &result));
    TF_TRY(check_step(trainer, loss, &result));

    trainer->progress.step++;
    trainer->progress.epoch_batches += trainer->accumulation;
    if (isfinite(loss) && !result.skipped) {
        interval->loss_sum += loss;
        interval->grad_norm_sum += result.grad_norm;
        interval->steps++;
    }
    interval->images += (int64_t)trainer->config.schedule.batch;
    return TF_OK;
}

/* ---- progress and metrics -------------------------------------------------------------------- */

/* A metrics.jsonl record of this step; cJSON writes non-finite numbers as null, so every line
 * stays valid JSON. */
static cJSON *metrics_record(const tf_trainer *trainer, const char *type) {
    cJSON *record = cJSON_CreateObject();
    cJSON_AddStringToObject(record, "type", type);
    cJSON_AddNumberToObject(record, "step", (double)trainer->progress.step);
    cJSON_AddNumberToObject(record, "epoch", (double)trainer->progress.step / (double)trainer->steps_per_epoch);
    return record;
}

static void write_metrics_record(tf_trainer *trainer, cJSON *record) {
    char *line = trainer->metrics ? cJSON_PrintUnformatted(record) : NULL; /* rank 0 only */
    if (line) {
        fprintf(trainer->metrics, "%s\n", line);
        fflush(trainer->metrics);
    }
    cJSON_free(line);
    cJSON_Delete(record);
}

static void format_duration(double seconds, char *out, size_t size) {
    long total = (long)(seconds + 0.5);
    if (total >= 3600)
        snprintf(out, size, "%ldh%02ldm", total / 3600, total / 60 % 60);
    else
        snprintf(out, size, "%ldm%02lds", total / 60, total % 60);
}

static void log_interval(tf_trainer *trainer, tf_log_interval *interval, double run_start, int64_t first_step) {
    const tf_config *config = &trainer->config;
    double now = tf_seconds(), elapsed = now - interval->start_time;
    double wait = loader_stats(trainer->train_loader).wait_seconds - interval->wait_at_start;
    double images_per_second = elapsed > 0 ? (double)interval->images / elapsed : 0.0;
    double loss = interval->steps ? interval->loss_sum / interval->steps : NAN;
    double lr = schedule_learning_rate(config, trainer->progress.step - 1, trainer->steps_per_epoch);
    int64_t total_steps = trainer->steps_per_epoch * config->schedule.epochs;
    int64_t done = trainer->progress.step - first_step;
    double eta = done > 0 ? (now - run_start) / (double)done * (double)(total_steps - trainer->progress.step) : 0.0;
    char eta_text[32];
    format_duration(eta, eta_text, sizeof eta_text);
    int epoch = (int)((trainer->progress.step - 1) / trainer->steps_per_epoch);

    char line[512];
    snprintf(line, sizeof line,
             "epoch %d/%d step %" PRId64 "/%" PRId64 " loss %.4f lr %.3e | %.0f img/s | data wait %.0f%% | ETA %s",
             epoch + 1, config->schedule.epochs, trainer->progress.step, total_steps, loss, lr, images_per_second,
             elapsed > 0 ? 100.0 * wait / elapsed : 0.0, eta_text);
    if (isatty(STDERR_FILENO))
        fprintf(stderr, "\r\033[K%s", line);
    else
        tf_log("%s", line);
    cJSON *record = metrics_record(trainer, "train");
    cJSON_AddNumberToObject(record, "loss", loss);
    cJSON_AddNumberToObject(record, "lr", lr);
    cJSON_AddNumberToObject(record, "grad_norm", interval->steps ? interval->grad_norm_sum / interval->steps : NAN);
    cJSON_AddNumberToObject(record, "img_per_s", images_per_second);
    cJSON_AddNumberToObject(record, "data_wait", elapsed > 0 ? wait / elapsed : 0.0);
    write_metrics_record(trainer, record);
    *interval = (tf_log_interval){.start_time = now, .wait_at_start = wait + interval->wait_at_start};
}

/* Swaps the model's weights with the EMA's (and back, called again). */
static void swap_ema(tf_trainer *trainer) {
    model_swap_params(&trainer->model, &trainer->optimizer.ema);
}

static tf_status evaluate_once(tf_trainer *trainer, double *top1, double *top5, double *loss) {
    tf_eval_result result;
    TF_TRY(eval_result_init(&result, trainer->config.model.classes));
    tf_status status = evaluate(&trainer->model, trainer->val_loader, &result);
    if (status == TF_OK) status = eval_result_all_reduce(&result, trainer->dist); /* each rank saw its share */
    *top1 = eval_top1(&result);
    *top5 = eval_top5(&result);
    *loss = eval_loss(&result);
    eval_result_free(&result);
    return status;
}

static tf_status evaluate_and_log(tf_trainer *trainer) {
    double top1, top5, loss, ema_top1 = NAN, ema_top5 = NAN, ema_loss = NAN;
    bool main_rank = dist_is_main(trainer->dist);
    if (main_rank && isatty(STDERR_FILENO)) fputc('\n', stderr);
    TF_TRY(evaluate_once(trainer, &top1, &top5, &loss));
    if (trainer->optimizer.ema) {
        swap_ema(trainer);
        tf_status status = evaluate_once(trainer, &ema_top1, &ema_top5, &ema_loss);
        swap_ema(trainer);
        TF_TRY(status);
        if (main_rank)
            tf_log("step %" PRId64 ": val top-1 %.2f%% top-5 %.2f%% loss %.4f | EMA top-1 %.2f%% top-5 %.2f%%",
                   trainer->progress.step, top1, top5, loss, ema_top1, ema_top5);
    } else if (main_rank) {
        tf_log("step %" PRId64 ": val top-1 %.2f%% top-5 %.2f%% loss %.4f", trainer->progress.step, top1, top5, loss);
    }
    cJSON *record = metrics_record(trainer, "eval");
    cJSON_AddNumberToObject(record, "top1", top1);
    cJSON_AddNumberToObject(record, "top5", top5);
    cJSON_AddNumberToObject(record, "loss", loss);
    if (trainer->optimizer.ema) {
        cJSON_AddNumberToObject(record, "ema_top1", ema_top1);
        cJSON_AddNumberToObject(record, "ema_top5", ema_top5);
        cJSON_AddNumberToObject(record, "ema_loss", ema_loss);
    }
    write_metrics_record(trainer, record);
    return TF_OK;
}

static tf_status save_checkpoint(tf_trainer *trainer) {
    TF_TRY(check_replicas(trainer));
    if (!dist_is_main(trainer->dist)) return TF_OK;
    double start = tf_seconds();
    TF_TRY(run_dir_save_checkpoint(trainer->options.run_dir, &trainer->model, &trainer->optimizer,
                                   &trainer->progress, &trainer->classes, trainer->growth_history,
                                   trainer->config.data.crop_pct, trainer->config.run.keep_checkpoints));
    if (isatty(STDERR_FILENO)) fputc('\n', stderr);
    tf_log("checkpoint of step %" PRId64 " written to %s/latest (%.1f s)", trainer->progress.step,
           trainer->options.run_dir, tf_seconds() - start);
    return TF_OK;
}

/* ---- the loop -------------------------------------------------------------------------------- */

/* Consumes the loader batches left in the epoch after its last whole optimizer step. */
static tf_status finish_loader_epoch(tf_loader *loader) {
    for (;;) {
        tf_batch *batch;
        TF_TRY(loader_next_batch(loader, &batch));
        if (!batch) return TF_OK;
        loader_release_batch(loader, batch);
    }
}

static tf_status train_epoch(tf_trainer *trainer, int epoch, double run_start, int64_t first_step,
                             tf_train_outcome *outcome) {
    const tf_config *config = &trainer->config;
    TF_TRY(loader_start_epoch(trainer->train_loader, epoch, trainer->progress.epoch_batches));
    tf_log_interval interval = {.start_time = tf_seconds(),
                                .wait_at_start = loader_stats(trainer->train_loader).wait_seconds};
    int64_t epoch_end = (int64_t)(epoch + 1) * trainer->steps_per_epoch;
    while (trainer->progress.step < epoch_end) {
        TF_TRY(train_step(trainer, &interval));
        bool epoch_done = trainer->progress.step == epoch_end;
        if (dist_is_main(trainer->dist) && (trainer->progress.step % config->run.log_every == 0 || epoch_done))
            log_interval(trainer, &interval, run_start, first_step);
        if (epoch_done) {
            trainer->progress.epoch = epoch + 1;
            trainer->progress.epoch_batches = 0;
            break;
        }
        bool stop = trainer->stop_requested ||
                    (trainer->options.max_steps && trainer->progress.step >= trainer->options.max_steps);
        if (stop || (config->run.ckpt_every && trainer->progress.step % config->run.ckpt_every == 0))
            TF_TRY(save_checkpoint(trainer));
        if (stop) {
            *outcome = trainer->stop_requested ? TF_TRAIN_INTERRUPTED : TF_TRAIN_STOPPED;
            return TF_OK;
        }
    }
    TF_TRY(finish_loader_epoch(trainer->train_loader));
    bool last = epoch + 1 == config->schedule.epochs;
    if (last || (config->run.eval_every && (epoch + 1) % config->run.eval_every == 0))
        TF_TRY(evaluate_and_log(trainer));
    TF_TRY(save_checkpoint(trainer));
    if (trainer->stop_requested)
        *outcome = TF_TRAIN_INTERRUPTED;
    else if (trainer->options.max_steps && trainer->progress.step >= trainer->options.max_steps)
        *outcome = TF_TRAIN_STOPPED;
    return TF_OK;
}

static tf_status train_loop(tf_trainer *trainer, tf_train_outcome *outcome) {
    double run_start = tf_seconds();
    int64_t first_step = trainer->progress.step;
    *outcome = TF_TRAIN_FINISHED;
    for (int epoch = trainer->progress.epoch; epoch < trainer->config.schedule.epochs; epoch++) {
        TF_TRY(train_epoch(trainer, epoch, run_start, first_step, outcome));
        if (*outcome != TF_TRAIN_FINISHED) break;
    }
    if (*outcome == TF_TRAIN_INTERRUPTED && dist_is_main(trainer->dist))
        tf_log("stopped by a signal after step %" PRId64 "; continue with --resume %s", trainer->progress.step,
               trainer->options.run_dir);
    return TF_OK;
}

tf_status train_run(const tf_config *config, const tf_train_options *options, tf_train_outcome *outcome) {
    tf_trainer trainer = {.config = *config, .options = *options, .rank = 0, .world_size = 1};
    trainer.growth_history = strdup("[]");
    stop_signal = 0;
    struct sigaction action = {.sa_handler = on_stop_signal}, old_int, old_term;
    sigaction(SIGINT, &action, &old_int);
    sigaction(SIGTERM, &action, &old_term);

    tf_status status = open_process_group(&trainer);
    if (status == TF_OK) status = trainer_open(&trainer);
    if (status == TF_OK) status = train_loop(&trainer, outcome);
    /* A failure on this rank stops all of them with its message (returns at world size 1). */
    if (status != TF_OK) dist_abort(trainer.dist, tf_error_message());
    trainer_close(&trainer);
    tf_status finished = dist_finish(trainer.dist);
    if (status == TF_OK) status = finished;
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    return status;
}
