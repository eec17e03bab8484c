/* Small helpers shared by the C tests: checks that count failures, relative errors, random
 * inputs. A test's main() returns test_finish(): 0 when every check passed, 1 otherwise, or
 * TEST_SKIP (77, which ctest reports as skipped) from test_skip(). */
#ifndef TF_TESTS_TEST_UTIL_H
#define TF_TESTS_TEST_UTIL_H

#include "common/config.h"
#include "common/rng.h"

#include <stdbool.h>
#include <stddef.h>

enum { TEST_SKIP = 77 };

/* Records a failure (with file and line) when cond is false; returns cond. */
#define CHECK(cond, ...) test_check((cond), __FILE__, __LINE__, #cond, __VA_ARGS__)
bool test_check(bool cond, const char *file, int line, const char *expr, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Checks a status; on failure prints the error message. */
#define CHECK_OK(expr) test_check_ok((expr), __FILE__, __LINE__, #expr)
bool test_check_ok(int status, const char *file, int line, const char *expr);

/* ||a - b|| / max(||b||, tiny) over n values. */
double relative_error_f32(const float *a, const float *b, size_t n);
double relative_error_f64(const double *a, const double *b, size_t n);

/* Fills with N(0, std^2) / U(-limit, limit) from the test stream of the rng. */
void fill_normal_f32(float *x, size_t n, float std, tf_rng *rng);
void fill_normal_f64(double *x, size_t n, double std, tf_rng *rng);

/* The C tests' small model: 8 x 8 images in 4 x 4 patches, depth 2, width 8 in 2 heads, 6
 * attention and 10 FFN parameter tokens, 5 classes, mean pooling, no drop path, each n_norm its
 * token count. A test changes the fields it exercises. */
tf_model_config test_small_model_config(void);

/* Scratch directories of the tests that write files: a new TMPDIR/<name>.XXXXXX (/tmp without
 * TMPDIR) into path, false when it cannot be made; mkdir -p, saying which path failed; and the
 * removal of a whole tree (links not followed), saying so when it fails. */
bool test_make_temp_dir(char *path, size_t size, const char *name);
bool test_make_dirs(const char *path);
void test_remove_tree(const char *path);

/* Prints a one-line reason and returns TEST_SKIP. */
int test_skip(const char *reason);

/* Prints the summary line and returns the exit code for main(). */
int test_finish(const char *test_name);

#endif
