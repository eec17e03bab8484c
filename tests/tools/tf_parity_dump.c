/* tf_parity_dump: runs one training step of our model on random input and writes everything an
 * independent implementation needs to check it (tests/test_torch_parity.py, whose README states
 * the contract): the initial model, the inputs (normalised images, soft targets, drop-path
 * scales), the logits, the mean loss, every parameter gradient, and the parameters after one
 * AdamW step; and the logits of the inference form (model_infer) on the same images, which the
 * reference computes without drop path, once as it runs and once with every variance pass read
 * (vision/variance_proof.c: the two must agree far inside the bf16 bound), with how many variance
 * passes the proof skipped in the metadata.
 *
 *   tf_parity_dump --config FILE.yaml [--set section.key=value]... --batch B --seed S --out DIR
 *                  [--device cpu|cuda] */
#include "cli/args.h"
#include "common/config.h"
#include "common/path.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "train/optimizer.h"
#include "vision/checkpoint.h"
#include "vision/model.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    cli_config_source config;
    const char *out_dir;
    int batch, seed;
    char seed_assignment[64];
} dump_arguments;

/* Host copies of everything the bundle holds. */
typedef struct {
    float *images, *targets, *drop_scales, *logits, *inference_logits, *every_variance_logits, *initial, *grads,
        *updated;
    int variance_passes_skipped;
    float loss;
} dump_data;

static tf_status parse_arguments(int argc, char **argv, dump_arguments *arguments) {
    cli_parser parser = cli_parser_make(argc, argv);
    const char *value;
    *arguments = (dump_arguments){.config.device = "cpu", .batch = 4, .seed = 1};
    while (cli_more(&parser)) {
        if (cli_config_option(&parser, &arguments->config)) continue;
        if (cli_value(&parser, "--out", &arguments->out_dir)) continue;
        if (cli_value(&parser, "--batch", &value)) {
            arguments->batch = cli_int(&parser, "--batch", value);
            continue;
        }
        if (cli_value(&parser, "--seed", &value)) {
            arguments->seed = cli_int(&parser, "--seed", value);
            continue;
        }
        cli_unknown(&parser);
    }
    TF_TRY(parser.status);
    if (!arguments->config.path || !arguments->out_dir) return tf_fail(TF_ERR_USAGE, "--config and --out are required");
    snprintf(arguments->seed_assignment, sizeof arguments->seed_assignment, "run.seed=%d", arguments->seed);
    return cli_config_add(&arguments->config, arguments->seed_assignment);
}

/* Random pixels, and soft targets: a softmax of random logits, so every class carries weight. */
static void random_inputs(const tf_model_config *config, int batch, uint64_t seed, uint8_t *pixels, float *targets) {
    tf_rng rng = tf_rng_make(seed, TF_RNG_TEST, 7, 0);
    size_t count = (size_t)batch * config->channels * config->img_size * config->img_size;
    for (size_t i = 0; i < count; i++) pixels[i] = (uint8_t)tf_rng_below(&rng, 256);
    for (int b = 0; b < batch; b++) {
        float *row = targets + (size_t)b * config->classes;
        double sum = 0.0;
        for (int c = 0; c < config->classes; c++) sum += row[c] = (float)exp(tf_rng_normal(&rng));
        for (int c = 0; c < config->classes; c++) row[c] = (float)(row[c] / sum);
    }
}

static tf_status run_step(const tf_config *config, int batch, tf_model *model, dump_data *data) {
    const tf_model_config *model_config = &config->model;
    size_t image = (size_t)model_config->channels * model_config->img_size * model_config->img_size;
    uint8_t *pixels = malloc((size_t)batch * image);
    if (!pixels) return tf_fail(TF_ERR_RUNTIME, "out of memory");
    random_inputs(model_config, batch, config->run.seed, pixels, data->targets);
    tf_rng rng = tf_rng_make(config->run.seed, TF_RNG_TEST, 8, 0);
    model_drop_scales(model_config, batch, &rng, data->drop_scales);

    model_get_params(model, data->initial);
    model_load_pixels(model, pixels, batch);
    model->backend->download(data->images, model->images, model->backend->compute_dtype, (size_t)batch * image);
    free(pixels); /* after the download, which waited for the upload */
    model_infer(model, batch);
    TF_TRY(model_logits(model, data->inference_logits, batch));
    data->variance_passes_skipped = model_variance_passes_skipped(model);
    model->read_every_variance = true;
    model_infer(model, batch);
    TF_TRY(model_logits(model, data->every_variance_logits, batch));
    model->read_every_variance = false;
    model_zero_grads(model);
    model_forward(model, batch, data->drop_scales);
    TF_TRY(model_logits(model, data->logits, batch));
    double loss;
    TF_TRY(model_backward(model, data->targets, batch, 1.0f / (float)batch, &loss));
    data->loss = (float)loss;
    model_get_grads(model, data->grads);

    tf_optimizer optimizer;
    tf_step_result result;
    TF_TRY(optimizer_create(&optimizer, model, &config->optimizer));
    tf_status status = optimizer_step(&optimizer, model, config->optimizer.lr, 1.0f, &result);
    optimizer_destroy(&optimizer, model->backend);
    TF_TRY(status);
    model_get_params(model, data->updated);
    return model->backend->synchronize();
}

static char *adamw_metadata(const tf_config *config, const tf_param_layout *layout) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "lr", config->optimizer.lr);
    cJSON_AddNumberToObject(root, "beta1", config->optimizer.beta1);
    cJSON_AddNumberToObject(root, "beta2", config->optimizer.beta2);
    cJSON_AddNumberToObject(root, "eps", config->optimizer.eps);
    cJSON_AddNumberToObject(root, "weight_decay", config->optimizer.weight_decay);
    cJSON *no_decay = cJSON_AddArrayToObject(root, "no_decay");
    for (int i = 0; i < layout->count; i++)
        if (!layout->tensors[i].weight_decay) cJSON_AddItemToArray(no_decay, cJSON_CreateString(layout->tensors[i].name));
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return text;
}

static tf_status write_bundle(const char *path, const tf_config *config, const tf_model *model, int batch,
                              const dump_data *data) {
    const tf_model_config *m = &model->config;
    const tf_param_layout *layout = &model->layout;
    size_t count = 8 + 2 * (size_t)layout->count;
    safetensors_tensor_data *table = calloc(count, sizeof *table);
    char *names = malloc(2 * (size_t)layout->count * TF_CHECKPOINT_NAME_MAX);
    char *adamw = adamw_metadata(config, layout);
    if (!table || !names || !adamw) return tf_fail(TF_ERR_RUNTIME, "out of memory");
    size_t n = 0;
    table[n++] = (safetensors_tensor_data){"input.images", "F32", 4, {batch, m->channels, m->img_size, m->img_size},
                                           data->images};
    table[n++] = (safetensors_tensor_data){"input.targets", "F32", 2, {batch, m->classes}, data->targets};
    table[n++] = (safetensors_tensor_data){"input.drop_scales", "F32", 3, {m->depth, 2, batch}, data->drop_scales};
    table[n++] = (safetensors_tensor_data){"output.logits", "F32", 2, {batch, m->classes}, data->logits};
    table[n++] = (safetensors_tensor_data){"output.loss", "F32", 1, {1}, &data->loss};
    table[n++] = (safetensors_tensor_data){"output.inference_logits", "F32", 2, {batch, m->classes},
                                           data->inference_logits};
    table[n++] = (safetensors_tensor_data){"output.inference_logits_every_variance", "F32", 2, {batch, m->classes},
                                           data->every_variance_logits};
    checkpoint_tensor_table(layout, "grad.", data->grads, names, table + n);
    n += (size_t)layout->count;
    checkpoint_tensor_table(layout, "adamw.", data->updated, names + (size_t)layout->count * TF_CHECKPOINT_NAME_MAX,
                            table + n);
    n += (size_t)layout->count;
    char skipped[16];
    snprintf(skipped, sizeof skipped, "%d", data->variance_passes_skipped);
    safetensors_metadata_entry metadata[] = {{"adamw", adamw}, {"variance_passes_skipped", skipped}};
    tf_status status = safetensors_write(path, table, n, metadata, 2);
    free(table);
    free(names);
    cJSON_free(adamw);
    return status;
}

static tf_status write_model(const char *path, const tf_model *model, const float *params) {
    int classes = model->config.classes;
    char **names = calloc((size_t)classes, sizeof *names);
    for (int c = 0; c < classes && names; c++) {
        names[c] = malloc(32);
        snprintf(names[c], 32, "class_%d", c);
    }
    tf_class_names class_names = {classes, names};
    tf_status status = checkpoint_save(path, &model->config, &model->layout, params, &class_names, NULL, NULL, 0);
    class_names_free(&class_names);
    return status;
}

static tf_status dump(const dump_arguments *arguments) {
    tf_config config;
    TF_TRY(cli_config_load(&arguments->config, &config));
    const tf_backend *backend;
    TF_TRY(tf_backend_open(config.run.device, 0, &backend));
    tf_model model;
    TF_TRY(model_create(&model, &config.model, backend, arguments->batch, true));
    TF_TRY(model_init_params(&model, config.run.seed));

    int batch = arguments->batch;
    size_t total = model.layout.total, image = (size_t)config.model.channels * config.model.img_size * config.model.img_size;
    dump_data data = {
        .images = malloc((size_t)batch * image * sizeof(float)),
        .targets = malloc((size_t)batch * config.model.classes * sizeof(float)),
        .drop_scales = malloc((size_t)config.model.depth * 2 * batch * sizeof(float)),
        .logits = malloc((size_t)batch * config.model.classes * sizeof(float)),
        .inference_logits = malloc((size_t)batch * config.model.classes * sizeof(float)),
        .every_variance_logits = malloc((size_t)batch * config.model.classes * sizeof(float)),
        .initial = malloc(total * sizeof(float)),
        .grads = malloc(total * sizeof(float)),
        .updated = malloc(total * sizeof(float)),
    };
    char path[TF_PATH_MAX];
    tf_status status = run_step(&config, batch, &model, &data);
    if (status == TF_OK) status = path_make_directories(arguments->out_dir);
    if (status == TF_OK) status = path_format(path, sizeof path, "%s/model.safetensors", arguments->out_dir);
    if (status == TF_OK) status = write_model(path, &model, data.initial);
    if (status == TF_OK) status = path_format(path, sizeof path, "%s/bundle.safetensors", arguments->out_dir);
    if (status == TF_OK) status = write_bundle(path, &config, &model, batch, &data);
    if (status == TF_OK)
        printf("tf_parity_dump: %s, batch %d, loss %.6f, %zu parameters -> %s\n", backend->name, batch, data.loss,
               total, arguments->out_dir);
    free(data.images);
    free(data.targets);
    free(data.drop_scales);
    free(data.logits);
    free(data.inference_logits);
    free(data.every_variance_logits);
    free(data.initial);
    free(data.grads);
    free(data.updated);
    model_destroy(&model);
    return status;
}

int main(int argc, char **argv) {
    dump_arguments arguments;
    tf_status status = parse_arguments(argc, argv, &arguments);
    if (status == TF_OK) status = dump(&arguments);
    if (status != TF_OK) fprintf(stderr, "tf_parity_dump: %s\n", tf_error_message());
    return status;
}
