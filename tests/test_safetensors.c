/* Tests of the safetensors reader and writer: a bit-exact round trip of awkward data (NaN payloads,
 * -0.0, 0-d and empty tensors, many dtypes, metadata with escapes and Unicode), the exact header
 * layout, rejection of every kind of corrupt file (made by editing the bytes of a valid one) with
 * a message naming the file and the problem, and atomic writes that leave the old file intact and
 * no temporary files behind when they fail.
 *
 * Set TF_TEST_LARGE_SAFETENSORS=1 to also write and read back a tensor larger than 4 GiB. */
#include "common/safetensors.h"
#include "tests/test_util.h"

#include <dirent.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

static char scratch[256];

static const char *scratch_path(const char *name) {
    static char paths[8][512];
    static int next;
    char *path = paths[next++ % 8];
    snprintf(path, sizeof paths[0], "%s/%s", scratch, name);
    return path;
}

/* ---- file helpers -------------------------------------------------------------------------- */

static unsigned char *read_bytes(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return NULL;
    fseek(f, 0, SEEK_END);
    *size = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc(*size + 1);
    if (fread(data, 1, *size, f) != *size) *size = 0;
    fclose(f);
    return data;
}

static void write_bytes(const char *path, const void *data, size_t size) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "cannot create %s", path);
    if (f == NULL) return;
    CHECK(fwrite(data, 1, size, f) == size, "cannot write %s", path);
    fclose(f);
}

static uint64_t header_length(const unsigned char *bytes) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | bytes[i];
    return n;
}

static void set_header_length(unsigned char *bytes, uint64_t n) {
    for (int i = 0; i < 8; i++)
        bytes[i] = (unsigned char)(n >> (8 * i));
}

/* Files in the scratch directory whose name contains ".tmp." (left-overs of a write). */
static int count_temporary_files(const char *dir_path) {
    DIR *dir = opendir(dir_path);
    if (dir == NULL) return -1;
    int count = 0;
    for (struct dirent *e; (e = readdir(dir)) != NULL;)
        count += strstr(e->d_name, ".tmp.") != NULL;
    closedir(dir);
    return count;
}

/* Opening path fails with TF_ERR_RUNTIME and a message that names the file and contains needle. */
static void expect_open_fails(const char *path, const char *needle, const char *what) {
    safetensors_file *file = (safetensors_file *)1;
    tf_status status = safetensors_open(&file, path);
    const char *message = tf_error_message();
    CHECK(status == TF_ERR_RUNTIME, "%s: open gave status %d", what, status);
    CHECK(file == NULL, "%s: file not NULL after a failure", what);
    CHECK(strstr(message, path) != NULL, "%s: message does not name the file: %s", what, message);
    CHECK(needle == NULL || strstr(message, needle) != NULL, "%s: message lacks \"%s\": %s", what,
          needle ? needle : "", message);
    if (getenv("TF_TEST_VERBOSE")) printf("%-40s %s\n", what, message);
    if (status == TF_OK) safetensors_close(file);
}

/* ---- the round trip ------------------------------------------------------------------------ */

enum { N_ROUND_TRIP = 12 };

typedef struct {
    safetensors_tensor_data tensors[N_ROUND_TRIP];
    size_t nbytes[N_ROUND_TRIP];
    float f32[3 * 5], scalar[1];
    double f64[2 * 2 * 2];
    uint16_t bf16[7], f16[2 * 3];
    int64_t i64[4];
    int32_t i32[3];
    uint8_t u8[5], flags[4];
    int8_t i8[9];
} round_trip_data;

static float float_from_bits(uint32_t bits) {
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static double double_from_bits(uint64_t bits) {
    double x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static void fill_round_trip(round_trip_data *d) {
    tf_rng rng = tf_rng_make(7, TF_RNG_TEST, 0, 0);
    fill_normal_f32(d->f32, 15, 1.0f, &rng);
    d->f32[0] = float_from_bits(0x7fc12345u); /* quiet NaN with a payload */
    d->f32[1] = float_from_bits(0xffa00001u); /* negative signalling NaN */
    d->f32[2] = -0.0f;
    d->f32[3] = INFINITY;
    d->f32[4] = -INFINITY;
    d->f32[5] = float_from_bits(0x00000001u); /* smallest subnormal */
    d->scalar[0] = -0.0f;
    fill_normal_f64(d->f64, 8, 1e3, &rng);
    d->f64[0] = double_from_bits(0x7ff8deadbeef0001ull);
    d->f64[1] = -0.0;
    for (int i = 0; i < 7; i++)
        d->bf16[i] = (uint16_t)tf_rng_u64(&rng);
    for (int i = 0; i < 6; i++)
        d->f16[i] = (uint16_t)tf_rng_u64(&rng);
    d->i64[0] = INT64_MIN, d->i64[1] = -1, d->i64[2] = INT64_MAX, d->i64[3] = 1234567890123ll;
    d->i32[0] = INT32_MIN, d->i32[1] = 0, d->i32[2] = 77;
    for (int i = 0; i < 5; i++)
        d->u8[i] = (uint8_t)(250 + i);
    for (int i = 0; i < 4; i++)
        d->flags[i] = (uint8_t)(i & 1);
    for (int i = 0; i < 9; i++)
        d->i8[i] = (int8_t)(i * 31 - 128);
    safetensors_tensor_data t[N_ROUND_TRIP] = {
        {"patch_embed.proj.weight", "F32", 2, {3, 5}, d->f32},
        {"blocks.0.attn.q.key_tokens", "F64", 3, {2, 2, 2}, d->f64},
        {"bf16", "BF16", 1, {7}, d->bf16},
        {"f16", "F16", 2, {2, 3}, d->f16},
        {"empty.rows", "F32", 2, {0, 4}, NULL},
        {"i64", "I64", 1, {4}, d->i64},
        {"u8 odd size", "U8", 1, {5}, d->u8},
        {"i32", "I32", 1, {3}, d->i32},
        {"scalar", "F32", 0, {0}, d->scalar},
        {"empty.cols", "I64", 2, {3, 0}, d->i64}, /* data given but zero bytes of it are written */
        {"caf\xc3\xa9/\xe5\x90\x8d", "BOOL", 1, {4}, d->flags},
        {"i8", "I8", 3, {1, 3, 3}, d->i8},
    };
    memcpy(d->tensors, t, sizeof t);
    size_t sizes[N_ROUND_TRIP] = {60, 64, 14, 12, 0, 32, 5, 12, 4, 0, 4, 9};
    memcpy(d->nbytes, sizes, sizeof sizes);
}

static const safetensors_metadata_entry round_trip_metadata[] = {
    {"config", "{\"dim\": 96, \"depth\": 4, \"classes\": [\"T-shirt/top\", \"Trouser\"]}"},
    {"escapes", "quote \" backslash \\ newline \n tab \t bell \a end"},
    {"unicode", "h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x98\x80"},
    {"empty", ""},
};
enum { N_METADATA = sizeof round_trip_metadata / sizeof round_trip_metadata[0] };

static void check_tensor_matches(const safetensors_file *file, const safetensors_tensor_data *want,
                                 size_t nbytes) {
    const safetensors_tensor *t = safetensors_find(file, want->name);
    if (!CHECK(t != NULL, "tensor %s not found", want->name)) return;
    CHECK(strcmp(t->name, want->name) == 0 && strcmp(t->dtype, want->dtype) == 0, "%s: dtype %s", want->name,
          t->dtype);
    CHECK(t->ndim == want->ndim, "%s: ndim %d", want->name, t->ndim);
    size_t numel = 1;
    for (int d = 0; d < want->ndim && d < t->ndim; d++) {
        CHECK(t->shape[d] == want->shape[d], "%s: dim %d is %" PRId64, want->name, d, t->shape[d]);
        numel *= (size_t)want->shape[d];
    }
    CHECK(t->nbytes == nbytes && t->numel == numel, "%s: %zu bytes, %zu elements", want->name, t->nbytes,
          t->numel);
    CHECK(t->dtype_size * t->numel == t->nbytes, "%s: dtype size %zu", want->name, t->dtype_size);
    unsigned char *got = malloc(nbytes + 1);
    if (CHECK_OK(safetensors_read(file, t, got, nbytes)))
        CHECK(nbytes == 0 || memcmp(got, want->data, nbytes) == 0, "%s: data differ", want->name);
    uint64_t hash = 0;
    CHECK_OK(safetensors_checksum(file, t, &hash));
    uint64_t expected = safetensors_fnv1a64(SAFETENSORS_FNV1A64_INIT, want->data, nbytes);
    CHECK(hash == expected, "%s: checksum %016" PRIx64 " != %016" PRIx64, want->name, hash, expected);
    free(got);
}

static void test_round_trip(void) {
    round_trip_data d;
    fill_round_trip(&d);
    const char *path = scratch_path("round_trip.safetensors");
    if (!CHECK_OK(safetensors_write(path, d.tensors, N_ROUND_TRIP, round_trip_metadata, N_METADATA))) return;
    safetensors_file *file = NULL;
    if (!CHECK_OK(safetensors_open(&file, path))) return;
    CHECK(file->n_tensors == N_ROUND_TRIP, "%zu tensors", file->n_tensors);
    /* The table is in file order, which is the order written, laid out back to back. */
    uint64_t offset = file->data_start;
    for (size_t i = 0; i < file->n_tensors && i < N_ROUND_TRIP; i++) {
        CHECK(strcmp(file->tensors[i].name, d.tensors[i].name) == 0, "tensor %zu is %s", i,
              file->tensors[i].name);
        CHECK(file->tensors[i].offset == offset, "%s at %" PRIu64, file->tensors[i].name,
              file->tensors[i].offset);
        offset += d.nbytes[i];
    }
    CHECK(offset == file->file_size, "data end at %" PRIu64 ", file size %" PRIu64, offset, file->file_size);
    for (int i = 0; i < N_ROUND_TRIP; i++)
        check_tensor_matches(file, &d.tensors[i], d.nbytes[i]);
    CHECK(file->n_metadata == N_METADATA, "%zu metadata entries", file->n_metadata);
    for (size_t i = 0; i < N_METADATA; i++) {
        const char *value = safetensors_metadata(file, round_trip_metadata[i].key);
        CHECK(value != NULL && strcmp(value, round_trip_metadata[i].value) == 0, "metadata %s: %s",
              round_trip_metadata[i].key, value ? value : "(absent)");
    }
    CHECK(safetensors_metadata(file, "absent") == NULL, "absent metadata key found");
    CHECK(safetensors_find(file, "absent") == NULL, "absent tensor found");
    CHECK(safetensors_find(file, "scalar") != NULL && safetensors_find(file, "scalar")->numel == 1, "scalar");
    safetensors_close(file);
}

/* safetensors_load checks name, dtype and shape; safetensors_read checks the buffer size. */
static void test_load_checks(void) {
    float w[6] = {1, 2, 3, 4, 5, 6}, got[6] = {0};
    safetensors_tensor_data t[] = {{"w", "F32", 2, {2, 3}, w}};
    const char *path = scratch_path("load.safetensors");
    safetensors_file *file = NULL;
    if (!CHECK_OK(safetensors_write(path, t, 1, NULL, 0)) || !CHECK_OK(safetensors_open(&file, path))) return;
    CHECK_OK(safetensors_load(file, "w", "F32", 2, (int64_t[]){2, 3}, got));
    CHECK(memcmp(got, w, sizeof w) == 0, "loaded data differ");
    struct {
        const char *name, *dtype;
        int ndim;
        int64_t shape[2];
        const char *needle;
    } bad[] = {
        {"v", "F32", 2, {2, 3}, "tensor \"v\" not found"},
        {"w", "BF16", 2, {2, 3}, "has dtype F32 but BF16 was expected"},
        {"w", "F32", 2, {3, 2}, "has shape [2, 3] but [3, 2] was expected"},
        {"w", "F32", 1, {6}, "has shape [2, 3] but [6] was expected"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        tf_status status = safetensors_load(file, bad[i].name, bad[i].dtype, bad[i].ndim, bad[i].shape, got);
        CHECK(status == TF_ERR_RUNTIME && strstr(tf_error_message(), bad[i].needle) &&
                  strstr(tf_error_message(), path),
              "load case %zu: %s", i, tf_error_message());
    }
    CHECK(safetensors_read(file, &file->tensors[0], got, 20) == TF_ERR_RUNTIME, "short buffer accepted");
    safetensors_close(file);
}

/* ---- the header layout --------------------------------------------------------------------- */

/* The header length is a multiple of 8, the JSON is padded with spaces, and the text is exactly
 * the compact JSON the reference library would accept, for many lengths of JSON. */
static void test_header_alignment(void) {
    float x[2] = {1.0f, 2.0f};
    char name[32] = "";
    for (int length = 0; length < 16; length++) {
        name[length] = '\0';
        safetensors_tensor_data t[] = {{name, "F32", 1, {2}, x}};
        const char *path = scratch_path("aligned.safetensors");
        if (!CHECK_OK(safetensors_write(path, t, 1, NULL, 0))) return;
        size_t size = 0;
        unsigned char *bytes = read_bytes(path, &size);
        uint64_t n = header_length(bytes);
        char expected[128];
        int json_length = snprintf(expected, sizeof expected,
                                   "{\"%s\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", name);
        CHECK(n % 8 == 0 && n >= (uint64_t)json_length && n < (uint64_t)json_length + 8,
              "name length %d: header %" PRIu64, length, n);
        CHECK(size == 8 + n + 8, "name length %d: file size %zu", length, size);
        CHECK(memcmp(bytes + 8, expected, (size_t)json_length) == 0, "header text: %.*s", (int)n, bytes + 8);
        for (uint64_t i = (uint64_t)json_length; i < n && i + 8 < size; i++)
            CHECK(bytes[8 + i] == ' ', "padding byte %" PRIu64 " is %d", i, bytes[8 + i]);
        free(bytes);
        name[length] = (char)('a' + length);
    }
    /* No tensors at all: "{}" and six spaces, still a valid file. */
    const char *path = scratch_path("nothing.safetensors");
    safetensors_file *file = NULL;
    size_t size = 0;
    if (!CHECK_OK(safetensors_write(path, NULL, 0, NULL, 0))) return;
    unsigned char *bytes = read_bytes(path, &size);
    CHECK(size == 16 && header_length(bytes) == 8 && memcmp(bytes + 8, "{}      ", 8) == 0, "empty file");
    free(bytes);
    if (CHECK_OK(safetensors_open(&file, path)))
        CHECK(file->n_tensors == 0 && file->n_metadata == 0, "empty");
    safetensors_close(file);
}

/* ---- corrupt files ------------------------------------------------------------------------- */

/* The valid file that the corruption tests edit: 24 + 16 + 3 = 43 bytes of data. */
static const char valid_json[] = "{\"__metadata__\":{\"k\":\"v\"},"
                                 "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
                                 "\"b\":{\"dtype\":\"I32\",\"shape\":[4],\"data_offsets\":[24,40]},"
                                 "\"c\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[40,43]}}";

typedef struct {
    unsigned char *bytes;
    size_t size;
    uint64_t header; /* N */
} valid_file;

static valid_file make_valid_file(void) {
    float a[6] = {1, 2, 3, 4, 5, 6};
    int32_t b[4] = {-1, 2, -3, 4};
    uint8_t c[3] = {7, 8, 9};
    safetensors_tensor_data t[] = {
        {"a", "F32", 2, {2, 3}, a}, {"b", "I32", 1, {4}, b}, {"c", "U8", 1, {3}, c}};
    safetensors_metadata_entry m[] = {{"k", "v"}};
    const char *path = scratch_path("valid.safetensors");
    valid_file v = {0};
    if (!CHECK_OK(safetensors_write(path, t, 3, m, 1))) return v;
    v.bytes = read_bytes(path, &v.size);
    v.header = header_length(v.bytes);
    CHECK(v.size == 8 + v.header + 43, "valid file size %zu", v.size);
    CHECK(memcmp(v.bytes + 8, valid_json, strlen(valid_json)) == 0, "writer's header: %.*s", (int)v.header,
          v.bytes + 8);
    return v;
}

/* Writes the valid file's data section under a new header text (padded to a multiple of 8). */
static const char *write_with_header(const valid_file *v, const char *json, const char *name) {
    size_t length = strlen(json), padded = (length + 7) / 8 * 8, data = v->size - 8 - v->header;
    unsigned char *bytes = malloc(8 + padded + data);
    set_header_length(bytes, padded);
    memcpy(bytes + 8, json, length);
    memset(bytes + 8 + length, ' ', padded - length);
    memcpy(bytes + 8 + padded, v->bytes + 8 + v->header, data);
    const char *path = scratch_path(name);
    write_bytes(path, bytes, 8 + padded + data);
    free(bytes);
    return path;
}

/* The valid header with one piece of text replaced, rejected with a message containing needle. */
static void expect_edit_rejected(const valid_file *v, const char *from, const char *to, const char *needle) {
    char json[1024];
    const char *at = strstr(valid_json, from);
    if (!CHECK(at != NULL, "\"%s\" is not in the valid header", from)) return;
    snprintf(json, sizeof json, "%.*s%s%s", (int)(at - valid_json), valid_json, to, at + strlen(from));
    char what[1200];
    snprintf(what, sizeof what, "edit %s -> %s", from, to);
    expect_open_fails(write_with_header(v, json, "edited.safetensors"), needle, what);
}

static void test_truncation(const valid_file *v) {
    const char *path = scratch_path("truncated.safetensors");
    /* Every prefix of the file is refused: the last tensor reaches its last byte. */
    for (size_t cut = 0; cut < v->size; cut++) {
        write_bytes(path, v->bytes, cut);
        const char *needle = cut < 8               ? "fewer than the 8 of the header length"
                             : cut < 8 + v->header ? "is larger than the"
                                                   : "truncated: tensor";
        char what[64];
        snprintf(what, sizeof what, "truncated at %zu", cut);
        expect_open_fails(path, needle, what);
    }
    /* The exact message for a cut in the data section. */
    write_bytes(path, v->bytes, v->size - 1);
    char needle[160];
    snprintf(needle, sizeof needle, "truncated: tensor \"c\" needs bytes up to %zu but the file has only %zu",
             v->size, v->size - 1);
    expect_open_fails(path, needle, "truncated by one byte");
}

static void test_header_length_field(const valid_file *v) {
    const char *path = scratch_path("length.safetensors");
    unsigned char *bytes = malloc(v->size);
    struct {
        uint64_t length;
        const char *needle;
    } cases[] = {
        {UINT64_MAX, "is absurd"},
        {1ull << 63, "is absurd"},
        {200000000, "is absurd"},
        {SAFETENSORS_MAX_HEADER_BYTES + 1, "is absurd"},
        {v->size - 7, "is larger than the"},
        {0, "header is empty"},
        {v->header - 8, "not valid JSON"},
        {v->header + 8, NULL}, /* the JSON then runs into binary data */
        {1, "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        memcpy(bytes, v->bytes, v->size);
        set_header_length(bytes, cases[i].length);
        write_bytes(path, bytes, v->size);
        char what[64];
        snprintf(what, sizeof what, "header length %" PRIu64, cases[i].length);
        expect_open_fails(path, cases[i].needle, what);
    }
    /* Single bit flips of the length field. */
    for (int bit = 0; bit < 64; bit++) {
        memcpy(bytes, v->bytes, v->size);
        bytes[bit / 8] ^= (unsigned char)(1u << (bit % 8));
        write_bytes(path, bytes, v->size);
        expect_open_fails(path, NULL, "flipped header length bit");
    }
    free(bytes);
}

static void test_broken_json(const valid_file *v) {
    expect_edit_rejected(v, "\"dtype\":\"F32\"", "\"dtype\":F32\"", "not valid JSON");
    expect_edit_rejected(v, "[2,3]", "[2,3", "not valid JSON");
    expect_edit_rejected(v, "{\"__metadata__\"", "[\"__metadata__\"", "not valid JSON");
    expect_edit_rejected(v, "[40,43]}}", "[40,43]}", "not valid JSON");
    expect_edit_rejected(v, "[40,43]}}", "[40,43]}}}", "bytes after its JSON value");
    expect_edit_rejected(v, "\"k\":\"v\"", "\"k\":\"\xff\"", "not valid UTF-8");
    expect_edit_rejected(v, "\"k\":\"v\"", "\"k\":\"\xc0\xaf\"", "not valid UTF-8");     /* overlong '/' */
    expect_edit_rejected(v, "\"k\":\"v\"", "\"k\":\"\xed\xa0\x80\"", "not valid UTF-8"); /* surrogate */
    const char *path = write_with_header(v, "[1,2,3]", "array.safetensors");
    expect_open_fails(path, "header is not a JSON object", "array header");
    path = write_with_header(v, "\"text\"", "string.safetensors");
    expect_open_fails(path, "header is not a JSON object", "string header");
    path = write_with_header(v, "", "blank.safetensors");
    expect_open_fails(path, "header is empty", "blank header");
    path = write_with_header(v, "        ", "spaces.safetensors");
    expect_open_fails(path, "not valid JSON", "header of spaces");
}

static void test_bad_entries(const valid_file *v) {
    expect_edit_rejected(v, "\"dtype\":\"F32\",", "", "tensor \"a\" has no \"dtype\"");
    expect_edit_rejected(v, "\"shape\":[4],", "", "tensor \"b\" has no \"shape\"");
    expect_edit_rejected(v, ",\"data_offsets\":[40,43]", "", "tensor \"c\" has no \"data_offsets\"");
    expect_edit_rejected(v, "\"dtype\":\"F32\"", "\"dtype\":\"F32\",\"dtype\":\"F32\"",
                         "has \"dtype\" twice");
    expect_edit_rejected(v, "{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[40,43]}", "5",
                         "tensor \"c\": entry is not a JSON object");
    expect_edit_rejected(v, "\"dtype\":\"F32\"", "\"dtype\":32", "\"dtype\" is not a string");
    expect_edit_rejected(v, "\"dtype\":\"F32\"", "\"dtype\":\"F31\"", "unknown dtype \"F31\"");
    expect_edit_rejected(v, "\"dtype\":\"F32\"", "\"dtype\":\"f32\"", "unknown dtype \"f32\"");
    expect_edit_rejected(v, "[2,3]", "\"2,3\"", "\"shape\" is not an array");
    expect_edit_rejected(v, "[2,3]", "[2,\"3\"]", "dimension 1 is not a non-negative integer");
    expect_edit_rejected(v, "[2,3]", "[2,3.5]", "dimension 1 is not a non-negative integer");
    expect_edit_rejected(v, "[2,3]", "[2,null]", "dimension 1 is not a non-negative integer");
    expect_edit_rejected(v, "[2,3]", "[-2,-3]", "dimension 0 is negative");
    expect_edit_rejected(v, "[2,3]", "[1,1,1,1,1,1,1,1,2,3]", "10 dimensions, more than the 8 supported");
    expect_edit_rejected(v, "[2,3]", "[4294967296,4294967296,4]", "is too large");
    expect_edit_rejected(v, "[2,3]", "[1e300,1e300]", "not a non-negative integer");
    expect_edit_rejected(v, "[2,3]", "[2,4]", "hold 24 bytes but shape [2, 4] of F32 needs 32");
    expect_edit_rejected(v, "[0,24]", "[0]", "\"data_offsets\" is not [begin, end]");
    expect_edit_rejected(v, "[0,24]", "[0,24,24]", "\"data_offsets\" is not [begin, end]");
    expect_edit_rejected(v, "[0,24]", "\"0-24\"", "\"data_offsets\" is not [begin, end]");
    expect_edit_rejected(v, "[0,24]", "[0,-24]", "\"data_offsets\" is not [begin, end]");
    expect_edit_rejected(v, "[0,24]", "[0,24.5]", "\"data_offsets\" is not [begin, end]");
    expect_edit_rejected(v, "[0,24]", "[24,0]", "end before begin");
    expect_edit_rejected(v, "[0,24]", "[0,20]", "hold 20 bytes but shape [2, 3] of F32 needs 24");
    expect_edit_rejected(v, "[0,24]", "[0,28]", "hold 28 bytes but shape [2, 3] of F32 needs 24");
}

static void test_bad_layout(const valid_file *v) {
    char needle[160];
    snprintf(needle, sizeof needle,
             "truncated: tensor \"c\" needs bytes up to %" PRIu64 " but the file has only %zu",
             8 + v->header + 44, v->size);
    expect_edit_rejected(v, "[40,43]", "[41,44]", needle);
    expect_edit_rejected(v, "[40,43]", "[9007199254740000,9007199254740003]", "truncated: tensor \"c\"");
    expect_edit_rejected(v, "[24,40]", "[20,36]",
                         "tensors \"a\" (bytes 0 to 24) and \"b\" (bytes 20 to 36) overlap");
    expect_edit_rejected(v, "[24,40]", "[0,16]", "overlap");
    expect_edit_rejected(v, "[24,40]", "[4,20]",
                         "tensors \"a\" (bytes 0 to 24) and \"b\" (bytes 4 to 20) overlap");
    expect_edit_rejected(v, "\"b\":", "\"a\":", "tensor \"a\" appears twice in the header");
    expect_edit_rejected(v, "\"k\":\"v\"", "\"k\":5", "metadata \"k\" is not a string");
    expect_edit_rejected(v, "\"k\":\"v\"", "\"k\":null", "metadata \"k\" is not a string");
    expect_edit_rejected(v, "\"k\":\"v\"", "\"k\":{\"x\":\"y\"}", "metadata \"k\" is not a string");
    expect_edit_rejected(v, "\"k\":\"v\"", "\"k\":\"v\",\"k\":\"w\"", "metadata \"k\" appears twice");
    expect_edit_rejected(v, "{\"k\":\"v\"}", "[\"k\",\"v\"]", "\"__metadata__\" is not a JSON object");
    expect_edit_rejected(v, "\"a\":", "\"__metadata__\":{},\"a\":", "\"__metadata__\" twice");
}

/* Edits that are still valid files: gaps, empty tensors anywhere, any key order, whitespace. */
static void test_accepted_edits(const valid_file *v) {
    const char *accepted[] = {
        "{\"c\":{\"data_offsets\":[40,43],\"shape\":[3],\"dtype\":\"U8\"},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}",
        "{\"e\":{\"dtype\":\"F64\",\"shape\":[0],\"data_offsets\":[4,4]},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24],\"extra\":1}}",
        " \n{ \"a\" : { \"dtype\" : \"F32\" , \"shape\" : [ 2 , 3 ] , \"data_offsets\" : [ 0 , 24 ] } }\n\t ",
        "{}",
    };
    for (size_t i = 0; i < sizeof accepted / sizeof accepted[0]; i++) {
        const char *path = write_with_header(v, accepted[i], "accepted.safetensors");
        safetensors_file *file = NULL;
        if (!CHECK_OK(safetensors_open(&file, path))) continue;
        const safetensors_tensor *a = safetensors_find(file, "a");
        float got[6];
        if (a != NULL && CHECK_OK(safetensors_read(file, a, got, sizeof got)))
            CHECK(got[0] == 1.0f && got[5] == 6.0f, "case %zu: data of a", i);
        safetensors_close(file);
    }
}

/* Random byte flips in the header: every result either opens or is refused with a message, and
 * nothing crashes (run under a sanitizer to make "nothing" strict). */
static void test_random_flips(const valid_file *v) {
    tf_rng rng = tf_rng_make(11, TF_RNG_TEST, 1, 0);
    unsigned char *bytes = malloc(v->size);
    const char *path = scratch_path("flipped.safetensors");
    int opened = 0;
    for (int trial = 0; trial < 2000; trial++) {
        memcpy(bytes, v->bytes, v->size);
        int flips = 1 + (int)tf_rng_below(&rng, 3);
        for (int f = 0; f < flips; f++)
            bytes[8 + tf_rng_below(&rng, v->header)] ^= (unsigned char)(1u << tf_rng_below(&rng, 8));
        write_bytes(path, bytes, v->size);
        safetensors_file *file = NULL;
        tf_status status = safetensors_open(&file, path);
        if (status == TF_OK) {
            opened++;
            safetensors_close(file);
        } else {
            CHECK(strstr(tf_error_message(), path) != NULL, "flip: message without the path: %s",
                  tf_error_message());
        }
    }
    printf("random header flips: %d of 2000 still opened\n", opened);
    free(bytes);
}

static void test_not_a_file(void) {
    expect_open_fails(scratch_path("does-not-exist.safetensors"), "No such file or directory",
                      "missing file");
    expect_open_fails(scratch, "not a regular file", "directory");
}

/* ---- atomic writes ------------------------------------------------------------------------- */

static bool same_bytes(const char *path, const unsigned char *bytes, size_t size) {
    size_t got_size = 0;
    unsigned char *got = read_bytes(path, &got_size);
    bool same = got != NULL && got_size == size && memcmp(got, bytes, size) == 0;
    free(got);
    return same;
}

static void test_atomic_writes(const valid_file *v) {
    float big[1 << 16] = {0};
    safetensors_tensor_data t[] = {{"big", "F32", 1, {1 << 16}, big}, {"big", "F32", 1, {1}, big}};
    const char *path = scratch_path("valid.safetensors"); /* the file make_valid_file wrote */
    CHECK(same_bytes(path, v->bytes, v->size), "valid file changed");

    /* A directory that does not exist: the error names the path and the reason. */
    const char *missing = scratch_path("no-such-dir/x.safetensors");
    CHECK(safetensors_write(missing, t, 1, NULL, 0) == TF_ERR_RUNTIME, "write into a missing directory");
    CHECK(strstr(tf_error_message(), missing) && strstr(tf_error_message(), "No such file or directory"),
          "message: %s", tf_error_message());

    /* Bad input is refused before anything is touched. */
    CHECK(safetensors_write(path, t, 2, NULL, 0) == TF_ERR_RUNTIME, "duplicate names accepted");
    CHECK(strstr(tf_error_message(), "tensor \"big\" given twice") != NULL, "message: %s",
          tf_error_message());
    safetensors_tensor_data negative = {"n", "F32", 1, {-1}, big}, unknown = {"u", "Q8", 1, {1}, big},
                            no_data = {"d", "F32", 1, {2}, NULL},
                            reserved = {"__metadata__", "F32", 0, {0}, big};
    CHECK(safetensors_write(path, &negative, 1, NULL, 0) == TF_ERR_RUNTIME, "negative dimension accepted");
    CHECK(safetensors_write(path, &unknown, 1, NULL, 0) == TF_ERR_RUNTIME, "unknown dtype accepted");
    CHECK(safetensors_write(path, &no_data, 1, NULL, 0) == TF_ERR_RUNTIME, "missing data accepted");
    CHECK(safetensors_write(path, &reserved, 1, NULL, 0) == TF_ERR_RUNTIME, "reserved name accepted");
    safetensors_metadata_entry twice[] = {{"k", "1"}, {"k", "2"}};
    CHECK(safetensors_write(path, t, 1, twice, 2) == TF_ERR_RUNTIME, "duplicate metadata keys accepted");
    CHECK(same_bytes(path, v->bytes, v->size), "refused write changed the old file");

    /* A write that fails half way (the file size limit stops it): old file intact, no temporary. */
    struct rlimit old_limit, limit;
    getrlimit(RLIMIT_FSIZE, &old_limit);
    limit = old_limit;
    limit.rlim_cur = 4096;
    signal(SIGXFSZ, SIG_IGN);
    if (setrlimit(RLIMIT_FSIZE, &limit) == 0) {
        tf_status status = safetensors_write(path, t, 1, NULL, 0);
        setrlimit(RLIMIT_FSIZE, &old_limit);
        CHECK(status == TF_ERR_RUNTIME && strstr(tf_error_message(), path) &&
                  strstr(tf_error_message(), "File too large"),
              "write past the size limit: %s", tf_error_message());
        CHECK(same_bytes(path, v->bytes, v->size), "failed write changed the old file");
    }
    signal(SIGXFSZ, SIG_DFL);

    /* The rename fails (the target is a directory): the temporary file is removed. */
    const char *dir_target = scratch_path("a-directory");
    mkdir(dir_target, 0755);
    CHECK(safetensors_write(dir_target, t, 1, NULL, 0) == TF_ERR_RUNTIME, "wrote over a directory");
    CHECK(strstr(tf_error_message(), "cannot rename") != NULL, "message: %s", tf_error_message());
    rmdir(dir_target);

    /* A directory we may not write to (meaningless as root, who may write anywhere). */
    if (geteuid() != 0) {
        const char *locked_dir = scratch_path("locked");
        mkdir(locked_dir, 0555);
        char locked[600];
        snprintf(locked, sizeof locked, "%s/x.safetensors", locked_dir);
        CHECK(safetensors_write(locked, t, 1, NULL, 0) == TF_ERR_RUNTIME &&
                  strstr(tf_error_message(), "Permission denied"),
              "write into a read-only directory: %s", tf_error_message());
        rmdir(locked_dir);
    }

    /* A successful write replaces the old file. */
    CHECK_OK(safetensors_write(path, t, 1, NULL, 0));
    safetensors_file *file = NULL;
    if (CHECK_OK(safetensors_open(&file, path)))
        CHECK(file->n_tensors == 1 && strcmp(file->tensors[0].name, "big") == 0, "replaced file");
    safetensors_close(file);
    CHECK(count_temporary_files(scratch) == 0, "%d temporary files left behind",
          count_temporary_files(scratch));
}

/* ---- large tensors (optional) -------------------------------------------------------------- */

/* A tensor of more than 4 GiB round-trips: no 32-bit size or offset anywhere. The buffer comes
 * from calloc, so untouched pages cost no memory; the check reads the file back in chunks. */
static void test_large_tensor(void) {
    const size_t numel = (size_t)9 << 29; /* 4.5 Gi bytes of U8 */
    unsigned char *data = calloc(numel, 1);
    if (!CHECK(data != NULL, "cannot allocate %zu bytes", numel)) return;
    data[0] = 1, data[numel / 2] = 2, data[numel - 1] = 3;
    unsigned char small[3] = {4, 5, 6};
    safetensors_tensor_data t[] = {{"large", "U8", 2, {9, 1 << 29}, data}, {"after", "U8", 1, {3}, small}};
    const char *path = scratch_path("large.safetensors");
    if (CHECK_OK(safetensors_write(path, t, 2, NULL, 0))) {
        safetensors_file *file = NULL;
        if (CHECK_OK(safetensors_open(&file, path))) {
            uint64_t hash = 0, expected = safetensors_fnv1a64(SAFETENSORS_FNV1A64_INIT, data, numel);
            const safetensors_tensor *large = safetensors_find(file, "large");
            CHECK(large && large->nbytes == numel, "large tensor size");
            if (large && CHECK_OK(safetensors_checksum(file, large, &hash)))
                CHECK(hash == expected, "large checksum");
            unsigned char got[3] = {0};
            CHECK_OK(safetensors_load(file, "after", "U8", 1, (int64_t[]){3}, got));
            CHECK(memcmp(got, small, 3) == 0, "tensor after the large one");
            safetensors_close(file);
        }
    }
    remove(path);
    free(data);
}

int main(void) {
    if (!test_make_temp_dir(scratch, sizeof scratch, "test_safetensors")) {
        perror("mkdtemp");
        return 1;
    }
    test_round_trip();
    test_load_checks();
    test_header_alignment();
    valid_file valid = make_valid_file();
    if (valid.bytes != NULL) {
        test_truncation(&valid);
        test_header_length_field(&valid);
        test_broken_json(&valid);
        test_bad_entries(&valid);
        test_bad_layout(&valid);
        test_accepted_edits(&valid);
        test_random_flips(&valid);
        test_atomic_writes(&valid);
    }
    test_not_a_file();
    const char *large = getenv("TF_TEST_LARGE_SAFETENSORS");
    if (large && strcmp(large, "1") == 0) test_large_tensor();
    free(valid.bytes);
    test_remove_tree(scratch);
    return test_finish("test_safetensors");
}
