/* Test tool for tests/test_decode.py: runs the loader's decoder on one file and writes the pixels
 * as a binary PPM, so that a script can compare them with djpeg's and PIL's.
 *
 *   decode_image [--min-scale S] IN OUT.ppm   decode (scaled as the loader would for min_scale S);
 *                                            prints "WIDTHxHEIGHT scale S [warning: ...]"
 *   decode_image --encode-ycck IN.ppm OUT.jpg writes a YCCK JPEG of an RGB PPM through TurboJPEG
 *                                            (inverted CMYK with K = 255, so the colours are the
 *                                            RGB ones), for the CMYK test
 * Exit 0 on success, 1 with the error on stderr. */
#include "common/error.h"
#include "dataloader/decode.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <turbojpeg.h>

static int fail(void) {
    fprintf(stderr, "decode_image: %s\n", tf_error_message());
    return 1;
}

static int write_ppm(const char *path, const tf_image *image) {
    FILE *file = fopen(path, "wb");
    if (!file) return tf_fail(TF_ERR_RUNTIME, "%s: cannot create", path);
    fprintf(file, "P6\n%d %d\n255\n", image->width, image->height);
    size_t bytes = (size_t)image->width * image->height * 3;
    int ok = fwrite(image->pixels, 1, bytes, file) == bytes;
    ok = (fclose(file) == 0) && ok;
    return ok ? TF_OK : tf_fail(TF_ERR_RUNTIME, "%s: write failed", path);
}

static int decode(const char *in, const char *out, double min_scale) {
    tf_decoder *decoder;
    if (decoder_create(&decoder, 0) != TF_OK) return fail();
    uint8_t *data = NULL;
    size_t capacity = 0, size = 0;
    tf_image image = {0};
    tf_image_info info;
    const char *warning = NULL;
    double scale = 1.0;
    tf_status status = decode_read_file(in, &data, &capacity, &size);
    if (status == TF_OK) status = decoder_read_header(decoder, data, size, in, &info);
    if (status == TF_OK) {
        scale = decoder_choose_scale(&info, min_scale);
        status = decoder_decode(decoder, data, size, in, &info, scale, &image, &warning);
    }
    if (status == TF_OK) status = write_ppm(out, &image);
    if (status == TF_OK)
        printf("%dx%d scale %g%s%s\n", image.width, image.height, scale, warning ? " warning: " : "",
               warning ? warning : "");
    image_free(&image);
    free(data);
    decoder_destroy(decoder);
    return status == TF_OK ? 0 : fail();
}

static int encode_ycck(const char *in, const char *out) {
    tjhandle handle = tjInitCompress();
    int width, height, format = TJPF_RGB;
    unsigned char *rgb = tjLoadImage(in, &width, 1, &height, &format, 0);
    if (!rgb) {
        fprintf(stderr, "decode_image: %s: %s\n", in, tjGetErrorStr2(handle));
        return 1;
    }
    unsigned char *cmyk = malloc((size_t)width * height * 4);
    for (size_t i = 0; i < (size_t)width * height; i++) {
        memcpy(cmyk + 4 * i, rgb + 3 * i, 3);
        cmyk[4 * i + 3] = 255;
    }
    unsigned char *jpeg = NULL;
    unsigned long jpeg_size = 0;
    int result = tjCompress2(handle, cmyk, width, 0, height, TJPF_CMYK, &jpeg, &jpeg_size, TJSAMP_444, 95, 0);
    FILE *file = result == 0 ? fopen(out, "wb") : NULL;
    int ok = file && fwrite(jpeg, 1, jpeg_size, file) == jpeg_size;
    if (file) ok = (fclose(file) == 0) && ok;
    if (!ok) fprintf(stderr, "decode_image: %s: %s\n", out, result ? tjGetErrorStr2(handle) : "write failed");
    tjFree(jpeg);
    tjFree(rgb);
    free(cmyk);
    tjDestroy(handle);
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "--encode-ycck") == 0) return encode_ycck(argv[2], argv[3]);
    if (argc == 5 && strcmp(argv[1], "--min-scale") == 0) return decode(argv[3], argv[4], atof(argv[2]));
    if (argc == 3) return decode(argv[1], argv[2], 1.0);
    fprintf(stderr,
            "usage: decode_image [--min-scale S] IN OUT.ppm | decode_image --encode-ycck IN.ppm OUT.jpg\n");
    return 2;
}
