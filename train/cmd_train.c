/* `tokenformer train`: reads the config and its overrides, then runs train_run(). */
#include "cli/args.h"
#include "cli/commands.h"
#include "common/config.h"
#include "common/path.h"
#include "train/train.h"

#include <libgen.h>
#include <stdio.h>
#include <string.h>

enum { MAX_OVERRIDES = 64 };

typedef struct {
    const char *config_path, *data_root, *out_dir, *device, *resume_dir, *init_from, *init_state;
    const char *overrides[MAX_OVERRIDES];
    int override_count;
    int max_steps;
} train_arguments;

static tf_status parse_arguments(int argc, char **argv, train_arguments *arguments) {
    cli_parser parser = cli_parser_make(argc, argv);
    const char *value;
    while (cli_more(&parser)) {
        if (cli_value(&parser, "--config", &arguments->config_path)) continue;
        if (cli_value(&parser, "--data", &arguments->data_root)) continue;
        if (cli_value(&parser, "--out", &arguments->out_dir)) continue;
        if (cli_value(&parser, "--device", &arguments->device)) continue;
        if (cli_value(&parser, "--resume", &arguments->resume_dir)) continue;
        if (cli_value(&parser, "--init-from", &arguments->init_from)) continue;
        if (cli_value(&parser, "--init-state", &arguments->init_state)) continue;
        if (cli_value(&parser, "--max-steps", &value)) {
            arguments->max_steps = cli_int(&parser, "--max-steps", value);
            continue;
        }
        if (cli_value(&parser, "--set", &value)) {
            if (arguments->override_count == MAX_OVERRIDES)
                return tf_fail(TF_ERR_USAGE, "more than %d --set options", MAX_OVERRIDES);
            arguments->overrides[arguments->override_count++] = value;
            continue;
        }
        cli_unknown(&parser);
    }
    TF_TRY(parser.status);
    if (!arguments->config_path && !arguments->resume_dir)
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

static tf_status build_config(const train_arguments *arguments, tf_config *config, tf_train_options *options) {
    char config_path[TF_PATH_MAX], assignment[TF_PATH_MAX + 32];
    if (arguments->config_path)
        TF_TRY(path_format(config_path, sizeof config_path, "%s", arguments->config_path));
    else
        TF_TRY(path_format(config_path, sizeof config_path, "%s/config.yaml", arguments->resume_dir));
    config_defaults(config);
    TF_TRY(config_load_file(config, config_path));
    for (int i = 0; i < arguments->override_count; i++) TF_TRY(config_set(config, arguments->overrides[i]));
    if (arguments->data_root) {
        TF_TRY(path_format(assignment, sizeof assignment, "data.root=%s", arguments->data_root));
        TF_TRY(config_set(config, assignment));
    }
    if (arguments->device) {
        TF_TRY(path_format(assignment, sizeof assignment, "run.device=%s", arguments->device));
        TF_TRY(config_set(config, assignment));
    }
    TF_TRY(config_finalize(config));

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
