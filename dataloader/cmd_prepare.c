/* `tokenformer prepare`: writes datasets as ImageFolder trees of JPEG files.
 *
 *   prepare fashion-mnist --out DIR [--source DIR]
 *       Debian's dataset-fashion-mnist (gzip'd IDX files) as DIR/{train,val}/<class>/NNNNN.jpg,
 *       grayscale JPEG at quality 100 (so the pixels come back within a grey level or two).
 *   prepare imagenet-like --out DIR --count N [--seed S] [--source DIR]
 *       A loader benchmark set with ImageNet's sizes, cut from the photographs of Debian's
 *       mate-backgrounds and plasma-workspace-wallpapers (or any folder of images).
 *
 * Both write into DIR.tmp and rename it to DIR at the end, with a marker file DIR/.prepared that
 * says what was written: a killed run leaves no half tree under DIR, and running the same command
 * again finds the marker and does nothing. */
#include "cli/commands.h"
#include "common/config.h"
#include "common/error.h"
#include "common/log.h"
#include "common/path.h"
#include "common/rng.h"
#include "common/timer.h"
#include "dataloader/decode.h"
#include "dataloader/image.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <glob.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <turbojpeg.h>
#include <unistd.h>
#include <zlib.h>

static const char marker_name[] = ".prepared";

/* ---- files and directories ------------------------------------------------------------------- */

static tf_status write_file(const char *path, const void *data, size_t size) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return tf_fail(TF_ERR_RUNTIME, "%s: cannot create: %s", path, strerror(errno));
    const uint8_t *bytes = data;
    size_t done = 0;
    while (done < size) {
        ssize_t wrote = write(fd, bytes + done, size - done);
        if (wrote < 0 && errno == EINTR) continue;
        if (wrote <= 0) {
            int error = errno;
            close(fd);
            return tf_fail(TF_ERR_RUNTIME, "%s: write failed: %s", path, strerror(error));
        }
        done += (size_t)wrote;
    }
    if (close(fd) != 0) return tf_fail(TF_ERR_RUNTIME, "%s: close failed: %s", path, strerror(errno));
    return TF_OK;
}

static int remove_entry(const char *path, const struct stat *info, int type, struct FTW *walk) {
    (void)info, (void)type, (void)walk;
    return remove(path);
}

/* Removes a tree that an earlier, killed run left behind. */
static tf_status remove_tree(const char *path) {
    struct stat info;
    if (lstat(path, &info) != 0) return TF_OK;
    if (nftw(path, remove_entry, 64, FTW_DEPTH | FTW_PHYS) != 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: cannot remove the unfinished tree: %s", path, strerror(errno));
    return TF_OK;
}

/* Decides what to do with --out before any work: TF_OK with *done = true when DIR already holds
 * exactly this dataset; an error when DIR holds something else. */
static tf_status check_output(const char *out, const char *description, bool *done) {
    *done = false;
    struct stat info;
    if (stat(out, &info) != 0) return TF_OK;
    char marker[TF_PATH_MAX + 16], found[512] = "";
    snprintf(marker, sizeof marker, "%s/%s", out, marker_name);
    FILE *file = fopen(marker, "r");
    if (!file)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s exists but was not written by `tokenformer prepare` (no %s): remove it or "
                       "choose another --out",
                       out, marker_name);
    size_t got = fread(found, 1, sizeof found - 1, file);
    found[got] = '\0';
    fclose(file);
    if (strcmp(found, description) != 0)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s holds another prepared dataset (%.*s): remove it or choose another --out", out,
                       (int)strcspn(found, "\n"), found);
    *done = true;
    return TF_OK;
}

/* Writes the marker into the finished DIR.tmp and renames it to DIR. */
static tf_status finish_output(const char *temporary, const char *out, const char *description) {
    char marker[TF_PATH_MAX + 16];
    snprintf(marker, sizeof marker, "%s/%s", temporary, marker_name);
    TF_TRY(write_file(marker, description, strlen(description)));
    sync(); /* the rename must not reach the disk before the files it publishes */
    if (rename(temporary, out) != 0)
        return tf_fail(TF_ERR_RUNTIME, "cannot rename %s to %s: %s", temporary, out, strerror(errno));
    return TF_OK;
}

static tf_status start_output(const char *out, char *temporary) {
    int written = snprintf(temporary, TF_PATH_MAX, "%s.tmp", out);
    if (written < 0 || written >= TF_PATH_MAX) return tf_fail(TF_ERR_USAGE, "--out %s: path too long", out);
    TF_TRY(remove_tree(temporary));
    return path_make_directories(temporary); /* with its parents: --out data/fmnist may name a new data/ */
}

static tf_status make_class_folders(const char *temporary, const char *split, const char *const *classes,
                                    int class_count) {
    char path[TF_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", temporary, split);
    TF_TRY(path_make_directories(path));
    for (int c = 0; c < class_count; c++) {
        snprintf(path, sizeof path, "%s/%s/%s", temporary, split, classes[c]);
        TF_TRY(path_make_directories(path));
    }
    return TF_OK;
}

/* A progress line at most every two seconds. */
typedef struct {
    const char *what;
    int64_t total;
    double started, last;
} progress_meter;

static void progress_update(progress_meter *meter, int64_t done) {
    double now = tf_seconds();
    if (now - meter->last < 2.0 && done < meter->total) return;
    meter->last = now;
    tf_log("prepare %s: %lld/%lld images (%.0f%%), %.1f s", meter->what, (long long)done,
           (long long)meter->total, 100.0 * (double)done / (double)meter->total, now - meter->started);
}

/* ---- fashion-mnist --------------------------------------------------------------------------- */

static const char *const fashion_classes[10] = {"T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
                                                "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle_boot"};
static const char fashion_default_source[] = "/usr/share/datasets/fashion-mnist";

static uint32_t big_endian_u32(const uint8_t *bytes) {
    return (uint32_t)bytes[0] << 24 | (uint32_t)bytes[1] << 16 | (uint32_t)bytes[2] << 8 | bytes[3];
}

static tf_status gz_open(const char *path, gzFile *file) {
    *file = gzopen(path, "rb");
    if (*file) return TF_OK;
    if (access(path, F_OK) != 0)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s: not found (Debian's Fashion-MNIST: apt-get install dataset-fashion-mnist)", path);
    return tf_fail(TF_ERR_RUNTIME, "%s: cannot open: %s", path, strerror(errno));
}

/* Reads exactly `bytes` bytes; a short read names what was being read. */
static tf_status gz_read_exactly(gzFile file, const char *path, void *buffer, size_t bytes,
                                 const char *what) {
    size_t done = 0;
    while (done < bytes) {
        unsigned chunk = bytes - done > (1u << 30) ? (1u << 30) : (unsigned)(bytes - done);
        int got = gzread(file, (uint8_t *)buffer + done, chunk);
        if (got < 0) {
            int code;
            const char *message = gzerror(file, &code);
            return tf_fail(TF_ERR_RUNTIME, "%s: corrupt gzip data while reading %s: %s", path, what, message);
        }
        if (got == 0)
            return tf_fail(TF_ERR_RUNTIME, "%s: file ends early: %zu of %zu bytes of %s", path, done, bytes,
                           what);
        done += (size_t)got;
    }
    return TF_OK;
}

typedef struct {
    int64_t count;
    int rows, columns;
    uint8_t *pixels; /* [count, rows, columns] */
    uint8_t *labels; /* [count] */
} idx_split;

static tf_status read_idx_labels(const char *path, idx_split *split) {
    gzFile file;
    TF_TRY(gz_open(path, &file));
    uint8_t header[8];
    tf_status status = gz_read_exactly(file, path, header, sizeof header, "the header");
    if (status == TF_OK && big_endian_u32(header) != 0x00000801)
        status = tf_fail(TF_ERR_RUNTIME, "%s: not an IDX label file (magic 0x%08x, expected 0x00000801)",
                         path, big_endian_u32(header));
    if (status == TF_OK) {
        split->count = big_endian_u32(header + 4);
        split->labels = malloc((size_t)split->count + 1);
        if (!split->labels) status = tf_fail(TF_ERR_RUNTIME, "%s: out of memory", path);
    }
    if (status == TF_OK)
        status = gz_read_exactly(file, path, split->labels, (size_t)split->count, "the labels");
    for (int64_t i = 0; status == TF_OK && i < split->count; i++)
        if (split->labels[i] >= 10)
            status = tf_fail(TF_ERR_RUNTIME, "%s: label %d of image %lld is not a class (0-9)", path,
                             split->labels[i], (long long)i);
    gzclose(file);
    return status;
}

static tf_status read_idx_images(const char *path, idx_split *split) {
    gzFile file;
    TF_TRY(gz_open(path, &file));
    uint8_t header[16];
    tf_status status = gz_read_exactly(file, path, header, sizeof header, "the header");
    if (status == TF_OK && big_endian_u32(header) != 0x00000803)
        status = tf_fail(TF_ERR_RUNTIME, "%s: not an IDX image file (magic 0x%08x, expected 0x00000803)",
                         path, big_endian_u32(header));
    if (status == TF_OK && big_endian_u32(header + 4) != split->count)
        status = tf_fail(TF_ERR_RUNTIME, "%s: %u images, but the label file has %lld labels", path,
                         big_endian_u32(header + 4), (long long)split->count);
    if (status == TF_OK) {
        split->rows = (int)big_endian_u32(header + 8);
        split->columns = (int)big_endian_u32(header + 12);
        if (split->rows < 1 || split->rows > 4096 || split->columns < 1 || split->columns > 4096)
            status =
                tf_fail(TF_ERR_RUNTIME, "%s: images of %dx%d pixels?", path, split->columns, split->rows);
    }
    size_t bytes = (size_t)split->count * (size_t)split->rows * (size_t)split->columns;
    if (status == TF_OK) {
        split->pixels = malloc(bytes + 1);
        if (!split->pixels) status = tf_fail(TF_ERR_RUNTIME, "%s: out of memory", path);
    }
    if (status == TF_OK) status = gz_read_exactly(file, path, split->pixels, bytes, "the images");
    gzclose(file);
    return status;
}

static void idx_split_free(idx_split *split) {
    free(split->pixels);
    free(split->labels);
    *split = (idx_split){0};
}

/* Reads both halves of a split, e.g. prefix "train" or "t10k". */
static tf_status read_fashion_split(const char *source, const char *prefix, idx_split *split) {
    char labels[TF_PATH_MAX + 64], images[TF_PATH_MAX + 64];
    snprintf(labels, sizeof labels, "%s/%s-labels-idx1-ubyte.gz", source, prefix);
    snprintf(images, sizeof images, "%s/%s-images-idx3-ubyte.gz", source, prefix);
    tf_status status = read_idx_labels(labels, split);
    if (status == TF_OK) status = read_idx_images(images, split);
    if (status != TF_OK) idx_split_free(split);
    return status;
}

static tf_status write_fashion_split(const char *temporary, const char *split_name, const idx_split *split,
                                     tjhandle compressor, progress_meter *meter, int64_t *written) {
    TF_TRY(make_class_folders(temporary, split_name, fashion_classes, 10));
    unsigned long capacity = tjBufSize(split->columns, split->rows, TJSAMP_GRAY);
    unsigned char *jpeg = tjAlloc((int)capacity);
    if (!jpeg) return tf_fail(TF_ERR_RUNTIME, "prepare: out of memory");
    tf_status status = TF_OK;
    char path[TF_PATH_MAX + 64];
    size_t image_bytes = (size_t)split->rows * split->columns;
    for (int64_t i = 0; status == TF_OK && i < split->count; i++) {
        unsigned long size = capacity;
        if (tjCompress2(compressor, split->pixels + (size_t)i * image_bytes, split->columns, 0, split->rows,
                        TJPF_GRAY, &jpeg, &size, TJSAMP_GRAY, 100, TJFLAG_NOREALLOC) != 0) {
            status = tf_fail(TF_ERR_RUNTIME, "JPEG compression failed: %s", tjGetErrorStr2(compressor));
            break;
        }
        snprintf(path, sizeof path, "%s/%s/%s/%05lld.jpg", temporary, split_name,
                 fashion_classes[split->labels[i]], (long long)i);
        status = write_file(path, jpeg, size);
        progress_update(meter, ++*written);
    }
    tjFree(jpeg);
    return status;
}

static tf_status write_fashion_mnist(const char *out, const char *source, const char *description) {
    idx_split train = {0}, val = {0};
    TF_TRY(read_fashion_split(source, "train", &train));
    tf_status status = read_fashion_split(source, "t10k", &val);
    double started = tf_seconds();
    progress_meter meter = {"fashion-mnist", train.count + val.count, started, started};
    int64_t written = 0;
    char temporary[TF_PATH_MAX];
    tjhandle compressor = NULL;
    if (status == TF_OK) {
        compressor = tjInitCompress();
        if (!compressor) status = tf_fail(TF_ERR_RUNTIME, "tjInitCompress failed: %s", tjGetErrorStr2(NULL));
    }
    if (status == TF_OK) status = start_output(out, temporary);
    if (status == TF_OK)
        status = write_fashion_split(temporary, "train", &train, compressor, &meter, &written);
    if (status == TF_OK) status = write_fashion_split(temporary, "val", &val, compressor, &meter, &written);
    if (status == TF_OK) status = finish_output(temporary, out, description);
    if (status == TF_OK)
        printf("wrote %lld train and %lld val images to %s in %.1f s\n", (long long)train.count,
               (long long)val.count, out, tf_seconds() - started);
    if (compressor) tjDestroy(compressor);
    idx_split_free(&train);
    idx_split_free(&val);
    return status;
}

static tf_status prepare_fashion_mnist(const char *out, const char *source) {
    char description[TF_PATH_MAX + 64];
    snprintf(description, sizeof description, "fashion-mnist source=%s\n", source);
    bool done;
    TF_TRY(check_output(out, description, &done));
    if (done) {
        printf("%s is complete; nothing to do\n", out);
        return TF_OK;
    }
    return write_fashion_mnist(out, source, description);
}

/* ---- imagenet-like --------------------------------------------------------------------------- */

enum { IMAGENET_LIKE_CLASSES = 10, IMAGENET_LIKE_LONG_SIDE = 500 };
static const char *const imagenet_like_classes[IMAGENET_LIKE_CLASSES] = {
    "class_00", "class_01", "class_02", "class_03", "class_04",
    "class_05", "class_06", "class_07", "class_08", "class_09"};

/* Sources are decoded once, reduced (by JPEG DCT scaling) until the shorter side is about this:
 * enough for crops of 500x375 with room to move, small enough to keep all of them in memory. */
enum { SOURCE_SHORT_SIDE = 800 };

typedef struct {
    char **paths;
    int count;
    tf_image *images; /* decoded */
} photo_set;

static bool has_photo_extension(const char *name, bool any_image) {
    const char *dot = strrchr(name, '.');
    if (!dot) return false;
    if (strcasecmp(dot, ".jpg") == 0 || strcasecmp(dot, ".jpeg") == 0) return true;
    return any_image &&
           (strcasecmp(dot, ".png") == 0 || strcasecmp(dot, ".bmp") == 0 || strcasecmp(dot, ".ppm") == 0);
}

static tf_status photo_set_add(photo_set *set, const char *path) {
    char **paths = realloc(set->paths, (size_t)(set->count + 1) * sizeof *paths);
    if (!paths) return tf_fail(TF_ERR_RUNTIME, "prepare: out of memory");
    set->paths = paths;
    set->paths[set->count] = strdup(path);
    if (!set->paths[set->count]) return tf_fail(TF_ERR_RUNTIME, "prepare: out of memory");
    set->count++;
    return TF_OK;
}

static int compare_paths(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* --source DIR: every image file directly inside DIR. */
static tf_status find_photos_in(const char *directory, photo_set *set) {
    DIR *dir = opendir(directory);
    if (!dir) return tf_fail(TF_ERR_RUNTIME, "--source %s: cannot open: %s", directory, strerror(errno));
    tf_status status = TF_OK;
    char path[TF_PATH_MAX + 256];
    for (struct dirent *entry; status == TF_OK && (entry = readdir(dir)) != NULL;) {
        if (entry->d_name[0] == '.' || !has_photo_extension(entry->d_name, true)) continue;
        snprintf(path, sizeof path, "%s/%s", directory, entry->d_name);
        status = photo_set_add(set, path);
    }
    closedir(dir);
    return status;
}

/* The Debian packages: mate-backgrounds' nature photographs, and from each KDE Plasma wallpaper
 * the largest JPEG of contents/images (the others are the same picture at other sizes). */
static tf_status find_debian_photos(photo_set *set) {
    glob_t found;
    tf_status status = TF_OK;
    if (glob("/usr/share/backgrounds/mate/nature/*.[jJ][pP][gG]", 0, NULL, &found) == 0) {
        for (size_t i = 0; status == TF_OK && i < found.gl_pathc; i++)
            status = photo_set_add(set, found.gl_pathv[i]);
        globfree(&found);
    }
    glob_t wallpapers;
    if (status == TF_OK &&
        glob("/usr/share/wallpapers/*/contents/images", GLOB_ONLYDIR, NULL, &wallpapers) == 0) {
        for (size_t w = 0; status == TF_OK && w < wallpapers.gl_pathc; w++) {
            char pattern[TF_PATH_MAX];
            snprintf(pattern, sizeof pattern, "%s/*.[jJ][pP][gG]", wallpapers.gl_pathv[w]);
            if (glob(pattern, 0, NULL, &found) != 0) continue;
            const char *largest = NULL;
            off_t largest_size = -1;
            for (size_t i = 0; i < found.gl_pathc; i++) {
                struct stat info;
                if (stat(found.gl_pathv[i], &info) == 0 && info.st_size > largest_size)
                    largest = found.gl_pathv[i], largest_size = info.st_size;
            }
            if (largest) status = photo_set_add(set, largest);
            globfree(&found);
        }
        globfree(&wallpapers);
    }
    if (status == TF_OK && set->count == 0)
        status = tf_fail(TF_ERR_RUNTIME,
                         "no photographs found in /usr/share/backgrounds/mate/nature or "
                         "/usr/share/wallpapers/*/contents/images: apt-get install mate-backgrounds "
                         "plasma-workspace-wallpapers (or give --source DIR)");
    return status;
}

static tf_status load_photos(photo_set *set) {
    qsort(set->paths, (size_t)set->count, sizeof(char *), compare_paths); /* the seed decides, not readdir */
    set->images = calloc((size_t)set->count, sizeof *set->images);
    tf_decoder *decoder;
    if (!set->images) return tf_fail(TF_ERR_RUNTIME, "prepare: out of memory");
    TF_TRY(decoder_create(&decoder, 0));
    uint8_t *data = NULL;
    size_t capacity = 0, size;
    tf_status status = TF_OK;
    for (int i = 0; status == TF_OK && i < set->count; i++) {
        tf_image_info info;
        status = decode_read_file(set->paths[i], &data, &capacity, &size);
        if (status == TF_OK) status = decoder_read_header(decoder, data, size, set->paths[i], &info);
        if (status == TF_OK) {
            int short_side = info.width < info.height ? info.width : info.height;
            double scale = decoder_choose_scale(&info, (double)SOURCE_SHORT_SIDE / short_side);
            status = decoder_decode(decoder, data, size, set->paths[i], &info, scale, &set->images[i], NULL);
        }
    }
    free(data);
    decoder_destroy(decoder);
    return status;
}

static void photo_set_free(photo_set *set) {
    for (int i = 0; i < set->count; i++) {
        free(set->paths[i]);
        if (set->images) image_free(&set->images[i]);
    }
    free(set->paths);
    free(set->images);
    *set = (photo_set){0};
}

/* One output image, fully decided by (seed, index). */
typedef struct {
    int source;
    int width, height;
    tf_box crop; /* in the decoded source */
    int quality;
    bool val;
    int label;
} imagenet_like_plan;

/* ImageNet's sizes: most images are 500x375 or 375x500; the rest have a longer side of 500 and a
 * shorter side between 333 and 500. */
static void choose_size(tf_rng *rng, int *width, int *height) {
    double kind = tf_rng_uniform(rng);
    int long_side = IMAGENET_LIKE_LONG_SIDE, short_side = 375;
    bool portrait = false;
    if (kind < 0.6) {
    } else if (kind < 0.75) {
        portrait = true;
    } else {
        short_side = 333 + (int)tf_rng_below(rng, 500 - 333 + 1);
        portrait = tf_rng_uniform(rng) < 0.25;
    }
    *width = portrait ? short_side : long_side;
    *height = portrait ? long_side : short_side;
}

static imagenet_like_plan plan_image(const photo_set *set, uint64_t seed, int64_t index) {
    /* The augmentation stream, keyed by the image index: prepare's draws are data augmentation. */
    tf_rng rng = tf_rng_make(seed, TF_RNG_AUGMENT, (uint64_t)index, 0);
    imagenet_like_plan plan = {0};
    plan.source = (int)tf_rng_below(&rng, (uint64_t)set->count);
    choose_size(&rng, &plan.width, &plan.height);
    /* A crop of the output's aspect ratio covering 15% to 100% of the largest that fits, never
     * smaller than the output when the source allows (so resizing mostly shrinks, as for real
     * photographs), at a uniform position. */
    const tf_image *source = &set->images[plan.source];
    double aspect = (double)plan.width / plan.height;
    double fit_width = source->width, fit_height = fit_width / aspect;
    if (fit_height > source->height) fit_height = source->height, fit_width = fit_height * aspect;
    double fraction = sqrt(0.15 + 0.85 * tf_rng_uniform(&rng));
    double crop_width = fit_width * fraction;
    if (crop_width < plan.width) crop_width = plan.width < fit_width ? plan.width : fit_width;
    double crop_height = crop_width / aspect;
    plan.crop.width = crop_width;
    plan.crop.height = crop_height;
    plan.crop.left = floor(tf_rng_uniform(&rng) * (source->width - crop_width + 1));
    plan.crop.top = floor(tf_rng_uniform(&rng) * (source->height - crop_height + 1));
    if (plan.crop.left + crop_width > source->width) plan.crop.left = source->width - crop_width;
    if (plan.crop.top + crop_height > source->height) plan.crop.top = source->height - crop_height;
    plan.quality = 75 + (int)tf_rng_below(&rng, 21);
    /* Of each hundred images, the first ten (one per class) go to val: 90/10, and every class is in
     * both splits from 20 images on. */
    plan.val = index % 100 < IMAGENET_LIKE_CLASSES;
    plan.label = (int)(index % IMAGENET_LIKE_CLASSES);
    return plan;
}

/* Shared by the writer threads. */
typedef struct {
    const photo_set *photos;
    const char *temporary;
    uint64_t seed;
    int64_t count;
    atomic_llong next, written, bytes;
    atomic_int failed;
    char error[1024];
    pthread_mutex_t error_lock;
} imagenet_like_job;

static tf_status write_imagenet_like_image(imagenet_like_job *job, int64_t index, tjhandle compressor,
                                           tf_image *resized, tf_image *scratch, unsigned char **jpeg) {
    imagenet_like_plan plan = plan_image(job->photos, job->seed, index);
    TF_TRY(image_resize_bicubic(&job->photos->images[plan.source], plan.crop, plan.width, plan.height,
                                resized, scratch));
    /* In: the buffer's size (every output fits); out: the JPEG's. */
    unsigned long size = tjBufSize(IMAGENET_LIKE_LONG_SIDE, IMAGENET_LIKE_LONG_SIDE, TJSAMP_420);
    if (tjCompress2(compressor, resized->pixels, plan.width, 0, plan.height, TJPF_RGB, jpeg, &size,
                    TJSAMP_420, plan.quality, TJFLAG_NOREALLOC) != 0)
        return tf_fail(TF_ERR_RUNTIME, "JPEG compression failed: %s", tjGetErrorStr2(compressor));
    char path[TF_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s/%s/img_%07lld.jpg", job->temporary, plan.val ? "val" : "train",
             imagenet_like_classes[plan.label], (long long)index);
    TF_TRY(write_file(path, *jpeg, size));
    atomic_fetch_add(&job->bytes, (long long)size);
    return TF_OK;
}

static void *imagenet_like_worker(void *argument) {
    imagenet_like_job *job = argument;
    tjhandle compressor = tjInitCompress();
    tf_image resized = {0}, scratch = {0};
    unsigned char *jpeg =
        tjAlloc((int)tjBufSize(IMAGENET_LIKE_LONG_SIDE, IMAGENET_LIKE_LONG_SIDE, TJSAMP_420));
    tf_status status = compressor && jpeg
                           ? TF_OK
                           : tf_fail(TF_ERR_RUNTIME, "TurboJPEG compressor: %s", tjGetErrorStr2(NULL));
    while (status == TF_OK && !atomic_load(&job->failed)) {
        int64_t index = atomic_fetch_add(&job->next, 1);
        if (index >= job->count) break;
        status = write_imagenet_like_image(job, index, compressor, &resized, &scratch, &jpeg);
        atomic_fetch_add(&job->written, 1);
    }
    if (status != TF_OK) {
        pthread_mutex_lock(&job->error_lock);
        if (!atomic_load(&job->failed)) snprintf(job->error, sizeof job->error, "%s", tf_error_message());
        atomic_store(&job->failed, 1);
        pthread_mutex_unlock(&job->error_lock);
    }
    tjFree(jpeg);
    image_free(&resized);
    image_free(&scratch);
    if (compressor) tjDestroy(compressor);
    return NULL;
}

static tf_status run_imagenet_like_writers(imagenet_like_job *job) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int thread_count = cores < 1 ? 1 : cores > 64 ? 64 : (int)cores;
    pthread_t threads[64];
    int started = 0;
    for (; started < thread_count; started++)
        if (pthread_create(&threads[started], NULL, imagenet_like_worker, job) != 0) break;
    if (started == 0) return tf_fail(TF_ERR_RUNTIME, "prepare: cannot start a thread");
    progress_meter meter = {"imagenet-like", job->count, tf_seconds(), tf_seconds()};
    while (atomic_load(&job->written) < job->count && !atomic_load(&job->failed)) {
        usleep(100000);
        progress_update(&meter, atomic_load(&job->written));
    }
    for (int i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    if (atomic_load(&job->failed)) return tf_fail(TF_ERR_RUNTIME, "%s", job->error);
    return TF_OK;
}

static tf_status prepare_imagenet_like(const char *out, int64_t count, uint64_t seed, const char *source) {
    char description[TF_PATH_MAX + 128], temporary[TF_PATH_MAX];
    snprintf(description, sizeof description, "imagenet-like count=%lld seed=%llu source=%s\n",
             (long long)count, (unsigned long long)seed, source ? source : "debian");
    bool done;
    TF_TRY(check_output(out, description, &done));
    if (done) {
        printf("%s is complete (%lld images, seed %llu); nothing to do\n", out, (long long)count,
               (unsigned long long)seed);
        return TF_OK;
    }
    double started = tf_seconds();
    photo_set photos = {0};
    tf_status status = source ? find_photos_in(source, &photos) : find_debian_photos(&photos);
    if (status == TF_OK && photos.count == 0)
        status = tf_fail(TF_ERR_RUNTIME, "--source %s: no images", source);
    if (status == TF_OK) status = load_photos(&photos);
    if (status == TF_OK) tf_log("prepare imagenet-like: %d source photographs decoded", photos.count);
    if (status == TF_OK) status = start_output(out, temporary);
    if (status == TF_OK)
        status = make_class_folders(temporary, "train", imagenet_like_classes, IMAGENET_LIKE_CLASSES);
    if (status == TF_OK)
        status = make_class_folders(temporary, "val", imagenet_like_classes, IMAGENET_LIKE_CLASSES);
    imagenet_like_job job = {.photos = &photos, .temporary = temporary, .seed = seed, .count = count};
    pthread_mutex_init(&job.error_lock, NULL);
    if (status == TF_OK) status = run_imagenet_like_writers(&job);
    pthread_mutex_destroy(&job.error_lock);
    if (status == TF_OK) status = finish_output(temporary, out, description);
    if (status == TF_OK)
        printf("wrote %lld images (%.1f KB on average) from %d photographs to %s in %.1f s\n",
               (long long)count, (double)atomic_load(&job.bytes) / 1024.0 / (double)count, photos.count, out,
               tf_seconds() - started);
    photo_set_free(&photos);
    return status;
}

/* ---- command line ---------------------------------------------------------------------------- */

typedef struct {
    const char *out, *source;
    int64_t count;
    uint64_t seed;
} prepare_options;

static tf_status parse_integer(const char *option, const char *text, long long minimum, long long *value) {
    char *end;
    errno = 0;
    long long parsed = strtoll(text, &end, 10);
    if (errno || end == text || *end || parsed < minimum)
        return tf_fail(TF_ERR_USAGE, "%s %s: expected an integer >= %lld", option, text, minimum);
    *value = parsed;
    return TF_OK;
}

static tf_status parse_options(int argc, char **argv, bool imagenet_like, prepare_options *options) {
    *options = (prepare_options){.count = -1};
    for (int i = 2; i < argc; i++) {
        const char *option = argv[i];
        if (i + 1 >= argc) return tf_fail(TF_ERR_USAGE, "%s needs a value", option);
        const char *value = argv[++i];
        long long number = 0;
        if (strcmp(option, "--out") == 0) {
            options->out = value;
        } else if (strcmp(option, "--source") == 0) {
            options->source = value;
        } else if (imagenet_like && strcmp(option, "--count") == 0) {
            TF_TRY(parse_integer(option, value, 2 * IMAGENET_LIKE_CLASSES, &number));
            options->count = number;
        } else if (imagenet_like && strcmp(option, "--seed") == 0) {
            TF_TRY(parse_integer(option, value, 0, &number));
            options->seed = (uint64_t)number;
        } else {
            return tf_fail(TF_ERR_USAGE, "unknown option %s", option);
        }
    }
    if (!options->out) return tf_fail(TF_ERR_USAGE, "--out DIR is required");
    if (imagenet_like && options->count < 0) return tf_fail(TF_ERR_USAGE, "--count N is required");
    return TF_OK;
}

int cmd_prepare(int argc, char **argv) {
    if (argc < 2) {
        tf_fail(TF_ERR_USAGE, "which dataset? fashion-mnist or imagenet-like ('tokenformer help prepare')");
        return cli_report("prepare", TF_ERR_USAGE);
    }
    bool fashion = strcmp(argv[1], "fashion-mnist") == 0,
         imagenet_like = strcmp(argv[1], "imagenet-like") == 0;
    if (!fashion && !imagenet_like) {
        tf_fail(TF_ERR_USAGE, "unknown dataset '%s': fashion-mnist or imagenet-like", argv[1]);
        return cli_report("prepare", TF_ERR_USAGE);
    }
    prepare_options options;
    tf_status status = parse_options(argc, argv, imagenet_like, &options);
    if (status == TF_OK && fashion)
        status = prepare_fashion_mnist(options.out, options.source ? options.source : fashion_default_source);
    if (status == TF_OK && imagenet_like)
        status = prepare_imagenet_like(options.out, options.count, options.seed, options.source);
    return cli_report("prepare", status);
}
