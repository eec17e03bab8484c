/* The process group (see dist.h): the TCP rendezvous and control channel with its watchdog
 * thread, and, with TOKENFORMER_CUDA, the NCCL communicator and the collectives.
 *
 * The control channel is a star: rank 0 holds one connection to every other rank. Its protocol,
 * integers big-endian:
 *   hello   rank k -> rank 0, once: magic "TFDH", version, rank, world size, local rank, blob
 *           size, fingerprint (8 bytes), host name (64 bytes)
 *   reply   rank 0 -> rank k, once: magic "TFDR", status (TF_OK or the failure's tf_status),
 *           message length, blob size; then the message and the blob (the NCCL unique id)
 *   message either way, afterwards: magic "TFDM", type, origin rank, text length; then the text
 *           FAILED       the origin rank called dist_abort(text)
 *           DISAPPEARED  rank 0 lost the origin's connection without a message
 *           FINISHED     the sender called dist_finish(); the end of its connection is no failure
 * Rank 0 forwards FAILED and DISAPPEARED to every other rank. A rank that receives one, or loses
 * its connection to rank 0 before FINISHED, logs it, aborts NCCL and exits with code 1.
 *
 * Why the process exits from the watchdog thread: the main thread of a healthy rank is then
 * typically blocked inside an NCCL collective or a stream synchronisation that can never
 * complete, so no error can travel up the stack to main(). _exit rather than exit: atexit
 * handlers (the CUDA runtime's teardown among them) could block on that same stuck work. */
#include "train/dist.h"

#include "common/log.h"
#include "common/timer.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifdef TOKENFORMER_CUDA
#include "kernels/cuda/cuda_backend.cuh"

#include <cuda_runtime.h>
#include <nccl.h>

_Static_assert(sizeof(ncclUniqueId) == TF_DIST_ID_BYTES, "TF_DIST_ID_BYTES must be NCCL_UNIQUE_ID_BYTES");
#endif

enum {
    PROTOCOL_VERSION = 1,
    MAGIC_HELLO = 0x54464448,   /* "TFDH" */
    MAGIC_REPLY = 0x54464452,   /* "TFDR" */
    MAGIC_MESSAGE = 0x5446444d, /* "TFDM" */
    HOST_FIELD = 64,
    HELLO_BYTES = 32 + HOST_FIELD,
    REPLY_HEADER_BYTES = 16,
    MESSAGE_HEADER_BYTES = 16,
    MAX_BLOB_BYTES = 1 << 16,
    STRAY_CONNECTIONS = 64, /* connections rank 0 takes beyond world size - 1 before refusing */
};

typedef enum { MESSAGE_FAILED = 1, MESSAGE_DISAPPEARED = 2, MESSAGE_FINISHED = 3 } message_type;

#define DEFAULT_TIMEOUT_SECONDS 300.0
#define HELLO_TIMEOUT_SECONDS   10.0 /* a connection must introduce itself this fast */
#define MISMATCH_GRACE_SECONDS  2.0  /* after a bad hello, how long rank 0 waits for the rest */
#define ABORT_DRAIN_SECONDS     2.0  /* failing: time for the message to leave before exiting */
#define FINISH_DRAIN_SECONDS    10.0 /* finishing: time for the peers to acknowledge */
#define NCCL_ABORT_SECONDS      10.0 /* ncclCommAbort gets this long before the process exits anyway */

/* One connection of the control channel, with what arrived of its current message. */
typedef struct {
    int fd;
    int rank; /* the rank at the other end */
    char host[HOST_FIELD];
    bool finished; /* sent FINISHED: its end of the connection is no failure */
    bool drained;  /* dist_finish / failing: its end has closed */
    unsigned char buffer[MESSAGE_HEADER_BYTES + TF_DIST_MESSAGE_MAX];
    size_t filled;
} dist_peer;

struct tf_dist {
    int rank, world_size, local_rank;
    char master[TF_DIST_HOST_MAX + 16]; /* "host:port", for messages */

    dist_peer *peers; /* rank 0: every other rank; others: rank 0 */
    int peer_count;
    int wake[2]; /* pipe: dist_finish() wakes the watchdog to end it */
    pthread_t watchdog;
    bool watchdog_running;
    pthread_mutex_t send_lock; /* messages from the main thread and the watchdog do not interleave */
    atomic_int failing;        /* set by the first thread that ends the process */

#ifdef TOKENFORMER_CUDA
    _Atomic(ncclComm_t) comm;            /* NULL with world size 1, and once finishing or aborting */
    cudaStream_t stream;                 /* every NCCL operation, in call order */
    cudaEvent_t queued;                  /* tf_cuda_stream() -> stream: the gradients are ready */
    cudaEvent_t reduced;                 /* stream -> tf_cuda_stream(): the sums are ready */
    bool reductions_pending;             /* buckets queued since the last dist_all_reduce_wait() */
    void *device_scratch, *host_scratch; /* host reductions travel through these */
#endif
};

/* ---- bytes on the wire ----------------------------------------------------------------------- */

static void put_u32(unsigned char *out, uint32_t value) {
    for (int i = 0; i < 4; i++)
        out[i] = (unsigned char)(value >> (24 - 8 * i));
}

static uint32_t get_u32(const unsigned char *in) {
    return (uint32_t)in[0] << 24 | (uint32_t)in[1] << 16 | (uint32_t)in[2] << 8 | (uint32_t)in[3];
}

static void put_u64(unsigned char *out, uint64_t value) {
    put_u32(out, (uint32_t)(value >> 32));
    put_u32(out + 4, (uint32_t)value);
}

static uint64_t get_u64(const unsigned char *in) {
    return (uint64_t)get_u32(in) << 32 | get_u32(in + 4);
}

static int milliseconds_until(double deadline) {
    double left = deadline - tf_seconds();
    if (left <= 0) return 0;
    return left > 3600 ? 3600 * 1000 : (int)(left * 1000) + 1;
}

/* Blocking send of all bytes; no SIGPIPE when the peer is gone. */
static bool send_all(int fd, const void *data, size_t size) {
    const char *bytes = data;
    while (size > 0) {
        ssize_t sent = send(fd, bytes, size, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR) continue;
        if (sent <= 0) return false;
        bytes += sent;
        size -= (size_t)sent;
    }
    return true;
}

/* Receives exactly size bytes before deadline; on failure *why says what happened. */
static bool receive_all(int fd, void *data, size_t size, double deadline, const char **why) {
    char *bytes = data;
    while (size > 0) {
        struct pollfd ready = {.fd = fd, .events = POLLIN};
        int wait = milliseconds_until(deadline);
        if (wait == 0) {
            *why = "timed out";
            return false;
        }
        int polled = poll(&ready, 1, wait);
        if (polled < 0 && errno != EINTR) {
            *why = strerror(errno);
            return false;
        }
        if (polled <= 0) continue;
        ssize_t got = recv(fd, bytes, size, 0);
        if (got == 0) {
            *why = "the connection closed";
            return false;
        }
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            *why = strerror(errno);
            return false;
        }
        bytes += got;
        size -= (size_t)got;
    }
    return true;
}

/* Control connections: small messages sent at once (no Nagle delay), and keepalive probes so
 * that a host that vanishes without closing anything (power loss, network partition) is noticed
 * within about 90 s instead of never. */
static void tune_connection(int fd) {
    int on = 1, idle = 30, interval = 10, probes = 6;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes);
}

static void local_host_name(char *host) {
    if (gethostname(host, HOST_FIELD) != 0) snprintf(host, HOST_FIELD, "?");
    host[HOST_FIELD - 1] = '\0';
}

/* ---- control messages ------------------------------------------------------------------------ */

static bool send_message(int fd, message_type type, int origin, const char *text) {
    unsigned char bytes[MESSAGE_HEADER_BYTES + TF_DIST_MESSAGE_MAX];
    size_t length = strnlen(text, TF_DIST_MESSAGE_MAX - 1);
    put_u32(bytes, MAGIC_MESSAGE);
    put_u32(bytes + 4, (uint32_t)type);
    put_u32(bytes + 8, (uint32_t)origin);
    put_u32(bytes + 12, (uint32_t)length);
    memcpy(bytes + MESSAGE_HEADER_BYTES, text, length);
    return send_all(fd, bytes, MESSAGE_HEADER_BYTES + length);
}

/* Reads what is left on every open connection until each has closed or the deadline passes, so
 * that closing (or exiting) does not reset a connection whose peer has yet to read our last
 * message: a close with unread bytes sends RST, and a RST can destroy data in flight. (No
 * allocation: this runs while failing. Beyond DRAIN_WINDOW peers, later ones wait their turn.) */
enum { DRAIN_WINDOW = 1024 };

static void drain_connections(tf_dist *dist, double seconds) {
    double deadline = tf_seconds() + seconds;
    struct pollfd ready[DRAIN_WINDOW];
    for (;;) {
        int count = 0, first = -1;
        for (int i = 0; i < dist->peer_count && count < DRAIN_WINDOW; i++) {
            if (dist->peers[i].fd < 0 || dist->peers[i].drained) continue;
            if (first < 0) first = i;
            ready[count++] = (struct pollfd){.fd = dist->peers[i].fd, .events = POLLIN};
        }
        if (count == 0) return;
        int polled = poll(ready, (nfds_t)count, milliseconds_until(deadline));
        if (polled == 0 || (polled < 0 && errno != EINTR)) return;
        for (int i = first, k = 0; i < dist->peer_count && k < count; i++) {
            dist_peer *peer = &dist->peers[i];
            if (peer->fd < 0 || peer->drained) continue;
            if (ready[k++].revents == 0) continue;
            char discard[4096];
            ssize_t got = recv(peer->fd, discard, sizeof discard, MSG_DONTWAIT);
            if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) peer->drained = true;
        }
    }
}

#ifdef TOKENFORMER_CUDA
static atomic_int nccl_abort_done;

static void *nccl_abort_thread(void *comm) {
    ncclCommAbort((ncclComm_t)comm);
    atomic_store(&nccl_abort_done, 1);
    return NULL;
}
#endif

/* Unblocks this rank's collectives: ncclCommAbort makes NCCL's kernels and proxy threads give up.
 * It runs on a thread of its own so that, should it hang, the process still exits. */
static void abort_collectives(tf_dist *dist) {
#ifdef TOKENFORMER_CUDA
    ncclComm_t comm = atomic_exchange(&dist->comm, NULL);
    if (!comm) return;
    pthread_t thread;
    if (pthread_create(&thread, NULL, nccl_abort_thread, comm) != 0) return;
    pthread_detach(thread);
    double deadline = tf_seconds() + NCCL_ABORT_SECONDS;
    while (!atomic_load(&nccl_abort_done) && tf_seconds() < deadline)
        usleep(10 * 1000);
    if (!atomic_load(&nccl_abort_done))
        tf_log("ncclCommAbort did not return within %.0f s; exiting", NCCL_ABORT_SECONDS);
#else
    (void)dist;
#endif
}

/* Ends the process: logs why, passes the news on (rank 0 to every other rank; another rank tells
 * rank 0 when the failure is its own), aborts NCCL and exits with code 1. A second thread that
 * gets here meanwhile waits for the first to end the process. */
static void fail_and_exit(tf_dist *dist, message_type type, int origin, const char *text)
    __attribute__((noreturn));

static void fail_and_exit(tf_dist *dist, message_type type, int origin, const char *text) {
    if (atomic_exchange(&dist->failing, 1))
        for (;;)
            pause();
    if (type == MESSAGE_FAILED)
        tf_log("rank %d failed: %s", origin, text);
    else
        tf_log("rank %d disappeared: %s", origin, text);
    pthread_mutex_lock(&dist->send_lock);
    for (int i = 0; i < dist->peer_count; i++) {
        dist_peer *peer = &dist->peers[i];
        bool tell = dist->rank == 0 ? peer->rank != origin : origin == dist->rank;
        if (tell && peer->fd >= 0 && !peer->finished) send_message(peer->fd, type, origin, text);
        if (peer->fd >= 0) shutdown(peer->fd, SHUT_WR);
    }
    pthread_mutex_unlock(&dist->send_lock);
    abort_collectives(dist);
    drain_connections(dist, ABORT_DRAIN_SECONDS);
    _exit(1);
}

/* ---- the watchdog ---------------------------------------------------------------------------- */

static void peer_lost(tf_dist *dist, const dist_peer *peer) __attribute__((noreturn));

static void peer_lost(tf_dist *dist, const dist_peer *peer) {
    char text[TF_DIST_MESSAGE_MAX];
    snprintf(
        text, sizeof text,
        "its control connection (host %s) closed without a message: the process was killed or crashed, or "
        "its host is unreachable",
        peer->host);
    fail_and_exit(dist, MESSAGE_DISAPPEARED, peer->rank, text);
}

static void handle_message(tf_dist *dist, dist_peer *peer, message_type type, int origin, const char *text) {
    if (type == MESSAGE_FINISHED) {
        /* Our half-close tells a finishing peer that its FINISHED arrived (its drain ends). */
        peer->finished = true;
        pthread_mutex_lock(&dist->send_lock);
        shutdown(peer->fd, SHUT_WR);
        pthread_mutex_unlock(&dist->send_lock);
        return;
    }
    if (type == MESSAGE_FAILED || type == MESSAGE_DISAPPEARED) fail_and_exit(dist, type, origin, text);
    char garbled[128];
    snprintf(garbled, sizeof garbled, "sent an unknown control message (type %d)", (int)type);
    fail_and_exit(dist, MESSAGE_FAILED, peer->rank, garbled);
}

/* Reads what a peer sent and handles each complete message. */
static void peer_readable(tf_dist *dist, dist_peer *peer) {
    ssize_t got = recv(peer->fd, peer->buffer + peer->filled, sizeof peer->buffer - peer->filled, 0);
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (got <= 0) peer_lost(dist, peer);
    peer->filled += (size_t)got;
    while (peer->filled >= MESSAGE_HEADER_BYTES && !peer->finished) {
        uint32_t length = get_u32(peer->buffer + 12);
        if (get_u32(peer->buffer) != MAGIC_MESSAGE || length >= TF_DIST_MESSAGE_MAX)
            fail_and_exit(dist, MESSAGE_FAILED, peer->rank, "sent a garbled control message");
        if (peer->filled < MESSAGE_HEADER_BYTES + length) return;
        char text[TF_DIST_MESSAGE_MAX];
        memcpy(text, peer->buffer + MESSAGE_HEADER_BYTES, length);
        text[length] = '\0';
        handle_message(dist, peer, (message_type)get_u32(peer->buffer + 4), (int)get_u32(peer->buffer + 8),
                       text);
        size_t used = MESSAGE_HEADER_BYTES + length;
        memmove(peer->buffer, peer->buffer + used, peer->filled - used);
        peer->filled -= used;
    }
}

static void *watchdog_main(void *argument) {
    tf_dist *dist = argument;
    struct pollfd *ready = calloc((size_t)dist->peer_count + 1, sizeof *ready);
    int *which = calloc((size_t)dist->peer_count + 1, sizeof *which);
    if (!ready || !which) fail_and_exit(dist, MESSAGE_FAILED, dist->rank, "out of memory in the watchdog");
    for (;;) {
        int count = 0;
        ready[count++] = (struct pollfd){.fd = dist->wake[0], .events = POLLIN};
        for (int i = 0; i < dist->peer_count; i++) {
            if (dist->peers[i].finished) continue;
            which[count] = i;
            ready[count++] = (struct pollfd){.fd = dist->peers[i].fd, .events = POLLIN};
        }
        if (poll(ready, (nfds_t)count, -1) < 0) {
            if (errno == EINTR) continue;
            fail_and_exit(dist, MESSAGE_FAILED, dist->rank, "the watchdog's poll() failed");
        }
        if (ready[0].revents) break; /* dist_finish() */
        for (int k = 1; k < count; k++)
            if (ready[k].revents) peer_readable(dist, &dist->peers[which[k]]);
    }
    free(ready);
    free(which);
    return NULL;
}

/* The watchdog gets no signals: SIGINT / SIGTERM belong to the trainer's main thread. */
static tf_status start_watchdog(tf_dist *dist) {
    if (pipe2(dist->wake, O_CLOEXEC) != 0) return tf_fail(TF_ERR_RUNTIME, "dist: pipe2: %s", strerror(errno));
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    int error = pthread_create(&dist->watchdog, NULL, watchdog_main, dist);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (error) return tf_fail(TF_ERR_RUNTIME, "dist: starting the watchdog thread: %s", strerror(error));
    dist->watchdog_running = true;
    return TF_OK;
}

static void stop_watchdog(tf_dist *dist) {
    if (!dist->watchdog_running) return;
    char byte = 1;
    while (write(dist->wake[1], &byte, 1) < 0 && errno == EINTR) {
    }
    pthread_join(dist->watchdog, NULL);
    dist->watchdog_running = false;
}

/* ---- rendezvous: rank 0 ---------------------------------------------------------------------- */

/* A listening socket on every interface at port: IPv6 with IPv4 mapped where the host has IPv6,
 * plain IPv4 otherwise. SO_REUSEADDR so a restarted run can take the port of one that just ended. */
static tf_status listen_on(int port, const char *port_from, int backlog, int *listener) {
    int on = 1, off = 0, error = 0;
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
        struct sockaddr_in6 address = {
            .sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port), .sin6_addr = in6addr_any};
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
        if (bind(fd, (struct sockaddr *)&address, sizeof address) != 0) {
            error = errno;
            close(fd);
            fd = -1;
        }
    }
    if (fd < 0 && error != EADDRINUSE) {
        struct sockaddr_in address = {
            .sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        error = fd < 0 ? errno : 0;
        if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
        if (fd >= 0 && bind(fd, (struct sockaddr *)&address, sizeof address) != 0) {
            error = errno;
            close(fd);
            fd = -1;
        }
    }
    if (fd >= 0 && listen(fd, backlog) != 0) {
        error = errno;
        close(fd);
        fd = -1;
    }
    if (fd < 0)
        return tf_fail(
            TF_ERR_RUNTIME, "rank 0 cannot listen on TCP port %d (%s): %s%s", port, port_from, strerror(error),
            error == EADDRINUSE ? "; another program (another run?) holds it: choose another MASTER_PORT"
                                : "");
    *listener = fd;
    return TF_OK;
}

/* What rank 0 learnt of a connection. */
typedef struct {
    int fd;
    int rank, world_size, local_rank;
    uint32_t version, blob_size;
    uint64_t fingerprint;
    char host[HOST_FIELD];
} hello_record;

/* Root's state during the rendezvous. */
typedef struct {
    const tf_launch *launch;
    uint64_t fingerprint;
    size_t blob_size;
    hello_record *joined; /* [world_size - 1 + STRAY_CONNECTIONS] */
    int joined_count, capacity;
    int largest_world; /* the largest world size any hello claimed */
    tf_status problem_code;
    char problem[TF_DIST_MESSAGE_MAX]; /* the first mismatch; "" while none */
    double problem_time;
} root_state;

static void set_problem(root_state *root, tf_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_problem(root_state *root, tf_status code, const char *fmt, ...) {
    if (root->problem[0]) return;
    va_list args;
    va_start(args, fmt);
    vsnprintf(root->problem, sizeof root->problem, fmt, args);
    va_end(args);
    root->problem_code = code;
    root->problem_time = tf_seconds();
}

static bool parse_hello(const unsigned char *bytes, hello_record *hello) {
    if (get_u32(bytes) != MAGIC_HELLO) return false;
    hello->version = get_u32(bytes + 4);
    hello->rank = (int)get_u32(bytes + 8);
    hello->world_size = (int)get_u32(bytes + 12);
    hello->local_rank = (int)get_u32(bytes + 16);
    hello->blob_size = get_u32(bytes + 20);
    hello->fingerprint = get_u64(bytes + 24);
    memcpy(hello->host, bytes + 32, HOST_FIELD);
    hello->host[HOST_FIELD - 1] = '\0';
    return true;
}

/* Checks a hello against rank 0's view and the ranks already joined. */
static void check_hello(root_state *root, const hello_record *hello) {
    const tf_launch *launch = root->launch;
    if (hello->world_size > root->largest_world) root->largest_world = hello->world_size;
    if (hello->version != PROTOCOL_VERSION)
        set_problem(root, TF_ERR_USAGE,
                    "rank %d (host %s) speaks rendezvous protocol %u, rank 0 protocol %d: "
                    "the ranks run different tokenformer binaries",
                    hello->rank, hello->host, hello->version, PROTOCOL_VERSION);
    if (hello->world_size != launch->world_size)
        set_problem(root, TF_ERR_USAGE,
                    "rank %d (host %s) was started with world size %d but rank 0 with %d (%s)", hello->rank,
                    hello->host, hello->world_size, launch->world_size, dist_launcher_name(launch->launcher));
    if (hello->rank < 1 || hello->rank >= launch->world_size)
        set_problem(root, TF_ERR_USAGE, "a process on host %s says it is rank %d, outside 1..%d", hello->host,
                    hello->rank, launch->world_size - 1);
    for (int i = 0; i < root->joined_count; i++)
        if (root->joined[i].rank == hello->rank)
            set_problem(root, TF_ERR_USAGE, "two processes say they are rank %d (hosts %s and %s)",
                        hello->rank, root->joined[i].host, hello->host);
    if (hello->fingerprint != root->fingerprint)
        set_problem(root, TF_ERR_USAGE,
                    "rank %d (host %s) has run fingerprint %016llx but rank 0 has %016llx: the "
                    "ranks were started with different configs, options or binaries",
                    hello->rank, hello->host, (unsigned long long)hello->fingerprint,
                    (unsigned long long)root->fingerprint);
    if (hello->blob_size != root->blob_size)
        set_problem(root, TF_ERR_USAGE, "rank %d (host %s) expects a %u-byte id but rank 0 sends %zu bytes",
                    hello->rank, hello->host, hello->blob_size, root->blob_size);
}

/* Accepts one connection and reads its hello; strays (not a tokenformer rank) are dropped. */
static void accept_one(root_state *root, int listener) {
    struct sockaddr_storage address;
    socklen_t length = sizeof address;
    int fd = accept4(listener, (struct sockaddr *)&address, &length, SOCK_CLOEXEC);
    if (fd < 0) return;
    char from[INET6_ADDRSTRLEN + 8] = "?";
    getnameinfo((struct sockaddr *)&address, length, from, sizeof from, NULL, 0, NI_NUMERICHOST);
    unsigned char bytes[HELLO_BYTES];
    const char *why = "not a tokenformer rank";
    hello_record hello = {.fd = fd};
    if (root->joined_count == root->capacity) why = "too many connections";
    if (root->joined_count == root->capacity ||
        !receive_all(fd, bytes, sizeof bytes, tf_seconds() + HELLO_TIMEOUT_SECONDS, &why) ||
        !parse_hello(bytes, &hello)) {
        tf_log("rendezvous: ignoring a connection from %s: %s", from, why);
        close(fd);
        return;
    }
    tune_connection(fd);
    check_hello(root, &hello);
    root->joined[root->joined_count++] = hello;
}

static void missing_ranks(const root_state *root, char *out, size_t size) {
    size_t used = 0;
    out[0] = '\0';
    int listed = 0;
    for (int rank = 1; rank < root->launch->world_size && used + 16 < size; rank++) {
        bool present = false;
        for (int i = 0; i < root->joined_count; i++)
            present |= root->joined[i].rank == rank;
        if (present) continue;
        if (++listed > 16) {
            used += (size_t)snprintf(out + used, size - used, ", ...");
            break;
        }
        used += (size_t)snprintf(out + used, size - used, "%s%d", listed > 1 ? ", " : "", rank);
    }
}

/* Waits until every rank has joined, the timeout passes, or (after a mismatch) a short grace. */
static void collect_hellos(root_state *root, int listener, double timeout) {
    const tf_launch *launch = root->launch;
    double start = tf_seconds(), next_log = start + 10.0;
    for (;;) {
        int expected = (root->problem[0] && root->largest_world > launch->world_size ? root->largest_world
                                                                                     : launch->world_size) -
                       1;
        if (root->joined_count >= expected) return;
        double deadline = root->problem[0] ? root->problem_time + MISMATCH_GRACE_SECONDS : start + timeout;
        if (tf_seconds() >= deadline) return;
        struct pollfd ready = {.fd = listener, .events = POLLIN};
        double until = deadline < next_log ? deadline : next_log;
        if (poll(&ready, 1, milliseconds_until(until)) > 0) {
            accept_one(root, listener);
        } else if (tf_seconds() >= next_log) {
            tf_log("rendezvous: %d of %d ranks have joined rank 0 at port %d; waiting up to %.0f s more",
                   root->joined_count + 1, launch->world_size, launch->master_port,
                   start + timeout - tf_seconds());
            next_log += 30.0;
        }
    }
}

static void send_reply(int fd, tf_status status, const char *message, const void *blob, size_t blob_size) {
    size_t length = strlen(message);
    unsigned char header[REPLY_HEADER_BYTES];
    put_u32(header, MAGIC_REPLY);
    put_u32(header + 4, (uint32_t)status);
    put_u32(header + 8, (uint32_t)length);
    put_u32(header + 12, status == TF_OK ? (uint32_t)blob_size : 0);
    if (send_all(fd, header, sizeof header) && send_all(fd, message, length) && status == TF_OK)
        send_all(fd, blob, blob_size);
}

static tf_status rendezvous_root(tf_dist *dist, const tf_launch *launch, uint64_t fingerprint, double timeout,
                                 const void *blob, size_t blob_size) {
    int listener = -1;
    TF_TRY(listen_on(launch->master_port, launch->port_from, launch->world_size + STRAY_CONNECTIONS, &listener));
    root_state root = {.launch = launch,
                       .fingerprint = fingerprint,
                       .blob_size = blob_size,
                       .capacity = launch->world_size - 1 + STRAY_CONNECTIONS,
                       .largest_world = launch->world_size};
    root.joined = calloc((size_t)root.capacity, sizeof *root.joined);
    if (!root.joined) {
        close(listener);
        return tf_fail(TF_ERR_RUNTIME, "dist: out of memory for %d connections", root.capacity);
    }
    collect_hellos(&root, listener, timeout);
    close(listener);
    if (!root.problem[0] && root.joined_count < launch->world_size - 1) {
        char missing[256];
        missing_ranks(&root, missing, sizeof missing);
        set_problem(
            &root, TF_ERR_RUNTIME,
            "only %d of %d ranks reached the rendezvous at rank 0 (port %d) within %.0f s; missing rank(s) "
            "%s. Were all %d processes started (launched by %s), and is %s (%s) rank 0's host?",
            root.joined_count + 1, launch->world_size, launch->master_port, timeout, missing,
            launch->world_size, dist_launcher_name(launch->launcher), launch->master_addr,
            launch->master_from);
    }
    for (int i = 0; i < root.joined_count; i++)
        send_reply(root.joined[i].fd, root.problem[0] ? root.problem_code : TF_OK, root.problem, blob,
                   blob_size);
    if (root.problem[0]) {
        for (int i = 0; i < root.joined_count; i++)
            close(root.joined[i].fd);
        free(root.joined);
        return tf_fail(root.problem_code, "rendezvous: %s", root.problem);
    }
    dist->peer_count = launch->world_size - 1;
    for (int i = 0; i < root.joined_count; i++) {
        dist_peer *peer = &dist->peers[root.joined[i].rank - 1];
        peer->fd = root.joined[i].fd;
        peer->rank = root.joined[i].rank;
        snprintf(peer->host, sizeof peer->host, "%s", root.joined[i].host);
    }
    free(root.joined);
    return TF_OK;
}

/* ---- rendezvous: the other ranks ------------------------------------------------------------- */

/* One attempt at a connection to host:port, bounded by deadline. -1 with *why on failure;
 * *fatal when retrying cannot help (the host name does not resolve). */
static int connect_once(const char *host, int port, double deadline, char *why, size_t why_size,
                        bool *fatal) {
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *addresses;
    int resolved = getaddrinfo(host, service, &hints, &addresses);
    if (resolved != 0) {
        snprintf(why, why_size, "cannot resolve '%.160s': %s", host, gai_strerror(resolved));
        *fatal = resolved == EAI_NONAME;
        return -1;
    }
    int fd = -1;
    for (struct addrinfo *address = addresses; address && fd < 0; address = address->ai_next) {
        fd = socket(address->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) continue;
        int error = connect(fd, address->ai_addr, address->ai_addrlen) == 0 ? 0 : errno;
        if (error == EINPROGRESS) {
            double attempt_end = tf_seconds() + 5.0 < deadline ? tf_seconds() + 5.0 : deadline;
            struct pollfd ready = {.fd = fd, .events = POLLOUT};
            socklen_t size = sizeof error;
            if (poll(&ready, 1, milliseconds_until(attempt_end)) <= 0)
                error = ETIMEDOUT;
            else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) != 0)
                error = errno;
        }
        if (error != 0) {
            snprintf(why, why_size, "%s", strerror(error));
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(addresses);
    if (fd >= 0) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    return fd;
}

/* Connects to rank 0, retrying with backoff (it may not listen yet) until the timeout. */
static tf_status connect_to_root(const tf_launch *launch, double timeout, int *connection) {
    double start = tf_seconds(), deadline = start + timeout, next_log = start + 5.0, backoff = 0.05;
    char why[256] = "";
    for (;;) {
        bool fatal = false;
        int fd = connect_once(launch->master_addr, launch->master_port, deadline, why, sizeof why, &fatal);
        if (fd >= 0) {
            *connection = fd;
            return TF_OK;
        }
        double now = tf_seconds();
        if (fatal || now + backoff >= deadline)
            return tf_fail(
                TF_ERR_RUNTIME,
                "rendezvous: could not reach rank 0 at %s:%d (%s) within %.0f s: %s. Is rank 0 running, "
                "and is that its address?",
                launch->master_addr, launch->master_port, launch->master_from, now - start, why);
        if (now >= next_log) {
            tf_log("rendezvous: waiting for rank 0 at %s:%d (%s); retrying for up to %.0f s more",
                   launch->master_addr, launch->master_port, why, deadline - now);
            next_log = now + 60.0;
        }
        usleep((useconds_t)(backoff * 1e6));
        backoff = backoff * 2 > 1.0 ? 1.0 : backoff * 2;
    }
}

static bool send_hello(int fd, const tf_launch *launch, uint64_t fingerprint, size_t blob_size) {
    unsigned char bytes[HELLO_BYTES] = {0};
    put_u32(bytes, MAGIC_HELLO);
    put_u32(bytes + 4, PROTOCOL_VERSION);
    put_u32(bytes + 8, (uint32_t)launch->rank);
    put_u32(bytes + 12, (uint32_t)launch->world_size);
    put_u32(bytes + 16, (uint32_t)launch->local_rank);
    put_u32(bytes + 20, (uint32_t)blob_size);
    put_u64(bytes + 24, fingerprint);
    local_host_name((char *)bytes + 32);
    return send_all(fd, bytes, sizeof bytes);
}

/* Reads rank 0's verdict and, when it is TF_OK, the blob. */
static tf_status receive_reply(tf_dist *dist, int fd, double deadline, void *blob, size_t blob_size) {
    unsigned char header[REPLY_HEADER_BYTES];
    const char *why = "";
    if (!receive_all(fd, header, sizeof header, deadline, &why) || get_u32(header) != MAGIC_REPLY)
        return tf_fail(TF_ERR_RUNTIME, "rendezvous: rank 0 at %s did not answer: %s", dist->master,
                       why[0] ? why : "a reply that is not tokenformer's");
    tf_status status = (tf_status)get_u32(header + 4);
    uint32_t length = get_u32(header + 8), size = get_u32(header + 12);
    char message[TF_DIST_MESSAGE_MAX] = "";
    if (length >= sizeof message || size > MAX_BLOB_BYTES)
        return tf_fail(TF_ERR_RUNTIME, "rendezvous: rank 0 at %s sent a garbled reply", dist->master);
    if (!receive_all(fd, message, length, deadline, &why))
        return tf_fail(TF_ERR_RUNTIME, "rendezvous: reading rank 0's reply: %s", why);
    message[length] = '\0';
    if (status != TF_OK)
        return tf_fail(status == TF_ERR_USAGE ? TF_ERR_USAGE : TF_ERR_RUNTIME, "rendezvous: %s", message);
    if (size != blob_size)
        return tf_fail(TF_ERR_USAGE, "rendezvous: rank 0 sent a %u-byte id but this rank expects %zu bytes",
                       size, blob_size);
    if (!receive_all(fd, blob, blob_size, deadline, &why))
        return tf_fail(TF_ERR_RUNTIME, "rendezvous: reading rank 0's id: %s", why);
    return TF_OK;
}

static tf_status rendezvous_rank(tf_dist *dist, const tf_launch *launch, uint64_t fingerprint, double timeout,
                                 void *blob, size_t blob_size) {
    int fd;
    TF_TRY(connect_to_root(launch, timeout, &fd));
    tune_connection(fd);
    if (!send_hello(fd, launch, fingerprint, blob_size)) {
        close(fd);
        return tf_fail(TF_ERR_RUNTIME, "rendezvous: sending to rank 0 at %s: %s", dist->master,
                       strerror(errno));
    }
    /* Rank 0 answers once every rank has joined, within its own timeout of at most this long. */
    tf_status status = receive_reply(dist, fd, tf_seconds() + timeout + 30.0, blob, blob_size);
    if (status != TF_OK) {
        close(fd);
        return status;
    }
    dist->peer_count = 1;
    dist->peers[0].fd = fd;
    dist->peers[0].rank = 0;
    snprintf(dist->peers[0].host, sizeof dist->peers[0].host, "%.*s", HOST_FIELD - 1, launch->master_addr);
    return TF_OK;
}

/* ---- the group ------------------------------------------------------------------------------- */

static void release(tf_dist *dist) {
    if (!dist) return;
    for (int i = 0; i < dist->peer_count; i++)
        if (dist->peers[i].fd >= 0) close(dist->peers[i].fd);
    for (int i = 0; i < 2; i++)
        if (dist->wake[i] >= 0) close(dist->wake[i]);
    pthread_mutex_destroy(&dist->send_lock);
    free(dist->peers);
    free(dist);
}

tf_status dist_connect(tf_dist **out, const tf_launch *launch, const tf_dist_options *options, void *blob,
                       size_t blob_size) {
    *out = NULL;
    if (launch->world_size < 1 || launch->rank < 0 || launch->rank >= launch->world_size)
        return tf_fail(TF_ERR_USAGE, "dist: rank %d of world size %d", launch->rank, launch->world_size);
    if (launch->world_size > 1 &&
        (!launch->master_addr[0] || launch->master_port < 1 || launch->master_port > 65535))
        return tf_fail(TF_ERR_USAGE, "dist: world size %d needs rank 0's address and port",
                       launch->world_size);
    if (blob_size > MAX_BLOB_BYTES)
        return tf_fail(TF_ERR_USAGE, "dist: a %zu-byte id is too large", blob_size);
    tf_dist *dist = calloc(1, sizeof *dist);
    if (dist) dist->peers = calloc((size_t)launch->world_size, sizeof *dist->peers);
    if (!dist || !dist->peers) {
        free(dist);
        return tf_fail(TF_ERR_RUNTIME, "dist: out of memory");
    }
    dist->rank = launch->rank;
    dist->world_size = launch->world_size;
    dist->local_rank = launch->local_rank;
    dist->wake[0] = dist->wake[1] = -1;
    for (int i = 0; i < launch->world_size; i++)
        dist->peers[i].fd = -1;
    pthread_mutex_init(&dist->send_lock, NULL);
    snprintf(dist->master, sizeof dist->master, "%s:%d", launch->master_addr, launch->master_port);
    if (launch->world_size == 1) {
        *out = dist;
        return TF_OK;
    }
    tf_log_set_rank(launch->rank);
    double timeout =
        options && options->timeout_seconds > 0 ? options->timeout_seconds : DEFAULT_TIMEOUT_SECONDS;
    uint64_t fingerprint = options ? options->fingerprint : 0;
    tf_status status = launch->rank == 0
                           ? rendezvous_root(dist, launch, fingerprint, timeout, blob, blob_size)
                           : rendezvous_rank(dist, launch, fingerprint, timeout, blob, blob_size);
    if (status == TF_OK) status = start_watchdog(dist);
    if (status != TF_OK) {
        release(dist);
        return status;
    }
    *out = dist;
    return TF_OK;
}

void dist_abort(tf_dist *dist, const char *message) {
    if (!dist || dist->world_size == 1) return;
    fflush(stdout);
    fail_and_exit(dist, MESSAGE_FAILED, dist->rank, message);
}

int dist_rank(const tf_dist *dist) {
    return dist ? dist->rank : 0;
}

int dist_world_size(const tf_dist *dist) {
    return dist ? dist->world_size : 1;
}

int dist_local_rank(const tf_dist *dist) {
    return dist ? dist->local_rank : 0;
}

bool dist_is_main(const tf_dist *dist) {
    return dist_rank(dist) == 0;
}

/* Tells the other end(s) that this rank is done, then waits briefly for them to close. */
static void close_channel(tf_dist *dist) {
    stop_watchdog(dist);
    pthread_mutex_lock(&dist->send_lock);
    for (int i = 0; i < dist->peer_count; i++) {
        dist_peer *peer = &dist->peers[i];
        if (peer->fd < 0) continue;
        if (!peer->finished) send_message(peer->fd, MESSAGE_FINISHED, dist->rank, "");
        shutdown(peer->fd, SHUT_WR);
    }
    pthread_mutex_unlock(&dist->send_lock);
    drain_connections(dist, FINISH_DRAIN_SECONDS);
}

static tf_status nccl_close(tf_dist *dist);

tf_status dist_finish(tf_dist *dist) {
    if (!dist) return TF_OK;
    /* NCCL first, while the watchdog still watches: its teardown may wait for the other ranks. */
    tf_status status = nccl_close(dist);
    close_channel(dist);
    release(dist);
    return status;
}

/* ---- device selection ------------------------------------------------------------------------ */

static void keep_nvls_off(void) {
    /* NVLink multicast (NVLS) can take the shared machine's GPUs down; 0 = off unless the user
     * chose otherwise. NCCL reads it when it initialises, so this runs before any NCCL call. */
    setenv("NCCL_NVLS_ENABLE", "0", 0);
}

/* Once this process has begun to stop after a failure (fail_and_exit has aborted the NCCL
 * communicator and exits after draining, up to ABORT_DRAIN_SECONDS), the main thread, freed from
 * the collective it was stuck in, must not go on as if alone: with the communicator gone every
 * collective would be a no-op, and an unsummed step or a checkpoint of weights that no other rank
 * holds could follow. Every collective fails instead. */
static tf_status collectives_open(tf_dist *dist) {
    if (dist && atomic_load(&dist->failing))
        return tf_fail(TF_ERR_RUNTIME, "dist: stopping after a failure (above); collectives are closed");
    return TF_OK;
}

tf_status dist_join(tf_dist **dist, uint64_t fingerprint) {
    tf_launch launch;
    TF_TRY(dist_launch_detect(&launch));
    tf_dist_options options = {.fingerprint = fingerprint};
    return dist_init(dist, &launch, &options);
}

void dist_gradient_ready(void *gradient_sum, size_t offset, size_t count) {
    tf_dist_gradient_sum *sum = gradient_sum;
    if (sum->status == TF_OK) sum->status = dist_all_reduce_sum_f32_range(sum->dist, sum->grads, offset, count);
}

#ifndef TOKENFORMER_CUDA

static tf_status needs_cuda(const tf_launch *launch) {
    return tf_fail(TF_ERR_USAGE,
                   "multi-process training needs the CUDA build: this binary was built with "
                   "-DTOKENFORMER_CUDA=OFF (started by %s as rank %d of %d)",
                   dist_launcher_name(launch->launcher), launch->rank, launch->world_size);
}

tf_status dist_select_device(const tf_launch *launch) {
    keep_nvls_off();
    return launch->world_size > 1 ? needs_cuda(launch) : TF_OK;
}

tf_status dist_init(tf_dist **dist, const tf_launch *launch, const tf_dist_options *options) {
    *dist = NULL;
    keep_nvls_off();
    if (launch->world_size > 1) return needs_cuda(launch);
    if (options && options->nccl_single_rank)
        return tf_fail(TF_ERR_USAGE, "dist: nccl_single_rank needs the CUDA build");
    return dist_connect(dist, launch, options, NULL, 0);
}

static tf_status nccl_close(tf_dist *dist) {
    (void)dist;
    return TF_OK;
}

/* Without CUDA there is never more than one rank: every collective leaves its data as it is. */
tf_status dist_all_reduce_sum_f32(tf_dist *dist, float *buffer, size_t count) {
    (void)buffer, (void)count;
    return collectives_open(dist);
}

tf_status dist_all_reduce_sum_f32_range(tf_dist *dist, float *buffer, size_t offset, size_t count) {
    (void)buffer, (void)offset, (void)count;
    return collectives_open(dist);
}

tf_status dist_all_reduce_wait(tf_dist *dist) {
    return collectives_open(dist);
}

tf_status dist_broadcast_f32(tf_dist *dist, float *buffer, size_t count) {
    (void)buffer, (void)count;
    return collectives_open(dist);
}

tf_status dist_all_reduce_host_i64(tf_dist *dist, int64_t *values, size_t count, tf_dist_op op) {
    (void)values, (void)count, (void)op;
    return collectives_open(dist);
}

tf_status dist_all_reduce_host_f64(tf_dist *dist, double *values, size_t count, tf_dist_op op) {
    (void)values, (void)count, (void)op;
    return collectives_open(dist);
}

#else /* TOKENFORMER_CUDA */

enum { SCRATCH_BYTES = 1 << 20 };

static tf_status cuda_check(cudaError_t error, const char *call) {
    if (error == cudaSuccess) return TF_OK;
    return tf_fail(TF_ERR_RUNTIME, "dist: %s failed: %s (%s)", call, cudaGetErrorString(error),
                   cudaGetErrorName(error));
}

static tf_status nccl_check(ncclResult_t result, const char *call, ncclComm_t comm) {
    if (result == ncclSuccess) return TF_OK;
    const char *detail = ncclGetLastError(comm);
    return tf_fail(TF_ERR_RUNTIME, "dist: %s failed: %s (%d)%s%s", call, ncclGetErrorString(result),
                   (int)result, detail && detail[0] ? ": " : "", detail ? detail : "");
}

tf_status dist_select_device(const tf_launch *launch) {
    keep_nvls_off();
    if (launch->world_size == 1) return TF_OK;
    int count = 0;
    TF_TRY(cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount"));
    /* One GPU visible to each process: the launcher bound it (CUDA_VISIBLE_DEVICES per task). */
    int device = launch->local_rank < count ? launch->local_rank : count == 1 ? 0 : -1;
    if (device < 0)
        return tf_fail(TF_ERR_USAGE, "local rank %d (from %s) needs GPU %d, but this process sees %d GPU(s)",
                       launch->local_rank, dist_launcher_name(launch->launcher), launch->local_rank, count);
    tf_status status = cuda_check(cudaSetDevice(device), "cudaSetDevice");
    return status == TF_OK
               ? TF_OK
               : tf_fail_context(status, "selecting GPU %d for local rank %d", device, launch->local_rank);
}

/* The communication stream (high priority, so that bucket all-reduces overlapping the backward
 * pass get the SMs they need), its events and the scratch of host reductions. */
static tf_status nccl_resources(tf_dist *dist) {
    int least, greatest;
    TF_TRY(
        cuda_check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange"));
    TF_TRY(cuda_check(cudaStreamCreateWithPriority(&dist->stream, cudaStreamNonBlocking, greatest),
                      "cudaStreamCreateWithPriority"));
    TF_TRY(cuda_check(cudaEventCreateWithFlags(&dist->queued, cudaEventDisableTiming),
                      "cudaEventCreateWithFlags"));
    TF_TRY(cuda_check(cudaEventCreateWithFlags(&dist->reduced, cudaEventDisableTiming),
                      "cudaEventCreateWithFlags"));
    TF_TRY(cuda_check(cudaMalloc(&dist->device_scratch, SCRATCH_BYTES), "cudaMalloc (dist scratch, 1 MiB)"));
    TF_TRY(cuda_check(cudaMallocHost(&dist->host_scratch, SCRATCH_BYTES),
                      "cudaMallocHost (dist scratch, 1 MiB)"));
    return TF_OK;
}

static tf_status nccl_open(tf_dist *dist, const ncclUniqueId *id) {
    TF_TRY(nccl_resources(dist));
    ncclComm_t comm = NULL;
    tf_status status =
        nccl_check(ncclCommInitRank(&comm, dist->world_size, *id, dist->rank), "ncclCommInitRank", comm);
    if (status != TF_OK)
        return tf_fail_context(status, "rank %d of %d, GPU of local rank %d", dist->rank, dist->world_size,
                               dist->local_rank);
    atomic_store(&dist->comm, comm);
    return TF_OK;
}

tf_status dist_init(tf_dist **dist, const tf_launch *launch, const tf_dist_options *options) {
    *dist = NULL;
    keep_nvls_off();
    bool single_nccl = options && options->nccl_single_rank;
    if (launch->world_size == 1 && !single_nccl) return dist_connect(dist, launch, options, NULL, 0);
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    /* Rank 0 still joins the rendezvous when ncclGetUniqueId fails, so that its error can reach
     * every rank (through the caller's dist_abort) instead of leaving them waiting. */
    tf_status id_status = TF_OK;
    if (launch->rank == 0) id_status = nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId", NULL);
    TF_TRY(dist_connect(dist, launch, options, &id, sizeof id));
    TF_TRY(id_status);
    /* The GPU only now, with the channel up: a rank that cannot use its GPU stops every rank at
     * once (the caller's dist_abort) instead of leaving them waiting at the rendezvous. */
    TF_TRY(dist_select_device(launch));
    return nccl_open(*dist, &id);
}

static tf_status first_failure(tf_status status, tf_status next) {
    return status != TF_OK ? status : next;
}

static tf_status nccl_close(tf_dist *dist) {
    tf_status status = TF_OK;
    ncclComm_t comm = atomic_exchange(&dist->comm, NULL);
    if (dist->stream)
        status = cuda_check(cudaStreamSynchronize(dist->stream), "cudaStreamSynchronize (dist)");
    if (comm) status = first_failure(status, nccl_check(ncclCommDestroy(comm), "ncclCommDestroy", NULL));
    if (dist->host_scratch) cudaFreeHost(dist->host_scratch);
    if (dist->device_scratch) cudaFree(dist->device_scratch);
    if (dist->queued) cudaEventDestroy(dist->queued);
    if (dist->reduced) cudaEventDestroy(dist->reduced);
    if (dist->stream) cudaStreamDestroy(dist->stream);
    dist->host_scratch = dist->device_scratch = NULL;
    dist->stream = NULL;
    return status;
}

/* The communicator, or NULL when collectives are no-ops (world size 1). */
static ncclComm_t comm_of(tf_dist *dist) {
    return dist ? atomic_load(&dist->comm) : NULL;
}

/* The backend's stream, which orders the collectives with the model's work. */
static tf_status backend_stream(cudaStream_t *stream) {
    *stream = tf_cuda_stream();
    if (!*stream)
        return tf_fail(TF_ERR_RUNTIME,
                       "dist: the CUDA backend is not open (its stream orders the collectives): "
                       "open it with run.device cuda before training on several GPUs");
    return TF_OK;
}

/* The communication stream waits for the work queued so far on the backend's stream. */
static tf_status after_backend_work(tf_dist *dist) {
    cudaStream_t stream;
    TF_TRY(backend_stream(&stream));
    TF_TRY(cuda_check(cudaEventRecord(dist->queued, stream), "cudaEventRecord (gradients ready)"));
    return cuda_check(cudaStreamWaitEvent(dist->stream, dist->queued, 0),
                      "cudaStreamWaitEvent (gradients ready)");
}

tf_status dist_all_reduce_sum_f32_range(tf_dist *dist, float *buffer, size_t offset, size_t count) {
    TF_TRY(collectives_open(dist));
    ncclComm_t comm = comm_of(dist);
    if (!comm || count == 0) return TF_OK;
    TF_TRY(after_backend_work(dist));
    float *data = buffer + offset;
    tf_status status = nccl_check(ncclAllReduce(data, data, count, ncclFloat32, ncclSum, comm, dist->stream),
                                  "ncclAllReduce", comm);
    if (status != TF_OK) return tf_fail_context(status, "%zu floats at offset %zu", count, offset);
    dist->reductions_pending = true;
    return TF_OK;
}

tf_status dist_all_reduce_wait(tf_dist *dist) {
    TF_TRY(collectives_open(dist));
    if (!comm_of(dist) || !dist->reductions_pending) return TF_OK;
    cudaStream_t stream;
    TF_TRY(backend_stream(&stream));
    TF_TRY(cuda_check(cudaEventRecord(dist->reduced, dist->stream), "cudaEventRecord (sums ready)"));
    TF_TRY(cuda_check(cudaStreamWaitEvent(stream, dist->reduced, 0), "cudaStreamWaitEvent (sums ready)"));
    dist->reductions_pending = false;
    return TF_OK;
}

tf_status dist_all_reduce_sum_f32(tf_dist *dist, float *buffer, size_t count) {
    TF_TRY(dist_all_reduce_sum_f32_range(dist, buffer, 0, count));
    return dist_all_reduce_wait(dist);
}

tf_status dist_broadcast_f32(tf_dist *dist, float *buffer, size_t count) {
    TF_TRY(collectives_open(dist));
    ncclComm_t comm = comm_of(dist);
    if (!comm || count == 0) return TF_OK;
    TF_TRY(after_backend_work(dist));
    TF_TRY(nccl_check(ncclBroadcast(buffer, buffer, count, ncclFloat32, 0, comm, dist->stream),
                      "ncclBroadcast", comm));
    dist->reductions_pending = true;
    return dist_all_reduce_wait(dist);
}

static ncclRedOp_t nccl_op(tf_dist_op op) {
    switch (op) {
    case TF_DIST_MIN:
        return ncclMin;
    case TF_DIST_MAX:
        return ncclMax;
    case TF_DIST_SUM:
        break;
    }
    return ncclSum;
}

/* Host values through the scratch buffers, one chunk at a time, on the communication stream. */
static tf_status all_reduce_host(tf_dist *dist, void *values, size_t count, size_t element_size,
                                 ncclDataType_t type, tf_dist_op op) {
    TF_TRY(collectives_open(dist));
    ncclComm_t comm = comm_of(dist);
    if (!comm) return TF_OK;
    size_t per_chunk = SCRATCH_BYTES / element_size;
    for (size_t done = 0; done < count; done += per_chunk) {
        size_t n = count - done < per_chunk ? count - done : per_chunk;
        char *chunk = (char *)values + done * element_size;
        memcpy(dist->host_scratch, chunk, n * element_size);
        TF_TRY(cuda_check(cudaMemcpyAsync(dist->device_scratch, dist->host_scratch, n * element_size,
                                          cudaMemcpyHostToDevice, dist->stream),
                          "cudaMemcpyAsync (host values to the device)"));
        TF_TRY(nccl_check(ncclAllReduce(dist->device_scratch, dist->device_scratch, n, type, nccl_op(op),
                                        comm, dist->stream),
                          "ncclAllReduce (host values)", comm));
        TF_TRY(cuda_check(cudaMemcpyAsync(dist->host_scratch, dist->device_scratch, n * element_size,
                                          cudaMemcpyDeviceToHost, dist->stream),
                          "cudaMemcpyAsync (results to the host)"));
        TF_TRY(cuda_check(cudaStreamSynchronize(dist->stream), "cudaStreamSynchronize (host all-reduce)"));
        TF_TRY(collectives_open(dist)); /* aborted while waiting: the values are no sums */
        memcpy(chunk, dist->host_scratch, n * element_size);
    }
    return TF_OK;
}

tf_status dist_all_reduce_host_i64(tf_dist *dist, int64_t *values, size_t count, tf_dist_op op) {
    return all_reduce_host(dist, values, count, sizeof *values, ncclInt64, op);
}

tf_status dist_all_reduce_host_f64(tf_dist *dist, double *values, size_t count, tf_dist_op op) {
    return all_reduce_host(dist, values, count, sizeof *values, ncclFloat64, op);
}

#endif /* TOKENFORMER_CUDA */
