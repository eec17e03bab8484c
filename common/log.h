/* The one logging function: a line to stderr, prefixed with the time since start and, in
 * multi-process runs, the rank. Progress lines of long work go through progress.h instead. */
#ifndef TF_COMMON_LOG_H
#define TF_COMMON_LOG_H

void tf_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Set once by the launcher code of multi-process runs; -1 (default) prints no rank. */
void tf_log_set_rank(int rank);

#endif
