"""``RocmBackend``: AMD GPUs. PyTorch's ROCm build speaks the torch.cuda API, so this is the
CUDA backend with another availability check, no flash-attn and graphs opt-in.

It inherits the CUDA backend's kernels: the Triton attention, norm and MoE kernels, and
``triton_w4a16`` for GPTQ/AWQ/compressed-tensors 4/8-bit weights, which dequantizes with its
pure-Triton path here (its inline-PTX path is NVIDIA-only, ``ptx_available``). The FP8
``cuda_fp8_scaled_mm`` refuses ROCm (float8_e4m3fnuz there), so FP8 layers take the reference.
None of this has run on AMD hardware: no ROCm GPU is available to the project.
"""

from __future__ import annotations

import torch

from genserve_cuda.backend import CudaBackend, is_rocm_build


class RocmBackend(CudaBackend):
    name = "rocm"
    priority = 90  # a machine has one GPU stack; the order only matters for broken installs
    attention_preference = ("triton", "torch")
    distributed_backend = "nccl"  # RCCL answers to PyTorch's "nccl" on ROCm

    @classmethod
    def is_available(cls) -> bool:
        return is_rocm_build() and torch.cuda.is_available()

    @classmethod
    def unavailable_reason(cls) -> str:
        if not is_rocm_build():
            return (f"backend 'rocm' needs a ROCm build of PyTorch; torch {torch.__version__} "
                    "is not one (use --backend cuda on NVIDIA)")
        return "backend 'rocm' found no AMD GPU (check the driver and HIP_VISIBLE_DEVICES)"

    def graph_sizes(self) -> tuple[int, ...]:
        # HIP graph capture of these kernels is untested: only when asked for.
        if self.options.graph_sizes is None:
            return ()
        return super().graph_sizes()
