/* evaluate() (eval/evaluate.c) over a generated ImageFolder split whose last batch is smaller
 * than the others (10 images in batches of 4: 4, 4, 2), on the CPU:
 * - every image is counted once, and the counts add up (confusion matrix, per-class images);
 * - on a backend that plans per shape (the CPU backend with plans_per_shape set, as CUDA's is)
 *   the last batch runs at the size of the batches before it, and the results are those of the
 *   plain backend, which runs it at its own size: same counts and confusion matrix, and the same
 *   summed loss; the forward's batch sizes are recorded through the backend's patch_im2col. */
#include "eval/evaluate.h"
#include "tests/stb_image_write_impl.h"
#include "tests/test_util.h"

#include <stdio.h>
#include <string.h>

enum { CLASSES = 3, IMAGES = 10, BATCH = 4, IMAGE_SIZE = 8 };

static char root[256];

/* ROOT/val/class_K/N.png: IMAGES noisy 12 x 10 images over CLASSES classes. */
static bool make_split(void) {
    tf_rng rng = tf_rng_make(3, TF_RNG_TEST, 0, 0);
    for (int i = 0; i < IMAGES; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/val/class_%d", root, i % CLASSES);
        if (!test_make_dirs(path)) return false;
        uint8_t pixels[12 * 10 * 3];
        for (size_t p = 0; p < sizeof pixels; p++)
            pixels[p] = (uint8_t)tf_rng_below(&rng, 256);
        snprintf(path + strlen(path), sizeof path - strlen(path), "/%02d.png", i);
        if (!stbi_write_png(path, 12, 10, 3, pixels, 12 * 3)) return false;
    }
    return true;
}

/* The batch sizes the forward ran at, in order: patch_im2col is its first batched operation. */
static int recorded_batches[16], recorded_count;
static void (*cpu_im2col)(void *, const void *, int, int, int, int);

static void recording_im2col(void *patches, const void *images, int batch, int channels, int size,
                             int patch) {
    if (recorded_count < 16) recorded_batches[recorded_count++] = batch;
    cpu_im2col(patches, images, batch, channels, size, patch);
}

/* Evaluates the split with a model of fixed parameters on `backend`; the forward's batch sizes go
 * to recorded_batches. */
static bool evaluate_split(const tf_dataset *dataset, const tf_backend *backend, tf_eval_result *result) {
    tf_model_config config = test_small_model_config();
    config.img_size = IMAGE_SIZE;
    config.classes = CLASSES;
    tf_loader_options options = {
        .transform = TF_TRANSFORM_EVAL,
        .batch_size = BATCH,
        .image_size = IMAGE_SIZE,
        .crop_pct = 0.875f,
        .seed = 1,
        .world_size = 1,
        .workers = 2,
    };
    tf_model model;
    tf_loader *loader = NULL;
    recorded_count = 0;
    bool ok = CHECK_OK(eval_result_init(result, CLASSES)) &&
              CHECK_OK(model_create(&model, &config, backend, BATCH, false));
    if (!ok) return false;
    ok = CHECK_OK(model_init_params(&model, 5)) && CHECK_OK(loader_create(&loader, dataset, &options)) &&
         CHECK_OK(evaluate(&model, loader, result));
    if (loader) loader_destroy(loader);
    model_destroy(&model);
    return ok;
}

static void check_counts(const char *label, const tf_eval_result *result) {
    int64_t confusion_sum = 0, class_sum = 0;
    for (int i = 0; i < CLASSES * CLASSES; i++)
        confusion_sum += result->confusion[i];
    for (int c = 0; c < CLASSES; c++)
        class_sum += result->class_images[c];
    CHECK(result->images == IMAGES && confusion_sum == IMAGES && class_sum == IMAGES,
          "%s: %lld images, confusion matrix sums to %lld, classes to %lld; expected %d", label,
          (long long)result->images, (long long)confusion_sum, (long long)class_sum, IMAGES);
    CHECK(result->class_images[0] == 4 && result->class_images[1] == 3 && result->class_images[2] == 3,
          "%s: images per class %lld %lld %lld, expected 4 3 3", label, (long long)result->class_images[0],
          (long long)result->class_images[1], (long long)result->class_images[2]);
}

static void test_last_batch_at_full_size(const tf_dataset *dataset) {
    const tf_backend *cpu = tf_cpu_backend(TF_DTYPE_F32);
    tf_backend planning = *cpu;
    planning.plans_per_shape = true;
    planning.patch_im2col = recording_im2col;
    cpu_im2col = cpu->patch_im2col;

    tf_eval_result plain = {0}, padded = {0};
    tf_backend recording_plain = *cpu;
    recording_plain.patch_im2col = recording_im2col;
    if (evaluate_split(dataset, &recording_plain, &plain) &&
        CHECK(recorded_count == 3 && recorded_batches[0] == 4 && recorded_batches[1] == 4 &&
                  recorded_batches[2] == 2,
              "plain backend: %d forwards, the last of %d images; expected 4, 4, 2", recorded_count,
              recorded_count ? recorded_batches[recorded_count - 1] : 0) &&
        evaluate_split(dataset, &planning, &padded)) {
        CHECK(recorded_count == 3 && recorded_batches[0] == 4 && recorded_batches[1] == 4 &&
                  recorded_batches[2] == 4,
              "planning backend: %d forwards, the last of %d images; expected 4, 4, 4", recorded_count,
              recorded_count ? recorded_batches[recorded_count - 1] : 0);
        check_counts("plain", &plain);
        check_counts("last batch run at full size", &padded);
        CHECK(padded.top1_correct == plain.top1_correct && padded.top5_correct == plain.top5_correct &&
                  memcmp(padded.confusion, plain.confusion, CLASSES * CLASSES * sizeof *plain.confusion) == 0,
              "top-1 %lld / %lld, top-5 %lld / %lld or the confusion matrices differ",
              (long long)padded.top1_correct, (long long)plain.top1_correct, (long long)padded.top5_correct,
              (long long)plain.top5_correct);
        double difference = padded.loss_sum - plain.loss_sum;
        CHECK(plain.loss_sum > 0.0 && (difference < 0 ? -difference : difference) <= 1e-6 * plain.loss_sum,
              "summed loss %.9g with the last batch at full size, %.9g at its own", padded.loss_sum,
              plain.loss_sum);
    }
    eval_result_free(&plain);
    eval_result_free(&padded);
}

int main(void) {
    if (!test_make_temp_dir(root, sizeof root, "tf_test_evaluate"))
        return test_skip("cannot create a temporary directory");
    tf_dataset dataset;
    if (CHECK(make_split(), "cannot write the images under %s", root) &&
        CHECK_OK(dataset_open(&dataset, root, "val", 0))) {
        test_last_batch_at_full_size(&dataset);
        dataset_close(&dataset);
    }
    test_remove_tree(root);
    return test_finish("test_evaluate");
}
