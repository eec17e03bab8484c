/* Decoding by content: JPEG (magic FF D8 FF) through TurboJPEG 2.1, everything else through
 * stb_image. See decode.h for the contract.
 *
 * CMYK and YCCK JPEGs: TurboJPEG decodes them to CMYK but not to RGB. Photoshop (and PIL, and
 * libjpeg itself) write CMYK JPEGs "inverted", with an Adobe marker: the stored value is 255 minus
 * the amount of ink. libjpeg-turbo's own tools convert such data with R = C * K / 255 (rounded),
 * G = M * K / 255, B = Y * K / 255 (cmyk.h in its source); PIL inverts and applies
 * 255 - min(255, ...) math that gives the same numbers. We do the same.
 *
 * Warnings: libjpeg reports recoverable damage as warnings and still produces a full image.
 * "Premature end of JPEG file" means the data ran out and the rest of the image is grey filler:
 * PIL refuses such files ("image file is truncated"), and so do we. Other warnings (extraneous
 * bytes before a marker, and the like) leave a complete, correct image, and PIL uses those images
 * silently; we use them too but hand the message back so the loader can log it once. */
#include "dataloader/decode.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <turbojpeg.h>
#include <unistd.h>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_STDIO /* we read files ourselves */
#define STBI_NO_JPEG  /* JPEG is TurboJPEG's: a JPEG it refuses is a bad file, not a second chance */
#define STBI_NO_PSD
#define STBI_NO_HDR
#define STBI_NO_PIC
#define STBI_ASSERT(x) ((void)0)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wtype-limits"
#include <stb/stb_image.h>
#pragma GCC diagnostic pop

struct tf_decoder {
    tjhandle handle;
    int64_t pixel_limit;
    uint8_t *cmyk; /* CMYK JPEGs decode here first */
    size_t cmyk_capacity;
    uint8_t *file; /* decoder_load_file's buffer */
    size_t file_capacity;
    char warning[256];
};

tf_status decoder_create(tf_decoder **decoder, int64_t pixel_limit) {
    *decoder = NULL;
    tf_decoder *created = calloc(1, sizeof *created);
    if (!created) return tf_fail(TF_ERR_RUNTIME, "decoder: out of memory");
    created->handle = tjInitDecompress();
    if (!created->handle) {
        free(created);
        return tf_fail(TF_ERR_RUNTIME, "decoder: tjInitDecompress failed: %s", tjGetErrorStr2(NULL));
    }
    created->pixel_limit = pixel_limit > 0 ? pixel_limit : TF_DECODE_DEFAULT_PIXEL_LIMIT;
    *decoder = created;
    return TF_OK;
}

void decoder_destroy(tf_decoder *decoder) {
    if (!decoder) return;
    tjDestroy(decoder->handle);
    free(decoder->cmyk);
    free(decoder->file);
    free(decoder);
}

static bool is_jpeg(const uint8_t *data, size_t size) {
    return size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF;
}

tf_status decoder_read_header(tf_decoder *decoder, const uint8_t *data, size_t size, const char *path,
                              tf_image_info *info) {
    *info = (tf_image_info){0};
    if (size == 0) return tf_fail(TF_ERR_RUNTIME, "%s: empty file (0 bytes)", path);
    int width = 0, height = 0;
    if (is_jpeg(data, size)) {
        int subsampling, colorspace;
        /* A warning (extraneous bytes before a marker) still gives a usable header; decoding repeats
         * it, and decoder_decode reports it. */
        if (tjDecompressHeader3(decoder->handle, data, size, &width, &height, &subsampling, &colorspace) !=
                0 &&
            (tjGetErrorCode(decoder->handle) == TJERR_FATAL || width <= 0 || height <= 0))
            return tf_fail(TF_ERR_RUNTIME, "%s: corrupt JPEG header: %s", path,
                           tjGetErrorStr2(decoder->handle));
        info->jpeg = true;
        info->jpeg_colorspace = colorspace;
    } else {
        int channels;
        if (size > INT32_MAX || !stbi_info_from_memory(data, (int)size, &width, &height, &channels))
            return tf_fail(TF_ERR_RUNTIME, "%s: not a JPEG, and not an image stb_image reads (%s)", path,
                           stbi_failure_reason() ? stbi_failure_reason() : "unknown format");
    }
    if (width <= 0 || height <= 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: image of %dx%d pixels", path, width, height);
    if ((int64_t)width * height > decoder->pixel_limit)
        return tf_fail(TF_ERR_RUNTIME,
                       "%s: %dx%d = %lld pixels is over the limit of %lld (a decompression bomb?)", path,
                       width, height, (long long)width * height, (long long)decoder->pixel_limit);
    info->width = width;
    info->height = height;
    return TF_OK;
}

double decoder_choose_scale(const tf_image_info *info, double min_scale) {
    if (!info->jpeg) return 1.0;
    static const double scales[] = {0.125, 0.25, 0.5};
    for (int i = 0; i < 3; i++)
        if (scales[i] >= min_scale) return scales[i];
    return 1.0;
}

static tf_status grow(uint8_t **buffer, size_t *capacity, size_t needed) {
    if (needed <= *capacity) return TF_OK;
    uint8_t *grown = realloc(*buffer, needed);
    if (!grown) return tf_fail(TF_ERR_RUNTIME, "decoder: out of memory for %zu bytes", needed);
    *buffer = grown;
    *capacity = needed;
    return TF_OK;
}

/* Inverted (Adobe) CMYK to RGB as libjpeg-turbo's tools do it: round(C * K / 255). */
static void inverted_cmyk_to_rgb(const uint8_t *cmyk, uint8_t *rgb, size_t pixels) {
    for (size_t i = 0; i < pixels; i++, cmyk += 4, rgb += 3) {
        unsigned k = cmyk[3];
        rgb[0] = (uint8_t)((2u * cmyk[0] * k + 255u) / 510u);
        rgb[1] = (uint8_t)((2u * cmyk[1] * k + 255u) / 510u);
        rgb[2] = (uint8_t)((2u * cmyk[2] * k + 255u) / 510u);
    }
}

/* After a failed tjDecompress2: a fatal error or a truncation fails; other warnings pass. */
static tf_status classify_jpeg_failure(tf_decoder *decoder, const char *path, const char **warning) {
    const char *message = tjGetErrorStr2(decoder->handle);
    if (tjGetErrorCode(decoder->handle) == TJERR_FATAL)
        return tf_fail(TF_ERR_RUNTIME, "%s: corrupt JPEG: %s", path, message);
    if (strstr(message, "Premature end of JPEG file"))
        return tf_fail(TF_ERR_RUNTIME, "%s: truncated JPEG (%s)", path, message);
    snprintf(decoder->warning, sizeof decoder->warning, "%s", message);
    if (warning) *warning = decoder->warning;
    return TF_OK;
}

static tf_status decode_jpeg(tf_decoder *decoder, const uint8_t *data, size_t size, const char *path,
                             const tf_image_info *info, double scale, tf_image *image, const char **warning) {
    int denominator = (int)(1.0 / scale + 0.5);
    tjscalingfactor factor = {1, denominator};
    int width = TJSCALED(info->width, factor), height = TJSCALED(info->height, factor);
    TF_TRY(image_reserve(image, width, height));
    image->width = width;
    image->height = height;
    /* TJFLAG_LIMITSCANS refuses progressive JPEGs with absurd scan counts (a known slow-down
     * attack); defaults otherwise (accurate DCT, smooth upsampling), as djpeg and PIL decode. */
    const int flags = TJFLAG_LIMITSCANS;
    int result;
    bool cmyk = info->jpeg_colorspace == TJCS_CMYK || info->jpeg_colorspace == TJCS_YCCK;
    if (cmyk) {
        TF_TRY(grow(&decoder->cmyk, &decoder->cmyk_capacity, (size_t)width * height * 4));
        result =
            tjDecompress2(decoder->handle, data, size, decoder->cmyk, width, 0, height, TJPF_CMYK, flags);
    } else {
        result = tjDecompress2(decoder->handle, data, size, image->pixels, width, 0, height, TJPF_RGB, flags);
    }
    if (result != 0) TF_TRY(classify_jpeg_failure(decoder, path, warning));
    if (cmyk) inverted_cmyk_to_rgb(decoder->cmyk, image->pixels, (size_t)width * height);
    return TF_OK;
}

static tf_status decode_other(const uint8_t *data, size_t size, const char *path, tf_image *image) {
    int width, height, channels;
    uint8_t *pixels = stbi_load_from_memory(data, (int)size, &width, &height, &channels, 3);
    if (!pixels)
        return tf_fail(TF_ERR_RUNTIME, "%s: cannot decode (stb_image: %s)", path,
                       stbi_failure_reason() ? stbi_failure_reason() : "unknown error");
    tf_status status = image_reserve(image, width, height);
    if (status == TF_OK) {
        image->width = width;
        image->height = height;
        memcpy(image->pixels, pixels, (size_t)width * height * 3);
    }
    stbi_image_free(pixels);
    return status;
}

tf_status decoder_decode(tf_decoder *decoder, const uint8_t *data, size_t size, const char *path,
                         const tf_image_info *info, double scale, tf_image *image, const char **warning) {
    if (warning) *warning = NULL;
    if (info->jpeg) return decode_jpeg(decoder, data, size, path, info, scale, image, warning);
    return decode_other(data, size, path, image);
}

tf_status decode_read_file(const char *path, uint8_t **buffer, size_t *capacity, size_t *size) {
    *size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return tf_fail(TF_ERR_RUNTIME, "%s: cannot open: %s", path, strerror(errno));
    struct stat info;
    tf_status status = TF_OK;
    if (fstat(fd, &info) != 0)
        status = tf_fail(TF_ERR_RUNTIME, "%s: cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(info.st_mode))
        status = tf_fail(TF_ERR_RUNTIME, "%s: not a regular file", path);
    /* One byte more than the size, so that a file that grew since fstat is still read whole. */
    size_t wanted = status == TF_OK ? (size_t)info.st_size + 1 : 0;
    if (status == TF_OK) status = grow(buffer, capacity, wanted);
    while (status == TF_OK) {
        if (*size == *capacity) status = grow(buffer, capacity, *capacity * 2);
        if (status != TF_OK) break;
        ssize_t got = read(fd, *buffer + *size, *capacity - *size);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) status = tf_fail(TF_ERR_RUNTIME, "%s: read failed: %s", path, strerror(errno));
        if (got <= 0) break;
        *size += (size_t)got;
    }
    close(fd);
    return status;
}

tf_status decoder_load_file(tf_decoder *decoder, const char *path, tf_image *image) {
    size_t size;
    TF_TRY(decode_read_file(path, &decoder->file, &decoder->file_capacity, &size));
    tf_image_info info;
    TF_TRY(decoder_read_header(decoder, decoder->file, size, path, &info));
    return decoder_decode(decoder, decoder->file, size, path, &info, 1.0, image, NULL);
}
