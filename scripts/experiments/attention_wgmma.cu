/* The wgmma attention forward (kernels/cuda/attention_wgmma.cuh) on its own: checked against a
 * plain fp32 attention on the same bf16 inputs at sequences
 * of 193, 197 and 200 tokens, then timed at the model's shapes (CUDA events, 20 runs after 3,
 * five times: median, min and max).
 *
 * nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I. attention_wgmma.cu -o attention_wgmma
 * ./attention_wgmma            # checks, then B/16 (512 and 256 x 12 heads) and L/16 (128 x 16) timings */
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "experiments.cuh"
#include "kernels/cuda/attention_wgmma.cuh"

using namespace wgmma_attention;

static tensor_map_encoder encode;

static CUtensorMap head_map(const bf16 *x, int rows, int width, int box_rows) {
    CUtensorMap map;
    CK(!encode_bf16_boxes(&map, encode, x, rows, width, box_rows));
    return map;
}

/* One thread per (image, head, query row), fp32 throughout. */
__global__ void reference_kernel(float *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                                 int batch, int tokens, int heads, float scale) {
    size_t index = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (index >= (size_t)batch * heads * tokens) return;
    int row = index % tokens, head = (index / tokens) % heads, image = index / ((size_t)tokens * heads);
    int width = heads * HEAD_DIM;
    const bf16 *qr = q + ((size_t)image * tokens + row) * width + head * HEAD_DIM;
    float m = -INFINITY;
    for (int j = 0; j < tokens; j++) {
        const bf16 *kr = k + ((size_t)image * tokens + j) * width + head * HEAD_DIM;
        float s = 0;
        for (int d = 0; d < HEAD_DIM; d++)
            s += __bfloat162float(qr[d]) * __bfloat162float(kr[d]);
        m = fmaxf(m, s * scale);
    }
    float acc[HEAD_DIM] = {0}, l = 0;
    for (int j = 0; j < tokens; j++) {
        const bf16 *kr = k + ((size_t)image * tokens + j) * width + head * HEAD_DIM;
        const bf16 *vr = v + ((size_t)image * tokens + j) * width + head * HEAD_DIM;
        float s = 0;
        for (int d = 0; d < HEAD_DIM; d++)
            s += __bfloat162float(qr[d]) * __bfloat162float(kr[d]);
        float p = expf(s * scale - m);
        l += p;
        for (int d = 0; d < HEAD_DIM; d++)
            acc[d] += p * __bfloat162float(vr[d]);
    }
    float *o = out + ((size_t)image * tokens + row) * width + head * HEAD_DIM;
    for (int d = 0; d < HEAD_DIM; d++)
        o[d] = acc[d] / l;
    lse[((size_t)image * heads + head) * tokens + row] = m + logf(l);
}

struct problem {
    int batch, tokens, heads;
    size_t n;
    bf16 *q, *k, *v, *out;
    float *lse;
    CUtensorMap qm, km, vm, om, otail;
    int grid;
    problem(int batch, int tokens, int heads) : batch(batch), tokens(tokens), heads(heads) {
        n = (size_t)batch * tokens * heads * HEAD_DIM;
        CK(cudaMalloc(&q, n * 2));
        CK(cudaMalloc(&k, n * 2));
        CK(cudaMalloc(&v, n * 2));
        CK(cudaMalloc(&out, n * 2));
        CK(cudaMalloc(&lse, (size_t)batch * heads * tokens * 4));
        fill<<<1024, 256>>>(q, n, 1, 4.0f);
        fill<<<1024, 256>>>(k, n, 2, 4.0f);
        fill<<<1024, 256>>>(v, n, 3, 2.0f);
        int rows = batch * tokens, width = heads * HEAD_DIM;
        qm = head_map(q, rows, width, tokens);
        km = head_map(k, rows, width, tokens);
        vm = head_map(v, rows, width, tokens);
        om = head_map(out, rows, width, 64);
        otail = head_map(out, rows, width, tokens - 192);
        int sms;
        CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
        grid = batch * heads < sms ? batch * heads : sms;
    }
    ~problem() {
        cudaFree(q);
        cudaFree(k);
        cudaFree(v);
        cudaFree(out);
        cudaFree(lse);
    }
    void run() {
        unit_args a = {lse, tokens, heads, 0.125f * 1.4426950408889634f};
        attention_forward_kernel<<<grid, THREADS, SMEM_BYTES>>>(qm, km, vm, om, otail, a, batch * heads);
    }
    /* worst |out - ref| / max |ref| and worst |lse - ref| */
    void check() {
        float *ref, *ref_lse;
        size_t rows = (size_t)batch * heads * tokens;
        CK(cudaMalloc(&ref, n * 4));
        CK(cudaMalloc(&ref_lse, rows * 4));
        CK(cudaMemset(out, 0xff, n * 2));
        run();
        CK(cudaGetLastError());
        reference_kernel<<<(rows + 127) / 128, 128>>>(ref, ref_lse, q, k, v, batch, tokens, heads, 0.125f);
        CK(cudaDeviceSynchronize());
        std::vector<bf16> h(n);
        std::vector<float> r(n), hl(rows), rl(rows);
        CK(cudaMemcpy(h.data(), out, n * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(r.data(), ref, n * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hl.data(), lse, rows * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(rl.data(), ref_lse, rows * 4, cudaMemcpyDeviceToHost));
        double worst = 0, largest = 0, worst_lse = 0;
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) {
            double x = __bfloat162float(h[i]);
            if (!std::isfinite(x)) bad++;
            worst = fmax(worst, fabs(x - r[i]));
            largest = fmax(largest, fabs(r[i]));
        }
        for (size_t i = 0; i < rows; i++)
            worst_lse = fmax(worst_lse, fabs(hl[i] - rl[i]));
        printf("check batch %d tokens %d heads %d: out worst %.3e of max %.3f (relative %.3e), "
               "lse worst %.3e, %zu not finite: %s\n",
               batch, tokens, heads, worst, largest, worst / largest, worst_lse, bad,
               worst / largest < 1e-2 && worst_lse < 1e-2 && !bad ? "PASS" : "FAIL");
        cudaFree(ref);
        cudaFree(ref_lse);
    }
};

int main() {
    setvbuf(stdout, NULL, _IOLBF, 0);
    encode = find_tensor_map_encoder();
    CK(!encode);
    CK(cudaFuncSetAttribute(attention_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            SMEM_BYTES));
    for (int tokens : {193, 197, 200}) {
        problem p(3, tokens, 2);
        p.check();
    }
    const int shapes[][3] = {{512, 197, 12}, {256, 197, 12}, {128, 197, 16}};
    for (auto &s : shapes) {
        problem p(s[0], s[1], s[2]);
        p.check();
        std::vector<float> times;
        for (int r = 0; r < 5; r++)
            times.push_back(time_ms([&] { p.run(); }, 20, 3));
        std::sort(times.begin(), times.end());
        double bytes = 4.0 * p.n * 2;
        printf("time batch %d tokens %d heads %d: %.4f ms (min %.4f, max %.4f), %.0f GB/s of q, k, v, out\n",
               s[0], s[1], s[2], times[2], times[0], times[4], bytes / times[2] / 1e6);
    }
    return 0;
}
