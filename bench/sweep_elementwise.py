"""Tile sweep for the memory-bound SiLU*mul kernel at prefill size (T=8192, I=14336), and the
rotary kernel's time; graph-timed. ``python bench/sweep_elementwise.py``"""

import torch
from triton.testing import do_bench_cudagraph

from genserve_cuda.kernels.activation import silu_and_mul
from genserve_cuda.kernels.rotary import rotary_embedding

T, I = 8192, 14336
gu = torch.randn(T, 2 * I, dtype=torch.bfloat16, device="cuda")
moved = 3 * T * I * 2  # bytes: read gate and up, write out
for block in (1024, 2048, 4096):
    for warps in (4, 8, 16):
        ms = do_bench_cudagraph(lambda: silu_and_mul(gu, block, warps))
        print(f"silu_mul block {block:5d} warps {warps:2d}: {ms * 1e3:8.1f} us  {moved / ms / 1e9:6.2f} TB/s")
qkv = torch.randn(T, 48 * 128, dtype=torch.bfloat16, device="cuda")
q, k, _ = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
q, k = q.view(T, 32, 128), k.view(T, 8, 128)
cos = torch.randn(8192, 64, device="cuda")
pos = torch.arange(T, device="cuda")
ms = do_bench_cudagraph(lambda: rotary_embedding(pos, q, k, cos, cos, 128))
print(f"rotary T={T} 32q+8k: {ms * 1e3:.1f} us  {2 * T * 40 * 128 * 2 / ms / 1e9:.2f} TB/s")
