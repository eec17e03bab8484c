/* Soft-target cross-entropy and its gradient, one row per sample, in double whatever `real` is:
 *   lse = max_c l_c + log sum_c exp(l_c - max_c l_c)
 *   loss = -sum_c t_c log softmax(l)_c = sum_c t_c (lse - l_c)
 *   dlogits_c = dloss_scale (softmax(l)_c - t_c)
 * (the gradient of dloss_scale * loss when the targets of a row sum to 1, as smoothed and mixed
 * one-hot targets do). Each logit is read before its gradient is written, so dlogits may be the
 * logits buffer; it may also be NULL (evaluation). */
#include "kernels/cpu/cpu_real.h"

void CPU_FN(cross_entropy_forward_backward)(void *loss_buffer, void *dlogits_buffer,
                                            const void *logits_buffer, const void *target_buffer, int batch,
                                            int classes, float dloss_scale) {
    real *loss = loss_buffer, *dlogits = dlogits_buffer;
    const real *logits = logits_buffer, *target = target_buffer;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < batch; b++) {
        const real *logit_row = logits + (size_t)b * classes, *target_row = target + (size_t)b * classes;
        double max = logit_row[0];
        for (int c = 1; c < classes; c++)
            max = logit_row[c] > max ? logit_row[c] : max;
        double sum = 0.0;
        for (int c = 0; c < classes; c++)
            sum += exp((double)logit_row[c] - max);
        double lse = max + log(sum);
        double row_loss = 0.0;
        for (int c = 0; c < classes; c++)
            row_loss += (double)target_row[c] * (lse - (double)logit_row[c]);
        loss[b] = (real)row_loss;
        if (!dlogits) continue;
        real *dlogit_row = dlogits + (size_t)b * classes;
        for (int c = 0; c < classes; c++) {
            double probability = exp((double)logit_row[c] - lse);
            dlogit_row[c] = (real)((double)dloss_scale * (probability - (double)target_row[c]));
        }
    }
}
