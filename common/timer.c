/* Monotonic clock (see timer.h). */
#include "common/timer.h"

#include <time.h>

double tf_seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

double tf_seconds_since_start(void) {
    static double start = -1.0;
    double now = tf_seconds();
    if (start < 0.0) start = now; /* first call in main, before threads start */
    return now - start;
}
