"""GGUF checkpoints served in their quantized form (llama.cpp's block formats).

A GGUF tensor of ``N`` rows and ``K`` columns stores each row as blocks along ``K``
(``gguf.quants``, the reference for the layouts; llama.cpp ``ggml-common.h``):

* ``Q4_0``: 32 weights, fp16 ``d`` and 16 bytes of nibbles (low nibbles are weights 0-15, high
  nibbles 16-31): ``w = d * (q - 8)``.
* ``Q4_1``: 32 weights, fp16 ``d`` and ``m``, nibbles as ``Q4_0``: ``w = d * q + m``.
* ``Q8_0``: 32 weights, fp16 ``d`` and 32 int8: ``w = d * q``.
* ``Q4_K``: super-blocks of 256, fp16 ``d`` and ``dmin``, eight 6-bit sub-block scales ``sc`` and
  minimums ``mn`` (12 bytes, ``gguf.quants.Q4_K.get_scale_min``), 128 bytes of nibbles (64-weight
  chunks: low nibbles one sub-block of 32, high nibbles the next): ``w = d*sc*q - dmin*mn``.

Each maps exactly onto the canonical integer form of ``kernels.py`` with 32-weight groups,
``W = (q - z) * s + o``: ``Q4_0`` (z = 8, s = d), ``Q4_1`` (z = 8, s = d, o = m + 8d),
``Q4_K`` (z = 8, s = d*sc, o = 8 d*sc - dmin*mn), ``Q8_0`` (8 bits, z = 128, s = d). The loader
(``genserve.loader.gguf_weights``) decodes the blocks once into ``qweight`` (one value a byte),
``scales`` and ``offsets``; ``GGUFLinearMethod`` hands them to the kernel the backend prefers
(on CPU ``cpu_int4pack``, torch's packed int4 matmul, in bf16). Other types (F16, Q5_*, Q6_K,
...), layers whose fused parts differ in type, layers no fast kernel takes, the embeddings and
the lm_head are dequantized to the model's dtype at load, as before. Opt-in with
``--quantize gguf`` (vLLM's name): the bf16 matmuls are not token-identical to transformers on the
dequantized model, which a GGUF file without the flag stays (docs/quantization.md).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType
from gguf.quants import Q4_K

from genserve.layers.quantization.base import LinearKernelChooser, QuantizationConfig
from genserve.layers.quantization.kernels import (
    TorchWNA16Kernel,
    WNA16Config,
    choose_linear_kernel,
)
from genserve.layers.quantization.targets import part_prefixes
from genserve.layers.quantization.wna16 import WNA16LinearMethod, WNA16Scheme

GROUP = 32
# GGUF type -> (bits of the canonical form, whether groups carry float offsets).
PACKED: dict[GGMLType, tuple[int, bool]] = {
    GGMLType.Q4_0: (4, False),
    GGMLType.Q4_1: (4, True),
    GGMLType.Q4_K: (4, True),
    GGMLType.Q8_0: (8, False),
}


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 from ``raw [..., 2]`` uint8, as float32 ``[...]``."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """``qs [..., 16]`` bytes -> ``[..., 32]`` values: the low nibbles, then the high ones."""
    t = torch.from_numpy(np.ascontiguousarray(qs))
    return torch.cat([t & 15, t >> 4], dim=-1)


def decode_blocks(raw: np.ndarray, qtype: GGMLType, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One GGUF tensor's blocks in the canonical form (module docstring).

    ``raw``: uint8 ``[N, row_bytes]`` (``gguf.GGUFReader`` tensor data); ``k``: weights per row.
    Returns ``(q uint8 [N, K], scales float32 [N, K/32], offsets float32 [N, K/32] or None)``.
    Raises KeyError for a type not in ``PACKED``.
    """
    bits, _ = PACKED[qtype]
    n = raw.shape[0]
    if qtype == GGMLType.Q4_K:
        kb = raw.reshape(n * k // 256, 144)
        d, dmin = _f16(kb[:, 0:2])[:, None], _f16(kb[:, 2:4])[:, None]
        sc, mn = (torch.from_numpy(a.astype(np.float32)) for a in Q4_K.get_scale_min(kb[:, 4:16]))
        qs = torch.from_numpy(np.ascontiguousarray(kb[:, 16:])).reshape(-1, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, k)
        s = d * sc                                                    # [blocks, 8]
        return q.contiguous(), s.reshape(n, -1), (8 * s - dmin * mn).reshape(n, -1)
    size = {GGMLType.Q4_0: 18, GGMLType.Q4_1: 20, GGMLType.Q8_0: 34}[qtype]
    b = raw.reshape(n, k // GROUP, size)
    d = _f16(b[..., 0:2])                                             # [N, G]
    if qtype == GGMLType.Q8_0:
        q8 = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8))
        q = (q8.to(torch.int16) + 128).to(torch.uint8).reshape(n, k)
        return q, d, None
    if qtype == GGMLType.Q4_0:
        return _nibbles(b[..., 2:]).reshape(n, k), d, None
    m = _f16(b[..., 2:4])
    assert bits == 4
    return _nibbles(b[..., 4:]).reshape(n, k), d, m + 8 * d


class GGUFLinearMethod(WNA16LinearMethod):
    """One linear layer's GGUF blocks, decoded by the loader into ``qweight [N, K]`` (uint8, one
    value a byte), ``scales [N, K/32]`` and, for ``Q4_1``/``Q4_K``, ``offsets [N, K/32]``."""

    def __init__(self, scheme: WNA16Scheme, kernels: LinearKernelChooser, prefix: str, offsets: bool):
        super().__init__(scheme, kernels, prefix)
        self.offsets = offsets

    def kernel_options(self) -> dict:
        return {"has_offsets": self.offsets, "compute_dtype": torch.bfloat16}

    def make_params(self, layer, in_features, out_features, group_rows, split_groups, dtype, loader):
        group_dim = 1 if split_groups else None
        self.add_param(layer, "qweight", (out_features, in_features), torch.uint8, loader,
                       input_dim=1, output_dim=0)
        self.add_param(layer, "scales", (out_features, group_rows), torch.float32, loader,
                       input_dim=group_dim, output_dim=0)
        if self.offsets:
            self.add_param(layer, "offsets", (out_features, group_rows), torch.float32, loader,
                           input_dim=group_dim, output_dim=0)

    def unpack(self, layer):
        return layer.qweight.data.t(), layer.scales.data.t(), None, None

    def canonical_weights(self, layer):
        weights = super().canonical_weights(layer)
        if self.offsets:
            weights.offsets = layer.offsets.data.t().contiguous()
        return weights

    def dummy_value(self, name, param, layer, generator):
        if name == "qweight":
            return torch.randint(0, 2 ** self.scheme.bits, param.shape, generator=generator).to(torch.uint8)
        if name == "offsets":  # centred weights: o ~ -s * (mid value - 8)
            return torch.zeros(param.shape)
        return None


class GGUFConfig(QuantizationConfig):
    """``--quantize gguf`` on a .gguf checkpoint (built by ``engine.model_builder.quantizer`` from the
    file, never from a config.json: ``requires_checkpoint_config`` refuses other checkpoints).
    Its linear layers: packed where every part of the layer has a type in
    ``PACKED`` and the backend has a fast kernel for it; dense (dequantized at load) elsewhere.

    ``types`` maps the model's checkpoint names (``model.layers.0.self_attn.q_proj.weight``) to
    their GGUF types (``genserve.loader.gguf_weights.tensor_types``); ``dtype`` is the model's.
    The loader asks ``keeps_packed(name)`` which tensors to hand over undecoded.
    """

    name = "gguf"
    requires_checkpoint_config = True
    packed_types: ClassVar[dict[GGMLType, tuple[int, bool]]] = PACKED

    def __init__(self, kernels: LinearKernelChooser | None = None, types: dict[str, GGMLType] | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(kernels)
        self.types, self.dtype = types or {}, dtype
        self.packed: set[str] = set()  # checkpoint names (without ``.weight``) served packed

    def keeps_packed(self, name: str) -> bool:
        """Whether the checkpoint tensor ``name`` (``...q_proj.weight``) loads as GGUF blocks."""
        return name.endswith(".weight") and name[: -len(".weight")] in self.packed

    def get_quant_method(self, layer, prefix):
        parts = part_prefixes(prefix)
        kinds = {self.packed_types.get(self.types.get(f"{p}.weight")) for p in parts}  # type: ignore[arg-type]
        if len(kinds) != 1 or None in kinds:
            return None  # not a packed type, or parts of a fused layer differ: dense
        bits, offsets = kinds.pop()  # type: ignore[misc]
        if layer.full_in_features % GROUP:
            return None
        scheme = WNA16Scheme(bits, GROUP, zero_points=False)
        probe = WNA16Config(bits, GROUP, False, False, layer.in_features, layer.out_features, self.dtype,
                            has_offsets=offsets, compute_dtype=torch.bfloat16)
        try:
            kernel = choose_linear_kernel(probe, self.kernels.device, self.kernels.preference,
                                          self.kernels.registry)
        except ValueError:
            return None
        if kernel is TorchWNA16Kernel:  # dequantizing on every call is slower than dense weights
            return None
        self.packed.update(parts)
        return GGUFLinearMethod(scheme, self.kernels, prefix, offsets)
