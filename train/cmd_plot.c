/* `tokenformer plot`: the loss, learning-rate and accuracy curves of a run (RUN_DIR/metrics.jsonl,
 * written by train/train.c), or of several runs on the same axes (--compare), drawn into a PNG by
 * Debian's gnuplot (package gnuplot-nox).
 *
 * The records are copied into whitespace-separated data files in a temporary directory, next to a
 * gnuplot script written here, and gnuplot runs as `gnuplot -c SCRIPT DIR OUT TITLE` through
 * posix_spawnp, without a shell. Nothing the user typed becomes script text: the directory, the
 * output path and the title reach the script as ARG1..ARG3, and the legend entries of --compare as
 * the data files' column headers, so a path with quotes, backquotes or '@' cannot run anything. */
#include "cli/args.h"
#include "cli/commands.h"
#include "common/config.h"
#include "common/error.h"
#include "common/log.h"
#include "common/path.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

enum { PLOT_TRAIN = 0, PLOT_EVAL = 1, PLOT_TABLES = 2, PLOT_MAX_COLUMNS = 8, PLOT_NAME_MAX = 256 };

/* One data file per record type and run; column 1 is the x axis. */
typedef struct {
    const char *type; /* the records' "type" */
    int columns;
    const char *keys[PLOT_MAX_COLUMNS];   /* the JSON key of each column */
    const char *labels[PLOT_MAX_COLUMNS]; /* its legend entry */
} plot_table;

static const plot_table plot_tables[PLOT_TABLES] = {
    {"train", 4, {"epoch", "step", "loss", "lr"}, {"epoch", "step", "train loss", "lr"}},
    {"eval",
     8,
     {"epoch", "step", "top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"},
     {"epoch", "step", "top-1", "top-5", "val loss", "EMA top-1", "EMA top-5", "EMA val loss"}},
};

/* The three panels, top to bottom. */
typedef struct {
    const char *ylabel, *key, *y_format, *empty;
} plot_panel;

static const plot_panel plot_panels[] = {
    {"loss", "top right", "%g", "no loss records"},
    {"learning rate", "top right", "%.1e", "no training records"},
    {"accuracy (%)", "bottom right", "%g", "no evaluation records yet"},
};
enum { PLOT_PANELS = sizeof plot_panels / sizeof plot_panels[0] };

/* One curve. With one run the series tell each other apart by colour (EMA dashed, in the colour of
 * its model curve); with --compare the colour is the run's and the dash type tells the series. */
typedef struct {
    int panel, table, column; /* column: 1-based, as gnuplot counts */
    int color, dash;          /* one run */
    int compare_dash;         /* --compare; 0: left out there, to keep the legend short */
} plot_series;

static const plot_series plot_series_list[] = {
    {0, PLOT_TRAIN, 3, 1, 1, 1}, /* train loss */
    {0, PLOT_EVAL, 5, 2, 1, 2},  /* val loss */
    {0, PLOT_EVAL, 8, 2, 2, 0},  /* EMA val loss */
    {1, PLOT_TRAIN, 4, 1, 1, 1}, /* lr */
    {2, PLOT_EVAL, 3, 1, 1, 1},  /* top-1 */
    {2, PLOT_EVAL, 4, 2, 1, 2},  /* top-5 */
    {2, PLOT_EVAL, 6, 1, 2, 3},  /* EMA top-1 */
    {2, PLOT_EVAL, 7, 2, 2, 0},  /* EMA top-5 */
};
enum { PLOT_SERIES = sizeof plot_series_list / sizeof plot_series_list[0] };

typedef struct {
    const char *dir;
    char name[PLOT_NAME_MAX]; /* legend prefix of --compare: the directory as given, made header-safe */
    size_t records[PLOT_TABLES];
    bool finite[PLOT_TABLES][PLOT_MAX_COLUMNS + 1]; /* [table][column]: some value to draw */
    double epoch_min, epoch_max;
    size_t malformed, first_malformed; /* lines that are not records, and the first one's number */
} plot_run;

typedef struct {
    plot_run *runs;
    int count;
    bool compare;
    const char *out;
    char workspace[TF_PATH_MAX]; /* the temporary directory; "" until made */
} plot_job;

/* ---- reading metrics.jsonl into data files --------------------------------------------------- */

/* A legend entry inside a gnuplot column header "...": no quotes, backslashes or control characters. */
static void header_safe_name(const char *dir, char *name) {
    size_t length = strlen(dir);
    while (length > 1 && dir[length - 1] == '/')
        length--;
    if (length >= PLOT_NAME_MAX) length = PLOT_NAME_MAX - 1;
    for (size_t i = 0; i < length; i++) {
        unsigned char c = (unsigned char)dir[i];
        name[i] = c == '"' ? '\'' : c == '\\' ? '/' : c < 32 || c == 127 ? ' ' : (char)c;
    }
    name[length] = '\0';
}

static void write_header(FILE *file, const plot_table *table, const char *prefix) {
    for (int c = 0; c < table->columns; c++)
        fprintf(file, "%s\"%s%s%s\"", c ? " " : "", prefix, *prefix ? " " : "", table->labels[c]);
    fputc('\n', file);
}

/* A record's value of key, NaN (gnuplot's "no value") when absent or not finite. */
static double record_number(const cJSON *record, const char *key) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(record, key);
    return cJSON_IsNumber(item) && isfinite(item->valuedouble) ? item->valuedouble : NAN;
}

static void write_record(plot_run *run, int table_index, const cJSON *record, FILE *file) {
    const plot_table *table = &plot_tables[table_index];
    for (int c = 0; c < table->columns; c++) {
        double value = record_number(record, table->keys[c]);
        if (isnan(value)) {
            fprintf(file, "%sNaN", c ? " " : "");
            continue;
        }
        fprintf(file, "%s%.10g", c ? " " : "", value);
        run->finite[table_index][c + 1] = true;
    }
    fputc('\n', file);
    double epoch = record_number(record, "epoch");
    if (run->records[0] + run->records[1] == 0 || epoch < run->epoch_min) run->epoch_min = epoch;
    if (run->records[0] + run->records[1] == 0 || epoch > run->epoch_max) run->epoch_max = epoch;
    run->records[table_index]++;
}

/* One line of metrics.jsonl: a train or eval record with an epoch goes to its data file; records of
 * other types are skipped; anything else is counted as malformed (the torn last line of a killed
 * run, say). */
static void read_line(plot_run *run, const char *line, size_t line_number, FILE *files[PLOT_TABLES]) {
    if (strspn(line, " \t\r\n") == strlen(line)) return;
    cJSON *record = cJSON_Parse(line);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(record, "type");
    if (!cJSON_IsObject(record) || !cJSON_IsString(type) || isnan(record_number(record, "epoch"))) {
        if (run->malformed++ == 0) run->first_malformed = line_number;
    } else {
        for (int t = 0; t < PLOT_TABLES; t++)
            if (strcmp(type->valuestring, plot_tables[t].type) == 0) write_record(run, t, record, files[t]);
    }
    cJSON_Delete(record);
}

static tf_status open_data_files(const plot_job *job, int index, FILE *files[PLOT_TABLES]) {
    for (int t = 0; t < PLOT_TABLES; t++) {
        char path[TF_PATH_MAX];
        TF_TRY(path_format(path, sizeof path, "%s/%s_%d.dat", job->workspace, plot_tables[t].type, index));
        files[t] = fopen(path, "w");
        if (!files[t]) return tf_fail(TF_ERR_RUNTIME, "cannot write %s: %s", path, strerror(errno));
        write_header(files[t], &plot_tables[t], job->compare ? job->runs[index].name : "");
    }
    return TF_OK;
}

static tf_status copy_records(plot_run *run, const char *metrics_path, FILE *metrics,
                              FILE *files[PLOT_TABLES]) {
    char *line = NULL;
    size_t capacity = 0, line_number = 0;
    while (getline(&line, &capacity, metrics) >= 0)
        read_line(run, line, ++line_number, files);
    free(line);
    if (ferror(metrics)) return tf_fail(TF_ERR_RUNTIME, "cannot read %s: %s", metrics_path, strerror(errno));
    if (run->records[PLOT_TRAIN] + run->records[PLOT_EVAL] == 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: no train or eval records", metrics_path);
    if (run->malformed)
        tf_log("%s: skipped %zu line%s that %s not train or eval records (the first is line %zu)",
               metrics_path, run->malformed, run->malformed == 1 ? "" : "s",
               run->malformed == 1 ? "is" : "are", run->first_malformed);
    return TF_OK;
}

static tf_status read_run(plot_job *job, int index) {
    plot_run *run = &job->runs[index];
    char metrics_path[TF_PATH_MAX];
    int length = (int)strlen(run->dir);
    while (length > 1 && run->dir[length - 1] == '/')
        length--;
    TF_TRY(path_format(metrics_path, sizeof metrics_path, "%.*s/metrics.jsonl", length, run->dir));
    FILE *metrics = fopen(metrics_path, "r");
    if (!metrics)
        return tf_fail(TF_ERR_RUNTIME, "no metrics.jsonl in %s: cannot open %s: %s%s", run->dir, metrics_path,
                       strerror(errno),
                       errno == ENOENT ? " (is it a run directory of `tokenformer train`?)" : "");
    FILE *files[PLOT_TABLES] = {NULL, NULL};
    tf_status status = open_data_files(job, index, files);
    if (status == TF_OK) status = copy_records(run, metrics_path, metrics, files);
    fclose(metrics);
    for (int t = 0; t < PLOT_TABLES; t++)
        if (files[t] && fclose(files[t]) != 0 && status == TF_OK)
            status = tf_fail(TF_ERR_RUNTIME, "cannot write the data of %s in %s", run->dir, job->workspace);
    return status;
}

/* ---- the gnuplot script ---------------------------------------------------------------------- */

static void write_script_header(FILE *script, const plot_job *job) {
    double low = INFINITY, high = -INFINITY;
    for (int r = 0; r < job->count; r++) {
        low = fmin(low, job->runs[r].epoch_min);
        high = fmax(high, job->runs[r].epoch_max);
    }
    if (high <= low) high = low + 1.0; /* one point in time: an axis of one epoch */
    fputs("# Written by `tokenformer plot`; run as gnuplot -c plot.gp DATA_DIR OUT.png TITLE.\n"
          "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
          "    set terminal pngcairo size 1000,1200 noenhanced font ',10'\n"
          "} else {\n"
          "    set terminal png size 1000,1200 noenhanced\n"
          "}\n"
          "set output ARG2\n"
          "run_file(name) = ARG1.'/'.name\n"
          "set multiplot layout 3,1 title ARG3 noenhanced\n"
          "set key autotitle columnheader noenhanced\n"
          "set grid\n"
          "set lmargin 12\n"
          "set rmargin 4\n"
          "set xlabel 'epoch'\n",
          script);
    fprintf(script, "set xrange [%.10g:%.10g]\n", low, high);
}

/* Writes the plot clauses of one panel; returns how many. */
static int write_panel_clauses(FILE *script, const plot_job *job, int panel) {
    int clauses = 0;
    for (int r = 0; r < job->count; r++)
        for (int s = 0; s < PLOT_SERIES; s++) {
            const plot_series *series = &plot_series_list[s];
            if (series->panel != panel || !job->runs[r].finite[series->table][series->column]) continue;
            if (job->compare && series->compare_dash == 0) continue;
            int color = job->compare ? r + 1 : series->color;
            int dash = job->compare ? series->compare_dash : series->dash;
            fprintf(script,
                    "%s run_file('%s_%d.dat') using 1:%d with %s lc %d dt %d lw 1.5 title columnheader(%d)",
                    clauses ? ", \\\n" : "plot", plot_tables[series->table].type, r, series->column,
                    series->table == PLOT_EVAL ? "linespoints pt 7 ps 0.6" : "lines", color, dash,
                    series->column);
            clauses++;
        }
    if (clauses) fputc('\n', script);
    return clauses;
}

static void write_panel(FILE *script, const plot_job *job, int panel) {
    const plot_panel *spec = &plot_panels[panel];
    fprintf(script, "\n# %s\nset ylabel '%s'\nset key %s\nset format y '%s'\n", spec->ylabel, spec->ylabel,
            spec->key, spec->y_format);
    if (write_panel_clauses(script, job, panel)) return;
    /* gnuplot cannot draw nothing: an empty frame with a note, on fixed axes */
    fprintf(script,
            "set yrange [0:1]\nunset ytics\nset label 1 '%s' at graph 0.5, 0.5 center\nplot NaN notitle\n"
            "unset label 1\nset ytics\nset autoscale y\n",
            spec->empty);
}

static tf_status write_script(const plot_job *job, const char *path) {
    FILE *script = fopen(path, "w");
    if (!script) return tf_fail(TF_ERR_RUNTIME, "cannot write %s: %s", path, strerror(errno));
    write_script_header(script, job);
    for (int panel = 0; panel < PLOT_PANELS; panel++)
        write_panel(script, job, panel);
    fputs("\nunset multiplot\n", script);
    if (fclose(script) != 0) return tf_fail(TF_ERR_RUNTIME, "cannot write %s", path);
    return TF_OK;
}

/* ---- running gnuplot ------------------------------------------------------------------------- */

/* The end of gnuplot's messages, trimmed, into message. */
static void read_messages(const char *path, char *message, size_t size) {
    message[0] = '\0';
    FILE *file = fopen(path, "r");
    if (!file) return;
    if (fseek(file, 0, SEEK_END) == 0 && ftell(file) > (long)size - 1)
        fseek(file, -((long)size - 1), SEEK_END);
    else
        rewind(file);
    size_t length = fread(message, 1, size - 1, file);
    fclose(file);
    while (length && strchr(" \t\r\n", message[length - 1]))
        length--;
    message[length] = '\0';
    size_t start = strspn(message, " \t\r\n");
    memmove(message, message + start, length - start + 1);
}

static tf_status describe_failure(int wait_status, const char *log_path) {
    char messages[2048];
    read_messages(log_path, messages, sizeof messages);
    char how[64];
    if (WIFEXITED(wait_status))
        snprintf(how, sizeof how, "exit status %d", WEXITSTATUS(wait_status));
    else
        snprintf(how, sizeof how, "killed by signal %d",
                 WIFSIGNALED(wait_status) ? WTERMSIG(wait_status) : 0);
    return tf_fail(TF_ERR_RUNTIME, "gnuplot failed (%s): %s", how, messages[0] ? messages : "no message");
}

/* gnuplot -c SCRIPT DIR OUT TITLE, its stdout and stderr into log_path, stdin from /dev/null. */
static tf_status run_gnuplot(const plot_job *job, const char *script, const char *title,
                             const char *log_path) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
    char *arguments[] = {"gnuplot",     "-c", (char *)script, (char *)job->workspace, (char *)job->out,
                         (char *)title, NULL};
    pid_t pid;
    int error = posix_spawnp(&pid, "gnuplot", &actions, NULL, arguments, environ);
    posix_spawn_file_actions_destroy(&actions);
    if (error == ENOENT)
        return tf_fail(TF_ERR_RUNTIME, "gnuplot not found: install it with `apt-get install gnuplot-nox`");
    if (error) return tf_fail(TF_ERR_RUNTIME, "cannot start gnuplot: %s", strerror(error));
    int wait_status;
    while (waitpid(pid, &wait_status, 0) < 0)
        if (errno != EINTR) return tf_fail(TF_ERR_RUNTIME, "waiting for gnuplot: %s", strerror(errno));
    if (!WIFEXITED(wait_status) || WEXITSTATUS(wait_status) != 0)
        return describe_failure(wait_status, log_path);
    return TF_OK;
}

/* ---- the command ----------------------------------------------------------------------------- */

/* The output must be writable before gnuplot runs: where `set output` fails, gnuplot would write
 * the PNG to its stdout instead. */
static tf_status check_output(const char *out) {
    FILE *file = fopen(out, "wb");
    if (!file) return tf_fail(TF_ERR_RUNTIME, "cannot write %s: %s", out, strerror(errno));
    fclose(file);
    return TF_OK;
}

static tf_status draw(plot_job *job) {
    char pattern[TF_PATH_MAX], script[TF_PATH_MAX], log_path[TF_PATH_MAX], title[TF_PATH_MAX];
    TF_TRY(path_format(pattern, sizeof pattern, "%s/tokenformer-plot-XXXXXX", P_tmpdir));
    if (!mkdtemp(pattern))
        return tf_fail(TF_ERR_RUNTIME, "cannot make a directory %s: %s", pattern, strerror(errno));
    snprintf(job->workspace, sizeof job->workspace, "%s", pattern);
    for (int r = 0; r < job->count; r++)
        TF_TRY(read_run(job, r));
    TF_TRY(path_format(script, sizeof script, "%s/plot.gp", job->workspace));
    TF_TRY(path_format(log_path, sizeof log_path, "%s/gnuplot.log", job->workspace));
    TF_TRY(write_script(job, script));
    if (job->compare)
        snprintf(title, sizeof title, "%d runs", job->count);
    else
        snprintf(title, sizeof title, "%s", job->runs[0].dir);
    TF_TRY(check_output(job->out));
    tf_status status = run_gnuplot(job, script, title, log_path);
    struct stat info;
    if (status == TF_OK && (stat(job->out, &info) != 0 || info.st_size == 0))
        status = tf_fail(TF_ERR_RUNTIME, "gnuplot wrote nothing to %s", job->out);
    if (status != TF_OK) remove(job->out);
    return status;
}

/* Removes the temporary directory and the files in it (all of them ours). */
static void remove_workspace(const char *workspace) {
    if (!workspace[0]) return;
    DIR *directory = opendir(workspace);
    if (directory) {
        for (struct dirent *entry; (entry = readdir(directory));) {
            if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
            char path[TF_PATH_MAX];
            if (path_format(path, sizeof path, "%s/%s", workspace, entry->d_name) == TF_OK) unlink(path);
        }
        closedir(directory);
    }
    rmdir(workspace);
}

static tf_status parse_arguments(int argc, char **argv, plot_job *job, char *default_out, size_t size) {
    cli_parser parser = cli_parser_make(argc, argv);
    const char *dir;
    while (cli_more(&parser)) {
        if (cli_value(&parser, "--out", &job->out)) continue;
        if (cli_flag(&parser, "--compare")) {
            job->compare = true;
            continue;
        }
        if (cli_positional(&parser, &dir)) {
            job->runs[job->count++].dir = dir;
            continue;
        }
        cli_unknown(&parser);
    }
    TF_TRY(parser.status);
    if (job->count == 0)
        return tf_fail(TF_ERR_USAGE,
                       "give a run directory, or several with --compare (see 'tokenformer help plot')");
    if (job->count > 1 && !job->compare)
        return tf_fail(TF_ERR_USAGE, "%d run directories given: draw several with --compare RUN_A RUN_B ...",
                       job->count);
    for (int r = 0; r < job->count; r++)
        header_safe_name(job->runs[r].dir, job->runs[r].name);
    if (!job->out) {
        if (job->compare)
            TF_TRY(path_format(default_out, size, "compare.png"));
        else
            TF_TRY(path_format(default_out, size, "%s/curves.png", job->runs[0].dir));
        job->out = default_out;
    }
    return TF_OK;
}

int cmd_plot(int argc, char **argv) {
    plot_job job = {.runs = calloc((size_t)argc, sizeof(plot_run))};
    char default_out[TF_PATH_MAX];
    tf_status status = job.runs ? parse_arguments(argc, argv, &job, default_out, sizeof default_out)
                                : tf_fail(TF_ERR_RUNTIME, "out of memory");
    if (status == TF_OK) status = draw(&job);
    remove_workspace(job.workspace);
    if (status == TF_OK) printf("wrote %s\n", job.out);
    free(job.runs);
    return cli_report("plot", status);
}
