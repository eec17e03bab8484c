/* A command-line front end to train/mixup.h for tests/test_mixup.py, which compares it with a
 * torch implementation of timm 0.3.2's batch-mode Mixup/CutMix. Settings are key=value arguments;
 * images and targets are raw float32 files ([batch, channels, size, size] and [batch, classes]).
 *
 *   mixup_tool draw seed=S step=T count=N mixup=A cutmix=A switch=P prob=P size=N
 *       prints N lines "lambda cutmix y0 y1 x0 x1", one per step T, T+1, ..., each drawn by
 *       mixup_draw from the trainer's generator of that step (rank 0, micro-batch 0)
 *   mixup_tool box < lines "LAMBDA SIZE CY CX"
 *       prints "lambda y0 y1 x0 x1" of mixup_cutmix_box for each line
 *   mixup_tool apply seed=S step=T mixup=A cutmix=A switch=P prob=P smoothing=E classes=C
 *                    labels=L0,L1,... channels=K size=N in=IN.f32 images=OUT.f32 targets=OUT.f32
 *       draws one mix as `draw` does and prints it, writes mixup_targets of the labels and the
 *       images of IN mixed by mixup_images on the fp32 CPU backend */
#include "common/config.h"
#include "common/error.h"
#include "common/rng.h"
#include "kernels/kernels.h"
#include "train/mixup.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_SETTINGS = 32, MAX_BATCH = 4096 };

typedef struct {
    int count;
    const char *keys[MAX_SETTINGS], *values[MAX_SETTINGS];
} tool_settings;

static tf_status parse_settings(int argc, char **argv, tool_settings *settings) {
    settings->count = 0;
    for (int i = 0; i < argc; i++) {
        char *equals = strchr(argv[i], '=');
        if (!equals || settings->count == MAX_SETTINGS)
            return tf_fail(TF_ERR_USAGE, "expected key=value, got '%s'", argv[i]);
        *equals = '\0';
        settings->keys[settings->count] = argv[i];
        settings->values[settings->count++] = equals + 1;
    }
    return TF_OK;
}

static tf_status setting(const tool_settings *settings, const char *key, const char **value) {
    for (int i = 0; i < settings->count; i++)
        if (strcmp(settings->keys[i], key) == 0) {
            *value = settings->values[i];
            return TF_OK;
        }
    return tf_fail(TF_ERR_USAGE, "missing setting %s=...", key);
}

static tf_status setting_number(const tool_settings *settings, const char *key, double *number) {
    const char *value;
    TF_TRY(setting(settings, key, &value));
    char *end;
    *number = strtod(value, &end);
    if (end == value || *end) return tf_fail(TF_ERR_USAGE, "%s: expected a number, got '%s'", key, value);
    return TF_OK;
}

static tf_status setting_int(const tool_settings *settings, const char *key, int64_t *number) {
    double value;
    TF_TRY(setting_number(settings, key, &value));
    if (value != (double)(int64_t)value) return tf_fail(TF_ERR_USAGE, "%s: expected an integer", key);
    *number = (int64_t)value;
    return TF_OK;
}

/* The augment section's mixup keys, from mixup=, cutmix=, switch= and prob=. */
static tf_status read_augment(const tool_settings *settings, tf_augment_config *augment) {
    double mixup, cutmix, switch_prob, prob;
    TF_TRY(setting_number(settings, "mixup", &mixup));
    TF_TRY(setting_number(settings, "cutmix", &cutmix));
    TF_TRY(setting_number(settings, "switch", &switch_prob));
    TF_TRY(setting_number(settings, "prob", &prob));
    *augment = (tf_augment_config){.mixup = (float)mixup,
                                   .cutmix = (float)cutmix,
                                   .mixup_switch_prob = (float)switch_prob,
                                   .mixup_prob = (float)prob};
    return TF_OK;
}

/* The trainer's draw for a step (train/train.c, rank 0, micro-batch 0). */
static tf_mix draw_for_step(const tf_augment_config *augment, int size, uint64_t seed, uint64_t step) {
    tf_rng rng = tf_rng_make(seed, TF_RNG_STEP, step, 0);
    return mixup_draw(augment, size, &rng);
}

/* %.9g prints every float so that it reads back to the same float. */
static void print_mix(const tf_mix *mix) {
    printf("%.9g %d %d %d %d %d\n", (double)mix->lambda, mix->cutmix ? 1 : 0, mix->y0, mix->y1, mix->x0,
           mix->x1);
}

static tf_status run_draw(const tool_settings *settings) {
    tf_augment_config augment;
    int64_t seed, step, count, size;
    TF_TRY(read_augment(settings, &augment));
    TF_TRY(setting_int(settings, "seed", &seed));
    TF_TRY(setting_int(settings, "step", &step));
    TF_TRY(setting_int(settings, "count", &count));
    TF_TRY(setting_int(settings, "size", &size));
    for (int64_t i = 0; i < count; i++) {
        tf_mix mix = draw_for_step(&augment, (int)size, (uint64_t)seed, (uint64_t)(step + i));
        print_mix(&mix);
    }
    return TF_OK;
}

static tf_status run_box(void) {
    double lambda;
    int size, cy, cx;
    while (scanf("%lf %d %d %d", &lambda, &size, &cy, &cx) == 4) {
        tf_mix mix = mixup_cutmix_box(lambda, size, cy, cx);
        printf("%.9g %d %d %d %d\n", (double)mix.lambda, mix.y0, mix.y1, mix.x0, mix.x1);
    }
    return TF_OK;
}

static tf_status parse_labels(const char *text, int32_t *labels, int *count) {
    *count = 0;
    for (const char *p = text; *p;) {
        char *end;
        long label = strtol(p, &end, 10);
        if (end == p || *count == MAX_BATCH || (*end && *end != ','))
            return tf_fail(TF_ERR_USAGE, "labels: expected comma-separated integers, got '%s'", text);
        labels[(*count)++] = (int32_t)label;
        p = *end ? end + 1 : end;
    }
    if (*count == 0) return tf_fail(TF_ERR_USAGE, "labels: empty");
    return TF_OK;
}

static tf_status read_floats(const char *path, float *values, size_t count) {
    FILE *file = fopen(path, "rb");
    if (!file) return tf_fail(TF_ERR_RUNTIME, "%s: cannot open", path);
    size_t read = fread(values, sizeof *values, count, file);
    int extra = fgetc(file);
    fclose(file);
    if (read != count || extra != EOF)
        return tf_fail(TF_ERR_RUNTIME, "%s: expected exactly %zu float32 values", path, count);
    return TF_OK;
}

static tf_status write_floats(const char *path, const float *values, size_t count) {
    FILE *file = fopen(path, "wb");
    if (!file) return tf_fail(TF_ERR_RUNTIME, "%s: cannot open for writing", path);
    size_t written = fwrite(values, sizeof *values, count, file);
    if (fclose(file) != 0 || written != count) return tf_fail(TF_ERR_RUNTIME, "%s: write failed", path);
    return TF_OK;
}

/* The shapes and files of `apply`. */
typedef struct {
    int32_t labels[MAX_BATCH];
    int batch;
    int64_t classes, channels, size;
    double smoothing;
    const char *in, *images_out, *targets_out;
} apply_inputs;

static tf_status read_apply_inputs(const tool_settings *settings, apply_inputs *inputs) {
    const char *labels;
    TF_TRY(setting(settings, "labels", &labels));
    TF_TRY(parse_labels(labels, inputs->labels, &inputs->batch));
    TF_TRY(setting_int(settings, "classes", &inputs->classes));
    TF_TRY(setting_int(settings, "channels", &inputs->channels));
    TF_TRY(setting_int(settings, "size", &inputs->size));
    TF_TRY(setting_number(settings, "smoothing", &inputs->smoothing));
    TF_TRY(setting(settings, "in", &inputs->in));
    TF_TRY(setting(settings, "images", &inputs->images_out));
    TF_TRY(setting(settings, "targets", &inputs->targets_out));
    for (int b = 0; b < inputs->batch; b++)
        if (inputs->labels[b] < 0 || inputs->labels[b] >= inputs->classes)
            return tf_fail(TF_ERR_USAGE, "labels: %d is not in [0, %d)", inputs->labels[b],
                           (int)inputs->classes);
    return TF_OK;
}

/* Mixes the images and builds the targets exactly as the trainer's micro-batch does. */
static tf_status mix_batch(const apply_inputs *inputs, const tf_mix *mix, float *images, float *targets) {
    size_t image_count = (size_t)inputs->batch * inputs->channels * inputs->size * inputs->size;
    TF_TRY(read_floats(inputs->in, images, image_count));
    mixup_targets(inputs->labels, inputs->batch, (int)inputs->classes, (float)inputs->smoothing, mix->lambda,
                  targets);
    mixup_images(tf_cpu_backend(TF_DTYPE_F32), images, inputs->batch, (int)inputs->channels,
                 (int)inputs->size, mix);
    TF_TRY(write_floats(inputs->images_out, images, image_count));
    return write_floats(inputs->targets_out, targets, (size_t)inputs->batch * inputs->classes);
}

static tf_status run_apply(const tool_settings *settings) {
    static apply_inputs inputs;
    tf_augment_config augment;
    int64_t seed, step;
    TF_TRY(read_augment(settings, &augment));
    TF_TRY(setting_int(settings, "seed", &seed));
    TF_TRY(setting_int(settings, "step", &step));
    TF_TRY(read_apply_inputs(settings, &inputs));
    tf_mix mix = draw_for_step(&augment, (int)inputs.size, (uint64_t)seed, (uint64_t)step);
    float *images =
        malloc((size_t)inputs.batch * inputs.channels * inputs.size * inputs.size * sizeof *images);
    float *targets = malloc((size_t)inputs.batch * inputs.classes * sizeof *targets);
    tf_status status = images && targets ? mix_batch(&inputs, &mix, images, targets)
                                         : tf_fail(TF_ERR_RUNTIME, "out of memory");
    free(images);
    free(targets);
    if (status == TF_OK) print_mix(&mix);
    return status;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: mixup_tool draw|box|apply [key=value]... (see tests/tools/mixup_tool.c)\n");
        return 2;
    }
    tool_settings settings;
    tf_status status = parse_settings(argc - 2, argv + 2, &settings);
    if (status == TF_OK) {
        if (strcmp(argv[1], "draw") == 0)
            status = run_draw(&settings);
        else if (strcmp(argv[1], "box") == 0)
            status = run_box();
        else if (strcmp(argv[1], "apply") == 0)
            status = run_apply(&settings);
        else
            status = tf_fail(TF_ERR_USAGE, "unknown command '%s'", argv[1]);
    }
    if (status != TF_OK) fprintf(stderr, "mixup_tool %s: %s\n", argv[1], tf_error_message());
    return status;
}
