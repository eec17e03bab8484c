/* `tokenformer scale`: grows a trained checkpoint by parameter tokens (vision/scale.h), and with
 * --state its training state file, so that `tokenformer train --init-from OUT --init-state
 * OUT_STATE` continues with the optimizer's moments and the EMA of the old rows.
 *
 * Everything is read and checked before anything is written, so a refused state file leaves no
 * grown checkpoint behind; both writes are atomic (safetensors_write). The state file keeps its
 * "progress" metadata as it was (the optimizer step count survives; train --init-state starts a
 * fresh schedule anyway). */
#include "cli/args.h"
#include "cli/commands.h"
#include "common/safetensors.h"
#include "vision/checkpoint.h"
#include "vision/scale.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The training state file's format, as train/run_dir.c writes it: "adamw.m.<name>",
 * "adamw.v.<name>", optionally "ema.<name>", and metadata "format" and "progress". */
enum { STATE_SETS = 3 };
static const char *const state_prefixes[STATE_SETS] = {"adamw.m.", "adamw.v.", "ema."};

typedef struct {
    const char *checkpoint, *out, *state, *out_state;
    const char *attn_tokens, *ffn_tokens, *factor, *key_init, *norm, *seed;
} scale_arguments;

/* ---- the command line ------------------------------------------------------------------------ */

static tf_status parse_arguments(int argc, char **argv, scale_arguments *arguments) {
    memset(arguments, 0, sizeof *arguments);
    cli_parser parser = cli_parser_make(argc, argv);
    while (cli_more(&parser)) {
        if (cli_value(&parser, "--ckpt", &arguments->checkpoint)) continue;
        if (cli_value(&parser, "--out", &arguments->out)) continue;
        if (cli_value(&parser, "--state", &arguments->state)) continue;
        if (cli_value(&parser, "--out-state", &arguments->out_state)) continue;
        if (cli_value(&parser, "--attn-tokens", &arguments->attn_tokens)) continue;
        if (cli_value(&parser, "--ffn-tokens", &arguments->ffn_tokens)) continue;
        if (cli_value(&parser, "--factor", &arguments->factor)) continue;
        if (cli_value(&parser, "--key-init", &arguments->key_init)) continue;
        if (cli_value(&parser, "--norm", &arguments->norm)) continue;
        if (cli_value(&parser, "--seed", &arguments->seed)) continue;
        cli_unknown(&parser);
    }
    TF_TRY(parser.status);
    if (!arguments->checkpoint || !arguments->out)
        return tf_fail(TF_ERR_USAGE, "--ckpt FILE and --out FILE are required");
    bool counts = arguments->attn_tokens || arguments->ffn_tokens;
    if (counts == !!arguments->factor || (counts && (!arguments->attn_tokens || !arguments->ffn_tokens)))
        return tf_fail(TF_ERR_USAGE, "give either --attn-tokens N and --ffn-tokens M, or --factor F");
    if (!arguments->state != !arguments->out_state)
        return tf_fail(TF_ERR_USAGE,
                       "--state and --out-state go together (the state to grow and where to write it)");
    if (arguments->out_state && strcmp(arguments->out, arguments->out_state) == 0)
        return tf_fail(TF_ERR_USAGE, "--out and --out-state are both %s", arguments->out);
    return TF_OK;
}

static tf_status parse_count(const char *option, const char *text, int *count) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end || value < 1 || value > TF_SCALE_MAX_TOKENS)
        return tf_fail(TF_ERR_USAGE, "%s: expected a token count in 1..%d, got '%s'", option,
                       TF_SCALE_MAX_TOKENS, text);
    *count = (int)value;
    return TF_OK;
}

static tf_status parse_factor(const char *text, double *factor) {
    char *end;
    errno = 0;
    *factor = strtod(text, &end);
    if (errno || end == text || *end || !isfinite(*factor) || *factor <= 0.0)
        return tf_fail(TF_ERR_USAGE, "--factor: expected a positive number, got '%s'", text);
    return TF_OK;
}

/* The seed goes into growth_history as a JSON number, exact only below 2^53. */
static tf_status parse_seed(const char *text, uint64_t *seed) {
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-' || value >= (1ull << 53))
        return tf_fail(TF_ERR_USAGE, "--seed: expected an integer in 0..2^53-1, got '%s'", text);
    *seed = value;
    return TF_OK;
}

static tf_status parse_options(const scale_arguments *arguments, const tf_model_config *config,
                               tf_scale_options *options) {
    *options = (tf_scale_options){.key_init = TF_SCALE_KEYS_ZERO, .norm = TF_SCALE_NORM_FIXED};
    const char *key_init = arguments->key_init ? arguments->key_init : "zero";
    const char *norm = arguments->norm ? arguments->norm : "fixed";
    if (strcmp(key_init, "zero") != 0 && strcmp(key_init, "random") != 0)
        return tf_fail(TF_ERR_USAGE, "--key-init: expected zero or random, got '%s'", key_init);
    if (strcmp(norm, "fixed") != 0 && strcmp(norm, "current") != 0)
        return tf_fail(TF_ERR_USAGE, "--norm: expected fixed or current, got '%s'", norm);
    options->key_init = strcmp(key_init, "random") == 0 ? TF_SCALE_KEYS_RANDOM : TF_SCALE_KEYS_ZERO;
    options->norm = strcmp(norm, "current") == 0 ? TF_SCALE_NORM_CURRENT : TF_SCALE_NORM_FIXED;
    if (arguments->seed) TF_TRY(parse_seed(arguments->seed, &options->seed));
    if (arguments->factor) {
        double factor;
        TF_TRY(parse_factor(arguments->factor, &factor));
        TF_TRY(scale_factor_sizes(config, factor, &options->n_attn, &options->n_ffn));
    } else {
        TF_TRY(parse_count("--attn-tokens", arguments->attn_tokens, &options->n_attn));
        TF_TRY(parse_count("--ffn-tokens", arguments->ffn_tokens, &options->n_ffn));
    }
    return scale_check_sizes(config, options->n_attn, options->n_ffn, arguments->checkpoint);
}

/* ---- the training state file ----------------------------------------------------------------- */

/* The grown state: m, v and (when the file has one) the EMA, in the grown layout. */
typedef struct {
    float *sets[STATE_SETS];
    int set_count;        /* 2 without EMA, 3 with */
    const char *progress; /* the source file's metadata, owned by the open file */
} grown_state;

static bool has_known_prefix(const char *name, const tf_param_layout *layout) {
    for (int set = 0; set < STATE_SETS; set++) {
        size_t length = strlen(state_prefixes[set]);
        if (strncmp(name, state_prefixes[set], length) == 0 && param_layout_find(layout, name + length))
            return true;
    }
    return false;
}

static long long metadata_step(const char *text, bool *found) {
    char *end;
    long long step = text ? strtoll(text, &end, 10) : 0;
    *found = text && end != text && *end == '\0';
    return step;
}

/* A state of another checkpoint (another step of the same run) would pair moments with weights
 * they do not belong to: refused when both files say their step. */
static tf_status check_progress_step(const safetensors_file *state, const char *progress,
                                     const char *checkpoint, const char *checkpoint_step) {
    bool known;
    long long model_step = metadata_step(checkpoint_step, &known);
    cJSON *root = cJSON_Parse(progress);
    const cJSON *step = cJSON_GetObjectItemCaseSensitive(root, "step");
    tf_status status = TF_OK;
    if (!cJSON_IsNumber(step))
        status = tf_fail(TF_ERR_RUNTIME, "%s: metadata 'progress' has no step", state->path);
    else if (known && (long long)step->valuedouble != model_step)
        status = tf_fail(TF_ERR_USAGE,
                         "%s is the training state of step %lld but %s holds the model of step %lld: "
                         "give the pair from one checkpoint",
                         state->path, (long long)step->valuedouble, checkpoint, model_step);
    cJSON_Delete(root);
    return status;
}

/* The file must be a training state of exactly this model: every tensor one of the state sets of
 * the layout (checkpoint_read_params then finds each and checks its shape). */
static tf_status check_state_file(const safetensors_file *state, const tf_param_layout *layout,
                                  const char *checkpoint, const char *checkpoint_step) {
    const char *format = safetensors_metadata(state, "format");
    const char *progress = safetensors_metadata(state, "progress");
    if (!format || strcmp(format, TF_TRAIN_STATE_FORMAT) != 0 || !progress)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s: not a TokenFormer training state file (metadata 'format' should be \"%s\")",
                       state->path, TF_TRAIN_STATE_FORMAT);
    for (size_t i = 0; i < state->n_tensors; i++)
        if (!has_known_prefix(state->tensors[i].name, layout))
            return tf_fail(TF_ERR_RUNTIME, "%s: tensor '%s' does not belong to the model of %s", state->path,
                           state->tensors[i].name, checkpoint);
    return check_progress_step(state, progress, checkpoint, checkpoint_step);
}

static void free_grown_state(grown_state *state) {
    for (int set = 0; set < STATE_SETS; set++)
        free(state->sets[set]);
    memset(state, 0, sizeof *state);
}

/* Reads each set of the state in the source layout and grows it: the moments with new rows 0,
 * the EMA with new rows equal to the grown weights. One source set is held at a time. */
static tf_status grow_state_sets(const safetensors_file *file, const tf_checkpoint *source,
                                 const char *source_path, const tf_checkpoint *grown, grown_state *state) {
    char ema_name[TF_CHECKPOINT_NAME_MAX];
    snprintf(ema_name, sizeof ema_name, "%s%s", state_prefixes[2], source->layout.tensors[0].name);
    state->set_count = safetensors_find(file, ema_name) ? 3 : 2;
    float *scratch = malloc(source->layout.total * sizeof *scratch);
    tf_status status = scratch ? TF_OK : tf_fail(TF_ERR_RUNTIME, "out of memory reading %s", file->path);
    for (int set = 0; set < state->set_count && status == TF_OK; set++) {
        state->sets[set] = malloc(grown->layout.total * sizeof *state->sets[set]);
        if (!state->sets[set]) status = tf_fail(TF_ERR_RUNTIME, "out of memory growing %s", file->path);
        if (status == TF_OK &&
            checkpoint_read_params(file, &source->layout, state_prefixes[set], scratch) != TF_OK)
            status =
                tf_fail_context(TF_ERR_RUNTIME, "the state does not match the layout of %s", source_path);
        const float *new_rows = set == 2 ? grown->params : NULL;
        if (status == TF_OK)
            status = scale_state_set(&source->layout, scratch, &grown->layout, new_rows, state->sets[set]);
    }
    free(scratch);
    return status;
}

static tf_status write_state(const char *path, const tf_param_layout *layout, const grown_state *state) {
    size_t count = (size_t)layout->count * (size_t)state->set_count;
    char *names = malloc(count * TF_CHECKPOINT_NAME_MAX);
    safetensors_tensor_data *table = calloc(count, sizeof *table);
    tf_status status = names && table ? TF_OK : tf_fail(TF_ERR_RUNTIME, "out of memory writing %s", path);
    for (int set = 0; set < state->set_count && status == TF_OK; set++) {
        size_t first = (size_t)set * (size_t)layout->count;
        checkpoint_tensor_table(layout, state_prefixes[set], state->sets[set],
                                names + first * TF_CHECKPOINT_NAME_MAX, table + first);
    }
    safetensors_metadata_entry metadata[] = {{"format", TF_TRAIN_STATE_FORMAT}, {"progress", state->progress}};
    if (status == TF_OK) status = safetensors_write(path, table, count, metadata, 2);
    free(names);
    free(table);
    return status;
}

/* ---- the command ----------------------------------------------------------------------------- */

/* The source's step, epoch and eval crop, carried to the grown checkpoint when present. */
static size_t carried_metadata(const safetensors_file *file, safetensors_metadata_entry *extra) {
    static const char *const keys[] = {"step", "epoch", "crop_pct"};
    size_t count = 0;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const char *value = safetensors_metadata(file, keys[i]);
        if (value) extra[count++] = (safetensors_metadata_entry){keys[i], value};
    }
    return count;
}

static void print_summary(const scale_arguments *arguments, const tf_checkpoint *source,
                          const tf_checkpoint *grown, const tf_scale_options *options,
                          const grown_state *state) {
    printf("grew %s -> %s: attention tokens %d -> %d, FFN tokens %d -> %d, parameters %zu -> %zu\n",
           arguments->checkpoint, arguments->out, source->config.n_attn, grown->config.n_attn,
           source->config.n_ffn, grown->config.n_ffn, source->layout.total, grown->layout.total);
    printf("new keys %s, n_norm %s, seed %llu: ", scale_key_init_name(options->key_init),
           options->norm == TF_SCALE_NORM_CURRENT ? "follows the token count" : "fixed",
           (unsigned long long)options->seed);
    if (scale_preserves_function(options))
        printf(
            "the function is preserved (the grown model's logits equal the original's to float rounding)\n");
    else
        printf("this does NOT preserve the function: the grown model computes something else than the "
               "original\n");
    if (arguments->state)
        printf("grew %s -> %s: AdamW moments (new rows 0)%s; progress kept\n", arguments->state,
               arguments->out_state,
               state->set_count == 3 ? ", EMA (new rows equal to the new weights)" : "; no EMA in the file");
}

typedef struct {
    tf_checkpoint source, grown;
    safetensors_file *source_file, *state_file;
    grown_state state;
} scale_job;

static tf_status run_scale(const scale_arguments *arguments, scale_job *job) {
    TF_TRY(checkpoint_load(arguments->checkpoint, &job->source));
    TF_TRY(safetensors_open(&job->source_file, arguments->checkpoint));
    tf_scale_options options;
    TF_TRY(parse_options(arguments, &job->source.config, &options));
    const char *step = safetensors_metadata(job->source_file, "step");
    if (arguments->state) {
        TF_TRY(safetensors_open(&job->state_file, arguments->state));
        TF_TRY(check_state_file(job->state_file, &job->source.layout, arguments->checkpoint, step));
        job->state.progress = safetensors_metadata(job->state_file, "progress");
    }
    TF_TRY(scale_checkpoint(&job->source, &options, step, (int64_t)time(NULL), arguments->checkpoint,
                            &job->grown));
    if (arguments->state)
        TF_TRY(
            grow_state_sets(job->state_file, &job->source, arguments->checkpoint, &job->grown, &job->state));

    safetensors_metadata_entry extra[3];
    size_t extra_count = carried_metadata(job->source_file, extra);
    const tf_checkpoint *grown = &job->grown;
    TF_TRY(checkpoint_save(arguments->out, &grown->config, &grown->layout, grown->params, &grown->classes,
                           grown->growth_history, extra, extra_count));
    if (arguments->state) TF_TRY(write_state(arguments->out_state, &grown->layout, &job->state));
    print_summary(arguments, &job->source, grown, &options, &job->state);
    return TF_OK;
}

int cmd_scale(int argc, char **argv) {
    scale_arguments arguments;
    tf_status status = parse_arguments(argc, argv, &arguments);
    if (status != TF_OK) return cli_report("scale", status);
    scale_job job;
    memset(&job, 0, sizeof job);
    status = run_scale(&arguments, &job);
    free_grown_state(&job.state);
    safetensors_close(job.state_file);
    safetensors_close(job.source_file);
    checkpoint_free(&job.grown);
    checkpoint_free(&job.source);
    return cli_report("scale", status);
}
