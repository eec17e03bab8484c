/* Option parsing (see args.h). */
#include "cli/args.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

cli_parser cli_parser_make(int argc, char **argv) {
    return (cli_parser){argc, argv, 1, TF_OK};
}

bool cli_more(const cli_parser *parser) {
    return parser->status == TF_OK && parser->index < parser->argc;
}

bool cli_flag(cli_parser *parser, const char *name) {
    if (strcmp(parser->argv[parser->index], name) != 0) return false;
    parser->index++;
    return true;
}

bool cli_value(cli_parser *parser, const char *name, const char **value) {
    const char *argument = parser->argv[parser->index];
    size_t length = strlen(name);
    if (strncmp(argument, name, length) != 0) return false;
    if (argument[length] == '=') {
        *value = argument + length + 1;
        parser->index++;
        return true;
    }
    if (argument[length] != '\0') return false;
    if (parser->index + 1 >= parser->argc) {
        parser->status = tf_fail(TF_ERR_USAGE, "%s needs a value", name);
        *value = "";
        parser->index++;
        return true;
    }
    *value = parser->argv[parser->index + 1];
    parser->index += 2;
    return true;
}

bool cli_positional(cli_parser *parser, const char **value) {
    const char *argument = parser->argv[parser->index];
    if (argument[0] == '-' && argument[1] != '\0') return false;
    *value = argument;
    parser->index++;
    return true;
}

void cli_unknown(cli_parser *parser) {
    parser->status = tf_fail(TF_ERR_USAGE, "unknown option '%s' (see 'tokenformer help %s')",
                             parser->argv[parser->index], parser->argv[0]);
}

int cli_int(cli_parser *parser, const char *name, const char *value) {
    char *end;
    errno = 0;
    long number = strtol(value, &end, 10);
    if (errno || end == value || *end || number < -2147483647L || number > 2147483647L) {
        if (parser->status == TF_OK)
            parser->status = tf_fail(TF_ERR_USAGE, "%s: expected an integer, got '%s'", name, value);
        return 0;
    }
    return (int)number;
}

int cli_report(const char *command, int status) {
    if (status != TF_OK) fprintf(stderr, "tokenformer %s: %s\n", command, tf_error_message());
    return status;
}

float cli_crop_pct(cli_parser *parser, const char *value) {
    char *end;
    errno = 0;
    float number = strtof(value, &end);
    if (errno || end == value || *end || !(number > 0.0f && number <= 1.0f)) {
        if (parser->status == TF_OK)
            parser->status = tf_fail(TF_ERR_USAGE, "--crop-pct must be a number in (0, 1], got '%s'", value);
        return 0.0f;
    }
    return number;
}

tf_status cli_device(const char *name, tf_device *device) {
    if (!name || strcmp(name, "auto") == 0)
        *device = TF_DEVICE_AUTO;
    else if (strcmp(name, "cpu") == 0)
        *device = TF_DEVICE_CPU;
    else if (strcmp(name, "cuda") == 0)
        *device = TF_DEVICE_CUDA;
    else
        return tf_fail(TF_ERR_USAGE, "--device must be auto, cpu or cuda, got '%s'", name);
    return TF_OK;
}

bool cli_config_option(cli_parser *parser, cli_config_source *source) {
    const char *value;
    if (cli_value(parser, "--config", &source->path)) return true;
    if (cli_value(parser, "--device", &source->device)) return true;
    if (!cli_value(parser, "--set", &value)) return false;
    tf_status status = cli_config_add(source, value);
    if (status != TF_OK && parser->status == TF_OK) parser->status = status;
    return true;
}

tf_status cli_config_add(cli_config_source *source, const char *assignment) {
    if (source->override_count == CLI_MAX_OVERRIDES)
        return tf_fail(TF_ERR_USAGE, "more than %d --set options", CLI_MAX_OVERRIDES);
    source->overrides[source->override_count++] = assignment;
    return TF_OK;
}

tf_status cli_config_load(const cli_config_source *source, tf_config *config) {
    config_defaults(config);
    TF_TRY(config_load_file(config, source->path));
    for (int i = 0; i < source->override_count; i++) TF_TRY(config_set(config, source->overrides[i]));
    if (source->device) {
        char assignment[96];
        if (snprintf(assignment, sizeof assignment, "run.device=%s", source->device) >= (int)sizeof assignment)
            return tf_fail(TF_ERR_USAGE, "--device must be auto, cpu or cuda");
        TF_TRY(config_set(config, assignment));
    }
    return config_finalize(config);
}
