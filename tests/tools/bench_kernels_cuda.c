/* Micro-benchmark of the CUDA backend's operations at the shapes of one B/16 layer at batch 256
 * (rows = 256 x 197 = 50432 tokens, width 768, 768 and 3072 parameter tokens, 12 heads of 64).
 * Each operation is timed with CUDA events on the backend's stream: the median (and minimum)
 * of 20 runs after 3 warm-up runs, with its rate: TFLOP/s for GEMMs and attention, GB/s of
 * compulsory memory traffic for the memory-bound kernels.
 *
 * Attention runs through cuDNN and through our own kernels; the number to beat is PyTorch's
 * SDPA through cuDNN on the same shape: 1.05 ms forward + backward (DESIGN.md section 6).
 *
 * Usage: bench_kernels_cuda [runs]   (default 20). Without a GPU it prints one line and exits 0. */
#include "kernels/kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef TOKENFORMER_CUDA
#include "common/rng.h"
#include "kernels/cuda/cuda_backend.cuh"

#include <cuda_runtime.h>

enum { BATCH = 256, TOKENS = 197, ROWS = BATCH * TOKENS, DIM = 768, HEADS = 12, HEAD_DIM = 64, WARMUP = 3 };
static const size_t B16_PARAMETERS = 114800000;

static const tf_backend *gpu;
static int runs = 20;
static float *random_values; /* 1 Mi normal values, tiled into device buffers */
enum { RANDOM_COUNT = 1 << 20 };

/* A device buffer of n elements: N(0, std^2) values (a 1 Mi pattern repeated), or zeros. */
static void *device_buffer(size_t n, tf_dtype dtype, float std) {
    void *buffer = NULL;
    if (gpu->alloc(&buffer, n * tf_dtype_size(dtype), "benchmark buffer") != TF_OK) {
        fprintf(stderr, "bench_kernels_cuda: %s\n", tf_error_message());
        exit(1);
    }
    if (std == 0.0f) return buffer; /* alloc zero-fills */
    float *scaled = malloc(RANDOM_COUNT * sizeof(float));
    for (size_t i = 0; i < RANDOM_COUNT; i++) scaled[i] = random_values[i] * std;
    for (size_t start = 0; start < n; start += RANDOM_COUNT) {
        size_t count = n - start < RANDOM_COUNT ? n - start : RANDOM_COUNT;
        gpu->upload((char *)buffer + start * tf_dtype_size(dtype), dtype, scaled, count);
    }
    free(scaled);
    return buffer;
}

static int compare_floats(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

typedef void (*bench_fn)(void *context);

/* Median and minimum milliseconds of `runs` timed calls after WARMUP untimed ones. */
static float time_ms(bench_fn fn, void *context, float *min_ms) {
    cudaStream_t stream = tf_cuda_stream();
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    for (int i = 0; i < WARMUP; i++) fn(context);
    float *times = malloc((size_t)runs * sizeof(float));
    for (int i = 0; i < runs; i++) {
        cudaEventRecord(start, stream);
        fn(context);
        cudaEventRecord(stop, stream);
        cudaEventSynchronize(stop);
        cudaEventElapsedTime(&times[i], start, stop);
    }
    qsort(times, (size_t)runs, sizeof(float), compare_floats);
    float median = times[runs / 2];
    *min_ms = times[0];
    free(times);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (gpu->synchronize() != TF_OK) {
        fprintf(stderr, "bench_kernels_cuda: %s\n", tf_error_message());
        exit(1);
    }
    return median;
}

static void report(const char *name, float ms, float min_ms, double amount, const char *unit) {
    double rate = amount / (ms * 1e-3);
    printf("%-58s %8.3f ms (min %8.3f)  %8.1f %s\n", name, ms, min_ms, unit[0] == 'T' ? rate / 1e12 : rate / 1e9,
           unit);
    fflush(stdout);
}

/* ---- GEMMs ---- */
typedef struct {
    void *c, *a, *b;
    tf_matmul_desc desc;
} gemm_context;

static void run_gemm(void *context) {
    gemm_context *g = context;
    gpu->matmul(g->c, g->a, g->b, &g->desc);
}

static void bench_gemm(const char *name, int m, int n, int k, bool transpose_a, bool transpose_b, bool master) {
    gemm_context g = {0};
    g.desc = (tf_matmul_desc){m, n, k, transpose_a, transpose_b, master, master, NULL};
    g.a = device_buffer((size_t)m * k, TF_DTYPE_BF16, 1.0f);
    g.b = device_buffer((size_t)k * n, TF_DTYPE_BF16, 0.03f);
    g.c = device_buffer((size_t)m * n, master ? TF_DTYPE_F32 : TF_DTYPE_BF16, 0.0f);
    float min_ms, ms = time_ms(run_gemm, &g, &min_ms);
    char label[160];
    snprintf(label, sizeof label, "%s m=%d n=%d k=%d", name, m, n, k);
    report(label, ms, min_ms, 2.0 * m * n * k, "TFLOP/s");
    gpu->free(g.a);
    gpu->free(g.b);
    gpu->free(g.c);
}

static void bench_pattention_gemms(void) {
    printf("-- Pattention GEMMs (one layer's Q/K/V/O have n = 768, the FFN n = 3072) --\n");
    int ns[2] = {DIM, 4 * DIM};
    for (int i = 0; i < 2; i++) {
        int n = ns[i];
        char name[64];
        snprintf(name, sizeof name, "A = X K^T (n %d)", n);
        bench_gemm(name, ROWS, n, DIM, false, true, false);
        snprintf(name, sizeof name, "out = S V (n %d)", n);
        bench_gemm(name, ROWS, DIM, n, false, false, false);
        snprintf(name, sizeof name, "dS = dout V^T (n %d)", n);
        bench_gemm(name, ROWS, n, DIM, false, true, false);
        snprintf(name, sizeof name, "dV += S^T dout, fp32 (n %d)", n);
        bench_gemm(name, n, DIM, ROWS, true, false, true);
        snprintf(name, sizeof name, "dX = dA K (n %d)", n);
        bench_gemm(name, ROWS, DIM, n, false, false, false);
        snprintf(name, sizeof name, "dK += dA^T X, fp32 (n %d)", n);
        bench_gemm(name, n, DIM, ROWS, true, false, true);
    }
}

/* ---- Pattention norm ---- */
typedef struct {
    void *s, *r, *a, *ds, *da;
    int rows, n;
} norm_context;

static void run_norm_forward(void *context) {
    norm_context *c = context;
    gpu->pattention_norm_forward(c->s, c->r, c->a, c->rows, c->n, 27.7f, 1e-6f, NULL);
}

static void run_norm_backward(void *context) {
    norm_context *c = context;
    gpu->pattention_norm_backward(c->da, c->s, c->ds, c->a, c->r, c->rows, c->n, 27.7f);
}

typedef struct {
    void *pooled, *r, *a;
    int batch, n;
} pool_context;

static void run_norm_pool(void *context) {
    pool_context *c = context;
    gpu->pattention_norm_pool(c->pooled, c->r, c->a, c->batch, TOKENS, c->n, 27.7f, 1e-6f, NULL);
}

/* The last FFN of inference (block_infer_pooled) at the inference batch, 2 x BATCH: it only reads A. */
static void bench_pattention_norm_pool(void) {
    pool_context c = {.batch = 2 * BATCH, .n = 4 * DIM};
    size_t rows = (size_t)c.batch * TOKENS, count = rows * c.n;
    c.a = device_buffer(count, TF_DTYPE_BF16, 1.0f);
    c.pooled = device_buffer((size_t)c.batch * c.n, TF_DTYPE_BF16, 0.0f);
    c.r = device_buffer(rows, TF_DTYPE_F32, 0.0f);
    char label[128];
    float min_ms, ms = time_ms(run_norm_pool, &c, &min_ms);
    snprintf(label, sizeof label, "pattention_norm pool batch=%d tokens=%d n=%d", c.batch, TOKENS, c.n);
    report(label, ms, min_ms, 2.0 * count, "GB/s");
    gpu->free(c.a);
    gpu->free(c.pooled);
    gpu->free(c.r);
}

static void bench_pattention_norm(void) {
    printf("-- Pattention norm --\n");
    int ns[2] = {DIM, 4 * DIM};
    for (int i = 0; i < 2; i++) {
        norm_context c = {0};
        c.rows = ROWS;
        c.n = ns[i];
        size_t count = (size_t)ROWS * c.n;
        c.a = device_buffer(count, TF_DTYPE_BF16, 1.0f);
        c.s = device_buffer(count, TF_DTYPE_BF16, 0.0f);
        c.ds = device_buffer(count, TF_DTYPE_BF16, 1.0f);
        c.da = device_buffer(count, TF_DTYPE_BF16, 0.0f);
        c.r = device_buffer(ROWS, TF_DTYPE_F32, 0.0f);
        char label[128];
        float min_ms, ms = time_ms(run_norm_forward, &c, &min_ms);
        snprintf(label, sizeof label, "pattention_norm forward rows=%d n=%d", ROWS, c.n);
        report(label, ms, min_ms, 4.0 * count + 4.0 * ROWS, "GB/s");
        ms = time_ms(run_norm_backward, &c, &min_ms);
        snprintf(label, sizeof label, "pattention_norm backward rows=%d n=%d", ROWS, c.n);
        report(label, ms, min_ms, 8.0 * count + 4.0 * ROWS, "GB/s");
        gpu->free(c.a);
        gpu->free(c.s);
        gpu->free(c.ds);
        gpu->free(c.da);
        gpu->free(c.r);
    }
    bench_pattention_norm_pool();
}

/* ---- attention ---- */
typedef struct {
    void *q, *k, *v, *out, *lse, *dout, *dq, *dk, *dv;
    int batch;
} attention_context;

static void run_attention_forward(void *context) {
    attention_context *c = context;
    gpu->attention_forward(c->out, c->lse, c->q, c->k, c->v, c->batch, TOKENS, HEADS, HEAD_DIM);
}

static void run_attention_backward(void *context) {
    attention_context *c = context;
    gpu->attention_backward(c->dq, c->dk, c->dv, c->dout, c->q, c->k, c->v, c->out, c->lse, c->batch, TOKENS,
                            HEADS, HEAD_DIM);
}

static void run_attention_both(void *context) {
    run_attention_forward(context);
    run_attention_backward(context);
}

static void bench_attention(void) {
    printf("-- attention %d x %d heads x %d tokens x %d (PyTorch SDPA through cuDNN: 1.05 ms forward + backward) "
           "--\n",
           BATCH, HEADS, TOKENS, HEAD_DIM);
    size_t count = (size_t)2 * ROWS * DIM; /* forward also at the inference batch, 2 x BATCH */
    attention_context c;
    c.q = device_buffer(count, TF_DTYPE_BF16, 1.0f);
    c.k = device_buffer(count, TF_DTYPE_BF16, 1.0f);
    c.v = device_buffer(count, TF_DTYPE_BF16, 1.0f);
    c.dout = device_buffer(count, TF_DTYPE_BF16, 1.0f);
    c.out = device_buffer(count, TF_DTYPE_BF16, 0.0f);
    c.dq = device_buffer(count, TF_DTYPE_BF16, 0.0f);
    c.dk = device_buffer(count, TF_DTYPE_BF16, 0.0f);
    c.dv = device_buffer(count, TF_DTYPE_BF16, 0.0f);
    c.lse = device_buffer((size_t)2 * BATCH * HEADS * TOKENS, TF_DTYPE_F32, 0.0f);
    double forward_flops = 4.0 * BATCH * HEADS * TOKENS * TOKENS * HEAD_DIM, backward_flops = 2.5 * forward_flops;
    if (tf_cuda_attention_use_wgmma(true)) {
        float min_ms, ms;
        char label[128];
        for (c.batch = 2 * BATCH; c.batch >= BATCH; c.batch /= 2) {
            ms = time_ms(run_attention_forward, &c, &min_ms);
            snprintf(label, sizeof label, "attention forward batch %d [%s]", c.batch, tf_cuda_attention_last_forward());
            report(label, ms, min_ms, forward_flops * c.batch / BATCH, "TFLOP/s");
        }
    } else {
        printf("attention forward through wgmma: unavailable (not a GPU of compute capability 9.0)\n");
    }
    tf_cuda_attention_use_wgmma(false); /* cuDNN's and our other kernels, forward and backward */
    for (int use_cudnn = 1; use_cudnn >= 0; use_cudnn--) {
        bool on = tf_cuda_attention_use_cudnn(use_cudnn);
        if (use_cudnn && !on) {
            printf("attention through cuDNN: unavailable (%s)\n", tf_cuda_attention_cudnn_status());
            continue;
        }
        float min_ms, ms;
        char label[128];
        c.batch = 2 * BATCH;
        ms = time_ms(run_attention_forward, &c, &min_ms);
        snprintf(label, sizeof label, "attention forward batch %d [%s]", c.batch, tf_cuda_attention_last_forward());
        report(label, ms, min_ms, 2 * forward_flops, "TFLOP/s");
        c.batch = BATCH;
        ms = time_ms(run_attention_forward, &c, &min_ms);
        snprintf(label, sizeof label, "attention forward [%s]", tf_cuda_attention_last_forward());
        report(label, ms, min_ms, forward_flops, "TFLOP/s");
        ms = time_ms(run_attention_backward, &c, &min_ms);
        snprintf(label, sizeof label, "attention backward [%s]", tf_cuda_attention_last_backward());
        report(label, ms, min_ms, backward_flops, "TFLOP/s");
        ms = time_ms(run_attention_both, &c, &min_ms);
        snprintf(label, sizeof label, "attention forward + backward [%s/%s] (target 1.05 ms)",
                 tf_cuda_attention_last_forward(), tf_cuda_attention_last_backward());
        report(label, ms, min_ms, forward_flops + backward_flops, "TFLOP/s");
        if (use_cudnn && strcmp(tf_cuda_attention_last_forward(), "cudnn") != 0)
            printf("  (cuDNN fell back to our kernels: %s)\n", tf_cuda_attention_last_fallback_reason());
    }
    tf_cuda_attention_use_cudnn(true);
    tf_cuda_attention_use_wgmma(true);
    gpu->free(c.q);
    gpu->free(c.k);
    gpu->free(c.v);
    gpu->free(c.dout);
    gpu->free(c.out);
    gpu->free(c.dq);
    gpu->free(c.dk);
    gpu->free(c.dv);
    gpu->free(c.lse);
}

/* ---- LayerNorm ---- */
typedef struct {
    void *x, *out, *rstd, *dout, *dx, *branch, *residual; /* x, residual: the fp32 stream */
} layernorm_context;

static void run_layernorm_forward(void *context) {
    layernorm_context *c = context;
    gpu->layernorm_forward(c->out, NULL, c->rstd, c->x, NULL, NULL, ROWS, DIM, 1e-6f);
}

static void run_residual_layernorm_forward(void *context) {
    layernorm_context *c = context;
    gpu->residual_layernorm_forward(c->residual, c->out, c->rstd, c->x, c->branch, NULL, ROWS, DIM, TOKENS,
                                    1e-6f);
}

static void run_layernorm_backward(void *context) {
    layernorm_context *c = context;
    gpu->layernorm_backward(c->dx, NULL, NULL, c->dout, c->out, c->rstd, NULL, ROWS, DIM); /* out is xhat */
}

static void bench_layernorm(void) {
    printf("-- LayerNorm --\n");
    size_t count = (size_t)ROWS * DIM;
    layernorm_context c;
    c.x = device_buffer(count, TF_DTYPE_F32, 1.0f);
    c.branch = device_buffer(count, TF_DTYPE_BF16, 1.0f);
    c.dout = device_buffer(count, TF_DTYPE_BF16, 1.0f);
    c.out = device_buffer(count, TF_DTYPE_BF16, 0.0f);
    c.dx = device_buffer(count, TF_DTYPE_BF16, 0.0f);
    c.residual = device_buffer(count, TF_DTYPE_F32, 0.0f);
    c.rstd = device_buffer(ROWS, TF_DTYPE_F32, 0.0f);
    char label[128];
    float min_ms, ms = time_ms(run_layernorm_forward, &c, &min_ms);
    snprintf(label, sizeof label, "layernorm forward rows=%d dim=%d", ROWS, DIM);
    report(label, ms, min_ms, 6.0 * count + 4.0 * ROWS, "GB/s");
    ms = time_ms(run_residual_layernorm_forward, &c, &min_ms);
    snprintf(label, sizeof label, "residual_layernorm forward rows=%d dim=%d", ROWS, DIM);
    report(label, ms, min_ms, 12.0 * count + 4.0 * ROWS, "GB/s");
    ms = time_ms(run_layernorm_backward, &c, &min_ms);
    snprintf(label, sizeof label, "layernorm backward (dx +=) rows=%d dim=%d", ROWS, DIM);
    report(label, ms, min_ms, 8.0 * count + 4.0 * ROWS, "GB/s");
    gpu->free(c.x);
    gpu->free(c.branch);
    gpu->free(c.dout);
    gpu->free(c.out);
    gpu->free(c.dx);
    gpu->free(c.residual);
    gpu->free(c.rstd);
}

/* ---- AdamW ---- */
typedef struct {
    void *master, *compute, *grad, *m, *v;
    tf_adamw_group groups[2];
    tf_adamw_hyper hyper;
} adamw_context;

static void run_adamw(void *context) {
    adamw_context *c = context;
    gpu->adamw_update(c->master, c->compute, c->grad, c->m, c->v, c->groups, 2, &c->hyper);
}

static void bench_adamw(void) {
    printf("-- optimizer --\n");
    size_t n = B16_PARAMETERS;
    adamw_context c;
    c.master = device_buffer(n, TF_DTYPE_F32, 0.02f);
    c.grad = device_buffer(n, TF_DTYPE_F32, 0.001f);
    c.m = device_buffer(n, TF_DTYPE_F32, 0.0f);
    c.v = device_buffer(n, TF_DTYPE_F32, 0.0f);
    c.compute = device_buffer(n, TF_DTYPE_BF16, 0.0f);
    c.groups[0] = (tf_adamw_group){0, n - 200000, 1.0f, 0.3f};
    c.groups[1] = (tf_adamw_group){n - 200000, 200000, 1.0f, 0.0f};
    c.hyper = (tf_adamw_hyper){1.6e-3f, 0.9f, 0.95f, 1e-8f, 1.0f, 10};
    char label[128];
    float min_ms, ms = time_ms(run_adamw, &c, &min_ms);
    snprintf(label, sizeof label, "adamw over %.1fM params (+ bf16 copy)", n / 1e6);
    report(label, ms, min_ms, 30.0 * n, "GB/s");
    gpu->free(c.master);
    gpu->free(c.grad);
    gpu->free(c.m);
    gpu->free(c.v);
    gpu->free(c.compute);
}

int main(int argc, char **argv) {
    if (argc > 1) runs = atoi(argv[1]);
    if (runs < 1) runs = 20;
    if (tf_cuda_backend(&gpu) != TF_OK) {
        printf("bench_kernels_cuda: skipped, no CUDA GPU (%s)\n", tf_error_message());
        return 0;
    }
    random_values = malloc(RANDOM_COUNT * sizeof(float));
    tf_rng rng = tf_rng_make(7, TF_RNG_TEST, 0, 0);
    for (int i = 0; i < RANDOM_COUNT; i++) random_values[i] = (float)tf_rng_normal(&rng);
    printf("bench_kernels_cuda: B/16 layer shapes at batch %d (rows %d), median of %d runs after %d warm-up\n", BATCH,
           ROWS, runs, WARMUP);
    bench_pattention_gemms();
    bench_pattention_norm();
    bench_attention();
    bench_layernorm();
    bench_adamw();
    free(random_values);
    return 0;
}

#else

int main(void) {
    printf("bench_kernels_cuda: skipped, built without CUDA (-DTOKENFORMER_CUDA=OFF)\n");
    return 0;
}

#endif
