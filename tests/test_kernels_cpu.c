/* Tests of the CPU backend's operations (kernels/cpu/), one function per operation family.
 *
 * For every operation: the forward pass against a naive reference written here (plain loops in
 * double); every backward against central finite differences of a scalar objective
 * (sum of w * output, w random) computed with the fp64 backend; the fp32 backend against the
 * fp64 one on the same (fp32-representable) inputs; and the in-place, accumulate and overwrite
 * rules that kernels/kernels.h states. Shapes are small, odd and non-square on purpose. */
#include "kernels/kernels.h"
#include "kernels/normal_cdf.h"
#include "tests/test_util.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const tf_backend *f32, *f64;
static tf_rng rng;

/* ---- helpers ------------------------------------------------------------------------------- */

/* Every buffer of a test comes from here and is freed by free_all() at the end of the test. */
enum { MAX_ALLOCATIONS = 4096 };
static void *allocations[MAX_ALLOCATIONS];
static int allocation_count;

static void *test_alloc(size_t bytes) {
    if (allocation_count == MAX_ALLOCATIONS) {
        fprintf(stderr, "test_kernels_cpu: too many allocations in one test\n");
        abort();
    }
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p) abort();
    return allocations[allocation_count++] = p;
}

static void free_all(void) {
    while (allocation_count)
        free(allocations[--allocation_count]);
}

static double *new_f64(size_t n) {
    return test_alloc(n * sizeof(double));
}

static float *new_f32(size_t n) {
    return test_alloc(n * sizeof(float));
}

/* N(0, std^2) values rounded to fp32, so that both backends see exactly the same inputs. */
static double *random_input(size_t n, double std) {
    double *x = new_f64(n);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(std * tf_rng_normal(&rng));
    return x;
}

static double *copy_f64(const double *x, size_t n) {
    double *y = new_f64(n);
    memcpy(y, x, n * sizeof(double));
    return y;
}

static float *to_f32(const double *x, size_t n) {
    float *y = new_f32(n);
    for (size_t i = 0; i < n; i++)
        y[i] = (float)x[i];
    return y;
}

static double *to_f64(const float *x, size_t n) {
    double *y = new_f64(n);
    for (size_t i = 0; i < n; i++)
        y[i] = x[i];
    return y;
}

static double dot(const double *a, const double *b, size_t n) {
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

/* Checks error <= bound and prints the measured error, so the log shows the margins. */
static void expect_below(const char *what, double error, double bound) {
    printf("  %-58s %9.2e (bound %.0e)\n", what, error, bound);
    CHECK(error <= bound, "%s: error %.3e > %.1e", what, error, bound);
}

static void expect_close_f64(const char *what, const double *a, const double *reference, size_t n,
                             double bound) {
    expect_below(what, relative_error_f64(a, reference, n), bound);
}

/* The fp32 result against the fp64 one. */
static void expect_f32_close(const char *what, const float *a, const double *reference, size_t n,
                             double bound) {
    expect_below(what, relative_error_f64(to_f64(a, n), reference, n), bound);
}

static void expect_equal_f64(const char *what, const double *a, const double *b, size_t n) {
    size_t differing = 0;
    for (size_t i = 0; i < n; i++)
        differing += a[i] != b[i];
    printf("  %-58s %9zu differ\n", what, differing);
    CHECK(differing == 0, "%s: %zu of %zu values differ", what, differing, n);
}

/* Central finite differences of objective() with respect to each element of x (changed and
 * restored in place): gradient[i] = (f(x + h e_i) - f(x - h e_i)) / (2 h). */
typedef double (*objective_fn)(void *context);
static double *numerical_gradient_every(double *x, size_t n, size_t stride, objective_fn objective,
                                        void *context) {
    const double h = 1e-6;
    double *gradient = new_f64((n + stride - 1) / stride);
    for (size_t i = 0; i < n; i += stride) {
        double saved = x[i];
        x[i] = saved + h;
        double plus = objective(context);
        x[i] = saved - h;
        double minus = objective(context);
        x[i] = saved;
        gradient[i / stride] = (plus - minus) / (2 * h);
    }
    return gradient;
}

static double *numerical_gradient(double *x, size_t n, objective_fn objective, void *context) {
    return numerical_gradient_every(x, n, 1, objective, context);
}

/* Every stride-th element of x, to compare with numerical_gradient_every(). */
static double *every(const double *x, size_t n, size_t stride) {
    double *y = new_f64((n + stride - 1) / stride);
    for (size_t i = 0; i < n; i += stride)
        y[i / stride] = x[i];
    return y;
}

static const double FD_BOUND = 1e-6;   /* analytic vs finite-difference gradient, fp64 */
static const double F64_BOUND = 1e-12; /* fp64 backend vs the naive double reference */
static const double F32_BOUND = 1e-5;  /* fp32 backend vs fp64 backend */

/* ---- backend tables ------------------------------------------------------------------------ */

static void test_backend_tables(void) {
    printf("backend tables\n");
    CHECK(strcmp(f32->name, "cpu-fp32") == 0, "name %s", f32->name);
    CHECK(strcmp(f64->name, "cpu-fp64") == 0, "name %s", f64->name);
    CHECK(f32->master_dtype == TF_DTYPE_F32 && f32->compute_dtype == TF_DTYPE_F32, "fp32 dtypes");
    CHECK(f64->master_dtype == TF_DTYPE_F64 && f64->compute_dtype == TF_DTYPE_F64, "fp64 dtypes");
    const tf_backend *tables[2] = {f32, f64};
    for (int t = 0; t < 2; t++) {
        const tf_backend *be = tables[t];
#define EXPECT_SET(field) CHECK(be->field != NULL, "%s: " #field " is NULL", be->name)
        EXPECT_SET(alloc);
        EXPECT_SET(free);
        EXPECT_SET(zero);
        EXPECT_SET(copy);
        EXPECT_SET(upload);
        EXPECT_SET(download);
        EXPECT_SET(host_alloc);
        EXPECT_SET(host_free);
        EXPECT_SET(upload_bytes);
        EXPECT_SET(convert);
        EXPECT_SET(synchronize);
        EXPECT_SET(images_normalize);
        EXPECT_SET(mixup_images);
        EXPECT_SET(cutmix_images);
        EXPECT_SET(matmul);
        EXPECT_SET(pattention_norm_forward);
        EXPECT_SET(pattention_norm_backward);
        EXPECT_SET(pattention_norm_pool);
        EXPECT_SET(pattention_norm_recheck);
        EXPECT_SET(attention_forward);
        EXPECT_SET(attention_backward);
        EXPECT_SET(layernorm_forward);
        EXPECT_SET(residual_layernorm_forward);
        EXPECT_SET(layernorm_backward);
        EXPECT_SET(center_rows);
        EXPECT_SET(layernorm_variance);
        EXPECT_SET(residual_forward);
        EXPECT_SET(residual_backward);
        EXPECT_SET(patch_im2col);
        EXPECT_SET(tokens_forward);
        EXPECT_SET(tokens_backward);
        EXPECT_SET(token_pool_forward);
        EXPECT_SET(token_pool_backward);
        EXPECT_SET(bias_backward);
        EXPECT_SET(cross_entropy_forward_backward);
        EXPECT_SET(adamw_update);
        EXPECT_SET(ema_update);
        EXPECT_SET(sum_squares);
#undef EXPECT_SET
    }
    CHECK(tf_cpu_backend(TF_DTYPE_F32) != tf_cpu_backend(TF_DTYPE_F64), "two distinct tables");
}

/* ---- matmul -------------------------------------------------------------------------------- */

/* c = op(a) op(b) (+ bias) (+ c), the definition spelled out. */
static void reference_matmul(double *c, const double *a, const double *b, const double *bias,
                             const tf_matmul_desc *desc) {
    for (int i = 0; i < desc->m; i++)
        for (int j = 0; j < desc->n; j++) {
            double sum = bias ? bias[j] : 0.0;
            for (int p = 0; p < desc->k; p++) {
                double a_ip = desc->transpose_a ? a[(size_t)p * desc->m + i] : a[(size_t)i * desc->k + p];
                double b_pj = desc->transpose_b ? b[(size_t)j * desc->k + p] : b[(size_t)p * desc->n + j];
                sum += a_ip * b_pj;
            }
            c[(size_t)i * desc->n + j] = desc->accumulate ? c[(size_t)i * desc->n + j] + sum : sum;
        }
}

/* All 16 combinations of transpose_a, transpose_b, accumulate and bias; each is checked, the
 * worst error of each backend is printed. */
static void test_matmul_case(int m, int n, int k) {
    char what[96];
    double worst64 = 0.0, worst32 = 0.0;
    for (int variant = 0; variant < 16; variant++) {
        tf_matmul_desc desc = {.m = m,
                               .n = n,
                               .k = k,
                               .transpose_a = variant & 1,
                               .transpose_b = (variant >> 1) & 1,
                               .accumulate = (variant >> 2) & 1,
                               .master_output = variant & 1};
        bool with_bias = (variant >> 3) & 1;
        double *a = random_input((size_t)m * k, 1.0), *b = random_input((size_t)k * n, 1.0);
        double *bias = with_bias ? random_input(n, 1.0) : NULL;
        double *c0 = random_input((size_t)m * n, 1.0);
        double *expected = copy_f64(c0, (size_t)m * n), *c = copy_f64(c0, (size_t)m * n);
        reference_matmul(expected, a, b, bias, &desc);
        desc.bias = bias;
        f64->matmul(c, a, b, &desc);
        double error64 = relative_error_f64(c, expected, (size_t)m * n);
        float *c32 = to_f32(c0, (size_t)m * n);
        desc.bias = with_bias ? to_f32(bias, n) : NULL;
        f32->matmul(c32, to_f32(a, (size_t)m * k), to_f32(b, (size_t)k * n), &desc);
        double error32 = relative_error_f64(to_f64(c32, (size_t)m * n), c, (size_t)m * n);
        CHECK(error64 <= F64_BOUND && error32 <= F32_BOUND,
              "matmul %dx%dx%d ta=%d tb=%d accumulate=%d bias=%d: error fp64 %.3e, fp32 vs fp64 %.3e", m, n,
              k, desc.transpose_a, desc.transpose_b, desc.accumulate, with_bias, error64, error32);
        worst64 = fmax(worst64, error64);
        worst32 = fmax(worst32, error32);
    }
    snprintf(what, sizeof what, "matmul %dx%dx%d, 16 variants: worst fp64", m, n, k);
    expect_below(what, worst64, F64_BOUND);
    snprintf(what, sizeof what, "matmul %dx%dx%d, 16 variants: worst fp32 vs fp64", m, n, k);
    expect_below(what, worst32, F32_BOUND);
}

static void test_matmul(void) {
    printf("matmul\n");
    test_matmul_case(7, 5, 9);
    test_matmul_case(67, 45, 130); /* large enough for OpenBLAS's blocked, threaded paths */
    free_all();
}

/* ---- Pattention norm ----------------------------------------------------------------------- */

static double reference_gelu(double z) {
    return 0.5 * z * (1.0 + erf(z / sqrt(2.0)));
}

/* The definition's r = sqrt(sum_j A_j^2 + eps) of one row, eps being the row's. */
static double reference_row_norm(const double *a_row, int n, double eps) {
    double sum = eps;
    for (int j = 0; j < n; j++) sum += a_row[j] * a_row[j];
    return sqrt(sum);
}

typedef struct {
    double *s, *row_norm, *a, *w;
    int rows, n;
    float tau, eps;
} pattention_context;

static double pattention_objective(void *context) {
    pattention_context *c = context;
    f64->pattention_norm_forward(c->s, c->row_norm, c->a, c->rows, c->n, c->tau, c->eps, NULL);
    return dot(c->w, c->s, (size_t)c->rows * c->n);
}

static void test_pattention_norm_case(int rows, int n, float tau, float eps) {
    char what[96];
    size_t count = (size_t)rows * n;
    double *a = random_input(count, 1.0), *s = new_f64(count), *row_norm = new_f64(rows);
    f64->pattention_norm_forward(s, row_norm, a, rows, n, tau, eps, NULL);
    /* Reference: the definition r = sqrt(sum A^2 + eps), Z = tau A / r, S = GELU(Z) via erf. */
    double *expected_s = new_f64(count), *expected_norm = new_f64(rows);
    for (int i = 0; i < rows; i++) {
        expected_norm[i] = reference_row_norm(a + (size_t)i * n, n, eps);
        for (int j = 0; j < n; j++)
            expected_s[(size_t)i * n + j] = reference_gelu(tau * a[(size_t)i * n + j] / expected_norm[i]);
    }
    snprintf(what, sizeof what, "pattention_norm forward %dx%d eps=%g: S fp64", rows, n, eps);
    expect_close_f64(what, s, expected_s, count, F64_BOUND);
    snprintf(what, sizeof what, "pattention_norm forward %dx%d eps=%g: row norms fp64", rows, n, eps);
    expect_close_f64(what, row_norm, expected_norm, rows, F64_BOUND);

    /* Backward against finite differences of sum(w * S). */
    double *w = random_input(count, 1.0), *da = new_f64(count), *recomputed_s = new_f64(count);
    f64->pattention_norm_backward(da, recomputed_s, w, a, row_norm, rows, n, tau);
    snprintf(what, sizeof what, "pattention_norm backward %dx%d: S again, as forward wrote it", rows, n);
    expect_equal_f64(what, recomputed_s, s, count);
    pattention_context context = {s, new_f64(rows), a, w, rows, n, tau, eps};
    double *numeric = numerical_gradient(a, count, pattention_objective, &context);
    snprintf(what, sizeof what, "pattention_norm backward %dx%d eps=%g: dA vs finite diff", rows, n, eps);
    expect_close_f64(what, da, numeric, count, FD_BOUND);

    /* In place: da is ds. */
    double *in_place = copy_f64(w, count);
    f64->pattention_norm_backward(in_place, recomputed_s, in_place, a, row_norm, rows, n, tau);
    snprintf(what, sizeof what, "pattention_norm backward %dx%d: in place (da == ds)", rows, n);
    expect_equal_f64(what, in_place, da, count);

    /* fp32 against fp64. */
    float *a32 = to_f32(a, count), *s32 = new_f32(count), *norm32 = new_f32(rows);
    f32->pattention_norm_forward(s32, norm32, a32, rows, n, tau, eps, NULL);
    snprintf(what, sizeof what, "pattention_norm %dx%d fp32 vs fp64: S", rows, n);
    expect_f32_close(what, s32, s, count, F32_BOUND);
    snprintf(what, sizeof what, "pattention_norm %dx%d fp32 vs fp64: row norms", rows, n);
    expect_f32_close(what, norm32, row_norm, rows, F32_BOUND);
    float *da32 = to_f32(w, count), *recomputed_s32 = new_f32(count);
    f32->pattention_norm_backward(da32, recomputed_s32, da32, a32, norm32, rows, n, tau);
    snprintf(what, sizeof what, "pattention_norm %dx%d fp32 vs fp64: dA (in place)", rows, n);
    expect_f32_close(what, da32, da, count, F32_BOUND);
    snprintf(what, sizeof what, "pattention_norm backward %dx%d fp32: S again, as forward wrote it", rows, n);
    expect_equal_f64(what, to_f64(recomputed_s32, count), to_f64(s32, count), count);
}

/* The fp32 GELU (libmvec's vector erfc where available) element by element over a wide range:
 * one row whose scores are evenly spaced, with tau chosen so that Z spans [-zmax, zmax]. The
 * reference is the exact GELU of the fp32 Z the kernel forms (tau / r times A, in fp32). */
static void test_pattention_gelu_accuracy(void) {
    const int n = 4001;
    const double zmax = 9.0;
    double *a = new_f64(n);
    for (int j = 0; j < n; j++)
        a[j] = (float)(-1.0 + 2.0 * j / (n - 1));
    float tau = (float)(zmax * reference_row_norm(a, n, 0.0));
    float *a32 = to_f32(a, n), *s32 = new_f32(n), *norm32 = new_f32(1);
    f32->pattention_norm_forward(s32, norm32, a32, 1, n, tau, 0.0f, NULL);
    float scale = tau / norm32[0];
    double worst_relative = 0.0, worst_absolute = 0.0;
    for (int j = 0; j < n; j++) {
        double z = (float)(scale * a32[j]);
        double expected = 0.5 * z * erfc(-z / sqrt(2.0));
        double error = fabs(s32[j] - expected);
        /* Relative accuracy where GELU is not tiny; absolute (scaled by |z|) everywhere. */
        if (fabs(z) <= 4.0 && fabs(z) > 1e-3) worst_relative = fmax(worst_relative, error / fabs(expected));
        worst_absolute = fmax(worst_absolute, error / fmax(1.0, fabs(z)));
    }
    /* An fp32 erfc argument carries a relative rounding of 6e-8, which moves erfc(x) by a relative
     * 2 x^2 6e-8 (1e-6 at |z| = 4), hence the relative bound; well inside that is ~1e-7. */
    expect_below("pattention_norm fp32 GELU, |z| <= 4, relative", worst_relative, 2e-6);
    expect_below("pattention_norm fp32 GELU, |z| <= 9, absolute / max(1,|z|)", worst_absolute, 3e-7);
    free_all();
}

/* The CUDA kernels' standard normal distribution (kernels/normal_cdf.h, Abramowitz & Stegun
 * 7.1.26), here in its host build, against double precision over z in [-12, 12]: Phi within 3e-7
 * absolute everywhere, relative where the tail is small (the form keeps it as a product, not
 * 1 - something); phi relative. */
static void test_cuda_standard_normal(void) {
    const int points = 480001;
    double worst_absolute = 0.0, worst_tail = 0.0, worst_density = 0.0;
    for (int i = 0; i < points; i++) {
        float z = (float)(-12.0 + 24.0 * i / (points - 1));
        tf_normal normal = tf_standard_normal(z);
        double cdf = 0.5 * erfc(-(double)z / sqrt(2.0)), pdf = exp(-0.5 * (double)z * z) / sqrt(2.0 * M_PI);
        worst_absolute = fmax(worst_absolute, fabs(normal.cdf - cdf));
        if (z >= -4.0f && z <= 0.0f) worst_tail = fmax(worst_tail, fabs(normal.cdf - cdf) / cdf);
        if (fabsf(z) <= 6.0f) worst_density = fmax(worst_density, fabs(normal.pdf - pdf) / pdf);
    }
    expect_below("CUDA Phi (host build), |error| over [-12, 12]", worst_absolute, 3e-7);
    /* erff's form 0.5 (1 + erf), even with erf correctly rounded: 4.7e-4 here (1 + erf cancels). */
    expect_below("CUDA Phi (host build), relative error over [-4, 0]", worst_tail, 6e-4);
    expect_below("CUDA phi (host build), relative error over [-6, 6]", worst_density, 3e-6);
}

/* eps scaled per row (the inference form's eps_scale): r = sqrt(sum A^2 + eps e_row), with A
 * small enough that the eps term moves r. */
static void test_pattention_norm_eps_scale(int rows, int n) {
    size_t count = (size_t)rows * n;
    float tau = sqrtf((float)n), eps = 1e-3f;
    double *a = random_input(count, 0.01), *s = new_f64(count), *row_norm = new_f64(rows);
    double *eps_scale = new_f64(rows), *expected_s = new_f64(count), *expected_norm = new_f64(rows);
    for (int i = 0; i < rows; i++) eps_scale[i] = (float)(0.1 + 2.0 * tf_rng_uniform(&rng));
    f64->pattention_norm_forward(s, row_norm, a, rows, n, tau, eps, eps_scale);
    for (int i = 0; i < rows; i++) {
        expected_norm[i] = reference_row_norm(a + (size_t)i * n, n, (double)eps * eps_scale[i]);
        for (int j = 0; j < n; j++)
            expected_s[(size_t)i * n + j] = reference_gelu(tau * a[(size_t)i * n + j] / expected_norm[i]);
    }
    expect_close_f64("pattention_norm forward, eps scaled per row: row norms fp64", row_norm, expected_norm, rows,
                     F64_BOUND);
    expect_close_f64("pattention_norm forward, eps scaled per row: S fp64", s, expected_s, count, F64_BOUND);
    float *s32 = new_f32(count), *norm32 = new_f32(rows);
    f32->pattention_norm_forward(s32, norm32, to_f32(a, count), rows, n, tau, eps, to_f32(eps_scale, rows));
    expect_f32_close("pattention_norm forward, eps scaled per row: row norms fp32", norm32, expected_norm, rows,
                     F32_BOUND);
    expect_f32_close("pattention_norm forward, eps scaled per row: S fp32", s32, expected_s, count, F32_BOUND);
}

/* Forward fused with the mean over each image's patch rows (rows 1..tokens-1 of each image):
 * against the definition, S by the reference GELU and averaged in double; eps scaled per row. */
static void test_pattention_norm_pool(int batch, int tokens, int n) {
    int rows = batch * tokens;
    size_t count = (size_t)rows * n;
    float tau = sqrtf((float)n), eps = 1e-3f;
    double *a = random_input(count, 0.05), *eps_scale = new_f64(rows), *scratch = new_f64(rows);
    for (int i = 0; i < rows; i++) eps_scale[i] = (float)(0.1 + 2.0 * tf_rng_uniform(&rng));
    double *pooled = new_f64((size_t)batch * n), *expected = new_f64((size_t)batch * n);
    f64->pattention_norm_pool(pooled, scratch, a, batch, tokens, n, tau, eps, eps_scale);
    for (int b = 0; b < batch; b++)
        for (int t = 1; t < tokens; t++) {
            const double *a_row = a + ((size_t)b * tokens + t) * n;
            double r = reference_row_norm(a_row, n, (double)eps * eps_scale[b * tokens + t]);
            for (int j = 0; j < n; j++) expected[(size_t)b * n + j] += reference_gelu(tau * a_row[j] / r) / (tokens - 1);
        }
    char what[96];
    snprintf(what, sizeof what, "pattention_norm_pool %dx%dx%d: mean S fp64", batch, tokens, n);
    expect_close_f64(what, pooled, expected, (size_t)batch * n, F64_BOUND);
    float *pooled32 = new_f32((size_t)batch * n), *scratch32 = new_f32(rows);
    f32->pattention_norm_pool(pooled32, scratch32, to_f32(a, count), batch, tokens, n, tau, eps,
                              to_f32(eps_scale, rows));
    snprintf(what, sizeof what, "pattention_norm_pool %dx%dx%d: mean S fp32", batch, tokens, n);
    expect_f32_close(what, pooled32, expected, (size_t)batch * n, F32_BOUND);
}

/* pattention_norm_recheck on three Pattentions normalised with eps eps_ln alone (as the inference
 * form's Q, K, V): every third row has its first Pattention's scores scaled by 0.1, so its r^2 is
 * under a quarter of the three's sum and the row must be done again with var(x) + eps_ln; the
 * other rows, whose three score rows have equal norms (the first reversed and negated), must be
 * left as they are. Against the definition, in fp64 and fp32; the two definitions (with and without
 * var(x)) are far apart on every row, so recomputing the wrong rows fails. */
static void run_norm_recheck(const tf_backend *backend, void *const *s, void *const *row_norm, const void *const *a,
                             const void *x, int rows, int n, int dim, const float *tau, float eps, float eps_ln) {
    tf_norm_rows norms[3];
    for (int p = 0; p < 3; p++) {
        backend->pattention_norm_forward(s[p], row_norm[p], a[p], rows, n, tau[p], eps * eps_ln, NULL);
        norms[p] = (tf_norm_rows){s[p], row_norm[p], a[p], tau[p]};
    }
    backend->pattention_norm_recheck(norms, 3, x, rows, n, dim, eps, eps_ln, 0.25f);
}

static void test_pattention_norm_recheck(int rows, int n, int dim) {
    size_t count = (size_t)rows * n;
    const float eps = 1e-3f, eps_ln = 1e-2f, tau[3] = {sqrtf((float)n), 2.0f, 3.0f};
    double *x = random_input((size_t)rows * dim, 1.0), *a[3], *s[3], *row_norm[3], *expected_s[3], *expected_norm[3];
    for (int p = 0; p < 3; p++) {
        a[p] = p == 0 ? random_input(count, 0.01) : new_f64(count);
        s[p] = new_f64(count), row_norm[p] = new_f64(rows);
        expected_s[p] = new_f64(count), expected_norm[p] = new_f64(rows);
    }
    double farthest = INFINITY; /* the least relative distance of the two definitions' r */
    for (int i = 0; i < rows; i++) {
        double *row[3] = {a[0] + (size_t)i * n, a[1] + (size_t)i * n, a[2] + (size_t)i * n};
        for (int j = 0; j < n; j++) row[1][j] = row[2][j] = -row[0][n - 1 - j];
        bool recheck = i % 3 == 0;
        if (recheck)
            for (int j = 0; j < n; j++) row[0][j] = (float)(0.1 * row[0][j]);
        const double *x_row = x + (size_t)i * dim;
        double mean = 0.0, squares = 0.0;
        for (int j = 0; j < dim; j++) mean += x_row[j] / dim;
        for (int j = 0; j < dim; j++) squares += (x_row[j] - mean) * (x_row[j] - mean);
        double with_variance = (double)eps * (squares / dim + eps_ln), without = (double)(eps * eps_ln);
        for (int p = 0; p < 3; p++) {
            double r = reference_row_norm(row[p], n, recheck ? with_variance : without);
            double other = reference_row_norm(row[p], n, recheck ? without : with_variance);
            farthest = fmin(farthest, fabs(other / r - 1.0));
            expected_norm[p][i] = r;
            for (int j = 0; j < n; j++) expected_s[p][(size_t)i * n + j] = reference_gelu(tau[p] * row[p][j] / r);
        }
    }
    CHECK(farthest > 1e-2, "norm recheck test: the definitions with and without var(x) are only %.2g apart",
          farthest);
    run_norm_recheck(f64, (void *const *)s, (void *const *)row_norm, (const void *const *)a, x, rows, n, dim, tau,
                     eps, eps_ln);
    char what[96];
    for (int p = 0; p < 3; p++) {
        snprintf(what, sizeof what, "pattention_norm_recheck %dx%d, Pattention %d: r fp64", rows, n, p);
        expect_close_f64(what, row_norm[p], expected_norm[p], rows, F64_BOUND);
        snprintf(what, sizeof what, "pattention_norm_recheck %dx%d, Pattention %d: S fp64", rows, n, p);
        expect_close_f64(what, s[p], expected_s[p], count, F64_BOUND);
    }
    float *a32[3], *s32[3], *norm32[3];
    for (int p = 0; p < 3; p++) a32[p] = to_f32(a[p], count), s32[p] = new_f32(count), norm32[p] = new_f32(rows);
    run_norm_recheck(f32, (void *const *)s32, (void *const *)norm32, (const void *const *)a32,
                     to_f32(x, (size_t)rows * dim), rows, n, dim, tau, eps, eps_ln);
    for (int p = 0; p < 3; p++) {
        snprintf(what, sizeof what, "pattention_norm_recheck %dx%d, Pattention %d: r fp32", rows, n, p);
        expect_f32_close(what, norm32[p], expected_norm[p], rows, F32_BOUND);
        snprintf(what, sizeof what, "pattention_norm_recheck %dx%d, Pattention %d: S fp32", rows, n, p);
        expect_f32_close(what, s32[p], expected_s[p], count, F32_BOUND);
    }
    printf("  (with and without var(x), r at least %.2g apart on every row)\n", farthest);
}

static void test_pattention_norm(void) {
    printf("pattention_norm\n");
    test_pattention_norm_case(6, 37, sqrtf(29.0f), 1e-5f);
    test_pattention_norm_case(5, 64, sqrtf(64.0f), 0.5f); /* a large eps, so that r^2 must include it */
    test_pattention_norm_eps_scale(9, 40);
    test_pattention_norm_pool(3, 5, 40);
    test_pattention_norm_pool(2, 9, 300); /* columns in two blocks of the CPU loop */
    test_pattention_norm_recheck(12, 40, 24);
    test_pattention_gelu_accuracy();
    test_cuda_standard_normal();
    free_all();
}

/* ---- attention ----------------------------------------------------------------------------- */

static void reference_attention(double *out, double *lse, const double *q, const double *k, const double *v,
                                int batch, int tokens, int heads, int head_dim) {
    int stride = heads * head_dim;
    double scores[tokens];
    for (int b = 0; b < batch; b++)
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < tokens; i++) {
                const double *q_i = q + ((size_t)b * tokens + i) * stride + h * head_dim;
                double max = -INFINITY;
                for (int j = 0; j < tokens; j++) {
                    const double *k_j = k + ((size_t)b * tokens + j) * stride + h * head_dim;
                    scores[j] = dot(q_i, k_j, head_dim) / sqrt((double)head_dim);
                    max = fmax(max, scores[j]);
                }
                double sum = 0.0;
                for (int j = 0; j < tokens; j++)
                    sum += exp(scores[j] - max);
                lse[((size_t)b * heads + h) * tokens + i] = max + log(sum);
                double *out_i = out + ((size_t)b * tokens + i) * stride + h * head_dim;
                for (int d = 0; d < head_dim; d++) {
                    double value = 0.0;
                    for (int j = 0; j < tokens; j++)
                        value += exp(scores[j] - max) / sum *
                                 v[((size_t)b * tokens + j) * stride + h * head_dim + d];
                    out_i[d] = value;
                }
            }
}

typedef struct {
    double *out, *lse, *q, *k, *v, *w;
    int batch, tokens, heads, head_dim;
} attention_context;

static double attention_objective(void *context) {
    attention_context *c = context;
    f64->attention_forward(c->out, c->lse, c->q, c->k, c->v, c->batch, c->tokens, c->heads, c->head_dim);
    return dot(c->w, c->out, (size_t)c->batch * c->tokens * c->heads * c->head_dim);
}

/* fd_stride: finite differences for every fd_stride-th input element (1: all of them).
 * qk_std: the spread of queries and keys; large values make sharp softmax rows, whose small
 * probabilities underflow in fp32 (scores std qk_std^2), and whose fp32 results are only as good
 * as scores of that size rounded to fp32 allow, hence f32_bound. */
static void test_attention_case(int batch, int tokens, int heads, int head_dim, size_t fd_stride,
                                double qk_std, double f32_bound) {
    char what[96];
    size_t count = (size_t)batch * tokens * heads * head_dim, lse_count = (size_t)batch * heads * tokens;
    double *q = random_input(count, qk_std), *k = random_input(count, qk_std), *v = random_input(count, 1.0);
    double *out = new_f64(count), *lse = new_f64(lse_count);
    double *expected_out = new_f64(count), *expected_lse = new_f64(lse_count);
    f64->attention_forward(out, lse, q, k, v, batch, tokens, heads, head_dim);
    reference_attention(expected_out, expected_lse, q, k, v, batch, tokens, heads, head_dim);
    snprintf(what, sizeof what, "attention forward b%d t%d h%d d%d: out fp64", batch, tokens, heads,
             head_dim);
    expect_close_f64(what, out, expected_out, count, F64_BOUND);
    snprintf(what, sizeof what, "attention forward b%d t%d h%d d%d: lse fp64", batch, tokens, heads,
             head_dim);
    expect_close_f64(what, lse, expected_lse, lse_count, F64_BOUND);
    if (qk_std > 1.0) { /* make sure the sharp case does reach fp32 exp's underflow to 0 */
        size_t underflowing = 0;
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int i = 0; i < tokens; i++)
                    for (int j = 0; j < tokens; j++) {
                        size_t row_i = ((size_t)b * tokens + i) * heads * head_dim + (size_t)h * head_dim;
                        size_t row_j = ((size_t)b * tokens + j) * heads * head_dim + (size_t)h * head_dim;
                        double score = dot(q + row_i, k + row_j, head_dim) / sqrt((double)head_dim);
                        underflowing += score - expected_lse[((size_t)b * heads + h) * tokens + i] < -88.0;
                    }
        printf("  %-58s %9zu\n", "attention sharp rows: probabilities below e^-88", underflowing);
        CHECK(underflowing > 0, "the sharp attention case has no probability below e^-88");
    }

    /* Backward against finite differences; the gradients start as garbage (they are overwritten). */
    double *w = random_input(count, 1.0);
    double *dq = random_input(count, 100.0), *dk = random_input(count, 100.0),
           *dv = random_input(count, 100.0);
    f64->attention_backward(dq, dk, dv, w, q, k, v, out, lse, batch, tokens, heads, head_dim);
    attention_context context = {new_f64(count), new_f64(lse_count), q, k, v, w, batch, tokens, heads,
                                 head_dim};
    double *inputs[3] = {q, k, v}, *gradients[3] = {dq, dk, dv};
    const char *names[3] = {"dq", "dk", "dv"};
    for (int t = 0; t < 3; t++) {
        double *numeric =
            numerical_gradient_every(inputs[t], count, fd_stride, attention_objective, &context);
        snprintf(what, sizeof what, "attention backward b%d t%d h%d d%d: %s vs finite diff", batch, tokens,
                 heads, head_dim, names[t]);
        size_t checked = (count + fd_stride - 1) / fd_stride;
        expect_close_f64(what, every(gradients[t], count, fd_stride), numeric, checked, FD_BOUND);
    }

    /* fp32 against fp64. */
    float *q32 = to_f32(q, count), *k32 = to_f32(k, count), *v32 = to_f32(v, count);
    float *out32 = new_f32(count), *lse32 = new_f32(lse_count);
    f32->attention_forward(out32, lse32, q32, k32, v32, batch, tokens, heads, head_dim);
    snprintf(what, sizeof what, "attention b%d t%d h%d d%d fp32 vs fp64: out", batch, tokens, heads,
             head_dim);
    expect_f32_close(what, out32, out, count, f32_bound);
    snprintf(what, sizeof what, "attention b%d t%d h%d d%d fp32 vs fp64: lse", batch, tokens, heads,
             head_dim);
    expect_f32_close(what, lse32, lse, lse_count, f32_bound);
    float *dq32 = new_f32(count), *dk32 = new_f32(count), *dv32 = new_f32(count);
    f32->attention_backward(dq32, dk32, dv32, to_f32(w, count), q32, k32, v32, out32, lse32, batch, tokens,
                            heads, head_dim);
    float *gradients32[3] = {dq32, dk32, dv32};
    for (int t = 0; t < 3; t++) {
        snprintf(what, sizeof what, "attention b%d t%d h%d d%d fp32 vs fp64: %s", batch, tokens, heads,
                 head_dim, names[t]);
        expect_f32_close(what, gradients32[t], gradients[t], count, f32_bound);
    }
}

static void test_attention(void) {
    printf("attention\n");
    test_attention_case(2, 7, 3, 5, 1, 1.0, F32_BOUND);
    test_attention_case(1, 13, 2, 16, 1, 1.0, F32_BOUND);
    test_attention_case(2, 19, 2, 20, 1, 1.0,
                        F32_BOUND); /* head_dim not a whole vector, several query blocks */
    test_attention_case(3, 50, 3, 32, 13, 1.0, F32_BOUND); /* the CPU demo's shape; finite diff on 1/13 */
    test_attention_case(1, 21, 2, 16, 1, 5.0, 1e-4);       /* sharp rows: exp underflows in fp32 */
    free_all();
}

/* ---- LayerNorm ----------------------------------------------------------------------------- */

static void reference_layernorm(double *out, double *xhat, double *rstd, const double *x,
                                const double *weight, const double *bias, int rows, int dim, double eps) {
    for (int i = 0; i < rows; i++) {
        const double *x_i = x + (size_t)i * dim;
        double mu = 0.0, var = 0.0;
        for (int j = 0; j < dim; j++)
            mu += x_i[j] / dim;
        for (int j = 0; j < dim; j++)
            var += (x_i[j] - mu) * (x_i[j] - mu) / dim;
        rstd[i] = 1.0 / sqrt(var + eps);
        for (int j = 0; j < dim; j++) {
            double y = (x_i[j] - mu) * rstd[i];
            xhat[(size_t)i * dim + j] = y;
            out[(size_t)i * dim + j] = weight ? y * weight[j] + bias[j] : y;
        }
    }
}

typedef struct {
    double *out, *xhat, *rstd, *x, *weight, *bias, *w;
    int rows, dim;
    float eps;
} layernorm_context;

static double layernorm_objective(void *context) {
    layernorm_context *c = context;
    f64->layernorm_forward(c->out, c->xhat, c->rstd, c->x, c->weight, c->bias, c->rows, c->dim, c->eps);
    return dot(c->w, c->out, (size_t)c->rows * c->dim);
}

static void test_layernorm_case(int rows, int dim, bool parametric) {
    char what[96];
    const float eps = 1e-5f;
    size_t count = (size_t)rows * dim;
    const char *kind = parametric ? "parametric" : "plain";
    double *x = random_input(count, 2.0);
    for (size_t i = 0; i < count; i++)
        x[i] += (float)(i % dim) * 0.25f; /* a mean far from 0 */
    double *weight = parametric ? random_input(dim, 1.0) : NULL,
           *bias = parametric ? random_input(dim, 1.0) : NULL;
    double *out = new_f64(count), *xhat = new_f64(count), *rstd = new_f64(rows);
    double *expected = new_f64(count), *expected_xhat = new_f64(count), *expected_rstd = new_f64(rows);
    f64->layernorm_forward(out, xhat, rstd, x, weight, bias, rows, dim, eps);
    reference_layernorm(expected, expected_xhat, expected_rstd, x, weight, bias, rows, dim, eps);
    snprintf(what, sizeof what, "layernorm forward %s %dx%d: out fp64", kind, rows, dim);
    expect_close_f64(what, out, expected, count, F64_BOUND);
    snprintf(what, sizeof what, "layernorm forward %s %dx%d: xhat, rstd fp64", kind, rows, dim);
    expect_close_f64(what, xhat, expected_xhat, count, F64_BOUND);
    expect_close_f64(what, rstd, expected_rstd, rows, F64_BOUND);

    /* xhat is optional: without it, the same out and rstd; without weight, out is xhat. */
    double *out_no_xhat = new_f64(count), *rstd_no_xhat = new_f64(rows);
    f64->layernorm_forward(out_no_xhat, NULL, rstd_no_xhat, x, weight, bias, rows, dim, eps);
    snprintf(what, sizeof what, "layernorm forward %s %dx%d: xhat NULL, same out and rstd", kind, rows, dim);
    expect_equal_f64(what, out_no_xhat, out, count);
    expect_equal_f64(what, rstd_no_xhat, rstd, rows);
    if (!parametric) {
        snprintf(what, sizeof what, "layernorm forward %s %dx%d: out is xhat", kind, rows, dim);
        expect_equal_f64(what, out, xhat, count);
    }

    /* Backward reads xhat as forward gave it. dx is accumulated into, so start from random values
     * and subtract them. */
    double *w = random_input(count, 1.0), *dx0 = random_input(count, 1.0), *dx = copy_f64(dx0, count);
    double *dweight0 = parametric ? random_input(dim, 1.0) : NULL,
           *dbias0 = parametric ? random_input(dim, 1.0) : NULL;
    double *dweight = parametric ? copy_f64(dweight0, dim) : NULL,
           *dbias = parametric ? copy_f64(dbias0, dim) : NULL;
    f64->layernorm_backward(dx, dweight, dbias, w, xhat, rstd, weight, rows, dim);
    for (size_t i = 0; i < count; i++)
        dx[i] -= dx0[i];
    layernorm_context context = {
        new_f64(count), new_f64(count), new_f64(rows), x, weight, bias, w, rows, dim, eps};
    snprintf(what, sizeof what, "layernorm backward %s %dx%d: dx vs finite diff", kind, rows, dim);
    expect_close_f64(what, dx, numerical_gradient(x, count, layernorm_objective, &context), count, FD_BOUND);
    if (parametric) {
        for (int j = 0; j < dim; j++)
            dweight[j] -= dweight0[j], dbias[j] -= dbias0[j];
        snprintf(what, sizeof what, "layernorm backward %s %dx%d: dweight vs finite diff", kind, rows, dim);
        expect_close_f64(what, dweight, numerical_gradient(weight, dim, layernorm_objective, &context), dim,
                         FD_BOUND);
        snprintf(what, sizeof what, "layernorm backward %s %dx%d: dbias vs finite diff", kind, rows, dim);
        expect_close_f64(what, dbias, numerical_gradient(bias, dim, layernorm_objective, &context), dim,
                         FD_BOUND);
    }

    /* Accumulation: two calls from zero give twice one call. */
    double *once = new_f64(count), *twice = new_f64(count);
    double *dweight_once = new_f64(dim), *dweight_twice = new_f64(dim);
    double *dbias_once = new_f64(dim), *dbias_twice = new_f64(dim);
    f64->layernorm_backward(once, parametric ? dweight_once : NULL, parametric ? dbias_once : NULL, w, xhat,
                            rstd, weight, rows, dim);
    for (int call = 0; call < 2; call++)
        f64->layernorm_backward(twice, parametric ? dweight_twice : NULL, parametric ? dbias_twice : NULL, w,
                                xhat, rstd, weight, rows, dim);
    for (size_t i = 0; i < count; i++)
        once[i] *= 2;
    for (int j = 0; j < dim; j++)
        dweight_once[j] *= 2, dbias_once[j] *= 2;
    snprintf(what, sizeof what, "layernorm backward %s %dx%d: two calls accumulate dx", kind, rows, dim);
    expect_close_f64(what, twice, once, count, 1e-15);
    if (parametric) {
        snprintf(what, sizeof what, "layernorm backward %s %dx%d: two calls accumulate dweight, dbias", kind,
                 rows, dim);
        expect_close_f64(what, dweight_twice, dweight_once, dim, 1e-15);
        expect_close_f64(what, dbias_twice, dbias_once, dim, 1e-15);
    }

    /* fp32 against fp64 (forward, and backward from dx = 0). */
    float *x32 = to_f32(x, count), *out32 = new_f32(count), *xhat32 = new_f32(count), *rstd32 = new_f32(rows);
    float *weight32 = parametric ? to_f32(weight, dim) : NULL,
          *bias32 = parametric ? to_f32(bias, dim) : NULL;
    f32->layernorm_forward(out32, xhat32, rstd32, x32, weight32, bias32, rows, dim, eps);
    snprintf(what, sizeof what, "layernorm %s %dx%d fp32 vs fp64: out", kind, rows, dim);
    expect_f32_close(what, out32, out, count, F32_BOUND);
    snprintf(what, sizeof what, "layernorm %s %dx%d fp32 vs fp64: xhat, rstd", kind, rows, dim);
    expect_f32_close(what, xhat32, xhat, count, F32_BOUND);
    expect_f32_close(what, rstd32, rstd, rows, F32_BOUND);
    float *dx32 = new_f32(count), *dweight32 = new_f32(dim), *dbias32 = new_f32(dim);
    f32->layernorm_backward(dx32, parametric ? dweight32 : NULL, parametric ? dbias32 : NULL,
                            to_f32(w, count), xhat32, rstd32, weight32, rows, dim);
    for (size_t i = 0; i < count; i++)
        once[i] /= 2;
    snprintf(what, sizeof what, "layernorm backward %s %dx%d fp32 vs fp64: dx", kind, rows, dim);
    expect_f32_close(what, dx32, once, count, F32_BOUND);
    if (parametric) {
        for (int j = 0; j < dim; j++)
            dweight_once[j] /= 2, dbias_once[j] /= 2;
        snprintf(what, sizeof what, "layernorm backward %s %dx%d fp32 vs fp64: dweight, dbias", kind, rows,
                 dim);
        expect_f32_close(what, dweight32, dweight_once, dim, F32_BOUND);
        expect_f32_close(what, dbias32, dbias_once, dim, F32_BOUND);
    }
}

typedef struct {
    double *residual_out, *ln_out, *rstd, *residual_in, *branch, *scale, *w;
    int rows, dim, rows_per_sample;
    float eps;
} residual_layernorm_context;

static double residual_layernorm_objective(void *context) {
    residual_layernorm_context *c = context;
    f64->residual_layernorm_forward(c->residual_out, c->ln_out, c->rstd, c->residual_in, c->branch, c->scale,
                                    c->rows, c->dim, c->rows_per_sample, c->eps);
    return dot(c->w, c->ln_out, (size_t)c->rows * c->dim);
}

static void test_residual_layernorm(bool with_scale) {
    char what[96];
    const int rows = 12, dim = 21, rows_per_sample = 4;
    const float eps = 1e-6f;
    size_t count = (size_t)rows * dim;
    const char *kind = with_scale ? "drop-path scales" : "no scales";
    double *residual_in = random_input(count, 1.0), *branch = random_input(count, 1.0);
    double scales[3] = {0.0, 1.25, 1.25};
    double *scale = with_scale ? scales : NULL;
    double *residual_out = new_f64(count), *ln_out = new_f64(count), *rstd = new_f64(rows);
    f64->residual_layernorm_forward(residual_out, ln_out, rstd, residual_in, branch, scale, rows, dim,
                                    rows_per_sample, eps);
    double *expected_sum = new_f64(count), *expected_ln = new_f64(count);
    double *expected_xhat = new_f64(count), *expected_rstd = new_f64(rows);
    for (size_t i = 0; i < count; i++)
        expected_sum[i] = residual_in[i] + (scale ? scale[i / dim / rows_per_sample] : 1.0) * branch[i];
    reference_layernorm(expected_ln, expected_xhat, expected_rstd, expected_sum, NULL, NULL, rows, dim, eps);
    snprintf(what, sizeof what, "residual_layernorm forward %s: residual_out fp64", kind);
    expect_close_f64(what, residual_out, expected_sum, count, F64_BOUND);
    snprintf(what, sizeof what, "residual_layernorm forward %s: ln_out, rstd fp64", kind);
    expect_close_f64(what, ln_out, expected_ln, count, F64_BOUND);
    expect_close_f64(what, rstd, expected_rstd, rows, F64_BOUND);

    /* In place on the residual stream. */
    double *stream = copy_f64(residual_in, count), *ln_in_place = new_f64(count);
    f64->residual_layernorm_forward(stream, ln_in_place, new_f64(rows), stream, branch, scale, rows, dim,
                                    rows_per_sample, eps);
    snprintf(what, sizeof what, "residual_layernorm %s: in place (residual_out == residual_in)", kind);
    expect_equal_f64(what, stream, residual_out, count);
    expect_equal_f64(what, ln_in_place, ln_out, count);

    /* The model's backward chain through it (layernorm_backward, then residual_backward for the
     * branch) against finite differences of sum(w * ln_out) with respect to the branch. */
    double *w = random_input(count, 1.0), *dsum = new_f64(count), *dbranch = new_f64(count);
    f64->layernorm_backward(dsum, NULL, NULL, w, ln_out, rstd, NULL, rows, dim);
    f64->residual_backward(dbranch, dsum, scale, rows, dim, rows_per_sample);
    residual_layernorm_context context = {new_f64(count),
                                          new_f64(count),
                                          new_f64(rows),
                                          residual_in,
                                          branch,
                                          scale,
                                          w,
                                          rows,
                                          dim,
                                          rows_per_sample,
                                          eps};
    snprintf(what, sizeof what, "residual_layernorm + backward chain %s: dbranch vs finite diff", kind);
    expect_close_f64(what, dbranch, numerical_gradient(branch, count, residual_layernorm_objective, &context),
                     count, FD_BOUND);

    /* fp32 against fp64. */
    float scales32[3] = {0.0f, 1.25f, 1.25f};
    float *residual_out32 = new_f32(count), *ln_out32 = new_f32(count), *rstd32 = new_f32(rows);
    f32->residual_layernorm_forward(residual_out32, ln_out32, rstd32, to_f32(residual_in, count),
                                    to_f32(branch, count), with_scale ? scales32 : NULL, rows, dim,
                                    rows_per_sample, eps);
    snprintf(what, sizeof what, "residual_layernorm %s fp32 vs fp64: residual_out, ln_out", kind);
    expect_f32_close(what, residual_out32, residual_out, count, F32_BOUND);
    expect_f32_close(what, ln_out32, ln_out, count, F32_BOUND);
    snprintf(what, sizeof what, "residual_layernorm %s fp32 vs fp64: rstd", kind);
    expect_f32_close(what, rstd32, rstd, rows, F32_BOUND);
}

/* center_rows and layernorm_variance (the blocks' inference form) against their definitions;
 * center_rows on the rows as two matrices of different heights in one call. */
static void test_layernorm_statistics(int rows, int dim) {
    size_t count = (size_t)rows * dim;
    double *x = random_input(count, 1.0);
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < dim; j++) x[(size_t)i * dim + j] += (float)(i - rows / 2); /* a mean per row */
    double *centered = new_f64(count), *variance = new_f64(rows);
    double *expected_centered = new_f64(count), *expected_variance = new_f64(rows);
    float eps = 1e-3f;
    for (int i = 0; i < rows; i++) {
        const double *row = x + (size_t)i * dim;
        double mean = 0.0, squares = 0.0;
        for (int j = 0; j < dim; j++) mean += row[j] / dim;
        for (int j = 0; j < dim; j++) {
            expected_centered[(size_t)i * dim + j] = row[j] - mean;
            squares += (row[j] - mean) * (row[j] - mean);
        }
        expected_variance[i] = squares / dim + eps;
    }
    int split = rows / 3, heights[2] = {split, rows - split};
    void *centered_parts[2] = {centered, centered + (size_t)split * dim};
    const void *x_parts[2] = {x, x + (size_t)split * dim};
    f64->center_rows(centered_parts, x_parts, heights, 2, dim);
    expect_close_f64("center_rows fp64", centered, expected_centered, count, F64_BOUND);
    f64->layernorm_variance(variance, x, rows, dim, eps);
    expect_close_f64("layernorm_variance fp64", variance, expected_variance, rows, F64_BOUND);
    float *x32 = to_f32(x, count), *centered32 = new_f32(count), *variance32 = new_f32(rows);
    void *centered32_parts[2] = {centered32, centered32 + (size_t)split * dim};
    const void *x32_parts[2] = {x32, x32 + (size_t)split * dim};
    f32->center_rows(centered32_parts, x32_parts, heights, 2, dim);
    expect_f32_close("center_rows fp32", centered32, expected_centered, count, F32_BOUND);
    f32->layernorm_variance(variance32, x32, rows, dim, eps);
    expect_f32_close("layernorm_variance fp32", variance32, expected_variance, rows, F32_BOUND);
}

static void test_layernorm(void) {
    printf("layernorm\n");
    test_layernorm_statistics(7, 45);
    test_layernorm_case(5, 19, false);
    test_layernorm_case(5, 19, true);
    test_layernorm_case(9, 45, true); /* more than one column block in the parameter gradients */
    test_residual_layernorm(false);
    test_residual_layernorm(true);
    free_all();
}

/* ---- residual ------------------------------------------------------------------------------ */

typedef struct {
    double *out, *residual_in, *branch, *scale, *w;
    int rows, dim, rows_per_sample;
} residual_context;

static double residual_objective(void *context) {
    residual_context *c = context;
    f64->residual_forward(c->out, c->residual_in, c->branch, c->scale, c->rows, c->dim, c->rows_per_sample);
    return dot(c->w, c->out, (size_t)c->rows * c->dim);
}

static void test_residual_case(bool with_scale) {
    char what[96];
    const int rows = 10, dim = 13, rows_per_sample = 5;
    size_t count = (size_t)rows * dim;
    const char *kind = with_scale ? "drop-path scales" : "no scales";
    double scales[2] = {1.0 / 0.7, 0.0};
    double *scale = with_scale ? scales : NULL;
    double *residual_in = random_input(count, 1.0), *branch = random_input(count, 1.0), *out = new_f64(count);
    f64->residual_forward(out, residual_in, branch, scale, rows, dim, rows_per_sample);
    double *expected = new_f64(count);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < dim; j++) {
            size_t i = (size_t)r * dim + j;
            expected[i] = residual_in[i] + (scale ? scale[r / rows_per_sample] : 1.0) * branch[i];
        }
    snprintf(what, sizeof what, "residual forward %s fp64", kind);
    expect_close_f64(what, out, expected, count, F64_BOUND);
    double *stream = copy_f64(residual_in, count);
    f64->residual_forward(stream, stream, branch, scale, rows, dim, rows_per_sample);
    snprintf(what, sizeof what, "residual forward %s: in place", kind);
    expect_equal_f64(what, stream, out, count);

    double *w = random_input(count, 1.0), *dbranch = new_f64(count);
    f64->residual_backward(dbranch, w, scale, rows, dim, rows_per_sample);
    residual_context context = {new_f64(count), residual_in, branch, scale, w, rows, dim, rows_per_sample};
    snprintf(what, sizeof what, "residual backward %s: dbranch vs finite diff", kind);
    expect_close_f64(what, dbranch, numerical_gradient(branch, count, residual_objective, &context), count,
                     FD_BOUND);
    double *in_place = copy_f64(w, count);
    f64->residual_backward(in_place, in_place, scale, rows, dim, rows_per_sample);
    snprintf(what, sizeof what, "residual backward %s: in place", kind);
    expect_equal_f64(what, in_place, dbranch, count);

    float scales32[2] = {(float)(1.0 / 0.7), 0.0f};
    float *out32 = new_f32(count), *dbranch32 = new_f32(count);
    f32->residual_forward(out32, to_f32(residual_in, count), to_f32(branch, count),
                          with_scale ? scales32 : NULL, rows, dim, rows_per_sample);
    f32->residual_backward(dbranch32, to_f32(w, count), with_scale ? scales32 : NULL, rows, dim,
                           rows_per_sample);
    snprintf(what, sizeof what, "residual %s fp32 vs fp64: out, dbranch", kind);
    expect_f32_close(what, out32, out, count, F32_BOUND);
    expect_f32_close(what, dbranch32, dbranch, count, F32_BOUND);
}

static void test_residual(void) {
    printf("residual\n");
    test_residual_case(false);
    test_residual_case(true);
    free_all();
}

/* ---- patch embedding and tokens ------------------------------------------------------------ */

static void test_patch_im2col(void) {
    const int batch = 2, channels = 3, size = 12, patch = 4, dim = 5, grid = size / patch;
    const int patch_size = channels * patch * patch, patches = grid * grid;
    size_t image_count = (size_t)batch * channels * size * size,
           patch_count = (size_t)batch * patches * patch_size;
    double *images = random_input(image_count, 1.0), *columns = new_f64(patch_count);
    f64->patch_im2col(columns, images, batch, channels, size, patch);
    /* The reason it exists: columns times the conv weight [dim, channels, patch, patch] seen as
     * [dim, patch_size] is the stride-patch convolution, computed here directly. */
    double *weight = random_input((size_t)dim * patch_size, 1.0);
    double *via_columns = new_f64((size_t)batch * patches * dim),
           *direct = new_f64((size_t)batch * patches * dim);
    tf_matmul_desc desc = {.m = batch * patches, .n = dim, .k = patch_size, .transpose_b = true};
    f64->matmul(via_columns, columns, weight, &desc);
    for (int b = 0; b < batch; b++)
        for (int gy = 0; gy < grid; gy++)
            for (int gx = 0; gx < grid; gx++)
                for (int o = 0; o < dim; o++) {
                    double sum = 0.0;
                    for (int c = 0; c < channels; c++)
                        for (int y = 0; y < patch; y++)
                            for (int x = 0; x < patch; x++)
                                sum += weight[(((size_t)o * channels + c) * patch + y) * patch + x] *
                                       images[(((size_t)b * channels + c) * size + gy * patch + y) * size +
                                              gx * patch + x];
                    direct[(((size_t)b * grid + gy) * grid + gx) * dim + o] = sum;
                }
    expect_close_f64("patch_im2col + matmul vs direct convolution fp64", via_columns, direct,
                     (size_t)batch * patches * dim, F64_BOUND);
    float *columns32 = new_f32(patch_count);
    f32->patch_im2col(columns32, to_f32(images, image_count), batch, channels, size, patch);
    expect_equal_f64("patch_im2col fp32 equals fp64 (a copy)", to_f64(columns32, patch_count), columns,
                     patch_count);
}

typedef struct {
    double *x, *patch_tokens, *cls, *pos, *w;
    int batch, patches, dim;
} tokens_context;

static double tokens_objective(void *context) {
    tokens_context *c = context;
    f64->tokens_forward(c->x, TF_DTYPE_F64, c->patch_tokens, c->cls, c->pos, c->batch, c->patches, c->dim);
    return dot(c->w, c->x, (size_t)c->batch * (c->patches + 1) * c->dim);
}

static void test_tokens(void) {
    const int batch = 3, patches = 7, dim = 11, tokens = patches + 1;
    size_t patch_count = (size_t)batch * patches * dim, x_count = (size_t)batch * tokens * dim;
    double *patch_tokens = random_input(patch_count, 1.0), *cls = random_input(dim, 1.0);
    double *pos = random_input((size_t)tokens * dim, 1.0), *x = new_f64(x_count),
           *expected = new_f64(x_count);
    f64->tokens_forward(x, TF_DTYPE_F64, patch_tokens, cls, pos, batch, patches, dim);
    for (int b = 0; b < batch; b++)
        for (int t = 0; t < tokens; t++)
            for (int j = 0; j < dim; j++)
                expected[((size_t)b * tokens + t) * dim + j] =
                    pos[(size_t)t * dim + j] +
                    (t == 0 ? cls[j] : patch_tokens[((size_t)b * patches + t - 1) * dim + j]);
    expect_close_f64("tokens_forward fp64", x, expected, x_count, F64_BOUND);

    /* Backward: dpatch_tokens overwritten (starts as garbage), dcls and dpos accumulated. */
    double *w = random_input(x_count, 1.0), *dpatch = random_input(patch_count, 100.0);
    double *dcls0 = random_input(dim, 1.0), *dpos0 = random_input((size_t)tokens * dim, 1.0);
    double *dcls = copy_f64(dcls0, dim), *dpos = copy_f64(dpos0, (size_t)tokens * dim);
    f64->tokens_backward(dpatch, dcls, dpos, w, batch, patches, dim);
    for (int j = 0; j < dim; j++)
        dcls[j] -= dcls0[j];
    for (int i = 0; i < tokens * dim; i++)
        dpos[i] -= dpos0[i];
    tokens_context context = {new_f64(x_count), patch_tokens, cls, pos, w, batch, patches, dim};
    expect_close_f64("tokens_backward: dpatch_tokens vs finite diff", dpatch,
                     numerical_gradient(patch_tokens, patch_count, tokens_objective, &context), patch_count,
                     FD_BOUND);
    expect_close_f64("tokens_backward: dcls vs finite diff (accumulated)", dcls,
                     numerical_gradient(cls, dim, tokens_objective, &context), dim, FD_BOUND);
    expect_close_f64("tokens_backward: dpos vs finite diff (accumulated)", dpos,
                     numerical_gradient(pos, (size_t)tokens * dim, tokens_objective, &context),
                     (size_t)tokens * dim, FD_BOUND);
    double *dcls_twice = new_f64(dim), *dpos_twice = new_f64((size_t)tokens * dim);
    for (int call = 0; call < 2; call++)
        f64->tokens_backward(dpatch, dcls_twice, dpos_twice, w, batch, patches, dim);
    for (int j = 0; j < dim; j++)
        dcls[j] *= 2;
    for (int i = 0; i < tokens * dim; i++)
        dpos[i] *= 2;
    expect_close_f64("tokens_backward: two calls accumulate dcls", dcls_twice, dcls, dim, 1e-14);
    expect_close_f64("tokens_backward: two calls accumulate dpos", dpos_twice, dpos, (size_t)tokens * dim,
                     1e-14);

    float *x32 = new_f32(x_count), *dpatch32 = new_f32(patch_count), *dcls32 = new_f32(dim);
    float *dpos32 = new_f32((size_t)tokens * dim);
    f32->tokens_forward(x32, TF_DTYPE_F32, to_f32(patch_tokens, patch_count), to_f32(cls, dim),
                        to_f32(pos, (size_t)tokens * dim), batch, patches, dim);
    f32->tokens_backward(dpatch32, dcls32, dpos32, to_f32(w, x_count), batch, patches, dim);
    for (int j = 0; j < dim; j++)
        dcls[j] /= 2;
    for (int i = 0; i < tokens * dim; i++)
        dpos[i] /= 2;
    expect_f32_close("tokens fp32 vs fp64: x", x32, x, x_count, F32_BOUND);
    expect_f32_close("tokens fp32 vs fp64: dpatch_tokens, dcls, dpos", dpatch32, dpatch, patch_count,
                     F32_BOUND);
    expect_f32_close("tokens fp32 vs fp64: dpatch_tokens, dcls, dpos", dcls32, dcls, dim, F32_BOUND);
    expect_f32_close("tokens fp32 vs fp64: dpatch_tokens, dcls, dpos", dpos32, dpos, (size_t)tokens * dim,
                     F32_BOUND);
}

static void test_patch_embed(void) {
    printf("patch_embed\n");
    test_patch_im2col();
    test_tokens();
    free_all();
}

/* ---- head ---------------------------------------------------------------------------------- */

typedef struct {
    double *out, *x, *w;
    int batch, tokens, dim;
    tf_pool pool;
} pool_context;

static double pool_objective(void *context) {
    pool_context *c = context;
    f64->token_pool_forward(c->out, c->x, TF_DTYPE_F64, c->batch, c->tokens, c->dim, c->pool);
    return dot(c->w, c->out, (size_t)c->batch * c->dim);
}

static void test_token_pool(tf_pool pool) {
    char what[96];
    const int batch = 3, tokens = 9, dim = 7;
    const char *kind = pool == TF_POOL_AVG ? "avg" : "cls";
    size_t x_count = (size_t)batch * tokens * dim, out_count = (size_t)batch * dim;
    double *x = random_input(x_count, 1.0), *out = new_f64(out_count), *expected = new_f64(out_count);
    f64->token_pool_forward(out, x, TF_DTYPE_F64, batch, tokens, dim, pool);
    for (int b = 0; b < batch; b++)
        for (int j = 0; j < dim; j++) {
            double value = 0.0;
            if (pool == TF_POOL_CLS)
                value = x[(size_t)b * tokens * dim + j];
            else
                for (int t = 1; t < tokens; t++)
                    value += x[((size_t)b * tokens + t) * dim + j] / (tokens - 1);
            expected[(size_t)b * dim + j] = value;
        }
    snprintf(what, sizeof what, "token_pool forward %s fp64", kind);
    expect_close_f64(what, out, expected, out_count, F64_BOUND);

    double *w = random_input(out_count, 1.0), *dx = random_input(x_count, 100.0); /* garbage: overwritten */
    f64->token_pool_backward(dx, w, batch, tokens, dim, pool);
    pool_context context = {new_f64(out_count), x, w, batch, tokens, dim, pool};
    snprintf(what, sizeof what, "token_pool backward %s: dx vs finite diff", kind);
    expect_close_f64(what, dx, numerical_gradient(x, x_count, pool_objective, &context), x_count, FD_BOUND);

    float *out32 = new_f32(out_count), *dx32 = to_f32(random_input(x_count, 100.0), x_count);
    f32->token_pool_forward(out32, to_f32(x, x_count), TF_DTYPE_F32, batch, tokens, dim, pool);
    f32->token_pool_backward(dx32, to_f32(w, out_count), batch, tokens, dim, pool);
    snprintf(what, sizeof what, "token_pool %s fp32 vs fp64: out, dx", kind);
    expect_f32_close(what, out32, out, out_count, F32_BOUND);
    expect_f32_close(what, dx32, dx, x_count, F32_BOUND);
}

static void test_bias_backward(int rows, int dim) {
    char what[96];
    size_t count = (size_t)rows * dim;
    double *dout = random_input(count, 1.0), *dbias0 = random_input(dim, 1.0), *dbias = copy_f64(dbias0, dim);
    double *expected = copy_f64(dbias0, dim);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < dim; j++)
            expected[j] += dout[(size_t)r * dim + j];
    f64->bias_backward(dbias, dout, rows, dim);
    snprintf(what, sizeof what, "bias_backward %dx%d fp64 (accumulated onto random)", rows, dim);
    expect_close_f64(what, dbias, expected, dim, F64_BOUND);
    for (int j = 0; j < dim; j++)
        expected[j] = 2 * (expected[j] - dbias0[j]);
    double *twice = new_f64(dim);
    for (int call = 0; call < 2; call++)
        f64->bias_backward(twice, dout, rows, dim);
    snprintf(what, sizeof what, "bias_backward %dx%d: two calls accumulate", rows, dim);
    expect_close_f64(what, twice, expected, dim, F64_BOUND);
    float *dbias32 = new_f32(dim);
    f32->bias_backward(dbias32, to_f32(dout, count), rows, dim);
    for (int j = 0; j < dim; j++)
        expected[j] /= 2;
    snprintf(what, sizeof what, "bias_backward %dx%d fp32 vs fp64", rows, dim);
    expect_f32_close(what, dbias32, expected, dim, F32_BOUND);
}

static void test_head(void) {
    printf("head\n");
    test_token_pool(TF_POOL_AVG);
    test_token_pool(TF_POOL_CLS);
    test_bias_backward(37, 45);
    test_bias_backward(500, 10);
    free_all();
}

/* ---- cross entropy ------------------------------------------------------------------------- */

typedef struct {
    double *loss, *logits, *target;
    int batch, classes;
    float dloss_scale;
} cross_entropy_context;

static double cross_entropy_objective(void *context) {
    cross_entropy_context *c = context;
    f64->cross_entropy_forward_backward(c->loss, NULL, c->logits, c->target, c->batch, c->classes,
                                        c->dloss_scale);
    double sum = 0.0;
    for (int b = 0; b < c->batch; b++)
        sum += c->loss[b];
    return c->dloss_scale * sum;
}

/* Soft targets that sum to 1 per row, as smoothed and mixed one-hot targets do. */
static double *random_targets(int batch, int classes) {
    double *target = new_f64((size_t)batch * classes);
    for (int b = 0; b < batch; b++) {
        double sum = 0.0;
        for (int c = 0; c < classes; c++)
            sum += target[(size_t)b * classes + c] = 0.05 + tf_rng_uniform(&rng);
        for (int c = 0; c < classes; c++)
            target[(size_t)b * classes + c] = (float)(target[(size_t)b * classes + c] / sum);
    }
    return target;
}

static void test_cross_entropy_case(double logit_std, const char *label) {
    char what[96];
    const int batch = 4, classes = 11;
    const float dloss_scale = 0.25f;
    size_t count = (size_t)batch * classes;
    double *logits = random_input(count, logit_std), *target = random_targets(batch, classes);
    double *loss = new_f64(batch), *dlogits = random_input(count, 100.0), *expected = new_f64(batch);
    f64->cross_entropy_forward_backward(loss, dlogits, logits, target, batch, classes, dloss_scale);
    for (int b = 0; b < batch; b++) {
        const double *l = logits + (size_t)b * classes;
        double max = l[0], sum = 0.0, value = 0.0;
        for (int c = 1; c < classes; c++)
            max = fmax(max, l[c]);
        for (int c = 0; c < classes; c++)
            sum += exp(l[c] - max);
        for (int c = 0; c < classes; c++)
            value -= target[(size_t)b * classes + c] * (l[c] - max - log(sum));
        expected[b] = value;
    }
    snprintf(what, sizeof what, "cross_entropy %s: loss fp64", label);
    expect_close_f64(what, loss, expected, batch, F64_BOUND);
    cross_entropy_context context = {new_f64(batch), logits, target, batch, classes, dloss_scale};
    snprintf(what, sizeof what, "cross_entropy %s: dlogits vs finite diff", label);
    expect_close_f64(what, dlogits, numerical_gradient(logits, count, cross_entropy_objective, &context),
                     count, FD_BOUND);

    double *loss_only = new_f64(batch);
    f64->cross_entropy_forward_backward(loss_only, NULL, logits, target, batch, classes, dloss_scale);
    snprintf(what, sizeof what, "cross_entropy %s: dlogits NULL, loss", label);
    expect_equal_f64(what, loss_only, loss, batch);

    float *loss32 = new_f32(batch), *logits32 = to_f32(logits, count);
    f32->cross_entropy_forward_backward(loss32, logits32, logits32, to_f32(target, count), batch, classes,
                                        dloss_scale);
    snprintf(what, sizeof what, "cross_entropy %s fp32 vs fp64: loss, dlogits (in place)", label);
    expect_f32_close(what, loss32, loss, batch, F32_BOUND);
    expect_f32_close(what, logits32, dlogits, count, F32_BOUND);
}

static void test_cross_entropy(void) {
    printf("cross_entropy\n");
    test_cross_entropy_case(2.0, "logits N(0,4)");
    test_cross_entropy_case(300.0, "logits N(0,300^2)"); /* exp would overflow without the max */
    free_all();
}

/* ---- optimizer ----------------------------------------------------------------------------- */

static void test_adamw(bool separate_compute) {
    const int n = 40, steps = 2;
    const tf_adamw_group groups[2] = {{.offset = 0, .count = 15, .lr_scale = 1.0f, .weight_decay = 0.05f},
                                      {.offset = 20, .count = 17, .lr_scale = 0.5f, .weight_decay = 0.0f}};
    tf_adamw_hyper hyper = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .grad_scale = 0.5f};
    double *p0 = random_input(n, 1.0), *m0 = random_input(n, 0.1), *v0 = random_input(n, 0.1);
    for (int i = 0; i < n; i++)
        v0[i] = (float)(v0[i] * v0[i]); /* second moments are >= 0 */
    double *grads[2] = {random_input(n, 1.0), random_input(n, 1.0)};

    /* The reference, straight from the formulas of tf_adamw_hyper, in double. */
    double *p = copy_f64(p0, n), *m = copy_f64(m0, n), *v = copy_f64(v0, n);
    for (int step = 1; step <= steps; step++)
        for (int g = 0; g < 2; g++)
            for (size_t i = groups[g].offset; i < groups[g].offset + groups[g].count; i++) {
                double lr = (double)hyper.lr * groups[g].lr_scale,
                       grad = grads[step - 1][i] * hyper.grad_scale;
                p[i] *= 1.0 - lr * groups[g].weight_decay;
                m[i] = hyper.beta1 * m[i] + (1.0 - hyper.beta1) * grad;
                v[i] = hyper.beta2 * v[i] + (1.0 - hyper.beta2) * grad * grad;
                p[i] -= lr / (1.0 - pow(hyper.beta1, step)) * m[i] /
                        (sqrt(v[i] / (1.0 - pow(hyper.beta2, step))) + hyper.eps);
            }

    double *p64 = copy_f64(p0, n), *m64 = copy_f64(m0, n), *v64 = copy_f64(v0, n);
    double *compute64 = separate_compute ? new_f64(n) : NULL;
    float *p32 = to_f32(p0, n), *m32 = to_f32(m0, n), *v32 = to_f32(v0, n);
    float *compute32 = separate_compute ? new_f32(n) : NULL;
    for (int step = 1; step <= steps; step++) {
        hyper.step = step;
        f64->adamw_update(p64, compute64, grads[step - 1], m64, v64, groups, 2, &hyper);
        f32->adamw_update(p32, compute32, to_f32(grads[step - 1], n), m32, v32, groups, 2, &hyper);
    }
    const char *kind = separate_compute ? "compute copy" : "compute NULL";
    char what[96];
    /* Compare the parameter change, which is what the update computes (p itself is mostly p0). */
    double *change = new_f64(n), *expected_change = new_f64(n), *change32 = new_f64(n);
    for (int i = 0; i < n; i++) {
        change[i] = p64[i] - p0[i];
        expected_change[i] = p[i] - p0[i];
        change32[i] = (double)p32[i] - p0[i];
    }
    snprintf(what, sizeof what, "adamw %s: two steps, parameter change fp64", kind);
    expect_close_f64(what, change, expected_change, n,
                     1e-9); /* beta^step etc. differ in rounding order only */
    snprintf(what, sizeof what, "adamw %s: two steps, m and v fp64", kind);
    expect_close_f64(what, m64, m, n, 1e-12);
    expect_close_f64(what, v64, v, n, 1e-12);
    snprintf(what, sizeof what, "adamw %s: two steps, parameter change fp32", kind);
    expect_close_f64(what, change32, expected_change, n, 2e-5);
    snprintf(what, sizeof what, "adamw %s: two steps, m and v fp32", kind);
    expect_f32_close(what, m32, m, n, F32_BOUND);
    expect_f32_close(what, v32, v, n, F32_BOUND);
    /* Elements outside every group are untouched. */
    size_t touched = 0;
    for (int i = 0; i < n; i++)
        if ((i >= 15 && i < 20) || i >= 37) touched += p64[i] != p0[i] || m64[i] != m0[i] || v64[i] != v0[i];
    snprintf(what, sizeof what, "adamw %s: elements outside the groups", kind);
    printf("  %-58s %9zu changed\n", what, touched);
    CHECK(touched == 0, "%zu elements outside the groups changed", touched);
    if (separate_compute) {
        size_t differing = 0;
        for (int g = 0; g < 2; g++)
            for (size_t i = groups[g].offset; i < groups[g].offset + groups[g].count; i++)
                differing += compute64[i] != p64[i] || compute32[i] != p32[i];
        printf("  %-58s %9zu differ\n", "adamw: compute copy equals master in the groups", differing);
        CHECK(differing == 0, "compute copy differs in %zu elements", differing);
    }
}

static void test_ema_and_sum_squares(void) {
    const size_t n = 1237;
    const float decay = 0.999f;
    double *ema0 = random_input(n, 1.0), *master = random_input(n, 1.0), *ema = copy_f64(ema0, n);
    double *expected = new_f64(n);
    for (size_t i = 0; i < n; i++)
        expected[i] = (double)decay * ema0[i] + (1.0 - (double)decay) * master[i];
    f64->ema_update(ema, master, n, decay);
    expect_close_f64("ema_update fp64", ema, expected, n, F64_BOUND);
    float *ema32 = to_f32(ema0, n);
    f32->ema_update(ema32, to_f32(master, n), n, decay);
    expect_f32_close("ema_update fp32 vs fp64", ema32, ema, n, F32_BOUND);

    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += master[i] * master[i];
    double sum64 = f64->sum_squares(master, n), sum32 = f32->sum_squares(to_f32(master, n), n);
    expect_below("sum_squares fp64 relative error", fabs(sum64 - sum) / sum, F64_BOUND);
    expect_below("sum_squares fp32 relative error (accumulated in double)", fabs(sum32 - sum) / sum, 1e-13);
}

static void test_optimizer(void) {
    printf("optimizer\n");
    test_adamw(false);
    test_adamw(true);
    test_ema_and_sum_squares();
    free_all();
}

/* ---- images -------------------------------------------------------------------------------- */

static void test_images_normalize(void) {
    const int batch = 3, channels = 3, size = 10;
    const size_t count = (size_t)batch * channels * size * size;
    const float mean[3] = {0.485f, 0.456f, 0.406f}, std[3] = {0.229f, 0.224f, 0.225f};
    uint8_t *pixels = test_alloc(count);
    for (size_t i = 0; i < count; i++)
        pixels[i] = (uint8_t)tf_rng_below(&rng, 256);
    pixels[0] = 0, pixels[1] = 255;
    double *images = new_f64(count), *expected = new_f64(count);
    float *images32 = new_f32(count);
    f64->images_normalize(images, pixels, batch, channels, size, mean, std);
    f32->images_normalize(images32, pixels, batch, channels, size, mean, std);
    for (size_t i = 0; i < count; i++) {
        int c = (int)(i / ((size_t)size * size) % channels);
        expected[i] = (pixels[i] / 255.0 - mean[c]) / std[c];
    }
    expect_close_f64("images_normalize fp64", images, expected, count, F64_BOUND);
    expect_f32_close("images_normalize fp32", images32, expected, count, 1e-6);
}

static void test_mixup_cutmix(int batch) {
    char what[96];
    const int channels = 3, size = 9;
    const size_t sample = (size_t)channels * size * size, count = batch * sample;
    const float lambda = 0.7f;
    const int y0 = 2, y1 = 7, x0 = 1, x1 = 5;
    double *images = random_input(count, 1.0);

    double *mixed = copy_f64(images, count), *expected = new_f64(count);
    f64->mixup_images(mixed, batch, sample, lambda);
    for (int b = 0; b < batch; b++)
        for (size_t i = 0; i < sample; i++)
            expected[b * sample + i] = (double)lambda * images[b * sample + i] +
                                       (1.0 - (double)lambda) * images[(batch - 1 - b) * sample + i];
    snprintf(what, sizeof what, "mixup_images batch %d fp64", batch);
    expect_close_f64(what, mixed, expected, count, F64_BOUND);
    float *mixed32 = to_f32(images, count);
    f32->mixup_images(mixed32, batch, sample, lambda);
    snprintf(what, sizeof what, "mixup_images batch %d fp32", batch);
    expect_f32_close(what, mixed32, expected, count, 1e-6);

    double *cut = copy_f64(images, count);
    f64->cutmix_images(cut, batch, channels, size, y0, y1, x0, x1);
    for (int b = 0; b < batch; b++)
        for (int c = 0; c < channels; c++)
            for (int y = 0; y < size; y++)
                for (int x = 0; x < size; x++) {
                    size_t within = ((size_t)c * size + y) * size + x;
                    bool in_box = y >= y0 && y < y1 && x >= x0 && x < x1;
                    expected[b * sample + within] = images[(in_box ? batch - 1 - b : b) * sample + within];
                }
    snprintf(what, sizeof what, "cutmix_images batch %d fp64", batch);
    expect_equal_f64(what, cut, expected, count);
    float *cut32 = to_f32(images, count);
    f32->cutmix_images(cut32, batch, channels, size, y0, y1, x0, x1);
    snprintf(what, sizeof what, "cutmix_images batch %d fp32", batch);
    expect_equal_f64(what, to_f64(cut32, count), expected, count);
}

static void test_images(void) {
    printf("images\n");
    test_images_normalize();
    test_mixup_cutmix(4);
    test_mixup_cutmix(5); /* odd: the middle sample is its own partner */
    free_all();
}

int main(void) {
    f32 = tf_cpu_backend(TF_DTYPE_F32);
    f64 = tf_cpu_backend(TF_DTYPE_F64);
    tf_cpu_backend_set_threads(2);
    rng = tf_rng_make(20240611, TF_RNG_TEST, 0, 0);
    test_backend_tables();
    test_matmul();
    test_pattention_norm();
    test_attention();
    test_layernorm();
    test_residual();
    test_patch_embed();
    test_head();
    test_cross_entropy();
    test_optimizer();
    test_images();
    return test_finish("test_kernels_cpu");
}
