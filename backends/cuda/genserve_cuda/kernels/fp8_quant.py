"""Dynamic per-token FP8 quantization of activations in one launch (W8A8's input side).

``x [M, K]`` (16/32-bit) -> ``q`` float8_e4m3fn ``[M, K]`` and ``scale`` float32 ``[M, 1]`` with
``x ~= q * scale``; each row's largest magnitude maps to 448 (the dynamic per-token scheme of
vLLM's ``Fp8LinearOp``). The same arithmetic as the torch reference
``genserve.layers.quantization.fp8_kernels.quantize_fp8_per_token`` (amax, clamp to ``FP8_EPS``,
divide by 448, ``x / scale`` clamped to +-448, round to e4m3), which takes five launches (abs,
amax, divide, clamp, cast) plus temporaries: at batch 1 those launches cost more than the GEMM
they feed. One program holds one whole row in registers (``K`` up to 32768).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genserve.layers.quantization.fp8_kernels import FP8_EPS, FP8_MAX

MAX_K = 32768


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                          BLOCK: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), EPS) / QMAX
    q = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
    tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (unit column stride) -> (float8_e4m3fn ``[M, K]``, float32 ``[M, 1]``).

    No host sync: CUDA-graph safe. Raises ValueError for ``K > MAX_K``.
    """
    M, K = x.shape
    if K > MAX_K:
        raise ValueError(f"per-token FP8 quantization holds rows of up to {MAX_K} values, got {K}")
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    block = triton.next_power_of_2(K)
    warps = 4 if block <= 4096 else 8 if block <= 8192 else 16
    _per_token_fp8_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0),
                                BLOCK=block, QMAX=FP8_MAX, EPS=FP8_EPS, num_warps=warps)
    return q, scale
