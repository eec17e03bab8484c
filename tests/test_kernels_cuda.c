/* Tests of the CUDA backend (kernels/cuda/) against the CPU backend in fp32.
 *
 * For every operation: random inputs made on the host (uniform, never all zeros), rounded to bf16 where
 * the CUDA buffer is a compute (bf16) buffer so that both backends see identical values, run on
 * both backends, downloaded and compared by relative error ||cuda - cpu|| / ||cpu||: at most
 * 1e-2 for bf16 paths, 1e-5 for the pure fp32 ones (AdamW and EMA on fp32 masters, sum of
 * squares). Outputs are poisoned (NaN bytes) before every run, so an element the CUDA kernel
 * forgets to write fails the comparison. Shapes: small and odd ones, the demo ones (50 and 17
 * tokens, 3 heads of 32) and the B/16 ones (256 x 197 rows, width 768, 768 and 3072 parameter
 * tokens, 12 heads of 64). Attention is tested with cuDNN and with our own kernels.
 *
 * One line per operation: its shape, the largest relative error over its outputs (and which
 * output), PASS or FAIL; a failure adds one line per failing output with the element of the
 * largest difference. Kernels run in debug-sync mode, so a fault is reported by the operation
 * that caused it. Without a GPU the test prints one SKIP line and exits 77.
 *
 * Usage: test_kernels_cuda [--small]   (--small leaves out the B/16 shapes) */
#include "common/tuning_record.h"
#include "kernels/kernels.h"
#include "tests/test_util.h"

#include <dirent.h>

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef TOKENFORMER_CUDA
#include "kernels/cuda/cuda_backend.cuh"

static const tf_backend *cpu, *gpu;
static tf_rng rng;
static bool small_only;

static const double BF16_LIMIT = 1e-2, F32_LIMIT = 1e-5;

/* ---- host helpers ---- */
static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "test_kernels_cuda: out of host memory (%zu bytes)\n", bytes);
        abort();
    }
    return p;
}

/* fp32 -> bf16 -> fp32, round to nearest even (what the CUDA backend stores). */
static float round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* ---- a buffer on both backends ---- */
typedef struct {
    const char *name;
    size_t n;
    bool compute; /* bf16 on the GPU; fp32 (master) otherwise */
    float *host;  /* the values both backends were given */
    void *cpu, *gpu;
} pair;

static pair pair_new(const char *name, size_t n, bool compute) {
    pair p = {name, n, compute, xmalloc(n * sizeof(float)), NULL, NULL};
    memset(p.host, 0, n * sizeof(float));
    if (!CHECK_OK(cpu->alloc(&p.cpu, n * sizeof(float), name)) ||
        !CHECK_OK(gpu->alloc(&p.gpu, n * tf_dtype_size(compute ? TF_DTYPE_BF16 : TF_DTYPE_F32), name))) {
        fprintf(stderr, "cannot allocate %s (%zu elements)\n", name, n);
        exit(1);
    }
    return p;
}

static void pair_free(pair *p) {
    free(p->host);
    cpu->free(p->cpu);
    gpu->free(p->gpu);
    memset(p, 0, sizeof *p);
}

static tf_dtype gpu_dtype(const pair *p) {
    return p->compute ? TF_DTYPE_BF16 : TF_DTYPE_F32;
}

/* Gives both backends p->host (rounded to bf16 first for a compute buffer). */
static void pair_upload(pair *p) {
    if (p->compute)
        for (size_t i = 0; i < p->n; i++) p->host[i] = round_bf16(p->host[i]);
    cpu->upload(p->cpu, TF_DTYPE_F32, p->host, p->n);
    gpu->upload(p->gpu, gpu_dtype(p), p->host, p->n);
}

/* Uniform values of standard deviation std (a uniform on [-a, a] has std a / sqrt(3)): cheap
 * enough for the 155-million-element buffers of the B/16 shapes, and never all zero. */
static void fill_random(float *x, size_t n, float std) {
    const float half_width = std * 1.7320508f, unit = 1.0f / 2147483648.0f;
    for (size_t i = 0; i < n; i += 2) {
        uint64_t bits = tf_rng_u64(&rng);
        x[i] = half_width * ((float)(int32_t)(uint32_t)bits * unit);
        if (i + 1 < n) x[i + 1] = half_width * ((float)(int32_t)(uint32_t)(bits >> 32) * unit);
    }
}

static void pair_random(pair *p, float std) {
    fill_random(p->host, p->n, std);
    pair_upload(p);
}

static void pair_uniform(pair *p, float low, float high) {
    for (size_t i = 0; i < p->n; i++) p->host[i] = low + (high - low) * (float)tf_rng_uniform(&rng);
    pair_upload(p);
}

/* NaN in every element on both sides: what is not written stays NaN. */
static void pair_poison(pair *p) {
    for (size_t i = 0; i < p->n; i++) p->host[i] = NAN;
    cpu->upload(p->cpu, TF_DTYPE_F32, p->host, p->n);
    tf_cuda_fill_bytes(p->gpu, 0xff, p->n * tf_dtype_size(gpu_dtype(p)));
}

/* ---- one line per operation ---- */
typedef struct {
    char label[200];
    double worst;
    char worst_name[48];
    bool failed;
    char details[2048];
} op_check;

static void op_begin(op_check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void op_begin(op_check *c, const char *fmt, ...) {
    memset(c, 0, sizeof *c);
    va_list args;
    va_start(args, fmt);
    vsnprintf(c->label, sizeof c->label, fmt, args);
    va_end(args);
}

static void op_note(op_check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void op_note(op_check *c, const char *fmt, ...) {
    size_t used = strlen(c->details);
    va_list args;
    va_start(args, fmt);
    vsnprintf(c->details + used, sizeof c->details - used, fmt, args);
    va_end(args);
}

/* Adds one output's comparison (CUDA against CPU) to the operation's line. */
static void op_compare_arrays(op_check *c, const char *name, const float *got, const float *want, size_t n,
                              double limit) {
    double error = relative_error_f32(got, want, n);
    size_t worst_index = 0, nonfinite = 0;
    double worst_difference = -1.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) nonfinite++;
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= worst_difference)) { /* NaN counts as the largest */
            worst_difference = isnan(d) ? INFINITY : d;
            worst_index = i;
        }
    }
    if (!(error <= c->worst) || c->worst_name[0] == '\0') {
        c->worst = error;
        snprintf(c->worst_name, sizeof c->worst_name, "%s", name);
    }
    if (!(error <= limit) || nonfinite) {
        c->failed = true;
        op_note(c, "    FAIL %s: rel err %.3e > %.0e; %zu non-finite of %zu; largest difference at element %zu: "
                   "cuda %.6g cpu %.6g\n",
                name, error, limit, nonfinite, n, worst_index, (double)got[worst_index], (double)want[worst_index]);
    }
}

static void op_compare(op_check *c, const pair *p, double limit) {
    float *got = xmalloc(p->n * sizeof(float)), *want = xmalloc(p->n * sizeof(float));
    gpu->download(got, p->gpu, gpu_dtype(p), p->n);
    cpu->download(want, p->cpu, TF_DTYPE_F32, p->n);
    op_compare_arrays(c, p->name, got, want, p->n, limit);
    free(got);
    free(want);
}

static void op_fail(op_check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void op_fail(op_check *c, const char *fmt, ...) {
    c->failed = true;
    char line[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    op_note(c, "    FAIL %s\n", line);
}

static void op_end(op_check *c) {
    tf_status status = gpu->synchronize();
    if (status != TF_OK) {
        op_fail(c, "synchronize: %s", tf_error_message());
        tf_cuda_reset_failure(); /* judge the next operation on its own */
    }
    printf("%-78s max rel err %.2e (%s)  %s\n", c->label, c->worst, c->worst_name[0] ? c->worst_name : "-",
           c->failed ? "FAIL" : "PASS");
    if (c->failed) printf("%s", c->details);
    fflush(stdout);
    CHECK(!c->failed, "%s", c->label);
}

/* ---- memory ---- */
static void test_memory(void) {
    op_check c;
    size_t n = 100003;
    op_begin(&c, "memory: upload/download/copy/convert/zero n=%zu", n);
    float *values = xmalloc(n * sizeof(float)), *back = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) values[i] = round_bf16((float)tf_rng_normal(&rng) * 3.0f);
    void *b16 = NULL, *b16_copy = NULL, *f32 = NULL, *f32_back = NULL;
    CHECK_OK(gpu->alloc(&b16, n * 2, "bf16"));
    CHECK_OK(gpu->alloc(&b16_copy, n * 2, "bf16 copy"));
    CHECK_OK(gpu->alloc(&f32, n * 4, "f32"));
    CHECK_OK(gpu->alloc(&f32_back, n * 4, "f32 back"));
    /* alloc zero-fills */
    gpu->download(back, f32, TF_DTYPE_F32, n);
    size_t nonzero = 0;
    for (size_t i = 0; i < n; i++) nonzero += back[i] != 0.0f;
    if (nonzero) op_fail(&c, "alloc: %zu elements not zero", nonzero);
    /* bf16-representable values survive every round trip exactly */
    gpu->upload(b16, TF_DTYPE_BF16, values, n);
    gpu->copy(b16_copy, b16, n * 2);
    gpu->convert(f32, TF_DTYPE_F32, b16_copy, TF_DTYPE_BF16, n);
    gpu->download(back, f32, TF_DTYPE_F32, n);
    op_compare_arrays(&c, "bf16->f32", back, values, n, 0.0);
    gpu->convert(b16, TF_DTYPE_BF16, f32, TF_DTYPE_F32, n);
    gpu->download(back, b16, TF_DTYPE_BF16, n);
    op_compare_arrays(&c, "f32->bf16", back, values, n, 0.0);
    /* fp32 -> bf16 rounds to nearest even like round_bf16 */
    for (size_t i = 0; i < n; i++) values[i] = (float)tf_rng_normal(&rng);
    gpu->upload(f32, TF_DTYPE_F32, values, n);
    gpu->download(back, f32, TF_DTYPE_F32, n);
    op_compare_arrays(&c, "f32 upload", back, values, n, 0.0);
    gpu->convert(b16, TF_DTYPE_BF16, f32, TF_DTYPE_F32, n);
    gpu->download(back, b16, TF_DTYPE_BF16, n);
    for (size_t i = 0; i < n; i++) values[i] = round_bf16(values[i]);
    op_compare_arrays(&c, "rounding", back, values, n, 0.0);
    /* upload_bytes from pinned memory, zero */
    void *pinned = NULL;
    CHECK_OK(gpu->host_alloc(&pinned, n * 4));
    memcpy(pinned, values, n * 4);
    gpu->upload_bytes(f32_back, pinned, n * 4);
    gpu->download(back, f32_back, TF_DTYPE_F32, n);
    op_compare_arrays(&c, "upload_bytes", back, values, n, 0.0);
    gpu->zero(f32_back, n * 4);
    gpu->download(back, f32_back, TF_DTYPE_F32, n);
    nonzero = 0;
    for (size_t i = 0; i < n; i++) nonzero += back[i] != 0.0f;
    if (nonzero) op_fail(&c, "zero: %zu elements not zero", nonzero);
    gpu->host_free(pinned);
    gpu->free(b16);
    gpu->free(b16_copy);
    gpu->free(f32);
    gpu->free(f32_back);
    free(values);
    free(back);
    op_end(&c);
}

/* ---- matmul ---- */
static void matmul_case(int m, int n, int k, bool transpose_a, bool transpose_b, bool master_output, bool accumulate,
                        bool bias) {
    op_check c;
    op_begin(&c, "matmul m=%d n=%d k=%d%s%s out=%s%s%s", m, n, k, transpose_a ? " A^T" : "", transpose_b ? " B^T" : "",
             master_output ? "F32" : "BF16", accumulate ? " +=" : "", bias ? " +bias" : "");
    pair a = pair_new("A", (size_t)m * k, true), b = pair_new("B", (size_t)k * n, true);
    pair out = pair_new("C", (size_t)m * n, !master_output), bias_pair = pair_new("bias", (size_t)n, !master_output);
    pair_random(&a, 1.0f);
    pair_random(&b, 1.0f / sqrtf((float)k));
    pair_random(&bias_pair, 0.5f);
    if (accumulate)
        pair_random(&out, 1.0f);
    else
        pair_poison(&out);
    tf_matmul_desc desc = {m, n, k, transpose_a, transpose_b, accumulate, master_output, NULL};
    desc.bias = bias ? bias_pair.cpu : NULL;
    cpu->matmul(out.cpu, a.cpu, b.cpu, &desc);
    desc.bias = bias ? bias_pair.gpu : NULL;
    gpu->matmul(out.gpu, a.gpu, b.gpu, &desc);
    op_compare(&c, &out, BF16_LIMIT);
    pair_free(&a);
    pair_free(&b);
    pair_free(&out);
    pair_free(&bias_pair);
    op_end(&c);
}

static void test_matmul(void) {
    for (int t = 0; t < 4; t++) matmul_case(37, 45, 29, t & 1, t & 2, false, false, false);
    for (int t = 0; t < 4; t++) matmul_case(64, 96, 48, t & 1, t & 2, true, true, false);
    matmul_case(50, 192, 48, false, true, false, false, true); /* patch embedding with bias */
    matmul_case(16, 10, 96, false, true, true, false, true);   /* logits: fp32 out, fp32 bias */
    matmul_case(17, 96, 96, false, false, false, true, false);
    if (small_only) return;
    int rows = 256 * 197;
    matmul_case(rows, 768, 768, false, true, false, false, false);   /* A = X K^T, n 768 */
    matmul_case(rows, 3072, 768, false, true, false, false, false);  /* A = X K^T, n 3072 */
    matmul_case(rows, 768, 3072, false, false, false, false, false); /* out = S V */
    matmul_case(3072, 768, rows, true, false, true, true, false);    /* dV = S^T dO (master, +=) */
    matmul_case(768, 768, rows, true, false, true, true, false);     /* dK = dA^T X (master, +=) */
}

/* ---- the tuning record (kernels/cuda/matmul.cu, common/tuning_record.h) ---- */
static char record_dir[1024];

/* The record file that the matmul tests wrote into record_dir (its name holds cuBLASLt's version
 * and the GPU's), or false. */
static bool find_record(char *path, size_t size) {
    DIR *dir = opendir(record_dir);
    if (!dir) return false;
    bool found = false;
    for (struct dirent *entry; !found && (entry = readdir(dir));)
        if (strncmp(entry->d_name, "cublaslt-", 9) == 0)
            found = snprintf(path, size, "%s/%s", record_dir, entry->d_name) < (int)size;
    closedir(dir);
    return found;
}

static int record_lines(const char *path, const char *key) {
    FILE *file = fopen(path, "r");
    if (!file) return 0;
    char line[2048];
    int count = 0;
    size_t length = key ? strlen(key) : 0;
    while (fgets(line, sizeof line, file))
        if (!key || (strncmp(line, key, length) == 0 && line[length] == '\t')) count++;
    fclose(file);
    return count;
}

/* The key matmul.cu writes for a plain bf16 GEMM on cudaMalloc'd (16-byte aligned) buffers. */
static void plain_key(char *out, size_t size, int m, int n, int k) {
    snprintf(out, size,
             "matmul m=%d n=%d k=%d transpose_a=0 transpose_b=0 output=BF16 bias=0 align_a=16 align_b=16 align_c=16",
             m, n, k);
}

/* After test_matmul: each tuned shape left a line; a recorded choice is taken instead of timing
 * (no new line), and one that cublasLtMatmulAlgoCheck rejects is timed again (a new line), the
 * results right either way. */
static void test_tuning_record(void) {
    char path[1400], tuned[200], reused[200], damaged[200];
    if (!CHECK(find_record(path, sizeof path), "a tuning record in %s", record_dir)) return;
    int lines = record_lines(path, NULL);
    CHECK(lines >= 5, "%d lines in %s after the matmul tests", lines, path);
    unsigned char algo[64]; /* sizeof(cublasLtMatmulAlgo_t) */
    plain_key(tuned, sizeof tuned, 37, 45, 29);
    if (!CHECK(tuning_record_find(path, tuned, algo, sizeof algo), "the record of %s", tuned)) return;
    plain_key(reused, sizeof reused, 41, 45, 29);
    CHECK(tuning_record_add(path, reused, algo, sizeof algo), "add %s", reused);
    memset(algo, 0xff, sizeof algo);
    plain_key(damaged, sizeof damaged, 43, 45, 29);
    CHECK(tuning_record_add(path, damaged, algo, sizeof algo), "add %s", damaged);
    matmul_case(41, 45, 29, false, false, false, false, false);
    matmul_case(43, 45, 29, false, false, false, false, false);
    CHECK(record_lines(path, reused) == 1, "the recorded choice of m=41 taken without timing: %d lines",
          record_lines(path, reused));
    CHECK(record_lines(path, damaged) == 2, "the rejected record of m=43 timed and recorded again: %d lines",
          record_lines(path, damaged));
}

/* ---- Pattention norm ---- */
static void pattention_norm_case(int rows, int n, bool in_place) {
    op_check c;
    float tau = sqrtf((float)n), eps = 1e-6f;
    op_begin(&c, "pattention_norm fwd+bwd rows=%d n=%d%s", rows, n, in_place ? " (da = ds)" : "");
    pair a = pair_new("A", (size_t)rows * n, true), s = pair_new("S", (size_t)rows * n, true);
    pair r = pair_new("row_norm", (size_t)rows, false), ds = pair_new("dS", (size_t)rows * n, true);
    pair da = pair_new("dA", (size_t)rows * n, true);
    pair_random(&a, 1.0f);
    pair_poison(&s);
    pair_poison(&r);
    cpu->pattention_norm_forward(s.cpu, r.cpu, a.cpu, rows, n, tau, eps, NULL);
    gpu->pattention_norm_forward(s.gpu, r.gpu, a.gpu, rows, n, tau, eps, NULL);
    op_compare(&c, &s, BF16_LIMIT);
    op_compare(&c, &r, BF16_LIMIT);
    pair_random(&ds, 1.0f);
    pair *target = in_place ? &ds : &da;
    if (!in_place) pair_poison(&da);
    target->name = "dA";
    /* Backward writes S again: the very bits forward wrote, on each backend. */
    size_t count = (size_t)rows * n;
    float *forward_s = xmalloc(count * sizeof(float)), *recomputed_s = xmalloc(count * sizeof(float));
    gpu->download(forward_s, s.gpu, TF_DTYPE_BF16, count);
    pair_poison(&s);
    cpu->pattention_norm_backward(target->cpu, s.cpu, ds.cpu, a.cpu, r.cpu, rows, n, tau);
    gpu->pattention_norm_backward(target->gpu, s.gpu, ds.gpu, a.gpu, r.gpu, rows, n, tau);
    op_compare(&c, target, BF16_LIMIT);
    s.name = "S (backward)";
    op_compare(&c, &s, BF16_LIMIT);
    gpu->download(recomputed_s, s.gpu, TF_DTYPE_BF16, count);
    if (memcmp(forward_s, recomputed_s, count * sizeof(float)) != 0)
        op_fail(&c, "backward's S differs from forward's S on the GPU (it must be the same bits)");
    free(forward_s);
    free(recomputed_s);
    pair_free(&a);
    pair_free(&s);
    pair_free(&r);
    pair_free(&ds);
    pair_free(&da);
    op_end(&c);
}

/* The eps scaled per row (eps_scale, the inference form's sigma^2), with scores small enough that
 * the eps term moves r. */
static void pattention_norm_eps_scale_case(int rows, int n) {
    op_check c;
    float tau = sqrtf((float)n), eps = 1e-3f;
    op_begin(&c, "pattention_norm forward, eps scaled per row, rows=%d n=%d", rows, n);
    pair a = pair_new("A", (size_t)rows * n, true), s = pair_new("S", (size_t)rows * n, true);
    pair r = pair_new("row_norm", (size_t)rows, false), scale = pair_new("eps_scale", (size_t)rows, false);
    pair_random(&a, 0.01f);
    pair_uniform(&scale, 0.1f, 2.1f);
    pair_poison(&s);
    pair_poison(&r);
    cpu->pattention_norm_forward(s.cpu, r.cpu, a.cpu, rows, n, tau, eps, scale.cpu);
    gpu->pattention_norm_forward(s.gpu, r.gpu, a.gpu, rows, n, tau, eps, scale.gpu);
    op_compare(&c, &s, BF16_LIMIT);
    op_compare(&c, &r, BF16_LIMIT);
    pair_free(&a);
    pair_free(&s);
    pair_free(&r);
    pair_free(&scale);
    op_end(&c);
}

/* Forward fused with the mean over each image's patch rows (the last FFN of inference), eps scaled
 * per row as there: the CPU's double sums of S against the GPU's fp32 ones, both rounded once. */
static void pattention_norm_pool_case(int batch, int tokens, int n) {
    op_check c;
    int rows = batch * tokens;
    float tau = sqrtf((float)n), eps = 1e-3f;
    op_begin(&c, "pattention_norm_pool batch=%d tokens=%d n=%d", batch, tokens, n);
    pair a = pair_new("A", (size_t)rows * n, true), pooled = pair_new("mean S", (size_t)batch * n, true);
    pair scratch = pair_new("row_norm", (size_t)rows, false), scale = pair_new("eps_scale", (size_t)rows, false);
    pair_random(&a, 0.05f);
    pair_uniform(&scale, 0.1f, 2.1f);
    pair_poison(&pooled);
    cpu->pattention_norm_pool(pooled.cpu, scratch.cpu, a.cpu, batch, tokens, n, tau, eps, scale.cpu);
    gpu->pattention_norm_pool(pooled.gpu, scratch.gpu, a.gpu, batch, tokens, n, tau, eps, scale.gpu);
    op_compare(&c, &pooled, BF16_LIMIT);
    pair_free(&a);
    pair_free(&pooled);
    pair_free(&scratch);
    pair_free(&scale);
    op_end(&c);
}

/* pattention_norm_recheck after three forwards with eps eps_ln alone (the inference form's Q, K, V):
 * every third row's first scores scaled by 0.1 (under a quarter of the three's summed squares:
 * done again with var(x)), the others' three score rows of equal norms (the first reversed and
 * negated: left as they are), eps large enough that var(x) moves r. */
static void pattention_norm_recheck_case(int rows, int n, int dim) {
    op_check c;
    const float eps = 1e-3f, eps_ln = 1e-2f, tau[3] = {sqrtf((float)n), 2.0f, 3.0f};
    op_begin(&c, "pattention_norm_recheck rows=%d n=%d dim=%d", rows, n, dim);
    size_t count = (size_t)rows * n;
    pair x = pair_new("x", (size_t)rows * dim, true), a[3], s[3], r[3];
    const char *a_names[3] = {"A0", "A1", "A2"}, *s_names[3] = {"S0", "S1", "S2"}, *r_names[3] = {"r0", "r1", "r2"};
    for (int p = 0; p < 3; p++)
        a[p] = pair_new(a_names[p], count, true), s[p] = pair_new(s_names[p], count, true),
        r[p] = pair_new(r_names[p], (size_t)rows, false);
    pair_random(&x, 1.0f);
    fill_random(a[0].host, count, 0.002f); /* sum A^2 ~ 4e-6 n: var(x) moves r by 5% or more */
    for (int i = 0; i < rows; i++) {
        float *row[3] = {a[0].host + (size_t)i * n, a[1].host + (size_t)i * n, a[2].host + (size_t)i * n};
        for (int j = 0; j < n; j++) row[0][j] = round_bf16(row[0][j]);
        for (int j = 0; j < n; j++) row[1][j] = row[2][j] = -row[0][n - 1 - j];
        if (i % 3 == 0)
            for (int j = 0; j < n; j++) row[0][j] *= 0.1f;
    }
    tf_norm_rows on_cpu[3], on_gpu[3];
    for (int p = 0; p < 3; p++) {
        pair_upload(&a[p]);
        pair_poison(&s[p]);
        pair_poison(&r[p]);
        cpu->pattention_norm_forward(s[p].cpu, r[p].cpu, a[p].cpu, rows, n, tau[p], eps * eps_ln, NULL);
        gpu->pattention_norm_forward(s[p].gpu, r[p].gpu, a[p].gpu, rows, n, tau[p], eps * eps_ln, NULL);
        on_cpu[p] = (tf_norm_rows){s[p].cpu, r[p].cpu, a[p].cpu, tau[p]};
        on_gpu[p] = (tf_norm_rows){s[p].gpu, r[p].gpu, a[p].gpu, tau[p]};
    }
    cpu->pattention_norm_recheck(on_cpu, 3, x.cpu, rows, n, dim, eps, eps_ln, 0.25f);
    gpu->pattention_norm_recheck(on_gpu, 3, x.gpu, rows, n, dim, eps, eps_ln, 0.25f);
    for (int p = 0; p < 3; p++) {
        op_compare(&c, &s[p], BF16_LIMIT);
        op_compare(&c, &r[p], BF16_LIMIT);
    }
    pair_free(&x);
    for (int p = 0; p < 3; p++) pair_free(&a[p]), pair_free(&s[p]), pair_free(&r[p]);
    op_end(&c);
}

/* ---- the variance proofs' keys test ---- */
/* The least lambda of |Kc u|^2 over unit u orthogonal to 1, found on the CPU by bisection on mu:
 * within 2^-24 of trace(Kc^T Kc) / (d - 1), which bounds it from above. */
static double cpu_keys_lambda(tf_keys_exceed question, const pair *keys, int dim) {
    double low = 0.0, high = 0.0;
    for (int part = 0; part < question.parts; part++)
        for (size_t i = 0; i < keys[part].n; i++)
            high += (double)keys[part].host[i] * keys[part].host[i];
    high /= dim - 1;
    for (int step = 0; step < 24; step++) {
        question.mu = 0.5 * (low + high);
        cpu->keys_exceed(&question, 1, dim);
        *(question.exceeds ? &low : &high) = question.mu;
    }
    return 0.5 * (low + high);
}

/* Random keys, one set [n_single, dim] and one of three parts [n_stacked, dim] stacked, with
 * lambda found on the CPU; both backends asked in one call 0.1% either side of each lambda (yes,
 * no, yes, no), and |Kc 1| compared (both sum the same bf16 values in double). */
static void keys_exceed_case(int n_single, int n_stacked, int dim) {
    op_check c;
    op_begin(&c, "keys_exceed [%d, %d] and 3 x [%d, %d] stacked", n_single, dim, n_stacked, dim);
    pair keys[4] = {
        pair_new("single", (size_t)n_single * dim, true), pair_new("part0", (size_t)n_stacked * dim, true),
        pair_new("part1", (size_t)n_stacked * dim, true), pair_new("part2", (size_t)n_stacked * dim, true)};
    for (int k = 0; k < 4; k++)
        pair_random(&keys[k], 0.02f);
    tf_keys_exceed on_cpu[4], on_gpu[4];
    const double margin = 1e-3;
    for (int set = 0; set < 2; set++) {
        tf_keys_exceed question = {.parts = set == 0 ? 1 : 3, .n = set == 0 ? n_single : n_stacked};
        for (int part = 0; part < question.parts; part++)
            question.keys[part] = keys[set + part].cpu;
        double lambda = cpu_keys_lambda(question, &keys[set], dim);
        for (int side = 0; side < 2; side++) {
            question.mu = lambda * (side == 0 ? 1.0 - margin : 1.0 + margin);
            on_cpu[2 * set + side] = on_gpu[2 * set + side] = question;
            for (int part = 0; part < question.parts; part++)
                on_gpu[2 * set + side].keys[part] = keys[set + part].gpu;
        }
    }
    cpu->keys_exceed(on_cpu, 4, dim);
    gpu->keys_exceed(on_gpu, 4, dim);
    for (int i = 0; i < 4; i++) {
        bool want = i % 2 == 0;
        if (on_cpu[i].exceeds != want || on_gpu[i].exceeds != want)
            op_fail(&c, "question %d (mu %.8g): exceeds cpu %d cuda %d, want %d", i, on_cpu[i].mu,
                    on_cpu[i].exceeds, on_gpu[i].exceeds, want);
        double error = fabs(on_gpu[i].sums_norm - on_cpu[i].sums_norm) / on_cpu[i].sums_norm;
        if (!(error <= c.worst) || c.worst_name[0] == '\0') {
            c.worst = error;
            snprintf(c.worst_name, sizeof c.worst_name, "|Kc 1|");
        }
        if (!(error <= 1e-12))
            op_fail(&c, "question %d: |Kc 1| cuda %.17g cpu %.17g", i, on_gpu[i].sums_norm,
                    on_cpu[i].sums_norm);
    }
    for (int k = 0; k < 4; k++)
        pair_free(&keys[k]);
    op_end(&c);
}

static void test_keys_exceed(void) {
    keys_exceed_case(100, 40, 32);
    keys_exceed_case(70, 30, 50); /* width not a multiple of 32 */
    if (small_only) return;
    keys_exceed_case(3072, 768, 768); /* B/16's FFN keys; its Q, K and V keys */
}

static void test_pattention_norm(void) {
    pattention_norm_case(17, 96, false);
    pattention_norm_case(50, 192, false);
    pattention_norm_case(50, 384, true);
    pattention_norm_case(9, 768, false);   /* the B/16 attention width, one warp per row */
    pattention_norm_case(3, 1024, false);  /* four chunks per lane */
    pattention_norm_case(33, 100, false);  /* width not a multiple of 8: plain kernel */
    pattention_norm_case(9, 2304, false);  /* two warps per row */
    pattention_norm_case(5, 8200, false);  /* wider than 8192: plain kernel */
    pattention_norm_eps_scale_case(9, 768);
    pattention_norm_eps_scale_case(33, 100); /* plain kernel */
    pattention_norm_pool_case(3, 5, 96);     /* one warp a row, 8 rows at a time */
    pattention_norm_pool_case(2, 197, 768);  /* the B/16 token count */
    pattention_norm_pool_case(4, 50, 3072);  /* four warps a row, two rows at a time */
    pattention_norm_pool_case(2, 11, 8192);  /* eight warps a row */
    pattention_norm_pool_case(3, 7, 100);    /* width not a multiple of 8: plain kernels */
    pattention_norm_pool_case(2, 6, 8200);   /* wider than 8192: plain kernels */
    pattention_norm_recheck_case(30, 768, 768); /* B/16's Q, K, V */
    pattention_norm_recheck_case(12, 100, 40);  /* widths not a multiple of 8: plain forwards */
    pattention_norm_recheck_case(300, 96, 64);  /* two blocks, the last warps partly past the rows */
    if (small_only) return;
    pattention_norm_case(256 * 197, 768, false);
    pattention_norm_case(256 * 197, 3072, true);
    pattention_norm_pool_case(512, 197, 3072);
}

/* ---- attention ---- */
/* Which implementation a case asks for: cuDNN (forward and backward), our mma.sync / FMA kernels,
 * or the wgmma forward (Hopper) with our backward (cuDNN's backward after it is the model's
 * training step on Hopper, checked by tests/test_torch_parity.py's B/16 case; here it would fill
 * cuDNN's plan cache with shapes the other cases need). */
typedef enum { ATTENTION_CUDNN, ATTENTION_OWN, ATTENTION_WGMMA } attention_path;

static void attention_case(int batch, int tokens, int heads, int head_dim, attention_path path) {
    op_check c;
    bool use_cudnn = path == ATTENTION_CUDNN;
    bool cudnn_on = tf_cuda_attention_use_cudnn(use_cudnn);
    tf_cuda_attention_use_wgmma(path == ATTENTION_WGMMA);
    const char *names[] = {"cudnn", "own", "wgmma"};
    op_begin(&c, "attention[%s] fwd+bwd batch=%d tokens=%d heads=%d head_dim=%d", names[path], batch, tokens, heads,
             head_dim);
    size_t n = (size_t)batch * tokens * heads * head_dim, rows = (size_t)batch * heads * tokens;
    pair q = pair_new("q", n, true), k = pair_new("k", n, true), v = pair_new("v", n, true);
    pair out = pair_new("out", n, true), lse = pair_new("lse", rows, false), dout = pair_new("dout", n, true);
    pair dq = pair_new("dq", n, true), dk = pair_new("dk", n, true), dv = pair_new("dv", n, true);
    pair_random(&q, 1.0f);
    pair_random(&k, 1.0f);
    pair_random(&v, 1.0f);
    pair_random(&dout, 1.0f);
    pair_poison(&out);
    pair_poison(&lse);
    cpu->attention_forward(out.cpu, lse.cpu, q.cpu, k.cpu, v.cpu, batch, tokens, heads, head_dim);
    gpu->attention_forward(out.gpu, lse.gpu, q.gpu, k.gpu, v.gpu, batch, tokens, heads, head_dim);
    op_compare(&c, &out, BF16_LIMIT);
    op_compare(&c, &lse, BF16_LIMIT);
    const char *forward_used = tf_cuda_attention_last_forward();
    /* Backward from the CPU's forward results, so both see the same out and lse. */
    float *host = xmalloc(n * sizeof(float));
    cpu->download(host, out.cpu, TF_DTYPE_F32, n);
    memcpy(out.host, host, n * sizeof(float));
    pair_upload(&out);
    free(host);
    cpu->download(lse.host, lse.cpu, TF_DTYPE_F32, rows);
    pair_upload(&lse);
    pair_poison(&dq);
    pair_poison(&dk);
    pair_poison(&dv);
    cpu->attention_backward(dq.cpu, dk.cpu, dv.cpu, dout.cpu, q.cpu, k.cpu, v.cpu, out.cpu, lse.cpu, batch, tokens,
                            heads, head_dim);
    gpu->attention_backward(dq.gpu, dk.gpu, dv.gpu, dout.gpu, q.gpu, k.gpu, v.gpu, out.gpu, lse.gpu, batch, tokens,
                            heads, head_dim);
    op_compare(&c, &dq, BF16_LIMIT);
    op_compare(&c, &dk, BF16_LIMIT);
    op_compare(&c, &dv, BF16_LIMIT);
    const char *backward_used = tf_cuda_attention_last_backward();
    const char *expected = use_cudnn ? "cudnn" : "own";
    const char *expected_forward = path == ATTENTION_WGMMA ? "own-wgmma" : expected;
    if (use_cudnn && !cudnn_on)
        op_fail(&c, "cuDNN attention is unavailable: %s", tf_cuda_attention_cudnn_status());
    else if (strncmp(forward_used, expected_forward, strlen(expected_forward)) != 0 ||
             strncmp(backward_used, expected, strlen(expected)) != 0 ||
             (path != ATTENTION_WGMMA && strcmp(forward_used, "own-wgmma") == 0))
        op_fail(&c, "ran forward on %s, backward on %s instead of %s and %s: %s", forward_used, backward_used,
                expected_forward, expected, tf_cuda_attention_last_fallback_reason());
    size_t used = strlen(c.label);
    snprintf(c.label + used, sizeof c.label - used, " [%s]", backward_used);
    pair_free(&q);
    pair_free(&k);
    pair_free(&v);
    pair_free(&out);
    pair_free(&lse);
    pair_free(&dout);
    pair_free(&dq);
    pair_free(&dk);
    pair_free(&dv);
    op_end(&c);
}

static void test_attention(void) {
    for (int use_cudnn = 1; use_cudnn >= 0; use_cudnn--) {
        attention_path path = use_cudnn ? ATTENTION_CUDNN : ATTENTION_OWN;
        attention_case(2, 17, 3, 32, path);
        attention_case(4, 50, 3, 32, path);
        attention_case(4, 50, 3, 64, path);
        attention_case(2, 197, 2, 64, path); /* whole sequence in shared memory, 4 key chunks */
        /* the whole-sequence kernel's last chunk at each count of 8-key blocks (17: 3, 50: 7,
         * 197: 1 above), none (128) and the longest sequence it takes (256) */
        attention_case(1, 77, 2, 64, path);
        attention_case(1, 92, 1, 64, path);
        attention_case(1, 100, 1, 32, path);
        attention_case(1, 108, 1, 64, path);
        attention_case(1, 128, 2, 64, path);
        attention_case(1, 256, 1, 64, path);
        attention_case(2, 300, 2, 64, path); /* longer than that: tiles of queries and keys */
        attention_case(1, 300, 2, 32, path);
        attention_case(2, 130, 2, 128, path);
        attention_case(3, 70, 2, 24, path);
        if (!small_only) attention_case(256, 197, 12, 64, path);
    }
    /* The wgmma forward's sequence lengths: its shortest, the model's and its longest (one masked
     * key in its last 8-key block, four, none). */
    if (tf_cuda_attention_use_wgmma(true)) {
        attention_case(3, 193, 2, 64, ATTENTION_WGMMA);
        attention_case(2, 197, 2, 64, ATTENTION_WGMMA);
        attention_case(2, 200, 3, 64, ATTENTION_WGMMA);
        attention_case(1, 197, 16, 64, ATTENTION_WGMMA);
        if (!small_only) attention_case(512, 197, 12, 64, ATTENTION_WGMMA);
    } else {
        printf("attention[wgmma]: skipped, the GPU is not of compute capability 9.0\n");
    }
    tf_cuda_attention_use_wgmma(true);
    tf_cuda_attention_use_cudnn(true);
}

/* ---- LayerNorm ---- */
/* center_rows (fp32 rows -> bf16 centred) and layernorm_variance (bf16 rows -> fp32 sigma^2), the
 * inference form's two row statistics, on rows with means of their own; center_rows on the rows
 * as `matrices` matrices of unequal heights (some empty) in one call. */
static void layernorm_statistics_case(int rows, int dim, int matrices) {
    op_check c;
    float eps = 1e-6f;
    op_begin(&c, "center_rows, layernorm_variance rows=%d dim=%d matrices=%d", rows, dim, matrices);
    size_t n = (size_t)rows * dim;
    pair keys = pair_new("keys", n, false), centered = pair_new("centred keys", n, true);
    pair x = pair_new("x", n, true), variance = pair_new("variance", rows, false);
    pair_random(&keys, 0.02f);
    pair_random(&x, 1.5f);
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < dim; j++) {
            keys.host[(size_t)i * dim + j] += 0.01f * (float)(i % 5);
            x.host[(size_t)i * dim + j] += 0.25f * (float)(i % 7);
        }
    pair_upload(&keys);
    pair_upload(&x);
    pair_poison(&centered);
    pair_poison(&variance);
    void **out_cpu = xmalloc(matrices * sizeof(void *)), **out_gpu = xmalloc(matrices * sizeof(void *));
    const void **in_cpu = xmalloc(matrices * sizeof(void *)), **in_gpu = xmalloc(matrices * sizeof(void *));
    int *heights = xmalloc(matrices * sizeof(int)), first = 0;
    for (int i = 0; i < matrices; i++) {
        heights[i] = i == matrices - 1 ? rows - first : (rows / matrices) * (i % 3) / 2; /* 0, rows/m/2, rows/m */
        size_t offset = (size_t)first * dim;
        out_cpu[i] = (float *)centered.cpu + offset;
        out_gpu[i] = (uint16_t *)centered.gpu + offset; /* bf16 */
        in_cpu[i] = (const float *)keys.cpu + offset;
        in_gpu[i] = (const float *)keys.gpu + offset;
        first += heights[i];
    }
    cpu->center_rows(out_cpu, in_cpu, heights, matrices, dim);
    gpu->center_rows(out_gpu, in_gpu, heights, matrices, dim);
    free(out_cpu);
    free(out_gpu);
    free(in_cpu);
    free(in_gpu);
    free(heights);
    op_compare(&c, &centered, BF16_LIMIT);
    cpu->layernorm_variance(variance.cpu, x.cpu, rows, dim, eps);
    gpu->layernorm_variance(variance.gpu, x.gpu, rows, dim, eps);
    op_compare(&c, &variance, F32_LIMIT);
    pair_free(&keys);
    pair_free(&centered);
    pair_free(&x);
    pair_free(&variance);
    op_end(&c);
}

static void layernorm_case(int rows, int dim, bool parametric) {
    op_check c;
    float eps = 1e-6f;
    op_begin(&c, "layernorm fwd+bwd rows=%d dim=%d%s", rows, dim, parametric ? " parametric" : "");
    size_t n = (size_t)rows * dim;
    /* x is the fp32 residual stream; backward reads xhat (bf16). The parametric case (fc_norm)
     * asks forward for xhat as well, the plain one does not (its out is xhat). */
    pair x = pair_new("x", n, false), out = pair_new("out", n, true), xhat_out = pair_new("xhat (forward)", n, true);
    pair rstd = pair_new("rstd", rows, false), w = pair_new("weight", dim, true), b = pair_new("bias", dim, true);
    pair dout = pair_new("dout", n, true), dx = pair_new("dx", n, true), xhat = pair_new("xhat", n, true);
    pair dw = pair_new("dweight", dim, false), db = pair_new("dbias", dim, false);
    pair_random(&x, 2.0f);
    for (size_t i = 0; i < n; i++) x.host[i] += 0.5f; /* a mean to remove */
    pair_upload(&x);
    pair_uniform(&w, 0.5f, 1.5f);
    pair_random(&b, 0.3f);
    pair_poison(&out);
    pair_poison(&xhat_out);
    pair_poison(&rstd);
    const void *wc = parametric ? w.cpu : NULL, *bc = parametric ? b.cpu : NULL;
    const void *wg = parametric ? w.gpu : NULL, *bg = parametric ? b.gpu : NULL;
    cpu->layernorm_forward(out.cpu, parametric ? xhat_out.cpu : NULL, rstd.cpu, x.cpu, wc, bc, rows, dim, eps);
    gpu->layernorm_forward(out.gpu, parametric ? xhat_out.gpu : NULL, rstd.gpu, x.gpu, wg, bg, rows, dim, eps);
    op_compare(&c, &out, BF16_LIMIT);
    if (parametric) op_compare(&c, &xhat_out, BF16_LIMIT);
    op_compare(&c, &rstd, F32_LIMIT);
    pair_random(&xhat, 1.0f);
    pair_random(&dout, 1.0f);
    pair_random(&dx, 0.5f); /* backward adds into dx */
    pair_random(&dw, 0.5f);
    pair_random(&db, 0.5f);
    cpu->layernorm_backward(dx.cpu, parametric ? dw.cpu : NULL, parametric ? db.cpu : NULL, dout.cpu, xhat.cpu,
                            rstd.cpu, wc, rows, dim);
    gpu->layernorm_backward(dx.gpu, parametric ? dw.gpu : NULL, parametric ? db.gpu : NULL, dout.gpu, xhat.gpu,
                            rstd.gpu, wg, rows, dim);
    op_compare(&c, &dx, BF16_LIMIT);
    if (parametric) {
        op_compare(&c, &dw, BF16_LIMIT);
        op_compare(&c, &db, BF16_LIMIT);
    }
    pair_free(&x);
    pair_free(&xhat);
    pair_free(&out);
    pair_free(&xhat_out);
    pair_free(&rstd);
    pair_free(&w);
    pair_free(&b);
    pair_free(&dout);
    pair_free(&dx);
    pair_free(&dw);
    pair_free(&db);
    op_end(&c);
}

static void residual_layernorm_case(int batch, int tokens, int dim, bool scaled, bool in_place) {
    op_check c;
    int rows = batch * tokens;
    op_begin(&c, "residual_layernorm_forward rows=%d dim=%d%s%s", rows, dim, scaled ? " drop-path" : "",
             in_place ? " (out = in)" : "");
    size_t n = (size_t)rows * dim;
    pair in = pair_new("residual_in", n, false), branch = pair_new("branch", n, true);
    pair res_out = pair_new("residual_out", n, false), ln = pair_new("ln_out", n, true);
    pair rstd = pair_new("rstd", rows, false), scale = pair_new("scale", batch, false);
    pair_random(&in, 1.0f);
    pair_random(&branch, 1.0f);
    for (int b = 0; b < batch; b++) scale.host[b] = b % 3 == 1 ? 0.0f : 1.0f / 0.9f;
    pair_upload(&scale);
    pair_poison(&ln);
    pair_poison(&rstd);
    pair *target = in_place ? &in : &res_out;
    if (!in_place) pair_poison(&res_out);
    target->name = "residual_out";
    cpu->residual_layernorm_forward(target->cpu, ln.cpu, rstd.cpu, in.cpu, branch.cpu, scaled ? scale.cpu : NULL,
                                    rows, dim, tokens, 1e-6f);
    gpu->residual_layernorm_forward(target->gpu, ln.gpu, rstd.gpu, in.gpu, branch.gpu, scaled ? scale.gpu : NULL,
                                    rows, dim, tokens, 1e-6f);
    op_compare(&c, target, F32_LIMIT);
    op_compare(&c, &ln, BF16_LIMIT);
    op_compare(&c, &rstd, F32_LIMIT);
    pair_free(&in);
    pair_free(&branch);
    pair_free(&res_out);
    pair_free(&ln);
    pair_free(&rstd);
    pair_free(&scale);
    op_end(&c);
}

static void test_layernorm(void) {
    layernorm_statistics_case(17, 96, 1);
    layernorm_statistics_case(33, 100, 3);  /* plain kernel */
    layernorm_statistics_case(9, 768, 1);   /* B/16's width */
    layernorm_statistics_case(5, 3072, 2);  /* an FFN's key tokens: n rows of dim; and a wide row */
    layernorm_statistics_case(700, 64, 70); /* more matrices than one launch takes */
    layernorm_case(17, 96, false);
    layernorm_case(50, 192, true);
    layernorm_case(33, 100, true); /* plain kernel */
    layernorm_case(7, 1536, false);
    layernorm_case(256, 768, true); /* fc_norm */
    residual_layernorm_case(3, 17, 96, true, false);
    residual_layernorm_case(4, 50, 192, false, true);
    residual_layernorm_case(2, 17, 100, true, true);
    if (small_only) return;
    layernorm_case(256 * 197, 768, false);
    residual_layernorm_case(256, 197, 768, true, true);
}

/* ---- residual ---- */
static void residual_case(int batch, int tokens, int dim, bool scaled) {
    op_check c;
    int rows = batch * tokens;
    op_begin(&c, "residual fwd+bwd rows=%d dim=%d%s", rows, dim, scaled ? " drop-path" : "");
    size_t n = (size_t)rows * dim;
    pair in = pair_new("residual_in", n, false), branch = pair_new("branch", n, true), out = pair_new("out", n, false);
    pair dout = pair_new("dout", n, true), dbranch = pair_new("dbranch", n, true), scale = pair_new("scale", batch, false);
    pair_random(&in, 1.0f);
    pair_random(&branch, 1.0f);
    pair_random(&dout, 1.0f);
    for (int b = 0; b < batch; b++) scale.host[b] = b % 2 ? 0.0f : 1.0f / 0.8f;
    pair_upload(&scale);
    pair_poison(&out);
    pair_poison(&dbranch);
    const void *sc = scaled ? scale.cpu : NULL, *sg = scaled ? scale.gpu : NULL;
    cpu->residual_forward(out.cpu, in.cpu, branch.cpu, sc, rows, dim, tokens);
    gpu->residual_forward(out.gpu, in.gpu, branch.gpu, sg, rows, dim, tokens);
    cpu->residual_backward(dbranch.cpu, dout.cpu, sc, rows, dim, tokens);
    gpu->residual_backward(dbranch.gpu, dout.gpu, sg, rows, dim, tokens);
    op_compare(&c, &out, F32_LIMIT);
    op_compare(&c, &dbranch, BF16_LIMIT);
    pair_free(&in);
    pair_free(&branch);
    pair_free(&out);
    pair_free(&dout);
    pair_free(&dbranch);
    pair_free(&scale);
    op_end(&c);
}

static void test_residual(void) {
    residual_case(3, 17, 96, true);
    residual_case(4, 50, 192, false);
    residual_case(2, 17, 100, true); /* plain kernel */
    if (!small_only) residual_case(256, 197, 768, true);
}

/* ---- patch embedding, tokens ---- */
static void im2col_case(int batch, int channels, int size, int patch) {
    op_check c;
    op_begin(&c, "patch_im2col batch=%d channels=%d size=%d patch=%d", batch, channels, size, patch);
    int grid = size / patch;
    size_t n = (size_t)batch * channels * size * size, patches = (size_t)batch * grid * grid * channels * patch * patch;
    pair images = pair_new("images", n, true), out = pair_new("patches", patches, true);
    pair_random(&images, 1.0f);
    pair_poison(&out);
    cpu->patch_im2col(out.cpu, images.cpu, batch, channels, size, patch);
    gpu->patch_im2col(out.gpu, images.gpu, batch, channels, size, patch);
    op_compare(&c, &out, 0.0);
    pair_free(&images);
    pair_free(&out);
    op_end(&c);
}

/* bf16_stream: x in the compute dtype (the inference form's stream) instead of the master one. */
static void tokens_case(int batch, int patches, int dim, bool bf16_stream) {
    op_check c;
    op_begin(&c, "tokens fwd+bwd batch=%d patches=%d dim=%d x %s", batch, patches, dim, bf16_stream ? "bf16" : "fp32");
    int tokens = patches + 1;
    size_t n = (size_t)batch * tokens * dim, np = (size_t)batch * patches * dim;
    pair pt = pair_new("patch_tokens", np, true), cls = pair_new("cls", dim, true);
    pair pos = pair_new("pos", (size_t)tokens * dim, true), x = pair_new("x", n, bf16_stream);
    pair dx = pair_new("dx", n, true), dpt = pair_new("dpatch_tokens", np, true);
    pair dcls = pair_new("dcls", dim, false), dpos = pair_new("dpos", (size_t)tokens * dim, false);
    pair_random(&pt, 1.0f);
    pair_random(&cls, 0.02f);
    pair_random(&pos, 0.02f);
    pair_random(&dx, 1.0f);
    pair_random(&dcls, 0.1f); /* accumulated */
    pair_random(&dpos, 0.1f);
    pair_poison(&x);
    pair_poison(&dpt);
    cpu->tokens_forward(x.cpu, TF_DTYPE_F32, pt.cpu, cls.cpu, pos.cpu, batch, patches, dim);
    gpu->tokens_forward(x.gpu, bf16_stream ? TF_DTYPE_BF16 : TF_DTYPE_F32, pt.gpu, cls.gpu, pos.gpu, batch, patches,
                        dim);
    cpu->tokens_backward(dpt.cpu, dcls.cpu, dpos.cpu, dx.cpu, batch, patches, dim);
    gpu->tokens_backward(dpt.gpu, dcls.gpu, dpos.gpu, dx.gpu, batch, patches, dim);
    op_compare(&c, &x, bf16_stream ? BF16_LIMIT : F32_LIMIT);
    op_compare(&c, &dpt, BF16_LIMIT);
    op_compare(&c, &dcls, BF16_LIMIT);
    op_compare(&c, &dpos, BF16_LIMIT);
    pair_free(&pt);
    pair_free(&cls);
    pair_free(&pos);
    pair_free(&x);
    pair_free(&dx);
    pair_free(&dpt);
    pair_free(&dcls);
    pair_free(&dpos);
    op_end(&c);
}

static void test_patch_embed(void) {
    im2col_case(2, 3, 28, 4);
    im2col_case(3, 3, 32, 16);
    im2col_case(2, 1, 28, 7);
    tokens_case(2, 49, 192, false);
    tokens_case(2, 49, 192, true);
    tokens_case(3, 16, 100, false); /* plain kernel */
    tokens_case(3, 16, 100, true);
    if (small_only) return;
    im2col_case(256, 3, 224, 16);
    tokens_case(256, 196, 768, false);
    tokens_case(256, 196, 768, true);
}

/* ---- head ---- */
/* bf16_stream: x in the compute dtype (the inference form's stream) instead of the master one. */
static void pool_case(int batch, int tokens, int dim, tf_pool pool, bool bf16_stream) {
    op_check c;
    op_begin(&c, "token_pool fwd+bwd batch=%d tokens=%d dim=%d %s x %s", batch, tokens, dim,
             pool == TF_POOL_CLS ? "cls" : "avg", bf16_stream ? "bf16" : "fp32");
    size_t n = (size_t)batch * tokens * dim;
    pair x = pair_new("x", n, bf16_stream), out = pair_new("out", (size_t)batch * dim, false);
    pair dout = pair_new("dout", (size_t)batch * dim, true), dx = pair_new("dx", n, true);
    pair_random(&x, 1.0f);
    pair_random(&dout, 1.0f);
    pair_poison(&out);
    pair_poison(&dx);
    cpu->token_pool_forward(out.cpu, x.cpu, TF_DTYPE_F32, batch, tokens, dim, pool);
    gpu->token_pool_forward(out.gpu, x.gpu, bf16_stream ? TF_DTYPE_BF16 : TF_DTYPE_F32, batch, tokens, dim, pool);
    cpu->token_pool_backward(dx.cpu, dout.cpu, batch, tokens, dim, pool);
    gpu->token_pool_backward(dx.gpu, dout.gpu, batch, tokens, dim, pool);
    op_compare(&c, &out, F32_LIMIT);
    op_compare(&c, &dx, BF16_LIMIT);
    pair_free(&x);
    pair_free(&out);
    pair_free(&dout);
    pair_free(&dx);
    op_end(&c);
}

static void bias_backward_case(int rows, int dim) {
    op_check c;
    op_begin(&c, "bias_backward rows=%d dim=%d", rows, dim);
    pair dout = pair_new("dout", (size_t)rows * dim, true), db = pair_new("dbias", dim, false);
    pair_random(&dout, 1.0f);
    pair_random(&db, 1.0f); /* accumulated */
    cpu->bias_backward(db.cpu, dout.cpu, rows, dim);
    gpu->bias_backward(db.gpu, dout.gpu, rows, dim);
    op_compare(&c, &db, BF16_LIMIT);
    pair_free(&dout);
    pair_free(&db);
    op_end(&c);
}

static void test_head(void) {
    pool_case(4, 50, 192, TF_POOL_AVG, false);
    pool_case(4, 50, 192, TF_POOL_AVG, true);
    pool_case(3, 17, 100, TF_POOL_CLS, false);
    pool_case(3, 17, 100, TF_POOL_CLS, true);
    bias_backward_case(37, 100);
    bias_backward_case(1000, 10);
    if (small_only) return;
    pool_case(256, 197, 768, TF_POOL_AVG, false);
    pool_case(256, 197, 768, TF_POOL_AVG, true);
    pool_case(256, 197, 768, TF_POOL_CLS, false);
    bias_backward_case(256 * 196, 768);
}

/* ---- cross-entropy ---- */
static void cross_entropy_case(int batch, int classes, int mode) {
    static const char *modes[] = {"with dlogits", "no dlogits"};
    op_check c;
    op_begin(&c, "cross_entropy batch=%d classes=%d %s", batch, classes, modes[mode]);
    size_t n = (size_t)batch * classes;
    pair logits = pair_new("logits", n, false), target = pair_new("target", n, false); /* fp32 logits */
    pair loss = pair_new("loss", batch, false), dlogits = pair_new("dlogits", n, true);
    pair_random(&logits, 3.0f);
    /* smoothed one-hot targets mixed by lambda, as mixup makes them */
    float off = 0.1f / classes, on = 0.9f + off, lambda = 0.7f;
    for (int b = 0; b < batch; b++)
        for (int k = 0; k < classes; k++) {
            int a = b % classes, p = (batch - 1 - b) % classes;
            target.host[(size_t)b * classes + k] =
                lambda * (k == a ? on : off) + (1.0f - lambda) * (k == p ? on : off);
        }
    pair_upload(&target);
    pair_poison(&loss);
    pair_poison(&dlogits);
    cpu->cross_entropy_forward_backward(loss.cpu, mode == 1 ? NULL : dlogits.cpu, logits.cpu, target.cpu, batch, classes,
                                        1.0f / batch);
    gpu->cross_entropy_forward_backward(loss.gpu, mode == 1 ? NULL : dlogits.gpu, logits.gpu, target.gpu, batch, classes,
                                        1.0f / batch);
    op_compare(&c, &loss, F32_LIMIT);
    if (mode != 1) op_compare(&c, &dlogits, BF16_LIMIT);
    pair_free(&logits);
    pair_free(&target);
    pair_free(&loss);
    pair_free(&dlogits);
    op_end(&c);
}

static void test_cross_entropy(void) {
    cross_entropy_case(16, 10, 0);
    cross_entropy_case(16, 10, 1);
    cross_entropy_case(33, 1000, 0);
    cross_entropy_case(256, 1000, 0);
}

/* ---- images ---- */
static void images_case(int batch, int channels, int size) {
    op_check c;
    op_begin(&c, "images normalize/mixup/cutmix batch=%d channels=%d size=%d", batch, channels, size);
    size_t n = (size_t)batch * channels * size * size;
    uint8_t *pixels = xmalloc(n);
    for (size_t i = 0; i < n; i++) pixels[i] = (uint8_t)tf_rng_below(&rng, 256);
    void *pixels_cpu = NULL, *pixels_gpu = NULL;
    CHECK_OK(cpu->alloc(&pixels_cpu, n, "pixels"));
    CHECK_OK(gpu->alloc(&pixels_gpu, n, "pixels"));
    cpu->upload_bytes(pixels_cpu, pixels, n);
    gpu->upload_bytes(pixels_gpu, pixels, n);
    const float mean[3] = {0.485f, 0.456f, 0.406f}, std[3] = {0.229f, 0.224f, 0.225f};
    pair images = pair_new("normalized", n, true);
    pair_poison(&images);
    cpu->images_normalize(images.cpu, pixels_cpu, batch, channels, size, mean, std);
    gpu->images_normalize(images.gpu, pixels_gpu, batch, channels, size, mean, std);
    op_compare(&c, &images, BF16_LIMIT);
    /* mixup and cutmix on identical bf16 inputs */
    pair_random(&images, 1.0f);
    images.name = "mixup";
    cpu->mixup_images(images.cpu, batch, (size_t)channels * size * size, 0.63f);
    gpu->mixup_images(images.gpu, batch, (size_t)channels * size * size, 0.63f);
    op_compare(&c, &images, BF16_LIMIT);
    pair_random(&images, 1.0f);
    images.name = "cutmix";
    int y0 = size / 5, y1 = size - size / 3, x0 = size / 7, x1 = size - 1;
    cpu->cutmix_images(images.cpu, batch, channels, size, y0, y1, x0, x1);
    gpu->cutmix_images(images.gpu, batch, channels, size, y0, y1, x0, x1);
    op_compare(&c, &images, 0.0);
    pair_free(&images);
    cpu->free(pixels_cpu);
    gpu->free(pixels_gpu);
    free(pixels);
    op_end(&c);
}

/* upload_bytes is asynchronous (kernels.h): three batches uploaded one after the other into one
 * pixel buffer, each normalised before the next upload is queued, with nothing waited for in
 * between (no debug sync). Each normalisation must see its own batch: a copy that overtook the
 * normalisation of the batch before it would show as a mismatch. */
static void upload_order_case(int batch) {
    op_check c;
    op_begin(&c, "upload_bytes order: 3 batches of %d through one pixel buffer", batch);
    const int channels = 3, size = 224, uploads = 3;
    size_t n = (size_t)batch * channels * size * size;
    const float mean[3] = {0.485f, 0.456f, 0.406f}, std[3] = {0.229f, 0.224f, 0.225f};
    void *pixels_gpu = NULL, *pixels_cpu = NULL, *host[3] = {NULL, NULL, NULL};
    CHECK_OK(gpu->alloc(&pixels_gpu, n, "pixels"));
    CHECK_OK(cpu->alloc(&pixels_cpu, n, "pixels"));
    pair images[3] = {pair_new("batch 0", n, true), pair_new("batch 1", n, true), pair_new("batch 2", n, true)};
    for (int u = 0; u < uploads; u++) {
        CHECK_OK(gpu->host_alloc(&host[u], n));
        for (size_t i = 0; i < n; i++) ((uint8_t *)host[u])[i] = (uint8_t)tf_rng_below(&rng, 256);
        cpu->upload_bytes(pixels_cpu, host[u], n);
        cpu->images_normalize(images[u].cpu, pixels_cpu, batch, channels, size, mean, std);
    }
    tf_cuda_set_debug_sync(false);
    for (int u = 0; u < uploads; u++) {
        gpu->upload_bytes(pixels_gpu, host[u], n);
        gpu->images_normalize(images[u].gpu, pixels_gpu, batch, channels, size, mean, std);
    }
    CHECK_OK(gpu->synchronize());
    tf_cuda_set_debug_sync(true);
    for (int u = 0; u < uploads; u++) {
        op_compare(&c, &images[u], BF16_LIMIT);
        pair_free(&images[u]);
        gpu->host_free(host[u]);
    }
    gpu->free(pixels_gpu);
    cpu->free(pixels_cpu);
    op_end(&c);
}

static void test_images(void) {
    upload_order_case(small_only ? 8 : 128);
    images_case(5, 3, 28);
    images_case(4, 1, 30); /* plane not a multiple of 8: plain kernel */
    if (!small_only) images_case(256, 3, 224);
}

/* ---- optimizer ---- */
static void adamw_case(size_t total) {
    op_check c;
    op_begin(&c, "adamw 3 steps over %zu params, 5 groups", total);
    pair master = pair_new("master", total, false), grad = pair_new("grad", total, false);
    pair m = pair_new("m", total, false), v = pair_new("v", total, false), compute = pair_new("compute", total, true);
    pair_random(&master, 0.05f);
    pair_random(&m, 0.01f);
    pair_uniform(&v, 1e-6f, 1e-4f);
    pair_poison(&compute);
    /* groups with gaps between them (untouched elements) and odd offsets and sizes */
    size_t fifth = total / 5;
    tf_adamw_group groups[5] = {
        {0, fifth - 3, 1.0f, 0.3f},       {fifth, fifth + 1, 0.65f, 0.0f}, {2 * fifth + 7, fifth - 100, 1.0f, 0.3f},
        {3 * fifth + 1, 1, 0.5f, 0.3f},   {4 * fifth, total - 4 * fifth, 0.75f, 0.0f},
    };
    for (int step = 1; step <= 3; step++) {
        pair_random(&grad, 0.01f);
        tf_adamw_hyper hyper = {1.6e-3f, 0.9f, 0.95f, 1e-8f, 0.5f, step};
        cpu->adamw_update(master.cpu, compute.cpu, grad.cpu, m.cpu, v.cpu, groups, 5, &hyper);
        gpu->adamw_update(master.gpu, compute.gpu, grad.gpu, m.gpu, v.gpu, groups, 5, &hyper);
    }
    op_compare(&c, &master, F32_LIMIT);
    op_compare(&c, &m, F32_LIMIT);
    op_compare(&c, &v, F32_LIMIT);
    /* elements outside every group were never written on either side (NaN on both) */
    float *got = xmalloc(total * sizeof(float)), *want = xmalloc(total * sizeof(float));
    gpu->download(got, compute.gpu, TF_DTYPE_BF16, total);
    cpu->download(want, compute.cpu, TF_DTYPE_F32, total);
    size_t inside = 0, mismatched_outside = 0;
    for (int g = 0; g < 5; g++) {
        memmove(got + inside, got + groups[g].offset, groups[g].count * sizeof(float));
        memmove(want + inside, want + groups[g].offset, groups[g].count * sizeof(float));
        inside += groups[g].count;
    }
    op_compare_arrays(&c, "compute (in groups)", got, want, inside, BF16_LIMIT);
    gpu->download(got, compute.gpu, TF_DTYPE_BF16, total);
    size_t gap = groups[0].offset + groups[0].count; /* the 3 elements before group 1 */
    for (size_t i = gap; i < groups[1].offset; i++) mismatched_outside += !isnan(got[i]);
    if (mismatched_outside) op_fail(&c, "%zu elements outside every group were written", mismatched_outside);
    free(got);
    free(want);
    pair_free(&master);
    pair_free(&grad);
    pair_free(&m);
    pair_free(&v);
    pair_free(&compute);
    op_end(&c);
}

static void ema_and_sum_squares_case(size_t n) {
    op_check c;
    op_begin(&c, "ema_update + sum_squares n=%zu (and unaligned)", n);
    pair ema = pair_new("ema", n + 1, false), master = pair_new("master", n + 1, false);
    pair_random(&ema, 1.0f);
    pair_random(&master, 1.0f);
    cpu->ema_update(ema.cpu, master.cpu, n, 0.9999f);
    gpu->ema_update(ema.gpu, master.gpu, n, 0.9999f);
    /* one float past the start: the unaligned path */
    cpu->ema_update((float *)ema.cpu + 1, (const float *)master.cpu + 1, n, 0.99f);
    gpu->ema_update((float *)ema.gpu + 1, (const float *)master.gpu + 1, n, 0.99f);
    op_compare(&c, &ema, F32_LIMIT);
    double want = cpu->sum_squares(master.cpu, n + 1), got = gpu->sum_squares(master.gpu, n + 1);
    float got_f = (float)got, want_f = (float)want;
    op_compare_arrays(&c, "sum_squares", &got_f, &want_f, 1, F32_LIMIT);
    if (fabs(got - want) > 1e-9 * fabs(want)) op_fail(&c, "sum_squares %.17g vs %.17g", got, want);
    pair_free(&ema);
    pair_free(&master);
    op_end(&c);
}

static void test_optimizer(void) {
    adamw_case(100003);
    ema_and_sum_squares_case(100003);
    if (small_only) return;
    adamw_case(20000000);
    ema_and_sum_squares_case(114800000);
}

/* ---- failures are recorded with the call and its place (last: the record is sticky) ---- */
static void test_failure_record(void) {
    op_check c;
    op_begin(&c, "failure record: images_normalize with 9 channels must fail");
    void *images = NULL, *pixels = NULL;
    CHECK_OK(gpu->alloc(&images, 9 * 4 * 4 * 2, "images"));
    CHECK_OK(gpu->alloc(&pixels, 9 * 4 * 4, "pixels"));
    float mean[9] = {0}, std[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    gpu->images_normalize(images, pixels, 1, 9, 4, mean, std);
    tf_status status = gpu->synchronize();
    const char *message = tf_error_message();
    if (status == TF_OK)
        op_fail(&c, "synchronize returned TF_OK");
    else if (!strstr(message, "images") || !strstr(message, "channels 9"))
        op_fail(&c, "message lacks the place or the shape: %s", message);
    printf("%-78s %s\n    (message: %s)\n", c.label, c.failed ? "FAIL" : "PASS", message);
    if (c.failed) printf("%s", c.details);
    CHECK(!c.failed, "%s", c.label);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--small") == 0)
            small_only = true;
        else {
            fprintf(stderr, "usage: %s [--small]\n", argv[0]);
            return 2;
        }
    }
    if (tf_cuda_backend(&gpu) != TF_OK) {
        char reason[1200];
        snprintf(reason, sizeof reason, "no CUDA GPU (%s)", tf_error_message());
        return test_skip(reason);
    }
    /* A fresh tuning record, so that every GEMM shape below is timed and recorded here. */
    if (!test_make_temp_dir(record_dir, sizeof record_dir, "test_kernels_cuda")) {
        perror("mkdtemp");
        return 1;
    }
    setenv("TF_TUNING_DIR", record_dir, 1);
    tf_cpu_backend_set_threads(0);
    cpu = tf_cpu_backend(TF_DTYPE_F32);
    rng = tf_rng_make(1234, TF_RNG_TEST, 4, 0);
    tf_cuda_set_debug_sync(true);
    const char *cudnn_status = tf_cuda_attention_cudnn_status();
    printf("test_kernels_cuda: CUDA backend vs CPU fp32; limits %.0e (bf16 paths), %.0e (fp32 paths); cuDNN "
           "attention %s%s%s\n",
           BF16_LIMIT, F32_LIMIT, cudnn_status[0] ? "unavailable: " : "available", cudnn_status,
           small_only ? "; small shapes only" : "");
    test_memory();
    test_matmul();
    test_tuning_record();
    test_pattention_norm();
    test_keys_exceed();
    test_attention();
    test_layernorm();
    test_residual();
    test_patch_embed();
    test_head();
    test_cross_entropy();
    test_images();
    test_optimizer();
    test_failure_record();
    test_remove_tree(record_dir);
    return test_finish("test_kernels_cuda");
}

#else

int main(void) {
    return test_skip("no CUDA GPU (built without CUDA: -DTOKENFORMER_CUDA=OFF)");
}

#endif
