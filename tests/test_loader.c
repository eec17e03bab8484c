/* The threaded loader (dataloader/loader.c) on small generated datasets:
 * - the same seed with 1, 2 and 3 workers gives identical batches (train and eval transforms),
 *   and another epoch gives another order and other augmentations;
 * - the eval transform of an image that needs no resizing is its pixels, in CHW;
 * - ranks of a world of 2 get disjoint samples that together cover the epoch (train: whole batches,
 *   the same number on each rank; eval: every image exactly once, last batch partial);
 * - a resumed epoch (first_batch > 0), and an epoch restarted while workers are busy, equal the
 *   same batches of an uninterrupted epoch;
 * - holding every slot of the ring is an error, not a deadlock;
 * - a PNG named .JPEG decodes; a truncated JPEG, an empty file and a header claiming 30000x30000
 *   are each logged once, counted and replaced, and the run goes on; more than 1% bad files is an
 *   error naming the count. */
#include "common/error.h"
#include "common/rng.h"
#include "common/timer.h"
#include "dataloader/loader.h"
#include "test_util.h"
#include "tests/stb_image_write_impl.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <turbojpeg.h>
#include <unistd.h>

static char root[256];

/* ---- generated images ------------------------------------------------------------------------ */

/* Smooth gradients plus noise: JPEG-like content that differs per image. */
static uint8_t *pattern(int width, int height, uint64_t seed) {
    uint8_t *pixels = malloc((size_t)width * height * 3);
    tf_rng rng = tf_rng_make(seed, TF_RNG_TEST, 0, 0);
    int phase = (int)tf_rng_below(&rng, 256);
    for (int y = 0; y < height; y++)
        for (int x = 0; x < width; x++)
            for (int c = 0; c < 3; c++)
                pixels[((size_t)y * width + x) * 3 + c] =
                    (uint8_t)((x * (3 + c) + y * (5 - c) + phase + c * 80 + (int)tf_rng_below(&rng, 24)) &
                              255);
    return pixels;
}

static void write_bytes(const char *path, const void *data, size_t size) {
    FILE *file = fopen(path, "wb");
    if (!file || fwrite(data, 1, size, file) != size) fprintf(stderr, "cannot write %s\n", path);
    if (file) fclose(file);
}

/* A JPEG of a pattern; returns its bytes (tjFree them) so callers can damage copies. */
static unsigned char *make_jpeg(int width, int height, uint64_t seed, int subsampling, unsigned long *size) {
    tjhandle handle = tjInitCompress();
    uint8_t *pixels = pattern(width, height, seed);
    unsigned char *jpeg = NULL;
    *size = 0;
    if (tjCompress2(handle, pixels, width, 0, height, TJPF_RGB, &jpeg, size, subsampling, 90, 0) != 0)
        fprintf(stderr, "tjCompress2: %s\n", tjGetErrorStr2(handle));
    free(pixels);
    tjDestroy(handle);
    return jpeg;
}

static void write_jpeg(const char *path, int width, int height, uint64_t seed, int subsampling) {
    unsigned long size;
    unsigned char *jpeg = make_jpeg(width, height, seed, subsampling, &size);
    write_bytes(path, jpeg, size);
    tjFree(jpeg);
}

static void write_png(const char *path, int width, int height, uint64_t seed) {
    uint8_t *pixels = pattern(width, height, seed);
    if (!stbi_write_png(path, width, height, 3, pixels, width * 3))
        fprintf(stderr, "cannot write %s\n", path);
    free(pixels);
}

/* The JPEG's frame header says width x height; the data stays that of a small image. */
static void write_jpeg_claiming(const char *path, int width, int height) {
    unsigned long size;
    unsigned char *jpeg = make_jpeg(32, 32, 7, TJSAMP_420, &size);
    for (unsigned long i = 2; i + 9 < size;) {
        unsigned marker = jpeg[i + 1], length = (unsigned)jpeg[i + 2] << 8 | jpeg[i + 3];
        if (marker == 0xC0 || marker == 0xC1 || marker == 0xC2) {
            jpeg[i + 5] = (unsigned char)(height >> 8), jpeg[i + 6] = (unsigned char)height;
            jpeg[i + 7] = (unsigned char)(width >> 8), jpeg[i + 8] = (unsigned char)width;
            break;
        }
        i += 2 + length;
    }
    write_bytes(path, jpeg, size);
    tjFree(jpeg);
}

/* ROOT/NAME/train/class_K/NNNN.jpg: `count` JPEGs of assorted sizes, subsamplings and greys over
 * four classes (in order, so class sizes differ by at most one). */
static void make_dataset(const char *name, int count, int min_side, int max_side) {
    static const int subsamplings[] = {TJSAMP_420, TJSAMP_422, TJSAMP_444, TJSAMP_GRAY};
    char path[1024];
    for (int c = 0; c < 4; c++) {
        snprintf(path, sizeof path, "%s/%s/train/class_%d", root, name, c);
        test_make_dirs(path);
    }
    tf_rng rng = tf_rng_make(1, TF_RNG_TEST, 1, 0);
    for (int i = 0; i < count; i++) {
        int width = min_side + (int)tf_rng_below(&rng, (uint64_t)(max_side - min_side + 1));
        int height = min_side + (int)tf_rng_below(&rng, (uint64_t)(max_side - min_side + 1));
        snprintf(path, sizeof path, "%s/%s/train/class_%d/%04d.jpg", root, name, i * 4 / count, i);
        write_jpeg(path, width, height, (uint64_t)i, subsamplings[i % 4]);
    }
}

/* ---- running the loader ---------------------------------------------------------------------- */

static tf_loader_options train_options(int workers) {
    tf_loader_options options = {
        .transform = TF_TRANSFORM_TRAIN,
        .batch_size = 8,
        .image_size = 24,
        .crop_pct = 0.875f,
        .augment = {.scale_min = 0.08f,
                    .scale_max = 1.0f,
                    .ratio_min = 0.75f,
                    .ratio_max = 4.0f / 3.0f,
                    .hflip = 0.5f},
        .seed = 1234,
        .rank = 0,
        .world_size = 1,
        .workers = workers,
        .shuffle = true,
        .drop_last = true,
    };
    snprintf(options.augment.randaugment, sizeof options.augment.randaugment, "rand-m9-mstd0.5-inc1");
    return options;
}

static tf_loader_options eval_options(int workers) {
    tf_loader_options options = train_options(workers);
    options.transform = TF_TRANSFORM_EVAL;
    options.shuffle = options.drop_last = false;
    return options;
}

/* Everything an epoch delivered, batch after batch. */
typedef struct {
    int64_t batches, images;
    uint8_t *pixels;
    int32_t *labels;
    int64_t *indices;
    int *counts;
} epoch_record;

static void epoch_record_free(epoch_record *record) {
    free(record->pixels);
    free(record->labels);
    free(record->indices);
    free(record->counts);
    *record = (epoch_record){0};
}

static tf_status record_epoch(tf_loader *loader, const tf_loader_options *options, int epoch,
                              int64_t first_batch, epoch_record *record) {
    *record = (epoch_record){0};
    size_t image_bytes = 3 * (size_t)options->image_size * options->image_size;
    int64_t capacity = loader_batches_per_epoch(loader) * options->batch_size;
    record->pixels = malloc((size_t)capacity * image_bytes);
    record->labels = malloc((size_t)capacity * sizeof *record->labels);
    record->indices = malloc((size_t)capacity * sizeof *record->indices);
    record->counts = malloc((size_t)loader_batches_per_epoch(loader) * sizeof *record->counts);
    TF_TRY(loader_start_epoch(loader, epoch, first_batch));
    for (;;) {
        tf_batch *batch;
        TF_TRY(loader_next_batch(loader, &batch));
        if (!batch) break;
        if (batch->epoch != epoch || batch->number != first_batch + record->batches)
            return tf_fail(TF_ERR_RUNTIME, "batch %lld of epoch %d arrived as number %lld",
                           (long long)record->batches, batch->epoch, (long long)batch->number);
        memcpy(record->pixels + (size_t)record->images * image_bytes, batch->images,
               (size_t)batch->count * image_bytes);
        memcpy(record->labels + record->images, batch->labels, (size_t)batch->count * sizeof *batch->labels);
        memcpy(record->indices + record->images, batch->indices,
               (size_t)batch->count * sizeof *batch->indices);
        record->counts[record->batches++] = batch->count;
        record->images += batch->count;
        loader_release_batch(loader, batch);
    }
    return TF_OK;
}

static bool records_equal(const epoch_record *a, const epoch_record *b, size_t image_bytes) {
    return a->batches == b->batches && a->images == b->images &&
           memcmp(a->pixels, b->pixels, (size_t)a->images * image_bytes) == 0 &&
           memcmp(a->labels, b->labels, (size_t)a->images * sizeof *a->labels) == 0 &&
           memcmp(a->indices, b->indices, (size_t)a->images * sizeof *a->indices) == 0;
}

static bool open_dataset(const char *name, tf_dataset *dataset) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", root, name);
    return CHECK_OK(dataset_open(dataset, path, "train", 0));
}

/* ---- tests ----------------------------------------------------------------------------------- */

static void test_same_batches_for_any_worker_count(const tf_dataset *dataset, bool train) {
    epoch_record first[2] = {{0}}, other[2] = {{0}};
    for (int workers = 1; workers <= 3; workers++) {
        tf_loader_options options = train ? train_options(workers) : eval_options(workers);
        size_t image_bytes = 3 * (size_t)options.image_size * options.image_size;
        tf_loader *loader;
        if (!CHECK_OK(loader_create(&loader, dataset, &options))) return;
        for (int epoch = 0; epoch < 2; epoch++) {
            epoch_record *record = workers == 1 ? &first[epoch] : &other[epoch];
            CHECK_OK(record_epoch(loader, &options, epoch, 0, record));
            if (workers > 1) {
                CHECK(records_equal(&first[epoch], record, image_bytes),
                      "%s epoch %d: %d workers differ from 1", train ? "train" : "eval", epoch, workers);
                epoch_record_free(record);
            }
        }
        loader_destroy(loader);
    }
    size_t image_bytes = 3 * 24 * 24;
    if (train) {
        CHECK(memcmp(first[0].indices, first[1].indices, (size_t)first[0].images * sizeof(int64_t)) != 0,
              "two epochs in the same order");
        CHECK(memcmp(first[0].pixels, first[1].pixels, (size_t)first[0].images * image_bytes) != 0,
              "two epochs with the same pixels");
    } else {
        bool in_order = true;
        for (int64_t i = 0; i < first[0].images; i++)
            in_order = in_order && first[0].indices[i] == i;
        CHECK(in_order && first[0].images == dataset->count, "eval is not the dataset in order");
        CHECK(records_equal(&first[0], &first[1], image_bytes), "eval differs between epochs");
    }
    for (int i = 0; i < 2; i++)
        epoch_record_free(&first[i]);
}

static void test_eval_pixels(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/exact/train/only", root);
    test_make_dirs(path);
    snprintf(path, sizeof path, "%s/exact/train/only/a.png", root);
    write_png(path, 24, 24, 99);
    tf_dataset dataset;
    if (!open_dataset("exact", &dataset)) return;
    tf_loader_options options = eval_options(1);
    options.crop_pct = 1.0f;
    options.batch_size = 1;
    tf_loader *loader;
    epoch_record record = {0};
    if (CHECK_OK(loader_create(&loader, &dataset, &options))) {
        CHECK_OK(record_epoch(loader, &options, 0, 0, &record));
        uint8_t *expected = pattern(24, 24, 99);
        bool same = record.images == 1;
        for (int i = 0; same && i < 24 * 24; i++)
            for (int c = 0; c < 3; c++)
                same = same && record.pixels[c * 24 * 24 + i] == expected[i * 3 + c];
        CHECK(same, "eval of an image of the output size is not its pixels in CHW");
        free(expected);
        loader_destroy(loader);
    }
    epoch_record_free(&record);
    dataset_close(&dataset);
}

static void test_ranks(const tf_dataset *dataset, bool train) {
    int *seen = calloc((size_t)dataset->count, sizeof *seen);
    int64_t batches[2] = {0}, delivered = 0;
    for (int rank = 0; rank < 2; rank++) {
        tf_loader_options options = train ? train_options(2) : eval_options(2);
        options.rank = rank, options.world_size = 2;
        tf_loader *loader;
        epoch_record record = {0};
        if (!CHECK_OK(loader_create(&loader, dataset, &options))) break;
        CHECK_OK(record_epoch(loader, &options, 3, 0, &record));
        batches[rank] = record.batches;
        delivered += record.images;
        for (int64_t i = 0; i < record.images; i++)
            seen[record.indices[i]]++;
        for (int64_t b = 0; b < record.batches; b++)
            CHECK(record.counts[b] == options.batch_size || (!train && b == record.batches - 1),
                  "rank %d batch %lld has %d images", rank, (long long)b, record.counts[b]);
        epoch_record_free(&record);
        loader_destroy(loader);
    }
    int64_t twice = 0, once = 0;
    for (int64_t i = 0; i < dataset->count; i++)
        twice += seen[i] > 1, once += seen[i] == 1;
    CHECK(twice == 0, "%s: %lld images on both ranks", train ? "train" : "eval", (long long)twice);
    CHECK(batches[0] == batches[1] || !train, "train ranks deliver %lld and %lld batches",
          (long long)batches[0], (long long)batches[1]);
    int64_t expected = train ? dataset->count / 2 / 8 * 8 * 2 : dataset->count;
    CHECK(once == expected && delivered == expected, "%s: %lld distinct of %lld delivered, expected %lld",
          train ? "train" : "eval", (long long)once, (long long)delivered, (long long)expected);
    free(seen);
}

static void test_resume(const tf_dataset *dataset) {
    tf_loader_options options = train_options(2);
    size_t image_bytes = 3 * (size_t)options.image_size * options.image_size;
    tf_loader *loader;
    if (!CHECK_OK(loader_create(&loader, dataset, &options))) return;
    epoch_record full, tail, restarted;
    CHECK_OK(record_epoch(loader, &options, 5, 0, &full));
    CHECK_OK(record_epoch(loader, &options, 5, 2, &tail));
    size_t skip = (size_t)2 * options.batch_size;
    CHECK(tail.batches == full.batches - 2, "resumed epoch has %lld batches, expected %lld",
          (long long)tail.batches, (long long)full.batches - 2);
    CHECK(tail.images > 0 &&
              memcmp(tail.pixels, full.pixels + skip * image_bytes, (size_t)tail.images * image_bytes) == 0 &&
              memcmp(tail.indices, full.indices + skip, (size_t)tail.images * sizeof(int64_t)) == 0,
          "resumed epoch differs from the tail of the full one");

    /* Abandon an epoch after one batch, with workers busy filling the ring, and start it again. */
    tf_batch *batch;
    CHECK_OK(loader_start_epoch(loader, 5, 0));
    CHECK_OK(loader_next_batch(loader, &batch));
    CHECK_OK(record_epoch(loader, &options, 5, 0, &restarted));
    CHECK(records_equal(&full, &restarted, image_bytes), "an epoch restarted mid-way differs");
    loader_release_batch(loader, batch); /* stale: from before the restart, ignored */

    /* Holding every batch of the ring must fail, not hang. */
    tf_batch *held[8] = {0};
    int ring_error = 0;
    CHECK_OK(loader_start_epoch(loader, 6, 0));
    for (int i = 0; i < 8 && !ring_error; i++)
        ring_error = loader_next_batch(loader, &held[i]) != TF_OK;
    CHECK(ring_error && strstr(tf_error_message(), "held"), "holding the whole ring: %s", tf_error_message());
    for (int i = 0; i < 8; i++)
        loader_release_batch(loader, held[i]);
    CHECK_OK(loader_next_batch(loader, &batch));
    loader_release_batch(loader, batch);
    epoch_record_free(&full);
    epoch_record_free(&tail);
    epoch_record_free(&restarted);
    loader_destroy(loader);
}

/* loader_next_batch_ready: false while the next batch is being made or the ring is all held;
 * once it says true, loader_next_batch returns without a wait; true at the epoch's end. */
static void test_next_batch_ready(const tf_dataset *dataset) {
    tf_loader_options options = train_options(2);
    tf_loader *loader;
    if (!CHECK_OK(loader_create(&loader, dataset, &options))) return;
    CHECK_OK(loader_start_epoch(loader, 0, 0));
    int64_t batches = loader_batches_per_epoch(loader), ready_without_wait = 0;
    for (int64_t b = 0; b < batches; b++) {
        double start = tf_seconds();
        while (!loader_next_batch_ready(loader) && tf_seconds() - start < 30.0) usleep(1000);
        int64_t waited = loader_profile(loader).waited_batches;
        tf_batch *batch;
        CHECK_OK(loader_next_batch(loader, &batch));
        ready_without_wait += batch && loader_profile(loader).waited_batches == waited;
        loader_release_batch(loader, batch);
    }
    CHECK(ready_without_wait == batches, "%lld of %lld batches said ready came without a wait",
          (long long)ready_without_wait, (long long)batches);
    CHECK(loader_next_batch_ready(loader), "ready at the epoch's end (loader_next_batch gives NULL at once)");

    tf_batch *held[4] = {0};
    CHECK_OK(loader_start_epoch(loader, 1, 0));
    for (int i = 0; i < 4; i++) CHECK_OK(loader_next_batch(loader, &held[i]));
    CHECK(!loader_next_batch_ready(loader), "not ready while the whole ring (4 batches) is held");
    for (int i = 0; i < 4; i++) loader_release_batch(loader, held[i]);
    loader_destroy(loader);
}

/* Counts the lines of a file that contain needle. */
static int count_lines_with(const char *path, const char *needle) {
    FILE *file = fopen(path, "r");
    char line[8192];
    int count = 0;
    while (file && fgets(line, sizeof line, file))
        count += strstr(line, needle) != NULL;
    if (file) fclose(file);
    return count;
}

static void test_bad_files(void) {
    /* 396 good JPEGs and 4 special files: 3 bad ones (0.75%) and a PNG named .JPEG. */
    make_dataset("bad", 396, 16, 40);
    char bad_paths[3][1024], png_path[1024];
    snprintf(bad_paths[0], sizeof bad_paths[0], "%s/bad/train/class_1/0150.truncated.jpg", root);
    snprintf(bad_paths[1], sizeof bad_paths[1], "%s/bad/train/class_2/0250.empty.jpg", root);
    snprintf(bad_paths[2], sizeof bad_paths[2], "%s/bad/train/class_3/0350.bomb.jpg", root);
    snprintf(png_path, sizeof png_path, "%s/bad/train/class_0/0050.png.JPEG", root);
    unsigned long size;
    unsigned char *jpeg = make_jpeg(64, 48, 5, TJSAMP_420, &size);
    write_bytes(bad_paths[0], jpeg, size / 2);
    tjFree(jpeg);
    write_bytes(bad_paths[1], "", 0);
    write_jpeg_claiming(bad_paths[2], 30000, 30000);
    write_png(png_path, 30, 20, 3);

    tf_dataset dataset;
    if (!open_dataset("bad", &dataset)) return;
    CHECK(dataset.count == 400, "%lld files", (long long)dataset.count);
    int64_t bad_index[3] = {-1, -1, -1}, png_index = -1;
    for (int64_t i = 0; i < dataset.count; i++) {
        for (int b = 0; b < 3; b++)
            if (strcmp(dataset.paths[i], bad_paths[b]) == 0) bad_index[b] = i;
        if (strcmp(dataset.paths[i], png_path) == 0) png_index = i;
    }

    /* Catch the log (stderr) in a file. */
    char log_path[1100];
    snprintf(log_path, sizeof log_path, "%s/bad.log", root);
    fflush(stderr);
    int saved_stderr = dup(2), log_fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(log_fd, 2);

    tf_loader_options options = train_options(2);
    options.batch_size = 16;
    options.image_size = 16;
    tf_loader *loader;
    epoch_record records[2] = {{0}};
    bool created = CHECK_OK(loader_create(&loader, &dataset, &options));
    for (int epoch = 0; created && epoch < 2; epoch++)
        CHECK_OK(record_epoch(loader, &options, epoch, 0, &records[epoch]));
    tf_loader_stats stats = created ? loader_stats(loader) : (tf_loader_stats){0};
    if (created) loader_destroy(loader);

    fflush(stderr);
    dup2(saved_stderr, 2);
    close(saved_stderr);
    close(log_fd);

    CHECK(stats.bad_files == 6, "bad files counted %lld, expected 3 per epoch", (long long)stats.bad_files);
    CHECK(stats.images == 800, "delivered %lld images in two epochs", (long long)stats.images);
    bool png_used = false, bad_used = false;
    for (int e = 0; e < 2; e++)
        for (int64_t i = 0; i < records[e].images; i++) {
            png_used = png_used || records[e].indices[i] == png_index;
            for (int b = 0; b < 3; b++)
                bad_used = bad_used || records[e].indices[i] == bad_index[b];
        }
    CHECK(png_used, "the PNG named .JPEG was not delivered");
    CHECK(!bad_used, "a bad file was delivered");
    for (int b = 0; b < 3; b++)
        CHECK(count_lines_with(log_path, bad_paths[b]) == 1, "%s logged %d times, expected once",
              bad_paths[b], count_lines_with(log_path, bad_paths[b]));
    CHECK(count_lines_with(log_path, "truncated") == 1 && count_lines_with(log_path, "0 bytes") == 1 &&
              count_lines_with(log_path, "over the limit") == 1,
          "the log does not give the reasons (truncated, 0 bytes, over the limit)");
    for (int e = 0; e < 2; e++)
        epoch_record_free(&records[e]);
    dataset_close(&dataset);
}

static void test_too_many_bad_files(void) {
    /* 90 good files and 10 empty ones: 10% bad. */
    make_dataset("worse", 90, 16, 24);
    char path[1024];
    for (int i = 0; i < 10; i++) {
        snprintf(path, sizeof path, "%s/worse/train/class_%d/%04d.empty.jpg", root, i % 4, i * 9);
        write_bytes(path, "", 0);
    }
    tf_dataset dataset;
    if (!open_dataset("worse", &dataset)) return;
    tf_loader_options options = eval_options(2);
    options.batch_size = 10;
    options.image_size = 16;
    tf_loader *loader;
    if (!CHECK_OK(loader_create(&loader, &dataset, &options))) return;
    fflush(stderr);
    int saved_stderr = dup(2), null_fd = open("/dev/null", O_WRONLY);
    dup2(null_fd, 2); /* the ten "skipping" lines are expected */
    tf_status status = loader_start_epoch(loader, 0, 0);
    for (tf_batch *batch = (tf_batch *)1; status == TF_OK && batch;) {
        status = loader_next_batch(loader, &batch);
        if (status == TF_OK && batch) loader_release_batch(loader, batch);
    }
    fflush(stderr);
    dup2(saved_stderr, 2);
    close(saved_stderr);
    close(null_fd);
    CHECK(status != TF_OK, "10%% bad files did not fail the epoch");
    /* Some empty files sort next to each other, so a sample can try several: count >= 10. */
    long long failed = 0, read = 0;
    const char *counts = strstr(tf_error_message(), "/worse/train: ");
    CHECK(counts && sscanf(counts, "/worse/train: %lld of the %lld files", &failed, &read) == 2 &&
              failed >= 10 && failed * 100 > read && strstr(tf_error_message(), "more than 1%"),
          "message does not give the count: %s", tf_error_message());
    loader_destroy(loader);
    dataset_close(&dataset);
}

int main(void) {
    if (!test_make_temp_dir(root, sizeof root, "tf_test_loader"))
        return test_skip("cannot create a temporary directory");
    make_dataset("small", 50, 20, 64);
    tf_dataset dataset;
    if (open_dataset("small", &dataset)) {
        test_same_batches_for_any_worker_count(&dataset, true);
        test_same_batches_for_any_worker_count(&dataset, false);
        test_ranks(&dataset, true);
        test_ranks(&dataset, false);
        test_resume(&dataset);
        test_next_batch_ready(&dataset);
        dataset_close(&dataset);
    }
    test_eval_pixels();
    test_bad_files();
    test_too_many_bad_files();
    test_remove_tree(root);
    return test_finish("test_loader");
}
