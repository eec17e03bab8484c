/* Small helpers shared by the C tests: checks that count failures, relative errors, random
 * inputs. A test's main() returns test_finish(): 0 when every check passed, 1 otherwise, or
 * TEST_SKIP (77, which ctest reports as skipped) from test_skip(). */
#ifndef TF_TESTS_TEST_UTIL_H
#define TF_TESTS_TEST_UTIL_H

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

/* Prints a one-line reason and returns TEST_SKIP. */
int test_skip(const char *reason);

/* Prints the summary line and returns the exit code for main(). */
int test_finish(const char *test_name);

#endif
