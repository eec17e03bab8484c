/* The one random number generator: xoshiro256** seeded through SplitMix64.
 *
 * Every random draw of the project comes from a generator made with tf_rng_make(seed, stream, a, b),
 * where stream says what the numbers are for and (a, b) are counters such as (epoch, sample index)
 * or (step, 0). So any draw depends only on the run's seed and where it is in the run, never on
 * thread count or timing, and a resumed run draws the same numbers as an uninterrupted one. The
 * state is four words and can be saved as it is. */
#ifndef TF_COMMON_RNG_H
#define TF_COMMON_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t s[4];
} tf_rng;

/* What a generator's numbers are for; part of its seed, so streams never overlap. */
typedef enum {
    TF_RNG_INIT = 1,     /* parameter initialisation */
    TF_RNG_SHUFFLE = 2,  /* the epoch's sample order: (epoch, 0) */
    TF_RNG_AUGMENT = 3,  /* per-sample augmentation: (epoch, sample index) */
    TF_RNG_STEP = 4,     /* per-step draws (drop path, mixup): (step, micro-batch) */
    TF_RNG_GROWTH = 5,   /* new parameter tokens when a model is scaled */
    TF_RNG_TEST = 100,   /* tests */
} tf_rng_stream;

tf_rng tf_rng_make(uint64_t seed, tf_rng_stream stream, uint64_t a, uint64_t b);
uint64_t tf_rng_u64(tf_rng *rng);
/* Uniform in [0, 1) with 53 random bits. */
double tf_rng_uniform(tf_rng *rng);
/* Uniform integer in [0, n), unbiased; n > 0. */
uint64_t tf_rng_below(tf_rng *rng, uint64_t n);
/* Standard normal (Box-Muller; no cached second value, so the state stays four words). */
double tf_rng_normal(tf_rng *rng);
/* Gamma(shape, 1), shape > 0 (Marsaglia and Tsang; shape < 1 through Gamma(shape + 1) U^(1/shape)). */
double tf_rng_gamma(tf_rng *rng, double shape);
/* Beta(a, b) as X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b). */
double tf_rng_beta(tf_rng *rng, double a, double b);

#endif
