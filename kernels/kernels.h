/* The operations of the model, declared once, implemented by each backend.
 *
 * The model (vision/) calls operations only through a tf_backend: a table of functions that a
 * backend fills. kernels/cpu/ implements it with plain C and CBLAS (compiled twice: fp32 for
 * training on the CPU, fp64 for the finite-difference checks of the tests); kernels/cuda/
 * implements it with CUDA kernels, cuBLASLt and cuDNN. Each backend has one file per operation,
 * with the same names in both folders.
 *
 * Buffers live in the backend's memory and come in two kinds:
 *   master  - the optimizer's copy of the parameters, parameter gradients, AdamW moments, the
 *             EMA, per-row statistics (LayerNorm mean and 1/std, Pattention row norms, attention
 *             log-sum-exp), losses, soft targets and per-sample drop-path scales.
 *   compute - the parameter copy that the forward and backward passes read, and all activations.
 * On the CPU both are fp32 (or both fp64); on CUDA master is fp32 and compute is bf16. Arguments
 * below say which kind each buffer is; all sizes are element counts; matrices are row-major.
 *
 * Operations return nothing: a backend that fails (a CUDA error, say) records the first failure
 * and synchronize() returns it, with the failing call in the message. The model calls
 * synchronize() once per step. */
#ifndef TF_KERNELS_KERNELS_H
#define TF_KERNELS_KERNELS_H

#include "common/config.h"
#include "common/error.h"

#include <stdbool.h>
#include <stddef.h>

typedef enum { TF_DTYPE_F32 = 0, TF_DTYPE_F64 = 1, TF_DTYPE_BF16 = 2 } tf_dtype;

enum { TF_PROFILE_MARKS = 8192 };

size_t tf_dtype_size(tf_dtype dtype);
const char *tf_dtype_name(tf_dtype dtype);

/* C = op(A) op(B) (+ bias) (+ C). op(A) is m x k, op(B) is k x n, C is m x n. */
typedef struct {
    int m, n, k;
    bool transpose_a;   /* A is stored k x m (so op(A) = A^T) */
    bool transpose_b;   /* B is stored n x k (so op(B) = B^T) */
    bool accumulate;    /* C += result; otherwise C = result */
    bool master_output; /* C is a master buffer (a parameter gradient, the logits); otherwise compute */
    const void *bias;   /* [n] added to every row, of C's dtype (master with master_output), or NULL */
} tf_matmul_desc;

/* One Pattention's normalised rows, for pattention_norm_recheck. */
enum { TF_NORM_RECHECK_MAX = 3 };
typedef struct {
    void *s;        /* compute [rows, n]: S */
    void *row_norm; /* master [rows]: r */
    const void *a;  /* compute [rows, n]: the scores */
    float tau;
} tf_norm_rows;

/* One question of keys_exceed: parts key buffers (compute [n, dim] each) stacked into Kc
 * [parts * n, dim]; the answers are filled in. At most three parts: Q's, K's and V's keys, the
 * Pattentions that read one stream (as in pattention_norm_recheck). */
typedef struct {
    const void *keys[TF_NORM_RECHECK_MAX];
    int parts, n;
    double mu;
    bool exceeds;     /* |Kc u|^2 >= mu for every unit u orthogonal to 1 (strictly: see keys_exceed) */
    double sums_norm; /* |Kc 1|: the norm of Kc's row sums */
} tf_keys_exceed;

/* One group of parameters in the flat parameter buffer that AdamW updates alike. */
typedef struct {
    size_t offset, count; /* elements */
    float lr_scale;       /* layer-wise lr decay factor (1 when off) */
    float weight_decay;   /* 0 for the no-decay set */
} tf_adamw_group;

/* AdamW hyper-parameters of one step; the update is PyTorch's torch.optim.AdamW:
 *   g = grad * grad_scale
 *   p *= 1 - lr * lr_scale * weight_decay
 *   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
 *   p -= lr * lr_scale / (1 - beta1^step) * m / (sqrt(v / (1 - beta2^step)) + eps) */
typedef struct {
    float lr, beta1, beta2, eps;
    float grad_scale; /* applied to the gradient first (1/accumulation, clipping) */
    int step;         /* 1 for the first update */
} tf_adamw_hyper;

typedef struct tf_backend tf_backend;
struct tf_backend {
    const char *name;
    tf_dtype master_dtype;
    tf_dtype compute_dtype;
    /* A batch of a size not run before costs one-time planning (CUDA: cuBLASLt's algorithm timing
     * and cuDNN's attention plans, ~0.2 s at B/16 on the H100), so callers that may run a
     * smaller batch at a size already run (evaluation's last batch) do; false on the CPU. */
    bool plans_per_shape;

    /* ---- memory (all buffers are allocated once at start; the step allocates nothing) ---- */
    /* Zero-filled buffer of bytes; what names the buffer in the error message. */
    tf_status (*alloc)(void **buffer, size_t bytes, const char *what);
    void (*free)(void *buffer);
    void (*zero)(void *buffer, size_t bytes);
    void (*copy)(void *dst, const void *src, size_t bytes); /* within the backend */
    /* Host fp32 <-> backend buffer of the given dtype, converting; both wait for completion. */
    void (*upload)(void *dst, tf_dtype dst_dtype, const float *src, size_t n);
    void (*download)(float *dst, const void *src, tf_dtype src_dtype, size_t n);
    /* Host memory that the backend copies from fastest (pinned on CUDA): the loader's batch ring. */
    tf_status (*host_alloc)(void **buffer, size_t bytes);
    void (*host_free)(void *buffer);
    /* Host bytes -> backend, as they are: the uint8 pixel batch that images_normalize reads.
     * Asynchronous, so that the next batch's copy runs beside the current batch's work (CUDA: on
     * a copy stream): the copy waits only for the operations queued up to the last
     * images_normalize (which read the previous batch from dst), and operations queued after
     * upload_bytes wait for it. src must stay as it is until the next synchronize() or download;
     * no other operation may read or write dst. */
    void (*upload_bytes)(void *dst, const void *src, size_t bytes);
    /* Within the backend, converting dtype (the compute copy of the master parameters). */
    void (*convert)(void *dst, tf_dtype dst_dtype, const void *src, tf_dtype src_dtype, size_t n);
    /* Waits for queued work; returns the first failure of any operation since the start. */
    tf_status (*synchronize)(void);
    /* Bytes of device memory in use by this process now, everything included (CUDA: the
     * context, libraries' workspaces and our buffers, from cudaMemGetInfo); 0 on the CPU. */
    size_t (*device_memory_in_use)(void);
    /* Profiling: mark `index` (< TF_PROFILE_MARKS) records the time when the work queued so far
     * is done (a CUDA event, which does not stall the queue; a timestamp on the CPU); after
     * synchronize(), the milliseconds between two marks. */
    void (*profile_mark)(int index);
    double (*profile_elapsed_ms)(int from, int to);

    /* ---- input batch ----
     * images (compute [batch, channels, size, size]) = (pixels / 255 - mean[c]) / std[c], from
     * uint8 pixels (backend memory, same layout). */
    void (*images_normalize)(void *images, const void *pixels, int batch, int channels, int size,
                             const float *mean, const float *std);
    /* timm batch-mode mixup, in place: x[b] = lambda x[b] + (1 - lambda) x[batch - 1 - b]. */
    void (*mixup_images)(void *images, int batch, size_t sample_size, float lambda);
    /* timm batch-mode cutmix, in place: rows [y0, y1) and columns [x0, x1) of every channel of
     * x[b] are replaced by those of x[batch - 1 - b] (the originals, not already-pasted ones). */
    void (*cutmix_images)(void *images, int batch, int channels, int size, int y0, int y1, int x0, int x1);

    /* ---- GEMM ---- a, b, bias: compute; c: compute or master (desc->master_output). */
    void (*matmul)(void *c, const void *a, const void *b, const tf_matmul_desc *desc);

    /* ---- Pattention normalisation (DESIGN.md section 2), one row per token ----
     * forward: r = sqrt(sum_j A_j^2 + eps e_row), Z = tau A / r, S = GELU(Z) (exact erf GELU),
     * with e_row = eps_scale[row], or 1 when eps_scale is NULL (the inference form of the blocks
     * passes sigma^2 of the LayerNorm it folded in: vision/block.c, block_infer).
     * s, a: compute [rows, n]; row_norm: master [rows], receives r; eps_scale: master [rows].
     * backward: with dZ = dS GELU'(Z),  dA = tau / r (dZ - A (A . dZ) / r^2); it also writes S
     * again (from A and the kept r, bit for bit what forward wrote), which the value-token
     * gradient needs: reading A once for both is cheaper than a second forward pass.
     * da may be the same buffer as ds; s is another. */
    void (*pattention_norm_forward)(void *s, void *row_norm, const void *a, int rows, int n, float tau,
                                    float eps, const void *eps_scale);
    void (*pattention_norm_backward)(void *da, void *s, const void *ds, const void *a, const void *row_norm,
                                     int rows, int n, float tau);
    /* forward fused with the head's average pool, for a Pattention whose output only reaches the
     * logits through that mean (the last FFN in inference, vision/block.c block_infer_pooled):
     * pooled_s[b] = the mean over tokens 1..tokens-1 (the patch tokens) of forward's S on row
     * b * tokens + t, S unrounded, summed in fp32 or better and rounded once. S itself is never
     * written. a: compute [batch * tokens, n]; pooled_s: compute [batch, n]; row_norm: master
     * [batch * tokens], scratch (what it holds afterwards is unspecified); eps_scale as forward's. */
    void (*pattention_norm_pool)(void *pooled_s, void *row_norm, const void *a, int batch, int tokens, int n,
                                 float tau, float eps, const void *eps_scale);
    /* The rows of count (at most TF_NORM_RECHECK_MAX) Pattentions that read the same stream x,
     * whose forwards ran with eps times eps_ln alone where the LayerNorm folded in asks for eps
     * times var(x) + eps_ln (the inference form's Q, K and V, whose keys bound var(x) by their row
     * norms: vision/variance_proof.c). On each row where some r_p^2 is under share times their sum,
     * the bound does not hold, and the row is done again as forward with eps_scale = var(x) + eps_ln
     * does it: the variance of x's row (as layernorm_variance), then each Pattention's r and S.
     * Other rows are left as they are. x: compute [rows, dim]; norms[p].a, .s: compute [rows, n];
     * norms[p].row_norm: master [rows]. */
    void (*pattention_norm_recheck)(const tf_norm_rows *norms, int count, const void *x, int rows, int n, int dim,
                                    float eps, float eps_ln, float share);

    /* The variance proofs of the inference form (vision/variance_proof.c): for each of count
     * questions, whether P Kc^T Kc P + 2 mu 11^T / d - mu I (P = I - 11^T / d, d = dim) is positive
     * definite, decided by a Cholesky factorisation in double of the Gram matrix of the keys as
     * stored (the numbers the GEMMs multiply): it is exactly when Kc^T Kc exceeds mu on every
     * direction orthogonal to 1. Also |Kc 1|, summed in double. Waits for the answers; a failure
     * (recorded, as any operation's) leaves exceeds false. */
    void (*keys_exceed)(tf_keys_exceed *questions, int count, int dim);

    /* ---- multi-head softmax attention, not causal, scale 1/sqrt(head_dim) ----
     * q, k, v, out: compute [batch * tokens, heads * head_dim]; head h is columns
     * [h * head_dim, (h + 1) * head_dim). lse: master [batch, heads, tokens], the log-sum-exp of
     * each row of scaled scores, kept for backward. dq, dk, dv are overwritten. */
    void (*attention_forward)(void *out, void *lse, const void *q, const void *k, const void *v, int batch,
                              int tokens, int heads, int head_dim);
    void (*attention_backward)(void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                               const void *v, const void *out, const void *lse, int batch, int tokens,
                               int heads, int head_dim);

    /* ---- LayerNorm over the last dimension, biased variance ----
     * The residual stream (the tokens between blocks) is a master buffer: in bf16 its rounding at
     * each of the 2 x depth adds accumulates, and put B/16's attention gradients 1.5x further from
     * float64 than PyTorch's autocast, which keeps it in fp32. Everything read by a GEMM is compute.
     * out = xhat (* weight + bias) with xhat = (x - mean) * rstd. x: master [rows, dim];
     * out: compute; weight, bias: compute [dim] or both NULL (non-parametric); rstd: master
     * [rows]; xhat: compute [rows, dim] or NULL, receives xhat, which backward reads: a parametric
     * LayerNorm (fc_norm) in training asks for it; a non-parametric one's out is xhat already. */
    void (*layernorm_forward)(void *out, void *xhat, void *rstd, const void *x, const void *weight,
                              const void *bias, int rows, int dim, float eps);
    /* Residual add fused with the next (non-parametric) LayerNorm:
     * residual_out = residual_in + scale[row / rows_per_sample] * branch;
     * ln_out = LayerNorm(residual_out). residual_in, residual_out: master (residual_out may be
     * residual_in: the stream updated in place); branch, ln_out: compute; sample_scale: master
     * [rows / rows_per_sample] (drop path: 0 or 1/keep_prob per sample) or NULL for 1. */
    void (*residual_layernorm_forward)(void *residual_out, void *ln_out, void *rstd, const void *residual_in,
                                       const void *branch, const void *sample_scale, int rows, int dim,
                                       int rows_per_sample, float eps);
    /* dx += d LayerNorm / dx (dout), from xhat (compute: the output of a non-parametric forward,
     * which its caller keeps anyway, or forward's xhat output for a parametric one; the residual
     * stream itself is not kept for backward) and rstd. dx, dout: compute; dweight, dbias
     * (master, accumulated) may be NULL when weight is. */
    void (*layernorm_backward)(void *dx, void *dweight, void *dbias, const void *dout, const void *xhat,
                               const void *rstd, const void *weight, int rows, int dim);
    /* out[i] = x[i] minus the mean of its row, for count matrices x[i] master [rows[i], dim] and
     * out[i] compute (host arrays of device pointers). The inference form of the blocks
     * (vision/block.c, block_infer) folds a non-parametric LayerNorm's centring into the key
     * tokens of the Pattentions that read it this way, all of a model's in one call (a GPU does
     * them in one launch: they are a few MB each). Means summed in fp32 or better. */
    void (*center_rows)(void *const *out, const void *const *x, const int *rows, int count, int dim);
    /* variance[row] = the biased variance of row x[row] plus eps: sigma^2 of LayerNorm(x, eps),
     * which the inference form hands the Pattention norm as its eps_scale. x: compute [rows, dim];
     * variance: master [rows]. Two reductions (mean, then squares about it), no cancellation. */
    void (*layernorm_variance)(void *variance, const void *x, int rows, int dim, float eps);

    /* ---- residual connection with drop path ----
     * forward: out = residual_in + scale[row / rows_per_sample] * branch (scale NULL: 1);
     * out, residual_in: master (out may be residual_in); branch: compute.
     * backward: dbranch = scale[row / rows_per_sample] * dout, both compute (the residual's own
     * gradient passes through unchanged, so it needs no operation). */
    void (*residual_forward)(void *out, const void *residual_in, const void *branch, const void *sample_scale,
                             int rows, int dim, int rows_per_sample);
    void (*residual_backward)(void *dbranch, const void *dout, const void *sample_scale, int rows, int dim,
                              int rows_per_sample);

    /* ---- patch embedding and token assembly ----
     * im2col: images compute [batch, channels, size, size] -> patches compute
     * [batch * (size/patch)^2, channels * patch * patch], patches in row-major order, each row in
     * (channel, y, x) order so that it matches a conv weight [dim, channels, patch, patch]. */
    void (*patch_im2col)(void *patches, const void *images, int batch, int channels, int size, int patch);
    /* x[b, 0] = cls + pos[0]; x[b, 1 + i] = patch_tokens[b, i] + pos[1 + i], summed in fp32 or
     * better and rounded once to x_dtype. x: [batch, 1 + patches, dim], the residual stream, in
     * the master dtype (training's form) or the compute dtype (inference's; the CPU backend's
     * two are one); patch_tokens, cls [dim], pos [1 + patches, dim]: compute. */
    void (*tokens_forward)(void *x, tf_dtype x_dtype, const void *patch_tokens, const void *cls, const void *pos,
                           int batch, int patches, int dim);
    /* dpatch_tokens (compute) = dx of the patch positions; dcls, dpos: master, accumulated. */
    void (*tokens_backward)(void *dpatch_tokens, void *dcls, void *dpos, const void *dx, int batch,
                            int patches, int dim);

    /* ---- head ----
     * pool: out[b] = mean over tokens 1..tokens-1 of x[b] (TF_POOL_AVG) or x[b, 0] (TF_POOL_CLS).
     * forward: x [batch, tokens, dim], the residual stream, master or compute as x_dtype says (as
     * tokens_forward's); out [batch, dim]: master (the head LayerNorm's input), summed in fp32 or better.
     * backward: dx [batch, tokens, dim], dout: compute; it overwrites all of dx. */
    void (*token_pool_forward)(void *out, const void *x, tf_dtype x_dtype, int batch, int tokens, int dim,
                               tf_pool pool);
    void (*token_pool_backward)(void *dx, const void *dout, int batch, int tokens, int dim, tf_pool pool);
    /* dbias (master, accumulated) += column sums of dout (compute [rows, dim]). */
    void (*bias_backward)(void *dbias, const void *dout, int rows, int dim);

    /* ---- loss ----
     * Soft-target cross-entropy: loss[b] = -sum_c target[b,c] log softmax(logits[b])_c, in fp32 or
     * better. dlogits[b] = dloss_scale (softmax(logits[b]) - target[b]); dlogits may be NULL
     * (evaluation). The logits are a master buffer: in bf16 their rounding (0.4% of each logit)
     * moved the softmax, and with it every gradient of the model, by about 1%.
     * logits: master [batch, classes]; dlogits: compute [batch, classes]; target: master
     * [batch, classes]; loss: master [batch]. */
    void (*cross_entropy_forward_backward)(void *loss, void *dlogits, const void *logits, const void *target,
                                           int batch, int classes, float dloss_scale);

    /* ---- optimizer ----
     * AdamW over the groups of the flat parameter buffer (see tf_adamw_hyper); master, grad, m, v:
     * master; compute: the compute copy, rewritten from master for the updated elements (NULL when
     * the compute copy is the master buffer itself, as on the CPU). */
    void (*adamw_update)(void *master, void *compute, const void *grad, void *m, void *v,
                         const tf_adamw_group *groups, int group_count, const tf_adamw_hyper *hyper);
    /* ema = decay ema + (1 - decay) master; both master [n]. */
    void (*ema_update)(void *ema, const void *master, size_t n, float decay);
    /* Sum of squares of a master buffer, accumulated in double; waits for the result. */
    double (*sum_squares)(const void *x, size_t n);
};

/* The CPU backend in fp32 (training) or fp64 (finite-difference checks). threads: 0 = all cores. */
const tf_backend *tf_cpu_backend(tf_dtype dtype);
void tf_cpu_backend_set_threads(int threads);

#ifdef TOKENFORMER_CUDA
/* The CUDA backend on the current device: bf16 compute, fp32 master. Fails with the CUDA error
 * when no GPU is usable. */
tf_status tf_cuda_backend(const tf_backend **backend);
#endif

/* Picks the backend for a device setting: auto = CUDA when a GPU is present, else the CPU. */
tf_status tf_backend_open(tf_device device, int threads, const tf_backend **backend);

#endif
