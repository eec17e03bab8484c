/* `tokenformer train`: reads the config and its overrides, then runs train_run(). */
#include "cli/args.h"
#include "cli/commands.h"
#include "common/config.h"
#include "common/path.h"
#include "train/train.h"

#include <libgen.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    cli_config_source config;
    const char *data_root, *out_dir, *resume_dir, *init_from, *init_state;
    int max_steps;
    char data_assignment[TF_PATH_MAX + 16]; /* data.root=<--data> */
    char resumed_config[TF_PATH_MAX];       /* <--resume>/config.yaml */
} train_arguments;

static tf_status parse_arguments(int argc, char **argv, train_arguments *arguments) {
    cli_parser parser = cli_parser_make(argc, argv);
    const char *value;
    while (cli_more(&parser)) {
        if (cli_config_option(&parser, &arguments->config)) continue;
        if (cli_value(&parser, "--data", &arguments->data_root)) continue;
        if (cli_value(&parser, "--out", &arguments->out_dir)) continue;
        if (cli_value(&parser, "--resume", &arguments->resume_dir)) continue;
        if (cli_value(&parser, "--init-from", &arguments->init_from)) continue;
        if (cli_value(&parser, "--init-state", &arguments->init_state)) continue;
        if (cli_value(&parser, "--max-steps", &value)) {
            arguments->max_steps = cli_int(&parser, "--max-steps", value);
            continue;
        }
        cli_unknown(&parser);
    }
    TF_TRY(parser.status);
    if (!arguments->config.path && !arguments->resume_dir)
        return tf_fail(TF_ERR_USAGE, "--config FILE.yaml is required (or --resume DIR)");
    if (arguments->init_state && !arguments->init_from)
        return tf_fail(TF_ERR_USAGE, "--init-state needs --init-from (the weights the state belongs to)");
    if (arguments->resume_dir && arguments->init_from)
        return tf_fail(TF_ERR_USAGE, "--resume continues a run; --init-from starts a new one: give one of them");
    return TF_OK;
}

/* runs/<config file name without .yaml> */
static tf_status default_run_dir(const char *config_path, char *run_dir, size_t size) {
    char copy[TF_PATH_MAX];
    TF_TRY(path_format(copy, sizeof copy, "%s", config_path));
    char *name = basename(copy), *dot = strrchr(name, '.');
    if (dot) *dot = '\0';
    return path_format(run_dir, size, "runs/%s", name);
}

/* The config: the file (a resumed run's own config.yaml unless --config says otherwise), the
 * --set overrides, then --data and --device. */
static tf_status build_config(train_arguments *arguments, tf_config *config, tf_train_options *options) {
    if (!arguments->config.path) {
        TF_TRY(path_format(arguments->resumed_config, sizeof arguments->resumed_config, "%s/config.yaml",
                           arguments->resume_dir));
        arguments->config.path = arguments->resumed_config;
    }
    if (arguments->data_root) {
        TF_TRY(path_format(arguments->data_assignment, sizeof arguments->data_assignment, "data.root=%s",
                           arguments->data_root));
        TF_TRY(cli_config_add(&arguments->config, arguments->data_assignment));
    }
    TF_TRY(cli_config_load(&arguments->config, config));
    const char *config_path = arguments->config.path;

    memset(options, 0, sizeof *options);
    options->resume = arguments->resume_dir != NULL;
    options->max_steps = arguments->max_steps;
    if (arguments->resume_dir)
        TF_TRY(path_format(options->run_dir, sizeof options->run_dir, "%s", arguments->resume_dir));
    else if (arguments->out_dir)
        TF_TRY(path_format(options->run_dir, sizeof options->run_dir, "%s", arguments->out_dir));
    else
        TF_TRY(default_run_dir(config_path, options->run_dir, sizeof options->run_dir));
    if (arguments->init_from) TF_TRY(path_format(options->init_from, sizeof options->init_from, "%s", arguments->init_from));
    if (arguments->init_state)
        TF_TRY(path_format(options->init_state, sizeof options->init_state, "%s", arguments->init_state));
    return TF_OK;
}

int cmd_train(int argc, char **argv) {
    train_arguments arguments = {0};
    tf_config config;
    tf_train_options options;
    tf_status status = parse_arguments(argc, argv, &arguments);
    if (status == TF_OK) status = build_config(&arguments, &config, &options);
    tf_train_outcome outcome = TF_TRAIN_FINISHED;
    if (status == TF_OK) status = train_run(&config, &options, &outcome);
    if (status != TF_OK) return cli_report("train", status);
    return outcome == TF_TRAIN_INTERRUPTED ? 130 : 0;
}
