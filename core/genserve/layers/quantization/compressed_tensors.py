"""compressed-tensors checkpoints (llm-compressor): ``pack-quantized`` W4A16 and W8A16, and
``float-quantized`` FP8 (read by ``fp8_checkpoint.py``).

Layout (compressed-tensors ``compressors/pack_quantized``: ``pack_to_int32``), ``K`` input and
``N`` output features, integer weights signed in ``[-2**(b-1), 2**(b-1))`` and stored offset by
``2**(b-1)``, packed little-endian, ``32 / b`` per int32:

* ``weight_packed`` int32 ``[N, ceil(K * b / 32)]`` packed along the input features;
* ``weight_scale`` ``[N, G]`` (``G = 1`` for the ``channel`` strategy);
* ``weight_zero_point`` (asymmetric only) int32 ``[ceil(N * b / 32), G]``, the signed zero points
  packed the same way along the output features;
* ``weight_shape`` ``[2]`` = ``(N, K)``; ``weight_g_idx`` int32 ``[K]`` with ``actorder: group``.
* ``W[n, k] = (q[n, k] - zp[n, g(k)]) * scale[n, g(k)]`` (signed values; the offset cancels).

Which layers: ``config_groups`` each name ``targets`` (``Linear``, exact names, ``re:`` patterns)
and a weights scheme; ``ignore`` (names and ``re:`` patterns) leaves layers dense. Refused, with
the layer named: a format other than ``pack-quantized`` (``float-quantized`` for FP8), integer
weights with quantized activations (W8A8, W4A8), float weights other than FP8 with channel or
tensor scales (block scales, NVFP4), bits other than 4 and 8, strategies other than ``group`` and
``channel``, a quantized KV cache, sparsity and transform configs. A layer that no group targets
stays dense, as the checkpoint holds it.
"""

from __future__ import annotations

import torch

from genserve.layers.quantization.base import QuantizationConfig, QuantizationError
from genserve.layers.quantization.fp8_checkpoint import FP8CheckpointLinear, FP8Scheme
from genserve.layers.quantization.targets import decide, matches
from genserve.layers.quantization.wna16 import (
    WNA16LinearMethod,
    WNA16Scheme,
    dummy_g_idx,
    pack_int32,
    same_for_every_part,
    unpack_int32,
)


class CompressedTensorsWNA16Method(WNA16LinearMethod):
    def make_params(self, layer, in_features, out_features, group_rows, split_groups, dtype, loader):
        bits = self.scheme.bits
        pf = 32 // bits
        group_dim = 1 if split_groups else None
        self.add_param(layer, "weight_packed", (out_features, -(-in_features // pf)), torch.int32, loader,
                       input_dim=1, output_dim=0, packed_dim=1, packed_factor=pf)
        self.add_param(layer, "weight_scale", (out_features, group_rows), torch.float32, loader,
                       input_dim=group_dim, output_dim=0)
        # Not split, not used: each part of a fused layer writes its own (N, K) over it.
        self.add_param(layer, "weight_shape", (2,), torch.int64, loader, input_dim=None, output_dim=None)
        if self.scheme.zero_points:
            for size in layer.output_partition_sizes:
                if size % pf:
                    raise ValueError(f"an output part of {size} features does not pack into zero-point "
                                     f"words of {pf}")
            self.add_param(layer, "weight_zero_point", (out_features // pf, group_rows), torch.int32, loader,
                           input_dim=group_dim, output_dim=0, packed_dim=0, packed_factor=pf)
        if self.wconfig.act_order:
            if len(layer.output_partition_sizes) > 1:
                loader = same_for_every_part(loader, "weight_g_idx", self.prefix)
            self.add_param(layer, "weight_g_idx", (in_features,), torch.int32, loader, input_dim=0,
                           output_dim=None)

    def unpack(self, layer):
        bits, k = self.scheme.bits, self.wconfig.in_features
        q = unpack_int32(layer.weight_packed.data, bits, dim=1, count=k).t()
        zeros = None
        if self.scheme.zero_points:
            zeros = unpack_int32(layer.weight_zero_point.data, bits, dim=0).t()
        g_idx = layer.weight_g_idx.data if self.wconfig.act_order else None
        return q, layer.weight_scale.data.t(), zeros, g_idx

    def dummy_value(self, name, param, layer, generator):
        if name == "weight_g_idx":
            return dummy_g_idx(layer, param, self.scheme.group_size)
        if name == "weight_shape":
            return torch.tensor([self.wconfig.out_features, self.wconfig.in_features])
        if name == "weight_zero_point":  # signed zero points near 0 keep |W| small
            z = torch.randint(-2, 3, (param.shape[0] * 32 // self.scheme.bits, param.shape[1]),
                              generator=generator) + 2 ** (self.scheme.bits - 1)
            return pack_int32(z, self.scheme.bits, dim=0)
        return None


def _scheme_of(group_name: str, weights: dict) -> WNA16Scheme:
    where = f"config group {group_name!r}"
    if weights.get("type", "int") != "int":
        raise QuantizationError(f"{where}: {weights.get('type')} weights are not supported (int)")
    bits = int(weights.get("num_bits", 4))
    if bits not in (4, 8):
        raise QuantizationError(f"{where}: {bits}-bit weights are not supported (4, 8)")
    strategy = weights.get("strategy", "group")
    if strategy == "channel":
        group = -1
    elif strategy == "group":
        group = int(weights.get("group_size") or 128)
    else:
        raise QuantizationError(f"{where}: strategy {strategy!r} is not supported (group, channel)")
    if weights.get("dynamic"):
        raise QuantizationError(f"{where}: dynamic weight quantization is not supported")
    actorder = weights.get("actorder")
    if actorder not in (None, "group", "weight", "static", False):
        raise QuantizationError(f"{where}: actorder {actorder!r} is not supported")
    # "weight"/"static" act-order keeps groups contiguous in the stored order: no g_idx.
    return WNA16Scheme(bits, group, zero_points=not weights.get("symmetric", True),
                       act_order=actorder == "group" and group != -1)


def _fp8_scheme_of(group_name: str, fmt: str, weights: dict, inputs: dict | None,
                   outputs: dict | None) -> FP8Scheme | str:
    """The FP8 scheme of a ``float-quantized`` group (llm-compressor's FP8 presets), or the
    reason it is refused."""
    if fmt != "float-quantized":
        return f"float weights in format {fmt!r} are not supported (float-quantized)"
    if int(weights.get("num_bits", 8)) != 8:
        return f"{weights.get('num_bits')}-bit float weights are not supported (FP8: 8)"
    if weights.get("strategy") not in ("channel", "tensor") or weights.get("dynamic"):
        return (f"FP8 weights with strategy {weights.get('strategy')!r} are not supported "
                f"(static channel or tensor scales)")
    if outputs:
        return "quantized output activations are not supported"
    if not inputs:
        return FP8Scheme(activations=None)
    if inputs.get("type") != "float" or int(inputs.get("num_bits", 8)) != 8:
        return "FP8 weights with non-FP8 activations are not supported"
    if inputs.get("dynamic") and inputs.get("strategy") == "token":
        return FP8Scheme(activations="dynamic")
    if not inputs.get("dynamic") and inputs.get("strategy") == "tensor":
        return FP8Scheme(activations="static")
    return (f"FP8 activations {'dynamic' if inputs.get('dynamic') else 'static'} per "
            f"{inputs.get('strategy')} are not supported (dynamic per token, static per tensor)")


class CompressedTensorsConfig(QuantizationConfig):
    """``quant_method: compressed-tensors`` (llm-compressor's checkpoints)."""

    name = "compressed-tensors"
    requires_checkpoint_config = True

    def __init__(self, kernels, groups: list[tuple[str, list[str], WNA16Scheme | str]], ignore: list[str]):
        super().__init__(kernels)
        self.groups, self.ignore = groups, ignore

    @classmethod
    def from_config(cls, config, kernels=None):
        config = config or {}
        # Parts of the config genserve would otherwise drop without a word.
        for key, what in (("kv_cache_scheme", "a quantized KV cache (use --kv-cache-dtype)"),
                          ("sparsity_config", "sparse weights"), ("transform_config", "weight transforms")):
            if config.get(key):
                raise QuantizationError(f"compressed-tensors {key}: {what} is not supported")
        default_format = config.get("format", "pack-quantized")
        groups = []
        for name, group in (config.get("config_groups") or {}).items():
            fmt = group.get("format") or default_format
            weights = group.get("weights")
            if weights and weights.get("type") == "float":
                scheme = _fp8_scheme_of(name, fmt, weights, group.get("input_activations"),
                                        group.get("output_activations"))
            elif group.get("input_activations") or group.get("output_activations"):
                scheme = "quantized activations (W8A8/W4A8) are not supported, only weight-only schemes"
            elif fmt != "pack-quantized":
                scheme = f"format {fmt!r} is not supported (pack-quantized)"
            elif not weights:
                scheme = "a group without weights"
            else:
                scheme = _scheme_of(name, weights)
            groups.append((name, list(group.get("targets") or []), scheme))
        if not groups:
            raise QuantizationError("compressed-tensors config has no config_groups")
        return cls(kernels, groups, list(config.get("ignore") or []))

    def _scheme_for(self, name: str):
        if any(matches(name, pattern) for pattern in self.ignore):
            return None
        for group, targets, scheme in self.groups:
            if any(matches(name, t) for t in targets):
                if isinstance(scheme, str):
                    raise QuantizationError(f"layer {name} (config group {group!r}): {scheme}")
                return scheme
        return None

    def get_quant_method(self, layer, prefix):
        scheme = decide(prefix, self._scheme_for)
        if isinstance(scheme, FP8Scheme):
            return FP8CheckpointLinear(scheme, self.kernels, prefix)
        return None if scheme is None else CompressedTensorsWNA16Method(scheme, self.kernels, prefix)
