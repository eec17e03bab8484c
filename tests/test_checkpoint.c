/* Model checkpoints and training state files: bit-exact round trips, the model config and class
 * names through the metadata, and clear errors for truncated, corrupt and mismatched files. */
#include "common/safetensors.h"
#include "tests/test_util.h"
#include "train/run_dir.h"
#include "vision/checkpoint.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *scratch = "/tmp/tokenformer_test_checkpoint";

static tf_model_config small_config(void) {
    tf_model_config config = test_small_model_config();
    config.classes = 3;
    config.pool = TF_POOL_CLS;
    config.drop_path = 0.1f;
    config.n_norm[1][TF_PATT_V] = 4;
    return config;
}

static char *class_name_storage[3] = {"cat", "dog", "fish \"quoted\""};

static void write_file(const char *path, const void *data, size_t size) {
    FILE *file = fopen(path, "wb");
    fwrite(data, 1, size, file);
    fclose(file);
}

static void *read_file(const char *path, size_t *size) {
    FILE *file = fopen(path, "rb");
    fseek(file, 0, SEEK_END);
    *size = (size_t)ftell(file);
    fseek(file, 0, SEEK_SET);
    void *data = malloc(*size);
    *size = fread(data, 1, *size, file);
    fclose(file);
    return data;
}

/* Expects checkpoint_load(path) to fail with a message that names the file and contains `what`. */
static void expect_load_error(const char *path, const char *what) {
    tf_checkpoint checkpoint;
    tf_status status = checkpoint_load(path, &checkpoint);
    const char *message = tf_error_message();
    CHECK(status != TF_OK, "loading %s should fail (%s)", path, what);
    CHECK(strstr(message, path) != NULL, "message names the file: %s", message);
    CHECK(strstr(message, what) != NULL, "message says '%s': %s", what, message);
}

static void check_round_trip(const char *path, const tf_model_config *config, const tf_param_layout *layout,
                             const float *params) {
    tf_class_names classes = {3, class_name_storage};
    safetensors_metadata_entry extra[] = {{"step", "42"}};
    CHECK_OK(checkpoint_save(path, config, layout, params, &classes, "[{\"from\": [4, 8]}]", extra, 1));
    tf_checkpoint loaded;
    if (!CHECK_OK(checkpoint_load(path, &loaded))) return;
    CHECK(memcmp(loaded.params, params, layout->total * sizeof *params) == 0, "parameters round trip bit-exact");
    CHECK(memcmp(&loaded.config, config, sizeof *config) == 0, "model config round trips (n_norm included)");
    CHECK(loaded.classes.count == 3 && strcmp(loaded.classes.names[2], "fish \"quoted\"") == 0, "class names");
    CHECK(strcmp(loaded.growth_history, "[{\"from\": [4, 8]}]") == 0, "growth history: %s", loaded.growth_history);
    CHECK(loaded.layout.total == layout->total, "layout size");
    checkpoint_free(&loaded);
}

static void check_corruptions(const char *path) {
    char broken[256];
    size_t size;
    unsigned char *bytes = read_file(path, &size);

    snprintf(broken, sizeof broken, "%s/truncated.safetensors", scratch);
    write_file(broken, bytes, size - 10);
    expect_load_error(broken, "truncated");
    write_file(broken, bytes, 5);
    expect_load_error(broken, broken);

    snprintf(broken, sizeof broken, "%s/header.safetensors", scratch);
    unsigned char *copy = malloc(size);
    memcpy(copy, bytes, size);
    copy[8] = '[';
    write_file(broken, copy, size);
    expect_load_error(broken, broken);

    /* A different model config in the metadata: the tensors no longer fit it. */
    memcpy(copy, bytes, size);
    char *dim = memmem(copy, size, "\\\"dim\\\":8", 9);
    CHECK(dim != NULL, "the config JSON is in the header");
    if (dim) {
        dim[8] = '9';
        snprintf(broken, sizeof broken, "%s/mismatch.safetensors", scratch);
        write_file(broken, copy, size);
        expect_load_error(broken, "shape");
    }
    free(copy);
    free(bytes);
}

static void check_foreign_files(const tf_param_layout *layout, const float *params) {
    char path[256];
    /* A safetensors file that is not a TokenFormer checkpoint. */
    snprintf(path, sizeof path, "%s/foreign.safetensors", scratch);
    safetensors_tensor_data tensor = {"weight", "F32", 1, {4}, params};
    CHECK_OK(safetensors_write(path, &tensor, 1, NULL, 0));
    expect_load_error(path, "not a TokenFormer checkpoint");

    /* A checkpoint with one tensor too many. */
    tf_model_config config = small_config();
    char *config_json = model_config_to_json(&config);
    safetensors_tensor_data *table = calloc((size_t)layout->count + 1, sizeof *table);
    char *names = malloc((size_t)layout->count * TF_CHECKPOINT_NAME_MAX);
    checkpoint_tensor_table(layout, "", params, names, table);
    table[layout->count] = (safetensors_tensor_data){"blocks.9.extra", "F32", 1, {2}, params};
    safetensors_metadata_entry metadata[] = {
        {"format", "tokenformer-vit"}, {"config", config_json}, {"class_names", "[\"a\", \"b\", \"c\"]"}};
    snprintf(path, sizeof path, "%s/extra.safetensors", scratch);
    CHECK_OK(safetensors_write(path, table, (size_t)layout->count + 1, metadata, 3));
    expect_load_error(path, "blocks.9.extra");
    free(config_json);
    free(table);
    free(names);
    snprintf(path, sizeof path, "%s/missing.safetensors", scratch);
    expect_load_error(path, "missing.safetensors");
}

static void check_train_state(const tf_param_layout *layout) {
    size_t n = layout->total;
    float *m = malloc(n * sizeof *m), *v = malloc(n * sizeof *v), *ema = malloc(n * sizeof *ema);
    tf_rng rng = tf_rng_make(4, TF_RNG_TEST, 0, 0);
    fill_normal_f32(m, n, 1.0f, &rng);
    fill_normal_f32(v, n, 1.0f, &rng);
    fill_normal_f32(ema, n, 1.0f, &rng);
    tf_train_progress progress = {.step = 123, .epoch = 4, .epoch_batches = 17, .seed = 0xfedcba9876543210ull,
                                  .skipped_steps = 2};
    char path[256];
    snprintf(path, sizeof path, "%s/state.safetensors", scratch);
    CHECK_OK(train_state_save(path, layout, m, v, ema, 121, &progress));

    safetensors_file *file;
    if (CHECK_OK(safetensors_open(&file, path))) {
        float *read = malloc(n * sizeof *read);
        CHECK_OK(checkpoint_read_params(file, layout, "adamw.v.", read));
        CHECK(memcmp(read, v, n * sizeof *v) == 0, "second moments round trip bit-exact");
        CHECK_OK(checkpoint_read_params(file, layout, "ema.", read));
        CHECK(memcmp(read, ema, n * sizeof *ema) == 0, "EMA round trips bit-exact");
        CHECK(strstr(safetensors_metadata(file, "progress"), "\"seed\":\"18364758544493064720\"") != NULL,
              "the 64-bit seed survives JSON: %s", safetensors_metadata(file, "progress"));
        free(read);
        safetensors_close(file);
    }
    free(m);
    free(v);
    free(ema);
}

int main(void) {
    char command[300];
    snprintf(command, sizeof command, "rm -rf %s && mkdir -p %s", scratch, scratch);
    if (system(command) != 0) return test_skip("cannot make the scratch directory");

    tf_model_config config = small_config();
    tf_param_layout layout;
    CHECK_OK(param_layout_build(&layout, &config));
    float *params = malloc(layout.total * sizeof *params);
    param_init(&layout, params, 5);
    params[0] = -0.0f; /* bit-exact means signed zeros too */

    char path[256];
    snprintf(path, sizeof path, "%s/model.safetensors", scratch);
    check_round_trip(path, &config, &layout, params);
    check_corruptions(path);
    check_foreign_files(&layout, params);
    check_train_state(&layout);

    free(params);
    param_layout_free(&layout);
    return test_finish("test_checkpoint");
}
