/* The one timer: monotonic wall-clock seconds. */
#ifndef TF_COMMON_TIMER_H
#define TF_COMMON_TIMER_H

/* Seconds on a monotonic clock; only differences are meaningful. */
double tf_seconds(void);

/* Seconds since the first call of any timer function in this process. */
double tf_seconds_since_start(void);

#endif
