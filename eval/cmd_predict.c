/* `tokenformer predict`: the classes of single images. Each image is decoded by content, put
 * through the checkpoint's eval transform (DESIGN.md section 3: resize the shorter side to
 * int(img_size / crop_pct), bicubic, antialiased; centre crop img_size) and the model runs over
 * them in batches; per image it prints the top-k class names with their softmax probabilities, as
 * text or (--json) as a JSON array. --dump-input and --dump-logits write the normalised input batch
 * and the logits as .npy files, for cross-checking with other frameworks.
 *
 * Unlike the training loader, which replaces a bad file with another sample, predict is explicit
 * about its inputs: an image that cannot be read is an error naming it. Every image is processed
 * before anything is printed, so a failure leaves no partial output (and no partial .npy).
 *
 * Images are decoded at full size (the loader may decode a large JPEG at 1/2, 1/4 or 1/8 scale to
 * save work), so the input equals torchvision's eval transform of the PIL image pixel for pixel. */
#include "cli/args.h"
#include "cli/commands.h"
#include "common/log.h"
#include "dataloader/decode.h"
#include "dataloader/image.h"
#include "eval/npy.h"
#include "vision/checkpoint.h"
#include "vision/model.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *checkpoint, *device, *dump_input, *dump_logits;
    bool json;
    int topk, batch;
    float crop_pct; /* 0: the checkpoint's, else 0.875 */
    int image_count;
    const char **images; /* [image_count], pointers into argv */
} predict_arguments;

/* ---- command line ------------------------------------------------------------------------------ */

static bool parse_option(cli_parser *parser, predict_arguments *arguments) {
    const char *value;
    if (cli_value(parser, "--ckpt", &arguments->checkpoint)) return true;
    if (cli_value(parser, "--device", &arguments->device)) return true;
    if (cli_value(parser, "--dump-input", &arguments->dump_input)) return true;
    if (cli_value(parser, "--dump-logits", &arguments->dump_logits)) return true;
    if (cli_flag(parser, "--json")) {
        arguments->json = true;
        return true;
    }
    if (cli_value(parser, "--topk", &value)) {
        arguments->topk = cli_int(parser, "--topk", value);
        return true;
    }
    if (cli_value(parser, "--batch", &value)) {
        arguments->batch = cli_int(parser, "--batch", value);
        return true;
    }
    if (cli_value(parser, "--crop-pct", &value)) {
        arguments->crop_pct = cli_crop_pct(parser, value);
        return true;
    }
    return false;
}

static tf_status parse_arguments(int argc, char **argv, predict_arguments *arguments) {
    *arguments = (predict_arguments){.topk = 5, .batch = 32};
    arguments->images = malloc((size_t)argc * sizeof *arguments->images);
    if (!arguments->images) return tf_fail(TF_ERR_RUNTIME, "out of memory for the command line");
    cli_parser parser = cli_parser_make(argc, argv);
    while (cli_more(&parser)) {
        const char *image;
        if (parse_option(&parser, arguments)) continue;
        if (cli_positional(&parser, &image)) {
            arguments->images[arguments->image_count++] = image;
            continue;
        }
        cli_unknown(&parser);
    }
    TF_TRY(parser.status);
    if (!arguments->checkpoint) return tf_fail(TF_ERR_USAGE, "--ckpt FILE.safetensors is required");
    if (arguments->image_count == 0)
        return tf_fail(TF_ERR_USAGE, "no images given (tokenformer predict --ckpt FILE IMAGE...)");
    if (arguments->topk < 1) return tf_fail(TF_ERR_USAGE, "--topk must be at least 1");
    if (arguments->batch < 1) return tf_fail(TF_ERR_USAGE, "--batch must be at least 1");
    return TF_OK;
}

/* ---- preprocessing ------------------------------------------------------------------------------ */

/* The decoder and the images it reuses from one file to the next. */
typedef struct {
    tf_decoder *decoder;
    tf_image decoded, resized, scratch;
} image_reader;

static void image_reader_free(image_reader *reader) {
    decoder_destroy(reader->decoder);
    image_free(&reader->decoded);
    image_free(&reader->resized);
    image_free(&reader->scratch);
}

/* One file through the eval transform into uint8 CHW [3, size, size]. */
static tf_status read_image(image_reader *reader, const char *path, int size, float crop_pct, uint8_t *chw) {
    TF_TRY(decoder_load_file(reader->decoder, path, &reader->decoded));
    int resize_width, resize_height, crop_left, crop_top;
    image_eval_geometry(reader->decoded.width, reader->decoded.height, size, crop_pct, &resize_width,
                        &resize_height, &crop_left, &crop_top);
    tf_status status =
        image_resize_then_crop_bicubic(&reader->decoded, resize_width, resize_height, crop_left, crop_top,
                                       size, size, &reader->resized, &reader->scratch);
    if (status != TF_OK) return tf_fail_context(status, "%s", path);
    image_to_chw(&reader->resized, chw);
    return TF_OK;
}

/* Appends a batch of uint8 CHW images, normalised as model_load_pixels() does (same constants,
 * same order of operations), to the --dump-input file. */
static tf_status dump_input_batch(npy_writer *writer, const uint8_t *pixels, int count, int size,
                                  float *row) {
    size_t plane = (size_t)size * size;
    for (int image = 0; image < count; image++)
        for (int c = 0; c < 3; c++) {
            const uint8_t *in = pixels + ((size_t)image * 3 + c) * plane;
            for (size_t i = 0; i < plane; i++)
                row[i] = ((float)in[i] / 255.0f - tf_imagenet_mean[c]) / tf_imagenet_std[c];
            TF_TRY(npy_writer_append(writer, row, plane));
        }
    return TF_OK;
}

/* ---- the model ---------------------------------------------------------------------------------- */

/* Everything one run holds, released by predict_state_free whatever happened. */
typedef struct {
    tf_checkpoint checkpoint;
    const tf_backend *backend;
    tf_model model;
    image_reader reader;
    uint8_t *pixels; /* host [batch, 3, S, S] from backend->host_alloc */
    float *logits;   /* host [images, classes] */
    float *dump_row; /* host [S * S] */
    npy_writer input_dump;
} predict_state;

static void predict_state_free(predict_state *state) {
    npy_writer_abort(&state->input_dump); /* only still open after a failure */
    if (state->pixels) state->backend->host_free(state->pixels);
    if (state->model.backend) model_destroy(&state->model);
    image_reader_free(&state->reader);
    free(state->logits);
    free(state->dump_row);
    checkpoint_free(&state->checkpoint);
}

static tf_status open_model(const predict_arguments *arguments, predict_state *state, int max_batch) {
    tf_device device = TF_DEVICE_AUTO;
    TF_TRY(cli_device(arguments->device, &device));
    TF_TRY(checkpoint_load(arguments->checkpoint, &state->checkpoint));
    const tf_model_config *config = &state->checkpoint.config;
    if (config->channels != 3)
        return tf_fail(TF_ERR_RUNTIME, "%s: the model takes %d channels; predict feeds RGB images (3)",
                       arguments->checkpoint, config->channels);
    TF_TRY(tf_backend_open(device, 0, &state->backend));
    TF_TRY(model_create(&state->model, config, state->backend, max_batch, false));
    model_set_params(&state->model, state->checkpoint.params);
    size_t image_bytes = (size_t)3 * config->img_size * config->img_size;
    TF_TRY(state->backend->host_alloc((void **)&state->pixels, (size_t)max_batch * image_bytes));
    state->logits = malloc((size_t)arguments->image_count * config->classes * sizeof *state->logits);
    state->dump_row = malloc((size_t)config->img_size * config->img_size * sizeof *state->dump_row);
    if (!state->logits || !state->dump_row)
        return tf_fail(TF_ERR_RUNTIME, "out of memory for the predictions");
    return decoder_create(&state->reader.decoder, 0);
}

/* Runs every image through the transform and the model; the logits land in state->logits. */
static tf_status predict_all(const predict_arguments *arguments, predict_state *state, float crop_pct,
                             int max_batch) {
    const tf_model_config *config = &state->checkpoint.config;
    int size = config->img_size, classes = config->classes;
    size_t image_bytes = (size_t)3 * size * size;
    if (arguments->dump_input) {
        int64_t shape[4] = {arguments->image_count, 3, size, size};
        TF_TRY(npy_writer_open(&state->input_dump, arguments->dump_input, shape, 4));
    }
    for (int first = 0; first < arguments->image_count; first += max_batch) {
        int count = arguments->image_count - first < max_batch ? arguments->image_count - first : max_batch;
        for (int b = 0; b < count; b++)
            TF_TRY(read_image(&state->reader, arguments->images[first + b], size, crop_pct,
                              state->pixels + (size_t)b * image_bytes));
        if (arguments->dump_input)
            TF_TRY(dump_input_batch(&state->input_dump, state->pixels, count, size, state->dump_row));
        model_load_pixels(&state->model, state->pixels, count);
        model_infer(&state->model, count);
        TF_TRY(model_logits(&state->model, state->logits + (size_t)first * classes, count));
    }
    if (arguments->dump_input) TF_TRY(npy_writer_close(&state->input_dump));
    if (arguments->dump_logits) {
        int64_t shape[2] = {arguments->image_count, classes};
        TF_TRY(npy_write_float32(arguments->dump_logits, state->logits, shape, 2));
    }
    return TF_OK;
}

/* ---- output ------------------------------------------------------------------------------------- */

/* Softmax in double (the logits are fp32) and the indices of the k largest, best first; equal
 * probabilities keep the lower class index first. */
static void softmax_topk(const float *logits, int classes, int k, double *probabilities, int *top) {
    float largest = logits[0];
    for (int c = 1; c < classes; c++)
        largest = logits[c] > largest ? logits[c] : largest;
    double sum = 0.0;
    for (int c = 0; c < classes; c++)
        sum += probabilities[c] = exp((double)logits[c] - (double)largest);
    for (int c = 0; c < classes; c++)
        probabilities[c] /= sum;
    for (int rank = 0; rank < k; rank++) {
        int best = -1;
        for (int c = 0; c < classes; c++) {
            bool taken = false;
            for (int r = 0; r < rank; r++)
                taken |= top[r] == c;
            if (!taken && (best < 0 || probabilities[c] > probabilities[best])) best = c;
        }
        top[rank] = best;
    }
}

static cJSON *image_json(const char *image, const tf_class_names *names, const double *probabilities,
                         const int *top, int k) {
    cJSON *entry = cJSON_CreateObject();
    cJSON_AddStringToObject(entry, "image", image);
    cJSON *predictions = cJSON_AddArrayToObject(entry, "predictions");
    for (int rank = 0; rank < k; rank++) {
        cJSON *prediction = cJSON_CreateObject();
        cJSON_AddStringToObject(prediction, "class", names->names[top[rank]]);
        cJSON_AddNumberToObject(prediction, "index", top[rank]);
        cJSON_AddNumberToObject(prediction, "probability", probabilities[top[rank]]);
        cJSON_AddItemToArray(predictions, prediction);
    }
    return entry;
}

static void print_image_text(const char *image, const tf_class_names *names, const double *probabilities,
                             const int *top, int k) {
    printf("%s\n", image);
    for (int rank = 0; rank < k; rank++)
        printf("  %7.3f%%  %s (%d)\n", 100.0 * probabilities[top[rank]], names->names[top[rank]], top[rank]);
}

static tf_status print_predictions(const predict_arguments *arguments, const predict_state *state) {
    int classes = state->checkpoint.config.classes;
    int k = arguments->topk < classes ? arguments->topk : classes;
    double *probabilities = malloc((size_t)classes * sizeof *probabilities);
    int *top = malloc((size_t)k * sizeof *top);
    cJSON *root = arguments->json ? cJSON_CreateArray() : NULL;
    tf_status status = TF_OK;
    if (!probabilities || !top || (arguments->json && !root))
        status = tf_fail(TF_ERR_RUNTIME, "out of memory for the predictions");
    for (int i = 0; status == TF_OK && i < arguments->image_count; i++) {
        softmax_topk(state->logits + (size_t)i * classes, classes, k, probabilities, top);
        if (root)
            cJSON_AddItemToArray(
                root, image_json(arguments->images[i], &state->checkpoint.classes, probabilities, top, k));
        else
            print_image_text(arguments->images[i], &state->checkpoint.classes, probabilities, top, k);
    }
    if (status == TF_OK && root) {
        char *text = cJSON_Print(root);
        if (!text)
            status = tf_fail(TF_ERR_RUNTIME, "out of memory printing the predictions");
        else
            puts(text);
        cJSON_free(text);
    }
    if (fflush(stdout) != 0 && status == TF_OK)
        status = tf_fail(TF_ERR_RUNTIME, "cannot write the predictions: %s", strerror(errno));
    cJSON_Delete(root);
    free(probabilities);
    free(top);
    return status;
}

static tf_status run_predict(const predict_arguments *arguments, predict_state *state) {
    int max_batch = arguments->batch < arguments->image_count ? arguments->batch : arguments->image_count;
    TF_TRY(open_model(arguments, state, max_batch));
    const tf_checkpoint *checkpoint = &state->checkpoint;
    float crop_pct = arguments->crop_pct > 0    ? arguments->crop_pct
                     : checkpoint->crop_pct > 0 ? checkpoint->crop_pct
                                                : 0.875f;
    tf_log("predicting %d image%s with %s (%s, img_size %d, crop_pct %.3f)", arguments->image_count,
           arguments->image_count == 1 ? "" : "s", arguments->checkpoint, state->backend->name,
           checkpoint->config.img_size, crop_pct);
    TF_TRY(predict_all(arguments, state, crop_pct, max_batch));
    return print_predictions(arguments, state);
}

int cmd_predict(int argc, char **argv) {
    predict_arguments arguments;
    predict_state state = {0};
    tf_status status = parse_arguments(argc, argv, &arguments);
    if (status == TF_OK) status = run_predict(&arguments, &state);
    predict_state_free(&state);
    free(arguments.images);
    return cli_report("predict", status);
}
