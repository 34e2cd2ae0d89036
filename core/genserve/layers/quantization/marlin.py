"""Marlin-format checkpoints (``quant_method: marlin``; IST-DASLab Marlin, AutoGPTQ's Marlin export).

Layout, from Marlin's ``Layer.pack`` (and vLLM's ``marlin.py``, ``B``/``s``), ``K`` input and
``N`` output features, 4-bit symmetric (``w = (q - 8) * s``), groups of 128 or per-channel:

* ``B`` int32 ``[K / 16, 2 * N]``: ``q [K, N]`` cut into 16x16 tiles, each tile's 256 values laid
  out row after row (``q.reshape(K/16, 16, N/16, 16).permute(0, 2, 1, 3).reshape(K/16, 16 N)``),
  every run of 1024 values (four tiles, 64 output columns) shuffled by ``PERM`` (the order the
  tensor-core fragments read them, with fields interleaved ``[0, 2, 4, 6, 1, 3, 5, 7]``), then
  eight consecutive values packed per int32, little-endian.
* ``s`` fp16 ``[G, N]``: columns shuffled within runs of 64 by ``SCALE_PERM`` (grouped) or of 32
  by ``SCALE_PERM_SINGLE`` (per-channel).

Loading inverts both shuffles into the canonical form; a kernel then repacks as it likes.
Refused: bits other than 4, group sizes other than -1 and 128, a quantized ``lm_head``, ``K``
not a multiple of 128 or ``N`` not a multiple of 256 per rank (Marlin's own constraints).
"""

from __future__ import annotations

from fractions import Fraction

import torch

from genserve.layers.quantization.base import QuantizationConfig, QuantizationError
from genserve.layers.quantization.targets import contains_module, decide
from genserve.layers.quantization.wna16 import (
    WNA16LinearMethod,
    WNA16Scheme,
    pack_int32,
    unpack_int32,
)

TILE = 16


def _perms() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    perm: list[int] = []
    for i in range(32):
        col = i // 4
        first = []
        for block in (0, 1):
            for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1):
                first.append(16 * row + col + 8 * block)
        for j in range(4):
            perm.extend(p + 256 * j for p in first)
    perm_t = torch.tensor(perm).reshape(-1, 8)[:, [0, 2, 4, 6, 1, 3, 5, 7]].reshape(-1)
    scale = [i + 8 * j for i in range(8) for j in range(8)]
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return perm_t, torch.tensor(scale), torch.tensor(single)


PERM, SCALE_PERM, SCALE_PERM_SINGLE = _perms()


def _scale_perm(grouped: bool) -> torch.Tensor:
    return SCALE_PERM if grouped else SCALE_PERM_SINGLE


def marlin_pack(q: torch.Tensor, scales: torch.Tensor, grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, s)`` for integer weights ``q [K, N]`` in ``[0, 16)`` and ``scales [G, N]`` (tests,
    dummy weights and the fixture packer)."""
    k, n = q.shape
    tiles = q.reshape(k // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(k // TILE, n * TILE)
    shuffled = tiles.reshape(-1, PERM.numel())[:, PERM].reshape(tiles.shape)
    p = _scale_perm(grouped)
    s = scales.reshape(-1, p.numel())[:, p].reshape(-1, n)
    return pack_int32(shuffled, 4, dim=1), s.contiguous()


def marlin_unpack(b: torch.Tensor, s: torch.Tensor, grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``marlin_pack``: ``(q uint8 [K, N], scales [G, N])``."""
    shuffled = unpack_int32(b, 4, dim=1)                              # [K/16, 16 N]
    rows, width = shuffled.shape
    tiles = torch.empty_like(shuffled).reshape(-1, PERM.numel())
    tiles[:, PERM.to(b.device)] = shuffled.reshape(-1, PERM.numel())
    n = width // TILE
    q = tiles.reshape(rows, n // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(rows * TILE, n)
    p = _scale_perm(grouped).to(s.device)
    scales = torch.empty_like(s).reshape(-1, p.numel())
    scales[:, p] = s.reshape(-1, p.numel())
    return q.contiguous(), scales.reshape(s.shape)


class MarlinLinearMethod(WNA16LinearMethod):
    supported_bits = (4,)

    def make_params(self, layer, in_features, out_features, group_rows, split_groups, dtype, loader):
        if in_features % 128 or out_features % 256:
            raise ValueError(f"Marlin needs K % 128 == 0 and N % 256 == 0 per rank, not {in_features}x{out_features}")
        for size in layer.output_partition_sizes:
            if size % 64:
                raise ValueError(f"an output part of {size} features cuts Marlin's 64-column runs")
        self.add_param(layer, "B", (in_features // TILE, out_features * TILE // 8), torch.int32, loader,
                       input_dim=0, output_dim=1, packed_dim=1, packed_factor=Fraction(8, TILE))
        self.add_param(layer, "s", (group_rows, out_features), torch.float32, loader,
                       input_dim=0 if split_groups else None, output_dim=1)

    def unpack(self, layer):
        q, scales = marlin_unpack(layer.B.data, layer.s.data, grouped=self.scheme.group_size != -1)
        return q, scales, None, None


class MarlinConfig(QuantizationConfig):
    """``quant_method: marlin``."""

    name = "marlin"
    requires_checkpoint_config = True

    def __init__(self, kernels, scheme: WNA16Scheme, skip: list[str]):
        super().__init__(kernels)
        self.scheme, self.skip = scheme, skip

    @classmethod
    def from_config(cls, config, kernels=None):
        config = config or {}
        bits, group = int(config.get("bits", 4)), int(config.get("group_size", 128))
        if bits != 4:
            raise QuantizationError(f"Marlin with {bits} bits is not supported (4)")
        if group not in (-1, 128):
            raise QuantizationError(f"Marlin group_size {group} is not supported (-1, 128)")
        if config.get("lm_head"):
            raise QuantizationError("layer lm_head: a quantized LM head is not supported")
        return cls(kernels, WNA16Scheme(4, group, zero_points=False),
                   list(config.get("modules_to_not_convert") or []))

    def get_quant_method(self, layer, prefix):
        dense = decide(prefix, lambda name: any(contains_module(name, m) for m in self.skip))
        return None if dense else MarlinLinearMethod(self.scheme, self.kernels, prefix)
