"""FP8 quantization (``--quantize fp8``): weights stored as float8_e4m3fn with a per-channel scale.

Weights load in the model's dtype and are quantized once after loading, halving the bytes a
decode step reads. The matmul is an ``FP8LinearKernel`` (``fp8_kernels.py``) picked from the
backend's ``linear_kernel_preference``: on CUDA (sm89+) genserve-cuda's W8A8 ``torch._scaled_mm``
kernel, elsewhere (and for shapes the fast kernels refuse) the dequantizing reference.
"""

from __future__ import annotations

from genserve.layers.quantization.base import (
    LinearKernelChooser,
    PerLayerQuantConfig,
    QuantizationError,
    UnquantizedLinear,
)
from genserve.layers.quantization.fp8_checkpoint import FP8CheckpointLinear, FP8Scheme
from genserve.layers.quantization.fp8_kernels import (
    FP8_MAX,
    FP8LinearConfig,
    FP8LinearKernel,
    TorchFP8Kernel,
    choose_fp8_kernel,
    quantize_fp8_per_channel,
)
from genserve.layers.quantization.targets import contains_module, decide

__all__ = ["FP8_MAX", "FP8Config", "FP8WeightOnly", "choose_fp8_kernel", "quantize_fp8_per_channel"]



class FP8WeightOnly(UnquantizedLinear):
    """One layer's FP8 weights; the kernel is chosen in ``create_weights`` (the reference when
    built without a chooser, or before ``create_weights`` ran)."""

    name = "fp8"

    def __init__(self, quant_config: dict | None = None, kernels: LinearKernelChooser | None = None,
                 prefix: str = ""):
        super().__init__(quant_config)
        self.kernels, self.prefix = kernels, prefix
        self.kernel: FP8LinearKernel | None = None

    def create_weights(self, layer, in_features, out_features, dtype, weight_loader):
        super().create_weights(layer, in_features, out_features, dtype, weight_loader)
        config = FP8LinearConfig(in_features, out_features, dtype)
        self.kernel = choose_fp8_kernel(self.kernels, config, self.prefix)(config)

    def process_after_loading(self, layer):
        weight = layer.weight.data
        if self.kernel is None:  # built outside a model (tests): the reference
            out_features, in_features = weight.shape
            self.kernel = TorchFP8Kernel(FP8LinearConfig(in_features, out_features, weight.dtype))
        q, scale = quantize_fp8_per_channel(weight)
        del layer.weight
        self.kernel.process_weights(layer, q, scale)

    def apply(self, layer, x, bias):
        if self.kernel is None:
            raise QuantizationError(f"layer {self.prefix or '?'}: FP8 weights used before loading")
        return self.kernel.apply(layer, x, bias)


class FP8Config(PerLayerQuantConfig):
    """``--quantize fp8``: every linear layer quantized at load (``lm_head`` stays dense); or a
    checkpoint with ``quant_method: fp8`` (vLLM / AutoFP8 layout, ``fp8_checkpoint.py``): its
    ``activation_scheme`` ("dynamic" or "static") and ``ignored_layers`` (also read as
    ``modules_to_not_convert``) are honoured; block-wise scales (``weight_block_size``) are
    refused."""

    name = "fp8"
    method_cls = FP8WeightOnly
    accepts_checkpoint_config = True

    @classmethod
    def from_config(cls, config, kernels=None):
        if config:
            if config.get("weight_block_size"):
                raise QuantizationError(f"fp8 checkpoint with block-wise scales (weight_block_size "
                                        f"{config['weight_block_size']}) is not supported; per-tensor and "
                                        f"per-channel weight_scale are")
            FP8Scheme(config.get("activation_scheme", "dynamic"))  # refuses unknown schemes
        return cls(kernels, config)

    def get_quant_method(self, layer, prefix):
        if not self.config:
            return FP8WeightOnly(self.config, self.kernels, prefix)
        ignored = list(self.config.get("ignored_layers") or []) + list(self.config.get("modules_to_not_convert") or [])
        if decide(prefix, lambda name: any(contains_module(name, m) for m in ignored)):
            return None
        return FP8CheckpointLinear(FP8Scheme(self.config.get("activation_scheme", "dynamic")), self.kernels, prefix)
