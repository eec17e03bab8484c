/* `tokenformer eval`: top-1/top-5 of a checkpoint (or of the EMA weights in the training state
 * beside it) on a split of an ImageFolder tree, through the eval transform. */
#include "cli/args.h"
#include "cli/commands.h"
#include "common/log.h"
#include "common/path.h"
#include "dataloader/loader.h"
#include "eval/evaluate.h"
#include "train/dist.h"
#include "vision/checkpoint.h"
#include "vision/model.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *checkpoint, *data_root, *split, *device, *json_path;
    bool ema;
    int batch, workers;
    int64_t limit; /* > 0: an evenly spread subset of that many images (dataset_open) */
    float crop_pct;
} eval_arguments;

static tf_status parse_arguments(int argc, char **argv, eval_arguments *arguments) {
    cli_parser parser = cli_parser_make(argc, argv);
    const char *value;
    *arguments = (eval_arguments){.split = "val", .batch = 256};
    while (cli_more(&parser)) {
        if (cli_value(&parser, "--ckpt", &arguments->checkpoint)) continue;
        if (cli_value(&parser, "--data", &arguments->data_root)) continue;
        if (cli_value(&parser, "--split", &arguments->split)) continue;
        if (cli_value(&parser, "--device", &arguments->device)) continue;
        if (cli_value(&parser, "--json", &arguments->json_path)) continue;
        if (cli_flag(&parser, "--ema")) {
            arguments->ema = true;
            continue;
        }
        if (cli_value(&parser, "--batch", &value)) {
            arguments->batch = cli_int(&parser, "--batch", value);
            continue;
        }
        if (cli_value(&parser, "--workers", &value)) {
            arguments->workers = cli_int(&parser, "--workers", value);
            continue;
        }
        if (cli_value(&parser, "--limit", &value)) {
            arguments->limit = cli_int(&parser, "--limit", value);
            continue;
        }
        if (cli_value(&parser, "--crop-pct", &value)) {
            arguments->crop_pct = cli_crop_pct(&parser, value);
            continue;
        }
        cli_unknown(&parser);
    }
    TF_TRY(parser.status);
    if (!arguments->checkpoint || !arguments->data_root)
        return tf_fail(TF_ERR_USAGE, "--ckpt FILE.safetensors and --data ROOT are required");
    if (arguments->batch < 1) return tf_fail(TF_ERR_USAGE, "--batch must be at least 1");
    if (arguments->limit < 0) return tf_fail(TF_ERR_USAGE, "--limit must be 0 (all images) or more");
    return TF_OK;
}

/* The EMA weights live in the training state file next to the model file. */
static tf_status load_ema_weights(const char *checkpoint_path, tf_checkpoint *checkpoint) {
    char copy[TF_PATH_MAX], state_path[TF_PATH_MAX];
    TF_TRY(path_format(copy, sizeof copy, "%s", checkpoint_path));
    TF_TRY(path_format(state_path, sizeof state_path, "%s/state.safetensors", dirname(copy)));
    safetensors_file *file;
    tf_status status = safetensors_open(&file, state_path);
    if (status == TF_OK) {
        status = checkpoint_read_params(file, &checkpoint->layout, "ema.", checkpoint->params);
        safetensors_close(file);
    }
    if (status != TF_OK) return tf_fail_context(status, "--ema: no EMA weights for %s", checkpoint_path);
    return TF_OK;
}

/* Writes into out the names of `names` that `others` lacks, quoted, the first few only: a data set of a
 * thousand classes need not be listed whole. */
static void list_names_missing(char *out, size_t size, char *const *names, int count, char *const *others,
                               int other_count) {
    enum { LISTED_MAX = 8 };
    size_t length = 0;
    int missing = 0;
    out[0] = '\0';
    for (int i = 0; i < count; i++) {
        bool found = false;
        for (int j = 0; j < other_count && !found; j++)
            found = strcmp(names[i], others[j]) == 0;
        if (found) continue;
        if (missing++ < LISTED_MAX && length < size)
            length +=
                (size_t)snprintf(out + length, size - length, "%s'%s'", missing > 1 ? ", " : "", names[i]);
    }
    if (missing > LISTED_MAX && length < size)
        snprintf(out + length, size - length, " and %d more", missing - LISTED_MAX);
    if (missing == 0) snprintf(out, size, "none");
}

/* The checkpoint's class names, in index order, must be the data set's folders: the error says
 * which names differ (a renamed folder, a class missing or extra), or, with the same names, where
 * the order differs. */
static tf_status check_classes(const tf_checkpoint *checkpoint, const tf_dataset *dataset) {
    char *const *ours = checkpoint->classes.names, *const *theirs = dataset->class_names;
    int our_count = checkpoint->classes.count, their_count = dataset->class_count;
    bool same = our_count == their_count;
    for (int c = 0; same && c < our_count; c++)
        same = strcmp(ours[c], theirs[c]) == 0;
    if (same) return TF_OK;
    char only_ours[1024], only_theirs[1024];
    list_names_missing(only_ours, sizeof only_ours, ours, our_count, theirs, their_count);
    list_names_missing(only_theirs, sizeof only_theirs, theirs, their_count, ours, our_count);
    if (our_count == their_count && strcmp(only_ours, "none") == 0) {
        int c = 0;
        while (strcmp(ours[c], theirs[c]) == 0)
            c++;
        return tf_fail(TF_ERR_USAGE,
                       "the classes of the checkpoint and of %s are in another order: class %d is '%s' in "
                       "the checkpoint but '%s' in the data set",
                       dataset->directory, c, ours[c], theirs[c]);
    }
    return tf_fail(
        TF_ERR_USAGE,
        "the checkpoint's classes differ from the class folders of %s: the checkpoint has %d classes, the "
        "data set %d; only in the checkpoint: %s; only in the data set: %s",
        dataset->directory, our_count, their_count, only_ours, only_theirs);
}

static tf_status write_json(const char *path, const eval_arguments *arguments,
                            const tf_checkpoint *checkpoint, const tf_eval_result *result) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "checkpoint", arguments->checkpoint);
    cJSON_AddBoolToObject(root, "ema", arguments->ema);
    cJSON_AddStringToObject(root, "split", arguments->split);
    cJSON_AddNumberToObject(root, "images", (double)result->images);
    cJSON_AddNumberToObject(root, "top1", eval_top1(result));
    cJSON_AddNumberToObject(root, "top5", eval_top5(result));
    cJSON_AddNumberToObject(root, "loss", eval_loss(result));
    cJSON_AddNumberToObject(root, "images_per_second",
                            result->seconds > 0 ? result->images / result->seconds : 0);
    cJSON_AddNumberToObject(root, "data_wait_percent", eval_data_wait(result));
    cJSON *classes = cJSON_AddArrayToObject(root, "per_class");
    cJSON *confusion = cJSON_AddArrayToObject(root, "confusion");
    for (int c = 0; c < result->classes; c++) {
        cJSON *entry = cJSON_CreateObject();
        cJSON_AddStringToObject(entry, "class", checkpoint->classes.names[c]);
        cJSON_AddNumberToObject(entry, "images", (double)result->class_images[c]);
        cJSON_AddNumberToObject(
            entry, "top1",
            result->class_images[c] ? 100.0 * result->class_correct[c] / result->class_images[c] : 0.0);
        cJSON_AddItemToArray(classes, entry);
        cJSON *row = cJSON_CreateArray();
        for (int p = 0; p < result->classes; p++)
            cJSON_AddItemToArray(
                row, cJSON_CreateNumber((double)result->confusion[(size_t)c * result->classes + p]));
        cJSON_AddItemToArray(confusion, row);
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    FILE *file = fopen(path, "w");
    tf_status status = TF_OK;
    if (!file || fputs(text, file) < 0 || fputc('\n', file) < 0)
        status = tf_fail(TF_ERR_RUNTIME, "cannot write %s: %s", path, strerror(errno));
    if (file && fclose(file) != 0 && status == TF_OK)
        status = tf_fail(TF_ERR_RUNTIME, "cannot write %s: %s", path, strerror(errno));
    cJSON_free(text);
    return status;
}

/* Under a multi-process launcher (train/dist.h) every rank evaluates its share of the split and
 * the counts are summed; the ranks must agree on what they evaluate. */
static tf_status open_process_group(const eval_arguments *arguments, tf_dist **dist) {
    uint64_t fingerprint = TF_DIST_HASH_START;
    const char *parts[] = {arguments->checkpoint, arguments->data_root, arguments->split};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        fingerprint = dist_hash(parts[i], strlen(parts[i]) + 1, fingerprint);
    int numbers[] = {arguments->batch, arguments->ema, arguments->limit};
    fingerprint = dist_hash(numbers, sizeof numbers, fingerprint);
    return dist_join(dist, fingerprint);
}

static tf_status run_eval(const eval_arguments *arguments, tf_dist *dist, tf_checkpoint *checkpoint,
                          tf_dataset *dataset, tf_model *model, tf_loader **loader, tf_eval_result *result) {
    tf_device device = TF_DEVICE_AUTO;
    TF_TRY(cli_device(arguments->device, &device));
    if (dist_world_size(dist) > 1) device = TF_DEVICE_CUDA;
    TF_TRY(checkpoint_load(arguments->checkpoint, checkpoint));
    if (arguments->ema) TF_TRY(load_ema_weights(arguments->checkpoint, checkpoint));
    TF_TRY(dataset_open(dataset, arguments->data_root, arguments->split, arguments->limit));
    TF_TRY(check_classes(checkpoint, dataset));
    const tf_backend *backend;
    TF_TRY(tf_backend_open(device, 0, &backend));
    TF_TRY(model_create(model, &checkpoint->config, backend, arguments->batch, false));
    model_set_params(model, checkpoint->params);
    float crop_pct = arguments->crop_pct > 0    ? arguments->crop_pct
                     : checkpoint->crop_pct > 0 ? checkpoint->crop_pct
                                                : 0.875f;
    tf_loader_options options = {
        .transform = TF_TRANSFORM_EVAL,
        .batch_size = arguments->batch,
        .image_size = checkpoint->config.img_size,
        .crop_pct = crop_pct,
        .rank = dist_rank(dist),
        .world_size = dist_world_size(dist),
        .workers = arguments->workers,
        .host_alloc = backend->host_alloc,
        .host_free = backend->host_free,
    };
    TF_TRY(loader_create(loader, dataset, &options));
    bool main_rank = dist_is_main(dist);
    if (main_rank)
        tf_log("evaluating %s%s on %" PRId64 " images of %s (%s x %d, crop_pct %.3f)", arguments->checkpoint,
               arguments->ema ? " (EMA weights)" : "", dataset->count, dataset->directory, backend->name,
               dist_world_size(dist), crop_pct);
    TF_TRY(eval_result_init(result, checkpoint->config.classes));
    TF_TRY(evaluate(model, *loader, result));
    TF_TRY(eval_result_all_reduce(result, dist));
    if (!main_rank) return TF_OK;
    printf("images: %" PRId64 "\nimages/s: %.1f\ndata wait: %.0f%%\nloss: %.4f\ntop-5: %.2f%%\ntop-1: %.2f%%\n",
           result->images, result->seconds > 0 ? result->images / result->seconds : 0.0, eval_data_wait(result),
           eval_loss(result), eval_top5(result), eval_top1(result));
    if (arguments->json_path) TF_TRY(write_json(arguments->json_path, arguments, checkpoint, result));
    return TF_OK;
}

int cmd_eval(int argc, char **argv) {
    eval_arguments arguments;
    tf_checkpoint checkpoint = {0};
    tf_dataset dataset = {0};
    tf_model model = {0};
    tf_loader *loader = NULL;
    tf_eval_result result = {0};
    tf_dist *dist = NULL;
    tf_status status = parse_arguments(argc, argv, &arguments);
    if (status == TF_OK) status = open_process_group(&arguments, &dist);
    if (status == TF_OK) status = run_eval(&arguments, dist, &checkpoint, &dataset, &model, &loader, &result);
    if (status != TF_OK) dist_abort(dist, tf_error_message()); /* returns at world size 1 */
    tf_status finished = dist_finish(dist);
    if (status == TF_OK) status = finished;
    if (loader) loader_destroy(loader);
    if (model.backend) model_destroy(&model);
    eval_result_free(&result);
    dataset_close(&dataset);
    checkpoint_free(&checkpoint);
    return cli_report("eval", status);
}
