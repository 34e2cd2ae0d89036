"""FP8 weight-only quantization: weights stored as float8_e4m3fn with a per-channel scale.

Weights load in the model's dtype and are quantized once after loading, halving the bytes
a decode step reads. Compute upcasts to the activation dtype (a fused FP8 GEMM is a backend's
business), so this method runs anywhere torch has float8 types.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genserve.layers.quantization.base import PerLayerQuantConfig, UnquantizedLinear

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    q = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


class FP8WeightOnly(UnquantizedLinear):
    name = "fp8"

    def process_after_loading(self, layer):
        q, scale = quantize_fp8_per_channel(layer.weight.data)
        dtype = layer.weight.dtype
        del layer.weight
        layer.register_buffer("weight_fp8", q)
        layer.register_buffer("weight_scale", scale.to(dtype))

    def apply(self, layer, x, bias):
        w = layer.weight_fp8.to(x.dtype) * layer.weight_scale
        return F.linear(x, w, bias)


class FP8Config(PerLayerQuantConfig):
    """``--quantize fp8``: every linear layer quantized at load (``lm_head`` stays dense)."""

    name = "fp8"
    method_cls = FP8WeightOnly
