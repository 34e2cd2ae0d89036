"""Matrix-vector product for one-token steps: ``y = W x (+ b)`` with ``W`` [N, K] row-major.

``W`` is 16-bit, or float8_e4m3fn with one float32 scale per output row (``y = s * (W x) + b``:
FP8's weight-only path for batch 1, where reading 1-byte weights is the whole cost and
quantizing the activation would only add launches).

At batch 1 a decode step is a stream of weight reads, and a GEMM library tuned for matrices
may leave bandwidth on the table for ``M = 1``. Each program here reads ``BLOCK_N`` whole
rows of ``W`` in ``BLOCK_K``-wide tiles (coalesced along K), multiplies by the matching slice
of ``x`` and reduces in fp32. Whether this beats cuBLAS depends on the shape and the chip, so
``genserve_cuda.gemv_tuning`` measures both at warm-up and keeps the faster per shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Candidates the tuner times (few: each costs a compile at start-up).
CANDIDATES = (
    GemvConfig(4, 512, 4, 3),
    GemvConfig(8, 256, 4, 4),
    GemvConfig(16, 256, 8, 3),
)


# Fixed launch for float8 weights (one byte per value: twice bf16's K per tile for the same
# bytes in flight); picked from bench/gpu_fp8.py on an H200: 74.9 us per layer against 85.1 for
# (8, 512, 4, 4) and 143 for bf16 cuBLAS (bench/results/h200-fp8-kernels-2026-12-01.txt).
FP8_CONFIG = GemvConfig(4, 1024, 4, 3)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        if EVEN_K:
            x = tl.load(x_ptr + cols)
            w = tl.load(w_rows + cols[None, :], mask=rmask[:, None], other=0.0)
        else:
            kmask = cols < K
            x = tl.load(x_ptr + cols, mask=kmask, other=0.0)
            w = tl.load(w_rows + cols[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y *= tl.load(s_ptr + rows, mask=rmask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: GemvConfig,
         scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of shape [1, K] (or [K]), in ``x``'s dtype.

    ``scale``: float32 ``[N]`` (contiguous) multiplying each output before the bias, for
    float8 weights (``W ~= weight * scale[:, None]``).
    """
    K = x.shape[-1]
    N = weight.shape[0]
    assert x.numel() == K and weight.shape[1] == K and weight.stride(1) == 1
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, cfg.block_n),)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else weight, scale if scale is not None else weight, y, N, K,
        weight.stride(0), HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, EVEN_K=K % cfg.block_k == 0,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y
