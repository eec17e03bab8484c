/* The CPU kernels are written once over `real` and compiled twice (CMakeLists.txt): with
 * TF_CPU_REAL_BITS=32 for training and inference on the CPU, and with 64 for the
 * finite-difference checks of the tests. CPU_FN(name) gives each build its own symbol names
 * (cpu_f32_name, cpu_f64_name); backend.c collects them into the two tf_backend tables.
 *
 * This header also declares every CPU operation (so that each definition is checked against the
 * declaration backend.c puts in its table) and the vectorisable exp / erfc the hot loops use. */
#ifndef TF_KERNELS_CPU_REAL_H
#define TF_KERNELS_CPU_REAL_H

#include "kernels/kernels.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>

#if TF_CPU_REAL_BITS == 64
typedef double real;
#define CPU_FN(name)   cpu_f64_##name
#define CPU_DTYPE      TF_DTYPE_F64
#define cblas_gemm     cblas_dgemm
#define real_sqrt      sqrt
#define real_exp       exp
#define real_log       log
#define real_erf       erf
#define real_erfc      erfc
#elif TF_CPU_REAL_BITS == 32
typedef float real;
#define CPU_FN(name)   cpu_f32_##name
#define CPU_DTYPE      TF_DTYPE_F32
#define cblas_gemm     cblas_sgemm
#define real_sqrt      sqrtf
#define real_exp       expf
#define real_log       logf
#define real_erf       erff
#define real_erfc      erfcf
#else
#error "TF_CPU_REAL_BITS must be 32 or 64"
#endif

/* ---- exp and erfc that loops can vectorise ----
 * GCC vectorises a loop that calls a math function only when the function has a SIMD variant
 * and cannot touch errno. glibc >= 2.35 ships SIMD variants of exp, expf, erfc and erfcf in
 * libmvec (_ZGVeN16v_erfcf and friends, reached through libm.so's linker script), but its headers
 * announce them only under -ffast-math, and expf/erfcf may set errno. So we declare aliases of
 * the same symbols that are const (no errno) and have SIMD variants; the vectoriser then calls
 * libmvec's versions (a few ulp, like the scalar ones) and the scalar remainder calls libm.
 * Measured here (AVX-512): GELU through the vector erfcf 1.1 ns per element, through the scalar
 * erff 10.3 ns. Elsewhere the plain libm functions are used: correct, only slower. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) &&            \
    __GLIBC_PREREQ(2, 35)
float cpu_vector_expf(float) __asm__("expf") __attribute__((const, nothrow, simd("notinbranch")));
float cpu_vector_erfcf(float) __asm__("erfcf") __attribute__((const, nothrow, simd("notinbranch")));
double cpu_vector_exp(double) __asm__("exp") __attribute__((const, nothrow, simd("notinbranch")));
double cpu_vector_erfc(double) __asm__("erfc") __attribute__((const, nothrow, simd("notinbranch")));
#else
#define cpu_vector_expf  expf
#define cpu_vector_erfcf erfcf
#define cpu_vector_exp   exp
#define cpu_vector_erfc  erfc
#endif
#if TF_CPU_REAL_BITS == 64
#define real_vector_exp  cpu_vector_exp
#define real_vector_erfc cpu_vector_erfc
#else
#define real_vector_exp  cpu_vector_expf
#define real_vector_erfc cpu_vector_erfcf
#endif

/* GELU and its derivative through the normal CDF Phi(z) = erfc(-z / sqrt 2) / 2, which keeps
 * full relative accuracy for negative z, where 1 + erf(z / sqrt 2) would cancel:
 *   GELU(z) = z Phi(z),   GELU'(z) = Phi(z) + z phi(z),   phi(z) = exp(-z^2 / 2) / sqrt(2 pi). */
#define CPU_SQRT1_2       0.70710678118654752440
#define CPU_INV_SQRT_2PI  0.39894228040143267794
static inline real cpu_gelu(real z) {
    return (real)0.5 * z * real_vector_erfc(-z * (real)CPU_SQRT1_2);
}
static inline real cpu_gelu_derivative(real z) {
    real cdf = (real)0.5 * real_vector_erfc(-z * (real)CPU_SQRT1_2);
    return cdf + z * (real)CPU_INV_SQRT_2PI * real_vector_exp((real)-0.5 * z * z);
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

void CPU_FN(images_normalize)(void *images, const void *pixels, int batch, int channels, int size,
                              const float *mean, const float *std);
void CPU_FN(mixup_images)(void *images, int batch, size_t sample_size, float lambda);
void CPU_FN(cutmix_images)(void *images, int batch, int channels, int size, int y0, int y1, int x0, int x1);

void CPU_FN(matmul)(void *c, const void *a, const void *b, const tf_matmul_desc *desc);

void CPU_FN(pattention_norm_forward)(void *s, void *row_norm, const void *a, int rows, int n, float tau,
                                     float eps);
void CPU_FN(pattention_norm_backward)(void *da, const void *ds, const void *a, const void *row_norm, int rows,
                                      int n, float tau);

void CPU_FN(attention_forward)(void *out, void *lse, const void *q, const void *k, const void *v, int batch,
                               int tokens, int heads, int head_dim);
void CPU_FN(attention_backward)(void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                                const void *v, const void *out, const void *lse, int batch, int tokens,
                                int heads, int head_dim);

void CPU_FN(layernorm_forward)(void *out, void *mean, void *rstd, const void *x, const void *weight,
                               const void *bias, int rows, int dim, float eps);
void CPU_FN(residual_layernorm_forward)(void *residual_out, void *ln_out, void *mean, void *rstd,
                                        const void *residual_in, const void *branch, const void *sample_scale,
                                        int rows, int dim, int rows_per_sample, float eps);
void CPU_FN(layernorm_backward)(void *dx, void *dweight, void *dbias, const void *dout, const void *x,
                                const void *mean, const void *rstd, const void *weight, int rows, int dim);

void CPU_FN(residual_forward)(void *out, const void *residual_in, const void *branch, const void *sample_scale,
                              int rows, int dim, int rows_per_sample);
void CPU_FN(residual_backward)(void *dbranch, const void *dout, const void *sample_scale, int rows, int dim,
                               int rows_per_sample);

void CPU_FN(patch_im2col)(void *patches, const void *images, int batch, int channels, int size, int patch);
void CPU_FN(tokens_forward)(void *x, const void *patch_tokens, const void *cls, const void *pos, int batch,
                            int patches, int dim);
void CPU_FN(tokens_backward)(void *dpatch_tokens, void *dcls, void *dpos, const void *dx, int batch,
                             int patches, int dim);

void CPU_FN(token_pool_forward)(void *out, const void *x, int batch, int tokens, int dim, tf_pool pool);
void CPU_FN(token_pool_backward)(void *dx, const void *dout, int batch, int tokens, int dim, tf_pool pool);
void CPU_FN(bias_backward)(void *dbias, const void *dout, int rows, int dim);

void CPU_FN(cross_entropy_forward_backward)(void *loss, void *dlogits, const void *logits, const void *target,
                                            int batch, int classes, float dloss_scale);

void CPU_FN(adamw_update)(void *master, void *compute, const void *grad, void *m, void *v,
                          const tf_adamw_group *groups, int group_count, const tf_adamw_hyper *hyper);
void CPU_FN(ema_update)(void *ema, const void *master, size_t n, float decay);
double CPU_FN(sum_squares)(const void *x, size_t n);

#endif
