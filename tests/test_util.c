/* Shared test helpers (see test_util.h). */
#include "tests/test_util.h"

#include "common/error.h"

#include <ftw.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks_run, checks_failed;

bool test_check(bool cond, const char *file, int line, const char *expr, const char *fmt, ...) {
    checks_run++;
    if (cond) return true;
    checks_failed++;
    fprintf(stderr, "FAIL %s:%d: %s: ", file, line, expr);
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fputc('\n', stderr);
    return false;
}

bool test_check_ok(int status, const char *file, int line, const char *expr) {
    return test_check(status == TF_OK, file, line, expr, "status %d: %s", status, tf_error_message());
}

double relative_error_f32(const float *a, const float *b, size_t n) {
    double diff = 0.0, ref = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        diff += d * d;
        ref += (double)b[i] * (double)b[i];
    }
    if (isnan(diff)) return INFINITY;
    return sqrt(diff) / fmax(sqrt(ref), 1e-30);
}

double relative_error_f64(const double *a, const double *b, size_t n) {
    double diff = 0.0, ref = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = a[i] - b[i];
        diff += d * d;
        ref += b[i] * b[i];
    }
    if (isnan(diff)) return INFINITY;
    return sqrt(diff) / fmax(sqrt(ref), 1e-300);
}

void fill_normal_f32(float *x, size_t n, float std, tf_rng *rng) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(std * tf_rng_normal(rng));
}

void fill_normal_f64(double *x, size_t n, double std, tf_rng *rng) {
    for (size_t i = 0; i < n; i++) x[i] = std * tf_rng_normal(rng);
}

bool test_make_temp_dir(char *path, size_t size, const char *name) {
    const char *tmp = getenv("TMPDIR");
    int length = snprintf(path, size, "%s/%s.XXXXXX", tmp && *tmp ? tmp : "/tmp", name);
    return length > 0 && (size_t)length < size && mkdtemp(path) != NULL;
}

bool test_make_dirs(const char *path) {
    char command[4200];
    snprintf(command, sizeof command, "mkdir -p '%s'", path);
    if (system(command) == 0) return true;
    fprintf(stderr, "cannot create %s\n", path);
    return false;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

void test_remove_tree(const char *path) {
    if (nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0) fprintf(stderr, "could not remove %s\n", path);
}

int test_skip(const char *reason) {
    printf("SKIP: %s\n", reason);
    return TEST_SKIP;
}

int test_finish(const char *test_name) {
    printf("%s: %d checks, %d failed\n", test_name, checks_run, checks_failed);
    return checks_failed ? 1 : 0;
}

tf_model_config test_small_model_config(void) {
    tf_model_config config = {
        .img_size = 8,
        .patch = 4,
        .channels = 3,
        .depth = 2,
        .dim = 8,
        .heads = 2,
        .n_attn = 6,
        .n_ffn = 10,
        .classes = 5,
        .pool = TF_POOL_AVG,
        .drop_path = 0.0f,
        .eps = 1e-6f,
    };
    config_fill_n_norm(&config);
    return config;
}
