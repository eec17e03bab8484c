/* The run configuration: plain structs filled once from a YAML file (configs/NAME.yaml) plus
 * command-line overrides (--set section.key=value), validated once, then passed down. Nothing
 * else in the program parses text or reads the environment for settings.
 *
 * Sections and keys (every key optional, defaults in config_defaults()):
 *   model:        preset, img_size, patch, channels, depth, dim, heads, n_attn, n_ffn, classes,
 *                 pool (avg|cls), drop_path, eps
 *   data:         root, train_split, val_split, workers, crop_pct, train_limit, val_limit
 *   augmentation: scale_min, scale_max, ratio_min, ratio_max, hflip, randaugment, label_smoothing,
 *                 mixup, cutmix, mixup_switch_prob, mixup_prob, random_erase
 *   optimizer:    lr, base_lr, min_lr, beta1, beta2, eps, weight_decay, layer_decay, clip_grad,
 *                 ema_decay
 *   schedule:     epochs, warmup_epochs, batch, micro_batch
 *   run:          seed, device (auto|cpu|cuda), threads, log_every, eval_every, ckpt_every,
 *                 keep_checkpoints, max_bad_steps */
#ifndef TF_COMMON_CONFIG_H
#define TF_COMMON_CONFIG_H

#include "common/error.h"

#include <stdbool.h>
#include <stdio.h>

enum {
    TF_MAX_DEPTH = 64,           /* blocks */
    TF_PATTENTIONS_PER_BLOCK = 5, /* q, k, v, o, ffn */
    TF_PATH_MAX = 4096,
};

/* Index of each Pattention inside a block. */
typedef enum { TF_PATT_Q = 0, TF_PATT_K, TF_PATT_V, TF_PATT_O, TF_PATT_FFN } tf_pattention_index;

typedef enum { TF_POOL_AVG = 0, TF_POOL_CLS = 1 } tf_pool;

typedef struct {
    int img_size;  /* square input, pixels */
    int patch;     /* patch side, pixels; img_size % patch == 0 */
    int channels;  /* image channels (3) */
    int depth;     /* blocks */
    int dim;       /* token width d */
    int heads;     /* attention heads; dim % heads == 0 */
    int n_attn;    /* parameter tokens of each of Q, K, V, O */
    int n_ffn;     /* parameter tokens of the FFN Pattention */
    int classes;   /* output classes */
    tf_pool pool;  /* head input: mean of patch tokens, or the cls token */
    float drop_path; /* drop-path rate of the last block (linear from 0 at the first) */
    float eps;       /* Pattention norm: Z = A tau / sqrt(sum A^2 + eps) */
    /* n_norm of every Pattention: tau = sqrt(n_norm). Equal to the token count at creation and
     * kept when tokens are added (DESIGN.md section 4). config_finalize() fills it from n_attn and
     * n_ffn; checkpoints store it. */
    int n_norm[TF_MAX_DEPTH][TF_PATTENTIONS_PER_BLOCK];
} tf_model_config;

typedef struct {
    char root[TF_PATH_MAX]; /* ImageFolder root holding train_split/ and val_split/ */
    char train_split[64];
    char val_split[64];
    int workers;        /* loader threads; 0 = all cores but one */
    float crop_pct;     /* eval: resize shorter side to img_size / crop_pct, centre crop */
    int train_limit;    /* use only the first N training images of the index (0 = all), for tests */
    int val_limit;      /* likewise for validation */
} tf_data_config;

typedef struct {
    float scale_min, scale_max; /* RandomResizedCrop area fraction */
    float ratio_min, ratio_max; /* RandomResizedCrop aspect ratio */
    float hflip;                /* probability of a horizontal flip */
    char randaugment[64];       /* timm string such as "rand-m9-mstd0.5-inc1", or "none" */
    float label_smoothing;
    float mixup;                /* mixup alpha (0 = off) */
    float cutmix;               /* cutmix alpha (0 = off) */
    float mixup_switch_prob;    /* probability of cutmix when both are on */
    float mixup_prob;           /* probability of applying either per batch */
    float random_erase;         /* RandomErasing probability, 'pixel' mode (0 = off) */
} tf_augment_config;

typedef struct {
    float lr;           /* absolute peak learning rate; 0 = derive from base_lr */
    float base_lr;      /* lr = base_lr * global batch / 256 when lr is 0 */
    float min_lr;       /* end of the cosine */
    float beta1, beta2, eps;
    float weight_decay; /* decoupled; not on 1-D tensors, biases, norms, cls token, pos embedding */
    float layer_decay;  /* layer-wise lr decay (1 = off) */
    float clip_grad;    /* global gradient-norm clip (0 = off) */
    float ema_decay;    /* EMA of the weights after every optimizer step (0 = off) */
} tf_optimizer_config;

typedef struct {
    int epochs;
    float warmup_epochs; /* linear warmup from 0, per iteration */
    int batch;           /* global batch per optimizer step */
    int micro_batch;     /* images per forward/backward on one device; 0 = batch / world size */
} tf_schedule_config;

typedef enum { TF_DEVICE_AUTO = 0, TF_DEVICE_CPU, TF_DEVICE_CUDA } tf_device;

typedef struct {
    unsigned long long seed;
    tf_device device;
    int threads;          /* CPU backend threads; 0 = all cores */
    int log_every;        /* optimizer steps between log lines */
    int eval_every;       /* epochs between evaluations (0 = only at the end) */
    int ckpt_every;       /* optimizer steps between checkpoints (0 = only at epoch ends) */
    int keep_checkpoints; /* step checkpoints kept */
    int max_bad_steps;    /* consecutive non-finite steps that stop the run */
} tf_run_config;

typedef struct {
    tf_model_config model;
    tf_data_config data;
    tf_augment_config augment;
    tf_optimizer_config optimizer;
    tf_schedule_config schedule;
    tf_run_config run;
} tf_config;

/* Fills every field with its default (the MAE recipe for B/16). */
void config_defaults(tf_config *config);

/* Reads a YAML file over the current values. Errors name the file, the line and the key. */
tf_status config_load_file(tf_config *config, const char *path);

/* Applies one "section.key=value" override; errors name the override. */
tf_status config_set(tf_config *config, const char *assignment);

/* Checks ranges that involve several keys (dim % heads, img_size % patch, ...) and fills the
 * derived fields (model.n_norm). Call once after the file and the overrides. */
tf_status config_finalize(tf_config *config);

/* n_norm of every Pattention = its token count (n_attn or n_ffn), as for a model created with
 * these counts; growth may keep the old values instead (vision/scale.h). */
void config_fill_n_norm(tf_model_config *model);

/* Sets the model keys of a named preset: b16, b16_pm, l16, l16_pm. */
tf_status config_apply_model_preset(tf_model_config *model, const char *preset);

/* Writes the whole configuration as YAML that config_load_file() reads back. */
void config_print(const tf_config *config, FILE *file);

#endif
