"""The CPU backend: plain PyTorch, always available, the reference for every other."""

from __future__ import annotations

import os

import torch

from genserve.backends.base import Backend
from genserve.hookspecs import hookimpl


class CpuBackend(Backend):
    name = "cpu"
    priority = 0
    attention_preference = ("torch", "reference")
    # torch's packed int4/int8 CPU matmuls first; the dequantizing reference takes the rest.
    linear_kernel_preference = ("cpu_int4pack", "cpu_int8pack", "torch_wna16")
    distributed_backend = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def default_dtype(self) -> torch.dtype:
        # fp32: bf16 matmuls are slower than fp32 on CPUs without AMX, and fp32 keeps
        # token-for-token parity with transformers.
        return torch.float32

    def memory_budget(self) -> int:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 4 << 30
        # Leave most of the RAM to the OS, the tokenizer and activations.
        return int(min(avail * 0.25, 2 << 30))


@hookimpl
def genserve_register_backends(register):
    register(CpuBackend.name, CpuBackend)
