/* Growth by parameter tokens (vision/scale.h, `tokenformer scale`): zero keys with fixed n_norm
 * leave the logits equal (fp32, CPU backend), random keys or a following n_norm change them; a
 * grown training state keeps the old moments bit for bit and starts new rows at 0, the EMA's new
 * rows equal the new weights; growing twice equals growing once; B/16 grown to 1024/4096 has that
 * configuration's parameter count; the growth history entry; refusals of shrinking sizes and of
 * state files that do not belong to the checkpoint. */
#include "cli/commands.h"
#include "common/config.h"
#include "common/safetensors.h"
#include "tests/test_util.h"
#include "train/run_dir.h"
#include "vision/checkpoint.h"
#include "vision/model.h"
#include "vision/scale.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char scratch[128];

static tf_model_config small_config(void) {
    tf_model_config config = test_small_model_config();
    config.dim = 16;
    config.n_norm[1][TF_PATT_K] = 4; /* as after an earlier growth: "fixed" must keep this one too */
    return config;
}

static tf_scale_options options_for(int n_attn, int n_ffn, tf_scale_key_init key_init, tf_scale_norm norm) {
    return (tf_scale_options){
        .n_attn = n_attn, .n_ffn = n_ffn, .key_init = key_init, .norm = norm, .seed = 7};
}

/* Random parameters larger than the init gives, so every token matters to the logits. */
static float *random_params(const tf_param_layout *layout, uint64_t seed) {
    float *params = malloc(layout->total * sizeof *params);
    param_init(layout, params, seed);
    tf_rng rng = tf_rng_make(seed, TF_RNG_TEST, 1, 0);
    for (size_t i = 0; i < layout->total; i++)
        params[i] += 0.3f * (float)tf_rng_normal(&rng);
    return params;
}

/* Grows config/params; returns the grown params (malloc'd) and fills the grown config and layout. */
static float *grow(const tf_model_config *config, const tf_param_layout *layout, const float *params,
                   const tf_scale_options *options, tf_model_config *grown_config,
                   tf_param_layout *grown_layout) {
    scale_config(config, options, grown_config);
    CHECK_OK(param_layout_build(grown_layout, grown_config));
    float *grown = malloc(grown_layout->total * sizeof *grown);
    CHECK_OK(scale_params(layout, params, grown_layout, options, grown));
    return grown;
}

/* fp32 logits of a fixed random batch [batch, classes]. */
static float *logits_of(const tf_model_config *config, const float *params, int batch) {
    tf_model model;
    float *logits = calloc((size_t)batch * config->classes, sizeof *logits);
    if (!CHECK_OK(model_create(&model, config, tf_cpu_backend(TF_DTYPE_F32), batch, false))) return logits;
    size_t pixel_count = (size_t)batch * config->channels * config->img_size * config->img_size;
    uint8_t *pixels = malloc(pixel_count);
    tf_rng rng = tf_rng_make(3, TF_RNG_TEST, 2, 0);
    for (size_t i = 0; i < pixel_count; i++)
        pixels[i] = (uint8_t)tf_rng_below(&rng, 256);
    model_set_params(&model, params);
    model_load_pixels(&model, pixels, batch);
    model_forward(&model, batch, NULL);
    CHECK_OK(model_logits(&model, logits, batch));
    free(pixels);
    model_destroy(&model);
    return logits;
}

/* ---- the function ---------------------------------------------------------------------------- */

static void check_function(void) {
    tf_model_config config = small_config();
    tf_param_layout layout;
    CHECK_OK(param_layout_build(&layout, &config));
    float *params = random_params(&layout, 11);
    const int batch = 4;
    size_t n_logits = (size_t)batch * config.classes;
    float *before = logits_of(&config, params, batch);

    static const struct {
        tf_scale_key_init key_init;
        tf_scale_norm norm;
        bool preserves;
    } cases[] = {{TF_SCALE_KEYS_ZERO, TF_SCALE_NORM_FIXED, true},
                 {TF_SCALE_KEYS_RANDOM, TF_SCALE_NORM_CURRENT, false},
                 {TF_SCALE_KEYS_RANDOM, TF_SCALE_NORM_FIXED, false},
                 {TF_SCALE_KEYS_ZERO, TF_SCALE_NORM_CURRENT, false}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        tf_scale_options options = options_for(12, 20, cases[c].key_init, cases[c].norm);
        tf_model_config grown_config;
        tf_param_layout grown_layout;
        float *grown = grow(&config, &layout, params, &options, &grown_config, &grown_layout);
        float *after = logits_of(&grown_config, grown, batch);
        double error = relative_error_f32(after, before, n_logits);
        const char *label = scale_key_init_name(options.key_init), *norm = scale_norm_name(options.norm);
        CHECK(scale_preserves_function(&options) == cases[c].preserves, "keys %s, norm %s: preserves flag",
              label, norm);
        if (cases[c].preserves)
            CHECK(error < 1e-5, "keys %s, norm %s: logits equal within 1e-5 relative (%.2e)", label, norm,
                  error);
        else
            CHECK(error > 1e-2, "keys %s, norm %s: logits clearly change (%.2e)", label, norm, error);
        printf("  keys %-6s norm %-7s: logits relative change %.2e\n", label, norm, error);
        free(after);
        free(grown);
        param_layout_free(&grown_layout);
    }
    free(before);
    free(params);
    param_layout_free(&layout);
}

/* ---- the new rows and the config ------------------------------------------------------------- */

static bool all_zero(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (x[i] != 0.0f || 1.0f / x[i] < 0.0f) return false; /* +0.0 exactly */
    return true;
}

static void check_rows_and_config(void) {
    tf_model_config config = small_config();
    tf_param_layout layout;
    CHECK_OK(param_layout_build(&layout, &config));
    float *params = random_params(&layout, 12);
    tf_scale_options options = options_for(12, 20, TF_SCALE_KEYS_ZERO, TF_SCALE_NORM_FIXED);
    tf_model_config grown_config;
    tf_param_layout grown_layout;
    float *grown = grow(&config, &layout, params, &options, &grown_config, &grown_layout);

    CHECK(grown_config.n_attn == 12 && grown_config.n_ffn == 20, "config has the new counts");
    CHECK(memcmp(grown_config.n_norm, config.n_norm, sizeof config.n_norm) == 0, "fixed: every n_norm kept");
    double sum = 0.0, sum_squares = 0.0;
    size_t drawn = 0;
    for (int i = 0; i < layout.count; i++) {
        const tf_tensor_info *a = &layout.tensors[i], *b = &grown_layout.tensors[i];
        CHECK(memcmp(params + a->offset, grown + b->offset, a->count * sizeof *params) == 0,
              "%s: old rows kept", a->name);
        const float *added = grown + b->offset + a->count;
        size_t added_count = b->count - a->count;
        if (b->block >= 0) {
            int64_t expected = b->pattention == TF_PATT_FFN ? 20 : 12;
            CHECK(b->shape[0] == expected, "%s has %lld rows", b->name, (long long)b->shape[0]);
        }
        if (b->is_key) CHECK(all_zero(added, added_count), "%s: new key rows are +0", b->name);
        if (b->block >= 0 && !b->is_key)
            for (size_t j = 0; j < added_count; j++, drawn++)
                sum += added[j], sum_squares += (double)added[j] * added[j];
    }
    double std = sqrt(sum_squares / drawn), expected_std = param_value_init_std(&config);
    CHECK(fabs(std / expected_std - 1.0) < 0.1 && fabs(sum / drawn) < 0.1 * expected_std,
          "new value rows ~ N(0, %.4f): mean %.2e, std %.4f over %zu values", expected_std, sum / drawn, std,
          drawn);

    tf_scale_options current = options_for(12, 20, TF_SCALE_KEYS_RANDOM, TF_SCALE_NORM_CURRENT);
    tf_model_config current_config;
    scale_config(&config, &current, &current_config);
    CHECK(current_config.n_norm[1][TF_PATT_K] == 12 && current_config.n_norm[0][TF_PATT_FFN] == 20,
          "current: n_norm follows the new counts");

    int n_attn, n_ffn;
    CHECK_OK(scale_factor_sizes(&config, 1.5, &n_attn, &n_ffn));
    CHECK(n_attn == 9 && n_ffn == 15, "--factor 1.5 of 6/10 is 9/15 (got %d/%d)", n_attn, n_ffn);
    free(grown);
    free(params);
    param_layout_free(&grown_layout);
    param_layout_free(&layout);
}

/* 6/10 -> 9/15 -> 12/20 equals 6/10 -> 12/20, bit for bit (each row has its own stream). */
static void check_twice_equals_once(void) {
    tf_model_config config = small_config();
    tf_param_layout layout;
    CHECK_OK(param_layout_build(&layout, &config));
    float *params = random_params(&layout, 13);
    for (int random_keys = 0; random_keys < 2; random_keys++) {
        tf_scale_key_init key_init = random_keys ? TF_SCALE_KEYS_RANDOM : TF_SCALE_KEYS_ZERO;
        tf_scale_norm norm = random_keys ? TF_SCALE_NORM_CURRENT : TF_SCALE_NORM_FIXED;
        tf_scale_options first = options_for(9, 15, key_init, norm),
                         final = options_for(12, 20, key_init, norm);
        tf_model_config middle_config, twice_config, once_config;
        tf_param_layout middle_layout, twice_layout, once_layout;
        float *middle = grow(&config, &layout, params, &first, &middle_config, &middle_layout);
        float *twice = grow(&middle_config, &middle_layout, middle, &final, &twice_config, &twice_layout);
        float *once = grow(&config, &layout, params, &final, &once_config, &once_layout);
        CHECK(twice_layout.total == once_layout.total &&
                  memcmp(twice, once, once_layout.total * sizeof *once) == 0,
              "keys %s: growing twice equals growing once, bit for bit", scale_key_init_name(key_init));
        CHECK(memcmp(&twice_config, &once_config, sizeof once_config) == 0, "keys %s: and the configs agree",
              scale_key_init_name(key_init));
        free(middle);
        free(twice);
        free(once);
        param_layout_free(&middle_layout);
        param_layout_free(&twice_layout);
        param_layout_free(&once_layout);
    }
    free(params);
    param_layout_free(&layout);
}

/* B/16 (768/3072) grown to 1024/4096: 256 more rows in each of the 8 attention token tensors of
 * a block, 1024 more in its 2 FFN token tensors, all of width 768. */
static void check_b16_count(void) {
    tf_config config;
    config_defaults(&config);
    CHECK_OK(config_apply_model_preset(&config.model, "b16"));
    CHECK_OK(config_finalize(&config));
    tf_scale_options options = options_for(1024, 4096, TF_SCALE_KEYS_ZERO, TF_SCALE_NORM_FIXED);
    CHECK_OK(scale_check_sizes(&config.model, 1024, 4096, "b16"));
    tf_model_config grown;
    scale_config(&config.model, &options, &grown);
    tf_param_layout layout;
    CHECK_OK(param_layout_build(&layout, &grown));
    size_t expected = 114759400u + 12u * (4u * 2u * 256u * 768u + 2u * 1024u * 768u);
    CHECK(layout.total == expected, "B/16 grown to 1024/4096 has %zu parameters (expected %zu)", layout.total,
          expected);
    CHECK(grown.n_norm[11][TF_PATT_FFN] == 3072, "its n_norm stays 3072");
    printf("  B/16 grown to 1024/4096: %zu parameters\n", layout.total);
    param_layout_free(&layout);
}

static void check_history(void) {
    tf_model_config config = small_config();
    tf_scale_options options = options_for(12, 20, TF_SCALE_KEYS_RANDOM, TF_SCALE_NORM_CURRENT);
    char *history = NULL;
    CHECK_OK(
        scale_history_append("[{\"from\": [3, 5]}]", &config, &options, "42", 86400, "model.st", &history));
    cJSON *array = cJSON_Parse(history);
    CHECK(cJSON_GetArraySize(array) == 2, "one entry appended: %s", history);
    cJSON *entry = cJSON_GetArrayItem(array, 1);
    char *text = cJSON_PrintUnformatted(entry);
    const char *expected =
        "{\"from\":[6,10],\"to\":[12,20],\"key_init\":\"random\",\"norm\":\"current\",\"seed\":7,"
        "\"step\":42,\"time\":\"1970-01-02T00:00:00Z\"}";
    CHECK(text && strcmp(text, expected) == 0, "entry %s", text);
    cJSON_free(text);
    cJSON_Delete(array);
    free(history);
    CHECK(scale_history_append("{}", &config, &options, NULL, 0, "model.st", &history) != TF_OK &&
              strstr(tf_error_message(), "model.st"),
          "a history that is not an array is refused naming the file: %s", tf_error_message());
}

static void check_size_errors(void) {
    tf_model_config config = small_config();
    struct {
        int n_attn, n_ffn;
    } bad[] = {{6, 10}, {4, 20}, {12, 8}, {6, 20}, {12, 10}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        tf_status status = scale_check_sizes(&config, bad[i].n_attn, bad[i].n_ffn, "model.st");
        CHECK(status == TF_ERR_USAGE && strstr(tf_error_message(), "only grow") &&
                  strstr(tf_error_message(), "model.st"),
              "%d/%d from 6/10 is refused: %s", bad[i].n_attn, bad[i].n_ffn, tf_error_message());
    }
    int n_attn, n_ffn;
    CHECK_OK(scale_factor_sizes(&config, 1.0, &n_attn, &n_ffn));
    CHECK(scale_check_sizes(&config, n_attn, n_ffn, "model.st") != TF_OK,
          "--factor 1 does not grow: refused");
    CHECK(scale_factor_sizes(&config, 1e9, &n_attn, &n_ffn) != TF_OK, "--factor 1e9 is refused");
}

/* ---- the command and the state file ---------------------------------------------------------- */


static int run_scale(const char *arguments) {
    char copy[2048], *argv[32];
    int argc = 0;
    snprintf(copy, sizeof copy, "scale %s", arguments);
    for (char *token = strtok(copy, " "); token && argc < 31; token = strtok(NULL, " "))
        argv[argc++] = token;
    argv[argc] = NULL;
    fflush(stdout);
    return cmd_scale(argc, argv);
}

typedef struct {
    tf_model_config config;
    tf_param_layout layout;
    float *params, *m, *v, *ema;
} saved_run;

/* A checkpoint of step 30 and its state file, as the trainer writes them. */
static saved_run save_run(const char *model_path, const char *state_path, int n_attn, int64_t state_step) {
    saved_run run = {.config = small_config()};
    run.config.n_attn = n_attn;
    CHECK_OK(param_layout_build(&run.layout, &run.config));
    size_t n = run.layout.total;
    run.params = random_params(&run.layout, 14);
    run.m = malloc(n * sizeof *run.m);
    run.v = malloc(n * sizeof *run.v);
    run.ema = malloc(n * sizeof *run.ema);
    tf_rng rng = tf_rng_make(15, TF_RNG_TEST, 0, 0);
    fill_normal_f32(run.m, n, 1e-3f, &rng);
    fill_normal_f32(run.v, n, 1e-6f, &rng);
    for (size_t i = 0; i < n; i++)
        run.v[i] *= run.v[i]; /* positive, as second moments are */
    fill_normal_f32(run.ema, n, 0.1f, &rng);
    char *names[5] = {"a", "b", "c", "d", "e"};
    tf_class_names classes = {5, names};
    safetensors_metadata_entry extra[] = {{"step", "30"}, {"epoch", "2"}, {"crop_pct", "0.875"}};
    CHECK_OK(checkpoint_save(model_path, &run.config, &run.layout, run.params, &classes, NULL, extra, 3));
    tf_train_progress progress = {.step = state_step, .epoch = 2, .seed = 3};
    CHECK_OK(train_state_save(state_path, &run.layout, run.m, run.v, run.ema, state_step - 1, &progress));
    return run;
}

static void free_run(saved_run *run) {
    free(run->params);
    free(run->m);
    free(run->v);
    free(run->ema);
    param_layout_free(&run->layout);
}

/* Old rows bit-identical, new rows of the moments exactly 0, new EMA rows equal to the weights. */
static void check_grown_set(const safetensors_file *file, const char *prefix, const saved_run *run,
                            const tf_checkpoint *grown, const float *old_set, bool ema) {
    float *read = malloc(grown->layout.total * sizeof *read);
    if (!CHECK_OK(checkpoint_read_params(file, &grown->layout, prefix, read))) {
        free(read);
        return;
    }
    bool old_kept = true, new_right = true;
    for (int i = 0; i < run->layout.count; i++) {
        const tf_tensor_info *a = &run->layout.tensors[i], *b = &grown->layout.tensors[i];
        old_kept &= memcmp(read + b->offset, old_set + a->offset, a->count * sizeof *read) == 0;
        const float *added = read + b->offset + a->count;
        size_t added_count = b->count - a->count;
        if (ema)
            new_right &= memcmp(added, grown->params + b->offset + a->count, added_count * sizeof *read) == 0;
        else
            new_right &= all_zero(added, added_count);
    }
    CHECK(old_kept, "%s: old rows bit-identical", prefix);
    CHECK(new_right, "%s: new rows %s", prefix, ema ? "equal the new weights" : "exactly 0");
    free(read);
}

static void check_command_with_state(void) {
    char model[256], state[256], out[256], out_state[256], arguments[1200];
    snprintf(model, sizeof model, "%s/model.safetensors", scratch);
    snprintf(state, sizeof state, "%s/state.safetensors", scratch);
    snprintf(out, sizeof out, "%s/grown.safetensors", scratch);
    snprintf(out_state, sizeof out_state, "%s/grown_state.safetensors", scratch);
    saved_run run = save_run(model, state, 6, 30);
    snprintf(arguments, sizeof arguments, "--ckpt %s --out %s --factor 2 --state %s --out-state %s --seed 5",
             model, out, state, out_state);
    CHECK(run_scale(arguments) == 0, "scale --factor 2 --state exits 0: %s", tf_error_message());

    tf_checkpoint grown;
    safetensors_file *grown_file = NULL, *state_file = NULL, *source_file = NULL;
    if (!CHECK_OK(checkpoint_load(out, &grown))) return;
    CHECK(grown.config.n_attn == 12 && grown.config.n_ffn == 20, "the grown checkpoint has 12/20 tokens");
    CHECK(memcmp(grown.config.n_norm, run.config.n_norm, sizeof run.config.n_norm) == 0,
          "and the old n_norm");
    CHECK(grown.classes.count == 5 && strcmp(grown.classes.names[4], "e") == 0, "class names kept");
    CHECK(grown.crop_pct == 0.875f, "crop_pct kept");
    CHECK(strstr(grown.growth_history, "\"from\":[6,10],\"to\":[12,20]") &&
              strstr(grown.growth_history, "\"step\":30"),
          "growth history: %s", grown.growth_history);
    CHECK_OK(safetensors_open(&grown_file, out));
    CHECK_OK(safetensors_open(&state_file, out_state));
    CHECK_OK(safetensors_open(&source_file, state));
    if (grown_file && state_file && source_file) {
        const char *step = safetensors_metadata(grown_file, "step"),
                   *epoch = safetensors_metadata(grown_file, "epoch");
        CHECK(step && epoch && !strcmp(step, "30") && !strcmp(epoch, "2"), "step and epoch metadata kept");
        CHECK(state_file->n_tensors == 3 * (size_t)grown.layout.count, "state: m, v and EMA of every tensor");
        CHECK(strcmp(safetensors_metadata(state_file, "progress"),
                     safetensors_metadata(source_file, "progress")) == 0,
              "state: progress kept as it was");
        check_grown_set(state_file, "adamw.m.", &run, &grown, run.m, false);
        check_grown_set(state_file, "adamw.v.", &run, &grown, run.v, false);
        check_grown_set(state_file, "ema.", &run, &grown, run.ema, true);
    }
    safetensors_close(grown_file);
    safetensors_close(state_file);
    safetensors_close(source_file);
    checkpoint_free(&grown);
    free_run(&run);
}

/* Expects the command to fail with `code` and a message containing both needles; no output file. */
static void expect_refusal(const char *arguments, int code, const char *needle, const char *other,
                           const char *no_file) {
    unlink(no_file);
    int result = run_scale(arguments);
    const char *message = tf_error_message();
    CHECK(result == code && strstr(message, needle) && (!other || strstr(message, other)),
          "refused with exit %d (got %d), message names '%s'%s%s: %s", code, result, needle,
          other ? " and " : "", other ? other : "", message);
    CHECK(access(no_file, F_OK) != 0, "nothing written to %s", no_file);
}

static void check_refusals(void) {
    char model[256], state[256], other_model[256], other_state[256], out[256], arguments[1200];
    snprintf(model, sizeof model, "%s/model.safetensors", scratch);
    snprintf(state, sizeof state, "%s/state.safetensors", scratch);
    snprintf(other_model, sizeof other_model, "%s/other.safetensors", scratch);
    snprintf(other_state, sizeof other_state, "%s/other_state.safetensors", scratch);
    snprintf(out, sizeof out, "%s/refused.safetensors", scratch);
    saved_run run = save_run(model, state, 6, 30);
    saved_run other = save_run(other_model, other_state, 8, 30); /* another model: 8 attention tokens */

    snprintf(arguments, sizeof arguments, "--ckpt %s --out %s --attn-tokens 6 --ffn-tokens 20", model, out);
    expect_refusal(arguments, 2, "only grow", model, out);
    snprintf(arguments, sizeof arguments, "--ckpt %s --out %s --attn-tokens 4 --ffn-tokens 8", model, out);
    expect_refusal(arguments, 2, "only grow", NULL, out);
    snprintf(arguments, sizeof arguments, "--ckpt %s --out %s --factor 0.5", model, out);
    expect_refusal(arguments, 2, "only grow", NULL, out);
    snprintf(arguments, sizeof arguments, "--ckpt %s --out %s --attn-tokens 12", model, out);
    expect_refusal(arguments, 2, "--factor", NULL, out);
    snprintf(arguments, sizeof arguments, "--ckpt %s --out %s --factor 2 --key-init ones", model, out);
    expect_refusal(arguments, 2, "--key-init", NULL, out);
    snprintf(arguments, sizeof arguments, "--ckpt %s --out %s --factor 2 --state %s", model, out, state);
    expect_refusal(arguments, 2, "--out-state", NULL, out);

    /* The state of another model: its tensors have other shapes. */
    snprintf(arguments, sizeof arguments, "--ckpt %s --out %s --factor 2 --state %s --out-state %s.state",
             model, out, other_state, out);
    expect_refusal(arguments, 1, other_state, "attn.q.key_tokens", out);
    /* A model file given as the state. */
    snprintf(arguments, sizeof arguments, "--ckpt %s --out %s --factor 2 --state %s --out-state %s.state",
             model, out, model, out);
    expect_refusal(arguments, 1, model, "not a TokenFormer training state", out);
    /* The state of another step of the same run. */
    free_run(&other);
    other = save_run(other_model, other_state, 6, 40);
    snprintf(arguments, sizeof arguments, "--ckpt %s --out %s --factor 2 --state %s --out-state %s.state",
             model, out, other_state, out);
    expect_refusal(arguments, 2, "step 40", model, out);
    free_run(&other);
    free_run(&run);
}

int main(void) {
    snprintf(scratch, sizeof scratch, "/tmp/tokenformer_test_scale_%d", (int)getpid());
    char command[300];
    snprintf(command, sizeof command, "rm -rf %s && mkdir -p %s", scratch, scratch);
    if (system(command) != 0) return test_skip("cannot make the scratch directory");
    check_function();
    check_rows_and_config();
    check_twice_equals_once();
    check_b16_count();
    check_history();
    check_size_errors();
    check_command_with_state();
    check_refusals();
    snprintf(command, sizeof command, "rm -rf %s", scratch);
    if (system(command) != 0) printf("  could not remove %s\n", scratch);
    return test_finish("test_scale");
}
