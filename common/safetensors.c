/* safetensors reader and writer (see safetensors.h). The JSON header is built and parsed with
 * cJSON; everything the header claims is checked against the file before a table is handed out. */
#include "common/safetensors.h"

#include <cjson/cJSON.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data are little-endian and are read and written as raw host bytes"
#endif

/* Reads and writes go in pieces of at most 1 GiB: Linux moves at most about 2 GiB per call. */
#define SAFETENSORS_IO_CHUNK ((size_t)1 << 30)
/* cJSON keeps numbers as doubles, which hold every integer up to 2^53 exactly. */
#define SAFETENSORS_MAX_JSON_INTEGER 9007199254740992.0
#define SAFETENSORS_METADATA_KEY     "__metadata__"

/* ---- dtypes -------------------------------------------------------------------------------- */

typedef struct {
    const char *name;
    size_t size;
} dtype_info;

/* The reference library's dtypes with whole-byte elements (F4 and F6 pack several per byte). */
static const dtype_info dtypes[] = {
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1},
    {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},     {"U32", 4},
    {"F32", 4},  {"F64", 8}, {"I64", 8}, {"U64", 8},     {"C64", 8},
};

static const dtype_info *dtype_lookup(const char *name) {
    if (name == NULL) return NULL;
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (strcmp(dtypes[i].name, name) == 0) return &dtypes[i];
    return NULL;
}

size_t safetensors_dtype_size(const char *dtype) {
    const dtype_info *info = dtype_lookup(dtype);
    return info ? info->size : 0;
}

/* product(shape) * element_size, or false when it does not fit in 64 bits. */
static bool shape_bytes(int ndim, const int64_t *shape, size_t element_size, uint64_t *numel,
                        uint64_t *nbytes) {
    uint64_t n = 1;
    for (int d = 0; d < ndim; d++)
        if (__builtin_mul_overflow(n, (uint64_t)shape[d], &n)) return false;
    *numel = n;
    return !__builtin_mul_overflow(n, (uint64_t)element_size, nbytes) && *nbytes <= SIZE_MAX;
}

static void format_shape(char *buf, size_t size, int ndim, const int64_t *shape) {
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < ndim && used < size; d++)
        used += (size_t)snprintf(buf + used, size - used, "%s%" PRId64, d ? ", " : "", shape[d]);
    if (used < size) snprintf(buf + used, size - used, "]");
}

static int compare_strings(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The first name that occurs twice, or NULL; names is sorted in place. */
static const char *sorted_duplicate(const char **names, size_t n) {
    qsort(names, n, sizeof names[0], compare_strings);
    for (size_t i = 1; i < n; i++)
        if (strcmp(names[i - 1], names[i]) == 0) return names[i];
    return NULL;
}

/* ---- low-level I/O ------------------------------------------------------------------------- */

static bool write_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n > 0) {
        ssize_t written = write(fd, p, n < SAFETENSORS_IO_CHUNK ? n : SAFETENSORS_IO_CHUNK);
        if (written < 0 && errno == EINTR) continue;
        if (written <= 0) {
            if (written == 0) errno = EIO;
            return false;
        }
        p += written;
        n -= (size_t)written;
    }
    return true;
}

/* Reads exactly n bytes at offset; false with errno set on error, or errno 0 at end of file. */
static bool pread_all(int fd, void *data, size_t n, uint64_t offset) {
    char *p = data;
    while (n > 0) {
        ssize_t got = pread(fd, p, n < SAFETENSORS_IO_CHUNK ? n : SAFETENSORS_IO_CHUNK, (off_t)offset);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            if (got == 0) errno = 0;
            return false;
        }
        p += got;
        n -= (size_t)got;
        offset += (uint64_t)got;
    }
    return true;
}

static const char *read_error_text(void) {
    return errno ? strerror(errno) : "unexpected end of file";
}

/* ---- writing ------------------------------------------------------------------------------- */

static tf_status check_tensor_input(const char *path, size_t index, const safetensors_tensor_data *t,
                                    uint64_t *nbytes) {
    if (t->name == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: tensor %zu has no name", path, index);
    if (strcmp(t->name, SAFETENSORS_METADATA_KEY) == 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: \"%s\" is reserved and cannot name a tensor", path, t->name);
    const dtype_info *dtype = dtype_lookup(t->dtype);
    if (dtype == NULL)
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": unknown dtype \"%s\"", path, t->name,
                       t->dtype ? t->dtype : "(null)");
    if (t->ndim < 0 || t->ndim > SAFETENSORS_MAX_DIMS)
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": %d dimensions (0 to %d are supported)", path,
                       t->name, t->ndim, SAFETENSORS_MAX_DIMS);
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] < 0)
            return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": dimension %d is negative (%" PRId64 ")", path,
                           t->name, d, t->shape[d]);
    uint64_t numel;
    if (!shape_bytes(t->ndim, t->shape, dtype->size, &numel, nbytes))
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": size overflows", path, t->name);
    if (*nbytes > 0 && t->data == NULL)
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\" has no data", path, t->name);
    return TF_OK;
}

static tf_status check_metadata_input(const char *path, const safetensors_metadata_entry *metadata,
                                      size_t n_metadata) {
    const char **keys = malloc((n_metadata ? n_metadata : 1) * sizeof keys[0]);
    if (keys == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", path);
    tf_status status = TF_OK;
    for (size_t i = 0; i < n_metadata && status == TF_OK; i++) {
        keys[i] = metadata[i].key;
        if (metadata[i].key == NULL || metadata[i].value == NULL)
            status = tf_fail(TF_ERR_RUNTIME, "%s: metadata entry %zu has no key or no value", path, i);
    }
    const char *duplicate = status == TF_OK ? sorted_duplicate(keys, n_metadata) : NULL;
    if (duplicate) status = tf_fail(TF_ERR_RUNTIME, "%s: metadata key \"%s\" given twice", path, duplicate);
    free(keys);
    return status;
}

/* Checks every tensor and fills nbytes[i]; refuses duplicate names. */
static tf_status check_tensors_input(const char *path, const safetensors_tensor_data *tensors,
                                     size_t n_tensors, uint64_t *nbytes) {
    const char **names = malloc((n_tensors ? n_tensors : 1) * sizeof names[0]);
    if (names == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", path);
    tf_status status = TF_OK;
    for (size_t i = 0; i < n_tensors && status == TF_OK; i++) {
        status = check_tensor_input(path, i, &tensors[i], &nbytes[i]);
        names[i] = tensors[i].name;
    }
    const char *duplicate = status == TF_OK ? sorted_duplicate(names, n_tensors) : NULL;
    if (duplicate) status = tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\" given twice", path, duplicate);
    free(names);
    return status;
}

/* A JSON array of unsigned integers, printed by us: cJSON would print large ones as 1e+15. */
static cJSON *json_integer_array(const uint64_t *values, int n) {
    cJSON *array = cJSON_CreateArray();
    for (int i = 0; array != NULL && i < n; i++) {
        char text[32];
        snprintf(text, sizeof text, "%" PRIu64, values[i]);
        cJSON *number = cJSON_CreateRaw(text);
        if (number == NULL || !cJSON_AddItemToArray(array, number)) {
            cJSON_Delete(number);
            cJSON_Delete(array);
            return NULL;
        }
    }
    return array;
}

static bool add_tensor_entry(cJSON *root, const safetensors_tensor_data *t, uint64_t begin, uint64_t end) {
    uint64_t shape[SAFETENSORS_MAX_DIMS], offsets[2] = {begin, end};
    for (int d = 0; d < t->ndim; d++)
        shape[d] = (uint64_t)t->shape[d];
    cJSON *entry = cJSON_AddObjectToObject(root, t->name);
    if (entry == NULL || cJSON_AddStringToObject(entry, "dtype", dtype_lookup(t->dtype)->name) == NULL)
        return false;
    cJSON *shape_json = json_integer_array(shape, t->ndim);
    if (shape_json == NULL || !cJSON_AddItemToObject(entry, "shape", shape_json)) {
        cJSON_Delete(shape_json);
        return false;
    }
    cJSON *offsets_json = json_integer_array(offsets, 2);
    if (offsets_json == NULL || !cJSON_AddItemToObject(entry, "data_offsets", offsets_json)) {
        cJSON_Delete(offsets_json);
        return false;
    }
    return true;
}

/* The JSON text of the header: "__metadata__" first (as the reference library writes it), then
 * the tensors in order, laid out back to back from offset 0. */
static char *build_header_json(const safetensors_tensor_data *tensors, size_t n_tensors,
                               const uint64_t *nbytes, const safetensors_metadata_entry *metadata,
                               size_t n_metadata) {
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL;
    if (ok && n_metadata > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, SAFETENSORS_METADATA_KEY);
        ok = meta != NULL;
        for (size_t i = 0; ok && i < n_metadata; i++)
            ok = cJSON_AddStringToObject(meta, metadata[i].key, metadata[i].value) != NULL;
    }
    uint64_t offset = 0;
    for (size_t i = 0; ok && i < n_tensors; i++) {
        ok = add_tensor_entry(root, &tensors[i], offset, offset + nbytes[i]);
        offset += nbytes[i];
    }
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return text;
}

/* The length field and the JSON padded with spaces to a multiple of 8 bytes. */
static char *frame_header(const char *json, size_t *size) {
    size_t length = strlen(json);
    size_t padded = (length + 7) / 8 * 8;
    char *header = malloc(8 + padded);
    if (header == NULL) return NULL;
    for (int i = 0; i < 8; i++)
        header[i] = (char)(((uint64_t)padded >> (8 * i)) & 0xff);
    memcpy(header + 8, json, length);
    memset(header + 8 + length, ' ', padded - length);
    *size = 8 + padded;
    return header;
}

/* The directory that holds path, fsynced so that the rename survives a crash. */
static tf_status sync_directory_of(const char *path) {
    char *dir = strdup(path);
    if (dir == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", path);
    char *slash = strrchr(dir, '/');
    const char *name = dir;
    if (slash == NULL)
        name = ".";
    else if (slash == dir)
        name = "/";
    else
        *slash = '\0';
    int fd = open(name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    tf_status status = TF_OK;
    if (fd < 0 || fsync(fd) != 0)
        status = tf_fail(TF_ERR_RUNTIME, "%s: cannot sync directory %s: %s", path, name, strerror(errno));
    if (fd >= 0) close(fd);
    free(dir);
    return status;
}

static tf_status write_contents(int fd, const char *path, const char *tmp_path, const char *header,
                                size_t header_size, const safetensors_tensor_data *tensors, size_t n_tensors,
                                const uint64_t *nbytes) {
    if (!write_all(fd, header, header_size))
        return tf_fail(TF_ERR_RUNTIME, "%s: cannot write %s: %s", path, tmp_path, strerror(errno));
    for (size_t i = 0; i < n_tensors; i++)
        if (!write_all(fd, tensors[i].data, (size_t)nbytes[i]))
            return tf_fail(TF_ERR_RUNTIME, "%s: cannot write tensor \"%s\" to %s: %s", path, tensors[i].name,
                           tmp_path, strerror(errno));
    if (fsync(fd) != 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: cannot sync %s: %s", path, tmp_path, strerror(errno));
    return TF_OK;
}

/* Writes header and tensors to path.tmp.<pid>, then renames it over path. */
static tf_status write_atomically(const char *path, const char *header, size_t header_size,
                                  const safetensors_tensor_data *tensors, size_t n_tensors,
                                  const uint64_t *nbytes) {
    size_t tmp_size = strlen(path) + 32;
    char *tmp_path = malloc(tmp_size);
    if (tmp_path == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", path);
    snprintf(tmp_path, tmp_size, "%s.tmp.%ld", path, (long)getpid());
    tf_status status = TF_OK;
    int fd = open(tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        status = tf_fail(TF_ERR_RUNTIME, "%s: cannot create %s: %s", path, tmp_path, strerror(errno));
        free(tmp_path);
        return status;
    }
    status = write_contents(fd, path, tmp_path, header, header_size, tensors, n_tensors, nbytes);
    if (close(fd) != 0 && status == TF_OK)
        status = tf_fail(TF_ERR_RUNTIME, "%s: cannot close %s: %s", path, tmp_path, strerror(errno));
    if (status == TF_OK && rename(tmp_path, path) != 0)
        status = tf_fail(TF_ERR_RUNTIME, "%s: cannot rename %s over it: %s", path, tmp_path, strerror(errno));
    if (status != TF_OK) unlink(tmp_path);
    free(tmp_path);
    return status == TF_OK ? sync_directory_of(path) : status;
}

tf_status safetensors_write(const char *path, const safetensors_tensor_data *tensors, size_t n_tensors,
                            const safetensors_metadata_entry *metadata, size_t n_metadata) {
    uint64_t *nbytes = calloc(n_tensors ? n_tensors : 1, sizeof nbytes[0]);
    if (nbytes == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", path);
    tf_status status = check_tensors_input(path, tensors, n_tensors, nbytes);
    if (status == TF_OK) status = check_metadata_input(path, metadata, n_metadata);
    char *json = NULL, *header = NULL;
    size_t header_size = 0;
    if (status == TF_OK) {
        json = build_header_json(tensors, n_tensors, nbytes, metadata, n_metadata);
        header = json ? frame_header(json, &header_size) : NULL;
        if (header == NULL) status = tf_fail(TF_ERR_RUNTIME, "%s: out of memory building the header", path);
    }
    if (status == TF_OK) status = write_atomically(path, header, header_size, tensors, n_tensors, nbytes);
    free(header);
    cJSON_free(json);
    free(nbytes);
    return status;
}

/* ---- reading: the header ------------------------------------------------------------------- */

/* The index of the first byte that does not begin a well-formed UTF-8 sequence, or n. */
static size_t utf8_invalid_at(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t length;
        uint32_t code, min_code;
        if (c < 0x80)
            length = 1, code = c, min_code = 0;
        else if ((c & 0xe0) == 0xc0)
            length = 2, code = c & 0x1f, min_code = 0x80;
        else if ((c & 0xf0) == 0xe0)
            length = 3, code = c & 0x0f, min_code = 0x800;
        else if ((c & 0xf8) == 0xf0)
            length = 4, code = c & 0x07, min_code = 0x10000;
        else
            return i;
        if (n - i < length) return i;
        for (size_t k = 1; k < length; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return i;
            code = code << 6 | (s[i + k] & 0x3f);
        }
        /* Overlong forms, UTF-16 surrogates and code points past U+10FFFF are not UTF-8. */
        if (code < min_code || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) return i;
        i += length;
    }
    return n;
}

/* Reads the length field and the header text (NUL-terminated, for cJSON) of an open file. */
static tf_status read_header_text(safetensors_file *file, char **text, size_t *length) {
    const char *path = file->path;
    if (file->file_size < 8)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s: file has %" PRIu64 " bytes, fewer than the 8 of the header length: "
                       "truncated or not a safetensors file",
                       path, file->file_size);
    unsigned char field[8];
    if (!pread_all(file->fd, field, 8, 0))
        return tf_fail(TF_ERR_RUNTIME, "%s: cannot read the header length: %s", path, read_error_text());
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | field[i];
    if (n > SAFETENSORS_MAX_HEADER_BYTES)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s: header length %" PRIu64 " is absurd (more than %llu bytes): "
                       "not a safetensors file",
                       path, n, SAFETENSORS_MAX_HEADER_BYTES);
    if (n > file->file_size - 8)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s: header length %" PRIu64 " is larger than the %" PRIu64
                       " bytes that follow it: truncated or not a safetensors file",
                       path, n, file->file_size - 8);
    if (n == 0) return tf_fail(TF_ERR_RUNTIME, "%s: header is empty (length 0)", path);
    *text = malloc(n + 1);
    if (*text == NULL)
        return tf_fail(TF_ERR_RUNTIME, "%s: out of memory for a %" PRIu64 "-byte header", path, n);
    if (!pread_all(file->fd, *text, n, 8))
        return tf_fail(TF_ERR_RUNTIME, "%s: cannot read the header: %s", path, read_error_text());
    (*text)[n] = '\0';
    *length = n;
    file->data_start = 8 + n;
    return TF_OK;
}

/* Parses the header text into a JSON object; only whitespace may follow it (the padding). */
static tf_status parse_header_json(const safetensors_file *file, const char *text, size_t length,
                                   cJSON **root) {
    size_t bad = utf8_invalid_at((const unsigned char *)text, length);
    if (bad < length)
        return tf_fail(TF_ERR_RUNTIME, "%s: header is not valid UTF-8 (byte %zu of %zu)", file->path, bad,
                       length);
    const char *end = NULL;
    *root = cJSON_ParseWithLengthOpts(text, length, &end, 0);
    if (*root == NULL)
        return tf_fail(TF_ERR_RUNTIME, "%s: header is not valid JSON (error near byte %zu of %zu)",
                       file->path, end ? (size_t)(end - text) : 0, length);
    for (; end < text + length; end++)
        if (!strchr(" \t\r\n", *end) || *end == '\0')
            return tf_fail(TF_ERR_RUNTIME, "%s: header has bytes after its JSON value (at byte %zu of %zu)",
                           file->path, (size_t)(end - text), length);
    if (!cJSON_IsObject(*root)) return tf_fail(TF_ERR_RUNTIME, "%s: header is not a JSON object", file->path);
    return TF_OK;
}

static tf_status parse_metadata(safetensors_file *file, const cJSON *meta) {
    if (file->metadata != NULL)
        return tf_fail(TF_ERR_RUNTIME, "%s: header has \"%s\" twice", file->path, SAFETENSORS_METADATA_KEY);
    if (!cJSON_IsObject(meta))
        return tf_fail(TF_ERR_RUNTIME, "%s: \"%s\" is not a JSON object", file->path,
                       SAFETENSORS_METADATA_KEY);
    size_t n = (size_t)cJSON_GetArraySize(meta);
    file->metadata = calloc(n ? n : 1, sizeof file->metadata[0]);
    if (file->metadata == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", file->path);
    const cJSON *item;
    cJSON_ArrayForEach(item, meta) {
        if (!cJSON_IsString(item))
            return tf_fail(TF_ERR_RUNTIME, "%s: metadata \"%s\" is not a string", file->path, item->string);
        if (safetensors_metadata(file, item->string) != NULL)
            return tf_fail(TF_ERR_RUNTIME, "%s: metadata \"%s\" appears twice", file->path, item->string);
        safetensors_metadata_entry *entry = &file->metadata[file->n_metadata];
        entry->key = strdup(item->string);
        entry->value = strdup(item->valuestring);
        file->n_metadata++;
        if (entry->key == NULL || entry->value == NULL)
            return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", file->path);
    }
    return TF_OK;
}

/* A JSON number that is a whole number in [0, 2^53]. */
static bool json_unsigned(const cJSON *item, uint64_t *value) {
    if (!cJSON_IsNumber(item)) return false;
    double x = item->valuedouble;
    if (!(x >= 0.0 && x <= SAFETENSORS_MAX_JSON_INTEGER) || x != (double)(uint64_t)x) return false;
    *value = (uint64_t)x;
    return true;
}

/* The three fields of a tensor entry, each present exactly once. */
typedef struct {
    const cJSON *dtype, *shape, *offsets;
} tensor_fields;

static tf_status find_tensor_fields(const safetensors_file *file, const cJSON *entry, tensor_fields *fields) {
    const char *name = entry->string;
    if (!cJSON_IsObject(entry))
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": entry is not a JSON object", file->path, name);
    *fields = (tensor_fields){0};
    const cJSON *item;
    cJSON_ArrayForEach(item, entry) {
        const cJSON **slot = strcmp(item->string, "dtype") == 0          ? &fields->dtype
                             : strcmp(item->string, "shape") == 0        ? &fields->shape
                             : strcmp(item->string, "data_offsets") == 0 ? &fields->offsets
                                                                         : NULL;
        if (slot == NULL) continue; /* unknown fields are ignored, as the reference library does */
        if (*slot != NULL)
            return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\" has \"%s\" twice", file->path, name,
                           item->string);
        *slot = item;
    }
    const char *missing = !fields->dtype     ? "dtype"
                          : !fields->shape   ? "shape"
                          : !fields->offsets ? "data_offsets"
                                             : NULL;
    if (missing) return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\" has no \"%s\"", file->path, name, missing);
    return TF_OK;
}

static tf_status parse_dtype(const safetensors_file *file, const char *name, const cJSON *item,
                             safetensors_tensor *t) {
    if (!cJSON_IsString(item))
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": \"dtype\" is not a string", file->path, name);
    const dtype_info *dtype = dtype_lookup(item->valuestring);
    if (dtype == NULL)
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": unknown dtype \"%s\"", file->path, name,
                       item->valuestring);
    t->dtype = dtype->name;
    t->dtype_size = dtype->size;
    return TF_OK;
}

static tf_status parse_shape(const safetensors_file *file, const char *name, const cJSON *item,
                             safetensors_tensor *t) {
    if (!cJSON_IsArray(item))
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": \"shape\" is not an array", file->path, name);
    int ndim = cJSON_GetArraySize(item);
    if (ndim > SAFETENSORS_MAX_DIMS)
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\" has %d dimensions, more than the %d supported",
                       file->path, name, ndim, SAFETENSORS_MAX_DIMS);
    t->ndim = 0;
    const cJSON *dim;
    cJSON_ArrayForEach(dim, item) {
        uint64_t value;
        if (cJSON_IsNumber(dim) && dim->valuedouble < 0)
            return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": dimension %d is negative (%g)", file->path,
                           name, t->ndim, dim->valuedouble);
        if (!json_unsigned(dim, &value))
            return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": dimension %d is not a non-negative integer",
                           file->path, name, t->ndim);
        t->shape[t->ndim++] = (int64_t)value;
    }
    return TF_OK;
}

/* Checks data_offsets against the shape and the file and sets the tensor's place and size. */
static tf_status parse_offsets(const safetensors_file *file, const char *name, const cJSON *item,
                               safetensors_tensor *t) {
    uint64_t offsets[2];
    if (!cJSON_IsArray(item) || cJSON_GetArraySize(item) != 2 || !json_unsigned(item->child, &offsets[0]) ||
        !json_unsigned(item->child->next, &offsets[1]))
        return tf_fail(TF_ERR_RUNTIME,
                       "%s: tensor \"%s\": \"data_offsets\" is not [begin, end] of two "
                       "non-negative integers",
                       file->path, name);
    uint64_t begin = offsets[0], end = offsets[1], numel, nbytes;
    if (end < begin)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s: tensor \"%s\": data_offsets [%" PRIu64 ", %" PRIu64 "] end before begin",
                       file->path, name, begin, end);
    char shape[256];
    format_shape(shape, sizeof shape, t->ndim, t->shape);
    if (!shape_bytes(t->ndim, t->shape, t->dtype_size, &numel, &nbytes))
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": shape %s of %s is too large", file->path, name,
                       shape, t->dtype);
    if (nbytes != end - begin)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s: tensor \"%s\": data_offsets [%" PRIu64 ", %" PRIu64 "] hold %" PRIu64
                       " bytes but shape %s of %s needs %" PRIu64,
                       file->path, name, begin, end, end - begin, shape, t->dtype, nbytes);
    if (end > file->file_size - file->data_start)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s: truncated: tensor \"%s\" needs bytes up to %" PRIu64
                       " but the file has only %" PRIu64,
                       file->path, name, file->data_start + end, file->file_size);
    t->numel = (size_t)numel;
    t->nbytes = (size_t)nbytes;
    t->offset = file->data_start + begin;
    return TF_OK;
}

static tf_status parse_tensor(safetensors_file *file, const cJSON *entry, safetensors_tensor *t) {
    const char *name = entry->string;
    tensor_fields fields;
    TF_TRY(find_tensor_fields(file, entry, &fields));
    TF_TRY(parse_dtype(file, name, fields.dtype, t));
    TF_TRY(parse_shape(file, name, fields.shape, t));
    TF_TRY(parse_offsets(file, name, fields.offsets, t));
    t->name = strdup(name);
    if (t->name == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", file->path);
    return TF_OK;
}

static tf_status parse_entries(safetensors_file *file, const cJSON *root) {
    size_t n = (size_t)cJSON_GetArraySize(root);
    file->tensors = calloc(n ? n : 1, sizeof file->tensors[0]);
    if (file->tensors == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", file->path);
    const cJSON *entry;
    cJSON_ArrayForEach(entry, root) {
        if (strcmp(entry->string, SAFETENSORS_METADATA_KEY) == 0) {
            TF_TRY(parse_metadata(file, entry));
            continue;
        }
        TF_TRY(parse_tensor(file, entry, &file->tensors[file->n_tensors]));
        file->n_tensors++;
    }
    return TF_OK;
}

/* ---- reading: the table -------------------------------------------------------------------- */

static int compare_by_offset(const void *a, const void *b) {
    const safetensors_tensor *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int compare_by_name(const void *a, const void *b) {
    return strcmp((*(const safetensors_tensor *const *)a)->name,
                  (*(const safetensors_tensor *const *)b)->name);
}

/* Sorts the tensors into file order and builds the name index; refuses duplicate names and
 * tensors whose bytes overlap. Gaps between tensors are allowed. */
static tf_status build_table(safetensors_file *file) {
    qsort(file->tensors, file->n_tensors, sizeof file->tensors[0], compare_by_offset);
    file->by_name = malloc((file->n_tensors ? file->n_tensors : 1) * sizeof file->by_name[0]);
    if (file->by_name == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", file->path);
    for (size_t i = 0; i < file->n_tensors; i++)
        file->by_name[i] = &file->tensors[i];
    qsort(file->by_name, file->n_tensors, sizeof file->by_name[0], compare_by_name);
    for (size_t i = 1; i < file->n_tensors; i++)
        if (strcmp(file->by_name[i - 1]->name, file->by_name[i]->name) == 0)
            return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\" appears twice in the header", file->path,
                           file->by_name[i]->name);
    const safetensors_tensor *last = NULL; /* the tensor that reaches furthest so far */
    for (size_t i = 0; i < file->n_tensors; i++) {
        const safetensors_tensor *t = &file->tensors[i];
        if (t->nbytes == 0) continue;
        if (last != NULL && t->offset < last->offset + last->nbytes)
            return tf_fail(TF_ERR_RUNTIME,
                           "%s: tensors \"%s\" (bytes %" PRIu64 " to %" PRIu64 ") and \"%s\" (bytes %" PRIu64
                           " to %" PRIu64 ") overlap",
                           file->path, last->name, last->offset - file->data_start,
                           last->offset - file->data_start + last->nbytes, t->name,
                           t->offset - file->data_start, t->offset - file->data_start + t->nbytes);
        if (last == NULL || t->offset + t->nbytes > last->offset + last->nbytes) last = t;
    }
    return TF_OK;
}

static tf_status open_and_validate(safetensors_file *file) {
    file->fd = open(file->path, O_RDONLY | O_CLOEXEC);
    if (file->fd < 0) return tf_fail(TF_ERR_RUNTIME, "%s: cannot open: %s", file->path, strerror(errno));
    struct stat st;
    if (fstat(file->fd, &st) != 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: cannot stat: %s", file->path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return tf_fail(TF_ERR_RUNTIME, "%s: not a regular file", file->path);
    file->file_size = (uint64_t)st.st_size;
    char *text = NULL;
    size_t length = 0;
    cJSON *root = NULL;
    tf_status status = read_header_text(file, &text, &length);
    if (status == TF_OK) status = parse_header_json(file, text, length, &root);
    if (status == TF_OK) status = parse_entries(file, root);
    if (status == TF_OK) status = build_table(file);
    cJSON_Delete(root);
    free(text);
    return status;
}

tf_status safetensors_open(safetensors_file **out, const char *path) {
    *out = NULL;
    safetensors_file *file = calloc(1, sizeof *file);
    if (file == NULL || (file->path = strdup(path)) == NULL) {
        free(file);
        return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", path);
    }
    file->fd = -1;
    tf_status status = open_and_validate(file);
    if (status != TF_OK) {
        safetensors_close(file);
        return status;
    }
    *out = file;
    return TF_OK;
}

void safetensors_close(safetensors_file *file) {
    if (file == NULL) return;
    if (file->fd >= 0) close(file->fd);
    for (size_t i = 0; i < file->n_tensors; i++)
        free(file->tensors[i].name);
    for (size_t i = 0; i < file->n_metadata; i++) {
        free((char *)file->metadata[i].key);
        free((char *)file->metadata[i].value);
    }
    free(file->tensors);
    free(file->metadata);
    free(file->by_name);
    free(file->path);
    free(file);
}

static int compare_name_key(const void *key, const void *element) {
    return strcmp(key, (*(const safetensors_tensor *const *)element)->name);
}

const safetensors_tensor *safetensors_find(const safetensors_file *file, const char *name) {
    if (file->n_tensors == 0) return NULL;
    const safetensors_tensor *const *found =
        bsearch(name, file->by_name, file->n_tensors, sizeof file->by_name[0], compare_name_key);
    return found ? *found : NULL;
}

const char *safetensors_metadata(const safetensors_file *file, const char *key) {
    for (size_t i = 0; i < file->n_metadata; i++)
        if (strcmp(file->metadata[i].key, key) == 0) return file->metadata[i].value;
    return NULL;
}

/* ---- reading: tensor data ------------------------------------------------------------------ */

tf_status safetensors_read(const safetensors_file *file, const safetensors_tensor *tensor, void *dst,
                           size_t dst_bytes) {
    if (dst_bytes != tensor->nbytes)
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\" has %zu bytes but the buffer for it has %zu",
                       file->path, tensor->name, tensor->nbytes, dst_bytes);
    if (!pread_all(file->fd, dst, tensor->nbytes, tensor->offset))
        return tf_fail(TF_ERR_RUNTIME, "%s: cannot read tensor \"%s\": %s", file->path, tensor->name,
                       read_error_text());
    return TF_OK;
}

tf_status safetensors_load(const safetensors_file *file, const char *name, const char *dtype, int ndim,
                           const int64_t *shape, void *dst) {
    const safetensors_tensor *t = safetensors_find(file, name);
    if (t == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\" not found", file->path, name);
    if (strcmp(t->dtype, dtype) != 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\" has dtype %s but %s was expected", file->path, name,
                       t->dtype, dtype);
    bool same_shape = t->ndim == ndim;
    for (int d = 0; same_shape && d < ndim; d++)
        same_shape = t->shape[d] == shape[d];
    if (!same_shape) {
        char found[256], expected[256];
        format_shape(found, sizeof found, t->ndim, t->shape);
        format_shape(expected, sizeof expected, ndim, shape);
        return tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\" has shape %s but %s was expected", file->path, name,
                       found, expected);
    }
    return safetensors_read(file, t, dst, t->nbytes);
}

/* ---- checksums ----------------------------------------------------------------------------- */

uint64_t safetensors_fnv1a64(uint64_t hash, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++)
        hash = (hash ^ p[i]) * 0x100000001b3ull;
    return hash;
}

tf_status safetensors_checksum(const safetensors_file *file, const safetensors_tensor *tensor,
                               uint64_t *hash) {
    enum { CHUNK = 1 << 20 };
    unsigned char *buffer = malloc(CHUNK);
    if (buffer == NULL) return tf_fail(TF_ERR_RUNTIME, "%s: out of memory", file->path);
    uint64_t h = SAFETENSORS_FNV1A64_INIT;
    tf_status status = TF_OK;
    for (size_t done = 0; done < tensor->nbytes && status == TF_OK;) {
        size_t n = tensor->nbytes - done < CHUNK ? tensor->nbytes - done : CHUNK;
        if (!pread_all(file->fd, buffer, n, tensor->offset + done))
            status = tf_fail(TF_ERR_RUNTIME, "%s: cannot read tensor \"%s\": %s", file->path, tensor->name,
                             read_error_text());
        h = safetensors_fnv1a64(h, buffer, n);
        done += n;
    }
    free(buffer);
    *hash = h;
    return status;
}
