/* Parameter table, initialisation and optimizer groups (see params.h).
 *
 * Tensors are laid out in model order: patch embedding, cls, pos, then each block's Q, K, V, O and
 * FFN Pattentions (keys then values), then fc_norm and the head. A block's tensors are therefore
 * contiguous, which a per-layer gradient all-reduce can use. */
#include "vision/params.h"

#include "common/rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const pattention_names[TF_PATTENTIONS_PER_BLOCK] = {"attn.q", "attn.k", "attn.v", "attn.o",
                                                                        "ffn"};

/* Appends a tensor; param_layout_build() sized the table for every tensor of the model. */
static tf_tensor_info *add_tensor(tf_param_layout *layout, const char *name, int ndim, const int64_t *shape) {
    tf_tensor_info *tensor = &layout->tensors[layout->count++];
    memset(tensor, 0, sizeof *tensor);
    snprintf(tensor->name, sizeof tensor->name, "%s", name);
    tensor->ndim = ndim;
    tensor->count = 1;
    for (int i = 0; i < ndim; i++) {
        tensor->shape[i] = shape[i];
        tensor->count *= (size_t)shape[i];
    }
    tensor->offset = layout->total;
    layout->total += tensor->count;
    tensor->weight_decay = ndim > 1; /* 1-D tensors: biases and norm weights */
    tensor->init = TF_INIT_ZEROS;
    tensor->block = tensor->pattention = -1;
    return tensor;
}

static int add_normal(tf_param_layout *layout, const char *name, int ndim, const int64_t *shape, float std,
                      int layer) {
    tf_tensor_info *tensor = add_tensor(layout, name, ndim, shape);
    tensor->init = TF_INIT_NORMAL;
    tensor->init_std = std;
    tensor->layer = layer;
    return (int)(tensor - layout->tensors);
}

static void add_pattention(tf_param_layout *layout, const tf_model_config *config, int block, int which) {
    int64_t tokens = which == TF_PATT_FFN ? config->n_ffn : config->n_attn;
    int64_t shape[2] = {tokens, config->dim};
    char name[TF_TENSOR_NAME_MAX];

    snprintf(name, sizeof name, "blocks.%d.%s.key_tokens", block, pattention_names[which]);
    int key = add_normal(layout, name, 2, shape, 0.02f, block + 1);
    snprintf(name, sizeof name, "blocks.%d.%s.value_tokens", block, pattention_names[which]);
    int value = add_normal(layout, name, 2, shape, param_value_init_std(config), block + 1);

    layout->keys[block][which] = key;
    layout->values[block][which] = value;
    layout->tensors[key].block = layout->tensors[value].block = block;
    layout->tensors[key].pattention = layout->tensors[value].pattention = which;
    layout->tensors[key].is_key = true;
}

float param_value_init_std(const tf_model_config *config) {
    return 2.0f / ((float)config->depth * sqrtf((float)config->dim));
}

tf_status param_layout_build(tf_param_layout *layout, const tf_model_config *config) {
    memset(layout, 0, sizeof *layout);
    /* patch weight and bias, cls, pos, fc_norm weight and bias, head weight and bias: 8 */
    size_t capacity = 8 + 2 * TF_PATTENTIONS_PER_BLOCK * (size_t)config->depth;
    layout->tensors = calloc(capacity, sizeof *layout->tensors);
    if (!layout->tensors) return tf_fail(TF_ERR_RUNTIME, "out of memory for the parameter table");

    int64_t d = config->dim, c = config->channels, p = config->patch;
    int64_t positions = 1 + (int64_t)(config->img_size / config->patch) * (config->img_size / config->patch);
    int head_layer = config->depth + 1;

    int64_t patch_shape[4] = {d, c, p, p};
    tf_tensor_info *patch = add_tensor(layout, "patch_embed.proj.weight", 4, patch_shape);
    patch->init = TF_INIT_XAVIER_UNIFORM;
    layout->patch_weight = layout->count - 1;
    add_tensor(layout, "patch_embed.proj.bias", 1, &d);
    layout->patch_bias = layout->count - 1;

    int64_t cls_shape[3] = {1, 1, d}, pos_shape[3] = {1, positions, d};
    layout->cls_token = add_normal(layout, "cls_token", 3, cls_shape, 0.02f, 0);
    layout->pos_embed = add_normal(layout, "pos_embed", 3, pos_shape, 0.02f, 0);
    layout->tensors[layout->cls_token].weight_decay = false;
    layout->tensors[layout->pos_embed].weight_decay = false;

    for (int block = 0; block < config->depth; block++)
        for (int which = 0; which < TF_PATTENTIONS_PER_BLOCK; which++) add_pattention(layout, config, block, which);

    tf_tensor_info *norm_weight = add_tensor(layout, "fc_norm.weight", 1, &d);
    norm_weight->init = TF_INIT_ONES;
    norm_weight->layer = head_layer;
    layout->fc_norm_weight = layout->count - 1;
    add_tensor(layout, "fc_norm.bias", 1, &d)->layer = head_layer;
    layout->fc_norm_bias = layout->count - 1;

    int64_t classes = config->classes, head_shape[2] = {classes, d};
    layout->head_weight = add_normal(layout, "head.weight", 2, head_shape, 0.02f, head_layer);
    add_tensor(layout, "head.bias", 1, &classes)->layer = head_layer;
    layout->head_bias = layout->count - 1;
    return TF_OK;
}

void param_layout_free(tf_param_layout *layout) {
    free(layout->tensors);
    memset(layout, 0, sizeof *layout);
}

const tf_tensor_info *param_layout_find(const tf_param_layout *layout, const char *name) {
    for (int i = 0; i < layout->count; i++)
        if (strcmp(layout->tensors[i].name, name) == 0) return &layout->tensors[i];
    return NULL;
}

void param_shape_string(const tf_tensor_info *tensor, char *out, size_t out_size) {
    size_t used = (size_t)snprintf(out, out_size, "[");
    for (int i = 0; i < tensor->ndim && used < out_size; i++)
        used += (size_t)snprintf(out + used, out_size - used, "%s%lld", i ? ", " : "", (long long)tensor->shape[i]);
    if (used < out_size) snprintf(out + used, out_size - used, "]");
}

void param_init(const tf_param_layout *layout, float *params, uint64_t seed) {
    for (int i = 0; i < layout->count; i++) {
        const tf_tensor_info *tensor = &layout->tensors[i];
        float *values = params + tensor->offset;
        tf_rng rng = tf_rng_make(seed, TF_RNG_INIT, (uint64_t)i, 0);
        switch (tensor->init) {
        case TF_INIT_ZEROS:
            memset(values, 0, tensor->count * sizeof *values);
            break;
        case TF_INIT_ONES:
            for (size_t j = 0; j < tensor->count; j++) values[j] = 1.0f;
            break;
        case TF_INIT_NORMAL:
            for (size_t j = 0; j < tensor->count; j++) values[j] = (float)(tensor->init_std * tf_rng_normal(&rng));
            break;
        case TF_INIT_XAVIER_UNIFORM: {
            /* As MAE initialises the patch projection: xavier_uniform_ on the [out, in] view. */
            double fan_out = (double)tensor->shape[0], fan_in = (double)tensor->count / fan_out;
            double limit = sqrt(6.0 / (fan_in + fan_out));
            for (size_t j = 0; j < tensor->count; j++)
                values[j] = (float)(limit * (2.0 * tf_rng_uniform(&rng) - 1.0));
            break;
        }
        }
    }
}

int param_adamw_groups(const tf_param_layout *layout, const tf_model_config *config, float weight_decay,
                       float layer_decay, tf_adamw_group *groups) {
    int count = 0;
    int layers = config->depth + 1;
    for (int i = 0; i < layout->count; i++) {
        const tf_tensor_info *tensor = &layout->tensors[i];
        float decay = tensor->weight_decay ? weight_decay : 0.0f;
        float lr_scale = (float)pow((double)layer_decay, (double)(layers - tensor->layer));
        tf_adamw_group *last = count ? &groups[count - 1] : NULL;
        if (last && last->weight_decay == decay && last->lr_scale == lr_scale &&
            last->offset + last->count == tensor->offset) {
            last->count += tensor->count;
            continue;
        }
        groups[count++] = (tf_adamw_group){tensor->offset, tensor->count, lr_scale, decay};
    }
    return count;
}
