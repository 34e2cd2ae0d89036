"""Int8 weight-only quantization (``--quantize eetq``): per-output-channel symmetric int8.

TGI's ``eetq`` is the same scheme (8-bit weights, one scale per output channel, activations in
16 bits) through a CUDA kernel. Here it is the CPU backend's: weights are quantized once after
loading and the matmul is torch's int8-weight kernel (``aten._weight_int8pack_mm``), which reads
a quarter of fp32's bytes, and at one row is several times faster than the fp32 and bf16
matmuls (docs/benchmarks.md, "Int8 weights on the CPU"). A GPU backend would need its own fused
kernel, so other backends refuse the method rather than run it slowly.
"""

from __future__ import annotations

import torch

from genserve.layers.quantization.base import PerLayerQuantConfig, UnquantizedLinear

INT8_MAX = 127.0


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [N, K], float32 scale [N]) with ``weight ~= q * scale[:, None]``."""
    scale = weight.abs().amax(dim=1).float().clamp(min=1e-12) / INT8_MAX
    q = torch.round(weight.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale


class Int8WeightOnly(UnquantizedLinear):
    name = "eetq"
    backends = ("cpu",)

    def process_after_loading(self, layer):
        q, scale = quantize_int8_per_channel(layer.weight.data)
        del layer.weight
        layer.register_buffer("weight_int8", q)
        # The CPU kernel wants its scales in the activations' dtype, which is bf16 there.
        layer.register_buffer("weight_scale", scale.to(torch.bfloat16))

    def apply(self, layer, x, bias):
        # The kernel is fast with bf16 activations only (fp32 ones take its slow path), and
        # int8 weights already cost more precision than bf16 inputs do.
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(rows, layer.weight_int8, layer.weight_scale)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias


class EETQConfig(PerLayerQuantConfig):
    """``--quantize eetq``: every linear layer quantized at load (``lm_head`` stays dense)."""

    name = "eetq"
    backends = Int8WeightOnly.backends
    method_cls = Int8WeightOnly
