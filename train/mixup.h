/* Soft targets and batch-level mixing: label smoothing, and timm's Mixup/CutMix in batch mode
 * (one lambda per batch, partner = the reversed batch, CutMix box from sqrt(1 - lambda) with lambda
 * corrected to the pasted area), as MAE's recipe uses them (DESIGN.md section 3). */
#ifndef TF_TRAIN_MIXUP_H
#define TF_TRAIN_MIXUP_H

#include "common/config.h"
#include "common/rng.h"
#include "kernels/kernels.h"

#include <stdbool.h>
#include <stdint.h>

/* The mixing of one batch. */
typedef struct {
    float lambda;  /* weight of the sample itself; 1 = no mixing */
    bool cutmix;   /* a pasted box rather than a blend */
    int y0, y1, x0, x1; /* the CutMix box, rows [y0, y1) and columns [x0, x1) */
} tf_mix;

/* timm Mixup._params_per_batch and cutmix_bbox_and_lam for images of side size. */
tf_mix mixup_draw(const tf_augment_config *augment, int size, tf_rng *rng);

/* The CutMix box and corrected lambda for a drawn lambda and centre (cy, cx), each in [0, size):
 * timm rand_bbox (sides int(size * sqrt(1 - lambda)), clipped) and cutmix_bbox_and_lam. mixup_draw
 * calls it with uniform centres; tests call it with chosen ones. */
tf_mix mixup_cutmix_box(double lambda, int size, int cy, int cx);

/* targets[b] = lambda onehot(labels[b]) + (1 - lambda) onehot(labels[batch - 1 - b]), each one-hot
 * smoothed: off = smoothing / classes, on = 1 - smoothing + off. targets: [batch, classes]. */
void mixup_targets(const int32_t *labels, int batch, int classes, float smoothing, float lambda, float *targets);

/* Mixes the normalised images (compute [batch, channels, size, size]) in place on the backend. */
void mixup_images(const tf_backend *backend, void *images, int batch, int channels, int size, const tf_mix *mix);

#endif
