/* Launch detection (see dist.h): which launcher started this process, its rank and GPU, and
 * where rank 0 listens; Slurm's compressed host lists; the run fingerprint. Everything here is
 * plain parsing of environment variables, kept apart from the sockets and NCCL of dist.c. */
#include "train/dist.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- environment values ---------------------------------------------------------------------- */

static const char *env_value(const char *name) {
    const char *value = getenv(name);
    return value && value[0] ? value : NULL;
}

/* *value = the integer in variable name, which must be set; at least minimum. */
static tf_status env_int(const char *name, int minimum, int *value) {
    const char *text = env_value(name);
    if (!text) return tf_fail(TF_ERR_USAGE, "%s is not set", name);
    char *end;
    errno = 0;
    long parsed = strtol(text, &end, 10);
    if (errno || end == text || *end != '\0' || parsed < minimum || parsed > INT_MAX)
        return tf_fail(TF_ERR_USAGE, "%s='%s' is not an integer >= %d", name, text, minimum);
    *value = (int)parsed;
    return TF_OK;
}

/* Like env_int, but an unset variable leaves *value as it is. */
static tf_status env_int_optional(const char *name, int minimum, int *value) {
    return env_value(name) ? env_int(name, minimum, value) : TF_OK;
}

static tf_status copy_host(tf_launch *launch, const char *host, const char *from) {
    if (strlen(host) >= sizeof launch->master_addr)
        return tf_fail(TF_ERR_USAGE, "%s='%.64s...' is longer than %zu characters", from, host,
                       sizeof launch->master_addr - 1);
    strcpy(launch->master_addr, host);
    snprintf(launch->master_from, sizeof launch->master_from, "%s", from);
    return TF_OK;
}

static tf_status master_port_from_env(tf_launch *launch, int fallback) {
    launch->master_port = fallback;
    snprintf(launch->port_from, sizeof launch->port_from, "%s",
             env_value("MASTER_PORT") ? "MASTER_PORT" : "the default port");
    TF_TRY(env_int_optional("MASTER_PORT", 1, &launch->master_port));
    if (launch->master_port > 65535)
        return tf_fail(TF_ERR_USAGE, "MASTER_PORT=%d is not a TCP port (1-65535)", launch->master_port);
    return TF_OK;
}

/* Ranks and sizes that cannot belong together; names are the variables they came from. */
static tf_status check_consistent(const tf_launch *launch, const char *rank_name, const char *size_name,
                                  const char *local_rank_name, const char *local_size_name) {
    if (launch->world_size < 1)
        return tf_fail(TF_ERR_USAGE, "%s=%d: the world size must be at least 1", size_name,
                       launch->world_size);
    if (launch->rank >= launch->world_size)
        return tf_fail(TF_ERR_USAGE, "%s=%d is not below %s=%d", rank_name, launch->rank, size_name,
                       launch->world_size);
    if (launch->local_size > 0 && launch->local_rank >= launch->local_size)
        return tf_fail(TF_ERR_USAGE, "%s=%d is not below %s=%d", local_rank_name, launch->local_rank,
                       local_size_name, launch->local_size);
    if (launch->local_size > launch->world_size)
        return tf_fail(TF_ERR_USAGE, "%s=%d is larger than %s=%d", local_size_name, launch->local_size,
                       size_name, launch->world_size);
    return TF_OK;
}

/* ---- the launchers --------------------------------------------------------------------------- */

static tf_status detect_torchrun(tf_launch *launch) {
    if (!env_value("RANK") || !env_value("WORLD_SIZE"))
        return tf_fail(TF_ERR_USAGE, "%s is set but %s is not: torchrun-style launches set both",
                       env_value("RANK") ? "RANK" : "WORLD_SIZE", env_value("RANK") ? "WORLD_SIZE" : "RANK");
    TF_TRY(env_int("RANK", 0, &launch->rank));
    TF_TRY(env_int("WORLD_SIZE", 1, &launch->world_size));
    TF_TRY(env_int_optional("LOCAL_WORLD_SIZE", 1, &launch->local_size));
    if (launch->world_size > 1) {
        if (!env_value("LOCAL_RANK"))
            return tf_fail(TF_ERR_USAGE,
                           "WORLD_SIZE=%d but LOCAL_RANK (this process's GPU on its node) is not set",
                           launch->world_size);
        if (!env_value("MASTER_ADDR") || !env_value("MASTER_PORT"))
            return tf_fail(TF_ERR_USAGE,
                           "WORLD_SIZE=%d but %s is not set: give rank 0's host and a free port in "
                           "MASTER_ADDR and MASTER_PORT",
                           launch->world_size, env_value("MASTER_ADDR") ? "MASTER_PORT" : "MASTER_ADDR");
        TF_TRY(copy_host(launch, env_value("MASTER_ADDR"), "MASTER_ADDR"));
    }
    TF_TRY(env_int_optional("LOCAL_RANK", 0, &launch->local_rank));
    TF_TRY(master_port_from_env(launch, TF_DIST_DEFAULT_PORT));
    /* torchrun's agent may serve a TCP store of its own on MASTER_PORT for the workers' PyTorch
     * process groups; it says so in this variable, and the rendezvous then takes the next port. */
    const char *agent_store = env_value("TORCHELASTIC_USE_AGENT_STORE");
    if (launch->world_size > 1 && agent_store && strcmp(agent_store, "True") == 0) {
        if (launch->master_port == 65535)
            return tf_fail(TF_ERR_USAGE,
                           "MASTER_PORT=65535 is torchrun's store (TORCHELASTIC_USE_AGENT_STORE=True) and "
                           "the rendezvous needs the port after it: give torchrun a lower --master-port");
        launch->master_port++;
        snprintf(launch->port_from, sizeof launch->port_from,
                 "MASTER_PORT + 1; torchrun's agent serves its store on MASTER_PORT");
    }
    return check_consistent(launch, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE");
}

static tf_status detect_openmpi(tf_launch *launch) {
    const char *rank_name = "OMPI_COMM_WORLD_RANK", *size_name = "OMPI_COMM_WORLD_SIZE";
    const char *local_rank_name = "OMPI_COMM_WORLD_LOCAL_RANK",
               *local_size_name = "OMPI_COMM_WORLD_LOCAL_SIZE";
    if (!env_value(rank_name) || !env_value(size_name))
        return tf_fail(TF_ERR_USAGE, "%s is set but %s is not", env_value(rank_name) ? rank_name : size_name,
                       env_value(rank_name) ? size_name : rank_name);
    TF_TRY(env_int(rank_name, 0, &launch->rank));
    TF_TRY(env_int(size_name, 1, &launch->world_size));
    TF_TRY(env_int_optional(local_rank_name, 0, &launch->local_rank));
    TF_TRY(env_int_optional(local_size_name, 1, &launch->local_size));
    if (launch->world_size > 1 && !env_value(local_rank_name))
        return tf_fail(TF_ERR_USAGE, "%s=%d but %s is not set", size_name, launch->world_size,
                       local_rank_name);
    TF_TRY(check_consistent(launch, rank_name, size_name, local_rank_name, local_size_name));
    TF_TRY(master_port_from_env(launch, TF_DIST_DEFAULT_PORT));
    if (launch->world_size == 1) return TF_OK;
    if (env_value("MASTER_ADDR")) return copy_host(launch, env_value("MASTER_ADDR"), "MASTER_ADDR");
    if (launch->local_size == launch->world_size)
        return copy_host(launch, "127.0.0.1", "OMPI_COMM_WORLD_LOCAL_SIZE == OMPI_COMM_WORLD_SIZE: one node");
    return tf_fail(
        TF_ERR_USAGE,
        "mpirun started %d ranks on several nodes (%s=%d) but MASTER_ADDR is not set: pass rank 0's "
        "host and a free port, e.g. mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...",
        launch->world_size, local_size_name, launch->local_size);
}

static tf_status slurm_master_addr(tf_launch *launch) {
    if (env_value("MASTER_ADDR")) return copy_host(launch, env_value("MASTER_ADDR"), "MASTER_ADDR");
    /* The step's own node list first: a step may run on a subset of the job's nodes. */
    static const char *const lists[] = {"SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"};
    for (size_t i = 0; i < sizeof lists / sizeof lists[0]; i++) {
        const char *list = env_value(lists[i]);
        if (!list) continue;
        char host[TF_DIST_HOST_MAX];
        if (dist_nodelist_first(list, host, sizeof host) != TF_OK)
            return tf_fail_context(TF_ERR_USAGE, "%s", lists[i]);
        char from[96];
        snprintf(from, sizeof from, "the first host of %s", lists[i]);
        return copy_host(launch, host, from);
    }
    return tf_fail(TF_ERR_USAGE,
                   "SLURM_NTASKS=%d but neither MASTER_ADDR nor SLURM_STEP_NODELIST, "
                   "SLURM_JOB_NODELIST or SLURM_NODELIST is set: set MASTER_ADDR to rank 0's host",
                   launch->world_size);
}

static tf_status detect_slurm(tf_launch *launch) {
    TF_TRY(env_int("SLURM_PROCID", 0, &launch->rank));
    /* srun sets SLURM_STEP_NUM_TASKS for its tasks; a batch script has only the job's
     * SLURM_NTASKS, and there this process is the script's one process, not rank 0 of N. */
    const char *size_name = env_value("SLURM_STEP_NUM_TASKS") ? "SLURM_STEP_NUM_TASKS" : "SLURM_NTASKS";
    TF_TRY(env_int_optional(size_name, 1, &launch->world_size));
    if (!env_value("SLURM_STEP_NUM_TASKS") && launch->world_size > 1)
        return tf_fail(
            TF_ERR_USAGE,
            "SLURM_NTASKS=%d but this process was not started by srun (SLURM_STEP_NUM_TASKS is not "
            "set): start one process per GPU with `srun tokenformer ...`",
            launch->world_size);
    TF_TRY(env_int_optional("SLURM_LOCALID", 0, &launch->local_rank));
    if (launch->world_size > 1 && !env_value("SLURM_LOCALID"))
        return tf_fail(TF_ERR_USAGE, "%s=%d but SLURM_LOCALID is not set", size_name, launch->world_size);
    TF_TRY(check_consistent(launch, "SLURM_PROCID", size_name, "SLURM_LOCALID", "(tasks on this node)"));
    int job_id = 0;
    TF_TRY(env_int_optional(env_value("SLURM_JOB_ID") ? "SLURM_JOB_ID" : "SLURM_JOBID", 0, &job_id));
    /* Jobs sharing a node get different default ports. */
    TF_TRY(master_port_from_env(launch, TF_DIST_DEFAULT_PORT + job_id % 1000));
    return launch->world_size > 1 ? slurm_master_addr(launch) : TF_OK;
}

tf_status dist_launch_detect(tf_launch *launch) {
    *launch = (tf_launch){.launcher = TF_LAUNCHER_NONE, .rank = 0, .world_size = 1};
    tf_status status = TF_OK;
    if (env_value("RANK") || env_value("WORLD_SIZE")) {
        launch->launcher = TF_LAUNCHER_TORCHRUN;
        status = detect_torchrun(launch);
    } else if (env_value("OMPI_COMM_WORLD_RANK") || env_value("OMPI_COMM_WORLD_SIZE")) {
        launch->launcher = TF_LAUNCHER_OPENMPI;
        status = detect_openmpi(launch);
    } else if (env_value("SLURM_PROCID")) {
        launch->launcher = TF_LAUNCHER_SLURM;
        status = detect_slurm(launch);
    }
    if (status != TF_OK)
        return tf_fail_context(status, "launched by %s, but its variables do not fit",
                               dist_launcher_name(launch->launcher));
    return TF_OK;
}

const char *dist_launcher_name(tf_launcher launcher) {
    switch (launcher) {
    case TF_LAUNCHER_NONE:
        return "none";
    case TF_LAUNCHER_TORCHRUN:
        return "torchrun";
    case TF_LAUNCHER_OPENMPI:
        return "openmpi";
    case TF_LAUNCHER_SLURM:
        return "slurm";
    }
    return "?";
}

/* ---- Slurm host lists ------------------------------------------------------------------------ */

/* Where expanded names go: appended to out, comma separated, until limit names (0 = all). */
typedef struct {
    const char *nodelist;
    char *out;
    size_t size, used;
    int count, limit;
} host_sink;

enum { NODELIST_RANGE_MAX = 1000000 };

static tf_status sink_add(host_sink *sink, const char *name, size_t length) {
    size_t needed = length + (sink->count ? 1 : 0);
    if (sink->used + needed + 1 > sink->size)
        return tf_fail(TF_ERR_USAGE, "host list '%.200s' expands to more than %zu characters", sink->nodelist,
                       sink->size - 1);
    if (sink->count) sink->out[sink->used++] = ',';
    memcpy(sink->out + sink->used, name, length);
    sink->used += length;
    sink->out[sink->used] = '\0';
    sink->count++;
    return TF_OK;
}

static bool sink_full(const host_sink *sink) {
    return sink->limit > 0 && sink->count >= sink->limit;
}

/* Parses the unsigned number at *text (digits only); its digit count gives the padding width. */
static bool parse_number(const char **text, const char *end, long *value, int *width) {
    const char *start = *text;
    *value = 0;
    while (*text < end && **text >= '0' && **text <= '9') {
        *value = *value * 10 + (**text - '0');
        if (*value > 999999999) return false;
        (*text)++;
    }
    *width = (int)(*text - start);
    return *width > 0;
}

static tf_status expand_name(host_sink *sink, char *prefix, size_t prefix_length, const char *rest,
                             const char *rest_end);

/* Expands one bracket group [items] followed by rest: each number of each item, then the rest. */
static tf_status expand_group(host_sink *sink, char *prefix, size_t prefix_length, const char *group,
                              const char *group_end, const char *rest, const char *rest_end) {
    const char *item = group;
    while (item < group_end && !sink_full(sink)) {
        long low, high;
        int width, high_width;
        const char *cursor = item;
        if (!parse_number(&cursor, group_end, &low, &width))
            return tf_fail(TF_ERR_USAGE, "host list '%.200s': '%.*s' is not a number or range",
                           sink->nodelist, (int)(group_end - item), item);
        high = low;
        if (cursor < group_end && *cursor == '-') {
            cursor++;
            if (!parse_number(&cursor, group_end, &high, &high_width) || high < low ||
                high - low >= NODELIST_RANGE_MAX)
                return tf_fail(TF_ERR_USAGE, "host list '%.200s': bad range in [%.*s]", sink->nodelist,
                               (int)(group_end - group), group);
        }
        if (cursor < group_end && *cursor != ',')
            return tf_fail(TF_ERR_USAGE, "host list '%.200s': unexpected '%c' in [%.*s]", sink->nodelist,
                           *cursor, (int)(group_end - group), group);
        for (long number = low; number <= high && !sink_full(sink); number++) {
            int written =
                snprintf(prefix + prefix_length, TF_DIST_HOST_MAX - prefix_length, "%0*ld", width, number);
            if (written < 0 || prefix_length + (size_t)written >= TF_DIST_HOST_MAX)
                return tf_fail(TF_ERR_USAGE, "host list '%.200s': a host name is too long", sink->nodelist);
            TF_TRY(expand_name(sink, prefix, prefix_length + (size_t)written, rest, rest_end));
        }
        item = cursor + 1;
    }
    return TF_OK;
}

/* Expands the name prefix + rest, where rest may hold bracket groups. */
static tf_status expand_name(host_sink *sink, char *prefix, size_t prefix_length, const char *rest,
                             const char *rest_end) {
    const char *open = memchr(rest, '[', (size_t)(rest_end - rest));
    const char *literal_end = open ? open : rest_end;
    size_t literal = (size_t)(literal_end - rest);
    if (prefix_length + literal >= TF_DIST_HOST_MAX)
        return tf_fail(TF_ERR_USAGE, "host list '%.200s': a host name is too long", sink->nodelist);
    memcpy(prefix + prefix_length, rest, literal);
    prefix_length += literal;
    if (!open) {
        if (prefix_length == 0)
            return tf_fail(TF_ERR_USAGE, "host list '%.200s' has an empty name", sink->nodelist);
        return sink_add(sink, prefix, prefix_length);
    }
    const char *close = memchr(open, ']', (size_t)(rest_end - open));
    if (!close || close == open + 1)
        return tf_fail(TF_ERR_USAGE, "host list '%.200s': '[' without a range and ']'", sink->nodelist);
    return expand_group(sink, prefix, prefix_length, open + 1, close, close + 1, rest_end);
}

/* Splits the list at the commas outside brackets and expands each name. */
static tf_status expand_list(host_sink *sink) {
    const char *name = sink->nodelist;
    if (!*name) return tf_fail(TF_ERR_USAGE, "the host list is empty");
    while (*name && !sink_full(sink)) {
        const char *end = name;
        int depth = 0;
        for (; *end && (depth > 0 || *end != ','); end++) {
            if (*end == '[') depth++;
            if (*end == ']') depth--;
            if (depth < 0 || depth > 1)
                return tf_fail(TF_ERR_USAGE, "host list '%.200s': unbalanced brackets", sink->nodelist);
        }
        char prefix[TF_DIST_HOST_MAX];
        TF_TRY(expand_name(sink, prefix, 0, name, end));
        name = *end ? end + 1 : end;
    }
    return TF_OK;
}

tf_status dist_nodelist_expand(const char *nodelist, char *hosts, size_t size) {
    host_sink sink = {.nodelist = nodelist, .out = hosts, .size = size};
    if (size) hosts[0] = '\0';
    return expand_list(&sink);
}

tf_status dist_nodelist_first(const char *nodelist, char *host, size_t size) {
    host_sink sink = {.nodelist = nodelist, .out = host, .size = size, .limit = 1};
    if (size) host[0] = '\0';
    return expand_list(&sink);
}

/* ---- fingerprint ----------------------------------------------------------------------------- */

uint64_t dist_hash(const void *data, size_t size, uint64_t hash) {
    const unsigned char *bytes = data;
    for (size_t i = 0; i < size; i++) {
        hash ^= bytes[i];
        hash *= 0x100000001b3ull;
    }
    return hash;
}

tf_status dist_config_fingerprint(const tf_config *config, const char *extra, uint64_t *fingerprint) {
    char *text = NULL;
    size_t length = 0;
    FILE *stream = open_memstream(&text, &length);
    if (!stream)
        return tf_fail(TF_ERR_RUNTIME, "open_memstream for the run fingerprint: %s", strerror(errno));
    config_print(config, stream);
    fclose(stream);
    uint64_t hash = dist_hash(text, length, TF_DIST_HASH_START);
    free(text);
    *fingerprint = dist_hash(extra ? extra : "", extra ? strlen(extra) : 0, hash);
    return TF_OK;
}
