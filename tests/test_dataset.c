/* The ImageFolder index (dataloader/dataset.c) against torchvision's datasets.ImageFolder: on a
 * tree with awkward names (case, punctuation, digits, UTF-8, a hidden folder, a linked folder,
 * nested sub-folders whose sorted order is not a depth-first walk, extensions in any case, files
 * that are not images), the classes and the sample order must be exactly torchvision's. Also: the
 * errors name the path (missing split, no classes, a class without images) and a limit keeps an
 * evenly spread subset with every class.
 *
 * torchvision runs under Debian's /usr/bin/python3 (python3-torchvision), as DatasetFolder (what
 * ImageFolder is) with our list of extensions. */
#include "dataloader/loader.h"
#include "test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char root[256];

static void make_dir(const char *relative) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", root, relative);
    mkdir(path, 0755);
}

static void make_file(const char *relative) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", root, relative);
    FILE *file = fopen(path, "w");
    if (file) fclose(file);
}

static void build_tree(void) {
    static const char *const classes[] = {"b",  "B", "a_b",    "a-b", "a", "Zebra", "z", "\xc3\xa4pfel",
                                          "10", "9", ".hidden"};
    static const char *const files[] = {"x.jpg", "X.JPG", "a.Jpeg", "b.png", "c.txt", "d.bmp", "e.gif",
                                        "f.tga", "g.ppm", "h.pgm",  "noext", "jpg",   "i.webp"};
    make_dir("train");
    make_file("train/README.txt"); /* a file beside the classes is not a class */
    char path[512];
    for (size_t c = 0; c < sizeof classes / sizeof classes[0]; c++) {
        snprintf(path, sizeof path, "train/%s", classes[c]);
        make_dir(path);
        /* Not every class has every file, so the classes differ in size. */
        for (size_t f = c % 3; f < sizeof files / sizeof files[0]; f++) {
            snprintf(path, sizeof path, "train/%s/%s", classes[c], files[f]);
            make_file(path);
        }
    }
    /* Sorted roots: "a/sub" < "a/sub-x" < "a/sub/deeper" ('-' < '/'), not a depth-first order. */
    make_dir("train/a/sub");
    make_dir("train/a/sub/deeper");
    make_dir("train/a/sub-x");
    make_file("train/a/sub/y.jpg");
    make_file("train/a/sub/deeper/w.JPEG");
    make_file("train/a/sub-x/z.png");
    make_file("train/a/sub-x/.dot.jpg");
    char target[512], link[512];
    snprintf(target, sizeof target, "%s/train/Zebra", root);
    snprintf(link, sizeof link, "%s/train/linked", root);
    if (symlink(target, link) != 0) perror("symlink");
}

/* torchvision's listing, one line per class ("class NAME INDEX") and per sample ("PATH LABEL"). */
static char *torchvision_listing(void) {
    char command[1024];
    snprintf(command, sizeof command,
             "/usr/bin/python3 -c '\n"
             "import sys\n"
             "from torchvision.datasets import DatasetFolder\n"
             "ext = (\".jpg\", \".jpeg\", \".png\", \".bmp\", \".ppm\", \".pgm\", \".tga\", \".gif\")\n"
             "d = DatasetFolder(sys.argv[1], loader=lambda p: p, extensions=ext)  # ImageFolder with our "
             "extensions\n"
             "out = sys.stdout.buffer\n"
             "for name, index in sorted(d.class_to_idx.items(), key=lambda kv: kv[1]):\n"
             "    out.write(b\"class %%s %%d\\n\" %% (name.encode(\"utf-8\", \"surrogateescape\"), index))\n"
             "for path, label in d.samples:\n"
             "    out.write(b\"%%s %%d\\n\" %% (path.encode(\"utf-8\", \"surrogateescape\"), label))\n"
             "' %s/train",
             root);
    FILE *pipe = popen(command, "r");
    if (!pipe) return NULL;
    size_t capacity = 1 << 16, size = 0;
    char *text = malloc(capacity);
    size_t got;
    while ((got = fread(text + size, 1, capacity - size - 1, pipe)) > 0) {
        size += got;
        if (size + 1 == capacity) text = realloc(text, capacity *= 2);
    }
    text[size] = '\0';
    int status = pclose(pipe);
    if (status != 0) {
        free(text);
        return NULL;
    }
    return text;
}

static char *our_listing(const tf_dataset *dataset) {
    size_t capacity = 1 << 16, size = 0;
    char *text = malloc(capacity);
    text[0] = '\0';
    for (int64_t i = -dataset->class_count; i < dataset->count; i++) {
        if (size + 2 * TF_PATH_MAX > capacity) text = realloc(text, capacity *= 2);
        if (i < 0) {
            int c = (int)(i + dataset->class_count);
            size += (size_t)sprintf(text + size, "class %s %d\n", dataset->class_names[c], c);
        } else {
            size += (size_t)sprintf(text + size, "%s %d\n", dataset->paths[i], dataset->labels[i]);
        }
    }
    return text;
}

static void test_matches_torchvision(void) {
    tf_dataset dataset;
    if (!CHECK_OK(dataset_open(&dataset, root, "train", 0))) return;
    char *ours = our_listing(&dataset);
    char *theirs = torchvision_listing();
    CHECK(theirs != NULL, "torchvision's ImageFolder did not run (apt-get install python3-torchvision)");
    if (theirs && !CHECK(strcmp(ours, theirs) == 0, "listing differs from torchvision's"))
        fprintf(stderr, "--- ours:\n%s--- torchvision:\n%s", ours, theirs);
    CHECK(dataset.class_count == 12, "%d classes", dataset.class_count);
    free(ours);
    free(theirs);
    dataset_close(&dataset);
}

static void test_limit(void) {
    tf_dataset full, limited;
    if (!CHECK_OK(dataset_open(&full, root, "train", 0))) return;
    if (!CHECK_OK(dataset_open(&limited, root, "train", 20))) return;
    CHECK(limited.count == 20, "limit 20 kept %lld", (long long)limited.count);
    int seen[64] = {0};
    int64_t j = 0;
    bool ordered_subset = true;
    for (int64_t i = 0; i < limited.count; i++) {
        seen[limited.labels[i]]++;
        while (j < full.count && strcmp(full.paths[j], limited.paths[i]) != 0)
            j++;
        if (j == full.count || full.labels[j] != limited.labels[i]) ordered_subset = false;
    }
    CHECK(ordered_subset, "the limited index is not an ordered subset of the full one");
    for (int c = 0; c < full.class_count; c++)
        CHECK(seen[c] >= 1, "class %s missing under a limit", full.class_names[c]);
    dataset_close(&limited);
    tf_dataset tiny;
    CHECK(dataset_open(&tiny, root, "train", 5) == TF_ERR_USAGE, "a limit below the class count must fail");
    CHECK(dataset_open(&tiny, root, "train", 100000) == TF_OK && tiny.count == full.count,
          "a limit above the count keeps all");
    dataset_close(&tiny);
    dataset_close(&full);
}

static void check_error_names(tf_status status, const char *needle, const char *what) {
    CHECK(status != TF_OK, "%s: dataset_open succeeded", what);
    CHECK(strstr(tf_error_message(), needle) != NULL, "%s: message '%s' does not name %s", what,
          tf_error_message(), needle);
}

static void test_errors(void) {
    tf_dataset dataset;
    char expected[512];
    snprintf(expected, sizeof expected, "%s/missing", root);
    check_error_names(dataset_open(&dataset, root, "missing", 0), expected, "missing split");

    make_dir("empty");
    snprintf(expected, sizeof expected, "%s/empty", root);
    check_error_names(dataset_open(&dataset, root, "empty", 0), expected, "no classes");

    make_dir("holes");
    make_dir("holes/full");
    make_file("holes/full/a.jpg");
    make_dir("holes/nothing");
    make_file("holes/nothing/notes.txt");
    snprintf(expected, sizeof expected, "%s/holes/nothing", root);
    check_error_names(dataset_open(&dataset, root, "holes", 0), expected, "class without images");
}

int main(void) {
    if (!test_make_temp_dir(root, sizeof root, "tf_test_dataset"))
        return test_skip("cannot create a temporary directory");
    build_tree();
    test_matches_torchvision();
    test_limit();
    test_errors();
    test_remove_tree(root);
    return test_finish("test_dataset");
}
