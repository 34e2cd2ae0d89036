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
* ``Q5_0`` / ``Q5_1``: as ``Q4_0`` / ``Q4_1`` plus 4 bytes ``qh`` holding each weight's fifth bit
  (bit ``j`` of the little-endian word for weight ``j``): ``w = d * (q - 16)`` / ``d * q + m``.
* ``Q5_K``: as ``Q4_K`` plus 32 bytes ``qh`` (bit ``j`` of byte ``i``: the fifth bit of weight
  ``i`` of sub-block ``j``): ``w = d*sc*q - dmin*mn``.
* ``Q6_K``: super-blocks of 256: 128 bytes of low nibbles, 64 bytes of 2-bit highs, sixteen int8
  sub-block scales (16 weights each), fp16 ``d``: ``w = d * sc * (q - 32)``.

Each maps exactly onto the canonical integer form of ``kernels.py``, ``W = (q - z) * s + o``
(``PACKED``): the 4-bit types with 32-weight groups, ``Q4_0`` (z = 8, s = d), ``Q4_1`` (z = 8,
s = d, o = m + 8d), ``Q4_K`` (z = 8, s = d*sc, o = 8 d*sc - dmin*mn); the 5- to 8-bit types as
8-bit ``q`` around z = 128: ``Q5_0`` (q + 112, s = d), ``Q5_1`` (q + 128, s = d, o = m),
``Q5_K`` (q + 128, s = d*sc, o = -dmin*mn), ``Q8_0`` (q + 128, s = d), all in groups of 32, and
``Q6_K`` (q + 96, s = d*sc) in groups of 16. The loader (``genserve.loader.gguf_weights``)
decodes the blocks once into ``qweight`` (one value a byte), ``scales`` and ``offsets``;
``GGUFLinearMethod`` hands them to the kernel the backend prefers (on CPU ``cpu_int4pack``,
torch's packed int4 matmul, in bf16), and ``GGUFEmbeddingMethod`` does the same for the token
embedding and the LM head (lookups dequantize the rows they gather). Other types (F16, BF16,
Q2_K, Q3_K, IQ*, ...), layers whose fused parts differ in type and layers no fast kernel takes
are dequantized to the model's dtype at load, as before. Opt-in with ``--quantize gguf`` (vLLM's
name): the bf16 matmuls are not token-identical to transformers on the dequantized model, which
a GGUF file without the flag stays (docs/quantization.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType
from gguf.quants import Q4_K

from genserve.layers.quantization.base import (
    EmbeddingMethod,
    LinearKernelChooser,
    QuantizationConfig,
)
from genserve.layers.quantization.kernels import (
    TorchWNA16Kernel,
    WNA16Config,
    choose_linear_kernel,
)
from genserve.layers.quantization.targets import part_prefixes
from genserve.layers.quantization.wna16 import WNA16LinearMethod, WNA16Scheme

GROUP = 32
QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class PackedFormat:
    """How a GGUF type maps onto the canonical form: ``bits`` of ``q``, ``group`` weights per
    scale, whether groups carry float ``offsets``."""

    bits: int
    group: int
    offsets: bool


PACKED: dict[GGMLType, PackedFormat] = {
    GGMLType.Q4_0: PackedFormat(4, GROUP, False),
    GGMLType.Q4_1: PackedFormat(4, GROUP, True),
    GGMLType.Q4_K: PackedFormat(4, GROUP, True),
    GGMLType.Q5_0: PackedFormat(8, GROUP, False),
    GGMLType.Q5_1: PackedFormat(8, GROUP, True),
    GGMLType.Q5_K: PackedFormat(8, GROUP, True),
    GGMLType.Q6_K: PackedFormat(8, 16, False),
    GGMLType.Q8_0: PackedFormat(8, GROUP, False),
}


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 from ``raw [..., 2]`` uint8, as float32 ``[...]``."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _u8(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """``qs [..., 16]`` bytes -> ``[..., 32]`` values: the low nibbles, then the high ones."""
    t = _u8(qs)
    return torch.cat([t & 15, t >> 4], dim=-1)


def _fifth_bits(qh: np.ndarray) -> torch.Tensor:
    """Q5_0/Q5_1 ``qh [..., 4]`` bytes -> ``[..., 32]`` bits: weight ``j``'s is bit ``j`` of the
    little-endian 32-bit word."""
    t = _u8(qh).to(torch.int32)
    word = t[..., 0] | (t[..., 1] << 8) | (t[..., 2] << 16) | (t[..., 3] << 24)
    return ((word[..., None] >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)


def _k_scales(kb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K super-blocks ``[B, >=16]``: ``d*sc`` and ``dmin*mn``, float32 ``[B, 8]``."""
    d, dmin = _f16(kb[:, 0:2])[:, None], _f16(kb[:, 2:4])[:, None]
    sc, mn = (torch.from_numpy(a.astype(np.float32)) for a in Q4_K.get_scale_min(kb[:, 4:16]))
    return d * sc, dmin * mn, d


def decode_blocks(raw: np.ndarray, qtype: GGMLType, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One GGUF tensor's blocks in the canonical form (module docstring).

    ``raw``: uint8 ``[N, row_bytes]`` (``gguf.GGUFReader`` tensor data); ``k``: weights per row.
    Returns ``(q uint8 [N, K], scales float32 [N, K/group], offsets float32 [N, K/group] or
    None)``, ``group`` as ``PACKED[qtype]``. Raises KeyError for a type not in ``PACKED``.
    Layouts as ``gguf.quants``' ``dequantize_blocks`` read them.
    """
    n = raw.shape[0]
    if qtype in (GGMLType.Q4_K, GGMLType.Q5_K):
        kb = raw.reshape(n * k // QK_K, -1)
        s, m, _ = _k_scales(kb)                                       # [B, 8]
        if qtype == GGMLType.Q4_K:  # 64-weight chunks: low nibbles one sub-block, high the next
            qs = _u8(kb[:, 16:]).reshape(-1, 4, 1, 32)
            q = torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, k)
            return q.contiguous(), s.reshape(n, -1), (8 * s - m).reshape(n, -1)
        # Q5_K: qh [32] holds bit 4 of sub-block j's weights in bit j; qs as Q4_K's.
        qh, qs = _u8(kb[:, 16:48]).reshape(-1, 1, 32), _u8(kb[:, 48:]).reshape(-1, 4, 1, 32)
        low = torch.cat([qs & 15, qs >> 4], dim=2).reshape(-1, 8, 32)
        high = (qh >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1   # [B, 8, 32]
        q = (low | (high << 4)) + 128
        return q.reshape(n, k), s.reshape(n, -1), (-m).reshape(n, -1)
    if qtype == GGMLType.Q6_K:
        kb = raw.reshape(n * k // QK_K, 210)
        ql = _u8(kb[:, :128]).reshape(-1, 2, 1, 64)                   # two halves of 128 weights
        ql = torch.cat([ql & 15, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
        qh = _u8(kb[:, 128:192]).reshape(-1, 2, 1, 32)
        qh = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]) & 3   # [B, 2, 4, 32]
        q = (ql | (qh << 4)) + 96                                     # q - 32 + 128
        sc = torch.from_numpy(np.ascontiguousarray(kb[:, 192:208]).view(np.int8).astype(np.float32))
        d = _f16(kb[:, 208:210])[:, None]
        return q.reshape(n, k), (d * sc).reshape(n, -1), None
    size = {GGMLType.Q4_0: 18, GGMLType.Q4_1: 20, GGMLType.Q5_0: 22, GGMLType.Q5_1: 24,
            GGMLType.Q8_0: 34}[qtype]
    b = raw.reshape(n, k // GROUP, size)
    d = _f16(b[..., 0:2])                                             # [N, G]
    if qtype == GGMLType.Q8_0:
        q8 = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8))
        q = (q8.to(torch.int16) + 128).to(torch.uint8).reshape(n, k)
        return q, d, None
    if qtype == GGMLType.Q4_0:
        return _nibbles(b[..., 2:]).reshape(n, k), d, None
    if qtype == GGMLType.Q5_0:  # w = d (q - 16): 8-bit q + 112 around 128
        q = _nibbles(b[..., 6:]) | (_fifth_bits(b[..., 2:6]) << 4)
        return (q + 112).reshape(n, k), d, None
    m = _f16(b[..., 2:4])
    if qtype == GGMLType.Q5_1:  # w = d q + m: 8-bit q + 128, offset m
        q = _nibbles(b[..., 8:]) | (_fifth_bits(b[..., 4:8]) << 4)
        return (q + 128).reshape(n, k), d, m
    return _nibbles(b[..., 4:]).reshape(n, k), d, m + 8 * d


class GGUFLinearMethod(WNA16LinearMethod):
    """One linear layer's GGUF blocks, decoded by the loader into ``qweight [N, K]`` (uint8, one
    value a byte), ``scales [N, K/group]`` and, for the types with minimums (``Q4_1``, ``Q4_K``,
    ``Q5_1``, ``Q5_K``), ``offsets [N, K/group]``."""

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


class GGUFEmbeddingMethod(GGUFLinearMethod, EmbeddingMethod):
    """A GGUF vocabulary table (token embedding, LM head) kept as decoded blocks: ``qweight
    [rows, hidden]``, ``scales``/``offsets [rows, hidden/group]`` as ``GGUFLinearMethod``'s.
    The LM head's matmul runs the layer kernel (packed once after loading); a lookup dequantizes
    only the rows it gathers, in float32 (the same ``(q - z) * s + o`` as the reference
    ``WNA16Weights.dequantize``). The decoded blocks stay for the lookups (for SmolLM2's Q8_0
    49152 x 576 table: 28 MB of ``q`` and 3.5 MB of scales beside the 28 MB kernel copy, against
    113 MB of float32)."""

    def create_weights(self, layer, in_features, out_features, dtype, weight_loader):
        self.owner = layer  # a tied LM head shares this method and the owner's tensors
        s = self.scheme
        self.wconfig = WNA16Config(bits=s.bits, group_size=s.group_size, has_zero_points=False,
                                   act_order=False, in_features=in_features, out_features=out_features,
                                   act_dtype=dtype, **self.kernel_options())
        self.kernel = self.kernels.choose(self.wconfig, self.prefix)(self.wconfig)
        self.make_params(layer, in_features, out_features, in_features // s.group_size, True, dtype,
                         weight_loader)

    def process_after_loading(self, layer):
        if layer is self.owner:  # the tied head comes here too: nothing of its own to pack
            self.kernel.process_weights(layer, self.canonical_weights(layer))

    def embedding(self, layer, ids):
        o, c = self.owner, self.wconfig
        rows = ids.reshape(-1)
        q = o.qweight.index_select(0, rows).float().unflatten(-1, (-1, c.group_size))   # [T, G, g]
        w = (q - 2 ** (c.bits - 1)) * o.scales.index_select(0, rows)[..., None]
        if self.offsets:
            w = w + o.offsets.index_select(0, rows)[..., None]
        return w.flatten(-2).to(c.act_dtype).reshape(*ids.shape, -1)

    def apply(self, layer, x, bias):
        return self.kernel.apply(self.owner, x, bias)

    def init_dummy(self, layer, generator):
        return super().init_dummy(layer, generator) if layer is self.owner else set()


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
    packed_types: ClassVar[dict[GGMLType, PackedFormat]] = PACKED

    def __init__(self, kernels: LinearKernelChooser | None = None, types: dict[str, GGMLType] | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(kernels)
        self.types, self.dtype = types or {}, dtype
        self.packed: set[str] = set()  # checkpoint names (without ``.weight``) served packed

    def keeps_packed(self, name: str) -> bool:
        """Whether the checkpoint tensor ``name`` (``...q_proj.weight``) loads as GGUF blocks."""
        return name.endswith(".weight") and name[: -len(".weight")] in self.packed

    def _fast_kernel(self, fmt: PackedFormat, k: int, n: int) -> bool:
        """Whether the backend has a kernel other than the dequantizing reference for a
        ``k`` x ``n`` weight in ``fmt`` (dequantizing on every call is slower than dense)."""
        if k % fmt.group:
            return False
        probe = WNA16Config(fmt.bits, fmt.group, False, False, k, n, self.dtype,
                            has_offsets=fmt.offsets, compute_dtype=torch.bfloat16)
        try:
            kernel = choose_linear_kernel(probe, self.kernels.device, self.kernels.preference,
                                          self.kernels.registry)
        except ValueError:
            return False
        return kernel is not TorchWNA16Kernel

    def get_quant_method(self, layer, prefix):
        parts = part_prefixes(prefix)
        kinds = {self.packed_types.get(self.types.get(f"{p}.weight")) for p in parts}  # type: ignore[arg-type]
        if len(kinds) != 1 or None in kinds:
            return None  # not a packed type, or parts of a fused layer differ: dense
        fmt = kinds.pop()
        assert fmt is not None
        if layer.full_in_features % fmt.group or not self._fast_kernel(fmt, layer.in_features,
                                                                        layer.out_features):
            return None
        self.packed.update(parts)
        return GGUFLinearMethod(WNA16Scheme(fmt.bits, fmt.group, zero_points=False), self.kernels, prefix,
                                fmt.offsets)

    def get_embedding_method(self, layer, prefix):
        """The token embedding / LM head packed when its type is in ``PACKED`` and a fast kernel
        takes its ``[rows, hidden]`` (tensor-parallel rows per rank)."""
        fmt = self.packed_types.get(self.types.get(f"{prefix}.weight"))  # type: ignore[arg-type]
        if fmt is None or not self._fast_kernel(fmt, layer.hidden_size, layer.num_rows):
            return None
        self.packed.add(prefix)
        return GGUFEmbeddingMethod(WNA16Scheme(fmt.bits, fmt.group, zero_points=False), self.kernels,
                                   prefix, fmt.offsets)
