"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum, auto-round's ``auto_gptq`` export).

Layout (AutoGPTQ/GPTQModel ``QuantLinear.pack``; vLLM ``gptq.py``), ``K`` input and ``N``
output features, ``pf = 32 // bits`` values per int32, little-endian within a word:

* ``qweight`` int32 ``[K / pf, N]``: word ``[i, n]`` holds rows ``i*pf .. i*pf+pf-1`` of column
  ``n``, row ``i*pf + j`` in bits ``[j*bits, (j+1)*bits)``.
* ``qzeros`` int32 ``[G, N / pf]``: the same packing along the output features.
* ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]``: the group of every input feature
  (``k // group_size`` unless ``desc_act``).
* ``W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``.

``checkpoint_format`` ``gptq`` (v1, the default) stores every zero point minus one, as one int32
subtraction of ``0x11111111`` (4-bit) per word; GPTQModel's v1 -> v2 conversion adds it back the
same way, so we do too (a stored 15 then carries into the next field exactly as it does there).
``gptq_v2`` stores zero points as they are. ``sym: true`` checkpoints must hold the midpoint
``2**(bits-1)`` as every zero point. ``desc_act`` with ``group_size -1`` is plain per-channel.

Refused, with the layer named: bits other than 4 and 8, a quantized ``lm_head`` (``lm_head:
true``), Marlin-format GPTQ (``is_marlin_format``: use ``--quantize marlin``), shapes that do not
pack into whole words per rank. GPTQModel ``dynamic`` rules are honoured: ``-:regex`` leaves a
layer dense, ``+:regex`` / ``regex`` override bits, group_size, desc_act, sym for the layers they
match.
"""

from __future__ import annotations

import re

import torch

from genserve.layers.quantization.base import QuantizationConfig, QuantizationError
from genserve.layers.quantization.targets import contains_module, decide
from genserve.layers.quantization.wna16 import (
    WNA16LinearMethod,
    WNA16Scheme,
    dummy_g_idx,
    same_for_every_part,
    unpack_int32,
)

GROUP_SIZES = (-1, 32, 64, 128)


def _ones(bits: int) -> int:
    """The int32 word with 1 in every ``bits``-wide field (v1's per-word zero-point offset)."""
    return sum(1 << (j * bits) for j in range(32 // bits))


class GPTQLinearMethod(WNA16LinearMethod):
    def __init__(self, scheme, kernels, prefix, v1: bool):
        super().__init__(scheme, kernels, prefix)
        self.v1 = v1

    def make_params(self, layer, in_features, out_features, group_rows, split_groups, dtype, loader):
        bits = self.scheme.bits
        pf = 32 // bits
        if in_features % pf:
            raise ValueError(f"{in_features} input features (per rank) do not pack into int32 words of {pf}")
        for size in layer.output_partition_sizes:
            if size % pf:
                raise ValueError(f"an output part of {size} features does not pack into zero-point words of {pf}")
        group_dim = 0 if split_groups else None
        self.add_param(layer, "qweight", (in_features // pf, out_features), torch.int32, loader,
                       input_dim=0, output_dim=1, packed_dim=0, packed_factor=pf)
        self.add_param(layer, "qzeros", (group_rows, out_features // pf), torch.int32, loader,
                       input_dim=group_dim, output_dim=1, packed_dim=1, packed_factor=pf)
        self.add_param(layer, "scales", (group_rows, out_features), torch.float32, loader,
                       input_dim=group_dim, output_dim=1)
        if self.wconfig.act_order:
            if len(layer.output_partition_sizes) > 1:
                loader = same_for_every_part(loader, "g_idx", self.prefix)
            self.add_param(layer, "g_idx", (in_features,), torch.int32, loader, input_dim=0, output_dim=None)

    def unpack(self, layer):
        bits = self.scheme.bits
        q = unpack_int32(layer.qweight.data, bits, dim=0)
        packed_zeros = layer.qzeros.data
        if self.v1:  # undo v1's per-word subtraction (int32 wrap-around, as GPTQModel does)
            words = packed_zeros.to(torch.int64) + _ones(bits)
            packed_zeros = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        zeros = unpack_int32(packed_zeros, bits, dim=1)
        if not self.scheme.zero_points:
            if not bool((zeros == 2 ** (bits - 1)).all()):
                raise self.refuse("the config says sym: true but the zero points are not 2**(bits-1)")
            zeros = None
        g_idx = layer.g_idx.data if self.wconfig.act_order else None
        return q, layer.scales.data, zeros, g_idx

    def dummy_value(self, name, param, layer, generator):
        if name == "g_idx":
            return dummy_g_idx(layer, param, self.scheme.group_size)
        if name == "qzeros" and not self.scheme.zero_points:  # the midpoint, stored as the format says
            mid = 2 ** (self.scheme.bits - 1) - (1 if self.v1 else 0)
            word = _ones(self.scheme.bits) * mid
            return torch.full(param.shape, word - 2**32 if word >= 2**31 else word, dtype=torch.int32)
        return None


class GPTQConfig(QuantizationConfig):
    """``quant_method: gptq`` (config.json ``quantization_config`` or ``quantize_config.json``)."""

    name = "gptq"
    requires_checkpoint_config = True

    def __init__(self, kernels, scheme: WNA16Scheme, v1: bool, skip: list[str],
                 dynamic: dict[str, dict] | None = None, inside: list[str] | None = None):
        super().__init__(kernels)
        self.scheme, self.v1, self.skip = scheme, v1, skip
        self.dynamic = dynamic or {}
        self.inside = inside  # modules_in_block_to_quantize, flattened; None: every linear layer

    @classmethod
    def from_config(cls, config, kernels=None):
        config = config or {}
        bits, group = int(config.get("bits", 4)), int(config.get("group_size", 128))
        fmt = str(config.get("checkpoint_format") or "gptq").lower()
        if config.get("is_marlin_format") or fmt == "marlin":
            raise QuantizationError("this GPTQ checkpoint is in Marlin format: serve it with --quantize marlin")
        if fmt not in ("gptq", "gptq_v2"):
            raise QuantizationError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        if config.get("lm_head"):
            raise QuantizationError("layer lm_head: a quantized LM head is not supported")
        scheme = cls.scheme_of(bits, group, bool(config.get("desc_act", False)), bool(config.get("sym", True)))
        inside = config.get("modules_in_block_to_quantize")
        flat = [m for block in inside for m in (block if isinstance(block, list) else [block])] if inside else None
        skip = list(config.get("modules_to_not_convert") or [])
        return cls(kernels, scheme, fmt == "gptq", skip, config.get("dynamic"), flat)

    @staticmethod
    def scheme_of(bits: int, group: int, desc_act: bool, sym: bool) -> WNA16Scheme:
        if bits not in (4, 8):
            raise QuantizationError(f"GPTQ with {bits} bits is not supported (4, 8)")
        if group not in GROUP_SIZES:
            raise QuantizationError(f"GPTQ group_size {group} is not supported {GROUP_SIZES}")
        return WNA16Scheme(bits, group, zero_points=not sym, act_order=desc_act and group != -1)

    def _scheme_for(self, name: str):
        """This part's scheme, or None when it stays dense."""
        if any(contains_module(name, m) for m in self.skip):
            return None
        if self.inside is not None and not any(name.endswith("." + m) or name == m for m in self.inside):
            return None
        s = self.scheme
        for pattern, override in self.dynamic.items():
            negative = pattern.startswith("-:")
            regex = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
            if re.match(regex, name):
                if negative:
                    return None
                s = self.scheme_of(int(override.get("bits", s.bits)), int(override.get("group_size", s.group_size)),
                                   bool(override.get("desc_act", s.act_order)),
                                   bool(override.get("sym", not s.zero_points)))
        return s

    def get_quant_method(self, layer, prefix):
        scheme = decide(prefix, self._scheme_for)
        return None if scheme is None else GPTQLinearMethod(scheme, self.kernels, prefix, self.v1)
