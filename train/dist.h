/* Data parallelism over many processes, one per GPU, on one node or many (issue 5, "Many GPUs").
 *
 * Three parts:
 *  1. Launch detection (dist_launch_detect, train/dist_launch.c): this process's rank, the world
 *     size, its GPU on the node and where rank 0 is, from the environment that torchrun-style
 *     launchers, OpenMPI's mpirun or Slurm's srun set. Besides the config reader, the only code
 *     that reads the environment.
 *  2. A control channel (train/dist.c, no CUDA in it, so it is tested on the CPU): a TCP
 *     rendezvous at MASTER_ADDR:MASTER_PORT where rank 0 hands every rank the NCCL unique id and
 *     checks that all ranks agree on the world size and on a fingerprint of the run. The
 *     connections stay open: a watchdog thread on every rank ends the process (exit code 1, after
 *     aborting NCCL) when any rank calls dist_abort() or disappears without dist_finish(), so a
 *     failure never leaves the other ranks hanging inside a collective. That exit from a thread
 *     is the documented exception to "nothing calls exit deep inside": the main thread may be
 *     stuck in a collective that can never complete.
 *  3. With TOKENFORMER_CUDA: an NCCL communicator and the collectives of training (gradient
 *     all-reduce, whole or in buckets) and evaluation (host counts). World size 1 makes every
 *     collective a no-op, so one code path serves one GPU and many.
 *
 * The order of calls in a program (train.c; dist_join does the first two):
 *   dist_launch_detect(&launch)          rank, world size, master address
 *   dist_init(&dist, &launch, &options)  rendezvous, watchdog, this rank's GPU, NCCL communicator
 *   tf_backend_open(...)                 the CUDA backend on that GPU
 *   ... dist_all_reduce_sum_f32(dist, gradients, count) every step ...
 *   dist_finish(dist)                    on success; on failure dist_abort(dist, tf_error_message())
 */
#ifndef TF_TRAIN_DIST_H
#define TF_TRAIN_DIST_H

#include "common/config.h"
#include "common/error.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum {
    TF_DIST_HOST_MAX = 256,       /* host names and addresses, with the terminating NUL */
    TF_DIST_DEFAULT_PORT = 29500, /* torchrun's default MASTER_PORT */
    TF_DIST_ID_BYTES = 128,       /* NCCL_UNIQUE_ID_BYTES */
    TF_DIST_MESSAGE_MAX = 1024,   /* longest failure message sent to the other ranks */
};

/* ---- 1. launch detection --------------------------------------------------------------------- */

typedef enum {
    TF_LAUNCHER_NONE,     /* no launcher variables: one process */
    TF_LAUNCHER_TORCHRUN, /* RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT */
    TF_LAUNCHER_OPENMPI,  /* OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE} */
    TF_LAUNCHER_SLURM,    /* SLURM_PROCID, SLURM_NTASKS (SLURM_STEP_NUM_TASKS), SLURM_LOCALID */
} tf_launcher;

typedef struct {
    tf_launcher launcher;
    int rank, world_size;
    int local_rank;                     /* index of this process on its node: its GPU */
    int local_size;                     /* processes on this node; 0 when the launcher does not say */
    char master_addr[TF_DIST_HOST_MAX]; /* rank 0's host ("" with world size 1) */
    int master_port;      /* where rank 0 listens for the rendezvous */
    char master_from[96]; /* where the address came from, for messages: "MASTER_ADDR", ... */
    char port_from[96];   /* where the port came from, likewise: "MASTER_PORT", ... */
} tf_launch;

/* Reads the launcher's variables. Precedence when several are present: torchrun-style variables,
 * then OpenMPI's, then Slurm's (mpirun or torchrun inside a Slurm allocation wins over the
 * allocation's own variables). Where rank 0 is:
 *   torchrun: MASTER_ADDR and MASTER_PORT (both required when WORLD_SIZE > 1); when torchrun's
 *             agent says it serves its own store there (TORCHELASTIC_USE_AGENT_STORE=True: static
 *             rendezvous, and c10d in newer PyTorch), the port is taken, and rank 0 listens on
 *             MASTER_PORT + 1;
 *   OpenMPI:  MASTER_ADDR / MASTER_PORT when set; else, when all ranks are on one node
 *             (OMPI_COMM_WORLD_LOCAL_SIZE == OMPI_COMM_WORLD_SIZE), 127.0.0.1 and port 29500;
 *             else an error saying to set them (mpirun -x MASTER_ADDR=... -x MASTER_PORT=...);
 *   Slurm:    MASTER_ADDR, else the first host of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST or
 *             SLURM_NODELIST; MASTER_PORT, else 29500 + SLURM_JOB_ID % 1000. A batch script with
 *             SLURM_NTASKS > 1 that was not started by srun (no SLURM_STEP_NUM_TASKS) is an error,
 *             not one of N processes waiting for the N - 1 that will never come.
 * No launcher: world size 1. Errors (TF_ERR_USAGE) name the variables: a missing partner
 * variable, a value that is not an integer, a rank outside [0, world size), a bad port. */
tf_status dist_launch_detect(tf_launch *launch);

/* "none", "torchrun", "openmpi", "slurm". */
const char *dist_launcher_name(tf_launcher launcher);

/* Expands Slurm's compressed host list into "host,host,..." in hosts: "gpu[01-04,07]" ->
 * "gpu01,gpu02,gpu03,gpu04,gpu07"; ranges keep the width of their lower bound; several bracket
 * groups in one name multiply ("r[1-2]n[1-2]" -> "r1n1,r1n2,r2n1,r2n2"); text may follow a
 * group ("n[1-3]x"). Errors name the list: an unclosed bracket, a bad range, hosts too long. */
tf_status dist_nodelist_expand(const char *nodelist, char *hosts, size_t size);
/* The first host of such a list (without expanding the rest). */
tf_status dist_nodelist_first(const char *nodelist, char *host, size_t size);

/* 64-bit FNV-1a over bytes, continuing from hash (start with TF_DIST_HASH_START). */
#define TF_DIST_HASH_START 0xcbf29ce484222325ull
uint64_t dist_hash(const void *data, size_t size, uint64_t hash);

/* The run fingerprint that every rank must agree on: the hash of the resolved config as
 * config_print() writes it, continued over extra (the command's options, or "" ). */
tf_status dist_config_fingerprint(const tf_config *config, const char *extra, uint64_t *fingerprint);

/* ---- 2. the process group and its control channel ---------------------------------------------- */

/* Sets NCCL_NVLS_ENABLE=0 unless the user set it (NVLink multicast can take the shared machine's
 * GPUs down), then, with world size > 1, cudaSetDevice() to this rank's GPU: local_rank, or 0
 * when the launcher made exactly one GPU visible to each process (CUDA_VISIBLE_DEVICES per task).
 * dist_init() calls it after the rendezvous; call it yourself only in a program that touches CUDA
 * before dist_init() (calling it twice is harmless). Without TOKENFORMER_CUDA, world size > 1 is
 * an error. */
tf_status dist_select_device(const tf_launch *launch);

typedef struct {
    uint64_t fingerprint;   /* the run's fingerprint (dist_config_fingerprint) */
    double timeout_seconds; /* how long the rendezvous waits for all ranks; 0 = 300 */
    bool nccl_single_rank;  /* with world size 1, still open a one-rank NCCL communicator (to
                               test the NCCL path on one GPU); otherwise world size 1 uses none */
} tf_dist_options;

typedef struct tf_dist tf_dist;

/* The process group: with world size 1 a plain record (no sockets, no threads, no NCCL); with
 * more, the rendezvous (rank 0 generates the NCCL id), the watchdog, dist_select_device(), then
 * ncclCommInitRank. Call it before the CUDA backend starts (it picks the GPU the backend will
 * use). Without TOKENFORMER_CUDA, world size > 1 is an error.
 * On a failure after the control channel is up (GPU, NCCL), *dist is left set so that the caller
 * passes the error to dist_abort() and every rank stops with it; on earlier failures *dist is
 * NULL, and rendezvous failures (mismatched fingerprint or world size, timeouts) are reported by
 * every rank that reached rank 0. */
tf_status dist_init(tf_dist **dist, const tf_launch *launch, const tf_dist_options *options);

/* What a command does under whatever launcher started it: dist_launch_detect(), then dist_init()
 * with the run's fingerprint and the default options. */
tf_status dist_join(tf_dist **dist, uint64_t fingerprint);

/* The CPU half of dist_init (what the tests run): the rendezvous, where rank 0 sends its
 * blob_size bytes of blob to every rank and the others receive them into blob, then the
 * watchdog. Messages and timeouts as dist_init. */
tf_status dist_connect(tf_dist **dist, const tf_launch *launch, const tf_dist_options *options, void *blob,
                       size_t blob_size);

/* Stops every rank with message: logs "rank R failed: message" here, sends it to rank 0, which
 * forwards it to all; every rank then logs the same line, aborts its NCCL communicator and exits
 * with code 1. Does not return when the world size is > 1; with world size 1 (or dist NULL) it
 * returns at once, and the caller reports the error as usual. */
void dist_abort(tf_dist *dist, const char *message);

/* The normal end: waits for the collectives queued, destroys the communicator, tells the other
 * ranks that this one finished (so its closed connection is not a failure to them), closes the
 * channel and frees dist. NULL is fine. Returns the first NCCL/CUDA failure of the teardown. */
tf_status dist_finish(tf_dist *dist);

/* Rank, world size and local rank; NULL reads as rank 0 of 1. */
int dist_rank(const tf_dist *dist);
int dist_world_size(const tf_dist *dist);
int dist_local_rank(const tf_dist *dist);
/* Rank 0: the one that logs progress, writes checkpoints and metrics. */
bool dist_is_main(const tf_dist *dist);

/* ---- 3. collectives (NCCL; no-ops with world size 1 and no communicator) ----------------------- */

typedef enum { TF_DIST_SUM, TF_DIST_MIN, TF_DIST_MAX } tf_dist_op;

/* buffer (fp32 device memory, e.g. the master gradients) = its sum over all ranks, in place.
 * Ordered after the work queued on tf_cuda_stream() before the call, and the work queued there
 * after it sees the sums; the host does not wait. The trainer scales the loss by 1/global batch,
 * so the sum of the ranks' gradients is the gradient of the mean loss. */
tf_status dist_all_reduce_sum_f32(tf_dist *dist, float *buffer, size_t count);

/* Bucketed form, to overlap with the backward pass: queues the sum of buffer[offset, offset +
 * count) on the communication stream, after the work queued so far on tf_cuda_stream() (call it
 * as soon as backward has finished writing those gradients, e.g. once per block); returns at
 * once. dist_all_reduce_wait() then makes tf_cuda_stream() wait for every bucket queued (call it
 * before the optimizer reads the gradients). The ranges of one step must be queued in the same
 * order on every rank. */
tf_status dist_all_reduce_sum_f32_range(tf_dist *dist, float *buffer, size_t offset, size_t count);
tf_status dist_all_reduce_wait(tf_dist *dist);

/* The bucketed form as a model gradient hook (model_set_gradient_hook(model,
 * dist_gradient_ready, &sum)): each range of grads is queued as backward finishes it. A hook
 * returns nothing, so the first failure is kept in status (later ranges are skipped); check it
 * before dist_all_reduce_wait(). */
typedef struct {
    tf_dist *dist;
    float *grads;     /* fp32 device memory: the model's gradient buffer */
    tf_status status; /* TF_OK, or the first failure of a queued range */
} tf_dist_gradient_sum;
void dist_gradient_ready(void *gradient_sum, size_t offset, size_t count);

/* buffer (fp32 device memory) = rank 0's buffer, ordered like dist_all_reduce_sum_f32 (the
 * parameters after initialisation, so every rank starts from exactly the same weights). */
tf_status dist_broadcast_f32(tf_dist *dist, float *buffer, size_t count);

/* values (host memory) = op over all ranks, in place; waits for the result. Any count (the
 * values travel through a small device buffer in chunks). For evaluation counts, the per-step
 * loss and stop flags. */
tf_status dist_all_reduce_host_i64(tf_dist *dist, int64_t *values, size_t count, tf_dist_op op);
tf_status dist_all_reduce_host_f64(tf_dist *dist, double *values, size_t count, tf_dist_op op);

#endif
