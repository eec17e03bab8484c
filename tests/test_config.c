/* Tests of the configuration reader (common/config.c): every file in configs/ loads and holds the
 * recipe's values; presets apply before a file's other model keys; each kind of mistake in a file
 * or a --set override gives an error naming the file (or override), the 1-based line and the key;
 * config_finalize() checks keys against each other and derives lr and n_norm; config_print()
 * writes YAML that reads back to the same struct. Scratch files go to a temporary directory. */
#include "common/config.h"
#include "tests/test_util.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char scratch_dir[256];

/* Writes text to scratch_dir/name; path receives the file's path. */
static void write_scratch(const char *name, const char *text, char *path, size_t size) {
    snprintf(path, size, "%s/%s", scratch_dir, name);
    FILE *file = fopen(path, "w");
    if (!file) {
        CHECK(false, "cannot write %s", path);
        return;
    }
    fputs(text, file);
    fclose(file);
}

static bool near(double a, double b) {
    return fabs(a - b) <= 1e-6 * fabs(b);
}

static bool contains(const char *haystack, const char *needle) {
    return strstr(haystack, needle) != NULL;
}

/* Loads configs/NAME over the defaults and finalizes it. */
static bool load_config(const char *name, tf_config *config) {
    char path[512];
    snprintf(path, sizeof path, "configs/%s", name);
    config_defaults(config);
    return CHECK_OK(config_load_file(config, path)) && CHECK_OK(config_finalize(config));
}

/* ---- the shipped files ---- */

static void test_every_file_loads(void) {
    DIR *dir = opendir("configs");
    if (!CHECK(dir != NULL, "cannot open configs/ (run from the repository root)")) return;
    int loaded = 0;
    for (struct dirent *entry; (entry = readdir(dir));) {
        size_t length = strlen(entry->d_name);
        if (length < 6 || strcmp(entry->d_name + length - 5, ".yaml") != 0) continue;
        tf_config config;
        if (load_config(entry->d_name, &config))
            loaded++;
        else
            fprintf(stderr, "  while loading configs/%s\n", entry->d_name);
    }
    closedir(dir);
    CHECK(loaded >= 6, "loaded %d configs, expected the 6 of issue 2 at least", loaded);
}

/* The MAE recipe settings common to the four ImageNet files. */
static void check_mae_recipe(const tf_config *config, const char *name, int epochs, float drop_path) {
    CHECK(config->model.img_size == 224 && config->model.patch == 16 && config->model.classes == 1000,
          "%s: img %d patch %d classes %d", name, config->model.img_size, config->model.patch,
          config->model.classes);
    CHECK(config->model.drop_path == drop_path, "%s: drop_path %g", name, config->model.drop_path);
    CHECK(config->schedule.epochs == epochs, "%s: epochs %d", name, config->schedule.epochs);
    CHECK(config->schedule.batch == 4096 && config->schedule.warmup_epochs == 20.0f, "%s: batch %d warmup %g",
          name, config->schedule.batch, config->schedule.warmup_epochs);
    CHECK(near(config->optimizer.lr, 1.6e-3), "%s: lr %g after finalize, expected 1.6e-3", name,
          config->optimizer.lr);
    CHECK(config->optimizer.weight_decay == 0.3f && config->optimizer.beta1 == 0.9f &&
              config->optimizer.beta2 == 0.95f && config->optimizer.ema_decay == 0.9999f,
          "%s: wd %g betas %g %g ema %g", name, config->optimizer.weight_decay, config->optimizer.beta1,
          config->optimizer.beta2, config->optimizer.ema_decay);
    CHECK(config->augment.mixup == 0.8f && config->augment.cutmix == 1.0f &&
              config->augment.label_smoothing == 0.1f && config->augment.scale_min == 0.08f,
          "%s: mixup %g cutmix %g smoothing %g scale_min %g", name, config->augment.mixup,
          config->augment.cutmix, config->augment.label_smoothing, config->augment.scale_min);
    CHECK(strcmp(config->augment.randaugment, "rand-m9-mstd0.5-inc1") == 0, "%s: randaugment '%s'", name,
          config->augment.randaugment);
}

static void check_shape(const tf_config *config, const char *name, int depth, int dim, int heads, int n_attn,
                        int n_ffn) {
    const tf_model_config *model = &config->model;
    CHECK(model->depth == depth && model->dim == dim && model->heads == heads, "%s: depth %d dim %d heads %d",
          name, model->depth, model->dim, model->heads);
    CHECK(model->n_attn == n_attn && model->n_ffn == n_ffn, "%s: n_attn %d n_ffn %d", name, model->n_attn,
          model->n_ffn);
    CHECK(model->n_norm[0][TF_PATT_Q] == n_attn && model->n_norm[depth - 1][TF_PATT_O] == n_attn &&
              model->n_norm[depth - 1][TF_PATT_FFN] == n_ffn,
          "%s: n_norm %d %d %d", name, model->n_norm[0][TF_PATT_Q], model->n_norm[depth - 1][TF_PATT_O],
          model->n_norm[depth - 1][TF_PATT_FFN]);
    if (depth < TF_MAX_DEPTH)
        CHECK(model->n_norm[depth][TF_PATT_Q] == 0, "%s: n_norm beyond depth is %d", name,
              model->n_norm[depth][TF_PATT_Q]);
}

static void test_imagenet_files(void) {
    tf_config config;
    if (load_config("tokenformer_b16.yaml", &config)) {
        check_shape(&config, "b16", 12, 768, 12, 768, 3072);
        check_mae_recipe(&config, "b16", 300, 0.1f);
    }
    if (load_config("tokenformer_b16_pm.yaml", &config)) {
        check_shape(&config, "b16_pm", 12, 768, 12, 576, 2304);
        check_mae_recipe(&config, "b16_pm", 300, 0.1f);
    }
    if (load_config("tokenformer_l16.yaml", &config)) {
        check_shape(&config, "l16", 24, 1024, 16, 1024, 4096);
        check_mae_recipe(&config, "l16", 200, 0.2f);
    }
    if (load_config("tokenformer_l16_pm.yaml", &config)) {
        check_shape(&config, "l16_pm", 24, 1024, 16, 768, 3072);
        check_mae_recipe(&config, "l16_pm", 200, 0.2f);
    }
}

/* What the two demos share (issue 2, "Configs"). */
static void check_fmnist_recipe(const tf_config *config, const char *name) {
    CHECK(config->model.img_size == 28 && config->model.patch == 4 && config->model.classes == 10 &&
              config->model.pool == TF_POOL_AVG,
          "%s: img %d patch %d classes %d pool %d", name, config->model.img_size, config->model.patch,
          config->model.classes, config->model.pool);
    CHECK(config->optimizer.lr == 1e-3f && config->optimizer.min_lr == 1e-6f &&
              config->optimizer.weight_decay == 0.05f && config->optimizer.ema_decay == 0.0f,
          "%s: lr %g min_lr %g wd %g ema %g", name, config->optimizer.lr, config->optimizer.min_lr,
          config->optimizer.weight_decay, config->optimizer.ema_decay);
    CHECK(config->schedule.warmup_epochs == 1.0f, "%s: warmup %g", name, config->schedule.warmup_epochs);
    CHECK(config->model.drop_path == 0.0f, "%s: drop_path %g (the short demos train without)", name,
          config->model.drop_path);
    CHECK(config->data.crop_pct == 1.0f && strcmp(config->data.root, "data/fashion-mnist") == 0,
          "%s: crop_pct %g root '%s'", name, config->data.crop_pct, config->data.root);
    CHECK(config->augment.scale_min == 0.8f && config->augment.hflip == 0.5f &&
              config->augment.mixup == 0.0f && config->augment.cutmix == 0.0f &&
              strcmp(config->augment.randaugment, "none") == 0,
          "%s: scale_min %g hflip %g mixup %g cutmix %g randaugment '%s'", name, config->augment.scale_min,
          config->augment.hflip, config->augment.mixup, config->augment.cutmix, config->augment.randaugment);
    CHECK(config->run.ckpt_every == 0 && config->run.log_every == 50, "%s: ckpt_every %d log_every %d", name,
          config->run.ckpt_every, config->run.log_every);
}

static void test_fmnist_files(void) {
    tf_config config;
    if (load_config("fmnist_micro.yaml", &config)) {
        check_shape(&config, "fmnist_micro", 4, 96, 3, 96, 384);
        check_fmnist_recipe(&config, "fmnist_micro");
        CHECK(config.schedule.epochs == 3 && config.schedule.batch == 128 &&
                  config.schedule.micro_batch == 128,
              "fmnist_micro: epochs %d batch %d micro %d", config.schedule.epochs, config.schedule.batch,
              config.schedule.micro_batch);
    }
    if (load_config("fmnist_tiny.yaml", &config)) {
        check_shape(&config, "fmnist_tiny", 6, 192, 3, 192, 768);
        check_fmnist_recipe(&config, "fmnist_tiny");
        CHECK(config.schedule.epochs == 10 && config.schedule.batch == 256 &&
                  config.schedule.micro_batch == 256,
              "fmnist_tiny: epochs %d batch %d micro %d", config.schedule.epochs, config.schedule.batch,
              config.schedule.micro_batch);
    }
}

/* ---- defaults and presets ---- */

static void test_defaults(void) {
    tf_config config;
    config_defaults(&config);
    CHECK(config.model.dim == 768 && config.model.depth == 12 && config.model.n_ffn == 3072,
          "default model dim %d depth %d n_ffn %d", config.model.dim, config.model.depth, config.model.n_ffn);
    CHECK(config.model.eps == 1e-6f && config.model.drop_path == 0.1f, "default eps %g drop_path %g",
          config.model.eps, config.model.drop_path);
    CHECK(config.optimizer.lr == 0.0f && config.optimizer.base_lr == 1e-4f, "default lr %g base_lr %g",
          config.optimizer.lr, config.optimizer.base_lr);
    CHECK(strcmp(config.data.root, "") == 0 && strcmp(config.data.train_split, "train") == 0 &&
              strcmp(config.data.val_split, "val") == 0,
          "default data root '%s' splits '%s' '%s'", config.data.root, config.data.train_split,
          config.data.val_split);
    CHECK(config.run.device == TF_DEVICE_AUTO && config.run.max_bad_steps == 5 &&
              config.run.ckpt_every == 1000,
          "default device %d max_bad_steps %d ckpt_every %d", config.run.device, config.run.max_bad_steps,
          config.run.ckpt_every);
    if (CHECK_OK(config_finalize(&config)))
        CHECK(near(config.optimizer.lr, 1.6e-3), "default lr after finalize %g", config.optimizer.lr);
}

static void test_presets(void) {
    tf_model_config model = {0};
    if (CHECK_OK(config_apply_model_preset(&model, "l16_pm")))
        CHECK(model.depth == 24 && model.dim == 1024 && model.heads == 16 && model.n_attn == 768 &&
                  model.n_ffn == 3072 && model.img_size == 224 && model.patch == 16 && model.classes == 1000,
              "l16_pm: depth %d dim %d heads %d n_attn %d n_ffn %d", model.depth, model.dim, model.heads,
              model.n_attn, model.n_ffn);
    CHECK(config_apply_model_preset(&model, "b32") == TF_ERR_USAGE, "unknown preset accepted");
    CHECK(contains(tf_error_message(), "b32"), "message: %s", tf_error_message());
    CHECK(model.dim == 1024, "failed preset changed dim to %d", model.dim);
}

/* The file's preset applies first wherever it stands; the file's model keys override it. */
static void test_preset_then_override(void) {
    char path[512];
    write_scratch("override.yaml",
                  "model:\n  dim: 512\n  heads: 8\n  preset: l16\n  n_ffn: 2048\n"
                  "schedule:\n  batch: 1024\n",
                  path, sizeof path);
    tf_config config;
    config_defaults(&config);
    if (CHECK_OK(config_load_file(&config, path)) && CHECK_OK(config_finalize(&config))) {
        CHECK(config.model.dim == 512 && config.model.heads == 8 && config.model.n_ffn == 2048,
              "file keys lost to the preset: dim %d heads %d n_ffn %d", config.model.dim, config.model.heads,
              config.model.n_ffn);
        CHECK(config.model.depth == 24 && config.model.n_attn == 1024,
              "preset not applied: depth %d n_attn %d", config.model.depth, config.model.n_attn);
        CHECK(near(config.optimizer.lr, 4e-4), "lr %g, expected 1e-4 * 1024 / 256", config.optimizer.lr);
    }
    /* Overrides apply in order: a later --set preset replaces an earlier --set dim. */
    config_defaults(&config);
    CHECK_OK(config_set(&config, "model.dim=384"));
    CHECK(config.model.dim == 384, "--set dim gave %d", config.model.dim);
    CHECK_OK(config_set(&config, "model.preset=l16"));
    CHECK(config.model.dim == 1024 && config.model.depth == 24, "--set preset gave dim %d depth %d",
          config.model.dim, config.model.depth);
}

/* ---- errors in files ---- */

/* Loads text (as scratch file name) and checks the error names the file, line and key, and
 * contains the given fragment; the config must be left as it was. */
static void expect_file_error(const char *name, const char *text, int line, const char *key,
                              const char *fragment) {
    char path[512], where[600];
    write_scratch(name, text, path, sizeof path);
    tf_config config, before;
    config_defaults(&config);
    config_set(&config, "model.dim=384"); /* a non-default value a failed load must keep */
    before = config;
    tf_status status = config_load_file(&config, path);
    const char *message = tf_error_message();
    CHECK(status == TF_ERR_USAGE, "%s: status %d, expected TF_ERR_USAGE", name, status);
    snprintf(where, sizeof where, "%s:%d:", path, line);
    CHECK(contains(message, where), "%s: message lacks '%s': %s", name, where, message);
    CHECK(contains(message, key), "%s: message lacks key '%s': %s", name, key, message);
    CHECK(contains(message, fragment), "%s: message lacks '%s': %s", name, fragment, message);
    CHECK(memcmp(&config, &before, sizeof config) == 0, "%s: a failed load changed the config", name);
}

static void test_file_errors(void) {
    const char *header = "# a comment line\n\n";
    char text[1024];
    snprintf(text, sizeof text, "%smodel:\n  depth: 6\n  dimm: 96\n", header);
    expect_file_error("unknown_key.yaml", text, 5, "model.dimm", "did you mean 'model.dim'");
    snprintf(text, sizeof text, "%smodel:\n  lr: 0.1\n", header);
    expect_file_error("wrong_section_key.yaml", text, 4, "model.lr", "did you mean 'optimizer.lr'");
    snprintf(text, sizeof text, "%smodel:\n  depth: 6\n  dim: abc\n", header);
    expect_file_error("wrong_type.yaml", text, 5, "model.dim", "model.dim: expected an integer, got 'abc'");
    snprintf(text, sizeof text, "%smodel:\n  dim: 7.5\n", header);
    expect_file_error("int_fraction.yaml", text, 4, "model.dim", "expected an integer, got '7.5'");
    snprintf(text, sizeof text, "%soptimizer:\n  beta1: 0.9\n  beta2: 1.5\n", header);
    expect_file_error("out_of_range.yaml", text, 5, "optimizer.beta2",
                      "optimizer.beta2: 1.5 is out of range [0, 1)");
    snprintf(text, sizeof text, "%soptimizer:\n  base_lr: fast\n", header);
    expect_file_error("float_type.yaml", text, 4, "optimizer.base_lr", "expected a number, got 'fast'");
    snprintf(text, sizeof text, "%soptimizer:\n  lr: nan\n", header);
    expect_file_error("float_nan.yaml", text, 4, "optimizer.lr", "expected a number");
    snprintf(text, sizeof text, "%smodel:\n  depth: 65\n", header);
    expect_file_error("depth_range.yaml", text, 4, "model.depth", "65 is out of range [1, 64]");
    snprintf(text, sizeof text, "%sdata:\n  crop_pct: 0\n", header);
    expect_file_error("crop_range.yaml", text, 4, "data.crop_pct", "0 is out of range (0, 1]");
    snprintf(text, sizeof text, "%smodle:\n  dim: 96\n", header);
    expect_file_error("unknown_section.yaml", text, 3, "modle", "unknown section (did you mean 'model'?)");
    snprintf(text, sizeof text, "%smodel:\n  dim: 96\n heads: 3\n", header);
    expect_file_error("bad_indent.yaml", text, 5, "YAML syntax error", "did not find expected key");
    snprintf(text, sizeof text, "%smodel:\n  dim: 96\n  heads: \"3\n", header);
    expect_file_error("bad_quote.yaml", text, 6, "YAML syntax error", "found unexpected end of stream");
    snprintf(text, sizeof text, "%smodel:\n  dim: 96\n---\nrun:\n  seed: 1\n", header);
    expect_file_error("two_documents.yaml", text, 5, "", "more than one YAML document");
    snprintf(text, sizeof text, "%smodel: &shape\n  dim: 96\nrun: *shape\n", header);
    expect_file_error("alias.yaml", text, 5, "run", "aliases are not supported");
    snprintf(text, sizeof text, "%smodel:\n  dim: [96, 128]\n", header);
    expect_file_error("sequence_value.yaml", text, 4, "model.dim", "expected a scalar value, got a sequence");
    snprintf(text, sizeof text, "%smodel: 96\n", header);
    expect_file_error("scalar_section.yaml", text, 3, "model", "expected a mapping of keys, got a scalar");
    snprintf(text, sizeof text, "%smodel:\n  pool: max\n", header);
    expect_file_error("bad_enum.yaml", text, 4, "model.pool", "expected one of avg|cls, got 'max'");
    snprintf(text, sizeof text, "%smodel:\n  preset: b32\n", header);
    expect_file_error("bad_preset.yaml", text, 4, "model.preset", "unknown model preset 'b32'");
    snprintf(text, sizeof text, "%smodel:\n  dim: 96\n  dim: 128\n", header);
    expect_file_error("duplicate_key.yaml", text, 5, "model.dim", "set twice (first at line 4)");
    snprintf(text, sizeof text, "%srun:\n  seed: -1\n", header);
    expect_file_error("negative_seed.yaml", text, 4, "run.seed", "expected an unsigned integer");
    snprintf(text, sizeof text, "%sdata:\n  train_split: \"\"\n", header);
    expect_file_error("empty_split.yaml", text, 4, "data.train_split", "must not be empty");
    snprintf(text, sizeof text, "%saugmentation:\n  randaugment: auto-v0\n", header);
    expect_file_error("bad_randaugment.yaml", text, 4, "augmentation.randaugment", "got 'auto-v0'");
    snprintf(text, sizeof text, "%s- model\n", header);
    expect_file_error("top_sequence.yaml", text, 3, "", "expected a mapping of sections");

    char long_value[200];
    memset(long_value, 'x', sizeof long_value - 1);
    long_value[sizeof long_value - 1] = '\0';
    snprintf(text, sizeof text, "%saugmentation:\n  randaugment: rand-%s\n", header, long_value);
    expect_file_error("too_long.yaml", text, 4, "augmentation.randaugment",
                      "too long (204 bytes, at most 63)");

    tf_config config;
    config_defaults(&config);
    CHECK(config_load_file(&config, "configs/no_such_file.yaml") == TF_ERR_USAGE, "missing file loaded");
    CHECK(contains(tf_error_message(), "configs/no_such_file.yaml"), "message: %s", tf_error_message());
}

/* Files that are valid though unusual: empty, comments only, an empty section, quoted values. */
static void test_unusual_files(void) {
    char path[512];
    tf_config config, defaults;
    config_defaults(&defaults);
    write_scratch("empty.yaml", "", path, sizeof path);
    config = defaults;
    if (CHECK_OK(config_load_file(&config, path)))
        CHECK(memcmp(&config, &defaults, sizeof config) == 0, "an empty file changed the config");
    write_scratch("comments.yaml", "# nothing here\n", path, sizeof path);
    CHECK_OK(config_load_file(&config, path));
    write_scratch("forms.yaml",
                  "model:\ndata:\n  root: \"/data/my images\"\n  val_limit: '100'\n"
                  "optimizer: {base_lr: 1.6e-3, min_lr: .5e-6, eps: 1E-8}\n"
                  "run:\n  seed: 18446744073709551615\n  device: cuda\n",
                  path, sizeof path);
    config = defaults;
    if (CHECK_OK(config_load_file(&config, path))) {
        CHECK(strcmp(config.data.root, "/data/my images") == 0, "root '%s'", config.data.root);
        CHECK(config.data.val_limit == 100, "val_limit %d", config.data.val_limit);
        CHECK(config.optimizer.base_lr == 1.6e-3f && config.optimizer.min_lr == 0.5e-6f &&
                  config.optimizer.eps == 1e-8f,
              "base_lr %g min_lr %g eps %g", config.optimizer.base_lr, config.optimizer.min_lr,
              config.optimizer.eps);
        CHECK(config.run.seed == 18446744073709551615ull && config.run.device == TF_DEVICE_CUDA,
              "seed %llu device %d", config.run.seed, config.run.device);
    }
}

/* ---- --set overrides ---- */

static void expect_set_error(const char *assignment, const char *fragment) {
    tf_config config, before;
    config_defaults(&config);
    before = config;
    tf_status status = config_set(&config, assignment);
    const char *message = tf_error_message();
    CHECK(status == TF_ERR_USAGE, "--set %s: status %d", assignment, status);
    CHECK(contains(message, fragment), "--set %s: message lacks '%s': %s", assignment, fragment, message);
    CHECK(memcmp(&config, &before, sizeof config) == 0, "--set %s: a failed override changed the config",
          assignment);
}

static void test_set(void) {
    tf_config config;
    config_defaults(&config);
    CHECK_OK(config_set(&config, "optimizer.base_lr=2e-4"));
    CHECK_OK(config_set(&config, "run.device=cpu"));
    CHECK_OK(config_set(&config, "data.root=/tmp/a=b"));
    CHECK_OK(config_set(&config, "model.pool=cls"));
    CHECK_OK(config_set(&config, "run.seed=42"));
    CHECK_OK(config_set(&config, "schedule.warmup_epochs=0.5"));
    CHECK(config.optimizer.base_lr == 2e-4f, "base_lr %g", config.optimizer.base_lr);
    CHECK(config.run.device == TF_DEVICE_CPU, "device %d", config.run.device);
    CHECK(strcmp(config.data.root, "/tmp/a=b") == 0, "root '%s'", config.data.root);
    CHECK(config.model.pool == TF_POOL_CLS && config.run.seed == 42, "pool %d seed %llu", config.model.pool,
          config.run.seed);
    CHECK(config.schedule.warmup_epochs == 0.5f, "warmup %g", config.schedule.warmup_epochs);

    expect_set_error("model.dim=abc", "--set model.dim=abc: expected an integer");
    expect_set_error("optimizer.beta2=1.5", "--set optimizer.beta2=1.5: 1.5 is out of range [0, 1)");
    expect_set_error("model.dimm=96",
                     "--set model.dimm=96: model.dimm: unknown key (did you mean 'model.dim'?)");
    expect_set_error("optimiser.lr=1",
                     "--set optimiser.lr=1: optimiser: unknown section (did you mean 'optimizer'?)");
    expect_set_error("model.dim", "--set model.dim: expected section.key=value");
    expect_set_error("dim=96", "--set dim=96: expected section.key=value");
    expect_set_error("run.device=tpu", "expected one of auto|cpu|cuda, got 'tpu'");
    expect_set_error("model.preset=h14", "--set model.preset=h14: unknown model preset 'h14'");
    expect_set_error("run.seed=18446744073709551616", "out of range");
    expect_set_error("model.heads=", "expected an integer, got ''");
}

/* ---- cross-key checks in config_finalize() ---- */

static void expect_finalize_error(const char *first, const char *second, const char *fragment) {
    tf_config config;
    config_defaults(&config);
    CHECK_OK(config_set(&config, first));
    if (second) CHECK_OK(config_set(&config, second));
    tf_status status = config_finalize(&config);
    CHECK(status == TF_ERR_USAGE, "finalize after %s: status %d", first, status);
    CHECK(contains(tf_error_message(), fragment), "finalize after %s: message lacks '%s': %s", first,
          fragment, tf_error_message());
}

static void test_finalize(void) {
    expect_finalize_error("model.heads=7", NULL, "model.dim (768) is not divisible by model.heads (7)");
    expect_finalize_error("model.patch=15", NULL,
                          "model.img_size (224) is not divisible by model.patch (15)");
    expect_finalize_error("augmentation.scale_min=0.9", "augmentation.scale_max=0.5",
                          "augmentation.scale_min (0.9) is greater than augmentation.scale_max (0.5)");
    expect_finalize_error("augmentation.ratio_min=2", NULL, "augmentation.ratio_min (2) is greater than");
    expect_finalize_error("schedule.micro_batch=512", "schedule.batch=256",
                          "schedule.micro_batch (512) is greater than schedule.batch (256)");
    expect_finalize_error("schedule.epochs=10", NULL,
                          "schedule.warmup_epochs (20) is greater than schedule.epochs");
    expect_finalize_error("optimizer.base_lr=0", NULL, "optimizer.lr and optimizer.base_lr are both 0");

    /* A field set by code, not by the parser, is still checked against the table. */
    tf_config config;
    config_defaults(&config);
    config.optimizer.beta2 = 1.0f;
    CHECK(config_finalize(&config) == TF_ERR_USAGE, "beta2 = 1 passed finalize");
    CHECK(contains(tf_error_message(), "optimizer.beta2: 1.0 is out of range [0, 1)"), "message: %s",
          tf_error_message());

    /* An absolute lr is kept; micro_batch 0 (batch / world size) passes. */
    config_defaults(&config);
    CHECK_OK(config_set(&config, "optimizer.lr=3e-3"));
    CHECK_OK(config_set(&config, "schedule.micro_batch=0"));
    if (CHECK_OK(config_finalize(&config))) CHECK(config.optimizer.lr == 3e-3f, "lr %g", config.optimizer.lr);
}

/* ---- print and read back ---- */

static void expect_round_trip(const tf_config *original, const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", scratch_dir, name);
    FILE *file = fopen(path, "w");
    if (!CHECK(file != NULL, "cannot write %s", path)) return;
    config_print(original, file);
    fclose(file);
    tf_config loaded;
    config_defaults(&loaded);
    if (!CHECK_OK(config_load_file(&loaded, path)) || !CHECK_OK(config_finalize(&loaded))) return;
    CHECK(memcmp(&loaded, original, sizeof loaded) == 0, "%s: the printed config reads back different", name);
    CHECK(loaded.optimizer.lr == original->optimizer.lr && loaded.model.n_ffn == original->model.n_ffn &&
              strcmp(loaded.data.root, original->data.root) == 0,
          "%s: lr %g vs %g, n_ffn %d vs %d, root '%s' vs '%s'", name, loaded.optimizer.lr,
          original->optimizer.lr, loaded.model.n_ffn, original->model.n_ffn, loaded.data.root,
          original->data.root);
}

static void test_round_trip(void) {
    tf_config config;
    config_defaults(&config);
    if (CHECK_OK(config_finalize(&config))) expect_round_trip(&config, "print_defaults.yaml");
    if (load_config("fmnist_micro.yaml", &config)) expect_round_trip(&config, "print_micro.yaml");

    /* Values that need care: quotes and backslashes, a float with no short form, a 64-bit seed. */
    config_defaults(&config);
    CHECK_OK(config_set(&config, "data.root=/data/\"odd\" dir\\x: #1"));
    CHECK_OK(config_set(&config, "optimizer.base_lr=0.00033333333"));
    CHECK_OK(config_set(&config, "run.seed=18446744073709551615"));
    CHECK_OK(config_set(&config, "model.pool=cls"));
    CHECK_OK(config_set(&config, "run.device=cuda"));
    CHECK_OK(config_set(&config, "model.preset=l16_pm"));
    if (CHECK_OK(config_finalize(&config))) expect_round_trip(&config, "print_odd.yaml");

    /* The comparison itself can tell configs apart. */
    tf_config other = config;
    other.optimizer.min_lr *= 2.0f;
    CHECK(memcmp(&other, &config, sizeof config) != 0, "memcmp does not see a changed field");
}

static void remove_scratch(void) {
    DIR *dir = opendir(scratch_dir);
    if (!dir) return;
    char path[600];
    for (struct dirent *entry; (entry = readdir(dir));) {
        if (entry->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", scratch_dir, entry->d_name);
        unlink(path);
    }
    closedir(dir);
    rmdir(scratch_dir);
}

int main(void) {
    snprintf(scratch_dir, sizeof scratch_dir, "/tmp/test_config.XXXXXX");
    if (!mkdtemp(scratch_dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_every_file_loads();
    test_imagenet_files();
    test_fmnist_files();
    test_defaults();
    test_presets();
    test_preset_then_override();
    test_file_errors();
    test_unusual_files();
    test_set();
    test_finalize();
    test_round_trip();
    remove_scratch();
    return test_finish("test_config");
}
