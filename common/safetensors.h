/* safetensors files: the checkpoint format (https://github.com/huggingface/safetensors).
 *
 * A file is an 8-byte little-endian u64 N, then N bytes of UTF-8 JSON, then the data section. The
 * JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative
 * to the data section) plus an optional "__metadata__" object of string -> string.
 *
 * Writing takes a table of tensors whose data lie in host memory and writes them contiguously in
 * the order given, after a header padded with spaces to a multiple of 8 bytes (as the reference
 * library does, so the data section starts 8-byte aligned). The write is atomic: a temporary file
 * in the same directory is written, fsynced and renamed over the target, so a crash or a failed
 * write leaves the old file as it was.
 *
 * Reading validates the whole header up front (every offset, size, dtype and overlap), so a
 * truncated or corrupt file is one clear error naming the file and the problem, and nothing after
 * safetensors_open() has to distrust the table. Tensor data are read on demand with pread, one
 * tensor at a time into the caller's buffer, so loading a checkpoint needs no second copy of it.
 *
 * Tensor data are raw little-endian bytes; this code assumes a little-endian host. */
#ifndef TF_COMMON_SAFETENSORS_H
#define TF_COMMON_SAFETENSORS_H

#include "common/error.h"

#include <stddef.h>
#include <stdint.h>

enum {
    SAFETENSORS_MAX_DIMS = 8,
};

/* The largest header accepted on read (the reference library's limit); a larger length means a
 * file that is not safetensors at all. */
#define SAFETENSORS_MAX_HEADER_BYTES 100000000ull

/* Bytes per element of a dtype name ("F32", "BF16", "I64", ...); 0 when the name is unknown. The
 * known names are those of the reference library with whole-byte elements: BOOL U8 I8 F8_E5M2
 * F8_E4M3 F8_E8M0 I16 U16 F16 BF16 I32 U32 F32 F64 I64 U64 C64. */
size_t safetensors_dtype_size(const char *dtype);

/* ---- writing ------------------------------------------------------------------------------- */

/* One tensor to write: product(shape) * dtype size bytes at data (ignored when that is 0). */
typedef struct {
    const char *name;
    const char *dtype;
    int ndim; /* 0 for a scalar */
    int64_t shape[SAFETENSORS_MAX_DIMS];
    const void *data;
} safetensors_tensor_data;

/* One "__metadata__" entry. */
typedef struct {
    const char *key;
    const char *value;
} safetensors_metadata_entry;

/* Writes the tensors (in this order) and metadata to path, atomically: path.tmp.<pid> is written,
 * flushed, fsynced and renamed over path, and the directory is fsynced. Bad input (duplicate or
 * reserved names, unknown dtype, negative dimension, missing data) is refused before any file is
 * touched. On failure the temporary file is removed and an existing file at path is left as it was. */
tf_status safetensors_write(const char *path, const safetensors_tensor_data *tensors, size_t n_tensors,
                            const safetensors_metadata_entry *metadata, size_t n_metadata);

/* ---- reading ------------------------------------------------------------------------------- */

/* One tensor of an open file, as its header entry describes it (already validated). */
typedef struct {
    char *name;
    const char *dtype; /* the canonical name, e.g. "F32" (static storage) */
    size_t dtype_size; /* bytes per element */
    int ndim;
    int64_t shape[SAFETENSORS_MAX_DIMS];
    size_t numel;    /* product(shape); 1 for a scalar */
    size_t nbytes;   /* numel * dtype_size */
    uint64_t offset; /* of the first byte, from the start of the file */
} safetensors_tensor;

typedef struct {
    char *path;
    int fd;
    uint64_t file_size;
    uint64_t data_start; /* 8 + header length */
    size_t n_tensors;
    safetensors_tensor *tensors; /* in order of their place in the data section */
    size_t n_metadata;
    safetensors_metadata_entry *metadata; /* in header order; the strings are owned by the file */
    const safetensors_tensor **by_name;   /* the tensors sorted by name, for safetensors_find */
} safetensors_file;

/* Opens path, reads and validates its header and builds the tensor table. On success *out is a
 * new file to pass to safetensors_close(); on failure *out is NULL and the error names the file
 * and what is wrong with it. */
tf_status safetensors_open(safetensors_file **out, const char *path);

/* Closes the file and frees the table; NULL is allowed. */
void safetensors_close(safetensors_file *file);

/* The tensor of that name, or NULL. */
const safetensors_tensor *safetensors_find(const safetensors_file *file, const char *name);

/* The metadata value of that key, or NULL when the file has none. */
const char *safetensors_metadata(const safetensors_file *file, const char *key);

/* Reads a tensor's bytes into dst, which holds dst_bytes; dst_bytes must equal tensor->nbytes. */
tf_status safetensors_read(const safetensors_file *file, const safetensors_tensor *tensor, void *dst,
                           size_t dst_bytes);

/* Finds name, checks that its dtype and shape are the expected ones and reads it into dst (which
 * holds product(shape) * dtype size bytes). A missing tensor or a different dtype or shape is an
 * error naming the file, the tensor and both sides of the mismatch. */
tf_status safetensors_load(const safetensors_file *file, const char *name, const char *dtype, int ndim,
                           const int64_t *shape, void *dst);

/* ---- checksums ----------------------------------------------------------------------------- */

/* 64-bit FNV-1a over bytes, continuing from hash (start with SAFETENSORS_FNV1A64_INIT). A test aid:
 * simple enough that an independent reader computes the same value in a few lines. */
#define SAFETENSORS_FNV1A64_INIT 0xcbf29ce484222325ull
uint64_t safetensors_fnv1a64(uint64_t hash, const void *data, size_t n);

/* FNV-1a of a tensor's bytes as stored in the file, read in bounded chunks (any size works). */
tf_status safetensors_checksum(const safetensors_file *file, const safetensors_tensor *tensor,
                               uint64_t *hash);

#endif
