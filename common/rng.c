/* xoshiro256** (Blackman and Vigna) with SplitMix64 seeding; see rng.h. */
#include "common/rng.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

tf_rng tf_rng_make(uint64_t seed, tf_rng_stream stream, uint64_t a, uint64_t b) {
    /* Fold the four words through SplitMix64 one after another, so that every word changes the
     * whole state, then expand into the generator's state. */
    uint64_t x = seed;
    x = splitmix64(&x) ^ (uint64_t)stream;
    x = splitmix64(&x) ^ a;
    x = splitmix64(&x) ^ b;
    tf_rng rng;
    for (int i = 0; i < 4; i++) rng.s[i] = splitmix64(&x);
    return rng;
}

static uint64_t rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

uint64_t tf_rng_u64(tf_rng *rng) {
    uint64_t *s = rng->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double tf_rng_uniform(tf_rng *rng) {
    return (double)(tf_rng_u64(rng) >> 11) * 0x1.0p-53;
}

uint64_t tf_rng_below(tf_rng *rng, uint64_t n) {
    /* Rejection keeps the result unbiased: draws in the incomplete last block are redrawn. */
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do x = tf_rng_u64(rng);
    while (x >= limit);
    return x % n;
}

double tf_rng_normal(tf_rng *rng) {
    double u1 = 1.0 - tf_rng_uniform(rng); /* (0, 1], so log is finite */
    double u2 = tf_rng_uniform(rng);
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

double tf_rng_gamma(tf_rng *rng, double shape) {
    if (shape < 1.0) {
        double u = 1.0 - tf_rng_uniform(rng);
        return tf_rng_gamma(rng, shape + 1.0) * pow(u, 1.0 / shape);
    }
    double d = shape - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x = tf_rng_normal(rng), v = 1.0 + c * x;
        if (v <= 0.0) continue;
        v = v * v * v;
        double u = 1.0 - tf_rng_uniform(rng);
        if (log(u) < 0.5 * x * x + d - d * v + d * log(v)) return d * v;
    }
}

double tf_rng_beta(tf_rng *rng, double a, double b) {
    double x = tf_rng_gamma(rng, a), y = tf_rng_gamma(rng, b);
    return x / (x + y);
}
