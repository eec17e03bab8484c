/* The one error type of the project.
 *
 * A function that can fail returns tf_status. On failure it records a message for the calling
 * thread with tf_fail() (what failed and where: file, key, tensor name, CUDA call) and returns the
 * status; callers that add context use tf_fail_context(). main() prints tf_error_message() and
 * exits with the status: 1 for runtime failures, 2 for usage or configuration errors. */
#ifndef TF_COMMON_ERROR_H
#define TF_COMMON_ERROR_H

typedef enum {
    TF_OK = 0,
    TF_ERR_RUNTIME = 1, /* I/O, corrupt files, device failures */
    TF_ERR_USAGE = 2,   /* bad command line or configuration */
} tf_status;

/* Records a printf-style message for this thread and returns code. */
tf_status tf_fail(tf_status code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prepends "context: " to this thread's current message and returns code. */
tf_status tf_fail_context(tf_status code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The last message recorded by this thread ("" if none). */
const char *tf_error_message(void);

/* Returns from the calling function when expr fails, passing its status up. */
#define TF_TRY(expr)                                                                                         \
    do {                                                                                                     \
        tf_status tf_try_status_ = (expr);                                                                   \
        if (tf_try_status_ != TF_OK) return tf_try_status_;                                                  \
    } while (0)

#endif
