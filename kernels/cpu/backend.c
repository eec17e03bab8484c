/* The CPU backend's table of operations, one per build: cpu_f32_backend (training and inference
 * on the CPU) and cpu_f64_backend (the tests' finite-difference checks). Master and compute
 * buffers are both `real` here. kernels/backend.c hands them out through tf_cpu_backend(). */
#include "kernels/cpu/cpu_real.h"

const tf_backend CPU_FN(backend) = {
#if TF_CPU_REAL_BITS == 64
    .name = "cpu-fp64",
#else
    .name = "cpu-fp32",
#endif
    .master_dtype = CPU_DTYPE,
    .compute_dtype = CPU_DTYPE,

    .alloc = CPU_FN(alloc),
    .free = CPU_FN(free),
    .zero = CPU_FN(zero),
    .copy = CPU_FN(copy),
    .upload = CPU_FN(upload),
    .download = CPU_FN(download),
    .host_alloc = CPU_FN(host_alloc),
    .host_free = CPU_FN(host_free),
    .upload_bytes = CPU_FN(upload_bytes),
    .convert = CPU_FN(convert),
    .synchronize = CPU_FN(synchronize),
    .device_memory_in_use = CPU_FN(device_memory_in_use),
    .profile_mark = CPU_FN(profile_mark),
    .profile_elapsed_ms = CPU_FN(profile_elapsed_ms),

    .images_normalize = CPU_FN(images_normalize),
    .mixup_images = CPU_FN(mixup_images),
    .cutmix_images = CPU_FN(cutmix_images),

    .matmul = CPU_FN(matmul),

    .pattention_norm_forward = CPU_FN(pattention_norm_forward),
    .pattention_norm_backward = CPU_FN(pattention_norm_backward),
    .pattention_norm_pool = CPU_FN(pattention_norm_pool),
    .pattention_norm_recheck = CPU_FN(pattention_norm_recheck),
    .keys_exceed = CPU_FN(keys_exceed),

    .attention_forward = CPU_FN(attention_forward),
    .attention_backward = CPU_FN(attention_backward),

    .layernorm_forward = CPU_FN(layernorm_forward),
    .residual_layernorm_forward = CPU_FN(residual_layernorm_forward),
    .layernorm_backward = CPU_FN(layernorm_backward),
    .center_rows = CPU_FN(center_rows),
    .layernorm_variance = CPU_FN(layernorm_variance),

    .residual_forward = CPU_FN(residual_forward),
    .residual_backward = CPU_FN(residual_backward),

    .patch_im2col = CPU_FN(patch_im2col),
    .tokens_forward = CPU_FN(tokens_forward),
    .tokens_backward = CPU_FN(tokens_backward),

    .token_pool_forward = CPU_FN(token_pool_forward),
    .token_pool_backward = CPU_FN(token_pool_backward),
    .bias_backward = CPU_FN(bias_backward),

    .cross_entropy_forward_backward = CPU_FN(cross_entropy_forward_backward),

    .adamw_update = CPU_FN(adamw_update),
    .ema_update = CPU_FN(ema_update),
    .sum_squares = CPU_FN(sum_squares),
};
