"""Swap fused Triton forwards into a loaded model's layers.

Only instances whose class still uses the core's own forward are touched (a subclass that
overrides it keeps its maths), and each fused forward falls back to the core's PyTorch code
for inputs the kernel doesn't take (CPU tensors, mixed dtypes).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from genserve.layers.activation import GatedActivation
from genserve.layers.embedding import ParallelLMHead
from genserve.layers.linear import LinearBase
from genserve.layers.norm import RMSNorm
from genserve.layers.quantization.base import UnquantizedLinear
from genserve.layers.rotary import RotaryEmbedding

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fusable(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (first.is_cuda and first.dtype in KERNEL_DTYPES
            and all(t.dtype == first.dtype for t in tensors))


def fused_rms_norm_forward(self: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None = None):
    if not _fusable(x, *(() if residual is None else (residual,))):
        return RMSNorm.forward(self, x, residual)
    from genserve_cuda.kernels.rms_norm import rms_norm

    return rms_norm(x, self.weight, self.eps, self.offset, residual)


def fused_rotary_forward(self: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    if not _fusable(q, k):
        return RotaryEmbedding.forward(self, positions, q, k)
    from genserve_cuda.kernels.rotary import rotary_embedding

    return rotary_embedding(positions, q, k, self.cos, self.sin, self.rotary_dim, self.interleaved)


def fused_silu_mul_forward(self: GatedActivation, x: torch.Tensor):
    if not _fusable(x):
        return GatedActivation.forward(self, x)
    from genserve_cuda.kernels.activation import silu_and_mul

    return silu_and_mul(x)


class DispatchedLinear(UnquantizedLinear):
    """Unquantized weights; one-row inputs may go to the Triton GEMV (see gemv_tuning)."""

    def __init__(self, dispatch):
        self.dispatch = dispatch

    def apply(self, layer, x, bias):
        return self.dispatch.linear(x, layer.weight, bias)


def dispatched_lm_head_forward(self: ParallelLMHead, hidden: torch.Tensor) -> torch.Tensor:
    logits = self.gemv_dispatch.linear(hidden, self.weight, self.bias)
    logits = self.tp.all_gather_last_dim(logits)
    return logits[..., : self.vocab_size]


def _swap(module: nn.Module, fn) -> None:
    # An instance attribute shadows the class's forward; nn.Module.__call__ looks it up.
    module.forward = types.MethodType(fn, module)


def optimize_model(model: nn.Module) -> dict[str, int]:
    from genserve_cuda.gemv_tuning import GemvDispatch

    counts = {"rms_norm": 0, "rotary": 0, "silu_mul": 0, "gemv": 0}
    dispatch = GemvDispatch()
    for m in model.modules():
        cls = type(m)
        if isinstance(m, LinearBase) and type(m.quant) is UnquantizedLinear:  # every forward calls quant.apply
            m.quant = DispatchedLinear(dispatch)
            dispatch.register(m.weight, m.bias)
            counts["gemv"] += 1
            continue
        if isinstance(m, ParallelLMHead) and cls.forward is ParallelLMHead.forward:
            m.gemv_dispatch = dispatch
            _swap(m, dispatched_lm_head_forward)
            dispatch.register(m.weight, m.bias)
            counts["gemv"] += 1
            continue
        if isinstance(m, RMSNorm) and cls.forward is RMSNorm.forward and cls._norm is RMSNorm._norm:
            _swap(m, fused_rms_norm_forward)
            counts["rms_norm"] += 1
        elif isinstance(m, RotaryEmbedding) and cls.forward is RotaryEmbedding.forward \
                and cls._rotate is RotaryEmbedding._rotate and m.rotary_dim % 2 == 0:
            _swap(m, fused_rotary_forward)
            counts["rotary"] += 1
        elif isinstance(m, GatedActivation) and cls.forward is GatedActivation.forward and m.act is F.silu:
            _swap(m, fused_silu_mul_forward)
            counts["silu_mul"] += 1
    if counts["gemv"]:
        model.gemv_dispatch = dispatch  # tuned by the CUDA runner's warm-up
    return counts
