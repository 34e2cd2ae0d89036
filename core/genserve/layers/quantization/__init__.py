"""Weight quantization: per-layer configs and methods, checkpoint formats, mixed-precision kernels."""

from genserve.layers.quantization.base import (
                                               LinearKernelChooser,
                                               QuantizationConfig,
                                               QuantizationError,
                                               QuantMethod,
                                               UnquantizedLinear,
)

__all__ = ["LinearKernelChooser", "QuantMethod", "QuantizationConfig", "QuantizationError",
           "UnquantizedLinear"]
