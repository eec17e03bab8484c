/* `tokenformer bench`: throughput of training and inference steps on synthetic input (no loader),
 * and of the loader alone (dataloader/loader_bench.c). Prints img/s, ms per step, the GEMM
 * TFLOP/s achieved and its share of the H100's measured bf16 rate, and the model's memory. */
#include "cli/args.h"
#include "cli/commands.h"
#include "common/config.h"
#include "common/log.h"
#include "common/rng.h"
#include "common/timer.h"
#include "dataloader/loader.h"
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

static tf_status run_steps(tf_model *model, tf_optimizer *optimizer, bool training, int batch, const uint8_t *pixels,
                           const float *targets, const float *drop_scales, int steps) {
    for (int step = 0; step < steps; step++) {
        model_load_pixels(model, pixels, batch);
        if (training) {
            double loss;
            tf_step_result result;
            model_zero_grads(model);
            model_forward(model, batch, drop_scales);
            TF_TRY(model_backward(model, targets, batch, 1.0f / batch, &loss));
            TF_TRY(optimizer_step(optimizer, model, 1e-4, 1.0f, &result));
        } else {
            model_forward(model, batch, NULL);
        }
    }
    return model->backend->synchronize();
}

/* One more step with profiling marks: where its time goes, by operation class; the optimizer's
 * update is timed with marks of its own. */
static tf_status print_profile(tf_model *model, tf_optimizer *optimizer, bool training, int batch, const uint8_t *pixels,
                               const float *targets, const float *drop_scales) {
    tf_op_profile *profile = calloc(1, sizeof *profile);
    if (!profile) return tf_fail(TF_ERR_RUNTIME, "out of memory");
    model_profile_start(model, profile);
    model_load_pixels(model, pixels, batch);
    tf_status status = TF_OK;
    if (training) {
        double loss;
        model_zero_grads(model);
        model_forward(model, batch, drop_scales);
        status = model_backward(model, targets, batch, 1.0f / batch, &loss);
    } else {
        model_forward(model, batch, NULL);
    }
    if (status == TF_OK) status = model_profile_collect(model);
    double optimizer_ms = 0.0;
    if (status == TF_OK && training) {
        tf_step_result result;
        model->backend->profile_mark(0);
        status = optimizer_step(optimizer, model, 1e-4, 1.0f, &result);
        model->backend->profile_mark(1);
        if (status == TF_OK) status = model->backend->synchronize();
        optimizer_ms = model->backend->profile_elapsed_ms(0, 1);
    }
    if (status == TF_OK) {
        double total = optimizer_ms;
        for (int op = 0; op < TF_OP_CLASS_COUNT; op++) total += profile->ms[op];
        printf("  time per operation class (one profiled %s step, %.1f ms):\n", training ? "training" : "inference",
               total);
        for (int op = 0; op < TF_OP_CLASS_COUNT; op++)
            printf("    %-18s %8.2f ms %5.1f%%\n", tf_op_class_name((tf_op_class)op), profile->ms[op],
                   100.0 * profile->ms[op] / total);
        if (training) printf("    %-18s %8.2f ms %5.1f%%\n", "optimizer", optimizer_ms, 100.0 * optimizer_ms / total);
    }
    free(profile);
    return status;
}

static tf_status bench_model(const bench_arguments *arguments, bool training) {
    tf_config config;
    TF_TRY(cli_config_load(&arguments->config, &config));
    int batch = arguments->batch ? arguments->batch : config.schedule.micro_batch ? config.schedule.micro_batch : 64;
    const tf_backend *backend;
    TF_TRY(tf_backend_open(config.run.device, config.run.threads, &backend));
    tf_model model;
    tf_optimizer optimizer = {0};
    TF_TRY(model_create(&model, &config.model, backend, batch, training));
    TF_TRY(model_init_params(&model, config.run.seed));
    if (training) TF_TRY(optimizer_create(&optimizer, &model, &config.optimizer));

    size_t image = (size_t)config.model.channels * config.model.img_size * config.model.img_size;
    /* Pinned on CUDA, as the loader's batch ring is: a pageable copy would cost the step ~7 ms. */
    uint8_t *pixels;
    TF_TRY(backend->host_alloc((void **)&pixels, (size_t)batch * image));
    float *targets = malloc((size_t)batch * config.model.classes * sizeof *targets);
    float *drop_scales = malloc((size_t)config.model.depth * 2 * batch * sizeof *drop_scales);
    synthetic_batch(&config.model, batch, pixels, targets);
    tf_rng rng = tf_rng_make(0, TF_RNG_TEST, 1, 0);
    model_drop_scales(&config.model, batch, &rng, drop_scales);
    const float *scales = config.model.drop_path > 0 ? drop_scales : NULL;

    tf_status status = run_steps(&model, &optimizer, training, batch, pixels, targets, scales, arguments->warmup);
    double start = tf_seconds();
    if (status == TF_OK)
        status = run_steps(&model, &optimizer, training, batch, pixels, targets, scales, arguments->steps);
    double seconds = tf_seconds() - start;
    if (status == TF_OK) {
        double step_ms = 1e3 * seconds / arguments->steps;
        double images_per_second = batch * arguments->steps / seconds;
        double flops = forward_flops_per_image(&config.model) * (training ? 3.0 : 1.0);
        double tflops = flops * images_per_second / 1e12;
        size_t memory = model_memory_bytes(&model);
        if (training) memory += (optimizer.ema ? 3 : 2) * model.layout.total * tf_dtype_size(backend->master_dtype);
        printf("bench %s: %s, batch %d, %d steps after %d warm-up, device %s\n", training ? "train" : "infer",
               arguments->config.path, batch, arguments->steps, arguments->warmup, backend->name);
        printf("  %.1f ms/step, %.1f img/s\n", step_ms, images_per_second);
        printf("  %.1f GFLOP/image, %.1f TFLOP/s = %.1f%% of %.0f TFLOP/s (H100 bf16 GEMM)\n", flops / 1e9, tflops,
               100.0 * tflops / H100_BF16_TFLOPS, H100_BF16_TFLOPS);
        printf("  model memory (parameters, %sactivations): %.2f GiB\n", training ? "gradients, optimizer, " : "",
               (double)memory / (1 << 30));
        size_t device = backend->device_memory_in_use();
        if (device)
            printf("  GPU memory in use at the end: %.2f GiB (everything: CUDA context, library workspaces, buffers)\n",
                   (double)device / (1 << 30));
        status = print_profile(&model, &optimizer, training, batch, pixels, targets, scales);
    }
    backend->host_free(pixels);
    free(targets);
    free(drop_scales);
    if (training) optimizer_destroy(&optimizer, backend);
    model_destroy(&model);
    return status;
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
