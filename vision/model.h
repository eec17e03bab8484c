/* The TokenFormer vision transformer (DESIGN.md section 2): patch embedding, cls token and
 * position embedding, pre-norm blocks of five Pattentions and multi-head attention, average pool,
 * fc_norm and a linear head. Forward and backward run through a tf_backend; every buffer is sized
 * from the config and the largest batch at creation, so a step allocates nothing.
 *
 * One training micro-step:
 *   model_load_pixels(model, pixels, batch);                   uint8 batch -> normalised images
 *   (batch-level augmentation such as mixup works on model->images here)
 *   model_forward(model, batch, drop_scales);                  images -> logits
 *   model_backward(model, targets, batch, loss_scale, &loss);  loss, gradients += d loss
 * Evaluation calls model_infer(), the forward pass in its inference form (the same function,
 * computed with fewer passes and without what backward needs), then model_loss() / model_logits(). */
#ifndef TF_VISION_MODEL_H
#define TF_VISION_MODEL_H

#include "common/config.h"
#include "common/error.h"
#include "common/rng.h"
#include "kernels/kernels.h"
#include "vision/params.h"

#include <stdbool.h>
#include <stdint.h>

/* ImageNet statistics (DESIGN.md section 3) that inputs are normalised with, for every data set
 * as timm does: x = (pixel / 255 - mean[c]) / std[c]. */
extern const float tf_imagenet_mean[3];
extern const float tf_imagenet_std[3];

/* LayerNorm epsilon of every norm (blocks and fc_norm), as timm's ViT with MAE's settings. */
#define TF_LAYERNORM_EPS 1e-6f

/* Where a step's time goes (tokenformer bench): each backend operation the model queues belongs
 * to one class; when profiling is on, the model marks every change of class (backend
 * profile_mark) and model_profile_collect() sums the time between marks per class. */
typedef enum {
    TF_OP_PATTENTION_GEMM,
    TF_OP_PATTENTION_NORM,
    TF_OP_ATTENTION,
    TF_OP_LAYERNORM, /* LayerNorms, with their fused residual adds */
    TF_OP_OTHER,     /* input, patch embedding, drop path, pooling, head, loss */
    TF_OP_CLASS_COUNT
} tf_op_class;

typedef struct {
    int marks;
    tf_op_class mark_class[TF_PROFILE_MARKS]; /* the class of the work after each mark */
    double ms[TF_OP_CLASS_COUNT];
} tf_op_profile;

/* What one Pattention keeps from forward for backward: A and its row norms. S = GELU(norm(A)) is
 * recomputed in backward from them (by the row pass that reads A for dA) rather than kept: kept,
 * it would double the Pattention activations, which are most of a step's memory (7.4 GB of B/16
 * at batch 256). */
typedef struct {
    void *scores;   /* compute [rows, n]: A = X K^T */
    void *row_norm; /* master [rows] */
} tf_pattention_cache;

/* What one block keeps from forward for backward. The residual stream itself is not kept: the
 * LayerNorms' backward needs only their outputs (xhat) and rstd. */
typedef struct {
    void *ln1, *ln1_rstd;                      /* LN(x): compute [rows, dim]; rstd master [rows] */
    tf_pattention_cache patt[TF_PATTENTIONS_PER_BLOCK];
    void *q, *k, *v;                           /* compute [rows, dim] */
    void *attention, *attention_lse;           /* softmax attention output; lse master [B, H, T] */
    void *ln2, *ln2_rstd;                      /* LN(x + drop_path(P_o(attention))) */
} tf_block_cache;

typedef struct {
    tf_model_config config;
    tf_param_layout layout;
    const tf_backend *backend;
    int max_batch;
    bool training; /* false: forward only; the blocks share one set of buffers, no gradients */
    int tokens;  /* 1 + patches per image */
    int patches; /* (img_size / patch)^2 */

    /* Parameters: the optimizer's master copy, the compute copy the passes read (the same
     * buffer when the backend's dtypes agree), and gradients (master). */
    void *params;
    void *params_compute;
    void *grads; /* NULL without training */

    /* Forward activations. */
    void *pixels;       /* uint8 [B, C, S, S]: the batch as the loader gives it */
    void *images;       /* compute [B, C, S, S]: normalised */
    void *patch_rows;   /* compute [B * patches, C p p] */
    void *patch_tokens; /* compute [B * patches, dim] */
    void *residual;     /* master [B * tokens, dim]: the residual stream, updated in place by each block */
    void *stream;       /* compute [B * tokens, dim]: the residual stream of the inference form */
    void *stream_variance; /* master [B * tokens]: sigma^2 of the LayerNorm it folds in (block_infer) */
    /* Compute [n, dim]: the key tokens of Q, K, V and the FFN of each block minus each token's
     * mean, which the inference form reads in place of the LayerNorms (block_infer); rewritten by
     * every model_infer from the master parameters. NULL for P_o, whose input is no LayerNorm's. */
    void *centered_keys[TF_MAX_DEPTH][TF_PATTENTIONS_PER_BLOCK];
    /* Per block: the FFN's keys prove eps var(x) invisible in its row norms, and Q's, K's and V's
     * stacked keys bound var(x) by their row norms, so the inference form skips the variance pass
     * of the LayerNorm folded into them (vision/variance_proof.c). Found for the parameters of
     * params_generation, which every change of parameters advances (model_params_changed).
     * read_every_variance: skip none (tests, comparisons). */
    bool ffn_variance_invisible[TF_MAX_DEPTH];
    bool qkv_variance_bounded[TF_MAX_DEPTH];
    double variance_proof_mean_ratio; /* the proofs hold on rows whose mean is within this many sigma */
    bool read_every_variance;
    unsigned long long params_generation, proof_generation;
    tf_block_cache *blocks;
    void *branch;       /* compute [B * tokens, dim]: P_o or FFN output before the residual add */
    void *probs; /* compute [B * tokens, max(3 n_attn, n_ffn)]: S of the Pattention at hand (or of Q, K, V) */
    void *pooled;       /* master [B, dim] */
    void *head_ln, *head_ln_rstd;
    void *head_xhat;    /* compute [B, dim]: fc_norm's normalised input, for its backward (training) */
    void *logits;       /* master [B, classes]: the softmax of bf16 logits would be 1% off */
    void *drop_scales;  /* master [depth, 2, B] */
    void *targets;      /* master [B, classes] */
    void *losses;       /* master [B] */

    /* Backward scratch. */
    void *d_residual;   /* compute [B * tokens, dim] */
    void *d_branch;     /* compute [B * tokens, dim] */
    void *d_ln;         /* compute [B * tokens, dim] */
    void *d_q, *d_k, *d_v, *d_attention;
    void *d_scores;     /* compute [B * tokens, max(n_attn, n_ffn)] */
    void *d_pooled, *d_head_ln;
    void *d_logits;     /* compute [B, classes] */
    void *d_patch_tokens;

    bool forward_dropped; /* the last forward used drop_scales, so backward uses them too */
    bool forward_kept;    /* the last forward was model_forward's, which keeps what backward reads */
    tf_op_profile *profile; /* NULL unless profiling (model_profile_start) */
    /* Called by model_backward() as each range of the gradient buffer becomes final (see
     * model_set_gradient_hook); NULL for none. */
    void (*gradient_ready)(void *context, size_t offset, size_t count);
    void *gradient_ready_context;
    float *host_losses;   /* host [max_batch] */

    /* The two arenas the buffers above are carved from. */
    void *compute_arena, *master_arena;
    size_t compute_arena_bytes, master_arena_bytes;
} tf_model;

/* Allocates parameters, and activations for batches up to max_batch: with training, everything
 * backward needs and the gradients; without, only what one block's forward needs, shared by all
 * blocks. Parameters are zero until model_init_params() or model_set_params(). */
tf_status model_create(tf_model *model, const tf_model_config *config, const tf_backend *backend, int max_batch,
                       bool training);
void model_destroy(tf_model *model);

/* Bytes of backend memory the model holds (parameters, gradients, activations). */
size_t model_memory_bytes(const tf_model *model);

/* DESIGN.md's initialisation from seed (param_init), uploaded. */
tf_status model_init_params(tf_model *model, uint64_t seed);
/* Uploads host fp32 parameters [layout.total] and refreshes the compute copy. */
void model_set_params(tf_model *model, const float *params);
/* Downloads the master parameters (or gradients) as fp32 [layout.total]. */
void model_get_params(const tf_model *model, float *params);
void model_get_grads(const tf_model *model, float *grads);
/* Rewrites the compute copy from the master parameters (after loading or an EMA swap). */
void model_refresh_compute_params(tf_model *model);

/* Every change of the parameters calls this (model_set_params, model_refresh_compute_params,
 * model_swap_params, the optimizer's update): what was derived from the old ones is found again. */
void model_params_changed(tf_model *model);
/* How many variance passes model_infer skips (vision/variance_proof.c), as of its last call: one
 * per block whose FFN keys proved the term invisible, one per block whose Q, K, V keys bound it. */
int model_variance_passes_skipped(const tf_model *model);
/* Exchanges the master parameters with another master buffer of the same size (the EMA weights)
 * and refreshes the compute copy; calling it again swaps back. */
void model_swap_params(tf_model *model, void **other);

void model_zero_grads(tf_model *model);

/* Copies a batch of uint8 CHW images [batch, channels, size, size] from host memory into
 * model->images, normalised with the ImageNet mean and std. Asynchronous (upload_bytes in
 * kernels.h): pixels must stay as they are until a result has been read back (model_logits,
 * model_loss, model_backward) or the backend synchronised. Loading the next batch while the
 * current one's forward pass runs overlaps its copy with that work. model->images is read only by
 * model_forward's first operation, so a training step may load the next batch before its
 * model_backward (the trainer does). */
void model_load_pixels(tf_model *model, const uint8_t *pixels, int batch);

/* Forward pass over model->images. drop_scales: host [depth, 2, batch] per-sample drop-path
 * scales for the attention (0) and FFN (1) branch of each block (model_drop_scales), or NULL for
 * none (evaluation). */
void model_forward(tf_model *model, int batch, const float *drop_scales);

/* The forward pass without drop path, in its inference form: the logits of model_forward(model,
 * batch, NULL) up to rounding, faster, and with nothing kept for backward. Each block's LayerNorms
 * are folded into the Pattentions that read them and the residual stream is a compute buffer
 * (block_infer in vision/block.c says how and why); on the CPU the two forms differ only in the
 * order of floating-point operations. */
void model_infer(tf_model *model, int batch);

/* After model_forward(): soft-target cross-entropy against targets (host [batch, classes], rows
 * sum to 1), then the backward pass, adding (loss_scale * d sum_b loss_b) to the gradients. Returns
 * the mean loss over the batch, or a backend failure. Use loss_scale = 1 / global batch so that
 * accumulated micro-batches give the gradient of the mean loss. */
tf_status model_backward(tf_model *model, const float *targets, int batch, float loss_scale, double *mean_loss);

/* After model_forward() or model_infer(): per-sample losses without backward (evaluation).
 * losses: host [batch]. */
tf_status model_loss(tf_model *model, const float *targets, int batch, float *losses);

/* After model_forward() or model_infer(): host fp32 logits [batch, classes]. */
tf_status model_logits(tf_model *model, float *logits, int batch);

/* Profiling of the passes that follow (into *profile, which the caller owns), and the sum per
 * class of everything marked since the start; waits for the queued work. */
void model_profile_start(tf_model *model, tf_op_profile *profile);
tf_status model_profile_collect(tf_model *model);
static inline const char *tf_op_class_name(tf_op_class op) {
    static const char *const names[TF_OP_CLASS_COUNT] = {"Pattention GEMMs", "Pattention norm", "attention",
                                                         "layer norms", "other"};
    return names[op];
}

/* Asks model_backward() to call ready(context, offset, count) for each range of the gradient
 * buffer (elements) as soon as the backward pass has finished writing it: the head's, then each
 * block's from the last to the first, then the embedding's; together they cover the buffer once.
 * The data-parallel trainer starts each range's all-reduce there, overlapping it with the
 * backward of the blocks below. ready NULL turns it off. */
void model_set_gradient_hook(tf_model *model, void (*ready)(void *context, size_t offset, size_t count),
                             void *context);

/* Draws per-sample drop-path scales for one micro-batch: for block l the rate is
 * drop_path * l / (depth - 1) (timm's linspace); a sample is kept with 1 - rate and then scaled by
 * 1 / (1 - rate). scales: host [depth, 2, batch]. */
void model_drop_scales(const tf_model_config *config, int batch, tf_rng *rng, float *scales);

#endif
