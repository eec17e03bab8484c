/* NumPy .npy files of float32 arrays, for cross-checking our inputs and outputs with other
 * frameworks (`tokenformer predict --dump-input / --dump-logits`): format version 1.0, dtype
 * '<f4', C order, the header padded with spaces to a multiple of 64 bytes as numpy writes it, so
 * numpy.load() reads the file and may memory-map it. The host is little-endian (as the
 * safetensors code assumes), so values are written as they lie in memory.
 *
 * A writer streams an array whose shape is known up front: the header first, the values in C
 * order by any number of appends, and close checks that exactly the shape's count arrived. A
 * failed or abandoned file is removed, so no half-written array is left looking valid. */
#ifndef TF_EVAL_NPY_H
#define TF_EVAL_NPY_H

#include "common/error.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum { NPY_MAX_DIMS = 8 };

typedef struct {
    FILE *file;
    char *path;
    size_t expected; /* values the shape holds */
    size_t written;  /* values appended so far */
} npy_writer;

/* Creates path and writes the header of a float32 array of shape [ndim] (ndim 0 to NPY_MAX_DIMS). */
tf_status npy_writer_open(npy_writer *writer, const char *path, const int64_t *shape, int ndim);
/* Appends count values, the next ones in C order. */
tf_status npy_writer_append(npy_writer *writer, const float *values, size_t count);
/* Closes the file; an error (and the file removed) when fewer or more values than the shape holds
 * were appended, or the data did not reach the disk. */
tf_status npy_writer_close(npy_writer *writer);
/* Closes and removes the file (after a failure elsewhere). Safe on a writer never opened. */
void npy_writer_abort(npy_writer *writer);

/* The whole array at once: open, append, close. */
tf_status npy_write_float32(const char *path, const float *values, const int64_t *shape, int ndim);

#endif
