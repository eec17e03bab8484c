/* The rendezvous of train/dist.h under a real launcher, without GPUs (CPU processes; the tests
 * start it with Debian's torchrun, and with mpirun where one is installed):
 *
 *   torchrun --nproc_per_node 2 --master_port 29520 --no-python build/dist_rendezvous_check
 *
 * Each rank detects its launch, joins rank 0's rendezvous, which hands every rank a blob (rank 0's
 * process id and the fingerprint), and prints one line:
 *   rank R of W (LAUNCHER, local rank L): rendezvous at ADDR:PORT (PORT_FROM), blob from rank 0 PID
 * then all finish together. Exit code 0 when the rendezvous worked, 1 otherwise. */
#include "common/error.h"
#include "train/dist.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void) {
    tf_launch launch;
    if (dist_launch_detect(&launch) != TF_OK) {
        fprintf(stderr, "dist_rendezvous_check: %s\n", tf_error_message());
        return 1;
    }
    tf_dist_options options = {.fingerprint = dist_hash("rendezvous check", 16, TF_DIST_HASH_START),
                               .timeout_seconds = 60};
    int64_t blob[2] = {(int64_t)getpid(), (int64_t)options.fingerprint};
    tf_dist *dist = NULL;
    if (dist_connect(&dist, &launch, &options, blob, sizeof blob) != TF_OK) {
        fprintf(stderr, "dist_rendezvous_check rank %d: %s\n", launch.rank, tf_error_message());
        return 1;
    }
    bool fingerprint_ok = blob[1] == (int64_t)options.fingerprint;
    printf("rank %d of %d (%s, local rank %d): rendezvous at %s:%d (%s), blob from rank 0 %" PRId64 "%s\n",
           dist_rank(dist), dist_world_size(dist), dist_launcher_name(launch.launcher), dist_local_rank(dist),
           launch.world_size > 1 ? launch.master_addr : "-", launch.master_port, launch.port_from, blob[0],
           fingerprint_ok ? "" : " (fingerprint differs)");
    fflush(stdout);
    tf_status finished = dist_finish(dist);
    return finished == TF_OK && fingerprint_ok ? 0 : 1;
}
