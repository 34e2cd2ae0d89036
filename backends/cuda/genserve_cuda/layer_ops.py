"""The CUDA backend's layer implementations: fused Triton kernels bound at construction.

``CudaLayerOps`` is what ``CudaBackend.layer_ops()`` hands the model (``ModelContext.layer_ops``,
see ``genserve.layers.custom_op``): each core layer asks it for its implementation as it is
built. RMSNorm (with the residual add), rotary embedding (even ``rotary_dim``) and SiLU-and-mul
get fused Triton kernels, as do the routed experts of an unquantized MoE layer (sorted
grouped GEMMs, ``kernels/fused_moe.py``); unquantized linear layers and the LM head get ``GemvDispatch``, which
sends one-row inputs to a Triton GEMV where the CUDA runner's warm-up measured it faster. Each
implementation hands inputs its kernel does not take (CPU tensors, mixed dtypes) back to the
layer's PyTorch ``forward_native``. Importing this module imports no kernel (nor triton).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from genserve.layers.activation import GatedActivation
from genserve.layers.custom_op import CustomOp, LayerOps, OpFactory, OpImpl
from genserve.layers.embedding import ParallelLMHead
from genserve.layers.moe import FusedExperts
from genserve.layers.norm import RMSNorm
from genserve.layers.quantization.base import UnquantizedLinear
from genserve.layers.rotary import RotaryEmbedding

from genserve_cuda.gemv_tuning import GemvDispatch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fusable(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (first.is_cuda and first.dtype in KERNEL_DTYPES
            and all(t.dtype == first.dtype for t in tensors))


def fused_rms_norm(layer: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None = None):
    if not _fusable(x, *(() if residual is None else (residual,))):
        return layer.forward_native(x, residual)
    from genserve_cuda.kernels.rms_norm import rms_norm

    return rms_norm(x, layer.weight, layer.eps, layer.offset, residual)


def fused_rotary(layer: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    if not _fusable(q, k):
        return layer.forward_native(positions, q, k)
    from genserve_cuda.kernels.rotary import rotary_embedding

    return rotary_embedding(positions, q, k, layer.cos, layer.sin, layer.rotary_dim, layer.interleaved)


def fused_silu_mul(layer: GatedActivation, x: torch.Tensor):
    if not _fusable(x):
        return layer.forward_native(x)
    from genserve_cuda.kernels.activation import silu_and_mul

    return silu_and_mul(x)


def fused_moe_experts(layer: FusedExperts, x, w13, w2, topk_weights, topk_ids, act):
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and w13.dtype == x.dtype
            and w2.dtype == x.dtype):
        return layer.forward_native(x, w13, w2, topk_weights, topk_ids, act)
    from genserve_cuda.kernels.fused_moe import fused_moe

    return fused_moe(x, w13, w2, topk_weights, topk_ids, act)


class DispatchedLinear(UnquantizedLinear):
    """Unquantized weights; one-row inputs may go to the Triton GEMV (see gemv_tuning)."""

    def __init__(self, dispatch: GemvDispatch):
        super().__init__()
        self.dispatch = dispatch

    def create_weights(self, layer, in_features, out_features, dtype, weight_loader):
        super().create_weights(layer, in_features, out_features, dtype, weight_loader)
        self.dispatch.register(layer)

    def apply(self, layer, x, bias):
        return self.dispatch.linear(x, layer.weight, bias)


def _rms_norm(ops: LayerOps, layer: CustomOp) -> OpImpl | None:
    return fused_rms_norm


def _rotary(ops: LayerOps, layer: CustomOp) -> OpImpl | None:
    assert isinstance(layer, RotaryEmbedding)
    return fused_rotary if layer.rotary_dim % 2 == 0 else None


def _gated_activation(ops: LayerOps, layer: CustomOp) -> OpImpl | None:
    assert isinstance(layer, GatedActivation)
    return fused_silu_mul if layer.act is F.silu else None  # the only fused activation


def _fused_experts(ops: LayerOps, layer: CustomOp) -> OpImpl | None:
    return fused_moe_experts


def _lm_head(ops: LayerOps, layer: CustomOp) -> OpImpl | None:
    assert isinstance(ops, CudaLayerOps) and isinstance(layer, ParallelLMHead)
    ops.gemv.register(layer)
    dispatch = ops.gemv

    def dispatched_lm_head(head: ParallelLMHead, hidden: torch.Tensor) -> torch.Tensor:
        logits = dispatch.linear(hidden, head.weight, head.bias)
        logits = head.tp.all_gather_last_dim(logits)
        return logits[..., : head.vocab_size]

    return dispatched_lm_head


class CudaLayerOps(LayerOps):
    """One model's CUDA implementations; ``gemv`` is tuned by ``CudaModelRunner.warmup``."""

    name = "cuda"
    factories: ClassVar[Mapping[str, OpFactory]] = {"rms_norm": _rms_norm, "rotary_embedding": _rotary,
                                                    "gated_activation": _gated_activation,
                                                    "lm_head": _lm_head, "fused_experts": _fused_experts}

    def __init__(self) -> None:
        self.gemv = GemvDispatch()

    def unquantized_linear(self) -> UnquantizedLinear:
        return DispatchedLinear(self.gemv)
