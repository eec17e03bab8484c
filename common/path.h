/* File-system paths built from parts, with an error instead of silent truncation. */
#ifndef TF_COMMON_PATH_H
#define TF_COMMON_PATH_H

#include "common/error.h"

#include <stddef.h>

/* out = printf(fmt, ...); an error naming the start of the path when it does not fit. */
tf_status path_format(char *out, size_t out_size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* mkdir -p path */
tf_status path_make_directories(const char *path);

#endif
