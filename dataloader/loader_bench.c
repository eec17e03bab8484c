/* `tokenformer bench loader`: how fast the loader delivers batches when the consumer takes them
 * as fast as it can, and where the workers' time goes.
 *
 *   tokenformer bench loader --data DIR [--split train] [--transform train|eval] [--workers N]
 *                            [--batches K] [--batch B] [--size 224] [--randaugment SPEC]
 *                            [--crop-pct 0.875] [--seed S] [--limit N]
 *
 * The augmentation defaults are the config defaults (the MAE recipe). Throughput is measured from
 * the first delivered batch to the last (the first batch is the warm-up: threads start, buffers
 * grow); an epoch that ends before K batches is followed by the next. */
#include "cli/commands.h"
#include "common/config.h"
#include "common/error.h"
#include "common/timer.h"
#include "dataloader/loader.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *data, *split;
    tf_transform_kind transform;
    int workers, batch, size;
    int64_t batches, limit;
    float crop_pct;
    char randaugment[64];
    uint64_t seed;
} bench_options;

static tf_status parse_number(const char *option, const char *text, double minimum, double *value) {
    char *end;
    errno = 0;
    double parsed = strtod(text, &end);
    if (errno || end == text || *end || parsed < minimum)
        return tf_fail(TF_ERR_USAGE, "%s %s: expected a number >= %g", option, text, minimum);
    *value = parsed;
    return TF_OK;
}

static tf_status parse_bench_options(int argc, char **argv, const tf_config *defaults,
                                     bench_options *options) {
    *options = (bench_options){.split = "train",
                               .transform = TF_TRANSFORM_TRAIN,
                               .batch = 256,
                               .size = 224,
                               .batches = 100,
                               .crop_pct = defaults->data.crop_pct};
    snprintf(options->randaugment, sizeof options->randaugment, "%s", defaults->augment.randaugment);
    for (int i = 1; i < argc; i++) {
        const char *option = argv[i];
        if (i + 1 >= argc) return tf_fail(TF_ERR_USAGE, "%s needs a value", option);
        const char *value = argv[++i];
        double number = 0;
        if (strcmp(option, "--data") == 0)
            options->data = value;
        else if (strcmp(option, "--split") == 0)
            options->split = value;
        else if (strcmp(option, "--randaugment") == 0)
            snprintf(options->randaugment, sizeof options->randaugment, "%s", value);
        else if (strcmp(option, "--transform") == 0) {
            if (strcmp(value, "train") != 0 && strcmp(value, "eval") != 0)
                return tf_fail(TF_ERR_USAGE, "--transform %s: train or eval", value);
            options->transform = strcmp(value, "train") == 0 ? TF_TRANSFORM_TRAIN : TF_TRANSFORM_EVAL;
        } else if (strcmp(option, "--workers") == 0) {
            TF_TRY(parse_number(option, value, 0, &number));
            options->workers = (int)number;
        } else if (strcmp(option, "--batches") == 0) {
            TF_TRY(parse_number(option, value, 2, &number));
            options->batches = (int64_t)number;
        } else if (strcmp(option, "--batch") == 0) {
            TF_TRY(parse_number(option, value, 1, &number));
            options->batch = (int)number;
        } else if (strcmp(option, "--size") == 0) {
            TF_TRY(parse_number(option, value, 1, &number));
            options->size = (int)number;
        } else if (strcmp(option, "--crop-pct") == 0) {
            TF_TRY(parse_number(option, value, 0, &number));
            options->crop_pct = (float)number;
        } else if (strcmp(option, "--seed") == 0) {
            TF_TRY(parse_number(option, value, 0, &number));
            options->seed = (uint64_t)number;
        } else if (strcmp(option, "--limit") == 0) {
            TF_TRY(parse_number(option, value, 0, &number));
            options->limit = (int64_t)number;
        } else {
            return tf_fail(TF_ERR_USAGE, "unknown option %s ('tokenformer help bench')", option);
        }
    }
    if (!options->data) return tf_fail(TF_ERR_USAGE, "--data DIR is required");
    return TF_OK;
}

static tf_loader_options loader_options_for(const bench_options *bench, const tf_config *defaults) {
    tf_loader_options options = {
        .transform = bench->transform,
        .batch_size = bench->batch,
        .image_size = bench->size,
        .crop_pct = bench->crop_pct,
        .augment = defaults->augment,
        .seed = bench->seed,
        .rank = 0,
        .world_size = 1,
        .workers = bench->workers,
        .shuffle = bench->transform == TF_TRANSFORM_TRAIN,
        .drop_last = bench->transform == TF_TRANSFORM_TRAIN,
    };
    snprintf(options.augment.randaugment, sizeof options.augment.randaugment, "%s", bench->randaugment);
    return options;
}

/* Takes `count` batches (starting new epochs as needed) and releases each at once. */
static tf_status consume_batches(tf_loader *loader, int64_t count, int *epoch, int64_t *images) {
    for (int64_t taken = 0; taken < count;) {
        tf_batch *batch;
        TF_TRY(loader_next_batch(loader, &batch));
        if (!batch) {
            TF_TRY(loader_start_epoch(loader, ++*epoch, 0));
            continue;
        }
        *images += batch->count;
        loader_release_batch(loader, batch);
        taken++;
    }
    return TF_OK;
}

static void print_report(const bench_options *bench, const tf_dataset *dataset, tf_loader *loader,
                         int64_t images, double seconds, tf_loader_stats warmup) {
    tf_loader_stats stats = loader_stats(loader);
    tf_loader_profile profile = loader_profile(loader);
    double rate = (double)images / seconds;
    double bytes = stats.read_bytes - warmup.read_bytes;
    double worker_total = profile.read_seconds + profile.decode_seconds + profile.transform_seconds;
    double per_image = profile.samples > 0 ? 1e3 / (double)profile.samples : 0.0;
    printf("bench loader: %s (%lld images, %d classes), %s transform%s%s, %dx%d, batch %d, %d workers\n",
           dataset->directory, (long long)dataset->count, dataset->class_count,
           bench->transform == TF_TRANSFORM_TRAIN ? "train" : "eval",
           bench->transform == TF_TRANSFORM_TRAIN ? " + RandAugment " : "",
           bench->transform == TF_TRANSFORM_TRAIN ? bench->randaugment : "", bench->size, bench->size,
           bench->batch, profile.workers);
    printf("  images          %lld in %.3f s (after one batch of warm-up)\n", (long long)images, seconds);
    printf("  throughput      %.1f img/s, %.1f img/s per worker\n", rate, rate / profile.workers);
    printf("  read            %.1f MB/s (%.1f KB per image)\n", bytes / seconds / 1e6,
           bytes / (double)images / 1024.0);
    printf("  consumer waited %lld of %lld batches, %.3f s in total\n", (long long)profile.waited_batches,
           (long long)(bench->batches), stats.wait_seconds);
    if (worker_total > 0)
        printf("  worker time     read %.1f%%, decode %.1f%%, transform %.1f%% (per image: %.3f + %.3f + "
               "%.3f ms)\n",
               100 * profile.read_seconds / worker_total, 100 * profile.decode_seconds / worker_total,
               100 * profile.transform_seconds / worker_total, profile.read_seconds * per_image,
               profile.decode_seconds * per_image, profile.transform_seconds * per_image);
    printf("  bad files       %lld\n", (long long)stats.bad_files);
}

static tf_status run_bench(const bench_options *bench, const tf_config *defaults) {
    tf_dataset dataset;
    TF_TRY(dataset_open(&dataset, bench->data, bench->split, bench->limit));
    tf_loader_options options = loader_options_for(bench, defaults);
    tf_loader *loader = NULL;
    tf_status status = loader_create(&loader, &dataset, &options);
    int epoch = 0;
    int64_t warmup_images = 0, images = 0;
    if (status == TF_OK) status = loader_start_epoch(loader, epoch, 0);
    if (status == TF_OK) status = consume_batches(loader, 1, &epoch, &warmup_images);
    tf_loader_stats warmup = status == TF_OK ? loader_stats(loader) : (tf_loader_stats){0};
    double started = tf_seconds();
    if (status == TF_OK) status = consume_batches(loader, bench->batches - 1, &epoch, &images);
    double seconds = tf_seconds() - started;
    if (status == TF_OK) print_report(bench, &dataset, loader, images, seconds, warmup);
    loader_destroy(loader);
    dataset_close(&dataset);
    return status;
}

int loader_bench_main(int argc, char **argv) {
    tf_config defaults;
    config_defaults(&defaults);
    bench_options bench;
    tf_status status = parse_bench_options(argc, argv, &defaults, &bench);
    if (status == TF_OK) status = run_bench(&bench, &defaults);
    return cli_report("bench loader", status);
}
