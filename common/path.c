/* Paths (see path.h). */
#include "common/path.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

tf_status path_format(char *out, size_t out_size, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    int written = vsnprintf(out, out_size, fmt, args);
    va_end(args);
    if (written < 0 || (size_t)written >= out_size)
        return tf_fail(TF_ERR_USAGE, "path too long (over %zu bytes): %.80s...", out_size - 1, out);
    return TF_OK;
}

static tf_status make_directory(const char *path) {
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        return tf_fail(TF_ERR_RUNTIME, "cannot create directory %s: %s", path, strerror(errno));
    return TF_OK;
}

tf_status path_make_directories(const char *path) {
    char partial[4096];
    TF_TRY(path_format(partial, sizeof partial, "%s", path));
    for (char *slash = partial + 1; *slash; slash++) {
        if (*slash != '/') continue;
        *slash = '\0';
        TF_TRY(make_directory(partial));
        *slash = '/';
    }
    return make_directory(partial);
}
