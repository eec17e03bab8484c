/* 8-bit RGB images and the per-image transforms of the loader, with PIL's and torchvision's
 * semantics (DESIGN.md section 3): RandomResizedCrop geometry, antialiased bicubic resampling,
 * horizontal flip, RandAugment (timm's rand-m9-mstd0.5-inc1, all 15 operations), the eval
 * transform's geometry, and the conversion to CHW planes. They are pure functions of their inputs
 * and an explicit tf_rng, so the worker thread that runs them does not matter. */
#ifndef TF_DATALOADER_IMAGE_H
#define TF_DATALOADER_IMAGE_H

#include "common/config.h"
#include "common/error.h"
#include "common/rng.h"

#include <stddef.h>
#include <stdint.h>

/* Interleaved RGB, rows top to bottom, stride = 3 * width. A worker keeps its images and reuses
 * their memory: image_reserve() grows capacity only when needed. */
typedef struct {
    int width, height;
    uint8_t *pixels;
    size_t capacity; /* bytes allocated */
} tf_image;

tf_status image_reserve(tf_image *image, int width, int height);
void image_free(tf_image *image);

/* A region of an image in pixel coordinates; fractional when it was scaled with the image. */
typedef struct {
    double left, top, width, height;
} tf_box;

/* torchvision RandomResizedCrop.get_params (timm 0.3.2): up to 10 tries of
 * area = U(scale_min, scale_max) * W * H and ratio = exp(U(log ratio_min, log ratio_max)),
 * w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); accepted when it fits, at a
 * uniform integer position; otherwise the centre crop clamped to the ratio range. */
tf_box image_random_resized_crop_box(int width, int height, const tf_augment_config *augment, tf_rng *rng);
/* The same rule with its random numbers given, for tests: uniforms in [0, 1) used in order (two
 * per try: area, ratio; then two for the position: i = floor(u * (H - h + 1)), likewise j); draws
 * past draw_count read as 0. */
tf_box image_random_resized_crop_box_from_draws(int width, int height, const tf_augment_config *augment,
                                                const double *draws, int draw_count);

/* Eval geometry: resize the shorter side to int(size / crop_pct) (aspect kept, torchvision's
 * rounding of the longer side), then centre crop size x size (torchvision's rounding). Returned as
 * the intermediate resize size and the crop's corner in it, for image_resize_then_crop_bicubic; the
 * corner is negative when crop_pct > 1 makes the resized image smaller than the crop (torchvision
 * pads). crop_pct is read as the decimal it was written as (0.8, not the float 0.800000012). */
void image_eval_geometry(int width, int height, int size, float crop_pct, int *resize_width,
                         int *resize_height, int *crop_left, int *crop_top);

/* PIL Image.resize(size, BICUBIC, box): the box of src resampled to out_width x out_height with
 * PIL's separable antialiased bicubic (a = -0.5, support scaled by the downscale factor), 8-bit
 * rounding and clipping as PIL does between the two passes; bit-identical to PIL 9.4. dst is
 * resized (image_reserve). scratch holds the coefficients and the intermediate pass and is reused
 * between calls (its size fields mean nothing). src, dst and scratch are three different images.
 * The train transform's RandomResizedCrop is image_resized_crop_bicubic, not this. */
tf_status image_resize_bicubic(const tf_image *src, tf_box box, int out_width, int out_height, tf_image *dst,
                               tf_image *scratch);

/* torchvision's F.resized_crop on a PIL image: img.crop(box).resize(size, BICUBIC), so the filter
 * sees only the pixels inside the box (edge pixels repeat), unlike image_resize_bicubic, whose
 * filter reaches past the box into the rest of the image. A fractional box (scaled with a reduced
 * JPEG decode) crops to the whole pixels that cover it and resamples the fractional box inside. */
tf_status image_resized_crop_bicubic(const tf_image *src, tf_box box, int out_width, int out_height,
                                     tf_image *dst, tf_image *scratch);

/* The eval transform's pixels: PIL resize of the whole image to resize_width x resize_height, then
 * the crop (crop_left, crop_top, crop_width, crop_height) of that (torchvision's CenterCrop; parts
 * outside the resized image are 0, as torchvision pads), computing only the pixels kept. Equal to
 * resizing then cropping. */
tf_status image_resize_then_crop_bicubic(const tf_image *src, int resize_width, int resize_height,
                                         int crop_left, int crop_top, int crop_width, int crop_height,
                                         tf_image *dst, tf_image *scratch);

void image_flip_horizontal(tf_image *image);

/* RandAugment as timm parses it from a string like "rand-m9-mstd0.5-inc1" (n: ops per image,
 * default 2; m: magnitude; mstd: magnitude std; inc: the "increasing" op set; p: op probability,
 * default 0.5). fill is the colour of pixels that geometric ops bring in. */
typedef struct {
    int enabled;
    int num_ops;
    float magnitude, magnitude_std, probability;
    int increasing;
    uint8_t fill[3];
} tf_randaugment;

/* The 15 operations, in timm's _RAND_INCREASING_TRANSFORMS order. */
typedef enum {
    TF_RA_AUTO_CONTRAST, TF_RA_EQUALIZE, TF_RA_INVERT, TF_RA_ROTATE, TF_RA_POSTERIZE, TF_RA_SOLARIZE,
    TF_RA_SOLARIZE_ADD, TF_RA_COLOR, TF_RA_CONTRAST, TF_RA_BRIGHTNESS, TF_RA_SHARPNESS, TF_RA_SHEAR_X,
    TF_RA_SHEAR_Y, TF_RA_TRANSLATE_X, TF_RA_TRANSLATE_Y, TF_RA_OP_COUNT
} tf_randaugment_op;

/* One operation with its argument already derived from the magnitude (degrees, shear factor,
 * pixels, bits, threshold, amount added, enhance factor), as PIL computes it: bit-identical to the
 * PIL 9.4 call timm makes. In place; scratch (a different image) is reused between calls. */
tf_status randaugment_apply_op(tf_image *image, tf_randaugment_op op, double argument, const uint8_t fill[3],
                               tf_image *scratch);

/* timm's name of an operation ("AutoContrast", ..., "TranslateYRel"; the increasing set's names
 * when increasing), or NULL for a value out of range. */
const char *randaugment_op_name(tf_randaugment_op op, int increasing);

/* timm's level-to-argument mapping at magnitude m in [0, 10] (the argument of
 * randaugment_apply_op): negate is the draw of _randomly_negate for the signed operations, width
 * and height the image size for the Rel translations. 0 for the operations without an argument. */
double randaugment_argument(tf_randaugment_op op, double magnitude, int increasing, int negate, int width,
                            int height);

/* Parses a timm string or "none"; errors name the string and the part that is wrong. */
tf_status randaugment_parse(const char *spec, tf_randaugment *randaugment);
/* Applies RandAugment in place; scratch is reused between calls. */
tf_status randaugment_apply(tf_image *image, const tf_randaugment *randaugment, tf_rng *rng, tf_image *scratch);

/* Writes image (which must be size x size) as uint8 CHW planes [3, size, size]. */
void image_to_chw(const tf_image *image, uint8_t *chw);

#endif
