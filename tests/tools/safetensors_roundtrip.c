/* The C side of tests/test_safetensors_format.py, which checks our safetensors files against an
 * independent reader written from the specification, and our reader against files written from it.
 *
 *   safetensors_roundtrip write PATH   writes the known tensors and metadata below (the Python test
 *                                      computes the same values from the same formulas)
 *   safetensors_roundtrip read PATH    opens PATH and prints, as JSON, every tensor (name, dtype,
 *                                      shape, offset, byte size, FNV-1a of its bytes) and the metadata
 *
 * Exit status 0 on success, 1 with the error on stderr when a file is refused, 2 for bad usage. */
#include "common/error.h"
#include "common/safetensors.h"

#include <cjson/cJSON.h>

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- write --------------------------------------------------------------------------------- */

/* The values, by element index i (the Python test has the same formulas):
 *   f32   [4, 6]  ((37 i) mod 101 - 50) / 8, except i = 0..4: NaN 0x7fc12345, -0.0, +inf,
 *                 the smallest subnormal 0x00000001, NaN 0xffa00001
 *   f64   [3, 5]  ((53 i) mod 97 - 48) / 16, except i = 0: NaN 0x7ff8deadbeef0001, i = 1: -0.0
 *   bf16  [10]    bits (4099 i + 17) mod 65536
 *   f16   [2,2,2] bits (2731 i + 5) mod 65536
 *   i64   [5]     (i - 2) * 1000000000007, except i = 4: INT64_MIN
 *   i32   [2, 3]  i * i - 7
 *   u8    [7]     (40 i) mod 256
 *   bool  [3]     i mod 2
 *   scalar []     3.25 (F32)
 *   empty  [0, 3] (F32)
 *   blocks.0.attn.q.key_tokens [3, 4]  i / 4 (F32) */
static float f32_from_bits(uint32_t bits) {
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static double f64_from_bits(uint64_t bits) {
    double x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static const safetensors_metadata_entry known_metadata[] = {
    {"format", "pt"},
    {"config", "{\"dim\": 96, \"classes\": [\"T-shirt/top\", \"Trouser\"]}"},
    {"unicode", "h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x98\x80"},
    {"escapes", "quote \" backslash \\ newline \n tab \t control \x01 end"},
    {"empty", ""},
};

static int write_known(const char *path) {
    float f32[24], scalar = 3.25f, key_tokens[12];
    double f64[15];
    uint16_t bf16[10], f16[8];
    int64_t i64[5];
    int32_t i32[6];
    uint8_t u8[7], flags[3];
    for (int i = 0; i < 24; i++)
        f32[i] = (float)((37 * i) % 101 - 50) / 8.0f;
    uint32_t f32_specials[5] = {0x7fc12345u, 0x80000000u, 0x7f800000u, 0x00000001u, 0xffa00001u};
    for (int i = 0; i < 5; i++)
        f32[i] = f32_from_bits(f32_specials[i]);
    for (int i = 0; i < 15; i++)
        f64[i] = (double)((53 * i) % 97 - 48) / 16.0;
    f64[0] = f64_from_bits(0x7ff8deadbeef0001ull);
    f64[1] = -0.0;
    for (int i = 0; i < 10; i++)
        bf16[i] = (uint16_t)((4099 * i + 17) % 65536);
    for (int i = 0; i < 8; i++)
        f16[i] = (uint16_t)((2731 * i + 5) % 65536);
    for (int i = 0; i < 5; i++)
        i64[i] = (i - 2) * 1000000000007ll;
    i64[4] = INT64_MIN;
    for (int i = 0; i < 6; i++)
        i32[i] = i * i - 7;
    for (int i = 0; i < 7; i++)
        u8[i] = (uint8_t)((40 * i) % 256);
    for (int i = 0; i < 3; i++)
        flags[i] = (uint8_t)(i % 2);
    for (int i = 0; i < 12; i++)
        key_tokens[i] = (float)i / 4.0f;
    safetensors_tensor_data tensors[] = {
        {"f32", "F32", 2, {4, 6}, f32},
        {"f64", "F64", 2, {3, 5}, f64},
        {"bf16", "BF16", 1, {10}, bf16},
        {"f16", "F16", 3, {2, 2, 2}, f16},
        {"i64", "I64", 1, {5}, i64},
        {"i32", "I32", 2, {2, 3}, i32},
        {"u8", "U8", 1, {7}, u8},
        {"bool", "BOOL", 1, {3}, flags},
        {"scalar", "F32", 0, {0}, &scalar},
        {"empty", "F32", 2, {0, 3}, NULL},
        {"blocks.0.attn.q.key_tokens", "F32", 2, {3, 4}, key_tokens},
    };
    tf_status status = safetensors_write(path, tensors, sizeof tensors / sizeof tensors[0], known_metadata,
                                         sizeof known_metadata / sizeof known_metadata[0]);
    if (status != TF_OK) fprintf(stderr, "safetensors_roundtrip: %s\n", tf_error_message());
    return status == TF_OK ? 0 : 1;
}

/* ---- read ---------------------------------------------------------------------------------- */

/* Reads the tensor twice, through safetensors_load (into memory) and safetensors_checksum (in
 * chunks), and returns the FNV-1a of its bytes when both agree. */
static tf_status tensor_hash(const safetensors_file *file, const safetensors_tensor *t, uint64_t *hash) {
    unsigned char *data = malloc(t->nbytes ? t->nbytes : 1);
    if (data == NULL)
        return tf_fail(TF_ERR_RUNTIME, "%s: out of memory for tensor \"%s\"", file->path, t->name);
    tf_status status = safetensors_load(file, t->name, t->dtype, t->ndim, t->shape, data);
    if (status == TF_OK) status = safetensors_checksum(file, t, hash);
    if (status == TF_OK && *hash != safetensors_fnv1a64(SAFETENSORS_FNV1A64_INIT, data, t->nbytes))
        status =
            tf_fail(TF_ERR_RUNTIME, "%s: tensor \"%s\": load and checksum disagree", file->path, t->name);
    free(data);
    return status;
}

/* A JSON integer printed exactly (cJSON would print a double). */
static cJSON *json_integer(uint64_t value) {
    char text[32];
    snprintf(text, sizeof text, "%" PRIu64, value);
    return cJSON_CreateRaw(text);
}

static tf_status describe_tensor(const safetensors_file *file, const safetensors_tensor *t, cJSON *list) {
    uint64_t hash = 0;
    TF_TRY(tensor_hash(file, t, &hash));
    char hex[17];
    snprintf(hex, sizeof hex, "%016" PRIx64, hash);
    cJSON *entry = cJSON_CreateObject(), *shape = cJSON_CreateArray();
    cJSON_AddStringToObject(entry, "name", t->name);
    cJSON_AddStringToObject(entry, "dtype", t->dtype);
    for (int d = 0; d < t->ndim; d++)
        cJSON_AddItemToArray(shape, json_integer((uint64_t)t->shape[d]));
    cJSON_AddItemToObject(entry, "shape", shape);
    cJSON_AddItemToObject(entry, "offset", json_integer(t->offset));
    cJSON_AddItemToObject(entry, "nbytes", json_integer(t->nbytes));
    cJSON_AddItemToObject(entry, "numel", json_integer(t->numel));
    cJSON_AddStringToObject(entry, "fnv1a64", hex);
    cJSON_AddItemToArray(list, entry);
    return TF_OK;
}

static int read_and_describe(const char *path) {
    safetensors_file *file = NULL;
    tf_status status = safetensors_open(&file, path);
    cJSON *root = cJSON_CreateObject(), *list = cJSON_CreateArray(), *meta = cJSON_CreateObject();
    for (size_t i = 0; status == TF_OK && i < file->n_tensors; i++)
        status = describe_tensor(file, &file->tensors[i], list);
    for (size_t i = 0; status == TF_OK && i < file->n_metadata; i++) {
        const char *key = file->metadata[i].key;
        /* safetensors_metadata must find each key it listed. */
        cJSON_AddStringToObject(meta, key, safetensors_metadata(file, key));
    }
    if (status == TF_OK) {
        cJSON_AddItemToObject(root, "file_size", json_integer(file->file_size));
        cJSON_AddItemToObject(root, "data_start", json_integer(file->data_start));
        cJSON_AddItemToObject(root, "tensors", list);
        cJSON_AddItemToObject(root, "metadata", meta);
        char *text = cJSON_Print(root);
        printf("%s\n", text);
        cJSON_free(text);
    } else {
        cJSON_Delete(list);
        cJSON_Delete(meta);
        fprintf(stderr, "safetensors_roundtrip: %s\n", tf_error_message());
    }
    cJSON_Delete(root);
    safetensors_close(file);
    return status == TF_OK ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "write") == 0) return write_known(argv[2]);
    if (argc == 3 && strcmp(argv[1], "read") == 0) return read_and_describe(argv[2]);
    fprintf(stderr, "usage: safetensors_roundtrip write|read PATH\n");
    return 2;
}
