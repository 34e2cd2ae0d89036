"""``IpexBackend``: Intel GPUs (XPU) and, failing those, x86 CPUs, with IPEX's kernels."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from genserve.args import Flag
from genserve.backends.base import Backend
from genserve.backends.options import BackendOptions, backend_flag
from genserve_ipex.vendor import INSTALL_IPEX, import_ccl, ipex_installed, x86_cpu, xpu_present

logger = logging.getLogger(__name__)

# Kept out of the XPU KV-cache budget for activations, logits and allocator slack.
ACTIVATION_RESERVE_BYTES = 1 << 30
ACTIVATION_RESERVE_SHARE = 0.05


@dataclass(frozen=True)
class IpexOptions(BackendOptions):
    """IPEX's own flag on top of the shared options."""

    device: str | None = backend_flag(Flag(
        "--ipex-device", str, None, "Device of the ipex backend: xpu or cpu (default: xpu when an "
        "Intel GPU is present, else cpu)", choices=("xpu", "cpu")))


class IpexBackend(Backend):
    name = "ipex"
    # Below cuda/rocm (an Intel GPU and an NVIDIA one rarely share a host; if they do, CUDA
    # is the tested path), above the plain cpu backend.
    priority = 50
    attention_preference = ("ipex_paged", "torch")
    # torch's packed int4/int8 CPU matmuls first: on the 2-core AMD EPYC (AVX512-BF16) they
    # measured 20-100x faster at one row than IPEX 2.8's WOQ linear (README, "Measured").
    # ipex_woq takes the layers they decline (shapes, 8-bit groups, fp32 4-bit without a
    # compute dtype), ahead of the reference that dequantizes the whole weight on every call.
    # On an XPU all three CPU kernels decline and the reference runs.
    linear_kernel_preference = ("cpu_int4pack", "cpu_int8pack", "ipex_woq", "torch_wna16")
    distributed_backend = "ccl"

    options_cls = IpexOptions

    def __init__(self, options: IpexOptions | None = None):
        super().__init__(options)
        self._index = 0  # tensor-parallel ranks move to their own XPU in set_device
        # XPU when there is one; --ipex-device cpu forces the CPU path.
        self._device_type = self.options.device or ("xpu" if xpu_present() else "cpu")

    @classmethod
    def is_available(cls) -> bool:
        return ipex_installed() and (xpu_present() or x86_cpu())

    @classmethod
    def unavailable_reason(cls) -> str:
        if not ipex_installed():
            return f"backend 'ipex' needs intel_extension_for_pytorch, which is not installed: {INSTALL_IPEX}"
        return ("backend 'ipex' found no Intel GPU (torch.xpu.is_available() is False) "
                "and this CPU is not x86-64")

    @classmethod
    def device_count(cls) -> int:
        """Intel GPUs this process sees (--sharded); the CPU path counts as one device."""
        return torch.xpu.device_count() if xpu_present() else 1

    @property
    def device(self) -> torch.device:
        if self._device_type == "xpu":
            return torch.device("xpu", self._index)
        return torch.device("cpu")

    @property
    def default_dtype(self) -> torch.dtype:
        # XPU: bf16, what its matrix engines are built for. CPU: fp32, as the core cpu backend,
        # so that the default keeps token parity with transformers (bf16 drifts: docs/benchmarks.md);
        # --dtype bfloat16 is the faster opt-in.
        return torch.bfloat16 if self._device_type == "xpu" else torch.float32

    def set_device(self, rank: int) -> None:
        """Bind a tensor-parallel worker to XPU ``rank`` and register the "ccl" collectives."""
        if self._device_type == "xpu":
            self._index = rank
            torch.xpu.set_device(rank)
        import_ccl(self._device_type)

    def synchronize(self) -> None:
        if self._device_type == "xpu":
            torch.xpu.synchronize(self.device)

    def memory_budget(self) -> int:
        if self._device_type == "cpu":
            from genserve.backends.cpu import CpuBackend

            return CpuBackend().memory_budget()
        free, total = self._xpu_memory()
        fraction = self.options.memory_fraction or 1.0
        reserve = max(ACTIVATION_RESERVE_BYTES, int(total * ACTIVATION_RESERVE_SHARE))
        budget = max(0, int(free * fraction) - reserve)
        logger.info("xpu memory: %.1f GiB free of %.1f GiB, fraction %.2f, KV-cache budget %.1f GiB",
                    free / 2**30, total / 2**30, fraction, budget / 2**30)
        return budget

    def _xpu_memory(self) -> tuple[int, int]:
        mem_get_info = getattr(torch.xpu, "mem_get_info", None)
        if mem_get_info is not None:  # torch >= 2.6
            return mem_get_info(self.device)
        total = torch.xpu.get_device_properties(self._index).total_memory
        return total - torch.xpu.memory_reserved(self._index), total

    def create_model_runner(self, model, config, *, lora=None, peers=None):
        from genserve_ipex.runner import IpexModelRunner

        return IpexModelRunner(model, config, self, lora=lora, peers=peers)

    def describe(self) -> dict:
        info = super().describe()
        if self._device_type == "xpu" and xpu_present():
            info["gpu"] = torch.xpu.get_device_name(self._index)
        return info
