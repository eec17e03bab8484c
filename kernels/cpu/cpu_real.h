/* The CPU kernels are written once over `real` and compiled twice (CMakeLists.txt): with
 * TF_CPU_REAL_BITS=32 for training and inference on the CPU, and with 64 for the
 * finite-difference checks of the tests. CPU_FN(name) gives each build its own symbol names
 * (cpu_f32_name, cpu_f64_name); backend.c collects them into the two tf_backend tables.
 *
 * This header also declares every CPU operation (so that each definition is checked against the
 * declaration backend.c puts in its table) and the vectorisable exp and GELU the hot loops use.
 *
 * FMA contraction: CMake builds with -std=c11, and in ISO C mode GCC defaults to
 * -ffp-contract=off, so a * b + c is never fused and every inner product or polynomial costs two
 * instructions per step instead of one. The kernels want the fused form (faster, and no less
 * accurate), so every file of this backend turns contraction on for itself. */
#ifndef TF_KERNELS_CPU_REAL_H
#define TF_KERNELS_CPU_REAL_H

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

#include "kernels/kernels.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if TF_CPU_REAL_BITS == 64
typedef double real;
#define CPU_FN(name) cpu_f64_##name
#define CPU_DTYPE    TF_DTYPE_F64
#define cblas_gemm   cblas_dgemm
#define real_sqrt    sqrt
#define real_exp     exp
#define real_log     log
#define real_erf     erf
#elif TF_CPU_REAL_BITS == 32
typedef float real;
#define CPU_FN(name) cpu_f32_##name
#define CPU_DTYPE    TF_DTYPE_F32
#define cblas_gemm   cblas_sgemm
#define real_sqrt    sqrtf
#define real_exp     expf
#define real_log     logf
#define real_erf     erff
#else
#error "TF_CPU_REAL_BITS must be 32 or 64"
#endif

/* ---- exp, the normal CDF and GELU, in a form loops can vectorise ----
 * GCC vectorises a loop that calls a libm function only under -ffast-math (glibc's libmvec
 * variants are announced only then, and expf may set errno), so the hot loops of the fp32 build
 * (GELU over every Pattention score, softmax) use the inline functions below, which compile to
 * plain vector arithmetic: about 0.7 ns per GELU element on one AVX-512 core here, against 10 ns
 * for a scalar erff loop and 1.4 ns through libmvec's vector erfcf. Both are accurate to a few
 * fp32 ulp (tests/test_kernels_cpu.c checks GELU element by element against double). The fp64
 * build (finite-difference tests) calls libm. */
#define CPU_SQRT1_2      0.70710678118654752440
#define CPU_INV_SQRT_2PI 0.39894228040143267794
#if TF_CPU_REAL_BITS == 64
static inline real cpu_exp(real x) {
    return exp(x);
}
static inline real cpu_normal_cdf(real z) {
    return 0.5 * erfc(-z * CPU_SQRT1_2);
}
#else
/* e^x for x <= 88 (the kernels pass x <= 0). x = k ln 2 + r with k an integer and |r| <= ln2 / 2
 * (ln 2 split in a part with trailing zero bits, so k ln2_hi is exact, and the rest); e^r by its
 * Taylor polynomial to degree 7 (truncation 5e-9 relative); 2^k built in the exponent bits. Below
 * -87.3 the result would be subnormal and is returned as 0. */
static inline float cpu_exp(float x) {
    const float round_shift = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float k = x * 1.44269504f + round_shift;
    k -= round_shift;
    float r = x - k * 0.693145752f; /* ln2_hi */
    r = r - k * 1.42860677e-6f;     /* ln2_lo */
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t exponent_bits = ((int32_t)k + 127) << 23;
    float two_to_k;
    memcpy(&two_to_k, &exponent_bits, sizeof two_to_k);
    return x < -87.3f ? 0.0f : p * two_to_k;
}

/* Phi(z) = erfc(-z / sqrt 2) / 2. With x = |z| / sqrt 2 >= 0 and t = 1 / (1 + x / 2),
 *   erfc(x) = t exp(-x^2 + P(t)),
 * P the degree-9 Chebyshev fit of Numerical Recipes' erfcc (fractional error below 1.2e-7 for
 * every x >= 0); then Phi = erfc(x) / 2 for z <= 0 and 1 - erfc(x) / 2 for z > 0, which keeps the
 * relative accuracy of the small tail for negative z. */
static inline float cpu_normal_cdf(float z) {
    float x = (z < 0 ? -z : z) * (float)CPU_SQRT1_2;
    float t = 1.0f / (1.0f + 0.5f * x);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    float half_erfc = 0.5f * t * cpu_exp(p - x * x);
    return z > 0 ? 1.0f - half_erfc : half_erfc;
}
#endif

/* GELU(z) = z Phi(z),  GELU'(z) = Phi(z) + z phi(z),  phi(z) = exp(-z^2 / 2) / sqrt(2 pi).
 * Backward needs both: it computes Phi once and calls the _from_cdf forms. */
static inline real cpu_gelu_from_cdf(real z, real cdf) {
    return z * cdf;
}
static inline real cpu_gelu_derivative_from_cdf(real z, real cdf) {
    return cdf + z * (real)CPU_INV_SQRT_2PI * cpu_exp((real)-0.5 * z * z);
}
static inline real cpu_gelu(real z) {
    return cpu_gelu_from_cdf(z, cpu_normal_cdf(z));
}

/* ---- the operations of this build (see kernels/kernels.h for what each does) ---- */
tf_status CPU_FN(alloc)(void **buffer, size_t bytes, const char *what);
void CPU_FN(free)(void *buffer);
void CPU_FN(zero)(void *buffer, size_t bytes);
void CPU_FN(copy)(void *dst, const void *src, size_t bytes);
void CPU_FN(upload)(void *dst, tf_dtype dst_dtype, const float *src, size_t n);
void CPU_FN(download)(float *dst, const void *src, tf_dtype src_dtype, size_t n);
tf_status CPU_FN(host_alloc)(void **buffer, size_t bytes);
void CPU_FN(host_free)(void *buffer);
void CPU_FN(upload_bytes)(void *dst, const void *src, size_t bytes);
void CPU_FN(convert)(void *dst, tf_dtype dst_dtype, const void *src, tf_dtype src_dtype, size_t n);
tf_status CPU_FN(synchronize)(void);
size_t CPU_FN(device_memory_in_use)(void);
void CPU_FN(profile_mark)(int index);
double CPU_FN(profile_elapsed_ms)(int from, int to);

void CPU_FN(images_normalize)(void *images, const void *pixels, int batch, int channels, int size,
                              const float *mean, const float *std);
void CPU_FN(mixup_images)(void *images, int batch, size_t sample_size, float lambda);
void CPU_FN(cutmix_images)(void *images, int batch, int channels, int size, int y0, int y1, int x0, int x1);

void CPU_FN(matmul)(void *c, const void *a, const void *b, const tf_matmul_desc *desc);

void CPU_FN(pattention_norm_forward)(void *s, void *row_norm, const void *a, int rows, int n, float tau,
                                     float eps, const void *eps_scale);
void CPU_FN(pattention_norm_backward)(void *da, void *s, const void *ds, const void *a, const void *row_norm,
                                      int rows, int n, float tau);
void CPU_FN(pattention_norm_pool)(void *pooled_s, void *row_norm, const void *a, int batch, int tokens, int n,
                                  float tau, float eps, const void *eps_scale);
void CPU_FN(pattention_norm_recheck)(const tf_norm_rows *norms, int count, const void *x, int rows, int n,
                                     int dim, float eps, float eps_ln, float share);
void CPU_FN(keys_exceed)(tf_keys_exceed *questions, int count, int dim);

void CPU_FN(attention_forward)(void *out, void *lse, const void *q, const void *k, const void *v, int batch,
                               int tokens, int heads, int head_dim);
void CPU_FN(attention_backward)(void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                                const void *v, const void *out, const void *lse, int batch, int tokens,
                                int heads, int head_dim);

void CPU_FN(layernorm_forward)(void *out, void *xhat, void *rstd, const void *x, const void *weight,
                               const void *bias, int rows, int dim, float eps);
void CPU_FN(residual_layernorm_forward)(void *residual_out, void *ln_out, void *rstd, const void *residual_in,
                                        const void *branch, const void *sample_scale, int rows, int dim,
                                        int rows_per_sample, float eps);
void CPU_FN(layernorm_backward)(void *dx, void *dweight, void *dbias, const void *dout, const void *xhat,
                                const void *rstd, const void *weight, int rows, int dim);
void CPU_FN(center_rows)(void *const *out, const void *const *x, const int *rows, int count, int dim);
void CPU_FN(layernorm_variance)(void *variance, const void *x, int rows, int dim, float eps);

void CPU_FN(residual_forward)(void *out, const void *residual_in, const void *branch,
                              const void *sample_scale, int rows, int dim, int rows_per_sample);
void CPU_FN(residual_backward)(void *dbranch, const void *dout, const void *sample_scale, int rows, int dim,
                               int rows_per_sample);

void CPU_FN(patch_im2col)(void *patches, const void *images, int batch, int channels, int size, int patch);
void CPU_FN(tokens_forward)(void *x, tf_dtype x_dtype, const void *patch_tokens, const void *cls,
                            const void *pos, int batch, int patches, int dim);
void CPU_FN(tokens_backward)(void *dpatch_tokens, void *dcls, void *dpos, const void *dx, int batch,
                             int patches, int dim);

void CPU_FN(token_pool_forward)(void *out, const void *x, tf_dtype x_dtype, int batch, int tokens, int dim,
                                tf_pool pool);
void CPU_FN(token_pool_backward)(void *dx, const void *dout, int batch, int tokens, int dim, tf_pool pool);
void CPU_FN(bias_backward)(void *dbias, const void *dout, int rows, int dim);

void CPU_FN(cross_entropy_forward_backward)(void *loss, void *dlogits, const void *logits, const void *target,
                                            int batch, int classes, float dloss_scale);

void CPU_FN(adamw_update)(void *master, void *compute, const void *grad, void *m, void *v,
                          const tf_adamw_group *groups, int group_count, const tf_adamw_hyper *hyper);
void CPU_FN(ema_update)(void *ema, const void *master, size_t n, float decay);
double CPU_FN(sum_squares)(const void *x, size_t n);

#endif
