"""Weight quantization methods: the interface and the built-in registrations."""

from genserve.layers.quantization.base import QuantMethod, UnquantizedLinear

__all__ = ["QuantMethod", "UnquantizedLinear"]
