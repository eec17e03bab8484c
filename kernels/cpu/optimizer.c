/* The optimizer's operations on the flat parameter buffer: AdamW, the EMA of the weights and the
 * sum of squares (gradient-norm clipping). On the CPU the compute copy of the parameters is the
 * master buffer itself, so AdamW writes a separate compute copy only when one is given. */
#include "kernels/cpu/cpu_real.h"

/* One AdamW step, in torch.optim.AdamW's order of operations (its single-tensor path):
 *   param.mul_(1 - lr * weight_decay)
 *   exp_avg.lerp_(grad, 1 - beta1)                         m += (1 - beta1) (g - m)
 *   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)  v = beta2 v + (1 - beta2) g g
 *   denom = exp_avg_sq.sqrt() / sqrt(1 - beta2^step) + eps
 *   param.addcdiv_(exp_avg, denom, -lr / (1 - beta1^step))
 * with lr = hyper lr * group lr_scale and g = grad * grad_scale. As in PyTorch the scalars are
 * computed in double and then used at the tensor's precision. */
void CPU_FN(adamw_update)(void *master_buffer, void *compute_buffer, const void *grad_buffer, void *m_buffer,
                          void *v_buffer, const tf_adamw_group *groups, int group_count,
                          const tf_adamw_hyper *hyper) {
    real *master = master_buffer, *compute = compute_buffer, *m = m_buffer, *v = v_buffer;
    const real *grad = grad_buffer;
    if (compute == master) compute = NULL;
    const double bias_correction1 = 1.0 - pow((double)hyper->beta1, hyper->step);
    const double bias_correction2_sqrt = sqrt(1.0 - pow((double)hyper->beta2, hyper->step));
    const real grad_scale = hyper->grad_scale, beta2 = hyper->beta2, eps = hyper->eps;
    const real one_minus_beta1 = (real)(1.0 - (double)hyper->beta1);
    const real one_minus_beta2 = (real)(1.0 - (double)hyper->beta2);
#pragma omp parallel
    for (int group = 0; group < group_count; group++) {
        const double lr = (double)hyper->lr * (double)groups[group].lr_scale;
        const real decay_factor = (real)(1.0 - lr * (double)groups[group].weight_decay);
        const real step_size = (real)(lr / bias_correction1);
        const real correction2_sqrt = (real)bias_correction2_sqrt;
        const size_t begin = groups[group].offset, end = groups[group].offset + groups[group].count;
#pragma omp for simd schedule(static)
        for (size_t i = begin; i < end; i++) {
            real g = grad[i] * grad_scale;
            real p = master[i] * decay_factor;
            real m_i = m[i] + one_minus_beta1 * (g - m[i]);
            real v_i = v[i] * beta2 + one_minus_beta2 * g * g;
            real denominator = real_sqrt(v_i) / correction2_sqrt + eps;
            p -= step_size * (m_i / denominator);
            m[i] = m_i;
            v[i] = v_i;
            master[i] = p;
            if (compute) compute[i] = p;
        }
    }
}

/* ema = decay ema + (1 - decay) master (timm's ModelEmaV2). */
void CPU_FN(ema_update)(void *ema_buffer, const void *master_buffer, size_t n, float decay) {
    real *ema = ema_buffer;
    const real *master = master_buffer;
    const real keep = decay, mix = (real)(1.0 - (double)decay);
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++)
        ema[i] = keep * ema[i] + mix * master[i];
}

double CPU_FN(sum_squares)(const void *x_buffer, size_t n) {
    const real *x = x_buffer;
    double sum = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : sum)
    for (size_t i = 0; i < n; i++)
        sum += (double)x[i] * (double)x[i];
    return sum;
}
