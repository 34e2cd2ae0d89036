"""Entry point of genserve-cuda: registers the backend, its attention, its linear kernels and its
LoRA method.

Importing this module must stay cheap and work on machines with no GPU or triton.
"""

from __future__ import annotations

from genserve.hookspecs import hookimpl
from genserve_cuda.attention.flash_attn import FlashAttnPaged
from genserve_cuda.attention.triton_paged import TritonPagedAttention
from genserve_cuda.backend import CudaBackend
from genserve_cuda.lora import TritonSGMVLoRA
from genserve_cuda.quant.scaled_mm_fp8 import CudaScaledMMFP8Kernel
from genserve_cuda.quant.triton_w4a16 import TritonW4A16Kernel


@hookimpl
def genserve_register_backends(register):
    register(CudaBackend.name, CudaBackend)


@hookimpl
def genserve_register_attention(register):
    register(TritonPagedAttention.name, TritonPagedAttention)
    register(FlashAttnPaged.name, FlashAttnPaged)


@hookimpl
def genserve_register_linear_kernels(register):
    register(TritonW4A16Kernel.name, TritonW4A16Kernel)
    register(CudaScaledMMFP8Kernel.name, CudaScaledMMFP8Kernel)


@hookimpl
def genserve_register_lora(register):
    register(TritonSGMVLoRA.name, TritonSGMVLoRA)
