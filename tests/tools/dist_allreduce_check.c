/* The NCCL half of train/dist.h on real GPUs, for a machine with one or more (it cannot run in
 * CI). Launch one process per GPU, e.g. on one node with torchrun-style variables:
 *
 *   for r in 0 1; do RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
 *       build/dist_allreduce_check & done; wait
 *
 * or `mpirun -np 2 build/dist_allreduce_check`, or `srun -n 2 build/dist_allreduce_check`. With no
 * launcher it runs as world size 1 on a one-rank NCCL communicator (--no-nccl: without one).
 *
 * Each rank fills --floats (default 115M, the B/16 gradient) with (rank + 1) * (1 + i % 7) and
 * checks, element by element:
 *   - dist_all_reduce_sum_f32 over the whole buffer;
 *   - the bucketed form (--buckets uneven ranges, then dist_all_reduce_wait);
 *   - dist_broadcast_f32 from rank 0;
 *   - dist_all_reduce_host_i64 / _f64 with SUM, MIN and MAX over more values than the scratch;
 * then prints its checksum (every rank must print the same) and rank 0 the all-reduce time and
 * bandwidth over --iterations (bus bandwidth = algorithm bandwidth x 2 (W - 1) / W, as nccl-tests).
 * --abort-rank R: rank R calls dist_abort while the others wait inside an all-reduce that can
 * never complete; every rank must exit with code 1 printing R's message (the watchdog's path),
 * and no collective may run once the abort has freed the others (exit code 2 if one does).
 * Exit code 0 when every check passed, 1 otherwise, 77 in a build without CUDA. */
#include "common/error.h"
#include "common/log.h"
#include "common/timer.h"
#include "kernels/kernels.h"
#include "train/dist.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef TOKENFORMER_CUDA

int main(void) {
    printf("SKIP: dist_allreduce_check needs the CUDA build (-DTOKENFORMER_CUDA=ON)\n");
    return 77;
}

#else

#include <nccl.h>

typedef struct {
    size_t floats;
    int iterations, buckets, abort_rank;
    bool nccl;
} check_options;

static int failures;

static void report(tf_dist *dist, bool ok, const char *what) {
    if (ok) return;
    failures++;
    tf_log("FAIL rank %d: %s", dist_rank(dist), what);
}

/* Stops the run on every rank (a failed call leaves the others inside collectives). */
static int stop(tf_dist *dist, const char *what) {
    char message[1024];
    snprintf(message, sizeof message, "%s: %s", what, tf_error_message());
    dist_abort(dist, message);
    tf_log("%s", message);
    return 1;
}

static float pattern(int rank, size_t i) {
    return (float)(rank + 1) * (float)(1 + i % 7);
}

static void fill(float *host, size_t n, int rank) {
    for (size_t i = 0; i < n; i++)
        host[i] = pattern(rank, i);
}

/* Every element is the sum of the ranks' patterns: world (world + 1) / 2 * (1 + i % 7), exact. */
static bool check_sum(const float *host, size_t n, int world, double *checksum) {
    double ranks = 0.5 * world * (world + 1), sum = 0.0;
    bool ok = true;
    for (size_t i = 0; i < n; i++) {
        ok &= host[i] == (float)(ranks * (double)(1 + i % 7));
        sum += host[i];
    }
    *checksum = sum;
    return ok;
}

static bool check_pattern(const float *host, size_t n, int rank) {
    for (size_t i = 0; i < n; i++)
        if (host[i] != pattern(rank, i)) return false;
    return true;
}

static tf_status round_trip(const tf_backend *backend, float *device, float *host, size_t n) {
    TF_TRY(backend->synchronize());
    backend->download(host, device, TF_DTYPE_F32, n);
    return backend->synchronize();
}

static int check_whole_and_buckets(tf_dist *dist, const tf_backend *backend, const check_options *options,
                                   float *device, float *host) {
    int rank = dist_rank(dist), world = dist_world_size(dist);
    double whole, bucketed;
    fill(host, options->floats, rank);
    backend->upload(device, TF_DTYPE_F32, host, options->floats);
    if (dist_all_reduce_sum_f32(dist, device, options->floats) != TF_OK)
        return stop(dist, "dist_all_reduce_sum_f32");
    if (round_trip(backend, device, host, options->floats) != TF_OK)
        return stop(dist, "after the all-reduce");
    report(dist, check_sum(host, options->floats, world, &whole), "dist_all_reduce_sum_f32: wrong sums");

    /* Uneven buckets, as per-block ranges of the parameter buffer would be. */
    fill(host, options->floats, rank);
    backend->upload(device, TF_DTYPE_F32, host, options->floats);
    size_t offset = 0;
    for (int b = 0; b < options->buckets && offset < options->floats; b++) {
        size_t count = b == options->buckets - 1
                           ? options->floats - offset
                           : options->floats / (size_t)options->buckets * (size_t)(b % 3 + 1) / 2;
        if (count > options->floats - offset) count = options->floats - offset;
        if (dist_all_reduce_sum_f32_range(dist, device, offset, count) != TF_OK)
            return stop(dist, "dist_all_reduce_sum_f32_range");
        offset += count;
    }
    if (dist_all_reduce_wait(dist) != TF_OK) return stop(dist, "dist_all_reduce_wait");
    if (round_trip(backend, device, host, options->floats) != TF_OK) return stop(dist, "after the buckets");
    report(dist, check_sum(host, options->floats, world, &bucketed), "bucketed all-reduce: wrong sums");
    report(dist, whole == bucketed, "whole and bucketed checksums differ");
    printf("rank %d/%d: checksum %.17g (whole) %.17g (buckets)\n", rank, world, whole, bucketed);
    fflush(stdout);
    return 0;
}

static int check_broadcast(tf_dist *dist, const tf_backend *backend, const check_options *options,
                           float *device, float *host) {
    fill(host, options->floats, dist_rank(dist));
    backend->upload(device, TF_DTYPE_F32, host, options->floats);
    if (dist_broadcast_f32(dist, device, options->floats) != TF_OK) return stop(dist, "dist_broadcast_f32");
    if (round_trip(backend, device, host, options->floats) != TF_OK) return stop(dist, "after the broadcast");
    report(dist, check_pattern(host, options->floats, 0), "dist_broadcast_f32: not rank 0's values");
    return 0;
}

/* More values than the 1 MiB scratch holds, so several chunks travel. */
static int check_host_reductions(tf_dist *dist) {
    enum { COUNT = 300000 };
    int rank = dist_rank(dist), world = dist_world_size(dist);
    int64_t *counts = malloc(COUNT * sizeof *counts);
    double *values = malloc(COUNT * sizeof *values);
    if (!counts || !values) return stop(dist, "out of host memory");
    static const tf_dist_op ops[] = {TF_DIST_SUM, TF_DIST_MIN, TF_DIST_MAX};
    for (int o = 0; o < 3; o++) {
        for (int64_t i = 0; i < COUNT; i++) {
            counts[i] = (rank + 1) * i;
            values[i] = (rank + 1) * 0.5 + (double)i;
        }
        if (dist_all_reduce_host_i64(dist, counts, COUNT, ops[o]) != TF_OK)
            return stop(dist, "dist_all_reduce_host_i64");
        if (dist_all_reduce_host_f64(dist, values, COUNT, ops[o]) != TF_OK)
            return stop(dist, "dist_all_reduce_host_f64");
        int64_t factor = ops[o] == TF_DIST_SUM   ? (int64_t)world * (world + 1) / 2
                         : ops[o] == TF_DIST_MIN ? 1
                                                 : world;
        double add = ops[o] == TF_DIST_SUM   ? 0.25 * world * (world + 1)
                     : ops[o] == TF_DIST_MIN ? 0.5
                                             : 0.5 * world;
        double scale = ops[o] == TF_DIST_SUM ? world : 1.0;
        bool ok = true;
        for (int64_t i = 0; i < COUNT; i++)
            ok &= counts[i] == factor * i && values[i] == add + scale * (double)i;
        char what[64];
        snprintf(what, sizeof what, "host all-reduce (op %d): wrong values", o);
        report(dist, ok, what);
    }
    free(counts);
    free(values);
    return 0;
}

static int measure_bandwidth(tf_dist *dist, const tf_backend *backend, const check_options *options,
                             float *device) {
    int world = dist_world_size(dist);
    for (int warmup = 0; warmup < 2; warmup++)
        if (dist_all_reduce_sum_f32(dist, device, options->floats) != TF_OK)
            return stop(dist, "warm-up all-reduce");
    if (backend->synchronize() != TF_OK) return stop(dist, "warm-up synchronize");
    double start = tf_seconds();
    for (int i = 0; i < options->iterations; i++)
        if (dist_all_reduce_sum_f32(dist, device, options->floats) != TF_OK)
            return stop(dist, "timed all-reduce");
    if (backend->synchronize() != TF_OK) return stop(dist, "timed synchronize");
    double seconds = (tf_seconds() - start) / options->iterations;
    double bytes = (double)options->floats * sizeof(float), algorithm = bytes / seconds / 1e9;
    if (dist_is_main(dist))
        printf("all-reduce of %zu floats (%.1f MB) over %d rank(s): %.3f ms, algorithm bandwidth %.1f GB/s, "
               "bus bandwidth %.1f GB/s\n",
               options->floats, bytes / 1e6, world, seconds * 1e3, algorithm,
               algorithm * 2.0 * (world - 1) / (world > 1 ? world : 1));
    return 0;
}

/* Rank abort_rank fails while the others are inside an all-reduce that needs it. */
static int deliberate_abort(tf_dist *dist, const tf_backend *backend, const check_options *options,
                            float *device) {
    if (dist_rank(dist) == options->abort_rank) {
        sleep(1);
        char message[128];
        snprintf(message, sizeof message, "deliberate abort from rank %d (dist_allreduce_check --abort-rank)",
                 options->abort_rank);
        dist_abort(dist, message);
        tf_log("dist_abort returned (world size 1)");
        return 1;
    }
    dist_all_reduce_sum_f32(dist, device, options->floats);
    backend->synchronize();
    /* Only the watchdog's NCCL abort ends that all-reduce; the watchdog then ends the process with
     * code 1 once its connections are drained, and meanwhile every collective must refuse to run. */
    int64_t probe = 1;
    if (dist_all_reduce_host_i64(dist, &probe, 1, TF_DIST_SUM) == TF_OK) {
        tf_log("FAIL: a collective still ran after rank %d's abort", options->abort_rank);
        return 2;
    }
    sleep(30);
    tf_log("FAIL: the watchdog did not end this process within 30 s of rank %d's abort", options->abort_rank);
    return 2;
}

static int parse_options(int argc, char **argv, check_options *options) {
    *options =
        (check_options){.floats = 115000000, .iterations = 20, .buckets = 13, .abort_rank = -1, .nccl = true};
    for (int i = 1; i < argc; i++) {
        bool has_value = i + 1 < argc;
        if (strcmp(argv[i], "--floats") == 0 && has_value)
            options->floats = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--iterations") == 0 && has_value)
            options->iterations = atoi(argv[++i]);
        else if (strcmp(argv[i], "--buckets") == 0 && has_value)
            options->buckets = atoi(argv[++i]);
        else if (strcmp(argv[i], "--abort-rank") == 0 && has_value)
            options->abort_rank = atoi(argv[++i]);
        else if (strcmp(argv[i], "--no-nccl") == 0)
            options->nccl = false;
        else {
            fprintf(stderr,
                    "usage: %s [--floats N] [--iterations K] [--buckets B] [--abort-rank R] [--no-nccl]\n",
                    argv[0]);
            return 2;
        }
    }
    if (options->floats < 1 || options->iterations < 1 || options->buckets < 1) {
        fprintf(stderr, "--floats, --iterations and --buckets must be positive\n");
        return 2;
    }
    return 0;
}

/* The same arguments on every rank, or the rendezvous refuses them. */
static uint64_t arguments_fingerprint(int argc, char **argv) {
    uint64_t hash = TF_DIST_HASH_START;
    for (int i = 1; i < argc; i++)
        hash = dist_hash(argv[i], strlen(argv[i]) + 1, hash);
    return hash;
}

static int run_checks(tf_dist *dist, const check_options *options) {
    const tf_backend *backend;
    if (tf_cuda_backend(&backend) != TF_OK) return stop(dist, "the CUDA backend");
    float *device, *host = malloc(options->floats * sizeof *host);
    if (!host) return stop(dist, "out of host memory for the buffer");
    if (backend->alloc((void **)&device, options->floats * sizeof(float), "all-reduce buffer") != TF_OK)
        return stop(dist, "allocating the buffer");
    int code = options->abort_rank >= 0 ? deliberate_abort(dist, backend, options, device) : 0;
    if (!code) code = check_whole_and_buckets(dist, backend, options, device, host);
    if (!code) code = check_broadcast(dist, backend, options, device, host);
    if (!code) code = check_host_reductions(dist);
    if (!code) code = measure_bandwidth(dist, backend, options, device);
    backend->free(device);
    free(host);
    return code;
}

int main(int argc, char **argv) {
    check_options options;
    int code = parse_options(argc, argv, &options);
    if (code) return code;
    tf_launch launch;
    if (dist_launch_detect(&launch) != TF_OK) {
        fprintf(stderr, "dist_allreduce_check: %s\n", tf_error_message());
        return 2;
    }
    tf_dist_options dist_options = {.fingerprint = arguments_fingerprint(argc, argv),
                                    .timeout_seconds = 120,
                                    .nccl_single_rank = options.nccl};
    tf_dist *dist = NULL;
    if (dist_init(&dist, &launch, &dist_options) != TF_OK) return stop(dist, "dist_init");
    if (dist_is_main(dist)) {
        int version = 0;
        ncclGetVersion(&version);
        tf_log("launcher %s, world size %d, NCCL %d, NCCL_NVLS_ENABLE=%s, %zu floats",
               dist_launcher_name(launch.launcher), dist_world_size(dist), version,
               getenv("NCCL_NVLS_ENABLE"), options.floats);
    }
    code = run_checks(dist, &options);
    /* Everyone learns whether anyone failed, so that all ranks agree on the exit code. */
    int64_t failed = failures;
    if (!code && dist_all_reduce_host_i64(dist, &failed, 1, TF_DIST_SUM) != TF_OK)
        return stop(dist, "counting failures");
    bool main_rank = dist_is_main(dist);
    if (dist_finish(dist) != TF_OK) {
        tf_log("dist_finish: %s", tf_error_message());
        return 1;
    }
    if (!code && main_rank) printf("%s: %" PRId64 " failed check(s)\n", failed ? "FAIL" : "OK", failed);
    return code ? code : failed ? 1 : 0;
}

#endif
