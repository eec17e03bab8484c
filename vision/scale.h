/* Progressive scaling (DESIGN.md section 4): a trained model grows by appending parameter tokens
 * to every Pattention, K' = [K; K_new], V' = [V; V_new] (Q, K, V, O to the new attention count,
 * the FFN to the new FFN count), and its training state grows with it. Pure functions over host
 * arrays and tf_checkpoint; `tokenformer scale` (vision/cmd_scale.c) does the files.
 *
 * Default, exact: K_new = 0, V_new ~ N(0, value init std), n_norm unchanged. GELU(0) = 0 and the
 * row norm of A = X K'^T is that of X K^T, so the grown model computes the same function. The
 * paper's runs (random keys N(0, 0.02), n_norm = the new count) are an option that changes it.
 *
 * Every new row is drawn from its own stream, tf_rng_make(seed, TF_RNG_GROWTH, tensor index, row
 * index), with the tensor's index in the parameter table (the same before and after growth) and
 * the row's absolute index in the grown tensor. So a row's values do not depend on the size it was
 * grown from: growing 768 -> 896 -> 1024 gives bit for bit what 768 -> 1024 gives (same seed). */
#ifndef TF_VISION_SCALE_H
#define TF_VISION_SCALE_H

#include "common/config.h"
#include "common/error.h"
#include "vision/checkpoint.h"
#include "vision/params.h"

#include <stdbool.h>
#include <stdint.h>

/* The largest token count a model may grow to (the config reader's limit for n_attn and n_ffn). */
enum { TF_SCALE_MAX_TOKENS = 1 << 20 };

typedef enum { TF_SCALE_KEYS_ZERO, TF_SCALE_KEYS_RANDOM } tf_scale_key_init;
typedef enum { TF_SCALE_NORM_FIXED, TF_SCALE_NORM_CURRENT } tf_scale_norm;

typedef struct {
    int n_attn, n_ffn;          /* the token counts after growth */
    tf_scale_key_init key_init; /* new key rows: 0, or N(0, 0.02) as the key init */
    tf_scale_norm norm;         /* n_norm: kept, or the new token count */
    uint64_t seed;              /* of the new rows' streams; below 2^53 (kept as a JSON number) */
} tf_scale_options;

/* "zero" / "random", "fixed" / "current": the names on the command line and in growth_history. */
const char *scale_key_init_name(tf_scale_key_init key_init);
const char *scale_norm_name(tf_scale_norm norm);

/* True for zero keys with fixed n_norm: the only growth that keeps the model's function. */
bool scale_preserves_function(const tf_scale_options *options);

/* The token counts of --factor: round(n * factor) for both. The counts must grow (checked by
 * scale_check_sizes). */
tf_status scale_factor_sizes(const tf_model_config *config, double factor, int *n_attn, int *n_ffn);

/* Both counts must be larger than the model's (sizes only grow) and at most TF_SCALE_MAX_TOKENS;
 * source names the checkpoint in the error. */
tf_status scale_check_sizes(const tf_model_config *config, int n_attn, int n_ffn, const char *source);

/* The grown model's config: the new counts, and n_norm kept or set to them. */
void scale_config(const tf_model_config *from, const tf_scale_options *options, tf_model_config *to);

/* Grows parameters (host fp32) from layout `from` to layout `to` (built from the grown config):
 * every tensor copied, Pattention token tensors extended with new rows as the header says.
 * The layouts must describe the same model at two token counts. */
tf_status scale_params(const tf_param_layout *from, const float *params, const tf_param_layout *to,
                       const tf_scale_options *options, float *grown);

/* Grows one set of the training state (AdamW m or v, or the EMA of the weights): old rows as they
 * were; new rows 0 when new_rows is NULL (the moments: a new row has no gradient history), else
 * copied from new_rows in the grown layout (pass the grown weights for the EMA, so that it starts
 * equal to the model on the new rows). */
tf_status scale_state_set(const tf_param_layout *from, const float *state, const tf_param_layout *to,
                          const float *new_rows, float *grown);

/* growth_history (a JSON array) with one entry appended:
 *   {"from": [n_attn, n_ffn], "to": [n_attn, n_ffn], "key_init": "zero", "norm": "fixed",
 *    "seed": S, "step": N, "time": "2025-01-31T12:00:00Z"}
 * "step" is the source checkpoint's "step" metadata (a number; left out when source_step is NULL),
 * "time" the UTC time of unix_time. *out is malloc'd. source names the checkpoint in errors. */
tf_status scale_history_append(const char *history, const tf_model_config *from,
                               const tf_scale_options *options, const char *source_step, int64_t unix_time,
                               const char *source, char **out);

/* The grown checkpoint: config, layout, parameters and class names of `in` grown by options, and
 * its growth history with this step appended (source_step and unix_time as above). *out is
 * filled on success, to be released with checkpoint_free(). source names `in` in errors. */
tf_status scale_checkpoint(const tf_checkpoint *in, const tf_scale_options *options, const char *source_step,
                           int64_t unix_time, const char *source, tf_checkpoint *out);

#endif
