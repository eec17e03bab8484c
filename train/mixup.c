/* Mixup, CutMix and label smoothing (see mixup.h), after timm 0.3.2's timm/data/mixup.py. */
#include "train/mixup.h"

#include <math.h>

static int clamp_int(int value, int low, int high) {
    return value < low ? low : value > high ? high : value;
}

/* timm rand_bbox with margin 0: a box of sides int(size * sqrt(1 - lambda)) centred at (cy, cx),
 * clipped to the image; then lambda = 1 - box area / image area (cutmix_bbox_and_lam). */
tf_mix mixup_cutmix_box(double lambda, int size, int cy, int cx) {
    tf_mix mix = {.cutmix = true};
    int cut = (int)(size * sqrt(1.0 - lambda));
    mix.y0 = clamp_int(cy - cut / 2, 0, size);
    mix.y1 = clamp_int(cy + cut / 2, 0, size);
    mix.x0 = clamp_int(cx - cut / 2, 0, size);
    mix.x1 = clamp_int(cx + cut / 2, 0, size);
    double area = (double)(mix.y1 - mix.y0) * (double)(mix.x1 - mix.x0);
    mix.lambda = (float)(1.0 - area / ((double)size * size));
    return mix;
}

tf_mix mixup_draw(const tf_augment_config *augment, int size, tf_rng *rng) {
    tf_mix mix = {.lambda = 1.0f};
    bool mixup_on = augment->mixup > 0.0f, cutmix_on = augment->cutmix > 0.0f;
    if (!(mixup_on || cutmix_on) || !(tf_rng_uniform(rng) < augment->mixup_prob)) return mix;
    if (mixup_on && cutmix_on)
        mix.cutmix = tf_rng_uniform(rng) < augment->mixup_switch_prob;
    else
        mix.cutmix = cutmix_on;
    double alpha = mix.cutmix ? augment->cutmix : augment->mixup;
    double lambda = tf_rng_beta(rng, alpha, alpha);
    mix.lambda = (float)lambda;
    if (!mix.cutmix) return mix;
    /* timm draws the centre row, then the column, uniformly over the image; the box side comes
     * from lambda in double precision, as in timm. */
    int cy = (int)tf_rng_below(rng, (uint64_t)size);
    int cx = (int)tf_rng_below(rng, (uint64_t)size);
    return mixup_cutmix_box(lambda, size, cy, cx);
}

void mixup_targets(const int32_t *labels, int batch, int classes, float smoothing, float lambda, float *targets) {
    float off = smoothing / (float)classes, on = 1.0f - smoothing + off;
    for (int b = 0; b < batch; b++) {
        float *row = targets + (size_t)b * classes;
        for (int c = 0; c < classes; c++) row[c] = off;
        row[labels[b]] += lambda * (on - off);
        row[labels[batch - 1 - b]] += (1.0f - lambda) * (on - off);
    }
}

void mixup_images(const tf_backend *backend, void *images, int batch, int channels, int size, const tf_mix *mix) {
    if (mix->lambda == 1.0f && !mix->cutmix) return;
    if (mix->cutmix)
        backend->cutmix_images(images, batch, channels, size, mix->y0, mix->y1, mix->x0, mix->x1);
    else
        backend->mixup_images(images, batch, (size_t)channels * size * size, mix->lambda);
}
