/* The subcommands of `tokenformer`. Each returns the process exit code: 0, 1 (runtime failure) or
 * 2 (usage or configuration error), after printing what went wrong. argv[0] is the subcommand. */
#ifndef TF_CLI_COMMANDS_H
#define TF_CLI_COMMANDS_H

int cmd_train(int argc, char **argv);   /* train/cmd_train.c */
int cmd_eval(int argc, char **argv);    /* eval/cmd_eval.c */
int cmd_predict(int argc, char **argv); /* eval/cmd_predict.c */
int cmd_scale(int argc, char **argv);   /* vision/cmd_scale.c */
int cmd_bench(int argc, char **argv);   /* cli/cmd_bench.c */
int cmd_inspect(int argc, char **argv); /* cli/cmd_inspect.c */
int cmd_prepare(int argc, char **argv); /* dataloader/cmd_prepare.c */
int cmd_plot(int argc, char **argv);    /* train/cmd_plot.c */

/* Prints the help text of a subcommand (or the overview for NULL) to stdout; 0 if it exists. */
int cli_print_help(const char *command);

/* Ends a subcommand after a failure: prints "tokenformer CMD: message" and returns the status
 * (cli/args.c, in the library, so tests can run commands directly). */
int cli_report(const char *command, int status);

#endif
