/* The model's buffers and its passes (see model.h): memory is planned once from the config and
 * the largest batch, then the layers of embed.c, block.c and head.c run in order. */
#include "vision/layers.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

const float tf_imagenet_mean[3] = {0.485f, 0.456f, 0.406f};
const float tf_imagenet_std[3] = {0.229f, 0.224f, 0.225f};

/* ---- memory plan ---------------------------------------------------------------------------- */

/* Hands out aligned pieces of an arena. Run once with base 0 to measure, then on the real base. */
typedef struct {
    uintptr_t base;
    size_t used;
    size_t element_size;
} arena;

static void *arena_take(arena *arena, size_t elements) {
    size_t offset = (arena->used + 255) / 256 * 256; /* 256-byte alignment suits vector loads and cuBLASLt */
    arena->used = offset + elements * arena->element_size;
    return (void *)(arena->base + offset);
}

/* What one block keeps for backward (with training: one set per block; without: one set in all). */
static void plan_block_cache(tf_block_cache *cache, const tf_model_config *config, size_t rows, arena *compute,
                             arena *master) {
    size_t dim = (size_t)config->dim;
    cache->ln1 = arena_take(compute, rows * dim);
    cache->ln1_rstd = arena_take(master, rows);
    for (int which = 0; which < TF_PATTENTIONS_PER_BLOCK; which++) {
        size_t n = (size_t)(which == TF_PATT_FFN ? config->n_ffn : config->n_attn);
        cache->patt[which].scores = arena_take(compute, rows * n);
        cache->patt[which].row_norm = arena_take(master, rows);
    }
    cache->q = arena_take(compute, rows * dim);
    cache->k = arena_take(compute, rows * dim);
    cache->v = arena_take(compute, rows * dim);
    cache->attention = arena_take(compute, rows * dim);
    cache->attention_lse = arena_take(master, rows * (size_t)config->heads);
    cache->ln2 = arena_take(compute, rows * dim);
    cache->ln2_rstd = arena_take(master, rows);
}

/* Backward's scratch buffers; only with training. */
static void plan_backward(tf_model *model, size_t rows, size_t patch_rows, size_t max_tokens, arena *compute) {
    const tf_model_config *config = &model->config;
    size_t batch = (size_t)model->max_batch, dim = (size_t)config->dim;
    model->d_residual = arena_take(compute, rows * dim);
    model->d_branch = arena_take(compute, rows * dim);
    model->d_ln = arena_take(compute, rows * dim);
    model->d_q = arena_take(compute, rows * dim);
    model->d_k = arena_take(compute, rows * dim);
    model->d_v = arena_take(compute, rows * dim);
    model->d_attention = arena_take(compute, rows * dim);
    model->d_scores = arena_take(compute, rows * max_tokens);
    model->d_pooled = arena_take(compute, batch * dim);
    model->head_xhat = arena_take(compute, batch * dim);
    model->d_head_ln = arena_take(compute, batch * dim);
    model->d_logits = arena_take(compute, batch * (size_t)config->classes);
    model->d_patch_tokens = arena_take(compute, patch_rows * dim);
}

static void plan_buffers(tf_model *model, arena *compute, arena *master) {
    const tf_model_config *config = &model->config;
    size_t batch = (size_t)model->max_batch, dim = (size_t)config->dim;
    size_t rows = batch * (size_t)model->tokens, patch_rows = batch * (size_t)model->patches;
    size_t image = (size_t)config->channels * config->img_size * config->img_size;
    size_t patch_size = (size_t)config->channels * config->patch * config->patch;
    size_t max_tokens = (size_t)(config->n_attn > config->n_ffn ? config->n_attn : config->n_ffn);
    size_t probs_width = 3 * (size_t)config->n_attn > max_tokens ? 3 * (size_t)config->n_attn : max_tokens;

    /* uint8 pixels share the master arena: its element size only matters for the other buffers. */
    size_t master_element = master->element_size;
    master->element_size = 1;
    model->pixels = arena_take(master, batch * image);
    master->element_size = master_element;

    model->images = arena_take(compute, batch * image);
    model->patch_rows = arena_take(compute, patch_rows * patch_size);
    model->patch_tokens = arena_take(compute, patch_rows * dim);
    model->residual = arena_take(master, rows * dim);
    model->stream = arena_take(compute, rows * dim);
    model->stream_variance = arena_take(master, rows);
    for (int l = 0; l < config->depth; l++)
        for (int which = 0; which < TF_PATTENTIONS_PER_BLOCK; which++) {
            size_t count = model->layout.tensors[model->layout.keys[l][which]].count;
            model->centered_keys[l][which] = which == TF_PATT_O ? NULL : arena_take(compute, count);
        }
    for (int l = 0; l < config->depth; l++) {
        if (model->training || l == 0)
            plan_block_cache(&model->blocks[l], config, rows, compute, master);
        else
            model->blocks[l] = model->blocks[0];
    }
    model->branch = arena_take(compute, rows * dim);
    model->probs = arena_take(compute, rows * probs_width); /* Q's, K's and V's S side by side (block.c) */
    model->pooled = arena_take(master, batch * dim);
    model->head_ln = arena_take(compute, batch * dim);
    model->head_ln_rstd = arena_take(master, batch);
    model->logits = arena_take(master, batch * (size_t)config->classes);
    model->drop_scales = arena_take(master, (size_t)config->depth * 2 * batch);
    model->targets = arena_take(master, batch * (size_t)config->classes);
    model->losses = arena_take(master, batch);
    if (model->training) plan_backward(model, rows, patch_rows, max_tokens, compute);
}

static tf_status check_model_config(const tf_model_config *config, int max_batch) {
    if (config->channels != 3)
        return tf_fail(TF_ERR_USAGE, "model.channels is %d, but images are loaded as RGB: use 3", config->channels);
    if (config->depth < 1 || config->depth > TF_MAX_DEPTH)
        return tf_fail(TF_ERR_USAGE, "model.depth %d is outside [1, %d]", config->depth, TF_MAX_DEPTH);
    if (config->heads < 1 || config->dim % config->heads != 0)
        return tf_fail(TF_ERR_USAGE, "model.dim %d is not a multiple of model.heads %d", config->dim, config->heads);
    if (config->patch < 1 || config->img_size % config->patch != 0)
        return tf_fail(TF_ERR_USAGE, "model.img_size %d is not a multiple of model.patch %d", config->img_size,
                       config->patch);
    if (max_batch < 1) return tf_fail(TF_ERR_USAGE, "batch size %d must be at least 1", max_batch);
    return TF_OK;
}

tf_status model_create(tf_model *model, const tf_model_config *config, const tf_backend *backend, int max_batch,
                       bool training) {
    memset(model, 0, sizeof *model);
    TF_TRY(check_model_config(config, max_batch));
    model->config = *config;
    model->backend = backend;
    model->max_batch = max_batch;
    model->params_generation = 1; /* no proof yet: proof_generation 0 */
    model->training = training;
    model->patches = (config->img_size / config->patch) * (config->img_size / config->patch);
    model->tokens = 1 + model->patches;
    TF_TRY(param_layout_build(&model->layout, config));

    model->blocks = calloc((size_t)config->depth, sizeof *model->blocks);
    model->host_losses = calloc((size_t)max_batch, sizeof *model->host_losses);
    if (!model->blocks || !model->host_losses) return tf_fail(TF_ERR_RUNTIME, "out of memory for the model tables");

    size_t master_size = tf_dtype_size(backend->master_dtype), compute_size = tf_dtype_size(backend->compute_dtype);
    size_t total = model->layout.total;
    TF_TRY(backend->alloc(&model->params, total * master_size, "parameters"));
    if (training) TF_TRY(backend->alloc(&model->grads, total * master_size, "gradients"));
    if (backend->compute_dtype == backend->master_dtype)
        model->params_compute = model->params;
    else
        TF_TRY(backend->alloc(&model->params_compute, total * compute_size, "parameters (compute copy)"));

    arena compute = {0, 0, compute_size}, master = {0, 0, master_size};
    plan_buffers(model, &compute, &master);
    TF_TRY(backend->alloc(&model->compute_arena, compute.used, "activations"));
    TF_TRY(backend->alloc(&model->master_arena, master.used, "activations (master dtype)"));
    model->compute_arena_bytes = compute.used;
    model->master_arena_bytes = master.used;
    compute = (arena){(uintptr_t)model->compute_arena, 0, compute_size};
    master = (arena){(uintptr_t)model->master_arena, 0, master_size};
    plan_buffers(model, &compute, &master);
    return TF_OK;
}

void model_destroy(tf_model *model) {
    const tf_backend *backend = model->backend;
    if (backend) {
        if (model->params_compute != model->params) backend->free(model->params_compute);
        backend->free(model->params);
        if (model->grads) backend->free(model->grads);
        backend->free(model->compute_arena);
        backend->free(model->master_arena);
    }
    free(model->blocks);
    free(model->host_losses);
    param_layout_free(&model->layout);
    memset(model, 0, sizeof *model);
}

size_t model_memory_bytes(const tf_model *model) {
    const tf_backend *backend = model->backend;
    size_t total = model->layout.total;
    size_t bytes = (model->grads ? 2 : 1) * total * tf_dtype_size(backend->master_dtype);
    if (model->params_compute != model->params) bytes += total * tf_dtype_size(backend->compute_dtype);
    return bytes + model->compute_arena_bytes + model->master_arena_bytes;
}

/* ---- parameters ----------------------------------------------------------------------------- */

const void *model_param(const tf_model *model, int tensor) {
    size_t offset = model->layout.tensors[tensor].offset * tf_dtype_size(model->backend->compute_dtype);
    return (const char *)model->params_compute + offset;
}

const void *model_master_param(const tf_model *model, int tensor) {
    size_t offset = model->layout.tensors[tensor].offset * tf_dtype_size(model->backend->master_dtype);
    return (const char *)model->params + offset;
}

void *model_grad(const tf_model *model, int tensor) {
    size_t offset = model->layout.tensors[tensor].offset * tf_dtype_size(model->backend->master_dtype);
    return (char *)model->grads + offset;
}

tf_status model_init_params(tf_model *model, uint64_t seed) {
    float *params = malloc(model->layout.total * sizeof *params);
    if (!params) return tf_fail(TF_ERR_RUNTIME, "out of host memory for %zu parameters", model->layout.total);
    param_init(&model->layout, params, seed);
    model_set_params(model, params);
    free(params);
    return TF_OK;
}

void model_set_params(tf_model *model, const float *params) {
    model->backend->upload(model->params, model->backend->master_dtype, params, model->layout.total);
    model_refresh_compute_params(model);
}

void model_get_params(const tf_model *model, float *params) {
    model->backend->download(params, model->params, model->backend->master_dtype, model->layout.total);
}

void model_get_grads(const tf_model *model, float *grads) {
    model->backend->download(grads, model->grads, model->backend->master_dtype, model->layout.total);
}

void model_refresh_compute_params(tf_model *model) {
    const tf_backend *backend = model->backend;
    if (model->params_compute != model->params)
        backend->convert(model->params_compute, backend->compute_dtype, model->params, backend->master_dtype,
                         model->layout.total);
    model_params_changed(model);
}

void model_params_changed(tf_model *model) {
    model->params_generation++;
}

void model_swap_params(tf_model *model, void **other) {
    void *current = model->params;
    model->params = *other;
    *other = current;
    if (model->params_compute == current) model->params_compute = model->params; /* one buffer (the CPU) */
    model_refresh_compute_params(model); /* converts where there are two; marks the change */
}

void model_zero_grads(tf_model *model) {
    model->backend->zero(model->grads, model->layout.total * tf_dtype_size(model->backend->master_dtype));
}

/* ---- profiling ------------------------------------------------------------------------------ */

void model_profile_start(tf_model *model, tf_op_profile *profile) {
    memset(profile, 0, sizeof *profile);
    model->profile = profile;
    model_op_class(model, TF_OP_OTHER);
}

tf_status model_profile_collect(tf_model *model) {
    tf_op_profile *profile = model->profile;
    if (!profile) return TF_OK;
    /* A last mark closes the interval of the last class. */
    if (profile->marks < TF_PROFILE_MARKS) {
        model->backend->profile_mark(profile->marks);
        profile->mark_class[profile->marks++] = TF_OP_OTHER;
    }
    TF_TRY(model->backend->synchronize());
    for (int i = 1; i < profile->marks; i++)
        profile->ms[profile->mark_class[i - 1]] += model->backend->profile_elapsed_ms(i - 1, i);
    model->profile = NULL;
    return model->backend->synchronize();
}

/* ---- passes --------------------------------------------------------------------------------- */

void model_drop_scales(const tf_model_config *config, int batch, tf_rng *rng, float *scales) {
    for (int block = 0; block < config->depth; block++) {
        double rate = config->depth > 1 ? config->drop_path * (double)block / (config->depth - 1) : 0.0;
        float keep_scale = rate < 1.0 ? (float)(1.0 / (1.0 - rate)) : 0.0f;
        for (int branch = 0; branch < 2; branch++)
            for (int b = 0; b < batch; b++) {
                float *scale = &scales[((size_t)block * 2 + (size_t)branch) * (size_t)batch + (size_t)b];
                *scale = rate > 0.0 && tf_rng_uniform(rng) < rate ? 0.0f : keep_scale;
            }
    }
}

void model_load_pixels(tf_model *model, const uint8_t *pixels, int batch) {
    const tf_backend *backend = model->backend;
    const tf_model_config *config = &model->config;
    size_t image = (size_t)config->channels * config->img_size * config->img_size;
    model_op_class(model, TF_OP_OTHER);
    backend->upload_bytes(model->pixels, pixels, (size_t)batch * image);
    backend->images_normalize(model->images, model->pixels, batch, config->channels, config->img_size,
                              tf_imagenet_mean, tf_imagenet_std);
}

void model_forward(tf_model *model, int batch, const float *drop_scales) {
    const tf_backend *backend = model->backend;
    const tf_model_config *config = &model->config;
    const void *scales = NULL;
    if (drop_scales) {
        backend->upload(model->drop_scales, backend->master_dtype, drop_scales, (size_t)config->depth * 2 * batch);
        scales = model->drop_scales;
    }
    embed_forward(model, batch, model->residual, backend->master_dtype);
    for (int block = 0; block < config->depth; block++) block_forward(model, block, batch, scales);
    head_forward(model, batch, model->residual, backend->master_dtype);
    /* Remembered for backward: whether this forward dropped paths. */
    model->forward_dropped = scales != NULL;
    model->forward_kept = true;
}

/* The centred key tokens that block_infer reads, from the master parameters as they are now. */
static void center_keys(tf_model *model) {
    const tf_param_layout *layout = &model->layout;
    int dim = model->config.dim, count = 0;
    void *out[TF_MAX_DEPTH * TF_PATTENTIONS_PER_BLOCK];
    const void *keys[TF_MAX_DEPTH * TF_PATTENTIONS_PER_BLOCK];
    int rows[TF_MAX_DEPTH * TF_PATTENTIONS_PER_BLOCK];
    for (int block = 0; block < model->config.depth; block++)
        for (int which = 0; which < TF_PATTENTIONS_PER_BLOCK; which++) {
            if (!model->centered_keys[block][which]) continue;
            int tensor = layout->keys[block][which];
            out[count] = model->centered_keys[block][which];
            keys[count] = model_master_param(model, tensor);
            rows[count++] = (int)(layout->tensors[tensor].count / (size_t)dim);
        }
    model->backend->center_rows(out, keys, rows, count, dim);
}

void model_infer(tf_model *model, int batch) {
    const tf_backend *backend = model->backend;
    model_op_class(model, TF_OP_OTHER);
    center_keys(model);
    variance_proof_update(model);
    embed_forward(model, batch, model->stream, backend->compute_dtype);
    int last = model->config.depth - 1;
    for (int block = 0; block < last; block++) block_infer(model, block, batch);
    if (model->config.pool == TF_POOL_AVG) {
        block_infer_pooled(model, last, batch);
        head_logits(model, batch);
    } else {
        block_infer(model, last, batch);
        head_forward(model, batch, model->stream, backend->compute_dtype);
    }
    model->forward_kept = false;
}

static tf_status cross_entropy(tf_model *model, const float *targets, int batch, float loss_scale, bool backward,
                               float *losses) {
    const tf_backend *backend = model->backend;
    int classes = model->config.classes;
    model_op_class(model, TF_OP_OTHER);
    backend->upload(model->targets, backend->master_dtype, targets, (size_t)batch * classes);
    backend->cross_entropy_forward_backward(model->losses, backward ? model->d_logits : NULL, model->logits,
                                            model->targets, batch, classes, loss_scale);
    backend->download(losses, model->losses, backend->master_dtype, (size_t)batch);
    return backend->synchronize();
}

void model_set_gradient_hook(tf_model *model, void (*ready)(void *context, size_t offset, size_t count),
                             void *context) {
    model->gradient_ready = ready;
    model->gradient_ready_context = context;
}

/* The gradient range of tensors first..last (layout order, contiguous) is final. */
static void gradients_ready(tf_model *model, int first, int last) {
    if (!model->gradient_ready) return;
    const tf_tensor_info *begin = &model->layout.tensors[first], *end = &model->layout.tensors[last];
    model->gradient_ready(model->gradient_ready_context, begin->offset, end->offset + end->count - begin->offset);
}

tf_status model_backward(tf_model *model, const float *targets, int batch, float loss_scale, double *mean_loss) {
    if (!model->training) return tf_fail(TF_ERR_RUNTIME, "model_backward on a model made without training");
    if (!model->forward_kept) return tf_fail(TF_ERR_RUNTIME, "model_backward needs model_forward before it");
    TF_TRY(cross_entropy(model, targets, batch, loss_scale, true, model->host_losses));
    double sum = 0.0;
    for (int b = 0; b < batch; b++) sum += model->host_losses[b];
    *mean_loss = sum / batch;

    const void *scales = model->forward_dropped ? model->drop_scales : NULL;
    const tf_param_layout *layout = &model->layout;
    head_backward(model, batch);
    gradients_ready(model, layout->fc_norm_weight, layout->count - 1);
    for (int block = model->config.depth - 1; block >= 0; block--) {
        block_backward(model, block, batch, scales);
        gradients_ready(model, layout->keys[block][0], layout->values[block][TF_PATTENTIONS_PER_BLOCK - 1]);
    }
    embed_backward(model, batch);
    gradients_ready(model, 0, layout->keys[0][0] - 1);
    return model->backend->synchronize();
}

tf_status model_loss(tf_model *model, const float *targets, int batch, float *losses) {
    return cross_entropy(model, targets, batch, 1.0f, false, losses);
}

tf_status model_logits(tf_model *model, float *logits, int batch) {
    model->backend->download(logits, model->logits, model->backend->master_dtype,
                             (size_t)batch * model->config.classes);
    return model->backend->synchronize();
}
