"""FP8 checkpoints as tools publish them: float8_e4m3fn weights with their scales, served by the
``FP8LinearKernel`` the backend prefers (``fp8_kernels.py``).

Read here (the formats' config keys are parsed by ``compressed_tensors.py`` and ``fp8.py``):

* compressed-tensors ``float-quantized`` (llm-compressor ``FP8_DYNAMIC``, ``FP8``): ``weight``
  float8 ``[N, K]``, ``weight_scale`` ``[N, 1]`` (``channel``) or ``[1]`` (``tensor``), and for
  static activations ``input_scale`` ``[1]``;
* ``quant_method: fp8`` (vLLM / AutoFP8 layout): ``weight``, ``weight_scale`` (one per tensor or
  per channel) and, with ``activation_scheme: static``, ``input_scale``;
* TGI's ``fbgemm_fp8``: ``weight``, ``weight_scale`` ``[N, 1]``, dynamic per-token activations.

Every scale is loaded into one value per output row (a per-tensor scale repeated over its part's
rows), so fused layers (q/k/v with three per-tensor scales) and tensor-parallel shards need no
special case, and the kernels see the canonical form ``W[n, k] = q[n, k] * s[n]`` exactly. A
fused layer's parts share one input, so they get one static input scale: the largest (vLLM's
rule). The checkpoint's activation scheme is reproduced by the CPU reference kernel (it
quantizes activations as the tool's own model does: per token, or with the static scale); the
CUDA W8A8 kernel always quantizes activations per token, dynamically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genserve.layers.quantization.base import (
    LinearKernelChooser,
    QuantizationConfig,
    QuantizationError,
    QuantMethod,
)
from genserve.layers.quantization.fp8_kernels import FP8LinearConfig, FP8LinearKernel, choose_fp8_kernel
from genserve.layers.quantization.targets import contains_module, decide
from genserve.layers.weights import materialize, set_weight_dims

ACTIVATIONS = (None, "dynamic", "static")
# The shard ids the fused layers' loaders pass (QKVParallelLinear: "q"/"k"/"v";
# MergedColumnParallelLinear: 0, 1, ...) -> the part's index in output_partition_sizes.
_QKV = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class FP8Scheme:
    """One layer's checkpoint FP8 settings: ``activations`` None (weight-only), "dynamic"
    (per-token scales computed at run time) or "static" (the checkpoint's ``input_scale``)."""

    activations: str | None = "dynamic"

    def __post_init__(self):
        if self.activations not in ACTIVATIONS:
            raise QuantizationError(f"FP8 activation scheme {self.activations!r} (supported: dynamic, static)")


def _per_row_loader(layer, loader):
    """Load a scale given per tensor (``[]``/``[1]``) or per output row (``[N]``/``[N, 1]``) as
    one float32 per row of the part, then place it like the weight's rows."""
    def load(param, loaded, shard_id=None):
        # A lazy safetensors slice of a 0-dim scale cannot be sliced with [:].
        whole = loaded if isinstance(loaded, torch.Tensor) or loaded.get_shape() else loaded[()]
        value = materialize(whole).float().reshape(-1)
        if value.numel() == 1:
            if shard_id is None:
                rows = layer.full_out_features
            else:
                index = _QKV[shard_id] if isinstance(shard_id, str) else int(shard_id)
                rows = layer.output_partition_sizes[index] * layer.tp.size
            value = value.expand(rows).contiguous()
        loader(param, value, shard_id)
    return load


class FP8CheckpointLinear(QuantMethod):
    """A linear layer whose checkpoint holds float8_e4m3fn weights and their scales."""

    name = "fp8-checkpoint"

    def __init__(self, scheme: FP8Scheme, kernels: LinearKernelChooser | None, prefix: str):
        super().__init__()
        self.scheme, self.kernels, self.prefix = scheme, kernels, prefix
        self.kernel: FP8LinearKernel | None = None

    def create_weights(self, layer, in_features, out_features, dtype, weight_loader):

        weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                    requires_grad=False)
        set_weight_dims(weight, input_dim=1, output_dim=0)
        weight.weight_loader = weight_loader
        layer.register_parameter("weight", weight)
        names = ["weight_scale"] + (["input_scale"] if self.scheme.activations == "static" else [])
        for name in names:
            scale = torch.nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
            set_weight_dims(scale, input_dim=None, output_dim=0)
            scale.weight_loader = _per_row_loader(layer, weight_loader)
            layer.register_parameter(name, scale)
        config = FP8LinearConfig(in_features, out_features, dtype, activations=self.scheme.activations)
        self.kernel = choose_fp8_kernel(self.kernels, config, self.prefix)(config)

    def process_after_loading(self, layer):
        assert self.kernel is not None  # create_weights chose it
        q, scale = layer.weight.data, layer.weight_scale.data.reshape(-1, 1)
        input_scale = None
        if self.scheme.activations == "static":
            input_scale = layer.input_scale.data.max().reshape(1)
            del layer.input_scale
        del layer.weight, layer.weight_scale
        layer.register_buffer("fp8_input_scale", input_scale, persistent=False)
        self.kernel.process_weights(layer, q, scale)

    def apply(self, layer, x, bias):
        if self.kernel is None:
            raise QuantizationError(f"layer {self.prefix or '?'}: FP8 weights used before loading")
        return self.kernel.apply(layer, x, bias)

    @torch.no_grad()
    def init_dummy(self, layer, generator):
        w = torch.empty(layer.weight.shape).normal_(0.0, 0.02, generator=generator)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 448.0
        layer.weight.copy_((w / scale[:, None]).to(torch.float8_e4m3fn))
        layer.weight_scale.copy_(scale)
        filled = {id(layer.weight), id(layer.weight_scale)}
        if self.scheme.activations == "static":
            layer.input_scale.fill_(0.01)
            filled.add(id(layer.input_scale))
        return filled


class FBGEMMFP8Config(QuantizationConfig):
    """TGI's ``fbgemm_fp8`` checkpoints (transformers' ``FbgemmFp8Config``): per-channel FP8
    weights, activations quantized per token at run time. ``modules_to_not_convert`` stay
    dense. ``activation_scale_ub`` (fbgemm's cap on a token's activation scale, against
    outliers) is not applied: every kernel here scales each token by its own maximum."""

    name = "fbgemm_fp8"
    requires_checkpoint_config = True

    def __init__(self, kernels=None, skip: list[str] | None = None):
        super().__init__(kernels)
        self.skip = skip or []

    @classmethod
    def from_config(cls, config, kernels=None):
        return cls(kernels, list((config or {}).get("modules_to_not_convert") or []))

    def get_quant_method(self, layer, prefix):
        if decide(prefix, lambda name: any(contains_module(name, m) for m in self.skip)):
            return None
        return FP8CheckpointLinear(FP8Scheme("dynamic"), self.kernels, prefix)
