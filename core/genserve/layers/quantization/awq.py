"""AWQ checkpoints (AutoAWQ / llm-awq GEMM packing, auto-round's ``auto_awq`` export).

Layout (AutoAWQ ``WQLinear_GEMM.from_linear``; vLLM ``awq.py``), ``K`` input and ``N`` output
features, 4 bits, eight values per int32 word:

* ``qweight`` int32 ``[K, N / 8]`` and ``qzeros`` int32 ``[G, N / 8]``, packed along the output
  features in AWQ's interleaved order: field ``i`` (bits ``[4i, 4i+4)``) of word ``w`` holds
  column ``8w + ORDER[i]``, ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
* ``scales`` fp16 ``[G, N]``; zero points are stored as they are (no v1 offset).
* ``W[n, k] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]``.

Refused: ``version`` other than ``gemm`` (GEMV packings), ``zero_point: false``, bits other
than 4, group sizes other than -1/32/64/128.
"""

from __future__ import annotations

import torch

from genserve.layers.quantization.base import QuantizationConfig, QuantizationError
from genserve.layers.quantization.targets import contains_module, decide
from genserve.layers.quantization.wna16 import (
    WNA16LinearMethod,
    WNA16Scheme,
    pack_int32,
    unpack_int32,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)            # field i of a word holds column ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)    # column c sits in field REVERSE[c]
GROUP_SIZES = (-1, 32, 64, 128)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """``[R, N / 8]`` AWQ words -> uint8 ``[R, N]`` in column order."""
    fields = unpack_int32(packed, 4, dim=1)                         # [R, N] in field order
    cols = fields.reshape(fields.shape[0], -1, 8)[..., list(AWQ_REVERSE_ORDER)]
    return cols.reshape(fields.shape).contiguous()


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """Inverse of ``awq_unpack`` (used by tests and dummy weights)."""
    fields = values.reshape(values.shape[0], -1, 8)[..., list(AWQ_ORDER)].reshape(values.shape)
    return pack_int32(fields, 4, dim=1)


class AWQLinearMethod(WNA16LinearMethod):
    supported_bits = (4,)

    def make_params(self, layer, in_features, out_features, group_rows, split_groups, dtype, loader):
        for size in layer.output_partition_sizes:
            if size % 8:
                raise ValueError(f"an output part of {size} features does not pack into int32 words of 8")
        group_dim = 0 if split_groups else None
        self.add_param(layer, "qweight", (in_features, out_features // 8), torch.int32, loader,
                       input_dim=0, output_dim=1, packed_dim=1, packed_factor=8)
        self.add_param(layer, "qzeros", (group_rows, out_features // 8), torch.int32, loader,
                       input_dim=group_dim, output_dim=1, packed_dim=1, packed_factor=8)
        self.add_param(layer, "scales", (group_rows, out_features), torch.float32, loader,
                       input_dim=group_dim, output_dim=1)

    def unpack(self, layer):
        return awq_unpack(layer.qweight.data), layer.scales.data, awq_unpack(layer.qzeros.data), None


class AWQConfig(QuantizationConfig):
    """``quant_method: awq`` (config.json ``quantization_config`` or AutoAWQ ``quant_config.json``)."""

    name = "awq"
    requires_checkpoint_config = True

    def __init__(self, kernels, scheme: WNA16Scheme, skip: list[str]):
        super().__init__(kernels)
        self.scheme, self.skip = scheme, skip

    @classmethod
    def from_config(cls, config, kernels=None):
        config = config or {}
        bits = int(config.get("bits", config.get("w_bit", 4)))
        group = int(config.get("group_size", config.get("q_group_size", 128)))
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantizationError(f"AWQ version {version!r} is not supported (gemm)")
        if not config.get("zero_point", True):
            raise QuantizationError("AWQ with zero_point: false is not supported")
        if bits != 4:
            raise QuantizationError(f"AWQ with {bits} bits is not supported (4)")
        if group not in GROUP_SIZES:
            raise QuantizationError(f"AWQ group_size {group} is not supported {GROUP_SIZES}")
        return cls(kernels, WNA16Scheme(bits, group, zero_points=True),
                   list(config.get("modules_to_not_convert") or []))

    def get_quant_method(self, layer, prefix):
        dense = decide(prefix, lambda name: any(contains_module(name, m) for m in self.skip))
        return None if dense else AWQLinearMethod(self.scheme, self.kernels, prefix)
