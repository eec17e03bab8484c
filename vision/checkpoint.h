/* Model checkpoints: the parameters as a safetensors file with timm's ViT names (DESIGN.md
 * section 5), and everything needed to rebuild the model in `__metadata__`:
 *   "format": "tokenformer-vit", "version": "1",
 *   "config": the model config as JSON (dims, token counts, n_norm of every Pattention, eps,
 *             the LayerNorm eps),
 *   "class_names": a JSON array of the class folder names, in class-index order,
 *   "growth_history": a JSON array of the growth steps that made this model (tokenformer scale),
 *   plus optional caller entries (the trainer adds "step" and "epoch").
 * A file that is truncated, corrupt, or holds tensors of other names or shapes than its config
 * says is an error naming the file and the problem. */
#ifndef TF_VISION_CHECKPOINT_H
#define TF_VISION_CHECKPOINT_H

#include "common/config.h"
#include "common/error.h"
#include "common/safetensors.h"
#include "vision/params.h"

#include <stddef.h>

/* The `format` metadata of a training state file (train/run_dir.h writes them; tokenformer scale
 * grows them). */
#define TF_TRAIN_STATE_FORMAT "tokenformer-train-state"

typedef struct {
    int count;
    char **names;
} tf_class_names;

/* A model checkpoint in host memory. */
typedef struct {
    tf_model_config config;
    tf_param_layout layout;
    tf_class_names classes;
    char *growth_history; /* JSON array text */
    float crop_pct;       /* the eval crop of the run that wrote it; 0 when not recorded */
    float *params;        /* [layout.total], layout order */
} tf_checkpoint;

/* The model config as JSON text (malloc'd), and back. source names the file in errors. */
char *model_config_to_json(const tf_model_config *config);
tf_status model_config_from_json(const char *json, const char *source, tf_model_config *config);

tf_status class_names_copy(tf_class_names *dst, int count, char *const *names);
void class_names_free(tf_class_names *classes);

/* Writes params (host fp32, layout order) atomically. growth_history may be NULL ("[]").
 * extra: further metadata entries (may be NULL with extra_count 0). */
tf_status checkpoint_save(const char *path, const tf_model_config *config, const tf_param_layout *layout,
                          const float *params, const tf_class_names *classes, const char *growth_history,
                          const safetensors_metadata_entry *extra, size_t extra_count);

/* Reads a checkpoint and checks every tensor against the layout of its config. */
tf_status checkpoint_load(const char *path, tf_checkpoint *checkpoint);
void checkpoint_free(tf_checkpoint *checkpoint);

/* Reads the tensors named prefix + <parameter name> of an open file into host fp32 [layout.total],
 * checking each shape (training state files hold "adamw.m.", "adamw.v.", "ema." sets). */
tf_status checkpoint_read_params(const safetensors_file *file, const tf_param_layout *layout, const char *prefix,
                                 float *params);

/* The safetensors table of the tensors named prefix + <parameter name> over params (host fp32):
 * names are written into names_storage (layout.count * TF_CHECKPOINT_NAME_MAX chars). */
enum { TF_CHECKPOINT_NAME_MAX = 96 };
void checkpoint_tensor_table(const tf_param_layout *layout, const char *prefix, const float *params,
                             char *names_storage, safetensors_tensor_data *table);

#endif
