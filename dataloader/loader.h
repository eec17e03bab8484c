/* The training and evaluation data path: an ImageFolder index (dataset_*) and a persistent pool
 * of worker threads that read, decode and transform images into a ring of batch buffers
 * (loader_*). The consumer takes ready batches in order; workers fill the next ones meanwhile.
 * It knows nothing of models: a batch is uint8 CHW images and integer labels.
 *
 * Determinism: the sample order of an epoch depends on (seed, epoch), the augmentation of a
 * sample on (seed, epoch, sample index); never on the number of workers or on timing.
 * Distributed: rank r of W takes a disjoint 1/W share of each epoch's order. */
#ifndef TF_DATALOADER_LOADER_H
#define TF_DATALOADER_LOADER_H

#include "common/config.h"
#include "common/error.h"

#include <stdbool.h>
#include <stdint.h>

/* An ImageFolder split: ROOT/SPLIT/<class>/<file>, classes in byte-sorted folder order
 * (torchvision's rule), files sorted within each class. */
typedef struct {
    char directory[TF_PATH_MAX]; /* ROOT/SPLIT */
    int class_count;
    char **class_names;          /* [class_count] */
    int64_t count;               /* images */
    char **paths;                /* [count] full paths */
    int32_t *labels;             /* [count] */
} tf_dataset;

/* Indexes root/split. limit > 0 keeps an evenly spread subset of that many images (every class
 * represented), for tests and quick runs. Errors name the path: missing directory, no classes, a
 * class folder without images. */
tf_status dataset_open(tf_dataset *dataset, const char *root, const char *split, int64_t limit);
void dataset_close(tf_dataset *dataset);

typedef enum { TF_TRANSFORM_TRAIN, TF_TRANSFORM_EVAL } tf_transform_kind;

typedef struct {
    tf_transform_kind transform;
    int batch_size;      /* images per batch on this rank */
    int image_size;      /* output side */
    float crop_pct;      /* eval transform */
    tf_augment_config augment; /* train transform */
    uint64_t seed;
    int rank, world_size;
    int workers;         /* 0 = all cores but one */
    int ring_batches;    /* batches in flight; 0 = a default */
    bool shuffle;        /* train: a new permutation per epoch; eval: dataset order */
    bool drop_last;      /* train: drop the last partial batch; eval: keep it, so every image counts once */
    /* Host memory for the batch ring; NULL = malloc/free. The CUDA trainer passes pinned memory. */
    tf_status (*host_alloc)(void **buffer, size_t bytes);
    void (*host_free)(void *buffer);
} tf_loader_options;

typedef struct {
    uint8_t *images;   /* [count, 3, image_size, image_size] */
    int32_t *labels;   /* [count] */
    int64_t *indices;  /* [count] dataset index of each image */
    int count;         /* batch_size, except the last batch of an eval epoch */
    int epoch;
    int64_t number;    /* batch number within the epoch on this rank */
} tf_batch;

typedef struct {
    int64_t images;          /* delivered since creation */
    int64_t bad_files;       /* replaced by another sample since creation */
    double wait_seconds;     /* consumer time blocked in loader_next_batch */
    double read_bytes;       /* file bytes read */
} tf_loader_stats;

typedef struct tf_loader tf_loader;

tf_status loader_create(tf_loader **loader, const tf_dataset *dataset, const tf_loader_options *options);
/* Batches this rank delivers per epoch. */
int64_t loader_batches_per_epoch(const tf_loader *loader);
/* Starts producing epoch `epoch` from batch first_batch (0, or where a resumed run stopped). */
tf_status loader_start_epoch(tf_loader *loader, int epoch, int64_t first_batch);
/* The next batch of the epoch in order, waiting for it if needed; *batch = NULL when the epoch
 * is done. Give it back with loader_release_batch() before its slot can be refilled. */
tf_status loader_next_batch(tf_loader *loader, tf_batch **batch);
/* Whether loader_next_batch() would return at once: the next batch is complete (or failed), or
 * the epoch is done. For a consumer that takes a batch early only when that costs no wait. */
bool loader_next_batch_ready(const tf_loader *loader);
void loader_release_batch(tf_loader *loader, tf_batch *batch);
tf_loader_stats loader_stats(const tf_loader *loader);
void loader_destroy(tf_loader *loader);

/* Where the time went, for `bench loader` and epoch summaries. Worker times are summed over the
 * workers: read (the file's bytes), decode (header and pixels), transform (crop, resize, flip,
 * RandAugment, CHW). */
typedef struct {
    int workers;
    int64_t waited_batches; /* loader_next_batch calls that had to wait */
    int64_t samples;        /* produced by the workers (some may not be delivered yet) */
    double read_seconds, decode_seconds, transform_seconds;
} tf_loader_profile;

tf_loader_profile loader_profile(const tf_loader *loader);

/* `tokenformer bench loader ...` (dataloader/loader_bench.c), called by cli/cmd_bench.c with
 * argv[0] = "loader"; returns the exit code. */
int loader_bench_main(int argc, char **argv);

#endif
