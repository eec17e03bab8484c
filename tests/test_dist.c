/* The CPU half of the data-parallel module (train/dist.h):
 * - launch detection from the variables of torchrun-style launchers, OpenMPI and Slurm (set and
 *   unset in this process), their precedence, and errors naming the variables that do not fit;
 * - Slurm host lists: "a", "a,b", "gpu[01-04,07]", "n[1-3]x,m[5]", several groups, bad lists;
 * - the run fingerprint and NCCL_NVLS_ENABLE kept at 0 unless the user set it;
 * - world size 1: no sockets, collectives leave data alone, dist_abort returns; the CPU build
 *   refuses world size > 1;
 * - the rendezvous and its control channel with forked processes on 127.0.0.1: with 2 and 4
 *   ranks every rank receives rank 0's 128-byte blob and finishes with exit code 0 whichever
 *   rank finishes first; a mismatched fingerprint or world size fails on every rank with the
 *   message; dist_abort on one rank (rank 0 or another) ends every rank with code 1 and its
 *   message; a rank killed with SIGKILL ends the others with code 1 and "disappeared"; nobody to
 *   meet, or a port already taken, fails in time with a message saying so.
 * Every child has a deadline: a bug makes the test fail, never hang. */
#include "common/config.h"
#include "common/error.h"
#include "common/timer.h"
#include "test_util.h"
#include "train/dist.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- launch detection ------------------------------------------------------------------------ */

static const char *const launch_variables[] = {"RANK",
                                               "WORLD_SIZE",
                                               "LOCAL_RANK",
                                               "LOCAL_WORLD_SIZE",
                                               "MASTER_ADDR",
                                               "MASTER_PORT",
                                               "TORCHELASTIC_USE_AGENT_STORE",
                                               "OMPI_COMM_WORLD_RANK",
                                               "OMPI_COMM_WORLD_SIZE",
                                               "OMPI_COMM_WORLD_LOCAL_RANK",
                                               "OMPI_COMM_WORLD_LOCAL_SIZE",
                                               "SLURM_PROCID",
                                               "SLURM_NTASKS",
                                               "SLURM_STEP_NUM_TASKS",
                                               "SLURM_LOCALID",
                                               "SLURM_STEP_NODELIST",
                                               "SLURM_JOB_NODELIST",
                                               "SLURM_NODELIST",
                                               "SLURM_JOB_ID",
                                               "SLURM_JOBID"};

/* Detects with exactly the space-separated NAME=value assignments set (the others unset). */
static tf_status detect_with(const char *assignments, tf_launch *launch) {
    for (size_t i = 0; i < sizeof launch_variables / sizeof launch_variables[0]; i++)
        unsetenv(launch_variables[i]);
    char copy[1024];
    snprintf(copy, sizeof copy, "%s", assignments);
    for (char *save, *item = strtok_r(copy, " ", &save); item; item = strtok_r(NULL, " ", &save)) {
        char *equals = strchr(item, '=');
        *equals = '\0';
        setenv(item, equals + 1, 1);
    }
    return dist_launch_detect(launch);
}

/* Detection must fail with a message holding each of the given fragments. */
static void expect_launch_error(const char *assignments, const char *fragment, const char *fragment2) {
    tf_launch launch;
    tf_status status = detect_with(assignments, &launch);
    if (!CHECK(status == TF_ERR_USAGE, "'%s' gave status %d, not a usage error", assignments, status)) return;
    CHECK(strstr(tf_error_message(), fragment) != NULL, "'%s': message '%s' does not name %s", assignments,
          tf_error_message(), fragment);
    if (fragment2)
        CHECK(strstr(tf_error_message(), fragment2) != NULL, "'%s': message '%s' does not name %s",
              assignments, tf_error_message(), fragment2);
}

static void expect_launch(const char *assignments, tf_launcher launcher, int rank, int world_size,
                          int local_rank, const char *master_addr, int master_port) {
    tf_launch launch;
    if (!CHECK_OK(detect_with(assignments, &launch))) return;
    CHECK(launch.launcher == launcher && launch.rank == rank && launch.world_size == world_size &&
              launch.local_rank == local_rank,
          "'%s': launcher %s rank %d of %d local %d, expected %s rank %d of %d local %d", assignments,
          dist_launcher_name(launch.launcher), launch.rank, launch.world_size, launch.local_rank,
          dist_launcher_name(launcher), rank, world_size, local_rank);
    if (master_addr)
        CHECK(strcmp(launch.master_addr, master_addr) == 0 && launch.master_port == master_port,
              "'%s': master %s:%d (from %s), expected %s:%d", assignments, launch.master_addr,
              launch.master_port, launch.master_from, master_addr, master_port);
}

static void test_launch_detection(void) {
    expect_launch("", TF_LAUNCHER_NONE, 0, 1, 0, NULL, 0);
    expect_launch("MASTER_ADDR=ignored", TF_LAUNCHER_NONE, 0, 1, 0, NULL, 0);

    /* torchrun-style */
    expect_launch("RANK=3 WORLD_SIZE=8 LOCAL_RANK=1 LOCAL_WORLD_SIZE=2 MASTER_ADDR=node0 MASTER_PORT=1234",
                  TF_LAUNCHER_TORCHRUN, 3, 8, 1, "node0", 1234);
    expect_launch("RANK=0 WORLD_SIZE=1", TF_LAUNCHER_TORCHRUN, 0, 1, 0, NULL, 0);
    /* torchrun's agent holding MASTER_PORT for its own store: the rendezvous takes the next one */
    expect_launch("RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=h MASTER_PORT=29500 TORCHELASTIC_USE_AGENT_STORE=True",
                  TF_LAUNCHER_TORCHRUN, 1, 2, 1, "h", 29501);
    expect_launch("RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=h MASTER_PORT=29500 TORCHELASTIC_USE_AGENT_STORE=False",
                  TF_LAUNCHER_TORCHRUN, 1, 2, 1, "h", 29500);
    expect_launch_error("RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=h MASTER_PORT=65535 "
                        "TORCHELASTIC_USE_AGENT_STORE=True",
                        "--master-port", NULL);
    expect_launch_error("RANK=1", "WORLD_SIZE", NULL);
    expect_launch_error("WORLD_SIZE=2", "RANK", NULL);
    expect_launch_error("RANK=4 WORLD_SIZE=4 LOCAL_RANK=0 MASTER_ADDR=a MASTER_PORT=1", "RANK=4",
                        "WORLD_SIZE=4");
    expect_launch_error("RANK=x WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=a MASTER_PORT=1", "RANK='x'", NULL);
    expect_launch_error("RANK=-1 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=a MASTER_PORT=1", "RANK='-1'", NULL);
    expect_launch_error("RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=a", "MASTER_PORT", NULL);
    expect_launch_error("RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_PORT=5", "MASTER_ADDR", NULL);
    expect_launch_error("RANK=1 WORLD_SIZE=2 MASTER_ADDR=a MASTER_PORT=5", "LOCAL_RANK", NULL);
    expect_launch_error("RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=a MASTER_PORT=70000", "MASTER_PORT",
                        NULL);
    expect_launch_error("RANK=1 WORLD_SIZE=4 LOCAL_RANK=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=a MASTER_PORT=5",
                        "LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2");
    expect_launch_error("RANK=1 WORLD_SIZE=0 LOCAL_RANK=0 MASTER_ADDR=a MASTER_PORT=5", "WORLD_SIZE='0'",
                        NULL);

    /* OpenMPI: one node defaults to the local host, several need MASTER_ADDR */
    expect_launch("OMPI_COMM_WORLD_RANK=2 OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_LOCAL_RANK=2 "
                  "OMPI_COMM_WORLD_LOCAL_SIZE=4",
                  TF_LAUNCHER_OPENMPI, 2, 4, 2, "127.0.0.1", 29500);
    expect_launch("OMPI_COMM_WORLD_RANK=3 OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_LOCAL_RANK=1 "
                  "OMPI_COMM_WORLD_LOCAL_SIZE=2 MASTER_ADDR=head MASTER_PORT=4000",
                  TF_LAUNCHER_OPENMPI, 3, 4, 1, "head", 4000);
    expect_launch_error("OMPI_COMM_WORLD_RANK=3 OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_LOCAL_RANK=1 "
                        "OMPI_COMM_WORLD_LOCAL_SIZE=2",
                        "MASTER_ADDR", "mpirun -x");
    expect_launch_error("OMPI_COMM_WORLD_RANK=5 OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_LOCAL_RANK=1",
                        "OMPI_COMM_WORLD_RANK=5", "OMPI_COMM_WORLD_SIZE=4");
    expect_launch_error("OMPI_COMM_WORLD_SIZE=4", "OMPI_COMM_WORLD_RANK", NULL);

    /* Slurm: the address from MASTER_ADDR or the step's first node, port from the job id */
    expect_launch("SLURM_PROCID=5 SLURM_NTASKS=8 SLURM_STEP_NUM_TASKS=8 SLURM_LOCALID=1 "
                  "SLURM_JOB_NODELIST=gpu[01-04,07] SLURM_JOB_ID=123456",
                  TF_LAUNCHER_SLURM, 5, 8, 1, "gpu01", 29500 + 456);
    expect_launch(
        "SLURM_PROCID=1 SLURM_NTASKS=2 SLURM_STEP_NUM_TASKS=2 SLURM_LOCALID=0 SLURM_JOB_NODELIST=a[1-9] "
        "SLURM_STEP_NODELIST=b[3-4]",
        TF_LAUNCHER_SLURM, 1, 2, 0, "b3", 29500);
    expect_launch("SLURM_PROCID=1 SLURM_NTASKS=2 SLURM_STEP_NUM_TASKS=2 SLURM_LOCALID=0 SLURM_NODELIST=c7 "
                  "MASTER_ADDR=head MASTER_PORT=555",
                  TF_LAUNCHER_SLURM, 1, 2, 0, "head", 555);
    expect_launch("SLURM_PROCID=0 SLURM_JOB_ID=7", TF_LAUNCHER_SLURM, 0, 1, 0, NULL, 0);
    expect_launch_error("SLURM_PROCID=0 SLURM_NTASKS=4 SLURM_LOCALID=0 SLURM_JOB_NODELIST=a", "srun", NULL);
    expect_launch_error(
        "SLURM_PROCID=8 SLURM_NTASKS=8 SLURM_STEP_NUM_TASKS=8 SLURM_LOCALID=0 SLURM_NODELIST=a",
        "SLURM_PROCID=8", "SLURM_STEP_NUM_TASKS=8");
    expect_launch_error("SLURM_PROCID=1 SLURM_NTASKS=2 SLURM_STEP_NUM_TASKS=2 SLURM_LOCALID=1", "MASTER_ADDR",
                        NULL);
    expect_launch_error(
        "SLURM_PROCID=1 SLURM_NTASKS=2 SLURM_STEP_NUM_TASKS=2 SLURM_LOCALID=1 SLURM_NODELIST=gpu[1-",
        "SLURM_NODELIST", NULL);

    /* precedence: launchers started inside a Slurm allocation win over its variables */
    expect_launch(
        "RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=m MASTER_PORT=9 SLURM_PROCID=0 SLURM_NTASKS=1",
        TF_LAUNCHER_TORCHRUN, 1, 2, 1, "m", 9);
    expect_launch("OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 OMPI_COMM_WORLD_LOCAL_RANK=1 "
                  "OMPI_COMM_WORLD_LOCAL_SIZE=2 SLURM_PROCID=0 SLURM_NTASKS=1",
                  TF_LAUNCHER_OPENMPI, 1, 2, 1, "127.0.0.1", 29500);
    detect_with("", &(tf_launch){0});
}

/* ---- Slurm host lists ------------------------------------------------------------------------ */

static void expect_hosts(const char *list, const char *expected) {
    char hosts[512], first[TF_DIST_HOST_MAX];
    if (!CHECK_OK(dist_nodelist_expand(list, hosts, sizeof hosts))) return;
    CHECK(strcmp(hosts, expected) == 0, "'%s' expanded to '%s', expected '%s'", list, hosts, expected);
    if (!CHECK_OK(dist_nodelist_first(list, first, sizeof first))) return;
    size_t length = strcspn(expected, ",");
    CHECK(strlen(first) == length && strncmp(first, expected, length) == 0, "first host of '%s' is '%s'",
          list, first);
}

static void expect_hosts_error(const char *list, size_t size, const char *fragment) {
    char hosts[512];
    tf_status status = dist_nodelist_expand(list, hosts, size);
    CHECK(status == TF_ERR_USAGE && strstr(tf_error_message(), fragment),
          "'%s' (into %zu bytes): status %d, message '%s', expected one with '%s'", list, size, status,
          tf_error_message(), fragment);
}

static void test_nodelist(void) {
    expect_hosts("a", "a");
    expect_hosts("a,b", "a,b");
    expect_hosts("gpu[01-04,07]", "gpu01,gpu02,gpu03,gpu04,gpu07");
    expect_hosts("n[1-3]x,m[5]", "n1x,n2x,n3x,m5");
    expect_hosts("node[8-11]", "node8,node9,node10,node11");
    expect_hosts("r[1-2]n[08-09]", "r1n08,r1n09,r2n08,r2n09");
    expect_hosts("login-1,gpu[1-2],z[009]", "login-1,gpu1,gpu2,z009");
    expect_hosts_error("gpu[01-04", 512, "gpu[01-04");
    expect_hosts_error("gpu[4-1]", 512, "range");
    expect_hosts_error("gpu[a-b]", 512, "not a number");
    expect_hosts_error("gpu[1,,2]", 512, "not a number");
    expect_hosts_error("a,,b", 512, "empty name");
    expect_hosts_error("", 512, "empty");
    expect_hosts_error("n[1-100]", 16, "more than 15 characters");
    /* The first host of a long list comes without expanding the rest. */
    char first[TF_DIST_HOST_MAX];
    double start = tf_seconds();
    CHECK_OK(dist_nodelist_first("n[0000001-0999999]", first, sizeof first));
    CHECK(strcmp(first, "n0000001") == 0 && tf_seconds() - start < 0.1,
          "first of a long list: '%s' in %.3f s", first, tf_seconds() - start);
}

/* ---- fingerprint, NVLS, world size 1 --------------------------------------------------------- */

static void test_fingerprint(void) {
    CHECK(dist_hash("", 0, TF_DIST_HASH_START) == 0xcbf29ce484222325ull, "FNV-1a of nothing");
    CHECK(dist_hash("a", 1, TF_DIST_HASH_START) == 0xaf63dc4c8601ec8cull, "FNV-1a of 'a'");
    tf_config config;
    config_defaults(&config);
    uint64_t first, again, other_seed, other_extra;
    CHECK_OK(dist_config_fingerprint(&config, "--resume", &first));
    CHECK_OK(dist_config_fingerprint(&config, "--resume", &again));
    CHECK_OK(dist_config_fingerprint(&config, "", &other_extra));
    config.run.seed++;
    CHECK_OK(dist_config_fingerprint(&config, "--resume", &other_seed));
    CHECK(first == again && first != other_seed && first != other_extra,
          "fingerprints %016llx %016llx %016llx %016llx", (unsigned long long)first,
          (unsigned long long)again, (unsigned long long)other_seed, (unsigned long long)other_extra);
}

static void test_nvls_and_single_process(void) {
    tf_launch single = {.launcher = TF_LAUNCHER_NONE, .rank = 0, .world_size = 1};
    unsetenv("NCCL_NVLS_ENABLE");
    CHECK_OK(dist_select_device(&single));
    const char *nvls = getenv("NCCL_NVLS_ENABLE");
    CHECK(nvls && strcmp(nvls, "0") == 0, "NCCL_NVLS_ENABLE is '%s' after dist_select_device",
          nvls ? nvls : "unset");
    setenv("NCCL_NVLS_ENABLE", "1", 1);
    CHECK_OK(dist_select_device(&single));
    CHECK(strcmp(getenv("NCCL_NVLS_ENABLE"), "1") == 0, "the user's NCCL_NVLS_ENABLE was overwritten");
    setenv("NCCL_NVLS_ENABLE", "0", 1);

    tf_dist *dist = NULL;
    tf_dist_options options = {.fingerprint = 1};
    if (!CHECK_OK(dist_init(&dist, &single, &options))) return;
    CHECK(dist && dist_rank(dist) == 0 && dist_world_size(dist) == 1 && dist_local_rank(dist) == 0 &&
              dist_is_main(dist),
          "world size 1 group");
    int64_t counts[3] = {1, -2, 3};
    double values[2] = {0.5, -1.5};
    CHECK_OK(dist_all_reduce_host_i64(dist, counts, 3, TF_DIST_SUM));
    CHECK_OK(dist_all_reduce_host_f64(dist, values, 2, TF_DIST_MAX));
    CHECK(counts[0] == 1 && counts[1] == -2 && counts[2] == 3 && values[0] == 0.5 && values[1] == -1.5,
          "world size 1 reductions changed their values");
    CHECK_OK(dist_all_reduce_sum_f32(dist, NULL, 0));
    dist_abort(dist, "returns with world size 1");
    CHECK_OK(dist_finish(dist));
    CHECK(dist_world_size(NULL) == 1 && dist_is_main(NULL), "NULL reads as rank 0 of 1");

#ifndef TOKENFORMER_CUDA
    tf_launch two = {.launcher = TF_LAUNCHER_TORCHRUN,
                     .rank = 1,
                     .world_size = 2,
                     .local_rank = 1,
                     .master_addr = "127.0.0.1",
                     .master_port = 29500};
    CHECK(dist_select_device(&two) == TF_ERR_USAGE && strstr(tf_error_message(), "needs the CUDA build"),
          "the CPU build accepted 2 processes in dist_select_device: %s", tf_error_message());
    CHECK(dist_init(&dist, &two, &options) == TF_ERR_USAGE &&
              strstr(tf_error_message(), "needs the CUDA build") && dist == NULL,
          "the CPU build accepted 2 processes in dist_init: %s", tf_error_message());
#endif
}

/* ---- forked worlds --------------------------------------------------------------------------- */

enum { MAX_WORLD = 4, OUTPUT_MAX = 8192, BLOB_BYTES = TF_DIST_ID_BYTES };
#define WORLD_DEADLINE_SECONDS 20.0

/* PLAN_KILL_WHILE_STALLED: rank `actor` is killed while rank `stalled` is stopped (SIGSTOP), so
 * that rank 0's watchdog drains its connections for the whole ABORT_DRAIN_SECONDS before exiting;
 * rank 0's main thread keeps calling collectives meanwhile, and they must fail. */
typedef enum { PLAN_FINISH, PLAN_ABORT, PLAN_KILL, PLAN_KILL_WHILE_STALLED } rank_plan;

/* What the ranks of one forked world do. */
typedef struct {
    const char *name;
    int world_size;
    rank_plan plan;
    int actor;                      /* PLAN_ABORT / PLAN_KILL: the rank that fails */
    int stalled;                    /* PLAN_KILL_WHILE_STALLED: the rank that stops itself */
    int finish_delay_ms[MAX_WORLD]; /* PLAN_FINISH: pause before dist_finish */
    int bad_fingerprint_rank;       /* -1, or a rank that hashes another config */
    int bad_world_rank;             /* -1, or a rank started with world size + 1 */
    double timeout_seconds;
} world_plan;

typedef struct {
    int status[MAX_WORLD]; /* waitpid status */
    char out[MAX_WORLD][OUTPUT_MAX], err[MAX_WORLD][OUTPUT_MAX];
    bool timed_out;
} world_result;

/* A port that was free a moment ago: bound to port 0, read back, released. */
static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t length = sizeof address;
    if (fd < 0 || bind(fd, (struct sockaddr *)&address, sizeof address) != 0 ||
        getsockname(fd, (struct sockaddr *)&address, &length) != 0) {
        if (fd >= 0) close(fd);
        return 0;
    }
    close(fd);
    return ntohs(address.sin_port);
}

static tf_launch loopback_launch(int rank, int world_size, int port) {
    tf_launch launch = {.launcher = TF_LAUNCHER_TORCHRUN,
                        .rank = rank,
                        .world_size = world_size,
                        .local_rank = rank,
                        .local_size = world_size,
                        .master_port = port};
    snprintf(launch.master_addr, sizeof launch.master_addr, "127.0.0.1");
    snprintf(launch.master_from, sizeof launch.master_from, "test");
    snprintf(launch.port_from, sizeof launch.port_from, "test");
    return launch;
}

static void print_blob(const unsigned char *blob) {
    printf("blob ");
    for (int i = 0; i < BLOB_BYTES; i++)
        printf("%02x", blob[i]);
    printf("\n");
}

/* The body of one forked rank; its return value is the child's exit code. Codes 0 (finished), 3
 * (rendezvous refused, as a mismatch test expects), 4 and 5 (came back where the process should
 * have ended) tell the parent what happened; the watchdog's exit is 1. */
static int rank_main(const world_plan *plan, int rank, int port) {
    tf_launch launch = loopback_launch(rank, plan->world_size + (rank == plan->bad_world_rank), port);
    tf_dist_options options = {.fingerprint = rank == plan->bad_fingerprint_rank ? 0xbad : 0x600d,
                               .timeout_seconds = plan->timeout_seconds};
    unsigned char blob[BLOB_BYTES] = {0};
    if (rank == 0) {
        FILE *random = fopen("/dev/urandom", "rb");
        if (!random || fread(blob, 1, sizeof blob, random) != sizeof blob) return 6;
        fclose(random);
    }
    tf_dist *dist;
    if (dist_connect(&dist, &launch, &options, blob, sizeof blob) != TF_OK) {
        fprintf(stderr, "dist_connect: %s\n", tf_error_message());
        return 3;
    }
    print_blob(blob);
    fflush(stdout);
    if (dist_rank(dist) != rank || dist_world_size(dist) != plan->world_size) return 7;
    if (plan->plan == PLAN_FINISH) {
        usleep((useconds_t)plan->finish_delay_ms[rank] * 1000);
        return dist_finish(dist) == TF_OK ? 0 : 8;
    }
    if (plan->plan == PLAN_KILL_WHILE_STALLED && rank == plan->stalled) {
        raise(SIGSTOP); /* the parent kills it once the others have ended */
        return 9;
    }
    if (plan->plan == PLAN_KILL_WHILE_STALLED && rank != plan->actor) {
        int64_t value = 1;
        while (dist_all_reduce_host_i64(dist, &value, 1, TF_DIST_SUM) == TF_OK)
            usleep(1000);
        fprintf(stderr, "collective refused: %s\n", tf_error_message());
        dist_abort(dist, tf_error_message()); /* waits for the watchdog's exit */
        return 4;
    }
    if (rank == plan->actor) {
        usleep(100 * 1000);
        if (plan->plan != PLAN_ABORT) raise(SIGKILL);
        char message[64];
        snprintf(message, sizeof message, "boom from rank %d", rank);
        dist_abort(dist, message);
        return 4;
    }
    sleep(10); /* as if stuck in a collective: only the watchdog can end this process */
    return 5;
}

static void redirect(const char *directory, int rank, const char *kind, int target) {
    char path[256];
    snprintf(path, sizeof path, "%s/%d.%s", directory, rank, kind);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd >= 0) {
        dup2(fd, target);
        close(fd);
    }
}

static void read_output(const char *directory, int rank, const char *kind, char *out) {
    char path[256];
    snprintf(path, sizeof path, "%s/%d.%s", directory, rank, kind);
    out[0] = '\0';
    FILE *file = fopen(path, "rb");
    if (!file) return;
    size_t got = fread(out, 1, OUTPUT_MAX - 1, file);
    out[got] = '\0';
    fclose(file);
    unlink(path);
}

/* Waits for the children until the deadline, then kills what is left; a stalled rank (>= 0) is
 * killed as soon as all the others have ended. */
static void wait_world(const pid_t *pids, int count, int stalled, world_result *result) {
    bool done[MAX_WORLD] = {false};
    int remaining = count;
    double deadline = tf_seconds() + WORLD_DEADLINE_SECONDS;
    while (remaining > 0) {
        for (int r = 0; r < count; r++) {
            if (done[r] || waitpid(pids[r], &result->status[r], WNOHANG) != pids[r]) continue;
            done[r] = true;
            remaining--;
        }
        if (stalled >= 0 && remaining == 1 && !done[stalled]) kill(pids[stalled], SIGKILL);
        if (remaining == 0) break;
        if (tf_seconds() > deadline) {
            result->timed_out = true;
            for (int r = 0; r < count; r++)
                if (!done[r]) {
                    kill(pids[r], SIGKILL);
                    waitpid(pids[r], &result->status[r], 0);
                }
            break;
        }
        usleep(5 * 1000);
    }
}

static void run_world(const world_plan *plan, world_result *result) {
    memset(result, 0, sizeof *result);
    char directory[] = "/tmp/test_dist_XXXXXX";
    if (!CHECK(mkdtemp(directory) != NULL, "mkdtemp")) return;
    int port = free_port();
    CHECK(port > 0, "no free port");
    fflush(stdout);
    fflush(stderr);
    pid_t pids[MAX_WORLD];
    for (int rank = 0; rank < plan->world_size; rank++) {
        pids[rank] = fork();
        if (pids[rank] == 0) {
            redirect(directory, rank, "out", STDOUT_FILENO);
            redirect(directory, rank, "err", STDERR_FILENO);
            alarm((unsigned)WORLD_DEADLINE_SECONDS + 5); /* the last guard against a hang */
            int code = rank_main(plan, rank, port);
            fflush(stdout);
            _exit(code);
        }
    }
    wait_world(pids, plan->world_size, plan->plan == PLAN_KILL_WHILE_STALLED ? plan->stalled : -1, result);
    for (int rank = 0; rank < plan->world_size; rank++) {
        read_output(directory, rank, "out", result->out[rank]);
        read_output(directory, rank, "err", result->err[rank]);
    }
    rmdir(directory);
    CHECK(!result->timed_out, "%s: the world did not end within %.0f s", plan->name, WORLD_DEADLINE_SECONDS);
}

static bool exited_with(const world_result *result, int rank, int code) {
    int status = result->status[rank];
    return WIFEXITED(status) && WEXITSTATUS(status) == code;
}

static void show_rank(const world_plan *plan, const world_result *result, int rank) {
    fprintf(stderr, "  %s rank %d: wait status 0x%x, stderr:\n%s", plan->name, rank, result->status[rank],
            result->err[rank]);
}

/* Every rank exited with code and wrote fragment to stderr. */
static void expect_all(const world_plan *plan, const world_result *result, int code, const char *fragment) {
    for (int rank = 0; rank < plan->world_size; rank++) {
        bool ok = CHECK(exited_with(result, rank, code), "%s: rank %d did not exit with code %d", plan->name,
                        rank, code);
        if (fragment)
            ok &= CHECK(strstr(result->err[rank], fragment) != NULL, "%s: rank %d did not report '%s'",
                        plan->name, rank, fragment);
        if (!ok) show_rank(plan, result, rank);
    }
}

static void test_clean_finish(const char *name, int world_size, const int *delays_ms) {
    world_plan plan = {.name = name,
                       .world_size = world_size,
                       .plan = PLAN_FINISH,
                       .bad_fingerprint_rank = -1,
                       .bad_world_rank = -1,
                       .timeout_seconds = 10};
    memcpy(plan.finish_delay_ms, delays_ms, sizeof(int) * (size_t)world_size);
    world_result result;
    run_world(&plan, &result);
    expect_all(&plan, &result, 0, NULL);
    const char *blob = strstr(result.out[0], "blob ");
    if (!CHECK(blob && strlen(blob) >= 5 + 2 * BLOB_BYTES, "%s: rank 0 printed no blob", name)) return;
    CHECK(strspn(blob + 5, "0") < 2 * BLOB_BYTES, "%s: rank 0's blob is all zero", name);
    for (int rank = 1; rank < world_size; rank++)
        CHECK(strncmp(result.out[rank], blob, 5 + 2 * BLOB_BYTES) == 0,
              "%s: rank %d received '%.40s...', not '%.40s...'", name, rank, result.out[rank], blob);
    for (int rank = 0; rank < world_size; rank++)
        CHECK(!strstr(result.err[rank], "failed") && !strstr(result.err[rank], "disappeared"),
              "%s: a clean finish logged a failure on rank %d:\n%s", name, rank, result.err[rank]);
}

static void test_mismatch(const char *name, int world_size, int bad_fingerprint_rank, int bad_world_rank,
                          const char *fragment) {
    world_plan plan = {.name = name,
                       .world_size = world_size,
                       .plan = PLAN_FINISH,
                       .bad_fingerprint_rank = bad_fingerprint_rank,
                       .bad_world_rank = bad_world_rank,
                       .timeout_seconds = 10};
    world_result result;
    run_world(&plan, &result);
    expect_all(&plan, &result, 3, fragment);
}

static void test_failure(const char *name, int world_size, rank_plan what, int actor, const char *fragment) {
    world_plan plan = {.name = name,
                       .world_size = world_size,
                       .plan = what,
                       .actor = actor,
                       .bad_fingerprint_rank = -1,
                       .bad_world_rank = -1,
                       .timeout_seconds = 10};
    world_result result;
    double start = tf_seconds();
    run_world(&plan, &result);
    double seconds = tf_seconds() - start;
    for (int rank = 0; rank < world_size; rank++) {
        bool ok;
        if (what == PLAN_KILL && rank == actor)
            ok = CHECK(WIFSIGNALED(result.status[rank]) && WTERMSIG(result.status[rank]) == SIGKILL,
                       "%s: rank %d was not killed", name, rank);
        else
            ok = CHECK(exited_with(&result, rank, 1) && strstr(result.err[rank], fragment),
                       "%s: rank %d did not exit with code 1 reporting '%s'", name, rank, fragment);
        if (!ok) show_rank(&plan, &result, rank);
    }
    CHECK(seconds < 8.0, "%s: the ranks took %.1f s to stop", name, seconds);
}

/* A rank's main thread, freed from a collective by the watchdog's NCCL abort, must not go on as if
 * alone while the watchdog drains its connections before exiting: every collective fails. */
static void test_collectives_closed_while_failing(void) {
    world_plan plan = {.name = "collectives while failing",
                       .world_size = 3,
                       .plan = PLAN_KILL_WHILE_STALLED,
                       .actor = 2,
                       .stalled = 1,
                       .bad_fingerprint_rank = -1,
                       .bad_world_rank = -1,
                       .timeout_seconds = 10};
    world_result result;
    run_world(&plan, &result);
    bool ok = CHECK(exited_with(&result, 0, 1) && strstr(result.err[0], "rank 2 disappeared") &&
                        strstr(result.err[0], "collective refused: dist: stopping after a failure"),
                    "%s: rank 0 did not exit with code 1 after its collectives were refused", plan.name);
    if (!ok) show_rank(&plan, &result, 0);
    for (int rank = 1; rank < 3; rank++)
        CHECK(WIFSIGNALED(result.status[rank]) && WTERMSIG(result.status[rank]) == SIGKILL,
              "%s: rank %d was not killed (wait status 0x%x)", plan.name, rank, result.status[rank]);
}

/* Nobody to meet: both sides give up at their timeout with a message saying why. */
static void test_timeouts(void) {
    int port = free_port();
    tf_dist_options options = {.fingerprint = 1, .timeout_seconds = 0.5};
    unsigned char blob[BLOB_BYTES] = {0};
    tf_dist *dist = NULL;
    tf_launch launch = loopback_launch(1, 2, port);
    double start = tf_seconds();
    tf_status status = dist_connect(&dist, &launch, &options, blob, sizeof blob);
    CHECK(status == TF_ERR_RUNTIME && strstr(tf_error_message(), "could not reach rank 0 at 127.0.0.1") &&
              !dist && tf_seconds() - start < 3.0,
          "rank 1 alone: status %d after %.1f s: %s", status, tf_seconds() - start, tf_error_message());

    launch = loopback_launch(0, 3, port);
    start = tf_seconds();
    status = dist_connect(&dist, &launch, &options, blob, sizeof blob);
    CHECK(status == TF_ERR_RUNTIME && strstr(tf_error_message(), "only 1 of 3 ranks") &&
              strstr(tf_error_message(), "missing rank(s) 1, 2") && tf_seconds() - start < 3.0,
          "rank 0 alone: status %d after %.1f s: %s", status, tf_seconds() - start, tf_error_message());

    /* A port someone else listens on: rank 0 says so at once. */
    int holder = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = {
        .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY), .sin_port = htons((uint16_t)port)};
    if (CHECK(holder >= 0 && bind(holder, (struct sockaddr *)&address, sizeof address) == 0 &&
                  listen(holder, 1) == 0,
              "holding port %d", port)) {
        status = dist_connect(&dist, &launch, &options, blob, sizeof blob);
        CHECK(status == TF_ERR_RUNTIME && strstr(tf_error_message(), "cannot listen on TCP port") &&
                  strstr(tf_error_message(), "MASTER_PORT"),
              "a taken port: status %d: %s", status, tf_error_message());
    }
    if (holder >= 0) close(holder);
}

int main(void) {
    test_launch_detection();
    test_nodelist();
    test_fingerprint();
    test_nvls_and_single_process();
    test_timeouts();

    test_clean_finish("finish, 2 ranks", 2, (const int[]){0, 0});
    test_clean_finish("finish, 4 ranks, rank 0 first", 4, (const int[]){0, 300, 100, 200});
    test_clean_finish("finish, 4 ranks, rank 0 last", 4, (const int[]){300, 0, 50, 100});
    test_mismatch("fingerprint mismatch", 3, 2, -1, "run fingerprint");
    test_mismatch("world size mismatch", 2, -1, 1, "world size 3 but rank 0 with 2");
    test_failure("rank 1 aborts", 3, PLAN_ABORT, 1, "rank 1 failed: boom from rank 1");
    test_failure("rank 0 aborts", 2, PLAN_ABORT, 0, "rank 0 failed: boom from rank 0");
    test_failure("rank 2 killed", 4, PLAN_KILL, 2, "rank 2 disappeared");
    test_failure("rank 0 killed", 2, PLAN_KILL, 0, "rank 0 disappeared");
    test_collectives_closed_while_failing();
    return test_finish("test_dist");
}
