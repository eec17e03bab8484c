/* `tokenformer inspect`: what a checkpoint (or a config) holds: the model config, the n_norm of
 * every Pattention, the classes and growth history, every tensor, and the parameter count. */
#include "cli/args.h"
#include "cli/commands.h"
#include "common/config.h"
#include "common/safetensors.h"
#include "vision/checkpoint.h"
#include "vision/params.h"

#include <stdio.h>
#include <string.h>

static void print_model_config(const tf_model_config *config) {
    printf("model: img_size %d, patch %d, channels %d, depth %d, dim %d, heads %d, n_attn %d, n_ffn %d, "
           "classes %d, pool %s, drop_path %g, eps %g\n",
           config->img_size, config->patch, config->channels, config->depth, config->dim, config->heads,
           config->n_attn, config->n_ffn, config->classes, config->pool == TF_POOL_CLS ? "cls" : "avg",
           config->drop_path, config->eps);
    printf("pattention tokens / n_norm per block (q k v o ffn):\n");
    for (int block = 0; block < config->depth; block++) {
        const int *n = config->n_norm[block];
        printf("  block %2d: tokens %d %d %d %d %d, n_norm %d %d %d %d %d\n", block, config->n_attn, config->n_attn,
               config->n_attn, config->n_attn, config->n_ffn, n[0], n[1], n[2], n[3], n[4]);
    }
}

static void print_count(size_t count) {
    printf("parameters: %zu (%.1fM)\n", count, (double)count / 1e6);
}

static tf_status inspect_config(const cli_config_source *source) {
    tf_config config;
    TF_TRY(cli_config_load(source, &config));
    tf_param_layout layout;
    TF_TRY(param_layout_build(&layout, &config.model));
    printf("config: %s\n", source->path);
    print_model_config(&config.model);
    printf("tensors:\n");
    for (int i = 0; i < layout.count; i++) {
        char shape[96];
        param_shape_string(&layout.tensors[i], shape, sizeof shape);
        printf("  %-36s F32  %-22s %zu\n", layout.tensors[i].name, shape, layout.tensors[i].count);
    }
    print_count(layout.total);
    param_layout_free(&layout);
    return TF_OK;
}

static void print_file_tensors(const safetensors_file *file) {
    size_t total = 0;
    printf("tensors:\n");
    for (size_t i = 0; i < file->n_tensors; i++) {
        const safetensors_tensor *tensor = &file->tensors[i];
        char shape[96];
        size_t used = (size_t)snprintf(shape, sizeof shape, "[");
        for (int d = 0; d < tensor->ndim && used < sizeof shape; d++)
            used += (size_t)snprintf(shape + used, sizeof shape - used, "%s%lld", d ? ", " : "",
                                     (long long)tensor->shape[d]);
        if (used < sizeof shape) snprintf(shape + used, sizeof shape - used, "]");
        printf("  %-36s %-4s %-22s %zu\n", tensor->name, tensor->dtype, shape, tensor->numel);
        total += tensor->numel;
    }
    print_count(total);
}

static tf_status inspect_file(const char *path) {
    safetensors_file *file;
    TF_TRY(safetensors_open(&file, path));
    printf("file: %s\n", path);
    const char *format = safetensors_metadata(file, "format");
    const char *config_json = safetensors_metadata(file, "config");
    tf_status status = TF_OK;
    if (format && strcmp(format, "tokenformer-vit") == 0 && config_json) {
        tf_model_config config;
        status = model_config_from_json(config_json, path, &config);
        if (status == TF_OK) print_model_config(&config);
        const char *names = safetensors_metadata(file, "class_names");
        const char *growth = safetensors_metadata(file, "growth_history");
        printf("classes: %s\n", names ? names : "(none)");
        printf("growth history: %s\n", growth ? growth : "[]");
        for (size_t i = 0; i < file->n_metadata; i++)
            if (!strcmp(file->metadata[i].key, "step") || !strcmp(file->metadata[i].key, "epoch"))
                printf("%s: %s\n", file->metadata[i].key, file->metadata[i].value);
    } else {
        for (size_t i = 0; i < file->n_metadata; i++)
            printf("%s: %s\n", file->metadata[i].key, file->metadata[i].value);
    }
    if (status == TF_OK) print_file_tensors(file);
    safetensors_close(file);
    return status;
}

int cmd_inspect(int argc, char **argv) {
    cli_parser parser = cli_parser_make(argc, argv);
    const char *file_path = NULL;
    cli_config_source source = {0};
    while (cli_more(&parser)) {
        if (cli_config_option(&parser, &source)) continue;
        if (!file_path && cli_positional(&parser, &file_path)) continue;
        cli_unknown(&parser);
    }
    tf_status status = parser.status;
    if (status == TF_OK && !source.path == !file_path)
        status = tf_fail(TF_ERR_USAGE, "give a checkpoint FILE.safetensors or --config FILE.yaml");
    if (status == TF_OK) status = source.path ? inspect_config(&source) : inspect_file(file_path);
    return cli_report("inspect", status);
}
