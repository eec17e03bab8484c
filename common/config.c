/* The configuration reader (see config.h). One table, config_keys[], declares every key once:
 * its section, name, type, place in tf_config and allowed range or words. The YAML reader, the
 * --set overrides, the validation in config_finalize() and config_print() all walk that table,
 * so a new key is one line here plus its field in config.h.
 *
 * YAML is read with libyaml's event API: a mapping of sections, each a mapping of scalar keys.
 * A file's keys are first read into a scratch copy and only committed when the whole file is
 * valid, so a failed load leaves the caller's config as it was. The file's model.preset is
 * applied before its other keys, wherever it stands in the file. */
#include "common/config.h"

#include <yaml.h>

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- the key table ----------------------------------------------------------------------- */

typedef enum { KEY_INT, KEY_FLOAT, KEY_SEED, KEY_STRING, KEY_ENUM, KEY_PRESET } key_type;

typedef struct {
    const char *section;
    const char *name;
    key_type type;
    size_t offset;      /* of the field in tf_config */
    size_t size;        /* of the field; for strings the capacity including the NUL */
    double min, max;    /* numbers: the allowed range; strings: min is the least length */
    const char *bounds; /* "[]", "[)", "(]" or "()": which ends of the range are included */
    const char *words;  /* enums: accepted words, '|'-separated, in the order of the enum */
    /* Extra check of a string's text (NULL = none); fails with a message naming no key. */
    tf_status (*check_text)(const char *text);
} config_key;

/* Enums are stored through an int. */
_Static_assert(sizeof(tf_pool) == sizeof(int), "tf_pool must be int-sized");
_Static_assert(sizeof(tf_device) == sizeof(int), "tf_device must be int-sized");

static tf_status check_randaugment(const char *text);

#define FIELD(member) .offset = offsetof(tf_config, member), .size = sizeof(((tf_config *)0)->member)
#define INT_KEY(sec, key, member, lo, hi)                                                                    \
    { .section = sec, .name = key, .type = KEY_INT, FIELD(member), .min = lo, .max = hi, .bounds = "[]" }
#define FLOAT_KEY(sec, key, member, lo, hi, ends)                                                            \
    { .section = sec, .name = key, .type = KEY_FLOAT, FIELD(member), .min = lo, .max = hi, .bounds = ends }
#define STRING_KEY(sec, key, member, min_length, check)                                                      \
    { .section = sec, .name = key, .type = KEY_STRING, FIELD(member), .min = min_length, .check_text = check }
#define ENUM_KEY(sec, key, member, word_list)                                                                \
    { .section = sec, .name = key, .type = KEY_ENUM, FIELD(member), .words = word_list }

enum { LIMIT_COUNT = 1 << 20, LIMIT_STEPS = 1000000000 };

static const config_key config_keys[] = {
    {.section = "model", .name = "preset", .type = KEY_PRESET, .words = "b16|b16_pm|l16|l16_pm"},
    INT_KEY("model", "img_size", model.img_size, 4, 8192),
    INT_KEY("model", "patch", model.patch, 1, 1024),
    INT_KEY("model", "channels", model.channels, 1, 4),
    INT_KEY("model", "depth", model.depth, 1, TF_MAX_DEPTH),
    INT_KEY("model", "dim", model.dim, 8, 65536),
    INT_KEY("model", "heads", model.heads, 1, 1024),
    INT_KEY("model", "n_attn", model.n_attn, 1, LIMIT_COUNT),
    INT_KEY("model", "n_ffn", model.n_ffn, 1, LIMIT_COUNT),
    INT_KEY("model", "classes", model.classes, 1, LIMIT_COUNT),
    ENUM_KEY("model", "pool", model.pool, "avg|cls"),
    FLOAT_KEY("model", "drop_path", model.drop_path, 0, 1, "[)"),
    FLOAT_KEY("model", "eps", model.eps, 0, 1, "[]"),

    STRING_KEY("data", "root", data.root, 0, NULL),
    STRING_KEY("data", "train_split", data.train_split, 1, NULL),
    STRING_KEY("data", "val_split", data.val_split, 1, NULL),
    INT_KEY("data", "workers", data.workers, 0, 1024),
    FLOAT_KEY("data", "crop_pct", data.crop_pct, 0, 1, "(]"),
    INT_KEY("data", "train_limit", data.train_limit, 0, INT_MAX),
    INT_KEY("data", "val_limit", data.val_limit, 0, INT_MAX),

    FLOAT_KEY("augmentation", "scale_min", augment.scale_min, 0, 1, "(]"),
    FLOAT_KEY("augmentation", "scale_max", augment.scale_max, 0, 1, "(]"),
    FLOAT_KEY("augmentation", "ratio_min", augment.ratio_min, 0, 100, "(]"),
    FLOAT_KEY("augmentation", "ratio_max", augment.ratio_max, 0, 100, "(]"),
    FLOAT_KEY("augmentation", "hflip", augment.hflip, 0, 1, "[]"),
    STRING_KEY("augmentation", "randaugment", augment.randaugment, 1, check_randaugment),
    FLOAT_KEY("augmentation", "label_smoothing", augment.label_smoothing, 0, 1, "[)"),
    FLOAT_KEY("augmentation", "mixup", augment.mixup, 0, 100, "[]"),
    FLOAT_KEY("augmentation", "cutmix", augment.cutmix, 0, 100, "[]"),
    FLOAT_KEY("augmentation", "mixup_switch_prob", augment.mixup_switch_prob, 0, 1, "[]"),
    FLOAT_KEY("augmentation", "mixup_prob", augment.mixup_prob, 0, 1, "[]"),
    FLOAT_KEY("augmentation", "random_erase", augment.random_erase, 0, 1, "[]"),

    FLOAT_KEY("optimizer", "lr", optimizer.lr, 0, 10, "[]"),
    FLOAT_KEY("optimizer", "base_lr", optimizer.base_lr, 0, 10, "[]"),
    FLOAT_KEY("optimizer", "min_lr", optimizer.min_lr, 0, 10, "[]"),
    FLOAT_KEY("optimizer", "beta1", optimizer.beta1, 0, 1, "[)"),
    FLOAT_KEY("optimizer", "beta2", optimizer.beta2, 0, 1, "[)"),
    FLOAT_KEY("optimizer", "eps", optimizer.eps, 0, 1, "(]"),
    FLOAT_KEY("optimizer", "weight_decay", optimizer.weight_decay, 0, 10, "[]"),
    FLOAT_KEY("optimizer", "layer_decay", optimizer.layer_decay, 0, 1, "(]"),
    FLOAT_KEY("optimizer", "clip_grad", optimizer.clip_grad, 0, 1e6, "[]"),
    FLOAT_KEY("optimizer", "ema_decay", optimizer.ema_decay, 0, 1, "[)"),

    INT_KEY("schedule", "epochs", schedule.epochs, 1, 100000),
    FLOAT_KEY("schedule", "warmup_epochs", schedule.warmup_epochs, 0, 100000, "[]"),
    INT_KEY("schedule", "batch", schedule.batch, 1, 1 << 24),
    INT_KEY("schedule", "micro_batch", schedule.micro_batch, 0, 1 << 24),

    {.section = "run", .name = "seed", .type = KEY_SEED, FIELD(run.seed)},
    ENUM_KEY("run", "device", run.device, "auto|cpu|cuda"),
    INT_KEY("run", "threads", run.threads, 0, 4096),
    INT_KEY("run", "log_every", run.log_every, 1, LIMIT_STEPS),
    INT_KEY("run", "eval_every", run.eval_every, 0, LIMIT_STEPS),
    INT_KEY("run", "ckpt_every", run.ckpt_every, 0, LIMIT_STEPS),
    INT_KEY("run", "keep_checkpoints", run.keep_checkpoints, 0, 1000000),
    INT_KEY("run", "max_bad_steps", run.max_bad_steps, 1, LIMIT_STEPS),
};

enum { KEY_COUNT = sizeof config_keys / sizeof config_keys[0], NAME_MAX_LENGTH = 64 };

static const char *const config_sections[] = {"model",     "data",     "augmentation",
                                              "optimizer", "schedule", "run"};
enum { SECTION_COUNT = sizeof config_sections / sizeof config_sections[0] };
#define SECTION_LIST "model, data, augmentation, optimizer, schedule, run"

static void *field_of(tf_config *config, const config_key *key) {
    return (char *)config + key->offset;
}

static const void *const_field_of(const tf_config *config, const config_key *key) {
    return (const char *)config + key->offset;
}

static const char *section_find(const char *name) {
    for (int i = 0; i < SECTION_COUNT; i++)
        if (strcmp(config_sections[i], name) == 0) return config_sections[i];
    return NULL;
}

static const config_key *key_find(const char *section, const char *name) {
    for (int i = 0; i < KEY_COUNT; i++)
        if (strcmp(config_keys[i].section, section) == 0 && strcmp(config_keys[i].name, name) == 0)
            return &config_keys[i];
    return NULL;
}

/* ---- suggestions for misspelt names ------------------------------------------------------ */

/* Levenshtein distance of two short names (longer names are compared by their first 63 bytes). */
static int edit_distance(const char *a, const char *b) {
    int row[NAME_MAX_LENGTH + 1];
    int len_a = (int)strnlen(a, NAME_MAX_LENGTH - 1), len_b = (int)strnlen(b, NAME_MAX_LENGTH - 1);
    for (int j = 0; j <= len_b; j++)
        row[j] = j;
    for (int i = 1; i <= len_a; i++) {
        int diagonal = row[0];
        row[0] = i;
        for (int j = 1; j <= len_b; j++) {
            int above = row[j];
            int best = diagonal + (a[i - 1] != b[j - 1]);
            if (above + 1 < best) best = above + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diagonal = above;
        }
    }
    return row[len_b];
}

/* Close enough to be a typo: a third of the name's letters, at least 2. */
static bool is_close(const char *typed, const char *known) {
    int limit = (int)strlen(typed) / 3;
    return edit_distance(typed, known) <= (limit > 2 ? limit : 2);
}

static const char *closest_section(const char *name) {
    const char *best = NULL;
    int best_distance = INT_MAX;
    for (int i = 0; i < SECTION_COUNT; i++) {
        int distance = edit_distance(name, config_sections[i]);
        if (distance < best_distance && is_close(name, config_sections[i]))
            best = config_sections[i], best_distance = distance;
    }
    return best;
}

/* The key the user probably meant: the closest name in the same section, else the same name in
 * another section (model.lr -> optimizer.lr). NULL when nothing is close. */
static const config_key *closest_key(const char *section, const char *name) {
    const config_key *best = NULL;
    int best_distance = INT_MAX;
    for (int i = 0; i < KEY_COUNT; i++) {
        const config_key *key = &config_keys[i];
        if (strcmp(key->section, section) != 0) continue;
        int distance = edit_distance(name, key->name);
        if (distance < best_distance && is_close(name, key->name)) best = key, best_distance = distance;
    }
    for (int i = 0; i < KEY_COUNT && !best; i++)
        if (strcmp(config_keys[i].name, name) == 0) best = &config_keys[i];
    return best;
}

static tf_status fail_unknown_section(const char *name) {
    const char *guess = closest_section(name);
    if (guess)
        return tf_fail(TF_ERR_USAGE, "unknown section (did you mean '%s'?); sections are " SECTION_LIST,
                       guess);
    return tf_fail(TF_ERR_USAGE, "unknown section; sections are " SECTION_LIST);
}

static tf_status fail_unknown_key(const char *section, const char *name) {
    const config_key *guess = closest_key(section, name);
    if (guess)
        return tf_fail(TF_ERR_USAGE, "unknown key (did you mean '%s.%s'?)", guess->section, guess->name);
    return tf_fail(TF_ERR_USAGE, "unknown key in section '%s'", section);
}

/* ---- model presets (DESIGN.md section 2) ------------------------------------------------- */

typedef struct {
    const char *name;
    int img_size, patch, channels, depth, dim, heads, n_attn, n_ffn, classes;
} model_preset;

static const model_preset model_presets[] = {
    {"b16", 224, 16, 3, 12, 768, 12, 768, 3072, 1000},
    {"b16_pm", 224, 16, 3, 12, 768, 12, 576, 2304, 1000},
    {"l16", 224, 16, 3, 24, 1024, 16, 1024, 4096, 1000},
    {"l16_pm", 224, 16, 3, 24, 1024, 16, 768, 3072, 1000},
};

static const model_preset *preset_find(const char *name) {
    for (size_t i = 0; i < sizeof model_presets / sizeof model_presets[0]; i++)
        if (strcmp(model_presets[i].name, name) == 0) return &model_presets[i];
    return NULL;
}

static void preset_apply(const model_preset *preset, tf_model_config *model) {
    model->img_size = preset->img_size;
    model->patch = preset->patch;
    model->channels = preset->channels;
    model->depth = preset->depth;
    model->dim = preset->dim;
    model->heads = preset->heads;
    model->n_attn = preset->n_attn;
    model->n_ffn = preset->n_ffn;
    model->classes = preset->classes;
}

static tf_status preset_lookup(const char *name, const model_preset **preset) {
    *preset = preset_find(name);
    if (*preset) return TF_OK;
    return tf_fail(TF_ERR_USAGE, "unknown model preset '%s' (expected one of b16|b16_pm|l16|l16_pm)", name);
}

tf_status config_apply_model_preset(tf_model_config *model, const char *preset_name) {
    const model_preset *preset;
    TF_TRY(preset_lookup(preset_name, &preset));
    preset_apply(preset, model);
    return TF_OK;
}

/* ---- values: range checks and parsing ---------------------------------------------------- */

/* A bound as a reader expects it: integers without exponent, others shortest. */
static void format_bound(double value, char *text, size_t size) {
    if (value == floor(value) && fabs(value) < 1e15)
        snprintf(text, size, "%.0f", value);
    else
        snprintf(text, size, "%g", value);
}

/* text is the value as the user wrote it (or as printed from the struct). */
static tf_status check_range(const config_key *key, double value, const char *text) {
    bool low_ok = key->bounds[0] == '[' ? value >= key->min : value > key->min;
    bool high_ok = key->bounds[1] == ']' ? value <= key->max : value < key->max;
    if (low_ok && high_ok) return TF_OK; /* NaN fails both */
    char low[32], high[32];
    format_bound(key->min, low, sizeof low);
    format_bound(key->max, high, sizeof high);
    return tf_fail(TF_ERR_USAGE, "%s is out of range %c%s, %s%c", text, key->bounds[0], low, high,
                   key->bounds[1]);
}

static tf_status check_randaugment(const char *text) {
    if (strcmp(text, "none") == 0 || strcmp(text, "rand") == 0 || strncmp(text, "rand-", 5) == 0)
        return TF_OK;
    return tf_fail(TF_ERR_USAGE,
                   "expected 'none' or a timm RandAugment string such as 'rand-m9-mstd0.5-inc1', got '%s'",
                   text);
}

/* Index of word in a '|'-separated list, or -1. */
static int word_index(const char *words, const char *word) {
    size_t length = strlen(word);
    int index = 0;
    for (const char *start = words;; index++) {
        const char *end = strchr(start, '|');
        size_t word_length = end ? (size_t)(end - start) : strlen(start);
        if (word_length == length && strncmp(start, word, length) == 0) return index;
        if (!end) return -1;
        start = end + 1;
    }
}

/* The n-th word of a '|'-separated list into out; false when there is none. */
static bool word_at(const char *words, int index, char *out, size_t size) {
    if (index < 0) return false;
    const char *start = words;
    for (int i = 0; i < index; i++) {
        start = strchr(start, '|');
        if (!start) return false;
        start++;
    }
    size_t length = strcspn(start, "|");
    snprintf(out, size, "%.*s", (int)(length < size ? length : size - 1), start);
    return true;
}

static tf_status parse_int(const config_key *key, const char *text, tf_config *config) {
    char *end;
    /* strtoll saturates on overflow, which the range check then reports. */
    long long value = strtoll(text, &end, 10);
    if (end == text || *end != '\0' || isspace((unsigned char)text[0]))
        return tf_fail(TF_ERR_USAGE, "expected an integer, got '%s'", text);
    TF_TRY(check_range(key, (double)value, text));
    int stored = (int)value;
    memcpy(field_of(config, key), &stored, sizeof stored);
    return TF_OK;
}

/* Decimal numbers in the forms YAML writes them: 0.1, 1e-4, 1.6e-3, -2, .5. strtod alone would
 * also take "nan", "inf" and hex, which no config needs. */
static bool is_decimal_number(const char *text) {
    bool digit = false;
    for (const char *c = text; *c; c++) {
        if (isdigit((unsigned char)*c))
            digit = true;
        else if (!strchr("+-.eE", *c))
            return false;
    }
    return digit;
}

static tf_status parse_float(const config_key *key, const char *text, tf_config *config) {
    char *end;
    double value = strtod(text, &end);
    if (!is_decimal_number(text) || end == text || *end != '\0')
        return tf_fail(TF_ERR_USAGE, "expected a number, got '%s'", text);
    /* Check what is stored: 0.99999999 becomes 1.0f, which beta2 must not be. */
    float stored = (float)value;
    TF_TRY(check_range(key, (double)stored, text));
    memcpy(field_of(config, key), &stored, sizeof stored);
    return TF_OK;
}

static tf_status parse_seed(const config_key *key, const char *text, tf_config *config) {
    bool digits = text[0] != '\0';
    for (const char *c = text; *c; c++)
        digits = digits && isdigit((unsigned char)*c);
    if (!digits) return tf_fail(TF_ERR_USAGE, "expected an unsigned integer, got '%s'", text);
    errno = 0;
    unsigned long long value = strtoull(text, NULL, 10);
    if (errno == ERANGE) return tf_fail(TF_ERR_USAGE, "%s is out of range [0, %llu]", text, ULLONG_MAX);
    memcpy(field_of(config, key), &value, sizeof value);
    return TF_OK;
}

static tf_status check_string(const config_key *key, const char *text) {
    size_t length = strlen(text);
    if (length + 1 > key->size)
        return tf_fail(TF_ERR_USAGE, "too long (%zu bytes, at most %zu)", length, key->size - 1);
    if ((double)length < key->min) return tf_fail(TF_ERR_USAGE, "must not be empty");
    return key->check_text ? key->check_text(text) : TF_OK;
}

static tf_status parse_string(const config_key *key, const char *text, tf_config *config) {
    TF_TRY(check_string(key, text));
    char *field = field_of(config, key);
    memset(field, 0, key->size); /* whole field, so that configs compare equal byte for byte */
    memcpy(field, text, strlen(text));
    return TF_OK;
}

static tf_status parse_enum(const config_key *key, const char *text, tf_config *config) {
    int index = word_index(key->words, text);
    if (index < 0) return tf_fail(TF_ERR_USAGE, "expected one of %s, got '%s'", key->words, text);
    memcpy(field_of(config, key), &index, sizeof index);
    return TF_OK;
}

/* Parses text as the key's value and stores it; config is untouched on failure. The message
 * names the problem, not the key: callers add where it came from. Presets are the callers'. */
static tf_status key_parse(const config_key *key, const char *text, tf_config *config) {
    switch (key->type) {
    case KEY_INT:
        return parse_int(key, text, config);
    case KEY_FLOAT:
        return parse_float(key, text, config);
    case KEY_SEED:
        return parse_seed(key, text, config);
    case KEY_STRING:
        return parse_string(key, text, config);
    case KEY_ENUM:
        return parse_enum(key, text, config);
    case KEY_PRESET:
        break;
    }
    return tf_fail(TF_ERR_USAGE, "not a value key");
}

/* ---- the YAML file ----------------------------------------------------------------------- */

typedef struct {
    const char *path;
    yaml_parser_t parser;
    tf_config values;           /* the caller's config with this file's keys written over it */
    size_t line_of[KEY_COUNT];  /* 1-based line where the file sets each key; 0 = not set */
    const model_preset *preset; /* the file's model.preset, applied first on commit */
    size_t preset_line;
} yaml_reader;

static size_t line_of_event(const yaml_event_t *event) {
    return event->start_mark.line + 1;
}

static const char *event_kind(const yaml_event_t *event) {
    switch (event->type) {
    case YAML_SCALAR_EVENT:
        return "a scalar";
    case YAML_SEQUENCE_START_EVENT:
        return "a sequence";
    case YAML_MAPPING_START_EVENT:
        return "a mapping";
    case YAML_ALIAS_EVENT:
        return "an alias (aliases are not supported)";
    default:
        return "the end of a block";
    }
}

/* An empty plain scalar, "~" or "null": YAML's null, as in "model:" with nothing below. */
static bool is_null_scalar(const yaml_event_t *event) {
    if (event->type != YAML_SCALAR_EVENT || event->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return false;
    const char *text = (const char *)event->data.scalar.value;
    return text[0] == '\0' || strcmp(text, "~") == 0 || strcmp(text, "null") == 0 ||
           strcmp(text, "Null") == 0 || strcmp(text, "NULL") == 0;
}

/* libyaml's own problem text and position (its marks are 0-based). */
static tf_status reader_syntax_error(const yaml_reader *reader) {
    const yaml_parser_t *parser = &reader->parser;
    const char *problem = parser->problem ? parser->problem : "unknown problem";
    if (parser->error == YAML_MEMORY_ERROR)
        return tf_fail(TF_ERR_RUNTIME, "%s: out of memory while reading YAML", reader->path);
    if (parser->error == YAML_READER_ERROR)
        return tf_fail(TF_ERR_USAGE, "%s: byte %zu: YAML error: %s", reader->path, parser->problem_offset,
                       problem);
    if (parser->context)
        return tf_fail(TF_ERR_USAGE, "%s:%zu:%zu: YAML syntax error: %s (%s at line %zu, column %zu)",
                       reader->path, parser->problem_mark.line + 1, parser->problem_mark.column + 1, problem,
                       parser->context, parser->context_mark.line + 1, parser->context_mark.column + 1);
    return tf_fail(TF_ERR_USAGE, "%s:%zu:%zu: YAML syntax error: %s", reader->path,
                   parser->problem_mark.line + 1, parser->problem_mark.column + 1, problem);
}

static tf_status reader_next(yaml_reader *reader, yaml_event_t *event) {
    if (yaml_parser_parse(&reader->parser, event)) return TF_OK;
    return reader_syntax_error(reader);
}

/* Error at an event: "path:line: what: ..." where what is a section or section.key. */
static tf_status reader_fail_at(const yaml_reader *reader, size_t line, const char *what) {
    return tf_fail_context(TF_ERR_USAGE, "%s:%zu: %s", reader->path, line, what);
}

static tf_status reader_take_preset(yaml_reader *reader, const char *text, size_t line) {
    TF_TRY(preset_lookup(text, &reader->preset));
    reader->preset_line = line;
    return TF_OK;
}

/* The value of one key: a scalar, parsed into the scratch config. */
static tf_status reader_read_value(yaml_reader *reader, const config_key *key, const yaml_event_t *value) {
    size_t line = line_of_event(value);
    char what[2 * NAME_MAX_LENGTH + 2];
    snprintf(what, sizeof what, "%s.%s", key->section, key->name);
    if (value->type != YAML_SCALAR_EVENT) {
        tf_fail(TF_ERR_USAGE, "expected a scalar value, got %s", event_kind(value));
        return reader_fail_at(reader, line, what);
    }
    size_t index = (size_t)(key - config_keys);
    size_t first = key->type == KEY_PRESET ? reader->preset_line : reader->line_of[index];
    if (first) {
        tf_fail(TF_ERR_USAGE, "set twice (first at line %zu)", first);
        return reader_fail_at(reader, line, what);
    }
    const char *text = (const char *)value->data.scalar.value;
    if (key->type == KEY_STRING && is_null_scalar(value)) text = "";
    tf_status status = key->type == KEY_PRESET ? reader_take_preset(reader, text, line)
                                               : key_parse(key, text, &reader->values);
    if (status != TF_OK) return reader_fail_at(reader, line, what);
    if (key->type != KEY_PRESET) reader->line_of[index] = line;
    return TF_OK;
}

/* One "key: value" pair of a section; *done is set at the end of the section's mapping. */
static tf_status reader_read_pair(yaml_reader *reader, const char *section, bool *done) {
    yaml_event_t event;
    TF_TRY(reader_next(reader, &event));
    *done = event.type == YAML_MAPPING_END_EVENT;
    if (*done || event.type != YAML_SCALAR_EVENT) {
        const char *kind = event_kind(&event);
        size_t line = line_of_event(&event);
        yaml_event_delete(&event);
        if (*done) return TF_OK;
        tf_fail(TF_ERR_USAGE, "expected a key name, got %s", kind);
        return reader_fail_at(reader, line, section);
    }
    char name[NAME_MAX_LENGTH], what[2 * NAME_MAX_LENGTH + 2];
    snprintf(name, sizeof name, "%s", (const char *)event.data.scalar.value);
    snprintf(what, sizeof what, "%s.%s", section, name);
    size_t line = line_of_event(&event);
    yaml_event_delete(&event);
    const config_key *key = key_find(section, name);
    if (!key) {
        fail_unknown_key(section, name);
        return reader_fail_at(reader, line, what);
    }
    TF_TRY(reader_next(reader, &event));
    tf_status status = reader_read_value(reader, key, &event);
    yaml_event_delete(&event);
    return status;
}

/* The body of a section: a mapping of keys, or nothing ("model:" with no keys below). */
static tf_status reader_read_section(yaml_reader *reader, const char *section) {
    yaml_event_t event;
    TF_TRY(reader_next(reader, &event));
    bool mapping = event.type == YAML_MAPPING_START_EVENT, empty = is_null_scalar(&event);
    const char *kind = event_kind(&event);
    size_t line = line_of_event(&event);
    yaml_event_delete(&event);
    if (empty) return TF_OK;
    if (!mapping) {
        tf_fail(TF_ERR_USAGE, "expected a mapping of keys, got %s", kind);
        return reader_fail_at(reader, line, section);
    }
    for (bool done = false; !done;)
        TF_TRY(reader_read_pair(reader, section, &done));
    return TF_OK;
}

static tf_status reader_read_sections(yaml_reader *reader) {
    size_t seen_line[SECTION_COUNT] = {0}; /* 1-based line of each section; 0 = not yet */
    for (;;) {
        yaml_event_t event;
        TF_TRY(reader_next(reader, &event));
        if (event.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&event);
            return TF_OK;
        }
        char name[NAME_MAX_LENGTH];
        bool scalar = event.type == YAML_SCALAR_EVENT;
        snprintf(name, sizeof name, "%s", scalar ? (const char *)event.data.scalar.value : "");
        const char *kind = event_kind(&event);
        size_t line = line_of_event(&event);
        yaml_event_delete(&event);
        if (!scalar) {
            tf_fail(TF_ERR_USAGE, "expected a section name, got %s", kind);
            return tf_fail_context(TF_ERR_USAGE, "%s:%zu", reader->path, line);
        }
        const char *section = section_find(name);
        if (!section) {
            fail_unknown_section(name);
            return reader_fail_at(reader, line, name);
        }
        size_t index = 0;
        while (config_sections[index] != section)
            index++;
        if (seen_line[index]) {
            tf_fail(TF_ERR_USAGE, "section appears twice (first at line %zu)", seen_line[index]);
            return reader_fail_at(reader, line, section);
        }
        seen_line[index] = line;
        TF_TRY(reader_read_section(reader, section));
    }
}

/* The document: a mapping of sections, or nothing at all (a file of comments). */
static tf_status reader_read_document(yaml_reader *reader) {
    yaml_event_t event;
    TF_TRY(reader_next(reader, &event));
    bool mapping = event.type == YAML_MAPPING_START_EVENT, empty = is_null_scalar(&event);
    const char *kind = event_kind(&event);
    size_t line = line_of_event(&event);
    yaml_event_delete(&event);
    if (empty) return TF_OK;
    if (!mapping)
        return tf_fail(TF_ERR_USAGE, "%s:%zu: expected a mapping of sections (" SECTION_LIST "), got %s",
                       reader->path, line, kind);
    return reader_read_sections(reader);
}

/* Reads the next event and checks its type (the stream's frame, which libyaml guarantees for
 * well-formed input; reported for completeness). */
static tf_status reader_expect(yaml_reader *reader, yaml_event_type_t type, size_t *line) {
    yaml_event_t event;
    TF_TRY(reader_next(reader, &event));
    yaml_event_type_t got = event.type;
    *line = line_of_event(&event);
    yaml_event_delete(&event);
    if (got == type) return TF_OK;
    if (type == YAML_STREAM_END_EVENT)
        return tf_fail(TF_ERR_USAGE, "%s:%zu: more than one YAML document", reader->path, *line);
    return tf_fail(TF_ERR_USAGE, "%s:%zu: unexpected YAML structure", reader->path, *line);
}

static tf_status reader_read_stream(yaml_reader *reader) {
    size_t line;
    TF_TRY(reader_expect(reader, YAML_STREAM_START_EVENT, &line));
    yaml_event_t event;
    TF_TRY(reader_next(reader, &event));
    yaml_event_type_t type = event.type;
    yaml_event_delete(&event);
    if (type == YAML_STREAM_END_EVENT) return TF_OK; /* an empty file */
    if (type != YAML_DOCUMENT_START_EVENT)
        return tf_fail(TF_ERR_USAGE, "%s: unexpected YAML structure", reader->path);
    TF_TRY(reader_read_document(reader));
    TF_TRY(reader_expect(reader, YAML_DOCUMENT_END_EVENT, &line));
    return reader_expect(reader, YAML_STREAM_END_EVENT, &line);
}

/* The preset first, then every key the file sets, copied from the scratch config. */
static void reader_commit(const yaml_reader *reader, tf_config *config) {
    if (reader->preset) preset_apply(reader->preset, &config->model);
    for (int i = 0; i < KEY_COUNT; i++) {
        if (!reader->line_of[i]) continue;
        const config_key *key = &config_keys[i];
        memcpy(field_of(config, key), const_field_of(&reader->values, key), key->size);
    }
}

tf_status config_load_file(tf_config *config, const char *path) {
    FILE *file = fopen(path, "rb");
    if (!file) return tf_fail(TF_ERR_USAGE, "%s: cannot open config file: %s", path, strerror(errno));
    yaml_reader *reader = calloc(1, sizeof *reader);
    if (!reader) {
        fclose(file);
        return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", path);
    }
    reader->path = path;
    reader->values = *config;
    tf_status status = TF_ERR_RUNTIME;
    if (!yaml_parser_initialize(&reader->parser)) {
        status = tf_fail(TF_ERR_RUNTIME, "%s: cannot initialise the YAML parser", path);
    } else {
        yaml_parser_set_input_file(&reader->parser, file);
        status = reader_read_stream(reader);
        if (status == TF_OK) reader_commit(reader, config);
        yaml_parser_delete(&reader->parser);
    }
    free(reader);
    fclose(file);
    return status;
}

/* ---- --set overrides --------------------------------------------------------------------- */

tf_status config_set(tf_config *config, const char *assignment) {
    const char *equals = strchr(assignment, '=');
    const char *dot = strchr(assignment, '.');
    if (!equals || !dot || dot > equals)
        return tf_fail(TF_ERR_USAGE, "--set %s: expected section.key=value", assignment);
    char section[NAME_MAX_LENGTH], name[NAME_MAX_LENGTH];
    snprintf(section, sizeof section, "%.*s", (int)(dot - assignment), assignment);
    snprintf(name, sizeof name, "%.*s", (int)(equals - dot - 1), dot + 1);
    const char *value = equals + 1;
    if (!section_find(section)) {
        fail_unknown_section(section);
        return tf_fail_context(TF_ERR_USAGE, "--set %s: %s", assignment, section);
    }
    const config_key *key = key_find(section, name);
    if (!key) {
        fail_unknown_key(section, name);
        return tf_fail_context(TF_ERR_USAGE, "--set %s: %s.%s", assignment, section, name);
    }
    tf_status status = key->type == KEY_PRESET ? config_apply_model_preset(&config->model, value)
                                               : key_parse(key, value, config);
    if (status != TF_OK) return tf_fail_context(status, "--set %s", assignment);
    return TF_OK;
}

/* ---- defaults, validation, derived fields ------------------------------------------------ */

void config_defaults(tf_config *config) {
    memset(config, 0, sizeof *config); /* also the padding, so configs compare with memcmp */
    tf_model_config *model = &config->model;
    preset_apply(preset_find("b16"), model);
    model->pool = TF_POOL_AVG;
    model->drop_path = 0.1f;
    model->eps = 1e-6f;

    tf_data_config *data = &config->data;
    snprintf(data->train_split, sizeof data->train_split, "train");
    snprintf(data->val_split, sizeof data->val_split, "val");
    data->crop_pct = 0.875f;

    tf_augment_config *augment = &config->augment;
    augment->scale_min = 0.08f;
    augment->scale_max = 1.0f;
    augment->ratio_min = 0.75f;
    augment->ratio_max = 1.3333333f;
    augment->hflip = 0.5f;
    snprintf(augment->randaugment, sizeof augment->randaugment, "rand-m9-mstd0.5-inc1");
    augment->label_smoothing = 0.1f;
    augment->mixup = 0.8f;
    augment->cutmix = 1.0f;
    augment->mixup_switch_prob = 0.5f;
    augment->mixup_prob = 1.0f;

    tf_optimizer_config *optimizer = &config->optimizer;
    optimizer->base_lr = 1e-4f;
    optimizer->min_lr = 1e-6f;
    optimizer->beta1 = 0.9f;
    optimizer->beta2 = 0.95f;
    optimizer->eps = 1e-8f;
    optimizer->weight_decay = 0.3f;
    optimizer->layer_decay = 1.0f;
    optimizer->ema_decay = 0.9999f;

    config->schedule =
        (tf_schedule_config){.epochs = 300, .warmup_epochs = 20, .batch = 4096, .micro_batch = 256};

    tf_run_config *run = &config->run;
    run->device = TF_DEVICE_AUTO;
    run->log_every = 50;
    run->eval_every = 1;
    run->ckpt_every = 1000;
    run->keep_checkpoints = 3;
    run->max_bad_steps = 5;
}

/* A float as config_print() and the range messages write it. */
static void format_float(float value, char *text, size_t size) {
    /* Whole numbers as 20.0, so that they read as floats to YAML readers too. */
    if (value == floorf(value) && fabsf(value) < 1e7f) {
        snprintf(text, size, "%.1f", (double)value);
        return;
    }
    /* Otherwise the shortest form that reads back to the same float. */
    for (int precision = 1; precision <= 9; precision++) {
        snprintf(text, size, "%.*g", precision, (double)value);
        if (strtof(text, NULL) == value) break;
    }
    /* YAML 1.1 readers (PyYAML) take 1e-06 for a string; 1.0e-06 is a float to all of them. */
    char *exponent = strchr(text, 'e');
    if (exponent && !memchr(text, '.', (size_t)(exponent - text)) && strlen(text) + 3 <= size) {
        memmove(exponent + 2, exponent, strlen(exponent) + 1);
        memcpy(exponent, ".0", 2);
    }
}

/* Checks one stored field against the table (programmatic edits bypass the parser). */
static tf_status key_validate(const config_key *key, const tf_config *config) {
    const void *field = const_field_of(config, key);
    char text[64];
    int int_value;
    float float_value;
    switch (key->type) {
    case KEY_INT:
        memcpy(&int_value, field, sizeof int_value);
        snprintf(text, sizeof text, "%d", int_value);
        return check_range(key, int_value, text);
    case KEY_FLOAT:
        memcpy(&float_value, field, sizeof float_value);
        format_float(float_value, text, sizeof text);
        return check_range(key, float_value, text);
    case KEY_STRING:
        if (!memchr(field, '\0', key->size)) return tf_fail(TF_ERR_USAGE, "not NUL-terminated");
        return check_string(key, field);
    case KEY_ENUM:
        memcpy(&int_value, field, sizeof int_value);
        if (word_at(key->words, int_value, text, sizeof text)) return TF_OK;
        return tf_fail(TF_ERR_USAGE, "%d is not one of %s", int_value, key->words);
    case KEY_SEED:
    case KEY_PRESET:
        break;
    }
    return TF_OK;
}

static tf_status check_model(const tf_model_config *model) {
    if (model->dim % model->heads != 0)
        return tf_fail(TF_ERR_USAGE, "model.dim (%d) is not divisible by model.heads (%d)", model->dim,
                       model->heads);
    if (model->img_size % model->patch != 0)
        return tf_fail(TF_ERR_USAGE, "model.img_size (%d) is not divisible by model.patch (%d)",
                       model->img_size, model->patch);
    return TF_OK;
}

static tf_status check_augment(const tf_augment_config *augment) {
    if (augment->scale_min > augment->scale_max)
        return tf_fail(TF_ERR_USAGE,
                       "augmentation.scale_min (%g) is greater than augmentation.scale_max (%g)",
                       augment->scale_min, augment->scale_max);
    if (augment->ratio_min > augment->ratio_max)
        return tf_fail(TF_ERR_USAGE,
                       "augmentation.ratio_min (%g) is greater than augmentation.ratio_max (%g)",
                       augment->ratio_min, augment->ratio_max);
    return TF_OK;
}

static tf_status check_schedule(const tf_schedule_config *schedule) {
    if (schedule->micro_batch > schedule->batch)
        return tf_fail(TF_ERR_USAGE, "schedule.micro_batch (%d) is greater than schedule.batch (%d)",
                       schedule->micro_batch, schedule->batch);
    if (schedule->warmup_epochs > (float)schedule->epochs)
        return tf_fail(TF_ERR_USAGE, "schedule.warmup_epochs (%g) is greater than schedule.epochs (%d)",
                       schedule->warmup_epochs, schedule->epochs);
    return TF_OK;
}

/* lr = base_lr * batch / 256 when no absolute lr is given (MAE's scaling rule). */
static tf_status derive_lr(tf_optimizer_config *optimizer, int batch) {
    if (optimizer->lr == 0.0f) optimizer->lr = (float)((double)optimizer->base_lr * batch / 256.0);
    if (optimizer->lr == 0.0f)
        return tf_fail(TF_ERR_USAGE, "optimizer.lr and optimizer.base_lr are both 0: set one of them");
    if (optimizer->min_lr > optimizer->lr)
        return tf_fail(TF_ERR_USAGE, "optimizer.min_lr (%g) is greater than the peak learning rate (%g)",
                       optimizer->min_lr, optimizer->lr);
    return TF_OK;
}

void config_fill_n_norm(tf_model_config *model) {
    memset(model->n_norm, 0, sizeof model->n_norm);
    for (int layer = 0; layer < model->depth; layer++) {
        for (int p = TF_PATT_Q; p <= TF_PATT_O; p++)
            model->n_norm[layer][p] = model->n_attn;
        model->n_norm[layer][TF_PATT_FFN] = model->n_ffn;
    }
}

tf_status config_finalize(tf_config *config) {
    for (int i = 0; i < KEY_COUNT; i++) {
        if (key_validate(&config_keys[i], config) != TF_OK)
            return tf_fail_context(TF_ERR_USAGE, "%s.%s", config_keys[i].section, config_keys[i].name);
    }
    TF_TRY(check_model(&config->model));
    TF_TRY(check_augment(&config->augment));
    TF_TRY(check_schedule(&config->schedule));
    TF_TRY(derive_lr(&config->optimizer, config->schedule.batch));
    config_fill_n_norm(&config->model);
    return TF_OK;
}

/* ---- printing ---------------------------------------------------------------------------- */

/* Double-quoted YAML string: backslash and quote escaped, control bytes as \xHH. */
static void print_string(const char *text, FILE *file) {
    fputc('"', file);
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        if (*c == '"' || *c == '\\')
            fprintf(file, "\\%c", *c);
        else if (*c < 0x20 || *c == 0x7f)
            fprintf(file, "\\x%02x", *c);
        else
            fputc(*c, file);
    }
    fputc('"', file);
}

static void print_value(const config_key *key, const tf_config *config, FILE *file) {
    const void *field = const_field_of(config, key);
    char text[64];
    int int_value;
    float float_value;
    unsigned long long seed;
    switch (key->type) {
    case KEY_INT:
        memcpy(&int_value, field, sizeof int_value);
        fprintf(file, "%d", int_value);
        break;
    case KEY_FLOAT:
        memcpy(&float_value, field, sizeof float_value);
        format_float(float_value, text, sizeof text);
        fputs(text, file);
        break;
    case KEY_SEED:
        memcpy(&seed, field, sizeof seed);
        fprintf(file, "%llu", seed);
        break;
    case KEY_STRING:
        print_string(field, file);
        break;
    case KEY_ENUM:
        memcpy(&int_value, field, sizeof int_value);
        if (!word_at(key->words, int_value, text, sizeof text)) snprintf(text, sizeof text, "%d", int_value);
        fputs(text, file);
        break;
    case KEY_PRESET:
        break;
    }
}

void config_print(const tf_config *config, FILE *file) {
    fputs("# TokenFormer configuration, every key resolved (the model keys replace a preset)\n", file);
    const char *section = NULL;
    for (int i = 0; i < KEY_COUNT; i++) {
        const config_key *key = &config_keys[i];
        if (key->type == KEY_PRESET) continue;
        if (!section || strcmp(section, key->section) != 0) fprintf(file, "%s:\n", key->section);
        section = key->section;
        fprintf(file, "  %s: ", key->name);
        print_value(key, config, file);
        fputc('\n', file);
    }
}
