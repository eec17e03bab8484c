/* Thread-local error messages (see error.h). */
#include "common/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

enum { TF_ERROR_MESSAGE_MAX = 4096 };
static _Thread_local char error_message[TF_ERROR_MESSAGE_MAX];

tf_status tf_fail(tf_status code, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(error_message, sizeof error_message, fmt, args);
    va_end(args);
    return code;
}

tf_status tf_fail_context(tf_status code, const char *fmt, ...) {
    char previous[TF_ERROR_MESSAGE_MAX];
    memcpy(previous, error_message, sizeof previous);
    va_list args;
    va_start(args, fmt);
    int written = vsnprintf(error_message, sizeof error_message, fmt, args);
    va_end(args);
    if (written >= 0 && (size_t)written < sizeof error_message)
        snprintf(error_message + written, sizeof error_message - (size_t)written, ": %s", previous);
    return code;
}

const char *tf_error_message(void) {
    return error_message;
}
