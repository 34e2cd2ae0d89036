"""Quantizers and linear kernels that ship with the core, registered like any plugin's."""

from genserve.hookspecs import hookimpl
from genserve.layers.quantization.awq import AWQConfig
from genserve.layers.quantization.compressed_tensors import CompressedTensorsConfig
from genserve.layers.quantization.cpu_kernels import (
    CpuInt4PackKernel,
    CpuInt8PackKernel,
)
from genserve.layers.quantization.fp8 import FP8Config
from genserve.layers.quantization.fp8_checkpoint import FBGEMMFP8Config
from genserve.layers.quantization.gguf import GGUFConfig
from genserve.layers.quantization.gptq import GPTQConfig
from genserve.layers.quantization.int8 import EETQConfig
from genserve.layers.quantization.kernels import TorchWNA16Kernel
from genserve.layers.quantization.marlin import MarlinConfig


@hookimpl
def genserve_register_quantizers(register):
    for cls in (FP8Config, EETQConfig, GPTQConfig, AWQConfig, CompressedTensorsConfig, MarlinConfig,
                GGUFConfig, FBGEMMFP8Config):
        register(cls.name, cls)


@hookimpl
def genserve_register_linear_kernels(register):
    for cls in (TorchWNA16Kernel, CpuInt4PackKernel, CpuInt8PackKernel):
        register(cls.name, cls)
