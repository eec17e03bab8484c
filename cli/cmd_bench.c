/* `tokenformer bench`: throughput of training and inference steps on synthetic input (no loader),
 * and of the loader alone (dataloader/loader_bench.c). Prints img/s, ms per step, the GEMM
 * TFLOP/s achieved and its share of the H100's measured bf16 rate, and the model's memory.
 * Under a launcher (torchrun-style variables, mpirun, srun: train/dist.h) it runs one rank per
 * GPU, each with --batch images, and training reports what the gradient all-reduce costs. */
#include "cli/args.h"
#include "cli/commands.h"
#include "common/config.h"
#include "common/log.h"
#include "common/rng.h"
#include "common/timer.h"
#include "dataloader/loader.h"
#include "train/dist.h"
#include "train/mixup.h"
#include "train/optimizer.h"
#include "vision/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* bf16 8192^3 GEMM on the H100 of DESIGN.md section 6: the rate MFU is measured against. */
#define H100_BF16_TFLOPS 798.0

typedef struct {
    const char *mode;
    cli_config_source config;
    int batch, steps, warmup;
} bench_arguments;

/* GEMM FLOPs of one image's forward pass: patch projection, per block two GEMMs for each of the
 * five Pattentions and two for attention (Q K^T and P V), and the head. Backward costs twice that. */
static double forward_flops_per_image(const tf_model_config *config) {
    double tokens = 1.0 + (double)(config->img_size / config->patch) * (config->img_size / config->patch);
    double patches = tokens - 1.0, d = config->dim;
    double patch = 2.0 * patches * config->channels * config->patch * config->patch * d;
    double pattentions = 4.0 * 2.0 * (2.0 * tokens * d * config->n_attn) + 2.0 * (2.0 * tokens * d * config->n_ffn);
    double attention = 2.0 * (2.0 * tokens * tokens * d);
    return patch + config->depth * (pattentions + attention) + 2.0 * d * config->classes;
}

static tf_status parse_arguments(int argc, char **argv, bench_arguments *arguments) {
    cli_parser parser = cli_parser_make(argc, argv);
    const char *value;
    *arguments = (bench_arguments){.steps = 20, .warmup = 3};
    while (cli_more(&parser)) {
        if (!arguments->mode && cli_positional(&parser, &arguments->mode)) continue;
        if (cli_config_option(&parser, &arguments->config)) continue;
        if (cli_value(&parser, "--batch", &value)) {
            arguments->batch = cli_int(&parser, "--batch", value);
            continue;
        }
        if (cli_value(&parser, "--steps", &value)) {
            arguments->steps = cli_int(&parser, "--steps", value);
            continue;
        }
        if (cli_value(&parser, "--warmup", &value)) {
            arguments->warmup = cli_int(&parser, "--warmup", value);
            continue;
        }
        cli_unknown(&parser);
    }
    TF_TRY(parser.status);
    if (!arguments->config.path) return tf_fail(TF_ERR_USAGE, "--config FILE.yaml is required");
    if (arguments->steps < 1 || arguments->warmup < 0) return tf_fail(TF_ERR_USAGE, "--steps must be at least 1");
    return TF_OK;
}

/* Random pixels and smoothed one-hot targets: the work per step does not depend on the values. */
static void synthetic_batch(const tf_model_config *config, int batch, uint8_t *pixels, float *targets) {
    tf_rng rng = tf_rng_make(0, TF_RNG_TEST, 0, 0);
    size_t count = (size_t)batch * config->channels * config->img_size * config->img_size;
    for (size_t i = 0; i < count; i++) pixels[i] = (uint8_t)tf_rng_below(&rng, 256);
    int32_t *labels = malloc((size_t)batch * sizeof *labels);
    for (int b = 0; b < batch; b++) labels[b] = (int32_t)tf_rng_below(&rng, (uint64_t)config->classes);
    mixup_targets(labels, batch, config->classes, 0.1f, 1.0f, targets);
    free(labels);
}

/* How a training step sums the gradients over the ranks: as the trainer does (each layer's
 * all-reduce started as soon as backward has written its gradients, overlapping the layers
 * below), in one all-reduce after backward, or not at all (what communication costs). */
typedef enum { TF_BENCH_REDUCE_OVERLAPPED, TF_BENCH_REDUCE_AFTER_BACKWARD, TF_BENCH_REDUCE_NONE } tf_bench_reduce;

/* One benchmark run: the model, its optimizer and a synthetic batch on this rank's GPU. With a
 * launcher (train/dist.h) every rank runs a batch of its own, and training sums the gradients
 * over the ranks each step as the trainer does: per layer, overlapped with the backward pass. */
typedef struct {
    const tf_backend *backend;
    tf_dist *dist;
    tf_model model;
    tf_optimizer optimizer;
    bool training;
    tf_dist_gradient_sum gradient_sum; /* the per-layer all-reduce's hook */
    int batch;
    uint8_t *pixels;          /* pinned host [batch, channels, size, size] */
    float *targets;           /* host [batch, classes] */
    float *drop_scales;       /* host [depth, 2, batch], or NULL without drop path */
} tf_bench;

static tf_status run_steps(tf_bench *bench, tf_bench_reduce reduce, int steps) {
    tf_model *model = &bench->model;
    bool several = bench->training && dist_world_size(bench->dist) > 1;
    bool overlapped = several && reduce == TF_BENCH_REDUCE_OVERLAPPED;
    bool after_backward = several && reduce == TF_BENCH_REDUCE_AFTER_BACKWARD;
    model_set_gradient_hook(model, overlapped ? dist_gradient_ready : NULL, &bench->gradient_sum);
    /* As the trainer does: a training step's batch is loaded during the previous step's backward
     * (the first step's by bench_open; every step loads the same synthetic batch). */
    for (int step = 0; step < steps; step++) {
        if (bench->training) {
            double loss;
            tf_step_result result;
            model_zero_grads(model);
            model_forward(model, bench->batch, bench->drop_scales);
            model_load_pixels(model, bench->pixels, bench->batch);
            TF_TRY(model_backward(model, bench->targets, bench->batch, 1.0f / bench->batch, &loss));
            TF_TRY(bench->gradient_sum.status);
            if (overlapped) TF_TRY(dist_all_reduce_wait(bench->dist));
            if (after_backward)
                TF_TRY(dist_all_reduce_sum_f32(bench->dist, (float *)model->grads, model->layout.total));
            TF_TRY(optimizer_step(&bench->optimizer, model, 1e-4, 1.0f, &result));
        } else {
            model_load_pixels(model, bench->pixels, bench->batch);
            model_infer(model, bench->batch);
        }
    }
    model_set_gradient_hook(model, NULL, NULL);
    return bench->backend->synchronize();
}

/* Seconds for `steps` steps, the slowest rank's (the ranks wait for each other in the
 * all-reduces, and the throughput of all is the slowest one's). */
static tf_status time_steps(tf_bench *bench, tf_bench_reduce reduce, int steps, double *seconds) {
    double start = tf_seconds();
    TF_TRY(run_steps(bench, reduce, steps));
    *seconds = tf_seconds() - start;
    return dist_all_reduce_host_f64(bench->dist, seconds, 1, TF_DIST_MAX);
}

/* With several ranks: what the gradient all-reduce costs. Alone (the whole gradient buffer in
 * one all-reduce, nothing else running), and in a step: the trainer's per-layer all-reduces
 * overlapping backward, and one all-reduce after backward, each against the same step with none. */
static tf_status print_communication(tf_bench *bench, int steps, double step_seconds) {
    double none_seconds, after_seconds, reduce_seconds;
    TF_TRY(time_steps(bench, TF_BENCH_REDUCE_NONE, steps, &none_seconds));
    TF_TRY(time_steps(bench, TF_BENCH_REDUCE_AFTER_BACKWARD, steps, &after_seconds));
    size_t count = bench->model.layout.total;
    double start = tf_seconds();
    for (int i = 0; i < steps; i++) TF_TRY(dist_all_reduce_sum_f32(bench->dist, (float *)bench->model.grads, count));
    TF_TRY(bench->backend->synchronize());
    reduce_seconds = (tf_seconds() - start) / steps;
    TF_TRY(dist_all_reduce_host_f64(bench->dist, &reduce_seconds, 1, TF_DIST_MAX));
    if (!dist_is_main(bench->dist)) return TF_OK;
    int world = dist_world_size(bench->dist);
    double step_ms = 1e3 * step_seconds / steps, none_ms = 1e3 * none_seconds / steps;
    double after_ms = 1e3 * after_seconds / steps;
    double bytes = (double)count * sizeof(float);
    /* Bus bandwidth as nccl-tests define it: what each link carries in a ring all-reduce. */
    double bus = bytes / reduce_seconds * 2.0 * (world - 1) / world;
    printf("  gradient all-reduce of %.1fM fp32 alone: %.2f ms (%.0f GB/s bus bandwidth), %.1f%% of a step\n",
           count / 1e6, 1e3 * reduce_seconds, bus / 1e9, 100.0 * 1e3 * reduce_seconds / step_ms);
    printf("  step with no all-reduce: %.1f ms; per layer overlapping backward (the trainer's): %.1f ms, "
           "%.2f ms (%.1f%%) exposed; one after backward: %.1f ms, %.2f ms (%.1f%%)\n",
           none_ms, step_ms, step_ms - none_ms, 100.0 * (step_ms - none_ms) / step_ms, after_ms,
           after_ms - none_ms, 100.0 * (after_ms - none_ms) / after_ms);
    return TF_OK;
}

/* One more step with profiling marks: where its time goes, by operation class; the optimizer's
 * update is timed with marks of its own. Gradients are not all-reduced in it. */
static tf_status print_profile(tf_bench *bench) {
    tf_model *model = &bench->model;
    const tf_backend *backend = bench->backend;
    tf_op_profile *profile = calloc(1, sizeof *profile);
    if (!profile) return tf_fail(TF_ERR_RUNTIME, "out of memory");
    model_profile_start(model, profile);
    model_load_pixels(model, bench->pixels, bench->batch);
    tf_status status = TF_OK;
    if (bench->training) {
        double loss;
        model_zero_grads(model);
        model_forward(model, bench->batch, bench->drop_scales);
        status = model_backward(model, bench->targets, bench->batch, 1.0f / bench->batch, &loss);
    } else {
        model_infer(model, bench->batch);
    }
    if (status == TF_OK) status = model_profile_collect(model);
    double optimizer_ms = 0.0;
    if (status == TF_OK && bench->training) {
        tf_step_result result;
        backend->profile_mark(0);
        status = optimizer_step(&bench->optimizer, model, 1e-4, 1.0f, &result);
        backend->profile_mark(1);
        if (status == TF_OK) status = backend->synchronize();
        optimizer_ms = backend->profile_elapsed_ms(0, 1);
    }
    if (status == TF_OK) {
        double total = optimizer_ms;
        for (int op = 0; op < TF_OP_CLASS_COUNT; op++) total += profile->ms[op];
        printf("  time per operation class (one profiled %s step, %.1f ms):\n",
               bench->training ? "training" : "inference", total);
        for (int op = 0; op < TF_OP_CLASS_COUNT; op++)
            printf("    %-18s %8.2f ms %5.1f%%\n", tf_op_class_name((tf_op_class)op), profile->ms[op],
                   100.0 * profile->ms[op] / total);
        if (bench->training)
            printf("    %-18s %8.2f ms %5.1f%%\n", "optimizer", optimizer_ms, 100.0 * optimizer_ms / total);
    }
    free(profile);
    return status;
}

/* Under a launcher, one rank per GPU; every rank must run the same benchmark. */
static tf_status open_process_group(const bench_arguments *arguments, const tf_config *config, int batch,
                                    tf_dist **dist) {
    char extra[128];
    snprintf(extra, sizeof extra, "bench %s batch=%d steps=%d warmup=%d", arguments->mode, batch,
             arguments->steps, arguments->warmup);
    uint64_t fingerprint;
    TF_TRY(dist_config_fingerprint(config, extra, &fingerprint));
    return dist_join(dist, fingerprint);
}

static tf_status bench_open(tf_bench *bench, const tf_config *config) {
    const tf_model_config *model_config = &config->model;
    /* Several ranks need their GPUs: no quiet fallback to the CPU. */
    tf_device device = dist_world_size(bench->dist) > 1 ? TF_DEVICE_CUDA : config->run.device;
    TF_TRY(tf_backend_open(device, config->run.threads, &bench->backend));
    TF_TRY(model_create(&bench->model, model_config, bench->backend, bench->batch, bench->training));
    bench->gradient_sum = (tf_dist_gradient_sum){.dist = bench->dist, .grads = bench->model.grads};
    TF_TRY(model_init_params(&bench->model, config->run.seed));
    if (bench->training) TF_TRY(optimizer_create(&bench->optimizer, &bench->model, &config->optimizer));
    size_t image = (size_t)model_config->channels * model_config->img_size * model_config->img_size;
    /* Pinned on CUDA, as the loader's batch ring is: a pageable copy would cost the step ~7 ms. */
    TF_TRY(bench->backend->host_alloc((void **)&bench->pixels, (size_t)bench->batch * image));
    bench->targets = malloc((size_t)bench->batch * model_config->classes * sizeof *bench->targets);
    float *drop_scales = malloc((size_t)model_config->depth * 2 * bench->batch * sizeof *drop_scales);
    if (!bench->targets || !drop_scales) {
        free(drop_scales);
        return tf_fail(TF_ERR_RUNTIME, "out of host memory");
    }
    synthetic_batch(model_config, bench->batch, bench->pixels, bench->targets);
    model_load_pixels(&bench->model, bench->pixels, bench->batch);
    tf_rng rng = tf_rng_make(0, TF_RNG_TEST, 1, 0);
    model_drop_scales(model_config, bench->batch, &rng, drop_scales);
    if (model_config->drop_path > 0)
        bench->drop_scales = drop_scales;
    else
        free(drop_scales);
    return TF_OK;
}

static void bench_close(tf_bench *bench) {
    if (bench->pixels) bench->backend->host_free(bench->pixels);
    free(bench->targets);
    free(bench->drop_scales);
    if (bench->optimizer.m) optimizer_destroy(&bench->optimizer, bench->backend);
    if (bench->model.params) model_destroy(&bench->model);
}

static void print_throughput(const tf_bench *bench, const bench_arguments *arguments, const tf_config *config,
                             double seconds) {
    int world = dist_world_size(bench->dist);
    double step_ms = 1e3 * seconds / arguments->steps;
    double per_gpu = bench->batch * arguments->steps / seconds;
    double flops = forward_flops_per_image(&config->model) * (bench->training ? 3.0 : 1.0);
    double tflops = flops * per_gpu / 1e12;
    printf("bench %s: %s, batch %d, %d steps after %d warm-up, device %s", bench->training ? "train" : "infer",
           arguments->config.path, bench->batch, arguments->steps, arguments->warmup, bench->backend->name);
    if (world > 1) printf(" x %d ranks (batch %d per rank)", world, bench->batch);
    printf("\n  %.1f ms/step, %.1f img/s", step_ms, per_gpu * world);
    if (world > 1) printf(" in all, %.1f img/s per GPU", per_gpu);
    printf("\n  %.1f GFLOP/image, %.1f TFLOP/s%s = %.1f%% of %.0f TFLOP/s (H100 bf16 GEMM)\n", flops / 1e9, tflops,
           world > 1 ? " per GPU" : "", 100.0 * tflops / H100_BF16_TFLOPS, H100_BF16_TFLOPS);
    if (!bench->training) {
        int skipped = model_variance_passes_skipped(&bench->model), depth = bench->model.config.depth;
        printf("  variance passes skipped: %d of %d (keys that bound eps var(x) below the row norms' precision",
               skipped, 2 * depth);
        if (skipped) printf(" on rows within %.0f sigma of their mean", bench->model.variance_proof_mean_ratio);
        printf("; vision/variance_proof.c)\n");
    }
    size_t memory = model_memory_bytes(&bench->model);
    size_t master_bytes = bench->model.layout.total * tf_dtype_size(bench->backend->master_dtype);
    if (bench->training) memory += (bench->optimizer.ema ? 3 : 2) * master_bytes; /* gradients, m, v, EMA */
    printf("  model memory (parameters, %sactivations): %.2f GiB\n", bench->training ? "gradients, optimizer, " : "",
           (double)memory / (1 << 30));
    size_t device = bench->backend->device_memory_in_use();
    if (device)
        printf("  GPU memory in use at the end: %.2f GiB (everything: CUDA context, library workspaces, buffers)\n",
               (double)device / (1 << 30));
}

static tf_status bench_measure(tf_bench *bench, const bench_arguments *arguments, const tf_config *config) {
    TF_TRY(run_steps(bench, TF_BENCH_REDUCE_OVERLAPPED, arguments->warmup));
    double seconds;
    TF_TRY(time_steps(bench, TF_BENCH_REDUCE_OVERLAPPED, arguments->steps, &seconds));
    if (dist_is_main(bench->dist)) print_throughput(bench, arguments, config, seconds);
    if (bench->training && dist_world_size(bench->dist) > 1)
        TF_TRY(print_communication(bench, arguments->steps, seconds));
    /* The profile is rank 0's alone: it runs no collective. */
    return dist_is_main(bench->dist) ? print_profile(bench) : TF_OK;
}

static tf_status bench_model(const bench_arguments *arguments, bool training) {
    tf_config config;
    TF_TRY(cli_config_load(&arguments->config, &config));
    tf_bench bench = {.training = training};
    bench.batch = arguments->batch ? arguments->batch : config.schedule.micro_batch ? config.schedule.micro_batch : 64;
    tf_status status = open_process_group(arguments, &config, bench.batch, &bench.dist);
    if (status == TF_OK) status = bench_open(&bench, &config);
    if (status == TF_OK) status = bench_measure(&bench, arguments, &config);
    /* A failure on this rank stops all of them with its message (returns at world size 1). */
    if (status != TF_OK) dist_abort(bench.dist, tf_error_message());
    bench_close(&bench);
    tf_status finished = dist_finish(bench.dist);
    return status != TF_OK ? status : finished;
}

int cmd_bench(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "loader") == 0) return loader_bench_main(argc - 1, argv + 1);
    bench_arguments arguments;
    tf_status status = parse_arguments(argc, argv, &arguments);
    if (status == TF_OK && (!arguments.mode || (strcmp(arguments.mode, "train") && strcmp(arguments.mode, "infer"))))
        status = tf_fail(TF_ERR_USAGE, "say what to measure: bench train, bench infer or bench loader");
    if (status == TF_OK) status = bench_model(&arguments, strcmp(arguments.mode, "train") == 0);
    return cli_report("bench", status);
}
