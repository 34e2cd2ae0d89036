"""Quantizers that ship with the core, registered like any plugin's."""

from genserve.hookspecs import hookimpl
from genserve.layers.quantization.base import UnquantizedLinear
from genserve.layers.quantization.fp8 import FP8WeightOnly
from genserve.layers.quantization.int8 import Int8WeightOnly
from genserve.layers.quantization.kernels import TorchWNA16Kernel


@hookimpl
def genserve_register_quantizers(register):
    register(UnquantizedLinear.name, UnquantizedLinear)
    register(FP8WeightOnly.name, FP8WeightOnly)
    register(Int8WeightOnly.name, Int8WeightOnly)


@hookimpl
def genserve_register_linear_kernels(register):
    register(TorchWNA16Kernel.name, TorchWNA16Kernel)
