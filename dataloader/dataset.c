/* The ImageFolder index (loader.h): ROOT/SPLIT/<class>/... listed exactly as torchvision's
 * datasets.ImageFolder lists it, so that class indices and sample order match PyTorch:
 * - classes are the sub-directories of ROOT/SPLIT (symbolic links followed), byte-sorted;
 * - within a class, os.walk(followlinks=True) yields every directory below it; torchvision sorts
 *   those (root, files) entries by the root path string and the files within each root, so the
 *   order is "directory paths in strcmp order, then file names in strcmp order", which is not a
 *   depth-first walk ("a/b-c" comes before "a/b/d");
 * - a file counts when its name ends, case-insensitively, in one of the image extensions.
 * All paths live in one block of memory (paths[0] is its start), so the index of ImageNet's
 * 1.28 million files costs two allocations, not a million. */
#include "dataloader/loader.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

static const char *const image_extensions[] = {".jpg", ".jpeg", ".png", ".bmp",
                                               ".ppm", ".pgm",  ".tga", ".gif"};

/* os.walk with followlinks=True would loop forever on a link to an ancestor; we stop here. */
enum { DATASET_MAX_DEPTH = 32 };

static bool has_image_extension(const char *name) {
    size_t length = strlen(name);
    for (size_t i = 0; i < sizeof image_extensions / sizeof image_extensions[0]; i++) {
        size_t extension_length = strlen(image_extensions[i]);
        if (length > extension_length &&
            strcasecmp(name + length - extension_length, image_extensions[i]) == 0)
            return true;
    }
    return false;
}

static int compare_strings(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A growable list of heap strings. */
typedef struct {
    char **items;
    size_t count, capacity;
} string_list;

static tf_status string_list_push(string_list *list, const char *text) {
    if (list->count == list->capacity) {
        size_t capacity = list->capacity ? list->capacity * 2 : 64;
        char **items = realloc(list->items, capacity * sizeof *items);
        if (!items) return tf_fail(TF_ERR_RUNTIME, "dataset index: out of memory");
        list->items = items;
        list->capacity = capacity;
    }
    char *copy = strdup(text);
    if (!copy) return tf_fail(TF_ERR_RUNTIME, "dataset index: out of memory");
    list->items[list->count++] = copy;
    return TF_OK;
}

static void string_list_free(string_list *list) {
    for (size_t i = 0; i < list->count; i++)
        free(list->items[i]);
    free(list->items);
    *list = (string_list){0};
}

static bool is_directory(const char *path) {
    struct stat info;
    return stat(path, &info) == 0 && S_ISDIR(info.st_mode); /* stat follows links, like is_dir() */
}

static tf_status join_path(char *out, const char *directory, const char *name) {
    int written = snprintf(out, TF_PATH_MAX, "%s/%s", directory, name);
    if (written < 0 || written >= TF_PATH_MAX)
        return tf_fail(TF_ERR_RUNTIME, "%s/%s: path too long", directory, name);
    return TF_OK;
}

/* The entries of one directory: sub-directories and/or image files (names only), unsorted. */
static tf_status list_directory(const char *path, string_list *directories, string_list *images) {
    DIR *dir = opendir(path);
    if (!dir) return tf_fail(TF_ERR_RUNTIME, "%s: cannot open directory: %s", path, strerror(errno));
    tf_status status = TF_OK;
    char full[TF_PATH_MAX];
    struct dirent *entry;
    while (status == TF_OK && (entry = readdir(dir)) != NULL) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
        status = join_path(full, path, entry->d_name);
        if (status != TF_OK) break;
        bool directory = entry->d_type == DT_DIR ||
                         ((entry->d_type == DT_LNK || entry->d_type == DT_UNKNOWN) && is_directory(full));
        if (directory) {
            if (directories) status = string_list_push(directories, entry->d_name);
        } else if (images && has_image_extension(entry->d_name)) {
            status = string_list_push(images, entry->d_name);
        }
    }
    closedir(dir);
    return status;
}

/* Every directory at or below `path` (full paths), as os.walk(followlinks=True) finds them. */
static tf_status collect_directories(const char *path, int depth, string_list *all) {
    TF_TRY(string_list_push(all, path));
    if (depth >= DATASET_MAX_DEPTH) return TF_OK;
    string_list children = {0};
    tf_status status = list_directory(path, &children, NULL);
    char full[TF_PATH_MAX];
    for (size_t i = 0; status == TF_OK && i < children.count; i++) {
        status = join_path(full, path, children.items[i]);
        if (status == TF_OK) status = collect_directories(full, depth + 1, all);
    }
    string_list_free(&children);
    return status;
}

/* Paths are first gathered as offsets into one growing block (realloc moves it), then turned into
 * pointers once the block is final. */
typedef struct {
    char *text;
    size_t text_size, text_capacity;
    size_t *offsets;
    int32_t *labels;
    size_t count, capacity;
} path_block;

static tf_status path_block_add(path_block *block, const char *directory, const char *name, int32_t label) {
    size_t length = strlen(directory) + 1 + strlen(name) + 1;
    if (block->text_size + length > block->text_capacity) {
        size_t capacity = block->text_capacity ? block->text_capacity * 2 : 1 << 16;
        while (capacity < block->text_size + length)
            capacity *= 2;
        char *text = realloc(block->text, capacity);
        if (!text) return tf_fail(TF_ERR_RUNTIME, "dataset index: out of memory");
        block->text = text;
        block->text_capacity = capacity;
    }
    if (block->count == block->capacity) {
        size_t capacity = block->capacity ? block->capacity * 2 : 1024;
        size_t *offsets = realloc(block->offsets, capacity * sizeof *offsets);
        if (offsets) block->offsets = offsets;
        int32_t *labels = realloc(block->labels, capacity * sizeof *labels);
        if (labels) block->labels = labels;
        if (!offsets || !labels) return tf_fail(TF_ERR_RUNTIME, "dataset index: out of memory");
        block->capacity = capacity;
    }
    block->offsets[block->count] = block->text_size;
    block->labels[block->count] = label;
    block->count++;
    block->text_size += (size_t)sprintf(block->text + block->text_size, "%s/%s", directory, name) + 1;
    return TF_OK;
}

/* Appends the images of one class in torchvision's order; errors when it has none. */
static tf_status index_class(const char *class_path, int32_t label, path_block *block) {
    string_list directories = {0};
    tf_status status = collect_directories(class_path, 0, &directories);
    if (status == TF_OK) qsort(directories.items, directories.count, sizeof(char *), compare_strings);
    size_t before = block->count;
    for (size_t d = 0; status == TF_OK && d < directories.count; d++) {
        string_list images = {0};
        status = list_directory(directories.items[d], NULL, &images);
        if (status == TF_OK) qsort(images.items, images.count, sizeof(char *), compare_strings);
        for (size_t i = 0; status == TF_OK && i < images.count; i++)
            status = path_block_add(block, directories.items[d], images.items[i], label);
        string_list_free(&images);
    }
    string_list_free(&directories);
    if (status == TF_OK && block->count == before) {
        int n = (int)(sizeof image_extensions / sizeof image_extensions[0]);
        char list[128] = "";
        for (int i = 0; i < n; i++) {
            strcat(list, image_extensions[i]);
            if (i + 1 < n) strcat(list, " ");
        }
        return tf_fail(TF_ERR_RUNTIME, "%s: class folder has no images (looked for %s, any case)", class_path,
                       list);
    }
    return status;
}

/* Images per class kept by a limit: proportional to the class's size (largest remainders get the
 * leftover), at least one per class. */
static tf_status limit_quotas(const int64_t *class_counts, int class_count, int64_t total, int64_t limit,
                              int64_t *quotas) {
    if (limit < class_count)
        return tf_fail(TF_ERR_USAGE, "limit %lld is smaller than the %d classes: every class needs an image",
                       (long long)limit, class_count);
    int64_t assigned = 0;
    for (int c = 0; c < class_count; c++) {
        quotas[c] = class_counts[c] * limit / total;
        if (quotas[c] < 1) quotas[c] = 1;
        assigned += quotas[c];
    }
    /* Too many (the minimum of one pushed it over): take from the largest. Too few: give to the
     * classes with the largest share left over. Both loops are short: at most class_count steps. */
    while (assigned > limit) {
        int largest = 0;
        for (int c = 1; c < class_count; c++)
            if (quotas[c] > quotas[largest]) largest = c;
        quotas[largest]--;
        assigned--;
    }
    while (assigned < limit) {
        int best = -1;
        double best_gap = -1.0;
        for (int c = 0; c < class_count; c++) {
            double gap = (double)class_counts[c] * (double)limit / (double)total - (double)quotas[c];
            if (quotas[c] < class_counts[c] && gap > best_gap) best = c, best_gap = gap;
        }
        quotas[best]++;
        assigned++;
    }
    return TF_OK;
}

/* Keeps an evenly spread `limit` of the block's entries (which are grouped by class). */
static tf_status apply_limit(path_block *block, int class_count, int64_t limit) {
    int64_t *class_counts = calloc((size_t)class_count, sizeof *class_counts);
    int64_t *quotas = calloc((size_t)class_count, sizeof *quotas);
    tf_status status =
        class_counts && quotas ? TF_OK : tf_fail(TF_ERR_RUNTIME, "dataset index: out of memory");
    if (status == TF_OK) {
        for (size_t i = 0; i < block->count; i++)
            class_counts[block->labels[i]]++;
        status = limit_quotas(class_counts, class_count, (int64_t)block->count, limit, quotas);
    }
    if (status == TF_OK) {
        size_t kept = 0, class_start = 0;
        for (int c = 0; c < class_count; c++) {
            for (int64_t j = 0; j < quotas[c]; j++) {
                size_t source = class_start + (size_t)(j * class_counts[c] / quotas[c]);
                block->offsets[kept] = block->offsets[source];
                block->labels[kept] = block->labels[source];
                kept++;
            }
            class_start += (size_t)class_counts[c];
        }
        block->count = kept; /* the text block keeps the dropped paths: no matter */
    }
    free(class_counts);
    free(quotas);
    return status;
}

static tf_status index_classes(tf_dataset *dataset, path_block *block) {
    string_list classes = {0};
    tf_status status = list_directory(dataset->directory, &classes, NULL);
    if (status == TF_OK && classes.count == 0)
        status = tf_fail(TF_ERR_RUNTIME, "%s: no class folders (expected %s/<class>/<image>)",
                         dataset->directory, dataset->directory);
    if (status != TF_OK) {
        string_list_free(&classes);
        return status;
    }
    qsort(classes.items, classes.count, sizeof(char *), compare_strings);
    dataset->class_names = classes.items; /* the list's strings become the dataset's */
    dataset->class_count = (int)classes.count;
    char class_path[TF_PATH_MAX];
    for (int c = 0; status == TF_OK && c < dataset->class_count; c++) {
        status = join_path(class_path, dataset->directory, dataset->class_names[c]);
        if (status == TF_OK) status = index_class(class_path, c, block);
    }
    return status;
}

tf_status dataset_open(tf_dataset *dataset, const char *root, const char *split, int64_t limit) {
    *dataset = (tf_dataset){0};
    int written = snprintf(dataset->directory, sizeof dataset->directory, "%s/%s", root, split);
    if (written < 0 || written >= (int)sizeof dataset->directory)
        return tf_fail(TF_ERR_USAGE, "%s/%s: path too long", root, split);
    struct stat info;
    if (stat(dataset->directory, &info) != 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: dataset split not found: %s", dataset->directory,
                       strerror(errno));
    if (!S_ISDIR(info.st_mode)) return tf_fail(TF_ERR_RUNTIME, "%s: not a directory", dataset->directory);

    path_block block = {0};
    tf_status status = index_classes(dataset, &block);
    if (status == TF_OK && limit > 0 && (size_t)limit < block.count)
        status = apply_limit(&block, dataset->class_count, limit);
    if (status == TF_OK) {
        dataset->paths = malloc(block.count * sizeof *dataset->paths);
        if (!dataset->paths) status = tf_fail(TF_ERR_RUNTIME, "dataset index: out of memory");
    }
    if (status != TF_OK) {
        free(block.text);
        free(block.offsets);
        free(block.labels);
        dataset_close(dataset);
        return status;
    }
    /* paths[0] must be the start of the text block for dataset_close; a limit may have dropped
     * the first entry, so move the block's start there. */
    memmove(block.text, block.text + block.offsets[0], block.text_size - block.offsets[0]);
    for (size_t i = 0; i < block.count; i++)
        dataset->paths[i] = block.text + (block.offsets[i] - block.offsets[0]);
    dataset->labels = block.labels;
    dataset->count = (int64_t)block.count;
    free(block.offsets);
    return TF_OK;
}

void dataset_close(tf_dataset *dataset) {
    if (dataset->paths && dataset->count > 0) free(dataset->paths[0]);
    free(dataset->paths);
    free(dataset->labels);
    for (int c = 0; c < dataset->class_count; c++)
        free(dataset->class_names[c]);
    free(dataset->class_names);
    *dataset = (tf_dataset){0};
}
