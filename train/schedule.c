/* Warmup + cosine learning rate (see schedule.h). */
#include "train/schedule.h"

#include <math.h>

double schedule_learning_rate(const tf_config *config, int64_t step, int64_t steps_per_epoch) {
    double peak = config->optimizer.lr, floor = config->optimizer.min_lr;
    double warmup = config->schedule.warmup_epochs, epochs = config->schedule.epochs;
    double epoch = (double)step / (double)steps_per_epoch;
    if (epoch < warmup) return peak * epoch / warmup;
    if (epochs <= warmup) return peak;
    double progress = fmin((epoch - warmup) / (epochs - warmup), 1.0);
    return floor + (peak - floor) * 0.5 * (1.0 + cos(M_PI * progress));
}
