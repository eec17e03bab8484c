"""PyTorch's SDPA forward on B/16 inference shapes (batch 512, 12 heads, 197 tokens, head_dim 64,
q, k and v strided views of one [B, S, 3, H, D] tensor as ours are), per backend, with and without
autograd: the reference for our cuDNN attention forward (docs/performance.md). Run with the
device's PyTorch: python3 scripts/experiments/sdpa_probe.py"""
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F
print(torch.__version__, torch.backends.cudnn.version())
B, H, S, D = 512, 12, 197, 64
def make(req):
    x = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = [x[:, :, i].transpose(1, 2) for i in range(3)]  # BHSD views of BSHD memory
    if req:
        q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    return q, k, v
def bench(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n
flops = 4 * B * H * S * S * D
for backend in [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]:
    for req in [False, True]:
        q, k, v = make(req)
        try:
            with sdpa_kernel(backend):
                if req:
                    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
                else:
                    with torch.no_grad():
                        ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            print(f"{backend.name:22s} grad={req}: forward {ms:.3f} ms ({flops/ms/1e9:.0f} TFLOP/s)")
        except Exception as ex:
            print(backend.name, req, "failed", str(ex)[:200])
