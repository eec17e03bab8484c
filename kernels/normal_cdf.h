/* The standard normal distribution in single precision, for the CUDA kernels' exact (erf) GELU:
 * Phi(z) and phi(z) = exp(-z^2 / 2) / sqrt(2 pi), from one exponential and one reciprocal.
 *
 * Abramowitz & Stegun 7.1.26: with x = |z| / sqrt 2 and t = 1 / (1 + p x),
 *   erfc(x) = t (a1 + a2 t + a3 t^2 + a4 t^3 + a5 t^4) exp(-x^2) + e(x),  |e(x)| <= 1.5e-7,
 * so 1 - Phi(|z|) = erfc(x) / 2 (the coefficients below are halved), Phi = that tail for z < 0
 * and 1 - tail for z >= 0: the small tail for negative z is a product, not 1 + erf, so it keeps
 * its relative accuracy. In fp32 (tests/test_kernels_cpu.c, host build): Phi within 3e-7 of the
 * exact value everywhere (erff's form 0.5 (1 + erf(z / sqrt 2)): 6e-8), so GELU within 6e-7
 * relative for z >= 0; for z in [-4, 0] within 5e-4 relative, as erff's form even correctly
 * rounded, and 1.6e-3 at z = -5 against its 5%. After the bf16 rounding of S, the same function.
 *
 * Why not erff: the H100 runs B/16 at its 700 W power limit, at ~1.55 GHz, where the Pattention
 * norm pass is bound by its instructions, not its memory traffic. erff's two branches were both
 * computed (the norm forward's SASS for 24 elements a thread: 1032 instructions, 216 of them
 * selects); with this form 752, no branch: `bench infer` B/16 9908-9923 -> 10221-10243 img/s,
 * `bench train` +1.4% (docs/performance.md, row 26). On the GPU the exponential and reciprocal
 * are the hardware's approximations (ex2.approx.ftz, rcp.approx.ftz: within 2 and 1 ulp), which
 * add ~1e-7 to Phi's error; the host build (the test) uses exp2f and a division. */
#ifndef TF_NORMAL_CDF_H
#define TF_NORMAL_CDF_H

#ifdef __CUDACC__
#define TF_NORMAL_FN __device__ __forceinline__
TF_NORMAL_FN float tf_normal_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
TF_NORMAL_FN float tf_normal_reciprocal(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#else
#include <math.h>
#define TF_NORMAL_FN static inline
TF_NORMAL_FN float tf_normal_exp2(float x) {
    return exp2f(x);
}
TF_NORMAL_FN float tf_normal_reciprocal(float x) {
    return 1.0f / x;
}
#endif

typedef struct {
    float cdf; /* Phi(z) */
    float pdf; /* phi(z) */
} tf_normal;

TF_NORMAL_FN tf_normal tf_standard_normal(float z) {
    float t = tf_normal_reciprocal(fmaf(fabsf(z), 0.23164189f, 1.0f)); /* p = 0.3275911, over sqrt 2 */
    float gauss = tf_normal_exp2(z * z * -0.72134752f); /* exp(-z^2 / 2) = 2^(-z^2 log2(e) / 2) */
    float poly =
        fmaf(t, fmaf(t, fmaf(t, fmaf(t, 0.5307027145f, -0.7265760135f), 0.7107068705f), -0.142248368f),
             0.127414796f);
    float tail = t * poly * gauss; /* 1 - Phi(|z|) */
    tf_normal normal = {z < 0.0f ? tail : 1.0f - tail, 0.39894228f * gauss};
    return normal;
}

#endif
