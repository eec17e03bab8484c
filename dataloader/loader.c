/* The threaded loader (loader.h): a persistent pool of worker threads that read, decode and
 * transform images straight into a ring of batch slots, and a consumer that takes the batches
 * strictly in order.
 *
 * How work is shared: an epoch on this rank is a list of sample positions; positions are claimed
 * in chunks of a few consecutive samples of one batch through one atomic counter, in order, so
 * the earliest batches fill first. A chunk of batch b goes into slot b % ring once the consumer has
 * released batch b - ring from it. When a chunk is written, the slot's completion counter is
 * raised by the chunk's size; the worker that completes a batch wakes the consumer. So the
 * per-image path takes no lock and allocates nothing (once the worker's buffers have grown), and
 * costs at most one atomic operation per sample (two per chunk). Locks and condition variables are
 * used once per batch, and when a thread has to wait.
 *
 * Determinism: the epoch's order comes from tf_rng_make(seed, SHUFFLE, epoch, 0), the augmentation
 * of the sample at dataset index i from tf_rng_make(seed, AUGMENT, epoch, i); neither depends on
 * which worker does the work, or when.
 *
 * Bad files: a file that cannot be read or decoded (empty, truncated, corrupt, unknown format,
 * over the pixel limit) is logged once per file, counted, and replaced by the next file of the
 * dataset (index + 1, + 2, ...), transformed with the random numbers of the sample it replaces, so
 * the replacement depends only on the dataset. The counts reach the consumer with each batch, and
 * loader_next_batch fails once more than 1% of the files tried so far failed, judged after
 * LOADER_BAD_FILE_MIN_SEEN files or at the end of an epoch, whichever comes first (a few bad files
 * early in a run must not stop it). libjpeg warnings that leave a complete image are logged once
 * and the image is used (decode.c says why). */
#include "dataloader/loader.h"

#include "common/log.h"
#include "common/rng.h"
#include "common/timer.h"
#include "dataloader/decode.h"
#include "dataloader/image.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum {
    LOADER_DEFAULT_RING = 4,
    LOADER_MAX_CHUNK = 8,             /* samples per claim */
    LOADER_MAX_REPLACEMENTS = 64,     /* files tried for one sample before giving up */
    LOADER_BAD_FILE_MIN_SEEN = 10000, /* files seen before the 1% rule applies mid-epoch */
    LOADER_FILE_LOGGED_BAD = 1,       /* file_flags bits */
    LOADER_FILE_LOGGED_WARNING = 2,
};

typedef struct {
    tf_batch batch;              /* first member: loader_release_batch finds the slot from it */
    _Atomic int64_t fill_number; /* the batch the workers may write here; -1: none */
    atomic_int done;             /* samples of fill_number written */
    int count;                   /* samples of fill_number */
    int generation;              /* loader generation when it was delivered */
    uint32_t *bytes_read;        /* per position: file bytes read for the sample */
    uint16_t *files_tried, *files_failed;
    atomic_int failed; /* a sample could not be produced at all */
    char error[1024];
} loader_slot;

typedef struct {
    tf_loader *loader;
    pthread_t thread;
    tf_decoder *decoder;
    uint8_t *file;
    size_t file_capacity;
    tf_image decoded, resized, scratch, augment_scratch;
    /* Written by this worker only (plain load + store), read by loader_profile(). */
    _Atomic uint64_t read_ns, decode_ns, transform_ns, samples;
} loader_worker;

struct tf_loader {
    const tf_dataset *dataset;
    tf_loader_options options;
    tf_randaugment randaugment;
    int worker_count, threads_started, ring, chunk, chunks_per_batch;
    size_t image_bytes;
    uint8_t *images; /* [ring, batch_size, 3, size, size] */
    loader_slot *slots;
    loader_worker *workers;
    int64_t *permutation;        /* [dataset->count], the epoch's order of the whole dataset */
    int64_t *order;              /* [rank_samples], this rank's share */
    int64_t rank_samples;        /* samples this rank delivers per epoch */
    int64_t batches;             /* batches this rank delivers per epoch */
    _Atomic uint8_t *file_flags; /* [dataset->count], what was logged about each file */

    /* Epoch state: changed under the lock while every worker is idle. */
    pthread_mutex_t lock;
    pthread_cond_t work_ready;   /* workers wait here for an epoch */
    pthread_cond_t workers_idle; /* loader_start_epoch waits here for the workers to stop */
    pthread_cond_t slot_changed; /* a batch completed, or a slot was freed */
    int generation, idle;
    bool started, shutdown;
    atomic_bool abort; /* workers stop claiming and leave slot waits */
    int epoch;
    int64_t chunk_total;
    atomic_llong next_chunk;

    /* Consumer side. */
    int64_t next_batch;
    int held;
    tf_loader_stats stats;
    int64_t files_seen, waited_batches;
};

/* ---- epoch order ----------------------------------------------------------------------------- */

/* Samples of batch `number` on this rank: batch_size except a last partial batch. */
static int batch_count(const tf_loader *loader, int64_t number) {
    int64_t remaining = loader->rank_samples - number * loader->options.batch_size;
    return remaining < loader->options.batch_size ? (int)remaining : loader->options.batch_size;
}

/* Rank r of W takes positions r, r + W, r + 2W, ... of the epoch's permutation. Training
 * (drop_last) gives every rank floor(N / W) positions and whole batches only, so all ranks step
 * together; evaluation keeps every position, so each image counts exactly once over all ranks. */
static void plan_epoch_sizes(tf_loader *loader) {
    int64_t n = loader->dataset->count, w = loader->options.world_size, r = loader->options.rank;
    int64_t b = loader->options.batch_size;
    if (loader->options.drop_last) {
        loader->batches = n / w / b;
        loader->rank_samples = loader->batches * b;
    } else {
        loader->rank_samples = (n - r + w - 1) / w;
        loader->batches = (loader->rank_samples + b - 1) / b;
    }
}

static void build_epoch_order(tf_loader *loader, int epoch) {
    int64_t n = loader->dataset->count;
    for (int64_t i = 0; i < n; i++)
        loader->permutation[i] = i;
    if (loader->options.shuffle) {
        tf_rng rng = tf_rng_make(loader->options.seed, TF_RNG_SHUFFLE, (uint64_t)epoch, 0);
        for (int64_t i = n - 1; i > 0; i--) { /* Fisher-Yates */
            int64_t j = (int64_t)tf_rng_below(&rng, (uint64_t)i + 1);
            int64_t t = loader->permutation[i];
            loader->permutation[i] = loader->permutation[j];
            loader->permutation[j] = t;
        }
    }
    for (int64_t k = 0; k < loader->rank_samples; k++)
        loader->order[k] = loader->permutation[loader->options.rank + k * loader->options.world_size];
}

/* ---- one sample ------------------------------------------------------------------------------ */

static uint64_t elapsed_ns(double from, double to) {
    return (uint64_t)((to - from) * 1e9);
}

/* Adds to a counter that only this thread writes: no read-modify-write instruction needed. */
static void add_own(_Atomic uint64_t *counter, uint64_t amount) {
    atomic_store_explicit(counter, atomic_load_explicit(counter, memory_order_relaxed) + amount,
                          memory_order_relaxed);
}

static void log_file_once(tf_loader *loader, int64_t index, uint8_t flag, const char *format,
                          const char *message) {
    uint8_t before = atomic_fetch_or(&loader->file_flags[index], flag);
    if (!(before & flag)) tf_log(format, message);
}

/* Where the output comes from in the decoded image. Train: the crop box (scaled with the decode).
 * Eval: the size the whole decoded image is resized to, and the crop of that. */
typedef struct {
    tf_box box;
    int resize_width, resize_height, crop_left, crop_top;
} sample_geometry;

/* Works out the geometry from the full-size dimensions, and the smallest decode scale that keeps
 * the resize a reduction: train, the crop box scaled must still cover image_size in both
 * directions; eval, the decoded shorter side must stay >= the resize target. */
static double plan_geometry(const tf_loader_options *options, const tf_image_info *info, tf_rng *rng,
                            sample_geometry *geometry) {
    int size = options->image_size;
    if (options->transform == TF_TRANSFORM_TRAIN) {
        geometry->box = image_random_resized_crop_box(info->width, info->height, &options->augment, rng);
        double need_x = size / geometry->box.width, need_y = size / geometry->box.height;
        return need_x > need_y ? need_x : need_y;
    }
    image_eval_geometry(info->width, info->height, size, options->crop_pct, &geometry->resize_width,
                        &geometry->resize_height, &geometry->crop_left, &geometry->crop_top);
    int target =
        geometry->resize_width < geometry->resize_height ? geometry->resize_width : geometry->resize_height;
    int shorter = info->width < info->height ? info->width : info->height;
    return (double)target / shorter;
}

/* Reads and decodes dataset file `index` at the scale the transform allows, and works out the
 * geometry. Failures here are the file's fault. */
static tf_status read_and_decode(loader_worker *worker, int64_t index, tf_rng *rng, sample_geometry *geometry,
                                 uint32_t *bytes) {
    tf_loader *loader = worker->loader;
    const char *path = loader->dataset->paths[index];
    double started = tf_seconds();
    size_t size;
    TF_TRY(decode_read_file(path, &worker->file, &worker->file_capacity, &size));
    *bytes += (uint32_t)size;
    double read = tf_seconds();
    add_own(&worker->read_ns, elapsed_ns(started, read));

    tf_image_info info;
    TF_TRY(decoder_read_header(worker->decoder, worker->file, size, path, &info));
    double scale = decoder_choose_scale(&info, plan_geometry(&loader->options, &info, rng, geometry));
    const char *warning = NULL;
    TF_TRY(
        decoder_decode(worker->decoder, worker->file, size, path, &info, scale, &worker->decoded, &warning));
    if (warning) {
        char message[TF_PATH_MAX + 300];
        snprintf(message, sizeof message, "%s: %s", path, warning);
        log_file_once(loader, index, LOADER_FILE_LOGGED_WARNING,
                      "loader: using %s (a libjpeg warning; decoded whole)", message);
    }
    /* The decoded image maps to the full-size one by exactly `scale` (decoder_choose_scale). */
    tf_box *box = &geometry->box;
    box->left *= scale, box->top *= scale, box->width *= scale, box->height *= scale;
    add_own(&worker->decode_ns, elapsed_ns(read, tf_seconds()));
    return TF_OK;
}

/* The transform after decoding; failures here are ours, not the file's. */
static tf_status transform(loader_worker *worker, tf_rng *rng, const sample_geometry *geometry,
                           uint8_t *chw) {
    tf_loader *loader = worker->loader;
    const tf_loader_options *options = &loader->options;
    int size = options->image_size;
    double started = tf_seconds();
    if (options->transform == TF_TRANSFORM_TRAIN) {
        TF_TRY(image_resized_crop_bicubic(&worker->decoded, geometry->box, size, size, &worker->resized,
                                          &worker->scratch));
        if (tf_rng_uniform(rng) < options->augment.hflip) image_flip_horizontal(&worker->resized);
        if (loader->randaugment.enabled)
            TF_TRY(randaugment_apply(&worker->resized, &loader->randaugment, rng, &worker->augment_scratch));
    } else {
        TF_TRY(image_resize_then_crop_bicubic(
            &worker->decoded, geometry->resize_width, geometry->resize_height, geometry->crop_left,
            geometry->crop_top, size, size, &worker->resized, &worker->scratch));
    }
    image_to_chw(&worker->resized, chw);
    add_own(&worker->transform_ns, elapsed_ns(started, tf_seconds()));
    return TF_OK;
}

/* Records a failure that no replacement can fix; the consumer reports it with the batch. */
static void fail_slot(loader_slot *slot, const char *message) {
    if (atomic_exchange(&slot->failed, 1) == 0) snprintf(slot->error, sizeof slot->error, "%s", message);
}

/* Produces position k of batch `number` in slot. */
static void produce_sample(loader_worker *worker, loader_slot *slot, int64_t number, int k) {
    tf_loader *loader = worker->loader;
    const tf_dataset *dataset = loader->dataset;
    int64_t index = loader->order[number * loader->options.batch_size + k];
    uint8_t *chw = slot->batch.images + (size_t)k * loader->image_bytes;
    const tf_rng sample_rng =
        tf_rng_make(loader->options.seed, TF_RNG_AUGMENT, (uint64_t)loader->epoch, (uint64_t)index);
    uint32_t bytes = 0;
    int tried = 0, failed = 0;
    bool produced = false;
    while (tried < LOADER_MAX_REPLACEMENTS && !produced) {
        int64_t candidate = (index + tried) % dataset->count;
        tried++;
        tf_rng rng = sample_rng; /* a replacement draws what the replaced sample would have */
        sample_geometry geometry = {0};
        if (read_and_decode(worker, candidate, &rng, &geometry, &bytes) != TF_OK) {
            failed++;
            log_file_once(loader, candidate, LOADER_FILE_LOGGED_BAD,
                          "loader: skipping %s (replaced by the next image)", tf_error_message());
            continue;
        }
        if (transform(worker, &rng, &geometry, chw) != TF_OK) {
            fail_slot(slot, tf_error_message());
            break;
        }
        slot->batch.labels[k] = dataset->labels[candidate];
        slot->batch.indices[k] = candidate;
        produced = true;
    }
    if (!produced && !atomic_load(&slot->failed)) {
        char message[512];
        snprintf(message, sizeof message, "%d consecutive files from %s could not be loaded (see the log)",
                 tried, dataset->paths[index]);
        fail_slot(slot, message);
    }
    slot->bytes_read[k] = bytes;
    slot->files_tried[k] = (uint16_t)tried;
    slot->files_failed[k] = (uint16_t)failed;
    add_own(&worker->samples, 1);
}

/* ---- workers --------------------------------------------------------------------------------- */

/* Waits until slot may take batch `number`; false when the epoch is being abandoned. */
static bool wait_for_slot(tf_loader *loader, loader_slot *slot, int64_t number) {
    if (atomic_load_explicit(&slot->fill_number, memory_order_acquire) == number) return true;
    pthread_mutex_lock(&loader->lock);
    while (atomic_load_explicit(&slot->fill_number, memory_order_acquire) != number &&
           !atomic_load(&loader->abort))
        pthread_cond_wait(&loader->slot_changed, &loader->lock);
    pthread_mutex_unlock(&loader->lock);
    return !atomic_load(&loader->abort);
}

/* Claims and produces chunks until the epoch has none left or is abandoned. */
static void worker_run_epoch(loader_worker *worker) {
    tf_loader *loader = worker->loader;
    while (!atomic_load_explicit(&loader->abort, memory_order_relaxed)) {
        int64_t chunk = atomic_fetch_add(&loader->next_chunk, 1);
        if (chunk >= loader->chunk_total) return;
        int64_t number = chunk / loader->chunks_per_batch;
        int first = (int)(chunk % loader->chunks_per_batch) * loader->chunk;
        int count = batch_count(loader, number);
        int last = first + loader->chunk < count ? first + loader->chunk : count;
        if (first >= last) continue; /* past the end of a partial last batch */
        loader_slot *slot = &loader->slots[number % loader->ring];
        if (!wait_for_slot(loader, slot, number)) return;
        for (int k = first; k < last; k++)
            produce_sample(worker, slot, number, k);
        int done =
            atomic_fetch_add_explicit(&slot->done, last - first, memory_order_acq_rel) + (last - first);
        if (done == count) {
            pthread_mutex_lock(&loader->lock);
            pthread_cond_broadcast(&loader->slot_changed);
            pthread_mutex_unlock(&loader->lock);
        }
    }
}

static void *worker_main(void *argument) {
    loader_worker *worker = argument;
    tf_loader *loader = worker->loader;
    int seen_generation = 0;
    pthread_mutex_lock(&loader->lock);
    for (;;) {
        loader->idle++;
        pthread_cond_broadcast(&loader->workers_idle);
        while (!loader->shutdown && loader->generation == seen_generation)
            pthread_cond_wait(&loader->work_ready, &loader->lock);
        loader->idle--;
        if (loader->shutdown) break;
        seen_generation = loader->generation;
        pthread_mutex_unlock(&loader->lock);
        worker_run_epoch(worker);
        pthread_mutex_lock(&loader->lock);
    }
    pthread_mutex_unlock(&loader->lock);
    return NULL;
}

/* ---- creation -------------------------------------------------------------------------------- */

static tf_status check_options(const tf_dataset *dataset, const tf_loader_options *options) {
    if (options->batch_size < 1 || options->image_size < 1)
        return tf_fail(TF_ERR_USAGE, "loader: batch size %d and image size %d must be positive",
                       options->batch_size, options->image_size);
    if (options->world_size < 1 || options->rank < 0 || options->rank >= options->world_size)
        return tf_fail(TF_ERR_USAGE, "loader: rank %d of world size %d", options->rank, options->world_size);
    if (options->transform == TF_TRANSFORM_EVAL && !(options->crop_pct > 0.0f && options->crop_pct <= 1.0f))
        return tf_fail(TF_ERR_USAGE, "loader: crop_pct %g is not in (0, 1]", options->crop_pct);
    if (dataset->count < 1) return tf_fail(TF_ERR_USAGE, "loader: %s has no images", dataset->directory);
    return TF_OK;
}

static int default_workers(void) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    return cores > 2 ? (int)cores - 1 : 1;
}

static tf_status allocate_slots(tf_loader *loader) {
    const tf_loader_options *options = &loader->options;
    size_t batch_bytes = (size_t)options->batch_size * loader->image_bytes;
    size_t total = batch_bytes * (size_t)loader->ring;
    if (options->host_alloc) {
        TF_TRY(options->host_alloc((void **)&loader->images, total));
    } else {
        loader->images = malloc(total);
        if (!loader->images)
            return tf_fail(TF_ERR_RUNTIME, "loader: out of memory for a ring of %zu bytes", total);
    }
    loader->slots = calloc((size_t)loader->ring, sizeof *loader->slots);
    if (!loader->slots) return tf_fail(TF_ERR_RUNTIME, "loader: out of memory");
    size_t b = (size_t)options->batch_size;
    for (int s = 0; s < loader->ring; s++) {
        loader_slot *slot = &loader->slots[s];
        slot->batch.images = loader->images + (size_t)s * batch_bytes;
        slot->batch.labels = malloc(b * sizeof *slot->batch.labels);
        slot->batch.indices = malloc(b * sizeof *slot->batch.indices);
        slot->bytes_read = malloc(b * sizeof *slot->bytes_read);
        slot->files_tried = malloc(b * sizeof *slot->files_tried);
        slot->files_failed = malloc(b * sizeof *slot->files_failed);
        atomic_init(&slot->fill_number, -1);
        if (!slot->batch.labels || !slot->batch.indices || !slot->bytes_read || !slot->files_tried ||
            !slot->files_failed)
            return tf_fail(TF_ERR_RUNTIME, "loader: out of memory");
    }
    return TF_OK;
}

static tf_status start_workers(tf_loader *loader) {
    loader->workers = calloc((size_t)loader->worker_count, sizeof *loader->workers);
    if (!loader->workers) return tf_fail(TF_ERR_RUNTIME, "loader: out of memory");
    for (int i = 0; i < loader->worker_count; i++) {
        loader->workers[i].loader = loader;
        TF_TRY(decoder_create(&loader->workers[i].decoder, 0));
    }
    for (int i = 0; i < loader->worker_count; i++) {
        if (pthread_create(&loader->workers[i].thread, NULL, worker_main, &loader->workers[i]) != 0)
            return tf_fail(TF_ERR_RUNTIME, "loader: cannot start worker thread %d", i);
        loader->threads_started++; /* loader_destroy joins these */
    }
    return TF_OK;
}

static tf_status create_loader(tf_loader *loader, const tf_dataset *dataset,
                               const tf_loader_options *options) {
    loader->dataset = dataset;
    loader->options = *options;
    loader->worker_count = options->workers > 0 ? options->workers : default_workers();
    loader->ring = options->ring_batches > 1 ? options->ring_batches : LOADER_DEFAULT_RING;
    int chunk = options->batch_size / (2 * loader->worker_count);
    loader->chunk = chunk < 1 ? 1 : chunk > LOADER_MAX_CHUNK ? LOADER_MAX_CHUNK : chunk;
    loader->chunks_per_batch = (options->batch_size + loader->chunk - 1) / loader->chunk;
    loader->image_bytes = 3 * (size_t)options->image_size * (size_t)options->image_size;
    plan_epoch_sizes(loader);
    if (loader->batches < 1)
        return tf_fail(TF_ERR_USAGE, "loader: %s: %lld images make no full batch of %d on each of %d ranks",
                       dataset->directory, (long long)dataset->count, options->batch_size,
                       options->world_size);
    const char *spec = options->augment.randaugment;
    if (options->transform == TF_TRANSFORM_TRAIN && spec[0] && strcmp(spec, "none") != 0)
        TF_TRY(randaugment_parse(spec, &loader->randaugment));
    loader->permutation = malloc((size_t)dataset->count * sizeof *loader->permutation);
    loader->order = malloc((size_t)loader->rank_samples * sizeof *loader->order);
    loader->file_flags = calloc((size_t)dataset->count, sizeof *loader->file_flags);
    if (!loader->permutation || !loader->order || !loader->file_flags)
        return tf_fail(TF_ERR_RUNTIME, "loader: out of memory for the order of %lld images",
                       (long long)dataset->count);
    TF_TRY(allocate_slots(loader));
    return start_workers(loader);
}

tf_status loader_create(tf_loader **loader, const tf_dataset *dataset, const tf_loader_options *options) {
    *loader = NULL;
    TF_TRY(check_options(dataset, options));
    tf_loader *created = calloc(1, sizeof *created);
    if (!created) return tf_fail(TF_ERR_RUNTIME, "loader: out of memory");
    pthread_mutex_init(&created->lock, NULL);
    pthread_cond_init(&created->work_ready, NULL);
    pthread_cond_init(&created->workers_idle, NULL);
    pthread_cond_init(&created->slot_changed, NULL);
    tf_status status = create_loader(created, dataset, options);
    if (status != TF_OK) {
        loader_destroy(created);
        return status;
    }
    *loader = created;
    return TF_OK;
}

int64_t loader_batches_per_epoch(const tf_loader *loader) {
    return loader->batches;
}

/* ---- the consumer ---------------------------------------------------------------------------- */

tf_status loader_start_epoch(tf_loader *loader, int epoch, int64_t first_batch) {
    if (epoch < 0 || first_batch < 0 || first_batch > loader->batches)
        return tf_fail(TF_ERR_USAGE,
                       "loader_start_epoch: epoch %d from batch %lld (an epoch has %lld batches)", epoch,
                       (long long)first_batch, (long long)loader->batches);
    pthread_mutex_lock(&loader->lock);
    /* Stop the workers of the previous epoch (they finish the chunk in hand) and wait for all. */
    atomic_store(&loader->abort, true);
    pthread_cond_broadcast(&loader->slot_changed);
    while (loader->idle < loader->worker_count)
        pthread_cond_wait(&loader->workers_idle, &loader->lock);

    build_epoch_order(loader, epoch);
    loader->epoch = epoch;
    loader->next_batch = first_batch;
    loader->held = 0;
    loader->chunk_total = loader->batches * loader->chunks_per_batch;
    atomic_store(&loader->next_chunk, first_batch * loader->chunks_per_batch);
    for (int s = 0; s < loader->ring; s++) {
        loader_slot *slot = &loader->slots[s];
        int64_t number = first_batch + ((s - first_batch % loader->ring) + loader->ring) % loader->ring;
        slot->count = number < loader->batches ? batch_count(loader, number) : 0;
        atomic_store(&slot->done, 0);
        atomic_store(&slot->failed, 0);
        atomic_store(&slot->fill_number, number < loader->batches ? number : -1);
    }
    atomic_store(&loader->abort, false);
    loader->generation++;
    loader->started = true;
    pthread_cond_broadcast(&loader->work_ready);
    pthread_mutex_unlock(&loader->lock);
    return TF_OK;
}

/* Adds a delivered batch's file counts to the totals; fails when too many files are bad. */
static tf_status account_batch(tf_loader *loader, const loader_slot *slot, int64_t number) {
    for (int k = 0; k < slot->count; k++) {
        loader->stats.read_bytes += slot->bytes_read[k];
        loader->stats.bad_files += slot->files_failed[k];
        loader->files_seen += slot->files_tried[k];
    }
    loader->stats.images += slot->count;
    bool judged = loader->files_seen >= LOADER_BAD_FILE_MIN_SEEN || number == loader->batches - 1;
    if (judged && loader->stats.bad_files * 100 > loader->files_seen)
        return tf_fail(
            TF_ERR_RUNTIME,
            "%s: %lld of the %lld files read so far could not be loaded (more than 1%%): the dataset is "
            "damaged; the log names each file",
            loader->dataset->directory, (long long)loader->stats.bad_files, (long long)loader->files_seen);
    return TF_OK;
}

tf_status loader_next_batch(tf_loader *loader, tf_batch **batch) {
    *batch = NULL;
    if (!loader->started) return tf_fail(TF_ERR_USAGE, "loader_next_batch: call loader_start_epoch first");
    if (loader->next_batch >= loader->batches) return TF_OK;
    int64_t number = loader->next_batch;
    loader_slot *slot = &loader->slots[number % loader->ring];
    if (atomic_load_explicit(&slot->fill_number, memory_order_acquire) != number)
        return tf_fail(TF_ERR_USAGE,
                       "loader_next_batch: all %d batches of the ring are held; release one first",
                       loader->ring);
    if (atomic_load_explicit(&slot->done, memory_order_acquire) < slot->count) {
        double started = tf_seconds();
        loader->waited_batches++;
        pthread_mutex_lock(&loader->lock);
        while (atomic_load_explicit(&slot->done, memory_order_acquire) < slot->count)
            pthread_cond_wait(&loader->slot_changed, &loader->lock);
        pthread_mutex_unlock(&loader->lock);
        loader->stats.wait_seconds += tf_seconds() - started;
    }
    if (atomic_load(&slot->failed)) return tf_fail(TF_ERR_RUNTIME, "loader: %s", slot->error);
    TF_TRY(account_batch(loader, slot, number));
    slot->batch.count = slot->count;
    slot->batch.epoch = loader->epoch;
    slot->batch.number = number;
    slot->generation = loader->generation;
    loader->next_batch++;
    loader->held++;
    *batch = &slot->batch;
    return TF_OK;
}

bool loader_next_batch_ready(const tf_loader *loader) {
    if (!loader->started || loader->next_batch >= loader->batches) return true;
    const loader_slot *slot = &loader->slots[loader->next_batch % loader->ring];
    return atomic_load_explicit(&slot->fill_number, memory_order_acquire) == loader->next_batch &&
           atomic_load_explicit(&slot->done, memory_order_acquire) >= slot->count;
}

void loader_release_batch(tf_loader *loader, tf_batch *batch) {
    if (!batch) return;
    loader_slot *slot = (loader_slot *)batch;
    if (slot->generation != loader->generation)
        return; /* from an epoch restarted since: its slot is reused */
    slot->generation = -1;
    int64_t next = batch->number + loader->ring;
    pthread_mutex_lock(&loader->lock);
    slot->count = next < loader->batches ? batch_count(loader, next) : 0;
    atomic_store(&slot->done, 0);
    atomic_store(&slot->failed, 0);
    atomic_store_explicit(&slot->fill_number, next < loader->batches ? next : -1, memory_order_release);
    loader->held--;
    pthread_cond_broadcast(&loader->slot_changed);
    pthread_mutex_unlock(&loader->lock);
}

tf_loader_stats loader_stats(const tf_loader *loader) {
    return loader->stats;
}

tf_loader_profile loader_profile(const tf_loader *loader) {
    tf_loader_profile profile = {.workers = loader->worker_count, .waited_batches = loader->waited_batches};
    for (int i = 0; i < loader->worker_count; i++) {
        const loader_worker *worker = &loader->workers[i];
        profile.read_seconds += 1e-9 * (double)atomic_load_explicit(&worker->read_ns, memory_order_relaxed);
        profile.decode_seconds +=
            1e-9 * (double)atomic_load_explicit(&worker->decode_ns, memory_order_relaxed);
        profile.transform_seconds +=
            1e-9 * (double)atomic_load_explicit(&worker->transform_ns, memory_order_relaxed);
        profile.samples += (int64_t)atomic_load_explicit(&worker->samples, memory_order_relaxed);
    }
    return profile;
}

static void free_worker(loader_worker *worker) {
    decoder_destroy(worker->decoder);
    free(worker->file);
    image_free(&worker->decoded);
    image_free(&worker->resized);
    image_free(&worker->scratch);
    image_free(&worker->augment_scratch);
}

void loader_destroy(tf_loader *loader) {
    if (!loader) return;
    pthread_mutex_lock(&loader->lock);
    loader->shutdown = true;
    atomic_store(&loader->abort, true);
    pthread_cond_broadcast(&loader->work_ready);
    pthread_cond_broadcast(&loader->slot_changed);
    pthread_mutex_unlock(&loader->lock);
    for (int i = 0; i < loader->threads_started; i++)
        pthread_join(loader->workers[i].thread, NULL);
    for (int i = 0; loader->workers && i < loader->worker_count; i++)
        free_worker(&loader->workers[i]);
    for (int s = 0; loader->slots && s < loader->ring; s++) {
        loader_slot *slot = &loader->slots[s];
        free(slot->batch.labels);
        free(slot->batch.indices);
        free(slot->bytes_read);
        free(slot->files_tried);
        free(slot->files_failed);
    }
    if (loader->images) {
        if (loader->options.host_alloc) {
            if (loader->options.host_free) loader->options.host_free(loader->images);
        } else {
            free(loader->images);
        }
    }
    free(loader->slots);
    free(loader->workers);
    free(loader->permutation);
    free(loader->order);
    free((void *)loader->file_flags);
    pthread_mutex_destroy(&loader->lock);
    pthread_cond_destroy(&loader->work_ready);
    pthread_cond_destroy(&loader->workers_idle);
    pthread_cond_destroy(&loader->slot_changed);
    free(loader);
}
