/* Image buffers and the geometric transforms of the loader: RandomResizedCrop and eval geometry
 * (timm 0.3.2 / torchvision 0.14 rules), PIL's antialiased bicubic resize (Pillow's Resample.c,
 * bit for bit: same float box, same double coefficients, same 22-bit fixed point, same 8-bit
 * intermediate between the horizontal and the vertical pass), horizontal flip and the CHW
 * conversion. The Python behaviour is mirrored down to its rounding: Python's round() is
 * round-half-to-even (nearbyint here), int() truncates, and config floats are read back as the
 * decimal the user wrote. tests/test_image_pil.py compares all of it with PIL and torchvision. */
#include "dataloader/image.h"

#include <limits.h>
#include <stdbool.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
/* The horizontal pass's SIMD form: AVX-512 with VBMI (byte permutes) and VNNI (multiply-add into
 * the accumulator), else AVX2, else scalar. All give Pillow's bytes (the sums are exact integers). */
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
#define RESAMPLE_AVX512 1
#endif

/* ---- buffers --------------------------------------------------------------------------------- */

/* Grows a buffer to at least bytes; contents are not kept (every user overwrites them). */
static tf_status reserve_bytes(tf_image *image, size_t bytes, const char *what) {
    if (bytes <= image->capacity) return TF_OK;
    free(image->pixels);
    image->pixels = malloc(bytes);
    if (!image->pixels) {
        image->capacity = 0;
        return tf_fail(TF_ERR_RUNTIME, "%s: out of memory for %zu bytes", what, bytes);
    }
    image->capacity = bytes;
    return TF_OK;
}

tf_status image_reserve(tf_image *image, int width, int height) {
    if (width <= 0 || height <= 0 || (size_t)width > SIZE_MAX / 3 / (size_t)height)
        return tf_fail(TF_ERR_RUNTIME, "image_reserve: invalid image size %dx%d", width, height);
    TF_TRY(reserve_bytes(image, (size_t)width * (size_t)height * 3, "image_reserve"));
    image->width = width;
    image->height = height;
    return TF_OK;
}

void image_free(tf_image *image) {
    free(image->pixels);
    *image = (tf_image){0};
}

/* ---- Python's arithmetic ----------------------------------------------------------------------- */

/* The double a config value was written as: the shortest decimal that reads back as the same float.
 * timm computes with Python doubles (4/3 is 1.3333333333333333, not the float 1.3333334), and
 * int(224 / 0.8) is 280 in Python but 279 with the float 0.8f. */
static double decimal_of_float(float value) {
    char text[32];
    for (int digits = 1; digits <= 9; digits++) {
        snprintf(text, sizeof text, "%.*g", digits, (double)value);
        if (strtof(text, NULL) == value) return strtod(text, NULL);
    }
    return (double)value;
}

/* Python's round() of a float to an int: half to even (the default rounding mode of nearbyint). */
static int python_round(double value) {
    return (int)nearbyint(value);
}

/* ---- RandomResizedCrop --------------------------------------------------------------------------- */

/* Where the crop's random numbers come from: the generator, or a list (tests). */
typedef struct {
    tf_rng *rng;
    const double *given;
    int given_count, next;
} crop_draws;

static double draw_uniform(crop_draws *draws) {
    if (draws->rng) return tf_rng_uniform(draws->rng);
    return draws->next < draws->given_count ? draws->given[draws->next++] : 0.0;
}

/* Python's random.randint(0, n - 1). */
static int draw_below(crop_draws *draws, int n) {
    if (draws->rng) return (int)tf_rng_below(draws->rng, (uint64_t)n);
    int value = (int)floor(draw_uniform(draws) * n);
    return value < 0 ? 0 : value >= n ? n - 1 : value;
}

/* timm 0.3.2 RandomResizedCropAndInterpolation.get_params, with torchvision's extra 0 < w, 0 < h
 * (timm would accept an empty crop of a tiny image). */
static tf_box random_resized_crop(int width, int height, const tf_augment_config *augment,
                                  crop_draws *draws) {
    double scale_min = decimal_of_float(augment->scale_min), scale_max = decimal_of_float(augment->scale_max);
    double ratio_min = decimal_of_float(augment->ratio_min), ratio_max = decimal_of_float(augment->ratio_max);
    double area = (double)width * (double)height;
    double log_ratio_min = log(ratio_min), log_ratio_max = log(ratio_max);
    for (int attempt = 0; attempt < 10; attempt++) {
        /* random.uniform(a, b) is a + (b - a) * random() */
        double target_area = (scale_min + (scale_max - scale_min) * draw_uniform(draws)) * area;
        double aspect_ratio = exp(log_ratio_min + (log_ratio_max - log_ratio_min) * draw_uniform(draws));
        int w = python_round(sqrt(target_area * aspect_ratio));
        int h = python_round(sqrt(target_area / aspect_ratio));
        if (0 < w && w <= width && 0 < h && h <= height) {
            int i = draw_below(draws, height - h + 1);
            int j = draw_below(draws, width - w + 1);
            return (tf_box){.left = j, .top = i, .width = w, .height = h};
        }
    }
    /* Fallback: the centred crop with the ratio clamped to the range. */
    double in_ratio = (double)width / (double)height;
    int w = width, h = height;
    double ratio_low = fmin(ratio_min, ratio_max), ratio_high = fmax(ratio_min, ratio_max);
    if (in_ratio < ratio_low) {
        h = python_round(w / ratio_low);
    } else if (in_ratio > ratio_high) {
        w = python_round(h * ratio_high);
    }
    return (tf_box){.left = (width - w) / 2, .top = (height - h) / 2, .width = w, .height = h};
}

tf_box image_random_resized_crop_box(int width, int height, const tf_augment_config *augment, tf_rng *rng) {
    crop_draws draws = {.rng = rng};
    return random_resized_crop(width, height, augment, &draws);
}

tf_box image_random_resized_crop_box_from_draws(int width, int height, const tf_augment_config *augment,
                                                const double *draws, int draw_count) {
    crop_draws given = {.given = draws, .given_count = draw_count};
    return random_resized_crop(width, height, augment, &given);
}

/* ---- eval geometry ------------------------------------------------------------------------------- */

/* torchvision CenterCrop's offset on one axis: round((size - crop) / 2.0) half to even; a crop larger
 * than the image pads it by (crop - size) // 2 on the low side first, so the offset is negative. */
static int center_crop_offset(int size, int crop) {
    if (crop > size) return -((crop - size) / 2);
    return python_round((size - crop) / 2.0);
}

void image_eval_geometry(int width, int height, int size, float crop_pct, int *resize_width,
                         int *resize_height, int *crop_left, int *crop_top) {
    /* timm / MAE: Resize(int(size / crop_pct)); torchvision: the longer side becomes
     * int(short_target * long / short) (Python's true division, then truncation). */
    int short_target = (int)((double)size / decimal_of_float(crop_pct));
    int shorter = width <= height ? width : height, longer = width <= height ? height : width;
    int long_target = (int)((double)short_target * (double)longer / (double)shorter);
    *resize_width = width <= height ? short_target : long_target;
    *resize_height = width <= height ? long_target : short_target;
    *crop_left = center_crop_offset(*resize_width, size);
    *crop_top = center_crop_offset(*resize_height, size);
}

/* ---- antialiased bicubic resampling (Pillow's Resample.c) ---------------------------------------- */

enum { RESAMPLE_PRECISION_BITS = 32 - 8 - 2 }; /* Pillow's PRECISION_BITS for 8-bit images */

/* Pillow's bicubic_filter, a = -0.5. */
static double bicubic_weight(double x) {
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * -0.5;
    return 0.0;
}

/* The taps of one axis: output i reads count[i] source pixels from first[i] with weights[i * taps]. */
typedef struct {
    int taps;
    int *first, *count;
    int32_t *weights;
} resample_axis;

/* One axis of a resample, as Pillow sees it: source pixels [0, in_size) (edges clamp there), the
 * float box [in0, in1) mapped onto out_size outputs, of which out_count from out_first are wanted. */
typedef struct {
    int in_size;
    float in0, in1;
    int out_size, out_first, out_count;
} resample_span;

static double span_scale(const resample_span *span) {
    return (double)(span->in1 - span->in0) / span->out_size; /* float subtraction, as Pillow */
}

/* Pillow's ksize: the most taps any output can have. */
static int span_taps(const resample_span *span) {
    double filterscale = fmax(span_scale(span), 1.0);
    return (int)ceil(2.0 * filterscale) * 2 + 1;
}

/* Pillow's precompute_coeffs() followed by normalize_coeffs_8bpc(): weights normalised in double
 * per output, then rounded away from zero to 22-bit fixed point. work holds taps doubles. */
static void resample_axis_fill(resample_axis *axis, const resample_span *span, double *work) {
    double scale = span_scale(span);
    double filterscale = fmax(scale, 1.0);
    double support = 2.0 * filterscale;
    double ss = 1.0 / filterscale;
    for (int i = 0; i < span->out_count; i++) {
        double center = span->in0 + (span->out_first + i + 0.5) * scale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > span->in_size) xmax = span->in_size;
        xmax -= xmin;
        double ww = 0.0;
        for (int x = 0; x < xmax; x++) {
            work[x] = bicubic_weight((x + xmin - center + 0.5) * ss);
            ww += work[x];
        }
        int32_t *k = axis->weights + (size_t)i * (size_t)axis->taps;
        for (int x = 0; x < xmax; x++) {
            double w = ww != 0.0 ? work[x] / ww : work[x];
            k[x] = w < 0 ? (int32_t)(-0.5 + w * (1 << RESAMPLE_PRECISION_BITS))
                         : (int32_t)(0.5 + w * (1 << RESAMPLE_PRECISION_BITS));
        }
        for (int x = xmax < 0 ? 0 : xmax; x < axis->taps; x++)
            k[x] = 0;
        axis->first[i] = xmin;
        axis->count[i] = xmax < 0 ? 0 : xmax;
    }
}

/* Pillow's clip8: the sum carries 22 fraction bits and a rounding half already added. */
static inline uint8_t clip_fixed(int32_t sum) {
    int32_t v = sum >> RESAMPLE_PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* The SIMD forms multiply int16 pairs: a 22-bit coefficient k as 2048 high + low, low its low 11
 * bits (both fit int16), so that sum(p k) = 2048 sum(p high) + sum(p low) exactly. */
static inline void split_coefficient(int32_t k, int16_t *high, int16_t *low) {
    int32_t k_low = k & 2047;
    *high = (int16_t)((k - k_low) / 2048);
    *low = (int16_t)k_low;
}

/* Outputs [from, out_count) of one row of the horizontal pass, scalar: the whole row without
 * SIMD, the rest of it after the SIMD forms. */
static void resample_row_scalar(const uint8_t *in, const resample_axis *axis, int from, int out_count,
                                uint8_t *out) {
    for (int xx = from; xx < out_count; xx++) {
        const uint8_t *p = in + (size_t)axis->first[xx] * 3;
        const int32_t *k = axis->weights + (size_t)xx * (size_t)axis->taps;
        int32_t s0 = 1 << (RESAMPLE_PRECISION_BITS - 1), s1 = s0, s2 = s0;
        for (int x = 0; x < axis->count[xx]; x++) {
            s0 += p[3 * x + 0] * k[x];
            s1 += p[3 * x + 1] * k[x];
            s2 += p[3 * x + 2] * k[x];
        }
        out[3 * xx + 0] = clip_fixed(s0);
        out[3 * xx + 1] = clip_fixed(s1);
        out[3 * xx + 2] = clip_fixed(s2);
    }
}

#if defined(__AVX2__)
/* The sums are exact integers, so any order gives Pillow's result. vpmaddwd multiplies int16 pairs
 * of pixels and coefficient halves kh, kl (split_coefficient). Four taps make a group of 16 int16
 * lanes: taps 0, 1 as (R0 R1 G0 G1 B0 B1 0 0) in the low half, taps 2, 3 likewise in the high half;
 * the coefficients are stored in that layout (two vectors per group: kh, kl), zero past the
 * output's last tap. */
enum { RESAMPLE_GROUP_TAPS = 4 };

static int resample_groups(int taps) {
    return (taps + RESAMPLE_GROUP_TAPS - 1) / RESAMPLE_GROUP_TAPS;
}

static size_t group_packed_bytes(int taps, size_t out_count) {
    return out_count * (size_t)resample_groups(taps) * 2 * sizeof(__m256i);
}

static void group_pack(const resample_axis *axis, int out_count, __m256i *packed) {
    int groups = resample_groups(axis->taps);
    for (int i = 0; i < out_count; i++) {
        const int32_t *k = axis->weights + (size_t)i * (size_t)axis->taps;
        for (int g = 0; g < groups; g++) {
            int16_t high[16] = {0}, low[16] = {0};
            for (int t = 0; t < RESAMPLE_GROUP_TAPS; t++) {
                int tap = g * RESAMPLE_GROUP_TAPS + t;
                int32_t weight = tap < axis->count[i] ? k[tap] : 0;
                for (int c = 0; c < 3; c++) {
                    int lane = (t / 2) * 8 + c * 2 + t % 2;
                    split_coefficient(weight, &high[lane], &low[lane]);
                }
            }
            __m256i *slot = packed + ((size_t)i * (size_t)groups + (size_t)g) * 2;
            _mm256_storeu_si256(slot, _mm256_loadu_si256((const __m256i *)high));
            _mm256_storeu_si256(slot + 1, _mm256_loadu_si256((const __m256i *)low));
        }
    }
}

/* R, G, B, 0 sums of one output pixel (with Pillow's rounding half in the low lanes' start). */
static inline __m128i group_pixel_sums(const uint8_t *p, const __m256i *k, int used, __m256i order) {
    __m256i high = _mm256_setzero_si256();
    __m256i low = _mm256_setr_epi32(1 << (RESAMPLE_PRECISION_BITS - 1), 1 << (RESAMPLE_PRECISION_BITS - 1),
                                    1 << (RESAMPLE_PRECISION_BITS - 1), 0, 0, 0, 0, 0);
    for (int g = 0; g < used; g++, p += 12, k += 2) {
        __m256i pixels =
            _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)), order);
        high = _mm256_add_epi32(high, _mm256_madd_epi16(pixels, _mm256_loadu_si256(k)));
        low = _mm256_add_epi32(low, _mm256_madd_epi16(pixels, _mm256_loadu_si256(k + 1)));
    }
    __m256i sum = _mm256_add_epi32(_mm256_slli_epi32(high, 11), low);
    __m128i total = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    return _mm_srai_epi32(total, RESAMPLE_PRECISION_BITS); /* clip8's shift; the packs saturate */
}

static void group_rows(const uint8_t *src, size_t src_stride, int rows, const uint8_t *in_end,
                       const resample_axis *axis, const __m256i *packed, int out_count, uint8_t *dst,
                       size_t dst_stride) {
    int groups = resample_groups(axis->taps);
    /* bytes of pixels t, t + 1 as int16 lanes: R G B of the two taps interleaved, two zero lanes */
    const __m256i order = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1, 6, -1, 9,
                                           -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1);
    /* four pixels' R G B 0 bytes to 12 contiguous bytes */
    const __m128i squeeze = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    for (int y = 0; y < rows; y++) {
        const uint8_t *in = src + (size_t)y * src_stride;
        uint8_t *out = dst + (size_t)y * dst_stride;
        int xx = 0;
        for (; xx + 4 <= out_count; xx += 4) {
            __m128i sums[4];
            int safe = 1;
            for (int j = 0; j < 4 && safe; j++) {
                const uint8_t *p = in + (size_t)axis->first[xx + j] * 3;
                int used = resample_groups(axis->count[xx + j]);
                safe = p + (size_t)(used - 1) * 12 + 16 <= in_end;
                if (safe)
                    sums[j] =
                        group_pixel_sums(p, packed + (size_t)(xx + j) * (size_t)groups * 2, used, order);
            }
            if (!safe) break;
            __m128i bytes =
                _mm_packus_epi16(_mm_packs_epi32(sums[0], sums[1]), _mm_packs_epi32(sums[2], sums[3]));
            bytes = _mm_shuffle_epi8(bytes, squeeze);
            _mm_storel_epi64((__m128i *)(out + 3 * xx), bytes);
            int32_t tail = _mm_extract_epi32(bytes, 2);
            memcpy(out + 3 * xx + 8, &tail, 4);
        }
        resample_row_scalar(in, axis, xx, out_count, out);
    }
}
#endif

#if defined(RESAMPLE_AVX512)
/* The block form (AVX-512 with VBMI and VNNI): sixteen outputs of a row at once, one 32-bit lane
 * per output channel, so that no lanes are added across and the results come out in RGB order.
 * The source bytes of a block's outputs lie in a window of at most 128 bytes (a downscale by up to
 * ~2: eval resizes and most crops), which two 64-byte loads hold; a two-table byte permute picks,
 * for each lane, the bytes of two taps as int16 (vpermt2b), and vpdpwssd multiplies them with the
 * coefficient halves kh, kl (split_coefficient) and accumulates. Per block and tap pair: the permute
 * indices and the coefficient halves of 3 vectors of 16 lanes (48 = 16 outputs x 3 channels). */
enum { BLOCK_OUTPUTS = 16, BLOCK_WINDOW = 128, BLOCK_VECTORS = 3 };

static int block_pairs(int taps) {
    return (taps + 1) / 2;
}

/* A block: its window's first byte (in the first 64 bytes), then per tap pair and vector the
 * indices, kh and kl. */
static size_t block_bytes(int taps) {
    return sizeof(__m512i) * (1 + (size_t)block_pairs(taps) * BLOCK_VECTORS * 3);
}

static size_t block_packed_bytes(int taps, size_t out_count) {
    return out_count / BLOCK_OUTPUTS * block_bytes(taps);
}

/* Lane i of vector v of a block is channel c = (16 v + i) % 3 of output x0 + (16 v + i) / 3; its
 * two int16 halves are taps 2 q and 2 q + 1. False when a block's window exceeds 128 bytes. */
static bool block_pack(const resample_axis *axis, int out_count, uint8_t *packed) {
    int pairs = block_pairs(axis->taps);
    for (int x0 = 0; x0 + BLOCK_OUTPUTS <= out_count; x0 += BLOCK_OUTPUTS) {
        int base = 3 * axis->first[x0], end = base;
        for (int j = 0; j < BLOCK_OUTPUTS; j++) {
            int last = 3 * (axis->first[x0 + j] + axis->count[x0 + j]);
            end = last > end ? last : end;
        }
        if (end - base > BLOCK_WINDOW) return false;
        uint8_t *block = packed + (size_t)(x0 / BLOCK_OUTPUTS) * block_bytes(axis->taps);
        memcpy(block, &base, sizeof base);
        __m512i *vectors = (__m512i *)block + 1;
        for (int q = 0; q < pairs; q++)
            for (int v = 0; v < BLOCK_VECTORS; v++) {
                uint8_t index[64] = {0};
                int16_t high[32], low[32];
                for (int lane = 0; lane < 16; lane++) {
                    int x = x0 + (16 * v + lane) / 3, c = (16 * v + lane) % 3;
                    const int32_t *k = axis->weights + (size_t)x * (size_t)axis->taps;
                    for (int half = 0; half < 2; half++) {
                        int tap = 2 * q + half, word = 2 * lane + half;
                        bool used = tap < axis->count[x];
                        index[2 * word] = (uint8_t)(used ? 3 * (axis->first[x] + tap) + c - base : 0);
                        split_coefficient(used ? k[tap] : 0, &high[word], &low[word]);
                    }
                }
                __m512i *slot = vectors + ((size_t)q * BLOCK_VECTORS + (size_t)v) * 3;
                _mm512_storeu_si512(slot, _mm512_loadu_si512(index));
                _mm512_storeu_si512(slot + 1, _mm512_loadu_si512(high));
                _mm512_storeu_si512(slot + 2, _mm512_loadu_si512(low));
            }
    }
    return true;
}

/* The row's blocks; the outputs after the last whole block go through resample_row_scalar. */
static void block_rows(const uint8_t *src, size_t src_stride, int rows, const uint8_t *in_end,
                       const resample_axis *axis, const uint8_t *packed, int out_count, uint8_t *dst,
                       size_t dst_stride) {
    const __mmask64 int16_low_bytes = 0x5555555555555555ull;
    const __m512i round = _mm512_set1_epi32(1 << (RESAMPLE_PRECISION_BITS - 1));
    int blocks = out_count / BLOCK_OUTPUTS, pairs = block_pairs(axis->taps);
    size_t stride = block_bytes(axis->taps);
    for (int y = 0; y < rows; y++) {
        const uint8_t *in = src + (size_t)y * src_stride;
        uint8_t *out = dst + (size_t)y * dst_stride;
        for (int b = 0; b < blocks; b++) {
            const uint8_t *block = packed + (size_t)b * stride;
            int base;
            memcpy(&base, block, sizeof base);
            const uint8_t *window = in + base;
            /* masked loads: nothing is read past the source memory (the lanes beyond are zero) */
            size_t left = (size_t)(in_end - window);
            __mmask64 low_mask = left >= 64 ? ~0ull : (1ull << left) - 1;
            __mmask64 high_mask = left >= 128 ? ~0ull : left > 64 ? (1ull << (left - 64)) - 1 : 0;
            __m512i window_low = _mm512_maskz_loadu_epi8(low_mask, window);
            __m512i window_high = _mm512_maskz_loadu_epi8(high_mask, window + 64);
            const __m512i *vectors = (const __m512i *)block + 1;
            __m512i high[BLOCK_VECTORS], low[BLOCK_VECTORS];
            for (int v = 0; v < BLOCK_VECTORS; v++) high[v] = _mm512_setzero_si512(), low[v] = round;
            for (int q = 0; q < pairs; q++, vectors += BLOCK_VECTORS * 3)
                for (int v = 0; v < BLOCK_VECTORS; v++) {
                    __m512i pixels = _mm512_maskz_permutex2var_epi8(int16_low_bytes, window_low,
                                                                    _mm512_loadu_si512(vectors + 3 * v), window_high);
                    high[v] = _mm512_dpwssd_epi32(high[v], pixels, _mm512_loadu_si512(vectors + 3 * v + 1));
                    low[v] = _mm512_dpwssd_epi32(low[v], pixels, _mm512_loadu_si512(vectors + 3 * v + 2));
                }
            for (int v = 0; v < BLOCK_VECTORS; v++) {
                __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(high[v], 11), low[v]);
                /* clip8: the shift, then [0, 255] (negative to 0 here, above 255 by the narrowing) */
                sum = _mm512_max_epi32(_mm512_srai_epi32(sum, RESAMPLE_PRECISION_BITS), _mm512_setzero_si512());
                _mm_storeu_si128((__m128i *)(out + 3 * BLOCK_OUTPUTS * b + 16 * v), _mm512_cvtusepi32_epi8(sum));
            }
        }
        resample_row_scalar(in, axis, blocks * BLOCK_OUTPUTS, out_count, out);
    }
}
#endif

/* Which form a resample's horizontal pass takes: the block form where it has the instructions
 * and the windows fit, else the AVX2 group form, else scalar. */
typedef enum { RESAMPLE_SCALAR, RESAMPLE_GROUPS, RESAMPLE_BLOCKS } resample_form;

static size_t resample_packed_bytes(int taps, size_t out_count) {
    size_t bytes = 0;
#if defined(__AVX2__)
    bytes = group_packed_bytes(taps, out_count);
#endif
#if defined(RESAMPLE_AVX512)
    size_t blocks = block_packed_bytes(taps, out_count);
    bytes = blocks > bytes ? blocks : bytes;
#endif
    (void)taps, (void)out_count;
    return bytes;
}

static resample_form resample_pack(const resample_axis *axis, int out_count, void *packed) {
#if defined(RESAMPLE_AVX512)
    if (out_count >= BLOCK_OUTPUTS && block_pack(axis, out_count, packed)) return RESAMPLE_BLOCKS;
#endif
#if defined(__AVX2__)
    group_pack(axis, out_count, packed);
    return RESAMPLE_GROUPS;
#else
    (void)axis, (void)out_count, (void)packed;
    return RESAMPLE_SCALAR;
#endif
}

/* Horizontal pass over rows of interleaved RGB: ImagingResampleHorizontal_8bpc. in_end is the end
 * of the readable source memory (the group form reads up to 15 bytes past a group's first pixel
 * and falls back to scalar near it; the block form's loads are masked there). */
static void resample_rows(resample_form form, const uint8_t *src, size_t src_stride, int rows,
                          const uint8_t *in_end, const resample_axis *axis, const void *packed, int out_count,
                          uint8_t *dst, size_t dst_stride) {
#if defined(RESAMPLE_AVX512)
    if (form == RESAMPLE_BLOCKS) {
        block_rows(src, src_stride, rows, in_end, axis, packed, out_count, dst, dst_stride);
        return;
    }
#endif
#if defined(__AVX2__)
    if (form == RESAMPLE_GROUPS) {
        group_rows(src, src_stride, rows, in_end, axis, packed, out_count, dst, dst_stride);
        return;
    }
#endif
    (void)form, (void)in_end, (void)packed;
    for (int y = 0; y < rows; y++)
        resample_row_scalar(src + (size_t)y * src_stride, axis, 0, out_count, dst + (size_t)y * dst_stride);
}

/* Vertical pass: ImagingResampleVertical_8bpc, accumulated a chunk of a row at a time so the inner
 * loop runs over contiguous bytes (the sums and their order per value are Pillow's). */
static void resample_columns(const uint8_t *src, size_t src_stride, const resample_axis *axis, int out_rows,
                             int row_bytes, uint8_t *dst, size_t dst_stride) {
    enum { CHUNK = 768 };
    int32_t sums[CHUNK];
    for (int yy = 0; yy < out_rows; yy++) {
        const int32_t *k = axis->weights + (size_t)yy * (size_t)axis->taps;
        const uint8_t *rows = src + (size_t)axis->first[yy] * src_stride;
        uint8_t *out = dst + (size_t)yy * dst_stride;
        for (int start = 0; start < row_bytes; start += CHUNK) {
            int n = row_bytes - start < CHUNK ? row_bytes - start : CHUNK;
            for (int x = 0; x < n; x++)
                sums[x] = 1 << (RESAMPLE_PRECISION_BITS - 1);
            for (int y = 0; y < axis->count[yy]; y++) {
                const uint8_t *in = rows + (size_t)y * src_stride + start;
                int32_t weight = k[y];
                for (int x = 0; x < n; x++)
                    sums[x] += in[x] * weight;
            }
            for (int x = 0; x < n; x++)
                out[start + x] = clip_fixed(sums[x]);
        }
    }
}

static size_t align_up(size_t bytes) {
    return (bytes + 63) & ~(size_t)63;
}

/* Pillow's ImagingResampleInner over a view of an image (pixels, stride, and the spans' in_size),
 * writing the wanted window of the output into dst (its own stride). The vertical taps decide which
 * source rows the horizontal pass needs (Pillow's ybox_first / ybox_last). Coefficients, the 8-bit
 * intermediate and the work array live in scratch. */
static tf_status resample_view(const uint8_t *pixels, size_t stride, const uint8_t *in_end,
                               const resample_span *xspan, const resample_span *yspan, uint8_t *dst,
                               size_t dst_stride, tf_image *scratch) {
    int xtaps = span_taps(xspan), ytaps = span_taps(yspan);
    size_t xcount = (size_t)xspan->out_count, ycount = (size_t)yspan->out_count;
    size_t first_bytes = align_up(2 * xcount * sizeof(int)),
           weight_bytes = align_up(xcount * xtaps * sizeof(int32_t));
    size_t yfirst_bytes = align_up(2 * ycount * sizeof(int)),
           yweight_bytes = align_up(ycount * ytaps * sizeof(int32_t));
    size_t work_bytes = align_up((size_t)(xtaps > ytaps ? xtaps : ytaps) * sizeof(double));
    size_t packed_bytes = align_up(resample_packed_bytes(xtaps, xcount));
    /* The intermediate holds at most every source row of the view, each out_count pixels wide. */
    size_t temp_bytes = align_up(xcount * 3 * (size_t)yspan->in_size);
    TF_TRY(reserve_bytes(scratch,
                         first_bytes + weight_bytes + yfirst_bytes + yweight_bytes + work_bytes +
                             packed_bytes + temp_bytes,
                         "image resize scratch"));

    uint8_t *cursor = scratch->pixels;
    resample_axis xaxis = {.taps = xtaps}, yaxis = {.taps = ytaps};
    xaxis.first = (int *)cursor, xaxis.count = xaxis.first + xcount, cursor += first_bytes;
    xaxis.weights = (int32_t *)cursor, cursor += weight_bytes;
    yaxis.first = (int *)cursor, yaxis.count = yaxis.first + ycount, cursor += yfirst_bytes;
    yaxis.weights = (int32_t *)cursor, cursor += yweight_bytes;
    double *work = (double *)cursor;
    cursor += work_bytes;
    void *packed = cursor;
    cursor += packed_bytes;
    uint8_t *temp = cursor;

    resample_axis_fill(&xaxis, xspan, work);
    resample_axis_fill(&yaxis, yspan, work);
    resample_form form = resample_pack(&xaxis, (int)xcount, packed);
    int row_first = yaxis.first[0];
    int row_last = yaxis.first[ycount - 1] + yaxis.count[ycount - 1];
    for (size_t i = 0; i < ycount; i++)
        yaxis.first[i] -= row_first;

    size_t temp_stride = xcount * 3;
    resample_rows(form, pixels + (size_t)row_first * stride, stride, row_last - row_first, in_end, &xaxis, packed,
                  (int)xcount, temp, temp_stride);
    resample_columns(temp, temp_stride, &yaxis, (int)ycount, (int)temp_stride, dst, dst_stride);
    return TF_OK;
}

static const uint8_t *image_end(const tf_image *image) {
    return image->pixels + (size_t)image->width * (size_t)image->height * 3;
}

static bool box_is_whole(tf_box box) {
    return box.left == floor(box.left) && box.top == floor(box.top) && box.width == floor(box.width) &&
           box.height == floor(box.height);
}

/* Copies the integer box of src into dst (Pillow's shortcut when the box already has the output
 * size; resampling would give the same pixels). */
static void copy_box(const tf_image *src, tf_box box, tf_image *dst) {
    size_t row_bytes = (size_t)dst->width * 3;
    for (int y = 0; y < dst->height; y++)
        memcpy(dst->pixels + (size_t)y * row_bytes,
               src->pixels + ((size_t)(box.top + y) * (size_t)src->width + (size_t)box.left) * 3, row_bytes);
}

static tf_status check_resize_args(const char *what, const tf_image *src, tf_box box, int out_width,
                                   int out_height, const tf_image *dst, const tf_image *scratch) {
    if (out_width <= 0 || out_height <= 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: output size %dx%d is not positive", what, out_width, out_height);
    if (src == dst || src == scratch || dst == scratch)
        return tf_fail(TF_ERR_RUNTIME, "%s: source, destination and scratch must be different images", what);
    if (!(box.left >= 0 && box.top >= 0 && box.width > 0 && box.height > 0 &&
          box.left + box.width <= src->width && box.top + box.height <= src->height))
        return tf_fail(TF_ERR_RUNTIME, "%s: box (%g, %g, %g x %g) is empty or outside the %dx%d image", what,
                       box.left, box.top, box.width, box.height, src->width, src->height);
    return TF_OK;
}

tf_status image_resize_bicubic(const tf_image *src, tf_box box, int out_width, int out_height, tf_image *dst,
                               tf_image *scratch) {
    TF_TRY(check_resize_args("image_resize_bicubic", src, box, out_width, out_height, dst, scratch));
    TF_TRY(image_reserve(dst, out_width, out_height));
    if (box_is_whole(box) && box.width == out_width && box.height == out_height) {
        copy_box(src, box, dst);
        return TF_OK;
    }
    /* Pillow receives the box as four floats: (left, top, right, bottom). */
    resample_span xspan = {.in_size = src->width,
                           .in0 = (float)box.left,
                           .in1 = (float)(box.left + box.width),
                           .out_size = out_width,
                           .out_first = 0,
                           .out_count = out_width};
    resample_span yspan = {.in_size = src->height,
                           .in0 = (float)box.top,
                           .in1 = (float)(box.top + box.height),
                           .out_size = out_height,
                           .out_first = 0,
                           .out_count = out_height};
    return resample_view(src->pixels, (size_t)src->width * 3, image_end(src), &xspan, &yspan, dst->pixels,
                         (size_t)out_width * 3, scratch);
}

tf_status image_resized_crop_bicubic(const tf_image *src, tf_box box, int out_width, int out_height,
                                     tf_image *dst, tf_image *scratch) {
    TF_TRY(check_resize_args("image_resized_crop_bicubic", src, box, out_width, out_height, dst, scratch));
    TF_TRY(image_reserve(dst, out_width, out_height));
    if (box_is_whole(box) && box.width == out_width && box.height == out_height) {
        copy_box(src, box, dst);
        return TF_OK;
    }
    /* The cropped image is the whole pixels covering the box; the box inside it is relative to its
     * corner, so for a whole box Pillow sees exactly crop(box).resize(size). */
    int left = (int)floor(box.left), top = (int)floor(box.top);
    int right = (int)ceil(box.left + box.width), bottom = (int)ceil(box.top + box.height);
    resample_span xspan = {.in_size = right - left,
                           .in0 = (float)(box.left - left),
                           .in1 = (float)(box.left + box.width - left),
                           .out_size = out_width,
                           .out_first = 0,
                           .out_count = out_width};
    resample_span yspan = {.in_size = bottom - top,
                           .in0 = (float)(box.top - top),
                           .in1 = (float)(box.top + box.height - top),
                           .out_size = out_height,
                           .out_first = 0,
                           .out_count = out_height};
    const uint8_t *corner = src->pixels + ((size_t)top * (size_t)src->width + (size_t)left) * 3;
    return resample_view(corner, (size_t)src->width * 3, image_end(src), &xspan, &yspan, dst->pixels,
                         (size_t)out_width * 3, scratch);
}

/* The part of [first, first + count) inside [0, size): *inside_first and the count (0 if none). */
static int window_inside(int first, int count, int size, int *inside_first) {
    int low = first < 0 ? 0 : first;
    int high = first + count > size ? size : first + count;
    *inside_first = low;
    return high > low ? high - low : 0;
}

tf_status image_resize_then_crop_bicubic(const tf_image *src, int resize_width, int resize_height,
                                         int crop_left, int crop_top, int crop_width, int crop_height,
                                         tf_image *dst, tf_image *scratch) {
    const char *what = "image_resize_then_crop_bicubic";
    if (resize_width <= 0 || resize_height <= 0 || crop_width <= 0 || crop_height <= 0)
        return tf_fail(TF_ERR_RUNTIME, "%s: resize %dx%d or crop %dx%d is not positive", what, resize_width,
                       resize_height, crop_width, crop_height);
    if (src == dst || src == scratch || dst == scratch)
        return tf_fail(TF_ERR_RUNTIME, "%s: source, destination and scratch must be different images", what);
    TF_TRY(image_reserve(dst, crop_width, crop_height));
    int x_first, y_first;
    int x_count = window_inside(crop_left, crop_width, resize_width, &x_first);
    int y_count = window_inside(crop_top, crop_height, resize_height, &y_first);
    if (x_count < crop_width || y_count < crop_height)
        memset(dst->pixels, 0, (size_t)crop_width * (size_t)crop_height * 3); /* torchvision pads with 0 */
    if (x_count == 0 || y_count == 0) return TF_OK;
    size_t dst_stride = (size_t)crop_width * 3;
    uint8_t *out =
        dst->pixels + (size_t)(y_first - crop_top) * dst_stride + (size_t)(x_first - crop_left) * 3;
    if (resize_width == src->width && resize_height == src->height) {
        /* torchvision returns the image itself when the size does not change. */
        for (int y = 0; y < y_count; y++)
            memcpy(out + (size_t)y * dst_stride,
                   src->pixels + ((size_t)(y_first + y) * (size_t)src->width + (size_t)x_first) * 3,
                   (size_t)x_count * 3);
        return TF_OK;
    }
    resample_span xspan = {.in_size = src->width,
                           .in0 = 0.0f,
                           .in1 = (float)src->width,
                           .out_size = resize_width,
                           .out_first = x_first,
                           .out_count = x_count};
    resample_span yspan = {.in_size = src->height,
                           .in0 = 0.0f,
                           .in1 = (float)src->height,
                           .out_size = resize_height,
                           .out_first = y_first,
                           .out_count = y_count};
    return resample_view(src->pixels, (size_t)src->width * 3, image_end(src), &xspan, &yspan, out, dst_stride,
                         scratch);
}

/* ---- flip and layout --------------------------------------------------------------------------------- */

void image_flip_horizontal(tf_image *image) {
    for (int y = 0; y < image->height; y++) {
        uint8_t *row = image->pixels + (size_t)y * (size_t)image->width * 3;
        for (int left = 0, right = image->width - 1; left < right; left++, right--) {
            uint8_t *a = row + (size_t)left * 3, *b = row + (size_t)right * 3;
            uint8_t t0 = a[0], t1 = a[1], t2 = a[2];
            a[0] = b[0], a[1] = b[1], a[2] = b[2];
            b[0] = t0, b[1] = t1, b[2] = t2;
        }
    }
}

void image_to_chw(const tf_image *image, uint8_t *chw) {
    size_t plane = (size_t)image->width * (size_t)image->height;
    const uint8_t *in = image->pixels;
    uint8_t *r = chw, *g = chw + plane, *b = chw + 2 * plane;
    for (size_t i = 0; i < plane; i++) {
        r[i] = in[3 * i + 0];
        g[i] = in[3 * i + 1];
        b[i] = in[3 * i + 2];
    }
}
