/* The CPU kernels are written once over `real` and compiled twice (CMakeLists.txt): with
 * TF_CPU_REAL_BITS=32 for training and inference on the CPU, and with 64 for the
 * finite-difference checks of the tests. CPU_FN(name) gives each build its own symbol names
 * (cpu_f32_name, cpu_f64_name); backend.c collects them into the two tf_backend tables. */
#ifndef TF_KERNELS_CPU_REAL_H
#define TF_KERNELS_CPU_REAL_H

#include "kernels/kernels.h"

#include <cblas.h>
#include <math.h>

#if TF_CPU_REAL_BITS == 64
typedef double real;
#define CPU_FN(name)   cpu_f64_##name
#define CPU_DTYPE      TF_DTYPE_F64
#define cblas_gemm     cblas_dgemm
#define real_sqrt      sqrt
#define real_exp       exp
#define real_log       log
#define real_erf       erf
#elif TF_CPU_REAL_BITS == 32
typedef float real;
#define CPU_FN(name)   cpu_f32_##name
#define CPU_DTYPE      TF_DTYPE_F32
#define cblas_gemm     cblas_sgemm
#define real_sqrt      sqrtf
#define real_exp       expf
#define real_log       logf
#define real_erf       erff
#else
#error "TF_CPU_REAL_BITS must be 32 or 64"
#endif

#endif
