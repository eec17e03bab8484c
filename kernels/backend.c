/* Backend selection and dtype facts shared by every backend. */
#include "kernels/kernels.h"

#include "common/log.h"

#include <cblas.h>
#include <omp.h>

size_t tf_dtype_size(tf_dtype dtype) {
    switch (dtype) {
    case TF_DTYPE_F32: return 4;
    case TF_DTYPE_F64: return 8;
    case TF_DTYPE_BF16: return 2;
    }
    return 0;
}

const char *tf_dtype_name(tf_dtype dtype) {
    switch (dtype) {
    case TF_DTYPE_F32: return "F32";
    case TF_DTYPE_F64: return "F64";
    case TF_DTYPE_BF16: return "BF16";
    }
    return "?";
}

tf_status tf_backend_open(tf_device device, int threads, const tf_backend **backend) {
#ifdef TOKENFORMER_CUDA
    if (device != TF_DEVICE_CPU) {
        tf_status status = tf_cuda_backend(backend);
        if (status == TF_OK || device == TF_DEVICE_CUDA) return status;
        tf_log("no usable GPU (%s); using the CPU backend", tf_error_message());
    }
#else
    if (device == TF_DEVICE_CUDA)
        return tf_fail(TF_ERR_USAGE, "this binary was built without CUDA (-DTOKENFORMER_CUDA=OFF); "
                                     "use --device cpu or rebuild with CUDA");
#endif
    tf_cpu_backend_set_threads(threads);
    *backend = tf_cpu_backend(TF_DTYPE_F32);
    return TF_OK;
}

/* The two CPU tables, defined by kernels/cpu/backend.c in its fp32 and fp64 builds. */
extern const tf_backend cpu_f32_backend;
extern const tf_backend cpu_f64_backend;

const tf_backend *tf_cpu_backend(tf_dtype dtype) {
    return dtype == TF_DTYPE_F64 ? &cpu_f64_backend : &cpu_f32_backend;
}

void tf_cpu_backend_set_threads(int threads) {
    /* OpenBLAS runs the GEMMs on its own threads, the other kernels use OpenMP; neither nests
     * inside the other, so both get the same count. */
    if (threads <= 0) threads = omp_get_num_procs();
    openblas_set_num_threads(threads);
    omp_set_num_threads(threads);
}
