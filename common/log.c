/* Timestamped log lines on stderr (see log.h). One fprintf per line, so lines from several
 * threads do not interleave. */
#include "common/log.h"

#include "common/timer.h"

#include <stdarg.h>
#include <stdio.h>

static int log_rank = -1;

void tf_log_set_rank(int rank) {
    log_rank = rank;
}

void tf_log(const char *fmt, ...) {
    char message[2048];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    double elapsed = tf_seconds_since_start();
    if (log_rank >= 0)
        fprintf(stderr, "[%8.1fs rank %d] %s\n", elapsed, log_rank, message);
    else
        fprintf(stderr, "[%8.1fs] %s\n", elapsed, message);
}
