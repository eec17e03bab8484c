/* The run directory and its checkpoints (see run_dir.h). */
#include "train/run_dir.h"

#include "common/log.h"
#include "common/path.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


tf_status run_dir_prepare(const char *run_dir, const tf_config *config) {
    TF_TRY(path_make_directories(run_dir));
    char path[TF_PATH_MAX], temporary[TF_PATH_MAX];
    TF_TRY(path_format(path, sizeof path, "%s/config.yaml", run_dir));
    TF_TRY(path_format(temporary, sizeof temporary, "%s.tmp", path));
    FILE *file = fopen(temporary, "w");
    if (!file) return tf_fail(TF_ERR_RUNTIME, "cannot write %s: %s", temporary, strerror(errno));
    fprintf(file, "# The resolved configuration of this run (tokenformer train).\n");
    config_print(config, file);
    if (fclose(file) != 0 || rename(temporary, path) != 0)
        return tf_fail(TF_ERR_RUNTIME, "cannot write %s: %s", path, strerror(errno));
    return TF_OK;
}

/* ---- training state file --------------------------------------------------------------------- */

static char *progress_to_json(const tf_train_progress *progress, int64_t optimizer_step) {
    cJSON *root = cJSON_CreateObject();
    char seed[32];
    snprintf(seed, sizeof seed, "%" PRIu64, progress->seed); /* JSON numbers lose 64-bit integers */
    cJSON_AddNumberToObject(root, "step", (double)progress->step);
    cJSON_AddNumberToObject(root, "epoch", progress->epoch);
    cJSON_AddNumberToObject(root, "epoch_batches", (double)progress->epoch_batches);
    cJSON_AddStringToObject(root, "seed", seed);
    cJSON_AddNumberToObject(root, "skipped_steps", (double)progress->skipped_steps);
    cJSON_AddNumberToObject(root, "optimizer_step", (double)optimizer_step);
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return text;
}

static tf_status progress_from_json(const char *json, const char *path, tf_train_progress *progress,
                                    int64_t *optimizer_step) {
    cJSON *root = cJSON_Parse(json);
    const cJSON *step = cJSON_GetObjectItemCaseSensitive(root, "step");
    const cJSON *epoch = cJSON_GetObjectItemCaseSensitive(root, "epoch");
    const cJSON *batches = cJSON_GetObjectItemCaseSensitive(root, "epoch_batches");
    const cJSON *seed = cJSON_GetObjectItemCaseSensitive(root, "seed");
    const cJSON *skipped = cJSON_GetObjectItemCaseSensitive(root, "skipped_steps");
    const cJSON *updates = cJSON_GetObjectItemCaseSensitive(root, "optimizer_step");
    tf_status status = TF_OK;
    if (!cJSON_IsNumber(step) || !cJSON_IsNumber(epoch) || !cJSON_IsNumber(batches) || !cJSON_IsString(seed) ||
        !cJSON_IsNumber(skipped) || !cJSON_IsNumber(updates))
        status = tf_fail(TF_ERR_RUNTIME, "%s: metadata 'progress' is incomplete or malformed", path);
    else {
        progress->step = (int64_t)step->valuedouble;
        progress->epoch = epoch->valueint;
        progress->epoch_batches = (int64_t)batches->valuedouble;
        progress->seed = strtoull(seed->valuestring, NULL, 10);
        progress->skipped_steps = (int64_t)skipped->valuedouble;
        *optimizer_step = (int64_t)updates->valuedouble;
    }
    cJSON_Delete(root);
    return status;
}

tf_status train_state_save(const char *path, const tf_param_layout *layout, const float *m, const float *v,
                           const float *ema, int64_t optimizer_step, const tf_train_progress *progress) {
    int sets = ema ? 3 : 2;
    size_t count = (size_t)layout->count * (size_t)sets;
    char *names = malloc(count * TF_CHECKPOINT_NAME_MAX);
    safetensors_tensor_data *table = calloc(count, sizeof *table);
    char *progress_json = progress_to_json(progress, optimizer_step);
    tf_status status = TF_OK;
    if (!names || !table || !progress_json) status = tf_fail(TF_ERR_RUNTIME, "out of memory writing %s", path);
    if (status == TF_OK) {
        size_t n = (size_t)layout->count;
        checkpoint_tensor_table(layout, "adamw.m.", m, names, table);
        checkpoint_tensor_table(layout, "adamw.v.", v, names + n * TF_CHECKPOINT_NAME_MAX, table + n);
        if (ema) checkpoint_tensor_table(layout, "ema.", ema, names + 2 * n * TF_CHECKPOINT_NAME_MAX, table + 2 * n);
        safetensors_metadata_entry metadata[] = {{"format", TF_TRAIN_STATE_FORMAT}, {"progress", progress_json}};
        status = safetensors_write(path, table, count, metadata, 2);
    }
    free(names);
    free(table);
    cJSON_free(progress_json);
    return status;
}

static tf_status read_state(const safetensors_file *file, const tf_model *model, tf_optimizer *optimizer,
                            tf_train_progress *progress, float *host) {
    const tf_backend *backend = model->backend;
    const tf_param_layout *layout = &model->layout;
    const char *format = safetensors_metadata(file, "format");
    const char *progress_json = safetensors_metadata(file, "progress");
    if (!format || strcmp(format, TF_TRAIN_STATE_FORMAT) != 0 || !progress_json)
        return tf_fail(TF_ERR_RUNTIME, "%s: not a TokenFormer training state file (metadata 'format' should be \"%s\")",
                       file->path, TF_TRAIN_STATE_FORMAT);
    tf_train_progress read_progress;
    int64_t optimizer_step = 0;
    TF_TRY(progress_from_json(progress_json, file->path, &read_progress, &optimizer_step));

    TF_TRY(checkpoint_read_params(file, layout, "adamw.m.", host));
    backend->upload(optimizer->m, backend->master_dtype, host, layout->total);
    TF_TRY(checkpoint_read_params(file, layout, "adamw.v.", host));
    backend->upload(optimizer->v, backend->master_dtype, host, layout->total);
    char ema_name[TF_CHECKPOINT_NAME_MAX];
    snprintf(ema_name, sizeof ema_name, "ema.%s", layout->tensors[0].name);
    if (optimizer->ema && safetensors_find(file, ema_name)) {
        TF_TRY(checkpoint_read_params(file, layout, "ema.", host));
        backend->upload(optimizer->ema, backend->master_dtype, host, layout->total);
    } else if (optimizer->ema) {
        tf_log("%s has no EMA weights; the EMA starts from the current weights", file->path);
        optimizer_reset_ema(optimizer, model);
    }
    optimizer->step = optimizer_step;
    if (progress) *progress = read_progress;
    return backend->synchronize();
}

tf_status train_state_load(const char *path, const tf_model *model, tf_optimizer *optimizer,
                           tf_train_progress *progress) {
    float *host = malloc(model->layout.total * sizeof *host);
    if (!host) return tf_fail(TF_ERR_RUNTIME, "out of host memory reading %s", path);
    safetensors_file *file;
    tf_status status = safetensors_open(&file, path);
    if (status == TF_OK) status = read_state(file, model, optimizer, progress, host);
    safetensors_close(file);
    free(host);
    return status;
}

/* ---- checkpoint directories ------------------------------------------------------------------ */

static tf_status download_state(const tf_model *model, const tf_optimizer *optimizer, float *params, float *m,
                                float *v, float *ema) {
    const tf_backend *backend = model->backend;
    size_t n = model->layout.total;
    model_get_params(model, params);
    backend->download(m, optimizer->m, backend->master_dtype, n);
    backend->download(v, optimizer->v, backend->master_dtype, n);
    if (ema) backend->download(ema, optimizer->ema, backend->master_dtype, n);
    return backend->synchronize();
}

static tf_status write_checkpoint_files(const char *directory, const tf_model *model, const tf_optimizer *optimizer,
                                        const tf_train_progress *progress, const tf_class_names *classes,
                                        const char *growth_history, float crop_pct) {
    size_t n = model->layout.total;
    int sets = optimizer->ema ? 4 : 3;
    float *host = malloc((size_t)sets * n * sizeof *host);
    if (!host) return tf_fail(TF_ERR_RUNTIME, "out of host memory for a checkpoint (%zu parameters)", n);
    float *params = host, *m = host + n, *v = host + 2 * n, *ema = optimizer->ema ? host + 3 * n : NULL;
    tf_status status = download_state(model, optimizer, params, m, v, ema);

    char path[TF_PATH_MAX], step[32], epoch[32], crop[32];
    snprintf(step, sizeof step, "%" PRId64, progress->step);
    snprintf(epoch, sizeof epoch, "%d", progress->epoch);
    snprintf(crop, sizeof crop, "%.9g", crop_pct);
    safetensors_metadata_entry extra[] = {{"step", step}, {"epoch", epoch}, {"crop_pct", crop}};
    if (status == TF_OK) status = path_format(path, sizeof path, "%s/model.safetensors", directory);
    if (status == TF_OK)
        status = checkpoint_save(path, &model->config, &model->layout, params, classes, growth_history, extra, 3);
    if (status == TF_OK) status = path_format(path, sizeof path, "%s/state.safetensors", directory);
    if (status == TF_OK) status = train_state_save(path, &model->layout, m, v, ema, optimizer->step, progress);
    free(host);
    return status;
}

/* Replaces RUN/name with a symlink to target, atomically (a new link renamed over the old). */
static tf_status replace_symlink(const char *run_dir, const char *name, const char *target) {
    char link_path[TF_PATH_MAX], temporary[TF_PATH_MAX];
    TF_TRY(path_format(link_path, sizeof link_path, "%s/%s", run_dir, name));
    TF_TRY(path_format(temporary, sizeof temporary, "%s.tmp", link_path));
    unlink(temporary);
    if (symlink(target, temporary) != 0 || rename(temporary, link_path) != 0)
        return tf_fail(TF_ERR_RUNTIME, "cannot point %s at %s: %s", link_path, target, strerror(errno));
    return TF_OK;
}

static tf_status ensure_symlink(const char *run_dir, const char *name, const char *target) {
    char link_path[TF_PATH_MAX], current[TF_PATH_MAX];
    TF_TRY(path_format(link_path, sizeof link_path, "%s/%s", run_dir, name));
    ssize_t length = readlink(link_path, current, sizeof current - 1);
    if (length >= 0) {
        current[length] = '\0';
        if (strcmp(current, target) == 0) return TF_OK;
    }
    return replace_symlink(run_dir, name, target);
}

static int compare_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Removes a checkpoint directory and every file in it: besides its two files, a save killed
 * midway leaves the temporary file of an atomic write. Absent is fine. */
static tf_status remove_checkpoint_directory(const char *run_dir, const char *name) {
    char directory_path[TF_PATH_MAX], path[TF_PATH_MAX];
    TF_TRY(path_format(directory_path, sizeof directory_path, "%s/%s", run_dir, name));
    DIR *directory = opendir(directory_path);
    if (!directory) return errno == ENOENT ? TF_OK : tf_fail(TF_ERR_RUNTIME, "cannot list %s: %s", directory_path,
                                                             strerror(errno));
    for (struct dirent *entry; (entry = readdir(directory));)
        if (strcmp(entry->d_name, ".") && strcmp(entry->d_name, "..") &&
            path_format(path, sizeof path, "%s/%s", directory_path, entry->d_name) == TF_OK)
            unlink(path);
    closedir(directory);
    if (rmdir(directory_path) != 0)
        return tf_fail(TF_ERR_RUNTIME, "cannot remove old checkpoint %s: %s", directory_path, strerror(errno));
    return TF_OK;
}

/* Keeps the newest `keep` checkpoint-* directories (names sort by step) and never `current`. */
static tf_status prune_checkpoints(const char *run_dir, const char *current, int keep) {
    DIR *directory = opendir(run_dir);
    if (!directory) return tf_fail(TF_ERR_RUNTIME, "cannot list %s: %s", run_dir, strerror(errno));
    char **names = NULL;
    size_t count = 0, capacity = 0;
    for (struct dirent *entry; (entry = readdir(directory));) {
        if (strncmp(entry->d_name, "checkpoint-", 11) != 0 || strstr(entry->d_name, ".tmp")) continue;
        if (count == capacity) {
            capacity = capacity ? 2 * capacity : 16;
            char **grown = realloc(names, capacity * sizeof *names);
            if (!grown) break;
            names = grown;
        }
        names[count++] = strdup(entry->d_name);
    }
    closedir(directory);
    qsort(names, count, sizeof *names, compare_names);
    /* An old checkpoint that cannot be removed costs disk, not the run: say so and go on. */
    for (size_t i = 0; i + (size_t)keep < count; i++)
        if (strcmp(names[i], current) != 0 && remove_checkpoint_directory(run_dir, names[i]) != TF_OK)
            tf_log("warning: %s", tf_error_message());
    for (size_t i = 0; i < count; i++) free(names[i]);
    free(names);
    return TF_OK;
}

tf_status run_dir_save_checkpoint(const char *run_dir, const tf_model *model, const tf_optimizer *optimizer,
                                  const tf_train_progress *progress, const tf_class_names *classes,
                                  const char *growth_history, float crop_pct, int keep) {
    char name[64], directory[TF_PATH_MAX], temporary[TF_PATH_MAX];
    snprintf(name, sizeof name, "checkpoint-%08" PRId64, progress->step);
    TF_TRY(path_format(directory, sizeof directory, "%s/%s", run_dir, name));
    TF_TRY(path_format(temporary, sizeof temporary, "%s.tmp", directory));
    /* A leftover of a killed save, or this step saved before (epoch end after a step checkpoint). */
    TF_TRY(remove_checkpoint_directory(run_dir, strrchr(temporary, '/') + 1));
    struct stat info;
    if (stat(directory, &info) == 0) return TF_OK;

    TF_TRY(path_make_directories(temporary));
    TF_TRY(write_checkpoint_files(temporary, model, optimizer, progress, classes, growth_history, crop_pct));
    if (rename(temporary, directory) != 0)
        return tf_fail(TF_ERR_RUNTIME, "cannot rename %s to %s: %s", temporary, directory, strerror(errno));
    TF_TRY(replace_symlink(run_dir, "latest", name));
    TF_TRY(ensure_symlink(run_dir, "model.safetensors", "latest/model.safetensors"));
    TF_TRY(ensure_symlink(run_dir, "state.safetensors", "latest/state.safetensors"));
    return prune_checkpoints(run_dir, name, keep < 1 ? 1 : keep);
}

tf_status run_dir_latest(const char *run_dir, const char *file, char *path, size_t path_size) {
    char link_path[TF_PATH_MAX];
    TF_TRY(path_format(link_path, sizeof link_path, "%s/latest", run_dir));
    struct stat info;
    if (stat(link_path, &info) != 0 || !S_ISDIR(info.st_mode))
        return tf_fail(TF_ERR_USAGE, "%s has no checkpoint to resume from (no %s)", run_dir, link_path);
    return path_format(path, path_size, "%s/%s", link_path, file);
}

/* ---- metrics --------------------------------------------------------------------------------- */

/* Rewrites path keeping the records whose "step" is at most resume_step. */
static tf_status truncate_metrics(const char *path, int64_t resume_step) {
    FILE *in = fopen(path, "r");
    if (!in) return TF_OK; /* no metrics yet */
    char temporary[TF_PATH_MAX];
    TF_TRY(path_format(temporary, sizeof temporary, "%s.tmp", path));
    FILE *out = fopen(temporary, "w");
    if (!out) {
        fclose(in);
        return tf_fail(TF_ERR_RUNTIME, "cannot write %s: %s", temporary, strerror(errno));
    }
    char *line = NULL;
    size_t capacity = 0;
    while (getline(&line, &capacity, in) > 0) {
        cJSON *record = cJSON_Parse(line);
        const cJSON *step = cJSON_GetObjectItemCaseSensitive(record, "step");
        if (cJSON_IsNumber(step) && step->valuedouble <= (double)resume_step) fputs(line, out);
        cJSON_Delete(record);
    }
    free(line);
    fclose(in);
    if (fclose(out) != 0 || rename(temporary, path) != 0)
        return tf_fail(TF_ERR_RUNTIME, "cannot rewrite %s: %s", path, strerror(errno));
    return TF_OK;
}

tf_status run_dir_open_metrics(const char *run_dir, int64_t resume_step, FILE **metrics) {
    char path[TF_PATH_MAX];
    TF_TRY(path_format(path, sizeof path, "%s/metrics.jsonl", run_dir));
    if (resume_step >= 0) TF_TRY(truncate_metrics(path, resume_step));
    *metrics = fopen(path, resume_step >= 0 ? "a" : "w");
    if (!*metrics) return tf_fail(TF_ERR_RUNTIME, "cannot open %s: %s", path, strerror(errno));
    return TF_OK;
}
