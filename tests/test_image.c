/* Checks of dataloader/image.h that need no Python: invariants of the crop geometry, the resize and
 * the flip, consistency between the resize entry points, buffer reuse, and the errors. Agreement
 * with PIL and torchvision themselves is tests/test_image_pil.py's job. */
#include "dataloader/image.h"
#include "tests/test_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static tf_augment_config default_crop(void) {
    return (tf_augment_config){
        .scale_min = 0.08f, .scale_max = 1.0f, .ratio_min = 3.0f / 4.0f, .ratio_max = 4.0f / 3.0f};
}

static void fill_random(tf_image *image, tf_rng *rng) {
    for (size_t i = 0; i < (size_t)image->width * (size_t)image->height * 3; i++)
        image->pixels[i] = (uint8_t)tf_rng_below(rng, 256);
}

static int images_equal(const tf_image *a, const tf_image *b) {
    return a->width == b->width && a->height == b->height &&
           memcmp(a->pixels, b->pixels, (size_t)a->width * (size_t)a->height * 3) == 0;
}

static void test_crop_box_inside(void) {
    tf_augment_config augment = default_crop();
    tf_rng rng = tf_rng_make(1, TF_RNG_TEST, 0, 0);
    const int sizes[][2] = {{500, 375}, {375, 500}, {1, 1},     {1, 500},
                            {500, 1},   {2, 3},     {1000, 40}, {224, 224}};
    int bad = 0;
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        for (int i = 0; i < 5000; i++) {
            int w = sizes[s][0], h = sizes[s][1];
            tf_box box = image_random_resized_crop_box(w, h, &augment, &rng);
            if (!(box.left >= 0 && box.top >= 0 && box.width >= 1 && box.height >= 1 &&
                  box.left + box.width <= w && box.top + box.height <= h && box.left == floor(box.left) &&
                  box.width == floor(box.width)))
                bad++;
        }
    }
    CHECK(bad == 0, "%d crop boxes outside the image or not whole pixels", bad);
}

/* Accepted crops keep area in [scale_min, scale_max] and ratio in [ratio_min, ratio_max] up to the
 * rounding of w and h; on 500x375 few draws fall back, and the mean area is near E[U(0.08, 1)]. */
static void test_crop_statistics(void) {
    tf_augment_config augment = default_crop();
    tf_rng rng = tf_rng_make(2, TF_RNG_TEST, 0, 0);
    const int width = 500, height = 375, count = 20000;
    int out_of_range = 0, whole = 0;
    double area_sum = 0, log_ratio_sum = 0;
    for (int i = 0; i < count; i++) {
        tf_box box = image_random_resized_crop_box(width, height, &augment, &rng);
        double area = box.width * box.height / (width * height), ratio = box.width / box.height;
        double slack_area = (box.width + box.height + 1) / (width * height); /* w, h each rounded by 0.5 */
        if (area < 0.08 - slack_area || area > 1.0 + slack_area) out_of_range++;
        if (ratio < 0.75 * (1 - 1.0 / box.height) || ratio > 4.0 / 3.0 * (1 + 1.0 / box.height))
            out_of_range++;
        if (box.width == width && box.height == height) whole++;
        area_sum += area;
        log_ratio_sum += log(ratio);
    }
    CHECK(out_of_range == 0, "%d crops with area or ratio out of range", out_of_range);
    /* Tries whose area does not fit are retried, so the accepted mean sits below 0.54. */
    CHECK(area_sum / count > 0.38 && area_sum / count < 0.50, "mean area fraction %.4f", area_sum / count);
    CHECK(fabs(log_ratio_sum / count) < 0.05, "mean log ratio %.4f", log_ratio_sum / count);
    CHECK(whole < count / 50, "%d of %d crops are the whole image", whole, count);
}

/* The fallback: every try fails (draws of 1 with scale 1 on a very wide image), so the crop is the
 * centred box clamped to the ratio range; Python's round and floor division decide the numbers. */
static void test_crop_fallback(void) {
    tf_augment_config augment = default_crop();
    double draws[20];
    for (int i = 0; i < 20; i++)
        draws[i] = 0.999999;
    tf_box box = image_random_resized_crop_box_from_draws(1000, 50, &augment, draws, 20);
    /* in_ratio 20 > 4/3: h = 50, w = round(50 * 4/3) = round(66.67) = 67, centred. */
    CHECK(box.width == 67 && box.height == 50 && box.left == (1000 - 67) / 2 && box.top == 0,
          "wide fallback %g %g %g %g", box.left, box.top, box.width, box.height);
    box = image_random_resized_crop_box_from_draws(30, 1001, &augment, draws, 20);
    /* in_ratio < 3/4: w = 30, h = round(30 / 0.75) = 40, top = (1001 - 40) // 2 = 480. */
    CHECK(box.width == 30 && box.height == 40 && box.left == 0 && box.top == 480, "tall fallback %g %g %g %g",
          box.left, box.top, box.width, box.height);
    box = image_random_resized_crop_box_from_draws(1, 1, &augment, draws, 0);
    CHECK(box.width == 1 && box.height == 1 && box.left == 0 && box.top == 0, "1x1 fallback");
}

/* Python's round() is half to even: (257 - 224) / 2 = 16.5 -> 16 and (259 - 224) / 2 = 17.5 -> 18. */
static void test_eval_geometry_rounding(void) {
    int rw, rh, left, top;
    image_eval_geometry(224, 257, 224, 1.0f, &rw, &rh, &left, &top);
    CHECK(rw == 224 && rh == 257 && left == 0 && top == 16, "257: %d %d %d %d", rw, rh, left, top);
    image_eval_geometry(224, 259, 224, 1.0f, &rw, &rh, &left, &top);
    CHECK(rw == 224 && rh == 259 && left == 0 && top == 18, "259: %d %d %d %d", rw, rh, left, top);
    image_eval_geometry(500, 375, 224, 0.875f, &rw, &rh, &left, &top);
    CHECK(rw == 341 && rh == 256 && left == 58 && top == 16, "500x375: %d %d %d %d", rw, rh, left, top);
    /* Python: int(224 / 0.8) = 280 (the float 0.8f would give 279). */
    image_eval_geometry(300, 300, 224, 0.8f, &rw, &rh, &left, &top);
    CHECK(rw == 280 && rh == 280 && left == 28 && top == 28, "crop_pct 0.8: %d %d %d %d", rw, rh, left, top);
    /* crop_pct > 1: the resized image is smaller than the crop and torchvision pads it. */
    image_eval_geometry(100, 100, 224, 1.25f, &rw, &rh, &left, &top);
    CHECK(rw == 179 && rh == 179 && left == -22 && top == -22, "crop_pct 1.25: %d %d %d %d", rw, rh, left,
          top);
}

static void test_flip(void) {
    tf_rng rng = tf_rng_make(3, TF_RNG_TEST, 0, 0);
    tf_image image = {0}, copy = {0};
    const int sizes[][2] = {{1, 1}, {2, 1}, {7, 3}, {224, 224}, {333, 17}};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        CHECK_OK(image_reserve(&image, sizes[s][0], sizes[s][1]));
        CHECK_OK(image_reserve(&copy, sizes[s][0], sizes[s][1]));
        fill_random(&image, &rng);
        memcpy(copy.pixels, image.pixels, (size_t)image.width * (size_t)image.height * 3);
        image_flip_horizontal(&image);
        int mirrored = memcmp(image.pixels, copy.pixels + (size_t)(image.width - 1) * 3, 3) == 0;
        image_flip_horizontal(&image);
        CHECK(mirrored && images_equal(&image, &copy), "flip of %dx%d", image.width, image.height);
    }
    image_free(&image);
    image_free(&copy);
}

/* A constant image resamples to the same constant for any box and size: the weights of every
 * output sum to 1 in fixed point up to rounding that the +0.5 absorbs. */
static void test_resize_constant(void) {
    tf_image src = {0}, dst = {0}, scratch = {0};
    CHECK_OK(image_reserve(&src, 321, 211));
    const uint8_t colours[][3] = {{0, 0, 0}, {255, 255, 255}, {124, 116, 104}, {1, 254, 128}};
    const tf_box boxes[] = {{0, 0, 321, 211}, {10.5, 3.25, 100.125, 200}, {300, 200, 21, 11}, {0, 0, 1, 1}};
    const int outs[][2] = {{224, 224}, {7, 500}, {1000, 3}, {1, 1}};
    int bad = 0;
    for (size_t c = 0; c < 4; c++) {
        for (size_t i = 0; i < (size_t)src.width * (size_t)src.height; i++)
            memcpy(src.pixels + 3 * i, colours[c], 3);
        for (size_t b = 0; b < 4; b++) {
            for (size_t o = 0; o < 4; o++) {
                for (int crop = 0; crop < 2; crop++) {
                    tf_status status =
                        crop ? image_resized_crop_bicubic(&src, boxes[b], outs[o][0], outs[o][1], &dst,
                                                          &scratch)
                             : image_resize_bicubic(&src, boxes[b], outs[o][0], outs[o][1], &dst, &scratch);
                    CHECK_OK(status);
                    for (size_t i = 0; i < (size_t)dst.width * (size_t)dst.height; i++)
                        if (memcmp(dst.pixels + 3 * i, colours[c], 3) != 0) bad++;
                }
            }
        }
    }
    CHECK(bad == 0, "%d pixels of resized constant images changed", bad);
    image_free(&src);
    image_free(&dst);
    image_free(&scratch);
}

/* The entry points agree with each other: resize-then-crop equals a full resize cut afterwards
 * (zeros where the crop leaves the image), and a whole-pixel resized crop equals resizing a copy
 * of the cropped pixels. Then buffers are reused: a second call allocates nothing. */
static void test_resize_consistency(void) {
    tf_rng rng = tf_rng_make(4, TF_RNG_TEST, 0, 0);
    tf_image src = {0}, full = {0}, dst = {0}, cut = {0}, scratch = {0}, part = {0};
    CHECK_OK(image_reserve(&src, 317, 229));
    fill_random(&src, &rng);
    const int crops[][4] = {{341, 256, 58, 16}, {224, 300, 0, 38}, {100, 90, -10, 5}, {150, 150, -37, -37}};
    for (size_t c = 0; c < 4; c++) {
        int rw = crops[c][0], rh = crops[c][1], left = crops[c][2], top = crops[c][3], size = 224;
        if (c == 2) size = 120;
        CHECK_OK(image_resize_bicubic(&src, (tf_box){0, 0, 317, 229}, rw, rh, &full, &scratch));
        CHECK_OK(image_resize_then_crop_bicubic(&src, rw, rh, left, top, size, size, &dst, &scratch));
        CHECK_OK(image_reserve(&cut, size, size));
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++)
                for (int ch = 0; ch < 3; ch++) {
                    int sx = x + left, sy = y + top;
                    int inside = sx >= 0 && sy >= 0 && sx < rw && sy < rh;
                    cut.pixels[((size_t)y * size + x) * 3 + ch] =
                        inside ? full.pixels[((size_t)sy * rw + sx) * 3 + ch] : 0;
                }
        CHECK(images_equal(&dst, &cut), "resize_then_crop %dx%d at (%d, %d) differs from resize + cut", rw,
              rh, left, top);
    }

    tf_box box = {17, 9, 150, 201};
    CHECK_OK(image_reserve(&part, 150, 201));
    for (int y = 0; y < 201; y++)
        memcpy(part.pixels + (size_t)y * 150 * 3, src.pixels + ((size_t)(9 + y) * 317 + 17) * 3, 150 * 3);
    CHECK_OK(image_resized_crop_bicubic(&src, box, 224, 224, &dst, &scratch));
    CHECK_OK(image_resize_bicubic(&part, (tf_box){0, 0, 150, 201}, 224, 224, &cut, &scratch));
    CHECK(images_equal(&dst, &cut), "resized crop differs from resizing the cropped pixels");

    uint8_t *scratch_memory = scratch.pixels, *dst_memory = dst.pixels;
    CHECK_OK(image_resized_crop_bicubic(&src, box, 224, 224, &dst, &scratch));
    CHECK(scratch.pixels == scratch_memory && dst.pixels == dst_memory,
          "a repeated resize reallocated its buffers");

    image_free(&src), image_free(&full), image_free(&dst), image_free(&cut), image_free(&scratch),
        image_free(&part);
}

static void test_resize_errors(void) {
    tf_image src = {0}, dst = {0}, scratch = {0};
    CHECK_OK(image_reserve(&src, 10, 10));
    memset(src.pixels, 0, 300);
    tf_status status = image_resize_bicubic(&src, (tf_box){5, 5, 6, 2}, 4, 4, &dst, &scratch);
    CHECK(status != TF_OK && strstr(tf_error_message(), "image_resize_bicubic") &&
              strstr(tf_error_message(), "outside"),
          "box past the edge: %s", tf_error_message());
    status = image_resized_crop_bicubic(&src, (tf_box){0, 0, 10, 10}, 0, 4, &dst, &scratch);
    CHECK(status != TF_OK && strstr(tf_error_message(), "not positive"), "zero output: %s",
          tf_error_message());
    status = image_reserve(&dst, -1, 3);
    CHECK(status != TF_OK && strstr(tf_error_message(), "image_reserve"), "negative size: %s",
          tf_error_message());
    image_free(&src), image_free(&dst), image_free(&scratch);
}

static void test_to_chw(void) {
    tf_image image = {0};
    CHECK_OK(image_reserve(&image, 2, 2));
    for (int i = 0; i < 12; i++)
        image.pixels[i] = (uint8_t)i;
    uint8_t chw[12];
    image_to_chw(&image, chw);
    const uint8_t expected[12] = {0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11};
    CHECK(memcmp(chw, expected, 12) == 0, "CHW planes R, G, B");
    image_free(&image);
}

/* ---- RandAugment ---- */

static void test_randaugment_parse(void) {
    tf_randaugment ra;
    CHECK_OK(randaugment_parse("rand-m9-mstd0.5-inc1", &ra));
    CHECK(ra.enabled && ra.num_ops == 2 && ra.magnitude == 9.0f && ra.magnitude_std == 0.5f &&
              ra.probability == 0.5f && ra.increasing && ra.fill[0] == 124 && ra.fill[1] == 116 &&
              ra.fill[2] == 104,
          "rand-m9-mstd0.5-inc1 fields");
    CHECK_OK(randaugment_parse("rand", &ra));
    CHECK(ra.enabled && ra.num_ops == 2 && ra.magnitude == 10.0f && ra.magnitude_std == 0.0f &&
              !ra.increasing,
          "timm defaults: n2, m10, original set");
    CHECK_OK(randaugment_parse("rand-n3-m5-p0.7", &ra));
    CHECK(ra.num_ops == 3 && ra.magnitude == 5.0f && fabsf(ra.probability - 0.7f) < 1e-7f, "n3 m5 p0.7");
    CHECK_OK(randaugment_parse("none", &ra));
    CHECK(!ra.enabled, "none disables");

    const char *bad[][2] = {
        {"rnd-m9", "start with 'rand-'"},
        {"rand-m", "has no value"},
        {"rand-x9", "unknown section 'x9'"},
        {"rand-m9.5", "bad value in 'm9.5'"},
        {"rand-mstd-1", "'mstd' has no value"},
        {"rand-inc0", "inc1"},
        {"rand-w0", "weighted"},
        {"rand--m9", "empty section"},
        {"rand-m9-", "empty section"},
        {"rand-p1.5", "bad value in 'p1.5'"},
        {"rand-n2x", "bad value in 'n2x'"},
        {"randm9", "start with 'rand-'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        tf_status status = randaugment_parse(bad[i][0], &ra);
        CHECK(status == TF_ERR_USAGE && strstr(tf_error_message(), bad[i][0]) &&
                  strstr(tf_error_message(), bad[i][1]),
              "'%s' should fail naming '%s', got: %s", bad[i][0], bad[i][1], tf_error_message());
    }
}

static void make_photo_like(tf_image *image, int width, int height, tf_rng *rng) {
    CHECK_OK(image_reserve(image, width, height));
    for (int y = 0; y < height; y++)
        for (int x = 0; x < width; x++)
            for (int c = 0; c < 3; c++)
                image->pixels[((size_t)y * width + x) * 3 + c] =
                    (uint8_t)((x * (c + 1) + y * 2 + (int)tf_rng_below(rng, 20)) % 256);
}

/* Every operation keeps the size, geometric ones with a zero argument are the identity, an integer
 * translation is a shift with the fill colour, tiny images are fine, and a warmed-up scratch is not
 * reallocated. */
static void test_randaugment_ops(void) {
    tf_rng rng = tf_rng_make(5, TF_RNG_TEST, 0, 0);
    tf_image image = {0}, original = {0}, scratch = {0};
    const uint8_t fill[3] = {124, 116, 104};
    make_photo_like(&original, 61, 47, &rng);
    size_t bytes = (size_t)61 * 47 * 3;
    CHECK_OK(image_reserve(&image, 61, 47));
    const double arguments[TF_RA_OP_COUNT] = {0,   0,   0,   17,  2,    100, 50,   1.5,
                                              0.4, 1.3, 1.8, 0.2, -0.2, 5.5, -7.25};
    for (int op = 0; op < TF_RA_OP_COUNT; op++) {
        memcpy(image.pixels, original.pixels, bytes);
        CHECK_OK(randaugment_apply_op(&image, (tf_randaugment_op)op, arguments[op], fill, &scratch));
        CHECK(image.width == 61 && image.height == 47, "%s changed the size", randaugment_op_name(op, 1));
    }
    const tf_randaugment_op geometric[] = {TF_RA_ROTATE, TF_RA_SHEAR_X, TF_RA_SHEAR_Y, TF_RA_TRANSLATE_X,
                                           TF_RA_TRANSLATE_Y};
    for (size_t i = 0; i < 5; i++) {
        memcpy(image.pixels, original.pixels, bytes);
        CHECK_OK(randaugment_apply_op(&image, geometric[i], 0.0, fill, &scratch));
        CHECK(memcmp(image.pixels, original.pixels, bytes) == 0, "%s(0) is not the identity",
              randaugment_op_name(geometric[i], 1));
    }
    memcpy(image.pixels, original.pixels, bytes);
    CHECK_OK(randaugment_apply_op(&image, TF_RA_TRANSLATE_X, 3.0, fill, &scratch));
    int shifted = 1;
    for (int y = 0; y < 47; y++)
        for (int x = 0; x < 61; x++) {
            const uint8_t *expect = x + 3 < 61 ? original.pixels + ((size_t)y * 61 + x + 3) * 3 : fill;
            if (memcmp(image.pixels + ((size_t)y * 61 + x) * 3, expect, 3) != 0) shifted = 0;
        }
    CHECK(shifted, "TranslateX by 3 pixels is not a shift left with the fill colour");

    uint8_t *scratch_memory = scratch.pixels;
    CHECK_OK(randaugment_apply_op(&image, TF_RA_ROTATE, 12.0, fill, &scratch));
    CHECK_OK(randaugment_apply_op(&image, TF_RA_SHARPNESS, 1.7, fill, &scratch));
    CHECK(scratch.pixels == scratch_memory, "a warmed-up scratch was reallocated");

    for (int size = 1; size <= 3; size++) {
        make_photo_like(&image, size, size, &rng);
        for (int op = 0; op < TF_RA_OP_COUNT; op++)
            CHECK_OK(randaugment_apply_op(&image, (tf_randaugment_op)op, arguments[op], fill, &scratch));
    }
    image_free(&image), image_free(&original), image_free(&scratch);
}

/* The same generator state gives the same image; different samples differ; n0 and none do nothing. */
static void test_randaugment_apply(void) {
    tf_rng rng = tf_rng_make(6, TF_RNG_TEST, 0, 0);
    tf_image original = {0}, a = {0}, b = {0}, scratch = {0};
    make_photo_like(&original, 64, 48, &rng);
    size_t bytes = (size_t)64 * 48 * 3;
    CHECK_OK(image_reserve(&a, 64, 48));
    CHECK_OK(image_reserve(&b, 64, 48));
    tf_randaugment ra;
    CHECK_OK(randaugment_parse("rand-m9-mstd0.5-inc1", &ra));
    int same = 1, changed = 0, differ = 0;
    for (int sample = 0; sample < 200; sample++) {
        tf_rng first = tf_rng_make(9, TF_RNG_AUGMENT, 0, (uint64_t)sample), second = first;
        memcpy(a.pixels, original.pixels, bytes);
        memcpy(b.pixels, original.pixels, bytes);
        CHECK_OK(randaugment_apply(&a, &ra, &first, &scratch));
        CHECK_OK(randaugment_apply(&b, &ra, &second, &scratch));
        if (memcmp(a.pixels, b.pixels, bytes) != 0) same = 0;
        if (memcmp(a.pixels, original.pixels, bytes) != 0) changed++;
        tf_rng other = tf_rng_make(9, TF_RNG_AUGMENT, 0, (uint64_t)sample + 1000);
        memcpy(b.pixels, original.pixels, bytes);
        CHECK_OK(randaugment_apply(&b, &ra, &other, &scratch));
        if (memcmp(a.pixels, b.pixels, bytes) != 0) differ++;
    }
    CHECK(same, "the same draws gave different images");
    /* Each of 2 ops fires with p 0.5 and nearly all change this image: about 75% change. */
    CHECK(changed > 120 && changed < 180, "%d of 200 samples changed", changed);
    CHECK(differ > 120, "%d of 200 sample pairs differ", differ);

    const char *inert[] = {"none", "rand-n0-m9"};
    for (int i = 0; i < 2; i++) {
        CHECK_OK(randaugment_parse(inert[i], &ra));
        memcpy(a.pixels, original.pixels, bytes);
        CHECK_OK(randaugment_apply(&a, &ra, &rng, &scratch));
        CHECK(memcmp(a.pixels, original.pixels, bytes) == 0, "'%s' changed the image", inert[i]);
    }
    image_free(&original), image_free(&a), image_free(&b), image_free(&scratch);
}

int main(void) {
    test_crop_box_inside();
    test_crop_statistics();
    test_crop_fallback();
    test_eval_geometry_rounding();
    test_flip();
    test_resize_constant();
    test_resize_consistency();
    test_resize_errors();
    test_to_chw();
    test_randaugment_parse();
    test_randaugment_ops();
    test_randaugment_apply();
    return test_finish("test_image");
}
