/* The whole model on the CPU: gradients of every parameter tensor against central finite
 * differences in double precision (the fp64 CPU backend), with drop path active and both pooling
 * modes; the fp32 backend against the fp64 one; the parameter layout's counts for the four presets
 * of DESIGN.md section 2; drop-path scale statistics; the inference form (model_infer) against
 * model_forward, and the proof that lets it skip a variance pass (vision/variance_proof.c). */
#include "common/config.h"
#include "tests/test_util.h"
#include "vision/layers.h"
#include "vision/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static tf_model_config tiny_config(tf_pool pool, int depth) {
    tf_model_config config = test_small_model_config();
    config.depth = depth;
    config_fill_n_norm(&config); /* n_norm of every block (a block without one computes S = 0) */
    config.pool = pool;
    config.drop_path = 0.5f;
    config.n_norm[1][TF_PATT_K] = 4; /* a grown model's n_norm differs from its token count */
    return config;
}

typedef struct {
    int batch;
    uint8_t *pixels;
    float *targets, *drop_scales;
} tiny_inputs;

static tiny_inputs make_inputs(const tf_model_config *config, int batch, uint64_t seed) {
    tiny_inputs inputs = {.batch = batch};
    size_t pixels = (size_t)batch * config->channels * config->img_size * config->img_size;
    inputs.pixels = malloc(pixels);
    inputs.targets = malloc((size_t)batch * config->classes * sizeof(float));
    inputs.drop_scales = malloc((size_t)config->depth * 2 * batch * sizeof(float));
    tf_rng rng = tf_rng_make(seed, TF_RNG_TEST, 1, 0);
    for (size_t i = 0; i < pixels; i++) inputs.pixels[i] = (uint8_t)tf_rng_below(&rng, 256);
    for (int b = 0; b < batch; b++) {
        double sum = 0.0;
        float *row = inputs.targets + (size_t)b * config->classes;
        for (int c = 0; c < config->classes; c++) sum += row[c] = (float)exp(tf_rng_normal(&rng));
        for (int c = 0; c < config->classes; c++) row[c] = (float)(row[c] / sum);
    }
    /* One dropped branch and scaled-up others, so drop path's backward is exercised. */
    model_drop_scales(config, batch, &rng, inputs.drop_scales);
    inputs.drop_scales[(size_t)(config->depth - 1) * 2 * batch] = 0.0f;
    return inputs;
}

static void free_inputs(tiny_inputs *inputs) {
    free(inputs->pixels);
    free(inputs->targets);
    free(inputs->drop_scales);
}

/* The mean loss after forward and backward. The fp64 backend's per-sample losses are read in
 * double from its (host) buffer: model_backward() reports the mean through fp32 downloads, too
 * coarse for finite differences. */
static double loss_of(tf_model *model, const tiny_inputs *inputs) {
    double loss = 0.0;
    model_load_pixels(model, inputs->pixels, inputs->batch);
    model_forward(model, inputs->batch, inputs->drop_scales);
    model_zero_grads(model);
    CHECK_OK(model_backward(model, inputs->targets, inputs->batch, 1.0f / inputs->batch, &loss));
    if (model->backend->master_dtype != TF_DTYPE_F64) return loss;
    double sum = 0.0;
    for (int b = 0; b < inputs->batch; b++) sum += ((const double *)model->losses)[b];
    return sum / inputs->batch;
}

/* Host parameters stay in double for the finite differences: set through a double buffer. */
static void set_params_f64(tf_model *model, const double *params) {
    model->backend->copy(model->params, params, model->layout.total * sizeof(double));
}

/* For every tensor, the gradient at up to `samples` random positions against central differences. */
static void check_gradients(const char *label, tf_pool pool) {
    const tf_backend *backend = tf_cpu_backend(TF_DTYPE_F64);
    tf_model_config config = tiny_config(pool, 2);
    tf_model model;
    if (!CHECK_OK(model_create(&model, &config, backend, 3, true))) return;
    CHECK_OK(model_init_params(&model, 11));
    size_t total = model.layout.total;
    double *params = malloc(total * sizeof *params), *grads = malloc(total * sizeof *grads);
    memcpy(params, model.params, total * sizeof *params);
    /* Larger values than the init gives, so that every path carries a sizeable gradient. */
    tf_rng rng = tf_rng_make(5, TF_RNG_TEST, 2, 0);
    for (size_t i = 0; i < total; i++) params[i] += 0.3 * tf_rng_normal(&rng);
    set_params_f64(&model, params);
    tiny_inputs inputs = make_inputs(&config, 3, 3);
    loss_of(&model, &inputs);
    memcpy(grads, model.grads, total * sizeof *grads);

    const double h = 1e-5;
    for (int t = 0; t < model.layout.count; t++) {
        const tf_tensor_info *tensor = &model.layout.tensors[t];
        int samples = tensor->count < 12 ? (int)tensor->count : 12;
        double numeric[12], analytic[12];
        for (int s = 0; s < samples; s++) {
            size_t i = tensor->offset + (samples == (int)tensor->count ? (size_t)s : tf_rng_below(&rng, tensor->count));
            double saved = params[i];
            params[i] = saved + h;
            set_params_f64(&model, params);
            double plus = loss_of(&model, &inputs);
            params[i] = saved - h;
            set_params_f64(&model, params);
            double minus = loss_of(&model, &inputs);
            params[i] = saved;
            numeric[s] = (plus - minus) / (2 * h);
            analytic[s] = grads[i];
        }
        double error = relative_error_f64(analytic, numeric, (size_t)samples);
        CHECK(error < 1e-6, "%s %s: gradient vs finite differences %.2e", label, tensor->name, error);
    }
    set_params_f64(&model, params);
    printf("  %s: %d tensors checked against finite differences\n", label, model.layout.count);
    free_inputs(&inputs);
    free(params);
    free(grads);
    model_destroy(&model);
}

/* The fp32 backend computes what the fp64 one does, to fp32 rounding. */
static void check_fp32_matches_fp64(void) {
    tf_model_config config = tiny_config(TF_POOL_AVG, 2);
    tf_model model32, model64;
    CHECK_OK(model_create(&model32, &config, tf_cpu_backend(TF_DTYPE_F32), 4, true));
    CHECK_OK(model_create(&model64, &config, tf_cpu_backend(TF_DTYPE_F64), 4, true));
    CHECK_OK(model_init_params(&model32, 2));
    CHECK_OK(model_init_params(&model64, 2));
    tiny_inputs inputs = make_inputs(&config, 4, 9);
    double loss32 = loss_of(&model32, &inputs), loss64 = loss_of(&model64, &inputs);
    size_t total = model32.layout.total;
    float *grads32 = malloc(total * sizeof *grads32), *grads64 = malloc(total * sizeof *grads64);
    model_get_grads(&model32, grads32);
    model_get_grads(&model64, grads64);
    double error = relative_error_f32(grads32, grads64, total);
    CHECK(fabs(loss32 - loss64) / loss64 < 1e-6, "fp32 loss %.9f vs fp64 %.9f", loss32, loss64);
    CHECK(error < 1e-4, "fp32 gradients vs fp64: relative error %.2e", error);
    printf("  fp32 vs fp64: loss %.3e, gradients %.3e\n", fabs(loss32 - loss64) / loss64, error);
    free(grads32);
    free(grads64);
    free_inputs(&inputs);
    model_destroy(&model32);
    model_destroy(&model64);
}

/* A model made without training (one set of block buffers shared by all blocks, no backward
 * buffers) computes the same logits as a training one. */
static void check_inference_model(void) {
    tf_model_config config = tiny_config(TF_POOL_AVG, 3);
    tf_model training, inference;
    CHECK_OK(model_create(&training, &config, tf_cpu_backend(TF_DTYPE_F32), 4, true));
    CHECK_OK(model_create(&inference, &config, tf_cpu_backend(TF_DTYPE_F32), 4, false));
    CHECK_OK(model_init_params(&training, 8));
    CHECK_OK(model_init_params(&inference, 8));
    tiny_inputs inputs = make_inputs(&config, 4, 12);
    float logits_training[4 * 5], logits_inference[4 * 5];
    model_load_pixels(&training, inputs.pixels, 4);
    model_forward(&training, 4, NULL);
    CHECK_OK(model_logits(&training, logits_training, 4));
    model_load_pixels(&inference, inputs.pixels, 4);
    model_forward(&inference, 4, NULL);
    CHECK_OK(model_logits(&inference, logits_inference, 4));
    CHECK(memcmp(logits_training, logits_inference, sizeof logits_training) == 0,
          "inference-only model gives the training model's logits");
    CHECK(model_memory_bytes(&inference) < model_memory_bytes(&training) / 2, "and needs less memory: %zu vs %zu",
          model_memory_bytes(&inference), model_memory_bytes(&training));
    double loss;
    CHECK(model_backward(&inference, inputs.targets, 4, 0.25f, &loss) != TF_OK, "backward is refused without training");
    free_inputs(&inputs);
    model_destroy(&training);
    model_destroy(&inference);
}

/* Relative error ||got - want|| / ||want|| of two logit arrays. */
static double logits_error(const float *got, const float *want, size_t n) {
    double difference = 0.0, norm = 0.0;
    for (size_t i = 0; i < n; i++) {
        difference += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        norm += (double)want[i] * want[i];
    }
    return sqrt(difference / norm);
}

/* model_infer (LayerNorms folded into the Pattentions, vision/block.c) against model_forward
 * without drop path: the same function, so on the CPU the same logits up to rounding, with the
 * parameters of the moment (the centred keys are rewritten each call). */
static void check_inference_form(tf_dtype dtype, tf_pool pool, double limit) {
    tf_model_config config = tiny_config(pool, 3);
    enum { BATCH = 4 };
    tf_model model;
    if (!CHECK_OK(model_create(&model, &config, tf_cpu_backend(dtype), BATCH, true))) return;
    tiny_inputs inputs = make_inputs(&config, BATCH, 31);
    size_t count = (size_t)BATCH * config.classes;
    float forward_logits[BATCH * 5], infer_logits[BATCH * 5];
    for (uint64_t seed = 3; seed <= 4; seed++) {
        CHECK_OK(model_init_params(&model, seed));
        model_load_pixels(&model, inputs.pixels, BATCH);
        model_forward(&model, BATCH, NULL);
        CHECK_OK(model_logits(&model, forward_logits, BATCH));
        model_infer(&model, BATCH);
        CHECK_OK(model_logits(&model, infer_logits, BATCH));
        double error = logits_error(infer_logits, forward_logits, count);
        CHECK(error <= limit, "%s, %s pool, parameters of seed %d: model_infer's logits within %.3g of "
              "model_forward's: %.3g",
              tf_dtype_name(dtype), pool == TF_POOL_AVG ? "avg" : "cls", (int)seed, limit, error);
    }
    double loss;
    CHECK(model_backward(&model, inputs.targets, BATCH, 0.25f, &loss) != TF_OK,
          "model_backward after model_infer is refused (nothing was kept for it)");
    free_inputs(&inputs);
    model_destroy(&model);
}

/* The trainer loads the next micro-batch between a forward and its backward (model.h: only the
 * forward's first operation reads model->images): the loss and gradients stay bit for bit those
 * of a step with no load in between. */
static void check_load_before_backward(void) {
    tf_model_config config = tiny_config(TF_POOL_AVG, 2);
    tf_model model;
    if (!CHECK_OK(model_create(&model, &config, tf_cpu_backend(TF_DTYPE_F32), 4, true))) return;
    CHECK_OK(model_init_params(&model, 6));
    tiny_inputs inputs = make_inputs(&config, 4, 21), next = make_inputs(&config, 4, 22);
    size_t total = model.layout.total;
    float *plain = malloc(total * sizeof *plain), *loaded = malloc(total * sizeof *loaded);
    double plain_loss = 0.0, loaded_loss = 0.0;
    for (int load_next = 0; load_next < 2; load_next++) {
        model_zero_grads(&model);
        model_load_pixels(&model, inputs.pixels, inputs.batch);
        model_forward(&model, inputs.batch, inputs.drop_scales);
        if (load_next) model_load_pixels(&model, next.pixels, next.batch);
        CHECK_OK(model_backward(&model, inputs.targets, inputs.batch, 0.25f, load_next ? &loaded_loss : &plain_loss));
        model_get_grads(&model, load_next ? loaded : plain);
    }
    CHECK(loaded_loss == plain_loss, "loss with the next batch loaded before backward: %.9f vs %.9f", loaded_loss,
          plain_loss);
    CHECK(memcmp(plain, loaded, total * sizeof *plain) == 0, "and the same gradients, bit for bit");
    free(plain);
    free(loaded);
    free_inputs(&inputs);
    free_inputs(&next);
    model_destroy(&model);
}

/* The gradient hook: ranges that cover the buffer once, head first and embedding last, each final
 * when reported (a snapshot then equals the gradient at the end of backward). */
typedef struct {
    const tf_model *model;
    size_t offsets[64], counts[64];
    float *snapshot;
    int calls;
} hook_record;

static void record_range(void *context, size_t offset, size_t count) {
    hook_record *record = context;
    if (record->calls < 64) {
        record->offsets[record->calls] = offset;
        record->counts[record->calls] = count;
    }
    record->calls++;
    memcpy(record->snapshot + offset, (const float *)record->model->grads + offset, count * sizeof(float));
}

static void check_gradient_hook(void) {
    tf_model_config config = tiny_config(TF_POOL_AVG, 3);
    tf_model model;
    CHECK_OK(model_create(&model, &config, tf_cpu_backend(TF_DTYPE_F32), 3, true));
    CHECK_OK(model_init_params(&model, 4));
    size_t total = model.layout.total;
    hook_record record = {.model = &model, .snapshot = calloc(total, sizeof(float))};
    model_set_gradient_hook(&model, record_range, &record);
    tiny_inputs inputs = make_inputs(&config, 3, 5);
    loss_of(&model, &inputs);
    CHECK(record.calls == config.depth + 2, "%d ranges reported for %d blocks", record.calls, config.depth);
    size_t expected_end = total;
    for (int i = 0; i < record.calls && i < 64; i++) {
        CHECK(record.offsets[i] + record.counts[i] == expected_end, "range %d ends at %zu, expected %zu", i,
              record.offsets[i] + record.counts[i], expected_end);
        expected_end = record.offsets[i];
    }
    CHECK(expected_end == 0, "the last range (the embedding's) starts at 0, not %zu", expected_end);
    float *final = malloc(total * sizeof(float));
    model_get_grads(&model, final);
    CHECK(memcmp(final, record.snapshot, total * sizeof(float)) == 0, "every range was final when reported");
    free(final);
    free(record.snapshot);
    free_inputs(&inputs);
    model_destroy(&model);
}

static void check_preset_counts(void) {
    static const struct {
        const char *preset;
        double millions;
    } presets[] = {{"b16", 114.8}, {"b16_pm", 86.4}, {"l16", 404.7}, {"l16_pm", 304.0}};
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        tf_config config;
        config_defaults(&config);
        CHECK_OK(config_apply_model_preset(&config.model, presets[i].preset));
        CHECK_OK(config_finalize(&config));
        tf_param_layout layout;
        CHECK_OK(param_layout_build(&layout, &config.model));
        double millions = round((double)layout.total / 1e5) / 10.0;
        CHECK(millions == presets[i].millions, "%s: %.1fM parameters, DESIGN.md says %.1fM", presets[i].preset,
              millions, presets[i].millions);
        printf("  %s: %zu parameters (%.1fM)\n", presets[i].preset, layout.total, millions);
        param_layout_free(&layout);
    }
}

/* variance_proof_keys on keys whose bound is known: c times 4 copies of an orthonormal basis of
 * the directions orthogonal to 1 (Helmert's), so that Kc^T Kc = 4 c^2 (I - 11^T / d) and lambda =
 * 4 c^2, 10% either side of the threshold eps 2^(p + 2) / d; with a basis direction left out,
 * lambda = 0. One key row given a mean t: lambda is the same (the mean lies along 1), and the rows
 * over which the proof holds are those with |m| <= sqrt(mu d) / (4 |s|) sigma, |s| = t d. On
 * both CPU backends (keys_exceed reads fp32 keys and fp64 keys). */
static void check_variance_proof_keys(tf_dtype dtype) {
    enum { DIM = 16, COPIES = 4, N = COPIES * (DIM - 1) };
    const tf_backend *backend = tf_cpu_backend(dtype);
    const float eps = 1e-6f;
    const double mu = eps * ldexp(1.0, 24 + 2) / DIM;
    float *keys = malloc((size_t)N * DIM * sizeof *keys);
    void *stored = NULL;
    CHECK_OK(backend->alloc(&stored, (size_t)N * DIM * tf_dtype_size(dtype), "keys"));
    double basis[DIM - 1][DIM];
    for (int k = 1; k < DIM; k++)
        for (int j = 0; j < DIM; j++)
            basis[k - 1][j] = (j < k ? 1.0 : j == k ? -(double)k : 0.0) / sqrt((double)k * (k + 1));
    const double ratios[5] = {0.9, 1.1, 1.2, 1.2, 1.2}; /* 4 c^2 / mu */
    bool proved[5];
    double mean_ratio[5], c = 0.0;
    for (int trial = 0; trial < 5; trial++) {
        c = sqrt(ratios[trial] * mu / COPIES);
        for (int i = 0; i < N; i++)
            for (int j = 0; j < DIM; j++) {
                int direction = i % (DIM - 1);
                double value = c * basis[direction][j];
                if (trial == 3 && direction == 3) value = 0.0;
                if (trial == 4 && i == 0) value += 0.5 * c; /* a mean on one key row */
                keys[(size_t)i * DIM + j] = (float)value;
            }
        backend->upload(stored, dtype, keys, (size_t)N * DIM);
        proved[trial] = variance_proof_keys(backend, stored, N, DIM, eps, 24, &mean_ratio[trial]);
    }
    const char *name = backend->name;
    CHECK(!proved[0] && proved[1] && proved[2],
          "variance proof (%s): lambda at 0.9 / 1.1 / 1.2 x the threshold gives %d %d %d (want 0 1 1)", name,
          proved[0], proved[1], proved[2]);
    CHECK(!proved[3], "variance proof (%s): keys missing a direction (lambda 0) proved", name);
    double expected = sqrt(mu * DIM) / (4.0 * 0.5 * c * DIM);
    CHECK(proved[4] && fabs(mean_ratio[4] / expected - 1.0) < 1e-5,
          "variance proof (%s) with a key row's mean: proved %d, rows within %.6g sigma of their mean "
          "(want 1, %.6g)",
          name, proved[4], mean_ratio[4], expected);
    CHECK(!variance_proof_keys(backend, stored, N, DIM, eps, 53, &mean_ratio[0]),
          "variance proof (%s) in double precision: never for such keys", name);
    backend->free(stored);
    free(keys);
}

/* The inference form with keys scaled up until the proofs hold (x 3000: lambda d well above eps
 * 2^26 for this model's 10 x 8 keys, or 20 x 8 and 30 x 8 stacked): the expected count of variance
 * passes skipped, logits as with every pass read (the CPU sums r^2 in double and rounds r to fp32,
 * so a row may move by an ulp) and as model_forward's; and the proof found again for new
 * parameters (back at the init scale, where it does not hold). */
typedef struct {
    const char *label;
    float eps;                              /* the Pattentions' eps */
    float key_scale[TF_PATTENTIONS_PER_BLOCK]; /* per Pattention of every block */
    int skipped_per_block;
} proof_case;

static void check_variance_proof_in_model(tf_pool pool, proof_case test) {
    tf_model_config config = tiny_config(pool, 3);
    config.eps = test.eps;
    enum { BATCH = 4 };
    tf_model model;
    if (!CHECK_OK(model_create(&model, &config, tf_cpu_backend(TF_DTYPE_F32), BATCH, true))) return;
    CHECK_OK(model_init_params(&model, 3));
    size_t total = model.layout.total;
    float *params = malloc(total * sizeof *params);
    model_get_params(&model, params);
    for (int block = 0; block < config.depth; block++)
        for (int which = 0; which < TF_PATTENTIONS_PER_BLOCK; which++) {
            const tf_tensor_info *keys = &model.layout.tensors[model.layout.keys[block][which]];
            for (size_t i = 0; i < keys->count; i++) params[keys->offset + i] *= test.key_scale[which];
        }
    model_set_params(&model, params);
    tiny_inputs inputs = make_inputs(&config, BATCH, 41);
    size_t count = (size_t)BATCH * config.classes;
    float skipped[BATCH * 5], every[BATCH * 5], forward[BATCH * 5];
    model_load_pixels(&model, inputs.pixels, BATCH);
    model_infer(&model, BATCH);
    CHECK_OK(model_logits(&model, skipped, BATCH));
    int proved = model_variance_passes_skipped(&model);
    CHECK(proved == test.skipped_per_block * config.depth, "variance proof, %s: %d passes skipped, want %d",
          test.label, proved, test.skipped_per_block * config.depth);
    model.read_every_variance = true;
    model_infer(&model, BATCH);
    CHECK_OK(model_logits(&model, every, BATCH));
    model.read_every_variance = false;
    model_forward(&model, BATCH, NULL);
    CHECK_OK(model_logits(&model, forward, BATCH));
    double against_every = logits_error(skipped, every, count),
           against_forward = logits_error(skipped, forward, count);
    CHECK(against_every <= 1e-6, "variance passes skipped, %s: logits within 1e-6 of every pass read's: %.3g",
          test.label, against_every);
    CHECK(against_forward <= 1e-5, "variance passes skipped, %s: logits within 1e-5 of model_forward's: %.3g",
          test.label, against_forward);
    printf("  %s pool, %s: %d variance passes skipped (rows within %.3g sigma of their mean), logits %.2g from "
           "every pass read's, %.2g from model_forward's\n",
           pool == TF_POOL_AVG ? "avg" : "cls", test.label, proved, model.variance_proof_mean_ratio, against_every,
           against_forward);
    CHECK_OK(model_init_params(&model, 3));
    model_infer(&model, BATCH);
    proved = model_variance_passes_skipped(&model);
    CHECK(proved == 0, "variance proof: found again for new parameters (init scale): %d passes skipped, want 0",
          proved);
    free(params);
    free_inputs(&inputs);
    model_destroy(&model);
}

/* The proofs for the FFNs alone; for Q, K and V as well; and with Q's keys small against K's and
 * V's and an eps large enough that var(x) matters in Q's row norms (3% of r^2): Q's share of the
 * three's summed squares is under a quarter on every row, so every row is rechecked with var(x)
 * read (pattention_norm_recheck), and the logits are those with every pass read only if it is. */
static void check_variance_proofs_in_model(void) {
    const proof_case cases[] = {
        {"FFN keys x 3000", 1e-6f, {1, 1, 1, 1, 3000}, 1},
        {"Q, K, V, FFN keys x 3000", 1e-6f, {3000, 3000, 3000, 1, 3000}, 2},
        {"eps 1e-2, K, V, FFN keys x 3e4, Q's x 3", 1e-2f, {3, 3e4f, 3e4f, 1, 3e4f}, 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        check_variance_proof_in_model(TF_POOL_AVG, cases[i]);
        check_variance_proof_in_model(TF_POOL_CLS, cases[i]);
    }
}

/* Drop path keeps a sample of block l with probability 1 - rate_l and scales it by 1/(1 - rate_l). */
static void check_drop_scales(void) {
    tf_model_config config = tiny_config(TF_POOL_AVG, 3);
    config.drop_path = 0.4f;
    enum { batch = 20000 };
    float *scales = malloc((size_t)config.depth * 2 * batch * sizeof *scales);
    tf_rng rng = tf_rng_make(1, TF_RNG_TEST, 3, 0);
    model_drop_scales(&config, batch, &rng, scales);
    for (int block = 0; block < config.depth; block++) {
        double rate = 0.4 * block / (config.depth - 1), mean = 0.0;
        int dropped = 0;
        for (int b = 0; b < 2 * batch; b++) {
            float scale = scales[(size_t)block * 2 * batch + b];
            dropped += scale == 0.0f;
            mean += scale;
        }
        double dropped_share = dropped / (2.0 * batch);
        mean /= 2.0 * batch;
        CHECK(fabs(dropped_share - rate) < 0.01, "block %d dropped %.3f, rate %.3f", block, dropped_share, rate);
        CHECK(fabs(mean - 1.0) < 0.02, "block %d mean scale %.3f", block, mean);
    }
    free(scales);
}

int main(void) {
    check_gradients("avg pool", TF_POOL_AVG);
    check_gradients("cls pool", TF_POOL_CLS);
    check_fp32_matches_fp64();
    check_inference_model();
    /* fp64: equal up to the rounding of the fp32 logits that model_logits hands out. */
    check_inference_form(TF_DTYPE_F64, TF_POOL_AVG, 1e-7);
    check_inference_form(TF_DTYPE_F64, TF_POOL_CLS, 1e-7);
    check_inference_form(TF_DTYPE_F32, TF_POOL_AVG, 1e-5);
    check_inference_form(TF_DTYPE_F32, TF_POOL_CLS, 1e-5);
    check_variance_proof_keys(TF_DTYPE_F32);
    check_variance_proof_keys(TF_DTYPE_F64);
    check_variance_proofs_in_model();
    check_load_before_backward();
    check_gradient_hook();
    check_preset_counts();
    check_drop_scales();
    return test_finish("test_model");
}
