"""What every integer-weight checkpoint format (GPTQ, AWQ, compressed-tensors, Marlin) shares.

A format's ``WNA16LinearMethod`` subclass declares the checkpoint's tensors (names, shapes,
which dimension is input, output and packed) and unpacks them after loading into integers
``q [K, N]``, group ``scales``/``zeros`` and, for act-order checkpoints, ``g_idx``. This module
turns that into the canonical ``WNA16Weights`` (rows permuted so groups are contiguous) and hands
it to the kernel chosen at construction (``LinearKernelChooser``, the backend's preference).

Act-order under tensor parallelism: a row-parallel rank holds an arbitrary subset of the input
features, whose groups are scattered over the whole layer, so its rows cannot form contiguous
groups of ``group_size``. Such layers keep every group's scales (not split by rank, as vLLM
does) and hand the kernel one scale row per input row (``group_size`` 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from genserve.layers.quantization.base import (
    LinearKernelChooser,
    QuantizationError,
    QuantMethod,
)
from genserve.layers.quantization.kernels import WNA16Config, WNA16Weights
from genserve.layers.weights import materialize, set_weight_dims


@dataclass(frozen=True)
class WNA16Scheme:
    """A checkpoint's integer-weight settings for one layer.

    ``group_size`` -1 means one group per output channel; ``zero_points`` False means
    symmetric (implicit zero point ``2**(bits-1)``); ``act_order`` means ``g_idx`` assigns input
    features to groups out of order (GPTQ ``desc_act``, compressed-tensors ``actorder: group``).
    """

    bits: int
    group_size: int
    zero_points: bool
    act_order: bool = False

    def describe(self) -> str:
        return (f"{self.bits}-bit, group {self.group_size}, "
                f"{'asymmetric' if self.zero_points else 'symmetric'}"
                f"{', act-order' if self.act_order else ''}")


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, count: int | None = None) -> torch.Tensor:
    """Little-endian bit fields of ``packed`` (int32) along ``dim`` as uint8: element ``i`` of a
    word holds bits ``[i*bits, (i+1)*bits)``. ``bits`` must divide 32. ``count`` trims padding."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    p = packed.to(torch.int32).movedim(dim, -1)
    vals = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)          # [..., words, per_word]
    vals = vals.reshape(*p.shape[:-1], p.shape[-1] * per_word)
    if count is not None:
        vals = vals[..., :count]
    return vals.to(torch.uint8).movedim(-1, dim).contiguous()


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of ``unpack_int32``: pack ``values`` (integers in ``[0, 2**bits)``) along ``dim``
    into int32 words, zero padded to whole words."""
    per_word = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    pad = -v.shape[-1] % per_word
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(*v.shape[:-1], -1, per_word)
    shifts = torch.arange(0, 32, bits, device=v.device, dtype=torch.int64)
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


class WNA16LinearMethod(QuantMethod):
    """Base of the integer-weight formats' linear methods.

    Subclasses implement ``make_params`` (register the checkpoint tensors with declared
    dimensions) and ``unpack`` (integers, scales, zero points and ``g_idx`` in the canonical
    orientation ``[K, N]`` / ``[G, N]``). ``supported_bits`` bounds what the format reads.
    """

    supported_bits: ClassVar[tuple[int, ...]] = (4, 8)

    def __init__(self, scheme: WNA16Scheme, kernels: LinearKernelChooser, prefix: str):
        super().__init__()
        self.scheme, self.kernels, self.prefix = scheme, kernels, prefix
        self.param_names: list[str] = []
        self.kernel = None

    # -- what a format provides --------------------------------------------------------------

    def make_params(self, layer: nn.Module, in_features: int, out_features: int, group_rows: int,
                    split_groups: bool, dtype: torch.dtype, weight_loader) -> None:
        """Register the checkpoint's tensors on ``layer`` through ``self.add_param``.
        ``group_rows``: rows of scales/zeros this rank holds; ``split_groups``: whether those
        rows are split by input like the weight (False: every rank holds all groups)."""
        raise NotImplementedError

    def unpack(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                 torch.Tensor | None]:
        """``(q uint8 [K, N], scales [G, N], zeros uint8 [G, N] or None, g_idx int [K] or None)``
        from the loaded parameters; zeros are None for symmetric schemes."""
        raise NotImplementedError

    def kernel_options(self) -> dict:
        """Extra ``WNA16Config`` fields for this format (``has_offsets``, ``compute_dtype``)."""
        return {}

    def dummy_value(self, name: str, param: torch.Tensor, layer: nn.Module,
                    generator: torch.Generator) -> torch.Tensor | None:
        """A valid random value for parameter ``name`` (``--load-format dummy``); None means the
        default: random words for int32 tensors, small positive scales for float ones."""
        return None

    # -- the shared lifecycle -------------------------------------------------------------------

    def add_param(self, layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                  weight_loader, *, input_dim: int | None, output_dim: int | None,
                  packed_dim: int | None = None, packed_factor: int = 1) -> nn.Parameter:
        param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        set_weight_dims(param, input_dim=input_dim, output_dim=output_dim, packed_dim=packed_dim,
                        packed_factor=packed_factor)
        param.weight_loader = weight_loader
        layer.register_parameter(name, param)
        self.param_names.append(name)
        return param

    def refuse(self, reason: str) -> QuantizationError:
        return QuantizationError(f"layer {self.prefix or '?'} ({self.scheme.describe()}): {reason}")

    def create_weights(self, layer, in_features, out_features, dtype, weight_loader):
        s = self.scheme
        if s.bits not in self.supported_bits:
            raise self.refuse(f"{s.bits}-bit weights are not supported (supported: {self.supported_bits})")
        full_in = layer.full_in_features
        sharded_input = full_in != in_features
        group = full_in if s.group_size == -1 else s.group_size
        act_order = s.act_order and s.group_size != -1
        if s.group_size != -1 and s.group_size <= 0:
            raise self.refuse(f"group size {s.group_size}")
        if sharded_input and s.group_size != -1 and not act_order and in_features % group:
            raise self.refuse(f"{in_features} input features per rank are not a multiple of the group "
                              f"size; use fewer shards")
        # Scales of act-order and per-channel layers are not split by input.
        split_groups = sharded_input and s.group_size != -1 and not act_order
        group_rows = (-(-in_features // group) if split_groups else -(-full_in // group))
        kernel_group = 1 if (act_order and sharded_input) else (in_features if s.group_size == -1 else group)
        self.wconfig = WNA16Config(bits=s.bits, group_size=kernel_group, has_zero_points=s.zero_points,
                                   act_order=act_order, in_features=in_features,
                                   out_features=out_features, act_dtype=dtype, **self.kernel_options())
        self.kernel = self.kernels.choose(self.wconfig, self.prefix)(self.wconfig)
        try:
            self.make_params(layer, in_features, out_features, group_rows, split_groups, dtype, weight_loader)
        except ValueError as exc:
            raise self.refuse(str(exc)) from None

    def canonical_weights(self, layer: nn.Module) -> WNA16Weights:
        """The loaded checkpoint tensors in the canonical form (see ``kernels.WNA16Weights``)."""
        c = self.wconfig
        q, scales, zeros, g_idx = self.unpack(layer)
        scales = scales.to(c.act_dtype)
        perm = None
        if c.act_order:
            g_idx = g_idx.long()
            perm = torch.argsort(g_idx, stable=True)
            q = q[perm]
            if c.group_size == 1:  # a row-parallel slice: one scale row per input row
                rows = g_idx[perm]
                scales = scales[rows]
                zeros = zeros[rows] if zeros is not None else None
            elif not torch.equal(g_idx[perm], torch.arange(c.in_features, device=q.device) // c.group_size):
                raise self.refuse("g_idx does not assign group_size input features to every group")
        return WNA16Weights(q.contiguous(), scales.contiguous(),
                            None if zeros is None else zeros.contiguous(), perm)

    def process_after_loading(self, layer):
        weights = self.canonical_weights(layer)
        for name in self.param_names:  # the kernel keeps its own layout; the packed ones go
            delattr(layer, name)
        self.kernel.process_weights(layer, weights)

    def apply(self, layer, x, bias):
        return self.kernel.apply(layer, x, bias)

    @torch.no_grad()
    def init_dummy(self, layer, generator):
        filled = set()
        for name in self.param_names:
            param = getattr(layer, name)
            value = self.dummy_value(name, param, layer, generator)
            if value is None:
                if param.dtype == torch.int32:
                    value = torch.randint(-2**31, 2**31 - 1, param.shape, generator=generator,
                                          dtype=torch.int64).to(torch.int32)
                else:  # scales: |W| ~ 0.02 like the float init
                    amp = 0.02 / 2 ** (self.scheme.bits - 1)
                    value = torch.empty(param.shape).uniform_(0.5 * amp, 1.5 * amp, generator=generator)
            param.copy_(value)
            filled.add(id(param))
        return filled


def same_for_every_part(loader, name: str, prefix: str):
    """Wrap the weight loader of a tensor every part of a fused layer must agree on (GPTQ's
    ``g_idx``: q, k and v see the same input, so GPTQ orders their features alike): a part whose
    tensor differs from an earlier part's is refused rather than silently overwriting it."""
    seen: list[torch.Tensor] = []

    def load(param, loaded, shard_id=None):
        tensor = materialize(loaded)
        if seen and not torch.equal(seen[0], tensor):
            raise QuantizationError(f"layer {prefix}: the fused parts' {name} differ (part {shard_id!r}); "
                                    f"one matmul needs one input order")
        if not seen:
            seen.append(tensor.clone())
        loader(param, tensor, shard_id)

    return load


def dummy_g_idx(layer: nn.Module, param: torch.Tensor, group_size: int) -> torch.Tensor:
    """Valid act-order group indices for this rank's slice of the input features."""
    full = layer.full_in_features
    start = layer.tp.rank * param.shape[0] if full != param.shape[0] else 0
    gs = full if group_size == -1 else group_size
    return (torch.arange(start, start + param.shape[0]) // gs).to(param.dtype)
