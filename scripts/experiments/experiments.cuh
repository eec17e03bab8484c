/* What the experiments share: CK() stops at the first failing CUDA, cuBLASLt or driver call
 * (any of them returns 0 on success), naming the code, file and line; time_ms() times a body
 * of launches with CUDA events on the default stream. */
#ifndef TF_SCRIPTS_EXPERIMENTS_CUH
#define TF_SCRIPTS_EXPERIMENTS_CUH

#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                                                      \
    do {                                                                                                           \
        int e_ = (int)(x);                                                                                         \
        if (e_ != 0) {                                                                                             \
            printf("error %d at %s:%d\n", e_, __FILE__, __LINE__);                                                 \
            exit(1);                                                                                               \
        }                                                                                                          \
    } while (0)

/* Milliseconds per call of `body`, averaged over `reps` calls after `warmup` untimed ones. */
template <typename F> static float time_ms(F body, int reps = 10, int warmup = 2) {
    static cudaEvent_t start, stop;
    if (!start) {
        CK(cudaEventCreate(&start));
        CK(cudaEventCreate(&stop));
    }
    for (int r = 0; r < warmup; r++) body();
    CK(cudaEventRecord(start));
    for (int r = 0; r < reps; r++) body();
    CK(cudaEventRecord(stop));
    CK(cudaEventSynchronize(stop));
    float ms;
    CK(cudaEventElapsedTime(&ms, start, stop));
    return ms / reps;
}

#endif
