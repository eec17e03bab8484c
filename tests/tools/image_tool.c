/* A command-line front end to dataloader/image.h for tests/test_image_pil.py, which runs the same
 * operation through PIL and torchvision and compares: it loads an image (PNG, PPM or JPEG through
 * stb_image), applies one operation named on the command line, and writes the result as binary
 * PPM (P6); the geometry commands print numbers instead. "bench" times the hot paths.
 *
 *   image_tool resize IN OUT LEFT TOP WIDTH HEIGHT OUT_W OUT_H        PIL resize(size, BICUBIC, box)
 *   image_tool resized_crop IN OUT LEFT TOP WIDTH HEIGHT OUT_W OUT_H  crop(box).resize(size, BICUBIC)
 *   image_tool eval IN OUT SIZE CROP_PCT                              Resize(int(size/crop_pct)) + CenterCrop
 *   image_tool eval_geometry < lines "W H SIZE CROP_PCT"                prints "rw rh left top" each
 *   image_tool rrc < lines "W H SCALE_MIN SCALE_MAX RATIO_MIN RATIO_MAX U..."  prints "left top w h" each
 *   image_tool rrc_sample W H COUNT SEED                              prints COUNT boxes from tf_rng
 *   image_tool flip IN OUT
 *   image_tool chw IN OUT                                             raw CHW planes
 *   image_tool op IN OUT NAME ARGUMENT                                one RandAugment operation
 *   image_tool argument < lines "NAME MAGNITUDE INCREASING NEGATE W H"  prints timm's level argument each
 *   image_tool randaugment IN OUT SPEC SEED COUNT                     COUNT applications, last one written
 *   image_tool parse SPEC                                             prints the parsed fields
 *   image_tool bench IN                                               prints timings */
#define STB_IMAGE_IMPLEMENTATION
#include <stb/stb_image.h>

#include "common/config.h"
#include "common/error.h"
#include "common/rng.h"
#include "common/timer.h"
#include "dataloader/image.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static tf_status load_image(const char *path, tf_image *image) {
    int width, height, channels;
    uint8_t *pixels = stbi_load(path, &width, &height, &channels, 3);
    if (!pixels) return tf_fail(TF_ERR_RUNTIME, "%s: cannot load: %s", path, stbi_failure_reason());
    tf_status status = image_reserve(image, width, height);
    if (status == TF_OK) memcpy(image->pixels, pixels, (size_t)width * (size_t)height * 3);
    stbi_image_free(pixels);
    return status;
}

static tf_status write_ppm(const char *path, const tf_image *image) {
    FILE *file = fopen(path, "wb");
    if (!file) return tf_fail(TF_ERR_RUNTIME, "%s: cannot open for writing", path);
    fprintf(file, "P6\n%d %d\n255\n", image->width, image->height);
    size_t bytes = (size_t)image->width * (size_t)image->height * 3;
    size_t written = fwrite(image->pixels, 1, bytes, file);
    if (fclose(file) != 0 || written != bytes) return tf_fail(TF_ERR_RUNTIME, "%s: write failed", path);
    return TF_OK;
}

static tf_status write_raw(const char *path, const uint8_t *bytes, size_t count) {
    FILE *file = fopen(path, "wb");
    if (!file) return tf_fail(TF_ERR_RUNTIME, "%s: cannot open for writing", path);
    size_t written = fwrite(bytes, 1, count, file);
    if (fclose(file) != 0 || written != count) return tf_fail(TF_ERR_RUNTIME, "%s: write failed", path);
    return TF_OK;
}

static tf_box box_from_args(char **argv) {
    return (tf_box){
        .left = atof(argv[0]), .top = atof(argv[1]), .width = atof(argv[2]), .height = atof(argv[3])};
}

typedef struct {
    tf_image input, output, scratch;
} tool_images;

static tf_status run_resize(int argc, char **argv, tool_images *im, int crop_first) {
    if (argc != 10)
        return tf_fail(TF_ERR_USAGE, "usage: %s IN OUT LEFT TOP WIDTH HEIGHT OUT_W OUT_H", argv[1]);
    TF_TRY(load_image(argv[2], &im->input));
    tf_box box = box_from_args(argv + 4);
    int out_width = atoi(argv[8]), out_height = atoi(argv[9]);
    if (crop_first)
        TF_TRY(image_resized_crop_bicubic(&im->input, box, out_width, out_height, &im->output, &im->scratch));
    else
        TF_TRY(image_resize_bicubic(&im->input, box, out_width, out_height, &im->output, &im->scratch));
    return write_ppm(argv[3], &im->output);
}

static tf_status run_eval(int argc, char **argv, tool_images *im) {
    if (argc != 6) return tf_fail(TF_ERR_USAGE, "usage: eval IN OUT SIZE CROP_PCT");
    TF_TRY(load_image(argv[2], &im->input));
    int size = atoi(argv[4]), rw, rh, left, top;
    image_eval_geometry(im->input.width, im->input.height, size, strtof(argv[5], NULL), &rw, &rh, &left,
                        &top);
    TF_TRY(
        image_resize_then_crop_bicubic(&im->input, rw, rh, left, top, size, size, &im->output, &im->scratch));
    printf("%d %d %d %d\n", rw, rh, left, top);
    return write_ppm(argv[3], &im->output);
}

/* One line per query on stdin, "W H SIZE CROP_PCT"; one line "rw rh left top" per query out. */
static tf_status run_eval_geometry(void) {
    int width, height, size;
    char pct[64];
    while (scanf("%d %d %d %63s", &width, &height, &size, pct) == 4) {
        int rw, rh, left, top;
        image_eval_geometry(width, height, size, strtof(pct, NULL), &rw, &rh, &left, &top);
        printf("%d %d %d %d\n", rw, rh, left, top);
    }
    return TF_OK;
}

/* One line per query on stdin: "W H SCALE_MIN SCALE_MAX RATIO_MIN RATIO_MAX U1 ... Un"; one line
 * "left top width height" per query out. */
static tf_status run_rrc(void) {
    char line[8192];
    while (fgets(line, sizeof line, stdin)) {
        char *cursor = line, *end;
        double numbers[6 + 64];
        int count = 0;
        for (double value = strtod(cursor, &end); end != cursor && count < 6 + 64;
             value = strtod(cursor, &end)) {
            numbers[count++] = value;
            cursor = end;
        }
        if (count == 0) continue;
        if (count < 6)
            return tf_fail(TF_ERR_USAGE, "rrc: a line needs W H SCALE_MIN SCALE_MAX RATIO_MIN RATIO_MAX");
        tf_augment_config augment = {.scale_min = (float)numbers[2],
                                     .scale_max = (float)numbers[3],
                                     .ratio_min = (float)numbers[4],
                                     .ratio_max = (float)numbers[5]};
        tf_box box = image_random_resized_crop_box_from_draws((int)numbers[0], (int)numbers[1], &augment,
                                                              numbers + 6, count - 6);
        printf("%.0f %.0f %.0f %.0f\n", box.left, box.top, box.width, box.height);
    }
    return TF_OK;
}

static tf_status run_rrc_sample(int argc, char **argv) {
    if (argc != 6) return tf_fail(TF_ERR_USAGE, "usage: rrc_sample W H COUNT SEED");
    tf_augment_config augment = {
        .scale_min = 0.08f, .scale_max = 1.0f, .ratio_min = 3.0f / 4.0f, .ratio_max = 4.0f / 3.0f};
    int width = atoi(argv[2]), height = atoi(argv[3]), count = atoi(argv[4]);
    tf_rng rng = tf_rng_make(strtoull(argv[5], NULL, 10), TF_RNG_TEST, 0, 0);
    for (int i = 0; i < count; i++) {
        tf_box box = image_random_resized_crop_box(width, height, &augment, &rng);
        printf("%.0f %.0f %.0f %.0f\n", box.left, box.top, box.width, box.height);
    }
    return TF_OK;
}

static tf_status run_flip(int argc, char **argv, tool_images *im) {
    if (argc != 4) return tf_fail(TF_ERR_USAGE, "usage: flip IN OUT");
    TF_TRY(load_image(argv[2], &im->input));
    image_flip_horizontal(&im->input);
    return write_ppm(argv[3], &im->input);
}

static tf_status run_chw(int argc, char **argv, tool_images *im) {
    if (argc != 4) return tf_fail(TF_ERR_USAGE, "usage: chw IN OUT");
    TF_TRY(load_image(argv[2], &im->input));
    size_t bytes = (size_t)im->input.width * (size_t)im->input.height * 3;
    TF_TRY(image_reserve(&im->output, im->input.width, im->input.height));
    image_to_chw(&im->input, im->output.pixels);
    return write_raw(argv[3], im->output.pixels, bytes);
}

static tf_status find_op(const char *name, tf_randaugment_op *op) {
    for (int i = 0; i < TF_RA_OP_COUNT; i++) {
        if (!strcmp(name, randaugment_op_name((tf_randaugment_op)i, 0)) ||
            !strcmp(name, randaugment_op_name((tf_randaugment_op)i, 1))) {
            *op = (tf_randaugment_op)i;
            return TF_OK;
        }
    }
    return tf_fail(TF_ERR_USAGE, "op: unknown operation '%s'", name);
}

static tf_status run_op(int argc, char **argv, tool_images *im) {
    if (argc != 6) return tf_fail(TF_ERR_USAGE, "usage: op IN OUT NAME ARGUMENT");
    tf_randaugment_op op = TF_RA_AUTO_CONTRAST;
    TF_TRY(find_op(argv[4], &op));
    TF_TRY(load_image(argv[2], &im->input));
    const uint8_t fill[3] = {124, 116, 104};
    TF_TRY(randaugment_apply_op(&im->input, op, strtod(argv[5], NULL), fill, &im->scratch));
    return write_ppm(argv[3], &im->input);
}

/* One line per query on stdin, "NAME MAGNITUDE INCREASING NEGATE WIDTH HEIGHT"; prints the argument
 * with 17 significant digits. */
static tf_status run_argument(void) {
    char name[64];
    double magnitude;
    int increasing, negate, width, height;
    while (scanf("%63s %lf %d %d %d %d", name, &magnitude, &increasing, &negate, &width, &height) == 6) {
        tf_randaugment_op op = TF_RA_AUTO_CONTRAST;
        TF_TRY(find_op(name, &op));
        printf("%.17g\n", randaugment_argument(op, magnitude, increasing, negate, width, height));
    }
    return TF_OK;
}

static tf_status run_randaugment(int argc, char **argv, tool_images *im) {
    if (argc != 7) return tf_fail(TF_ERR_USAGE, "usage: randaugment IN OUT SPEC SEED COUNT");
    tf_randaugment ra;
    TF_TRY(randaugment_parse(argv[4], &ra));
    TF_TRY(load_image(argv[2], &im->input));
    TF_TRY(image_reserve(&im->output, im->input.width, im->input.height));
    size_t bytes = (size_t)im->input.width * (size_t)im->input.height * 3;
    for (int i = 0, count = atoi(argv[6]); i < count; i++) {
        tf_rng rng = tf_rng_make(strtoull(argv[5], NULL, 10), TF_RNG_TEST, (uint64_t)i, 0);
        memcpy(im->output.pixels, im->input.pixels, bytes);
        TF_TRY(randaugment_apply(&im->output, &ra, &rng, &im->scratch));
    }
    return write_ppm(argv[3], &im->output);
}

static tf_status run_parse(int argc, char **argv) {
    if (argc != 3) return tf_fail(TF_ERR_USAGE, "usage: parse SPEC");
    tf_randaugment ra;
    TF_TRY(randaugment_parse(argv[2], &ra));
    printf("enabled=%d num_ops=%d magnitude=%g magnitude_std=%g probability=%g increasing=%d fill=%d,%d,%d\n",
           ra.enabled, ra.num_ops, ra.magnitude, ra.magnitude_std, ra.probability, ra.increasing, ra.fill[0],
           ra.fill[1], ra.fill[2]);
    return TF_OK;
}

/* What one benchmark step does: "case_index" selects the operation (see bench_step). */
typedef struct {
    tool_images *im;
    tf_image base; /* 224x224 input of the RandAugment steps */
    tf_rng rng;
    tf_randaugment randaugment;
    int eval_width, eval_height, eval_left, eval_top;
    int sample;
} bench_state;

enum { BENCH_RESIZE, BENCH_RRC, BENCH_EVAL, BENCH_RANDAUGMENT, BENCH_OP0 };

static tf_status bench_step(bench_state *state, int which) {
    tool_images *im = state->im;
    const tf_image *src = &im->input;
    static const double arguments[TF_RA_OP_COUNT] = {0,    0,    0,    27,   1,     26,   99,   1.81,
                                                     0.19, 1.81, 1.81, 0.27, -0.27, 90.7, -90.7};
    static const uint8_t fill[3] = {124, 116, 104};
    if (which == BENCH_RESIZE)
        return image_resize_bicubic(src, (tf_box){0, 0, src->width, src->height}, 224, 224, &im->output,
                                    &im->scratch);
    if (which == BENCH_RRC) {
        tf_augment_config augment = {
            .scale_min = 0.08f, .scale_max = 1.0f, .ratio_min = 0.75f, .ratio_max = 4.0f / 3.0f};
        tf_box box = image_random_resized_crop_box(src->width, src->height, &augment, &state->rng);
        return image_resized_crop_bicubic(src, box, 224, 224, &im->output, &im->scratch);
    }
    if (which == BENCH_EVAL)
        return image_resize_then_crop_bicubic(src, state->eval_width, state->eval_height, state->eval_left,
                                              state->eval_top, 224, 224, &im->output, &im->scratch);
    TF_TRY(image_reserve(&im->output, 224, 224));
    memcpy(im->output.pixels, state->base.pixels, (size_t)224 * 224 * 3);
    if (which == BENCH_RANDAUGMENT) {
        tf_rng sample = tf_rng_make(1, TF_RNG_AUGMENT, 0, (uint64_t)state->sample++);
        return randaugment_apply(&im->output, &state->randaugment, &sample, &im->scratch);
    }
    tf_randaugment_op op = (tf_randaugment_op)(which - BENCH_OP0);
    return randaugment_apply_op(&im->output, op, arguments[op], fill, &im->scratch);
}

/* The fastest of 15 rounds of reps steps, in ms per step: the least disturbed by other work on a
 * shared machine. */
static tf_status bench_time(bench_state *state, int which, int reps, double *ms) {
    *ms = 1e30;
    for (int round = 0; round < 15; round++) {
        double start = tf_seconds();
        for (int i = 0; i < reps; i++)
            TF_TRY(bench_step(state, which));
        double elapsed = (tf_seconds() - start) / reps * 1e3;
        if (elapsed < *ms) *ms = elapsed;
    }
    return TF_OK;
}

/* Single-thread timings on IN (any size): the train transform's pieces and the eval resize. The
 * RandAugment operations and the policy run on IN resized to 224x224. */
static tf_status run_bench(int argc, char **argv, tool_images *im) {
    if (argc != 3) return tf_fail(TF_ERR_USAGE, "usage: bench IN");
    TF_TRY(load_image(argv[2], &im->input));
    bench_state state = {.im = im, .rng = tf_rng_make(1, TF_RNG_TEST, 0, 0)};
    TF_TRY(randaugment_parse("rand-m9-mstd0.5-inc1", &state.randaugment));
    image_eval_geometry(im->input.width, im->input.height, 224, 0.875f, &state.eval_width, &state.eval_height,
                        &state.eval_left, &state.eval_top);
    TF_TRY(image_resize_bicubic(&im->input, (tf_box){0, 0, im->input.width, im->input.height}, 224, 224,
                                &state.base, &im->scratch));
    double ms;
    tf_status status = TF_OK;
    const char *labels[] = {"resize to 224x224", "random resized crop to 224x224",
                            "eval resize + centre crop 224",
                            "RandAugment rand-m9-mstd0.5-inc1 (mean over samples)"};
    for (int which = 0; which < BENCH_OP0 + TF_RA_OP_COUNT && status == TF_OK; which++) {
        status = bench_time(&state, which, which == BENCH_RANDAUGMENT ? 400 : 40, &ms);
        if (which < BENCH_OP0)
            printf("%-52s %.3f ms\n", labels[which], ms);
        else
            printf("  %-50s %.3f ms\n", randaugment_op_name((tf_randaugment_op)(which - BENCH_OP0), 1), ms);
    }
    printf("(input %dx%d, eval resize %dx%d)\n", im->input.width, im->input.height, state.eval_width,
           state.eval_height);
    image_free(&state.base);
    return status;
}

static tf_status run(int argc, char **argv, tool_images *im) {
    if (argc < 2)
        return tf_fail(TF_ERR_USAGE, "usage: image_tool COMMAND ARGS... (see the top of image_tool.c)");
    const char *command = argv[1];
    if (!strcmp(command, "resize")) return run_resize(argc, argv, im, 0);
    if (!strcmp(command, "resized_crop")) return run_resize(argc, argv, im, 1);
    if (!strcmp(command, "eval")) return run_eval(argc, argv, im);
    if (!strcmp(command, "eval_geometry")) return run_eval_geometry();
    if (!strcmp(command, "rrc")) return run_rrc();
    if (!strcmp(command, "rrc_sample")) return run_rrc_sample(argc, argv);
    if (!strcmp(command, "flip")) return run_flip(argc, argv, im);
    if (!strcmp(command, "chw")) return run_chw(argc, argv, im);
    if (!strcmp(command, "op")) return run_op(argc, argv, im);
    if (!strcmp(command, "argument")) return run_argument();
    if (!strcmp(command, "randaugment")) return run_randaugment(argc, argv, im);
    if (!strcmp(command, "parse")) return run_parse(argc, argv);
    if (!strcmp(command, "bench")) return run_bench(argc, argv, im);
    return tf_fail(TF_ERR_USAGE, "image_tool: unknown command '%s'", command);
}

int main(int argc, char **argv) {
    tool_images images = {0};
    tf_status status = run(argc, argv, &images);
    image_free(&images.input);
    image_free(&images.output);
    image_free(&images.scratch);
    if (status != TF_OK) fprintf(stderr, "image_tool: %s\n", tf_error_message());
    return (int)status;
}
