/* The parameter layout: every parameter tensor of a model is a view into one contiguous buffer,
 * described by a table of names (timm's ViT names where one exists, DESIGN.md section 5), shapes
 * and offsets. Checkpoints, the optimizer, gradient all-reduce and growth all work on the flat
 * buffer plus this table. */
#ifndef TF_VISION_PARAMS_H
#define TF_VISION_PARAMS_H

#include "common/config.h"
#include "common/error.h"
#include "kernels/kernels.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum { TF_TENSOR_NAME_MAX = 64, TF_TENSOR_MAX_DIMS = 4 };

typedef enum {
    TF_INIT_ZEROS,
    TF_INIT_ONES,
    TF_INIT_NORMAL,         /* N(0, init_std^2) */
    TF_INIT_XAVIER_UNIFORM, /* U(-a, a), a = sqrt(6 / (fan_in + fan_out)) of the 2-D view */
} tf_init_kind;

typedef struct {
    char name[TF_TENSOR_NAME_MAX];
    int ndim;
    int64_t shape[TF_TENSOR_MAX_DIMS];
    size_t offset; /* elements from the start of the buffer */
    size_t count;  /* elements */
    bool weight_decay; /* false for the no-decay set: 1-D tensors, biases, norms, cls, pos */
    int layer;         /* for layer-wise lr decay: 0 embeddings, 1..depth blocks, depth + 1 head */
    tf_init_kind init;
    float init_std;
    /* Pattention token tensors: the block, which Pattention, and keys or values; -1 otherwise. */
    int block, pattention;
    bool is_key;
} tf_tensor_info;

typedef struct {
    tf_tensor_info *tensors;
    int count;
    size_t total; /* elements in the flat buffer */
    /* Indices into tensors of the tensors that the model reads directly. */
    int patch_weight, patch_bias, cls_token, pos_embed, fc_norm_weight, fc_norm_bias, head_weight, head_bias;
    int keys[TF_MAX_DEPTH][TF_PATTENTIONS_PER_BLOCK];
    int values[TF_MAX_DEPTH][TF_PATTENTIONS_PER_BLOCK];
} tf_param_layout;

/* Builds the table for a model config (n_attn and n_ffn give the token counts). */
tf_status param_layout_build(tf_param_layout *layout, const tf_model_config *config);
void param_layout_free(tf_param_layout *layout);
/* The tensor called name, or NULL. */
const tf_tensor_info *param_layout_find(const tf_param_layout *layout, const char *name);
/* "[768, 3, 16, 16]" */
void param_shape_string(const tf_tensor_info *tensor, char *out, size_t out_size);

/* Fills host fp32 params [layout->total] with DESIGN.md's init: key tokens N(0, 0.02), value tokens
 * N(0, 2 / (depth sqrt(dim))) (the official code's "wang" init), cls, pos and head weight
 * N(0, 0.02), patch weight Xavier uniform on its [dim, C p p] view, biases 0, LayerNorm weight 1.
 * Each tensor draws from its own stream, tf_rng_make(seed, TF_RNG_INIT, tensor index, 0). */
void param_init(const tf_param_layout *layout, float *params, uint64_t seed);

/* The value-token init std of a model: 2 / (depth sqrt(dim)). */
float param_value_init_std(const tf_model_config *config);

/* AdamW groups over the flat buffer: runs of consecutive tensors with the same weight decay and
 * lr scale (layer_decay^(depth + 1 - layer)). groups must hold layout->count entries; returns the
 * number used. */
int param_adamw_groups(const tf_param_layout *layout, const tf_model_config *config, float weight_decay,
                       float layer_decay, tf_adamw_group *groups);

#endif
