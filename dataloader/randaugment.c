/* RandAugment as timm 0.3.2 builds it for MAE (rand_augment_transform("rand-m9-mstd0.5-inc1")):
 * the parser of timm's string, the level-to-argument mapping, and the 15 operations with the pixel
 * arithmetic of the PIL 9.4 calls timm makes (ImageOps, ImageEnhance, Image.rotate/transform with
 * BICUBIC and a fill colour), down to PIL's float types and truncations, so that each operation
 * matches PIL exactly (tests/test_image_pil.py). Per-value operations run as 256-entry tables;
 * the affine ones use Pillow's Geometry.c bicubic (a = -1, not antialiased, unlike resize). */
#include "dataloader/image.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

static const char *const op_names[TF_RA_OP_COUNT] = {
    "AutoContrast", "Equalize",    "Invert", "Rotate",        "Posterize",
    "Solarize",     "SolarizeAdd", "Color",  "Contrast",      "Brightness",
    "Sharpness",    "ShearX",      "ShearY", "TranslateXRel", "TranslateYRel"};

static const char *const increasing_op_names[TF_RA_OP_COUNT] = {"AutoContrast",
                                                                "Equalize",
                                                                "Invert",
                                                                "Rotate",
                                                                "PosterizeIncreasing",
                                                                "SolarizeIncreasing",
                                                                "SolarizeAdd",
                                                                "ColorIncreasing",
                                                                "ContrastIncreasing",
                                                                "BrightnessIncreasing",
                                                                "SharpnessIncreasing",
                                                                "ShearX",
                                                                "ShearY",
                                                                "TranslateXRel",
                                                                "TranslateYRel"};

const char *randaugment_op_name(tf_randaugment_op op, int increasing) {
    if ((int)op < 0 || op >= TF_RA_OP_COUNT) return NULL;
    return increasing ? increasing_op_names[op] : op_names[op];
}

/* ---- parsing ------------------------------------------------------------------------------------- */

/* A whole non-negative decimal integer (timm reads m and n with int()). */
static int parse_count(const char *text, int *value) {
    if (!*text) return 0;
    long result = 0;
    for (const char *c = text; *c; c++) {
        if (*c < '0' || *c > '9' || result > 1000000) return 0;
        result = result * 10 + (*c - '0');
    }
    *value = (int)result;
    return 1;
}

static int parse_real(const char *text, float *value) {
    char *end;
    double result = strtod(text, &end);
    if (end == text || *end || !isfinite(result) || result < 0) return 0;
    *value = (float)result;
    return 1;
}

/* One "-KEYVALUE" section; timm splits it at the first digit (re.split(r'(\d.*)', section)). */
static tf_status parse_section(const char *spec, const char *section, tf_randaugment *ra) {
    size_t key_length = strcspn(section, "0123456789");
    const char *value = section + key_length;
    char key[16];
    if (!*value)
        return tf_fail(TF_ERR_USAGE,
                       "randaugment '%s': section '%s' has no value (expected m9, n2, mstd0.5, inc1, p0.5)",
                       spec, section);
    if (key_length >= sizeof key)
        return tf_fail(TF_ERR_USAGE, "randaugment '%s': unknown section '%s'", spec, section);
    memcpy(key, section, key_length);
    key[key_length] = 0;
    int ok = 1;
    if (!strcmp(key, "m")) {
        int magnitude = 0;
        ok = parse_count(value, &magnitude);
        ra->magnitude = (float)magnitude;
    } else if (!strcmp(key, "n")) {
        ok = parse_count(value, &ra->num_ops);
    } else if (!strcmp(key, "mstd")) {
        ok = parse_real(value, &ra->magnitude_std);
    } else if (!strcmp(key, "p")) {
        ok = parse_real(value, &ra->probability) && ra->probability <= 1.0f;
    } else if (!strcmp(key, "inc")) {
        /* timm tests bool(value), true for any non-empty string, so "inc0" would also select the
         * increasing set; refuse it rather than guess what was meant. */
        if (strcmp(value, "1") != 0)
            return tf_fail(TF_ERR_USAGE,
                           "randaugment '%s': write inc1 for the increasing set (timm reads any inc value as "
                           "inc1), or leave it out for the original set",
                           spec);
        ra->increasing = 1;
    } else if (!strcmp(key, "w")) {
        return tf_fail(TF_ERR_USAGE, "randaugment '%s': weighted op choice ('%s') is not supported", spec,
                       section);
    } else {
        return tf_fail(TF_ERR_USAGE, "randaugment '%s': unknown section '%s' (expected m, n, mstd, inc, p)",
                       spec, section);
    }
    if (!ok) return tf_fail(TF_ERR_USAGE, "randaugment '%s': bad value in '%s'", spec, section);
    return TF_OK;
}

tf_status randaugment_parse(const char *spec, tf_randaugment *randaugment) {
    /* timm's defaults; fill is MAE's hparams img_mean: round(255 * ImageNet mean). */
    tf_randaugment ra = {.enabled = 1,
                         .num_ops = 2,
                         .magnitude = 10.0f,
                         .magnitude_std = 0.0f,
                         .probability = 0.5f,
                         .increasing = 0,
                         .fill = {124, 116, 104}};
    if (!strcmp(spec, "none") || !strcmp(spec, "")) {
        ra.enabled = 0;
        *randaugment = ra;
        return TF_OK;
    }
    char copy[256];
    if (strlen(spec) >= sizeof copy) return tf_fail(TF_ERR_USAGE, "randaugment '%.40s...': too long", spec);
    strcpy(copy, spec);
    char *rest = copy;
    char *first = strsep(&rest, "-");
    if (strcmp(first, "rand") != 0)
        return tf_fail(TF_ERR_USAGE,
                       "randaugment '%s': must be 'none' or start with 'rand-' (as rand-m9-mstd0.5-inc1)",
                       spec);
    for (char *section; (section = strsep(&rest, "-")) != NULL;) {
        if (!*section) return tf_fail(TF_ERR_USAGE, "randaugment '%s': empty section", spec);
        TF_TRY(parse_section(spec, section, &ra));
    }
    *randaugment = ra;
    return TF_OK;
}

/* ---- level to argument (timm's _*_level_to_arg) ------------------------------------------------- */

double randaugment_argument(tf_randaugment_op op, double magnitude, int increasing, int negate, int width,
                            int height) {
    double level = magnitude / 10.0; /* level / _MAX_LEVEL */
    double sign = negate ? -1.0 : 1.0;
    switch (op) {
    case TF_RA_ROTATE:
        return sign * (level * 30.);
    case TF_RA_POSTERIZE:
        return increasing ? 4 - (int)(level * 4) : (int)(level * 4);
    case TF_RA_SOLARIZE:
        return increasing ? 256 - (int)(level * 256) : (int)(level * 256);
    case TF_RA_SOLARIZE_ADD:
        return (int)(level * 110);
    case TF_RA_COLOR:
    case TF_RA_CONTRAST:
    case TF_RA_BRIGHTNESS:
    case TF_RA_SHARPNESS:
        return increasing ? 1.0 + sign * (level * .9) : level * 1.8 + 0.1;
    case TF_RA_SHEAR_X:
    case TF_RA_SHEAR_Y:
        return sign * (level * 0.3);
    case TF_RA_TRANSLATE_X:
        return sign * (level * 0.45) * width; /* translate_x_rel: pct * img.size[0] */
    case TF_RA_TRANSLATE_Y:
        return sign * (level * 0.45) * height;
    default:
        return 0.0;
    }
}

static int op_is_signed(tf_randaugment_op op, int increasing) {
    switch (op) {
    case TF_RA_ROTATE:
    case TF_RA_SHEAR_X:
    case TF_RA_SHEAR_Y:
    case TF_RA_TRANSLATE_X:
    case TF_RA_TRANSLATE_Y:
        return 1;
    case TF_RA_COLOR:
    case TF_RA_CONTRAST:
    case TF_RA_BRIGHTNESS:
    case TF_RA_SHARPNESS:
        return increasing;
    default:
        return 0;
    }
}

/* ---- per-value operations ---------------------------------------------------------------------- */

static size_t pixel_count(const tf_image *image) {
    return (size_t)image->width * (size_t)image->height;
}

/* Image.point with one table per channel. */
static void apply_tables(tf_image *image, const uint8_t tables[3][256]) {
    uint8_t *p = image->pixels;
    for (size_t i = 0, n = pixel_count(image); i < n; i++, p += 3) {
        p[0] = tables[0][p[0]];
        p[1] = tables[1][p[1]];
        p[2] = tables[2][p[2]];
    }
}

static void apply_table(tf_image *image, const uint8_t table[256]) {
    uint8_t *p = image->pixels;
    for (size_t i = 0, n = pixel_count(image) * 3; i < n; i++)
        p[i] = table[p[i]];
}

static void histograms(const tf_image *image, uint32_t counts[3][256]) {
    memset(counts, 0, sizeof(uint32_t) * 3 * 256);
    const uint8_t *p = image->pixels;
    for (size_t i = 0, n = pixel_count(image); i < n; i++, p += 3) {
        counts[0][p[0]]++;
        counts[1][p[1]]++;
        counts[2][p[2]]++;
    }
}

static uint8_t clamp_byte(long value) {
    return (uint8_t)(value < 0 ? 0 : value > 255 ? 255 : value);
}

/* ImageOps.autocontrast(cutoff=0), per channel: the darkest level maps to 0, the lightest to 255,
 * table[i] = int(i * scale + offset) with scale = 255 / (hi - lo), offset = -lo * scale. */
static void auto_contrast(tf_image *image) {
    uint32_t counts[3][256];
    uint8_t tables[3][256];
    histograms(image, counts);
    for (int c = 0; c < 3; c++) {
        int lo = 0, hi = 255;
        while (lo < 255 && !counts[c][lo])
            lo++;
        while (hi > 0 && !counts[c][hi])
            hi--;
        if (hi <= lo) {
            for (int i = 0; i < 256; i++)
                tables[c][i] = (uint8_t)i;
            continue;
        }
        double scale = 255.0 / (hi - lo), offset = -lo * scale;
        for (int i = 0; i < 256; i++)
            tables[c][i] = clamp_byte((long)(i * scale + offset));
    }
    apply_tables(image, tables);
}

/* ImageOps.equalize, per channel: step = (pixels - count of the top level) // 255, table[i] =
 * (step // 2 + pixels below i) // step. PIL's point() clips the table to 8 bits. */
static void equalize(tf_image *image) {
    uint32_t counts[3][256];
    uint8_t tables[3][256];
    histograms(image, counts);
    for (int c = 0; c < 3; c++) {
        long total = 0, last = 0;
        int levels = 0;
        for (int i = 0; i < 256; i++) {
            if (!counts[c][i]) continue;
            total += counts[c][i];
            last = counts[c][i];
            levels++;
        }
        long step = levels <= 1 ? 0 : (total - last) / 255;
        if (!step) {
            for (int i = 0; i < 256; i++)
                tables[c][i] = (uint8_t)i;
            continue;
        }
        long n = step / 2;
        for (int i = 0; i < 256; i++) {
            tables[c][i] = clamp_byte(n / step);
            n += counts[c][i];
        }
    }
    apply_tables(image, tables);
}

static void invert(tf_image *image) {
    uint8_t table[256];
    for (int i = 0; i < 256; i++)
        table[i] = (uint8_t)(255 - i);
    apply_table(image, table);
}

/* timm posterize: unchanged at 8 bits or more, else ImageOps.posterize (keep the top bits). */
static void posterize(tf_image *image, int bits) {
    if (bits >= 8) return;
    if (bits < 0) bits = 0;
    uint8_t table[256], mask = (uint8_t) ~((1 << (8 - bits)) - 1);
    for (int i = 0; i < 256; i++)
        table[i] = (uint8_t)(i & mask);
    apply_table(image, table);
}

/* ImageOps.solarize: values at or above the threshold are inverted. */
static void solarize(tf_image *image, int threshold) {
    uint8_t table[256];
    for (int i = 0; i < 256; i++)
        table[i] = (uint8_t)(i < threshold ? i : 255 - i);
    apply_table(image, table);
}

/* timm solarize_add: add to values below 128 (threshold), min(255, i + add). */
static void solarize_add(tf_image *image, int add) {
    uint8_t table[256];
    for (int i = 0; i < 256; i++)
        table[i] = i < 128 ? clamp_byte(i + add) : (uint8_t)i;
    apply_table(image, table);
}

/* ImagingBlend (Blend.c) with PIL's types: alpha is a C float, in1 + alpha * (in2 - in1) is float
 * arithmetic, the result is clipped and truncated. in1 is the degenerate image, in2 the original. */
static inline uint8_t blend_value(int in1, int in2, float alpha) {
    float value = (float)in1 + alpha * (float)(in2 - in1);
    if (value <= 0.0f) return 0;
    if (value >= 255.0f) return 255;
    return (uint8_t)value;
}

/* Enhance with a constant degenerate image (Brightness: black; Contrast: the grey mean). */
static void blend_constant(tf_image *image, int degenerate, double factor) {
    uint8_t table[256];
    for (int i = 0; i < 256; i++)
        table[i] = blend_value(degenerate, i, (float)factor);
    apply_table(image, table);
}

/* PIL's convert("L"): ITU-R 601-2 luma in 16-bit fixed point, rounded (Convert.c L24). */
static inline int luma(const uint8_t *p) {
    return (p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >> 16;
}

/* ImageEnhance.Color: blend with convert("L").convert("RGB"). */
static void color(tf_image *image, double factor) {
    float alpha = (float)factor;
    uint8_t *p = image->pixels;
    for (size_t i = 0, n = pixel_count(image); i < n; i++, p += 3) {
        int grey = luma(p);
        p[0] = blend_value(grey, p[0], alpha);
        p[1] = blend_value(grey, p[1], alpha);
        p[2] = blend_value(grey, p[2], alpha);
    }
}

/* ImageEnhance.Contrast: blend with the constant int(mean of convert("L") + 0.5). */
static void contrast(tf_image *image, double factor) {
    uint64_t sum = 0;
    const uint8_t *p = image->pixels;
    size_t n = pixel_count(image);
    for (size_t i = 0; i < n; i++, p += 3)
        sum += (uint64_t)luma(p);
    double mean = (double)sum / (double)n; /* ImageStat's mean: sum(i * h[i]) / count */
    blend_constant(image, (int)(mean + 0.5), factor);
}

/* ImageEnhance.Sharpness: blend with image.filter(SMOOTH), Filter.c's ImagingFilter3x3 in float:
 * kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 as floats, sums from a +0.5 offset row by row (the row
 * below first, as PIL walks it), truncated; the border rows and columns stay as they are, so
 * blending leaves them unchanged. The smoothed rows go to scratch. */
static tf_status sharpness(tf_image *image, double factor, tf_image *scratch) {
    int width = image->width, height = image->height;
    if (width < 3 || height < 3) return TF_OK;
    TF_TRY(image_reserve(scratch, width, height));
    const float edge = 1.0f / 13.0f, centre = 5.0f / 13.0f;
    size_t stride = (size_t)width * 3;
    for (int y = 1; y < height - 1; y++) {
        const uint8_t *above = image->pixels + (size_t)(y - 1) * stride, *row = above + stride,
                      *below = row + stride;
        uint8_t *out = scratch->pixels + (size_t)y * stride;
        for (size_t x = 3; x < stride - 3; x++) {
            float sum = 0.5f;
            sum += (float)below[x - 3] * edge + (float)below[x] * edge + (float)below[x + 3] * edge;
            sum += (float)row[x - 3] * edge + (float)row[x] * centre + (float)row[x + 3] * edge;
            sum += (float)above[x - 3] * edge + (float)above[x] * edge + (float)above[x + 3] * edge;
            out[x] = (uint8_t)(sum <= 0.0f ? 0.0f : sum >= 255.0f ? 255.0f : sum);
        }
    }
    float alpha = (float)factor;
    for (int y = 1; y < height - 1; y++) {
        uint8_t *row = image->pixels + (size_t)y * stride;
        const uint8_t *smooth = scratch->pixels + (size_t)y * stride;
        for (size_t x = 3; x < stride - 3; x++)
            row[x] = blend_value(smooth[x], row[x], alpha);
    }
    return TF_OK;
}

/* ---- affine operations (Image.transform(size, AFFINE, data, BICUBIC, fillcolor=fill)) ------------- */

/* Pillow's BICUBIC macro in Geometry.c: cubic convolution with a = -1 in Horner form, evaluated in
 * exactly this order (the truncation to 8 bits makes the last bit matter). */
static inline double cubic(double v1, double v2, double v3, double v4, double d) {
    double p1 = v2;
    double p2 = -v1 + v3;
    double p3 = 2 * (v1 - v2) + v3 - v4;
    double p4 = -v1 + v2 - v3 + v4;
    return p1 + d * (p2 + d * (p3 + d * p4));
}

static inline int clamp_index(int i, int size) {
    return i < 0 ? 0 : i >= size ? size - 1 : i;
}

/* Pillow's bicubic_filter32RGB at source point (xin, yin): 4x4 neighbours with edge clamping,
 * rows first, then the column; <= 0 gives 0, >= 255 gives 255, otherwise truncation. At d = 0 a
 * cubic returns its second value exactly (p1 + 0 * finite), so a sample on a pixel row (dy = 0:
 * translations and shears along x) needs only that row, and one on a pixel column (dx = 0) needs no
 * horizontal cubics: the same numbers as Pillow's, a fraction of the work. With AVX2 the three
 * channels are the lanes of one vector (the fourth lane is ignored), in the same operation order,
 * so the results are identical; pixel reads of 4 bytes need one byte of slack after the image. */
#if defined(__AVX2__)
static inline __m256d lanes_of(__m128i v) {
    return _mm256_cvtepi32_pd(v);
}

static inline __m128i pixel_lanes(const uint8_t *p) {
    int32_t bytes;
    memcpy(&bytes, p, sizeof bytes);
    return _mm_cvtepu8_epi32(_mm_cvtsi32_si128(bytes));
}

/* The row cubic on 8-bit values: p1..p4 are exact integers, as in Pillow's macro on UINT8. */
static inline __m256d cubic_row(const uint8_t *in, int x0, int x1, int x2, int x3, __m256d d) {
    __m128i v1 = pixel_lanes(in + x0), v2 = pixel_lanes(in + x1), v3 = pixel_lanes(in + x2),
            v4 = pixel_lanes(in + x3);
    __m256d p1 = lanes_of(v2);
    __m256d p2 = lanes_of(_mm_sub_epi32(v3, v1));
    __m256d p3 = lanes_of(_mm_sub_epi32(_mm_add_epi32(_mm_slli_epi32(_mm_sub_epi32(v1, v2), 1), v3), v4));
    __m256d p4 = lanes_of(_mm_add_epi32(_mm_sub_epi32(_mm_sub_epi32(v2, v1), v3), v4));
    return _mm256_add_pd(
        p1, _mm256_mul_pd(d, _mm256_add_pd(p2, _mm256_mul_pd(d, _mm256_add_pd(p3, _mm256_mul_pd(d, p4))))));
}

/* The column cubic on doubles, in Pillow's order: -v1 + v3, 2 * (v1 - v2) + v3 - v4, -v1 + v2 - v3 + v4. */
static inline __m256d cubic_column(__m256d v1, __m256d v2, __m256d v3, __m256d v4, __m256d d) {
    __m256d p2 = _mm256_sub_pd(v3, v1);
    __m256d p3 =
        _mm256_sub_pd(_mm256_add_pd(_mm256_add_pd(_mm256_sub_pd(v1, v2), _mm256_sub_pd(v1, v2)), v3), v4);
    __m256d p4 = _mm256_add_pd(_mm256_sub_pd(_mm256_sub_pd(v2, v1), v3), v4);
    return _mm256_add_pd(
        v2, _mm256_mul_pd(d, _mm256_add_pd(p2, _mm256_mul_pd(d, _mm256_add_pd(p3, _mm256_mul_pd(d, p4))))));
}

static inline void bicubic_sample(const tf_image *src, double xin, double yin, uint8_t *out) {
    xin -= 0.5;
    yin -= 0.5;
    int x = xin < 0.0 ? (int)floor(xin) : (int)xin;
    int y = yin < 0.0 ? (int)floor(yin) : (int)yin;
    double dx = xin - x, dy = yin - y;
    int w = src->width, h = src->height;
    size_t stride = (size_t)w * 3;
    int x0 = clamp_index(x - 1, w) * 3, x1 = clamp_index(x, w) * 3, x2 = clamp_index(x + 1, w) * 3,
        x3 = clamp_index(x + 2, w) * 3;
    __m256d vdx = _mm256_set1_pd(dx), value;
    if (dy == 0.0) {
        const uint8_t *in = src->pixels + (size_t)clamp_index(y, h) * stride;
        value = dx == 0.0 ? lanes_of(pixel_lanes(in + x1)) : cubic_row(in, x0, x1, x2, x3, vdx);
    } else {
        __m256d rows[4];
        for (int j = 0; j < 4; j++) {
            const uint8_t *in = src->pixels + (size_t)clamp_index(y - 1 + j, h) * stride;
            rows[j] = dx == 0.0 ? lanes_of(pixel_lanes(in + x1)) : cubic_row(in, x0, x1, x2, x3, vdx);
        }
        value = cubic_column(rows[0], rows[1], rows[2], rows[3], _mm256_set1_pd(dy));
    }
    /* clamp to [0, 255] then truncate: Pillow's <= 0, >= 255 and (UINT8) cases */
    value = _mm256_min_pd(_mm256_max_pd(value, _mm256_setzero_pd()), _mm256_set1_pd(255.0));
    __m128i ints = _mm256_cvttpd_epi32(value);
    int32_t packed = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(ints, ints), ints));
    memcpy(out, &packed, 3);
}
#else
static inline void bicubic_sample(const tf_image *src, double xin, double yin, uint8_t *out) {
    xin -= 0.5;
    yin -= 0.5;
    int x = xin < 0.0 ? (int)floor(xin) : (int)xin;
    int y = yin < 0.0 ? (int)floor(yin) : (int)yin;
    double dx = xin - x, dy = yin - y;
    int w = src->width, h = src->height;
    size_t stride = (size_t)w * 3;
    int x0 = clamp_index(x - 1, w) * 3, x1 = clamp_index(x, w) * 3, x2 = clamp_index(x + 1, w) * 3,
        x3 = clamp_index(x + 2, w) * 3;
    double values[4][3];
    int first_row = dy == 0.0 ? 1 : 0, last_row = dy == 0.0 ? 1 : 3;
    for (int j = first_row; j <= last_row; j++) {
        const uint8_t *in = src->pixels + (size_t)clamp_index(y - 1 + j, h) * stride;
        for (int c = 0; c < 3; c++)
            values[j][c] = dx == 0.0 ? in[x1 + c] : cubic(in[x0 + c], in[x1 + c], in[x2 + c], in[x3 + c], dx);
    }
    for (int c = 0; c < 3; c++) {
        double v =
            dy == 0.0 ? values[1][c] : cubic(values[0][c], values[1][c], values[2][c], values[3][c], dy);
        out[c] = v <= 0.0 ? 0 : v >= 255.0 ? 255 : (uint8_t)v;
    }
}
#endif

/* ImagingGenericTransform with affine_transform: output pixel (x, y) samples the source at
 * (a0 (x + .5) + a1 (y + .5) + a2, a3 (x + .5) + a4 (y + .5) + a5); points outside [0, w) x [0, h)
 * keep the fill colour of the new image. The result replaces image; scratch holds the source. */
static tf_status affine(tf_image *image, const double a[6], const uint8_t fill[3], tf_image *scratch) {
    int width = image->width, height = image->height;
    TF_TRY(image_reserve(scratch, width, height + 1)); /* a spare row: 4-byte reads of the last pixel */
    memcpy(scratch->pixels, image->pixels, pixel_count(image) * 3);
    const tf_image source = {.width = width, .height = height, .pixels = scratch->pixels};
    uint8_t *out = image->pixels;
    for (int y = 0; y < height; y++) {
        double yc = y + 0.5;
        for (int x = 0; x < width; x++, out += 3) {
            double xc = x + 0.5;
            double xin = a[0] * xc + a[1] * yc + a[2];
            double yin = a[3] * xc + a[4] * yc + a[5];
            if (xin < 0.0 || xin >= width || yin < 0.0 || yin >= height) {
                out[0] = fill[0], out[1] = fill[1], out[2] = fill[2];
            } else {
                bicubic_sample(&source, xin, yin, out);
            }
        }
    }
    return TF_OK;
}

/* Python's round(x, 15): the double nearest the decimal rounded to 15 places (printf and strtod
 * are correctly rounded in glibc, as Python's dtoa is). */
static double python_round15(double x) {
    char text[64];
    snprintf(text, sizeof text, "%.15f", x);
    return strtod(text, NULL);
}

/* Python's float %: the result takes the sign of the divisor. */
static double python_mod(double x, double y) {
    double mod = fmod(x, y);
    if (mod != 0.0) {
        if ((y < 0) != (mod < 0)) mod += y;
    } else {
        mod = copysign(0.0, y);
    }
    return mod;
}

/* Image.rotate(degrees, BICUBIC, fillcolor=fill) about the centre, without expand: the inverse
 * matrix as PIL builds it (angle % 360, radians, cos/sin rounded to 15 places, centre w/2, h/2). */
static tf_status rotate(tf_image *image, double degrees, const uint8_t fill[3], tf_image *scratch) {
    double angle = python_mod(degrees, 360.0);
    if (angle == 0.0) return TF_OK;    /* PIL returns a copy */
    angle = -(angle * (M_PI / 180.0)); /* -math.radians(angle) */
    double m[6] = {python_round15(cos(angle)),  python_round15(sin(angle)), 0.0,
                   python_round15(-sin(angle)), python_round15(cos(angle)), 0.0};
    double cx = image->width / 2.0, cy = image->height / 2.0;
    m[2] = m[0] * -cx + m[1] * -cy + m[2];
    m[5] = m[3] * -cx + m[4] * -cy + m[5];
    m[2] += cx;
    m[5] += cy;
    return affine(image, m, fill, scratch);
}

tf_status randaugment_apply_op(tf_image *image, tf_randaugment_op op, double argument, const uint8_t fill[3],
                               tf_image *scratch) {
    if (image == scratch)
        return tf_fail(TF_ERR_RUNTIME, "randaugment_apply_op: image and scratch are the same");
    switch (op) {
    case TF_RA_AUTO_CONTRAST:
        auto_contrast(image);
        return TF_OK;
    case TF_RA_EQUALIZE:
        equalize(image);
        return TF_OK;
    case TF_RA_INVERT:
        invert(image);
        return TF_OK;
    case TF_RA_ROTATE:
        return rotate(image, argument, fill, scratch);
    case TF_RA_POSTERIZE:
        posterize(image, (int)argument);
        return TF_OK;
    case TF_RA_SOLARIZE:
        solarize(image, (int)argument);
        return TF_OK;
    case TF_RA_SOLARIZE_ADD:
        solarize_add(image, (int)argument);
        return TF_OK;
    case TF_RA_COLOR:
        color(image, argument);
        return TF_OK;
    case TF_RA_CONTRAST:
        contrast(image, argument);
        return TF_OK;
    case TF_RA_BRIGHTNESS:
        blend_constant(image, 0, argument);
        return TF_OK;
    case TF_RA_SHARPNESS:
        return sharpness(image, argument, scratch);
    case TF_RA_SHEAR_X:
        return affine(image, (const double[6]){1, argument, 0, 0, 1, 0}, fill, scratch);
    case TF_RA_SHEAR_Y:
        return affine(image, (const double[6]){1, 0, 0, argument, 1, 0}, fill, scratch);
    case TF_RA_TRANSLATE_X:
        return affine(image, (const double[6]){1, 0, argument, 0, 1, 0}, fill, scratch);
    case TF_RA_TRANSLATE_Y:
        return affine(image, (const double[6]){1, 0, 0, 0, 1, argument}, fill, scratch);
    default:
        return tf_fail(TF_ERR_RUNTIME, "randaugment_apply_op: unknown operation %d", (int)op);
    }
}

/* ---- the policy (timm RandAugment.__call__ and AugmentOp.__call__) -------------------------------- */

tf_status randaugment_apply(tf_image *image, const tf_randaugment *randaugment, tf_rng *rng,
                            tf_image *scratch) {
    if (!randaugment->enabled) return TF_OK;
    for (int layer = 0; layer < randaugment->num_ops; layer++) {
        /* np.random.choice(ops, num_layers, replace=True): uniform, with replacement. */
        tf_randaugment_op op = (tf_randaugment_op)tf_rng_below(rng, TF_RA_OP_COUNT);
        /* if self.prob < 1.0 and random.random() > self.prob: return img */
        if (randaugment->probability < 1.0f && tf_rng_uniform(rng) > randaugment->probability) continue;
        double magnitude = randaugment->magnitude;
        if (randaugment->magnitude_std > 0) magnitude += randaugment->magnitude_std * tf_rng_normal(rng);
        magnitude = fmin(10.0, fmax(0.0, magnitude));
        /* _randomly_negate: -v if random.random() > 0.5 */
        int negate = op_is_signed(op, randaugment->increasing) ? tf_rng_uniform(rng) > 0.5 : 0;
        double argument =
            randaugment_argument(op, magnitude, randaugment->increasing, negate, image->width, image->height);
        TF_TRY(randaugment_apply_op(image, op, argument, randaugment->fill, scratch));
    }
    return TF_OK;
}
