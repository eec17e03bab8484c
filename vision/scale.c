/* Growth of a model and its training state by parameter tokens (see scale.h).
 *
 * A Pattention token tensor is [n, dim], row-major, so its n old rows are the first n * dim
 * elements of the grown tensor and the new rows follow them: growth is one copy per tensor plus
 * the new rows. Every other tensor is copied as it is. */
#include "vision/scale.h"

#include "common/config.h"
#include "common/rng.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *scale_key_init_name(tf_scale_key_init key_init) {
    return key_init == TF_SCALE_KEYS_RANDOM ? "random" : "zero";
}

const char *scale_norm_name(tf_scale_norm norm) {
    return norm == TF_SCALE_NORM_CURRENT ? "current" : "fixed";
}

bool scale_preserves_function(const tf_scale_options *options) {
    return options->key_init == TF_SCALE_KEYS_ZERO && options->norm == TF_SCALE_NORM_FIXED;
}

/* ---- sizes and config ------------------------------------------------------------------------ */

tf_status scale_factor_sizes(const tf_model_config *config, double factor, int *n_attn, int *n_ffn) {
    /* Beyond this bound the product cannot be a valid count anyway; it keeps the cast defined. */
    if (!(factor > 0.0) || factor * config->n_attn > TF_SCALE_MAX_TOKENS ||
        factor * config->n_ffn > TF_SCALE_MAX_TOKENS)
        return tf_fail(TF_ERR_USAGE,
                       "--factor %g: the token counts %d and %d would be %.0f and %.0f, outside 1..%d",
                       factor, config->n_attn, config->n_ffn, factor * config->n_attn, factor * config->n_ffn,
                       TF_SCALE_MAX_TOKENS);
    *n_attn = (int)(config->n_attn * factor + 0.5);
    *n_ffn = (int)(config->n_ffn * factor + 0.5);
    return TF_OK;
}

/* Which count fails to grow, for the message. */
static const char *not_growing(const tf_model_config *config, int n_attn, int n_ffn) {
    if (n_attn <= config->n_attn && n_ffn <= config->n_ffn) return "either count";
    return n_attn <= config->n_attn ? "the attention tokens" : "the FFN tokens";
}

tf_status scale_check_sizes(const tf_model_config *config, int n_attn, int n_ffn, const char *source) {
    if (n_attn <= config->n_attn || n_ffn <= config->n_ffn)
        return tf_fail(
            TF_ERR_USAGE,
            "%s has %d attention and %d FFN tokens; %d and %d would not grow %s: sizes may only grow "
            "(each new count must be larger than the current one)",
            source, config->n_attn, config->n_ffn, n_attn, n_ffn, not_growing(config, n_attn, n_ffn));
    if (n_attn > TF_SCALE_MAX_TOKENS || n_ffn > TF_SCALE_MAX_TOKENS)
        return tf_fail(TF_ERR_USAGE, "token counts %d and %d: at most %d are allowed", n_attn, n_ffn,
                       TF_SCALE_MAX_TOKENS);
    return TF_OK;
}

void scale_config(const tf_model_config *from, const tf_scale_options *options, tf_model_config *to) {
    *to = *from;
    to->n_attn = options->n_attn;
    to->n_ffn = options->n_ffn;
    if (options->norm == TF_SCALE_NORM_CURRENT) config_fill_n_norm(to);
}

/* ---- tensors --------------------------------------------------------------------------------- */

/* `to` must be `from` with more rows in Pattention token tensors and nothing else changed: the
 * copies below rely on it. */
static tf_status check_grown_layout(const tf_param_layout *from, const tf_param_layout *to) {
    if (from->count != to->count)
        return tf_fail(TF_ERR_RUNTIME, "growth: the layouts hold %d and %d tensors", from->count, to->count);
    for (int i = 0; i < from->count; i++) {
        const tf_tensor_info *a = &from->tensors[i], *b = &to->tensors[i];
        bool same = strcmp(a->name, b->name) == 0 && a->ndim == b->ndim;
        for (int d = 0; same && d < a->ndim; d++) {
            bool grown_rows = d == 0 && a->block >= 0 && b->shape[0] >= a->shape[0];
            same = a->shape[d] == b->shape[d] || grown_rows;
        }
        if (!same)
            return tf_fail(TF_ERR_RUNTIME,
                           "growth: tensor %d is '%s' before and '%s' after, with other shapes", i, a->name,
                           b->name);
    }
    return TF_OK;
}

static size_t row_width(const tf_tensor_info *tensor) {
    return tensor->count / (size_t)tensor->shape[0];
}

/* New rows of a token tensor, each from its own stream (tensor index, absolute row). std 0:
 * exact zeros (std * normal could give -0.0). */
static void draw_new_rows(const tf_tensor_info *from, const tf_tensor_info *to, uint64_t tensor_index,
                          float std, uint64_t seed, float *grown) {
    size_t width = row_width(to);
    float *first_new = grown + to->offset + from->count;
    if (std == 0.0f) {
        memset(first_new, 0, (to->count - from->count) * sizeof *first_new);
        return;
    }
    for (int64_t row = from->shape[0]; row < to->shape[0]; row++) {
        float *values = grown + to->offset + (size_t)row * width;
        tf_rng rng = tf_rng_make(seed, TF_RNG_GROWTH, tensor_index, (uint64_t)row);
        for (size_t j = 0; j < width; j++)
            values[j] = (float)(std * tf_rng_normal(&rng));
    }
}

tf_status scale_params(const tf_param_layout *from, const float *params, const tf_param_layout *to,
                       const tf_scale_options *options, float *grown) {
    TF_TRY(check_grown_layout(from, to));
    for (int i = 0; i < to->count; i++) {
        const tf_tensor_info *before = &from->tensors[i], *after = &to->tensors[i];
        memcpy(grown + after->offset, params + before->offset, before->count * sizeof *grown);
        if (after->count == before->count) continue;
        /* The layout's init std is DESIGN.md's: 0.02 for keys, 2 / (depth sqrt(dim)) for values. */
        bool zero = after->is_key && options->key_init == TF_SCALE_KEYS_ZERO;
        draw_new_rows(before, after, (uint64_t)i, zero ? 0.0f : after->init_std, options->seed, grown);
    }
    return TF_OK;
}

tf_status scale_state_set(const tf_param_layout *from, const float *state, const tf_param_layout *to,
                          const float *new_rows, float *grown) {
    TF_TRY(check_grown_layout(from, to));
    for (int i = 0; i < to->count; i++) {
        const tf_tensor_info *before = &from->tensors[i], *after = &to->tensors[i];
        memcpy(grown + after->offset, state + before->offset, before->count * sizeof *grown);
        size_t added = after->count - before->count, first = after->offset + before->count;
        if (new_rows)
            memcpy(grown + first, new_rows + first, added * sizeof *grown);
        else
            memset(grown + first, 0, added * sizeof *grown);
    }
    return TF_OK;
}

/* ---- growth history -------------------------------------------------------------------------- */

static cJSON *count_pair(int n_attn, int n_ffn) {
    int pair[2] = {n_attn, n_ffn};
    return cJSON_CreateIntArray(pair, 2);
}

/* The step as a JSON number when it is an integer, else as the text it is. */
static cJSON *step_item(const char *source_step) {
    char *end;
    errno = 0;
    long long step = strtoll(source_step, &end, 10);
    if (errno || end == source_step || *end) return cJSON_CreateString(source_step);
    return cJSON_CreateNumber((double)step);
}

static cJSON *history_entry(const tf_model_config *from, const tf_scale_options *options,
                            const char *source_step, int64_t unix_time) {
    char when[32] = "";
    time_t seconds = (time_t)unix_time;
    struct tm utc;
    if (gmtime_r(&seconds, &utc)) strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &utc);
    cJSON *entry = cJSON_CreateObject();
    cJSON_AddItemToObject(entry, "from", count_pair(from->n_attn, from->n_ffn));
    cJSON_AddItemToObject(entry, "to", count_pair(options->n_attn, options->n_ffn));
    cJSON_AddStringToObject(entry, "key_init", scale_key_init_name(options->key_init));
    cJSON_AddStringToObject(entry, "norm", scale_norm_name(options->norm));
    cJSON_AddNumberToObject(entry, "seed", (double)options->seed);
    if (source_step) cJSON_AddItemToObject(entry, "step", step_item(source_step));
    cJSON_AddStringToObject(entry, "time", when);
    return entry;
}

tf_status scale_history_append(const char *history, const tf_model_config *from,
                               const tf_scale_options *options, const char *source_step, int64_t unix_time,
                               const char *source, char **out) {
    *out = NULL;
    cJSON *array = cJSON_Parse(history ? history : "[]");
    if (!cJSON_IsArray(array)) {
        cJSON_Delete(array);
        return tf_fail(TF_ERR_RUNTIME, "%s: metadata 'growth_history' is not a JSON array", source);
    }
    cJSON_AddItemToArray(array, history_entry(from, options, source_step, unix_time));
    char *text = cJSON_PrintUnformatted(array);
    cJSON_Delete(array);
    *out = text ? strdup(text) : NULL; /* the caller frees with free(), cJSON's allocator may differ */
    cJSON_free(text);
    if (!*out) return tf_fail(TF_ERR_RUNTIME, "out of memory for the growth history of %s", source);
    return TF_OK;
}

/* ---- a whole checkpoint ---------------------------------------------------------------------- */

static tf_status grow_checkpoint(const tf_checkpoint *in, const tf_scale_options *options,
                                 const char *source_step, int64_t unix_time, const char *source,
                                 tf_checkpoint *out) {
    TF_TRY(scale_check_sizes(&in->config, options->n_attn, options->n_ffn, source));
    scale_config(&in->config, options, &out->config);
    TF_TRY(param_layout_build(&out->layout, &out->config));
    out->params = malloc(out->layout.total * sizeof *out->params);
    if (!out->params)
        return tf_fail(TF_ERR_RUNTIME, "out of memory for the %zu parameters of the grown %s",
                       out->layout.total, source);
    TF_TRY(scale_params(&in->layout, in->params, &out->layout, options, out->params));
    TF_TRY(class_names_copy(&out->classes, in->classes.count, in->classes.names));
    out->crop_pct = in->crop_pct;
    return scale_history_append(in->growth_history, &in->config, options, source_step, unix_time, source,
                                &out->growth_history);
}

tf_status scale_checkpoint(const tf_checkpoint *in, const tf_scale_options *options, const char *source_step,
                           int64_t unix_time, const char *source, tf_checkpoint *out) {
    memset(out, 0, sizeof *out);
    tf_status status = grow_checkpoint(in, options, source_step, unix_time, source, out);
    if (status != TF_OK) checkpoint_free(out);
    return status;
}
