/* NumPy .npy writer (see npy.h). The layout of version 1.0: the magic "\x93NUMPY", the version
 * bytes 1 and 0, the header length as a little-endian uint16, then the header: a Python dict
 * literal, padded with spaces and ended by '\n' so that the data starts at a multiple of 64. */
#include "eval/npy.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

enum { NPY_PREAMBLE_BYTES = 10, NPY_ALIGNMENT = 64 };

/* The dict literal as numpy writes it: "(3,)" for one dimension, "()" for a scalar. */
static tf_status format_header_dict(char *out, size_t out_size, const int64_t *shape, int ndim,
                                    const char *path, size_t *count) {
    char dims[NPY_MAX_DIMS * 24 + 4] = "";
    size_t length = 0;
    *count = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return tf_fail(TF_ERR_RUNTIME, "%s: dimension %d is negative (%" PRId64 ")", path, i, shape[i]);
        length +=
            (size_t)snprintf(dims + length, sizeof dims - length, "%s%" PRId64, i ? ", " : "", shape[i]);
        *count *= (size_t)shape[i];
    }
    if (ndim == 1) snprintf(dims + length, sizeof dims - length, ",");
    int written = snprintf(out, out_size, "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }", dims);
    if (written < 0 || (size_t)written >= out_size)
        return tf_fail(TF_ERR_RUNTIME, "%s: .npy header does not fit", path);
    return TF_OK;
}

static tf_status write_failed(npy_writer *writer) {
    tf_status status = tf_fail(TF_ERR_RUNTIME, "cannot write %s: %s", writer->path, strerror(errno));
    npy_writer_abort(writer);
    return status;
}

tf_status npy_writer_open(npy_writer *writer, const char *path, const int64_t *shape, int ndim) {
    memset(writer, 0, sizeof *writer);
    if (ndim < 0 || ndim > NPY_MAX_DIMS)
        return tf_fail(TF_ERR_RUNTIME, "%s: %d dimensions (0 to %d are supported)", path, ndim, NPY_MAX_DIMS);
    char header[NPY_MAX_DIMS * 24 + 128];
    TF_TRY(format_header_dict(header, sizeof header, shape, ndim, path, &writer->expected));
    /* Pad with spaces, then '\n', so that preamble + header is a multiple of 64. */
    size_t length = strlen(header);
    size_t padded = (NPY_PREAMBLE_BYTES + length + 1 + NPY_ALIGNMENT - 1) / NPY_ALIGNMENT * NPY_ALIGNMENT -
                    NPY_PREAMBLE_BYTES;
    memset(header + length, ' ', padded - length - 1);
    header[padded - 1] = '\n';
    unsigned char preamble[NPY_PREAMBLE_BYTES] = {
        0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(padded & 0xff), (unsigned char)(padded >> 8)};
    if (!(writer->path = strdup(path))) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", path);
    if (!(writer->file = fopen(path, "wb"))) {
        tf_status status = tf_fail(TF_ERR_RUNTIME, "cannot create %s: %s", path, strerror(errno));
        free(writer->path);
        writer->path = NULL;
        return status;
    }
    if (fwrite(preamble, 1, sizeof preamble, writer->file) != sizeof preamble ||
        fwrite(header, 1, padded, writer->file) != padded)
        return write_failed(writer);
    return TF_OK;
}

tf_status npy_writer_append(npy_writer *writer, const float *values, size_t count) {
    if (writer->written + count > writer->expected) {
        tf_status status = tf_fail(TF_ERR_RUNTIME, "%s: %zu values appended to an array of %zu", writer->path,
                                   writer->written + count, writer->expected);
        npy_writer_abort(writer);
        return status;
    }
    if (count && fwrite(values, sizeof *values, count, writer->file) != count) return write_failed(writer);
    writer->written += count;
    return TF_OK;
}

tf_status npy_writer_close(npy_writer *writer) {
    if (writer->written != writer->expected) {
        tf_status status = tf_fail(TF_ERR_RUNTIME, "%s: %zu of the array's %zu values were written",
                                   writer->path, writer->written, writer->expected);
        npy_writer_abort(writer);
        return status;
    }
    if (fclose(writer->file) != 0) {
        writer->file = NULL;
        return write_failed(writer);
    }
    free(writer->path);
    memset(writer, 0, sizeof *writer);
    return TF_OK;
}

void npy_writer_abort(npy_writer *writer) {
    if (writer->file) fclose(writer->file);
    if (writer->path) remove(writer->path);
    free(writer->path);
    memset(writer, 0, sizeof *writer);
}

tf_status npy_write_float32(const char *path, const float *values, const int64_t *shape, int ndim) {
    npy_writer writer;
    TF_TRY(npy_writer_open(&writer, path, shape, ndim));
    TF_TRY(npy_writer_append(&writer, values, writer.expected));
    return npy_writer_close(&writer);
}
