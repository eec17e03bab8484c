/* Image decoding for the loader and the commands that read single images: the format is told by
 * the bytes, not the file name (ImageNet has a PNG named .JPEG). JPEG goes through TurboJPEG,
 * optionally at a reduced scale of 1/2, 1/4 or 1/8 (the scales with SIMD paths; the other M/8
 * scales are slower than full size), CMYK/YCCK JPEGs are converted to RGB; every other format goes
 * through stb_image. Grayscale becomes RGB. Dimensions are checked against a pixel limit from the
 * header, before any pixel is decoded (decompression bombs).
 *
 * A decoder holds a TurboJPEG handle and scratch memory; one per thread, reused for every image,
 * so that decoding a JPEG allocates nothing once the buffers have grown to the largest image. */
#ifndef TF_DATALOADER_DECODE_H
#define TF_DATALOADER_DECODE_H

#include "common/error.h"
#include "dataloader/image.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* PIL's Image.MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3. */
#define TF_DECODE_DEFAULT_PIXEL_LIMIT 89478485LL

typedef struct tf_decoder tf_decoder;

typedef struct {
    int width, height;   /* full-size dimensions */
    bool jpeg;           /* decoded by TurboJPEG (else stb_image) */
    int jpeg_colorspace; /* TurboJPEG's TJCS_* of a JPEG */
} tf_image_info;

/* pixel_limit <= 0 selects TF_DECODE_DEFAULT_PIXEL_LIMIT. */
tf_status decoder_create(tf_decoder **decoder, int64_t pixel_limit);
void decoder_destroy(tf_decoder *decoder);

/* Reads the dimensions from the header and checks them against the pixel limit. Errors name
 * `path` (used only in messages) and the reason: empty file, unknown format, corrupt header, too
 * many pixels. */
tf_status decoder_read_header(tf_decoder *decoder, const uint8_t *data, size_t size, const char *path,
                              tf_image_info *info);

/* The smallest of the scales 1/8, 1/4, 1/2 that is >= min_scale, or 1 (also for non-JPEG images
 * and whenever min_scale > 1/2). The decoded image then maps to the full-size one by exactly this
 * factor: decoded pixel x covers full-size pixels [x / scale, (x + 1) / scale). */
double decoder_choose_scale(const tf_image_info *info, double min_scale);

/* Decodes the image whose header decoder_read_header() returned in info, at `scale` (from
 * decoder_choose_scale) into RGB. A JPEG whose data ends early is an error; other libjpeg
 * warnings on data that still decodes completely ("extraneous bytes before marker" and the like,
 * which PIL accepts too) are not, and set *warning (may be NULL) to the message. */
tf_status decoder_decode(tf_decoder *decoder, const uint8_t *data, size_t size, const char *path,
                         const tf_image_info *info, double scale, tf_image *image, const char **warning);

/* Reads a whole file into a buffer that grows as needed (*buffer, *capacity are reused between
 * calls; start with NULL, 0). Errors name the path. */
tf_status decode_read_file(const char *path, uint8_t **buffer, size_t *capacity, size_t *size);

/* Reads and decodes one file at full size: for single images (predict, tools). */
tf_status decoder_load_file(tf_decoder *decoder, const char *path, tf_image *image);

#endif
