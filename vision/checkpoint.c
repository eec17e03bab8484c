/* Model checkpoints (see checkpoint.h): safetensors plus the model config in its metadata. */
#include "vision/checkpoint.h"

#include "vision/model.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECKPOINT_FORMAT "tokenformer-vit"
#define CHECKPOINT_VERSION "1"

/* ---- model config <-> JSON ------------------------------------------------------------------- */

char *model_config_to_json(const tf_model_config *config) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "img_size", config->img_size);
    cJSON_AddNumberToObject(root, "patch", config->patch);
    cJSON_AddNumberToObject(root, "channels", config->channels);
    cJSON_AddNumberToObject(root, "depth", config->depth);
    cJSON_AddNumberToObject(root, "dim", config->dim);
    cJSON_AddNumberToObject(root, "heads", config->heads);
    cJSON_AddNumberToObject(root, "n_attn", config->n_attn);
    cJSON_AddNumberToObject(root, "n_ffn", config->n_ffn);
    cJSON_AddNumberToObject(root, "classes", config->classes);
    cJSON_AddStringToObject(root, "pool", config->pool == TF_POOL_CLS ? "cls" : "avg");
    cJSON_AddNumberToObject(root, "drop_path", config->drop_path);
    cJSON_AddNumberToObject(root, "eps", config->eps);
    cJSON_AddNumberToObject(root, "layernorm_eps", TF_LAYERNORM_EPS);
    cJSON *n_norm = cJSON_AddArrayToObject(root, "n_norm");
    for (int block = 0; block < config->depth; block++) {
        cJSON *row = cJSON_CreateIntArray(config->n_norm[block], TF_PATTENTIONS_PER_BLOCK);
        cJSON_AddItemToArray(n_norm, row);
    }
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return text;
}

static tf_status json_int(const cJSON *root, const char *key, const char *source, int *value) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!cJSON_IsNumber(item))
        return tf_fail(TF_ERR_RUNTIME, "%s: model config: '%s' is missing or not a number", source, key);
    *value = item->valueint;
    return TF_OK;
}

static tf_status json_float(const cJSON *root, const char *key, const char *source, float *value) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!cJSON_IsNumber(item))
        return tf_fail(TF_ERR_RUNTIME, "%s: model config: '%s' is missing or not a number", source, key);
    *value = (float)item->valuedouble;
    return TF_OK;
}

static tf_status json_n_norm(const cJSON *root, const char *source, tf_model_config *config) {
    const cJSON *rows = cJSON_GetObjectItemCaseSensitive(root, "n_norm");
    if (!cJSON_IsArray(rows) || cJSON_GetArraySize(rows) != config->depth)
        return tf_fail(TF_ERR_RUNTIME, "%s: model config: 'n_norm' must list %d blocks", source, config->depth);
    for (int block = 0; block < config->depth; block++) {
        const cJSON *row = cJSON_GetArrayItem(rows, block);
        if (!cJSON_IsArray(row) || cJSON_GetArraySize(row) != TF_PATTENTIONS_PER_BLOCK)
            return tf_fail(TF_ERR_RUNTIME, "%s: model config: n_norm[%d] must hold %d numbers", source, block,
                           TF_PATTENTIONS_PER_BLOCK);
        for (int which = 0; which < TF_PATTENTIONS_PER_BLOCK; which++) {
            const cJSON *item = cJSON_GetArrayItem(row, which);
            if (!cJSON_IsNumber(item) || item->valueint < 1)
                return tf_fail(TF_ERR_RUNTIME, "%s: model config: n_norm[%d][%d] is not a positive number", source,
                               block, which);
            config->n_norm[block][which] = item->valueint;
        }
    }
    return TF_OK;
}

static tf_status parse_model_config(const cJSON *root, const char *source, tf_model_config *config) {
    memset(config, 0, sizeof *config);
    TF_TRY(json_int(root, "img_size", source, &config->img_size));
    TF_TRY(json_int(root, "patch", source, &config->patch));
    TF_TRY(json_int(root, "channels", source, &config->channels));
    TF_TRY(json_int(root, "depth", source, &config->depth));
    TF_TRY(json_int(root, "dim", source, &config->dim));
    TF_TRY(json_int(root, "heads", source, &config->heads));
    TF_TRY(json_int(root, "n_attn", source, &config->n_attn));
    TF_TRY(json_int(root, "n_ffn", source, &config->n_ffn));
    TF_TRY(json_int(root, "classes", source, &config->classes));
    TF_TRY(json_float(root, "drop_path", source, &config->drop_path));
    TF_TRY(json_float(root, "eps", source, &config->eps));
    const cJSON *pool = cJSON_GetObjectItemCaseSensitive(root, "pool");
    if (!cJSON_IsString(pool) || (strcmp(pool->valuestring, "avg") != 0 && strcmp(pool->valuestring, "cls") != 0))
        return tf_fail(TF_ERR_RUNTIME, "%s: model config: 'pool' must be \"avg\" or \"cls\"", source);
    config->pool = strcmp(pool->valuestring, "cls") == 0 ? TF_POOL_CLS : TF_POOL_AVG;
    if (config->depth < 1 || config->depth > TF_MAX_DEPTH || config->dim < 1 || config->heads < 1 ||
        config->patch < 1 || config->img_size < config->patch || config->n_attn < 1 || config->n_ffn < 1 ||
        config->classes < 1 || config->channels < 1)
        return tf_fail(TF_ERR_RUNTIME, "%s: model config has sizes out of range", source);
    return json_n_norm(root, source, config);
}

tf_status model_config_from_json(const char *json, const char *source, tf_model_config *config) {
    cJSON *root = cJSON_Parse(json);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return tf_fail(TF_ERR_RUNTIME, "%s: the model config in the metadata is not a JSON object", source);
    }
    tf_status status = parse_model_config(root, source, config);
    cJSON_Delete(root);
    return status;
}

/* ---- class names ----------------------------------------------------------------------------- */

tf_status class_names_copy(tf_class_names *dst, int count, char *const *names) {
    dst->count = count;
    dst->names = calloc((size_t)count, sizeof *dst->names);
    if (!dst->names) return tf_fail(TF_ERR_RUNTIME, "out of memory for %d class names", count);
    for (int i = 0; i < count; i++)
        if (!(dst->names[i] = strdup(names[i]))) return tf_fail(TF_ERR_RUNTIME, "out of memory for class names");
    return TF_OK;
}

void class_names_free(tf_class_names *classes) {
    for (int i = 0; i < classes->count && classes->names; i++) free(classes->names[i]);
    free(classes->names);
    classes->names = NULL;
    classes->count = 0;
}

static char *class_names_to_json(const tf_class_names *classes) {
    cJSON *array = cJSON_CreateArray();
    for (int i = 0; i < classes->count; i++) cJSON_AddItemToArray(array, cJSON_CreateString(classes->names[i]));
    char *text = cJSON_PrintUnformatted(array);
    cJSON_Delete(array);
    return text;
}

static tf_status class_names_from_json(const char *json, const char *source, int expected, tf_class_names *classes) {
    cJSON *array = cJSON_Parse(json);
    tf_status status = TF_OK;
    if (!cJSON_IsArray(array) || cJSON_GetArraySize(array) != expected)
        status = tf_fail(TF_ERR_RUNTIME, "%s: 'class_names' must be a JSON array of %d names", source, expected);
    classes->count = 0;
    classes->names = NULL;
    if (status == TF_OK && !(classes->names = calloc((size_t)expected, sizeof *classes->names)))
        status = tf_fail(TF_ERR_RUNTIME, "out of memory for class names");
    for (int i = 0; status == TF_OK && i < expected; i++) {
        const cJSON *item = cJSON_GetArrayItem(array, i);
        if (!cJSON_IsString(item))
            status = tf_fail(TF_ERR_RUNTIME, "%s: class_names[%d] is not a string", source, i);
        else if (!(classes->names[i] = strdup(item->valuestring)))
            status = tf_fail(TF_ERR_RUNTIME, "out of memory for class names");
        classes->count = i + 1;
    }
    cJSON_Delete(array);
    return status;
}

/* ---- tensors --------------------------------------------------------------------------------- */

void checkpoint_tensor_table(const tf_param_layout *layout, const char *prefix, const float *params,
                             char *names_storage, safetensors_tensor_data *table) {
    for (int i = 0; i < layout->count; i++) {
        const tf_tensor_info *tensor = &layout->tensors[i];
        char *name = names_storage + (size_t)i * TF_CHECKPOINT_NAME_MAX;
        snprintf(name, TF_CHECKPOINT_NAME_MAX, "%s%s", prefix, tensor->name);
        table[i] = (safetensors_tensor_data){.name = name, .dtype = "F32", .ndim = tensor->ndim,
                                             .data = params + tensor->offset};
        memcpy(table[i].shape, tensor->shape, sizeof tensor->shape);
    }
}

tf_status checkpoint_read_params(const safetensors_file *file, const tf_param_layout *layout, const char *prefix,
                                 float *params) {
    char name[TF_CHECKPOINT_NAME_MAX];
    for (int i = 0; i < layout->count; i++) {
        const tf_tensor_info *tensor = &layout->tensors[i];
        snprintf(name, sizeof name, "%s%s", prefix, tensor->name);
        TF_TRY(safetensors_load(file, name, "F32", tensor->ndim, tensor->shape, params + tensor->offset));
    }
    return TF_OK;
}

tf_status checkpoint_save(const char *path, const tf_model_config *config, const tf_param_layout *layout,
                          const float *params, const tf_class_names *classes, const char *growth_history,
                          const safetensors_metadata_entry *extra, size_t extra_count) {
    char *names = malloc((size_t)layout->count * TF_CHECKPOINT_NAME_MAX);
    safetensors_tensor_data *table = calloc((size_t)layout->count, sizeof *table);
    safetensors_metadata_entry *metadata = calloc(5 + extra_count, sizeof *metadata);
    char *config_json = model_config_to_json(config), *classes_json = class_names_to_json(classes);
    tf_status status = TF_OK;
    if (!names || !table || !metadata || !config_json || !classes_json)
        status = tf_fail(TF_ERR_RUNTIME, "out of memory writing %s", path);
    if (status == TF_OK) {
        checkpoint_tensor_table(layout, "", params, names, table);
        size_t count = 0;
        metadata[count++] = (safetensors_metadata_entry){"format", CHECKPOINT_FORMAT};
        metadata[count++] = (safetensors_metadata_entry){"version", CHECKPOINT_VERSION};
        metadata[count++] = (safetensors_metadata_entry){"config", config_json};
        metadata[count++] = (safetensors_metadata_entry){"class_names", classes_json};
        metadata[count++] = (safetensors_metadata_entry){"growth_history", growth_history ? growth_history : "[]"};
        for (size_t i = 0; i < extra_count; i++) metadata[count++] = extra[i];
        status = safetensors_write(path, table, (size_t)layout->count, metadata, count);
    }
    free(names);
    free(table);
    free(metadata);
    cJSON_free(config_json);
    cJSON_free(classes_json);
    return status;
}

/* Every tensor of the file must be one of the layout's: a checkpoint of another shape of model
 * fails here, naming the first stranger. */
static tf_status check_no_extra_tensors(const safetensors_file *file, const tf_param_layout *layout) {
    for (size_t i = 0; i < file->n_tensors; i++)
        if (!param_layout_find(layout, file->tensors[i].name))
            return tf_fail(TF_ERR_RUNTIME, "%s: tensor '%s' is not part of the model its config describes", file->path,
                           file->tensors[i].name);
    return TF_OK;
}

static tf_status read_checkpoint(const safetensors_file *file, tf_checkpoint *checkpoint) {
    const char *format = safetensors_metadata(file, "format");
    if (!format || strcmp(format, CHECKPOINT_FORMAT) != 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: not a TokenFormer checkpoint (metadata 'format' is %s%s%s, expected \"%s\")",
                       file->path, format ? "\"" : "", format ? format : "missing", format ? "\"" : "",
                       CHECKPOINT_FORMAT);
    const char *config_json = safetensors_metadata(file, "config");
    const char *classes_json = safetensors_metadata(file, "class_names");
    const char *growth = safetensors_metadata(file, "growth_history");
    if (!config_json || !classes_json)
        return tf_fail(TF_ERR_RUNTIME, "%s: metadata lacks '%s'", file->path, config_json ? "class_names" : "config");
    TF_TRY(model_config_from_json(config_json, file->path, &checkpoint->config));
    TF_TRY(class_names_from_json(classes_json, file->path, checkpoint->config.classes, &checkpoint->classes));
    const char *crop_pct = safetensors_metadata(file, "crop_pct");
    checkpoint->crop_pct = crop_pct ? strtof(crop_pct, NULL) : 0.0f;
    if (!(checkpoint->growth_history = strdup(growth ? growth : "[]")))
        return tf_fail(TF_ERR_RUNTIME, "out of memory reading %s", file->path);
    TF_TRY(param_layout_build(&checkpoint->layout, &checkpoint->config));
    TF_TRY(check_no_extra_tensors(file, &checkpoint->layout));
    checkpoint->params = malloc(checkpoint->layout.total * sizeof *checkpoint->params);
    if (!checkpoint->params)
        return tf_fail(TF_ERR_RUNTIME, "out of memory for %zu parameters of %s", checkpoint->layout.total, file->path);
    return checkpoint_read_params(file, &checkpoint->layout, "", checkpoint->params);
}

tf_status checkpoint_load(const char *path, tf_checkpoint *checkpoint) {
    memset(checkpoint, 0, sizeof *checkpoint);
    safetensors_file *file;
    TF_TRY(safetensors_open(&file, path));
    tf_status status = read_checkpoint(file, checkpoint);
    safetensors_close(file);
    if (status != TF_OK) checkpoint_free(checkpoint);
    return status;
}

void checkpoint_free(tf_checkpoint *checkpoint) {
    param_layout_free(&checkpoint->layout);
    class_names_free(&checkpoint->classes);
    free(checkpoint->growth_history);
    free(checkpoint->params);
    memset(checkpoint, 0, sizeof *checkpoint);
}
