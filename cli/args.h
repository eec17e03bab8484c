/* Command-line option parsing shared by the subcommands: "--name value", "--name=value" and
 * bare flags, with usage errors that name the option. */
#ifndef TF_CLI_ARGS_H
#define TF_CLI_ARGS_H

#include "common/config.h"
#include "common/error.h"

#include <stdbool.h>

typedef struct {
    int argc;
    char **argv;
    int index;        /* the argument being looked at */
    tf_status status; /* the first usage error */
} cli_parser;

/* Starts after argv[0] (the subcommand). */
cli_parser cli_parser_make(int argc, char **argv);
/* True while there are arguments left and no error. */
bool cli_more(const cli_parser *parser);
/* True (and moves on) when the current argument is the flag. */
bool cli_flag(cli_parser *parser, const char *name);
/* True (and moves on) when the current argument is the option; *value is its value. A missing
 * value records a usage error. */
bool cli_value(cli_parser *parser, const char *name, const char **value);
/* The current argument when it does not start with '-' (a positional argument), moving on. */
bool cli_positional(cli_parser *parser, const char **value);
/* Records "unknown option" for the current argument. */
void cli_unknown(cli_parser *parser);
/* Parses an integer option value; a non-integer records a usage error naming the option. */
int cli_int(cli_parser *parser, const char *name, const char *value);
/* A --crop-pct value: a number in (0, 1]; anything else records a usage error naming it. */
float cli_crop_pct(cli_parser *parser, const char *value);
/* A --device value: auto (or NULL), cpu or cuda. */
tf_status cli_device(const char *name, tf_device *device);

/* Where a command's configuration comes from: --config FILE, repeated --set section.key=value,
 * and --device D (run.device). */
enum { CLI_MAX_OVERRIDES = 64 };
typedef struct {
    const char *path;
    const char *device;
    const char *overrides[CLI_MAX_OVERRIDES];
    int override_count;
} cli_config_source;

/* True (and moves on) when the current argument is --config, --set or --device. */
bool cli_config_option(cli_parser *parser, cli_config_source *source);
/* Adds an override made by the command itself (the caller keeps the string alive). */
tf_status cli_config_add(cli_config_source *source, const char *assignment);
/* Defaults, the file, the overrides in order, --device, then config_finalize(). */
tf_status cli_config_load(const cli_config_source *source, tf_config *config);

#endif
