"""The few habana_frameworks calls the backend makes, behind one small object.

Everything device-specific goes through ``HpuApi``, imported only once the backend is chosen;
tests on CPU hand the runner a stand-in with the same methods.
"""

from __future__ import annotations

import importlib
import importlib.util

INSTALL_GAUDI = (
    "install the Intel Gaudi PyTorch packages (habana-torch-plugin, with Gaudi's own torch "
    "build): ./habanalabs-installer.sh install --type pytorch, or use the Intel Gaudi PyTorch "
    "container; they are not on PyPI"
)


class MissingVendorLibrary(ImportError):
    """A library this backend needs is not installed; the message says how to install it."""


def habana_installed() -> bool:
    return importlib.util.find_spec("habana_frameworks") is not None  # no import: it is heavy


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MissingVendorLibrary(f"backend 'gaudi' needs {name} ({exc}): {INSTALL_GAUDI}") from exc


class HpuApi:
    def __init__(self):
        self.hpu = _import("habana_frameworks.torch.hpu")
        self.core = _import("habana_frameworks.torch.core")

    def is_available(self) -> bool:
        return bool(self.hpu.is_available())

    def is_lazy(self) -> bool:
        """Lazy mode (PT_HPU_LAZY_MODE=1): ops queue up until mark_step; HPU graphs need it."""
        return bool(_import("habana_frameworks.torch.utils.internal").is_lazy())

    def mark_step(self) -> None:
        """Lazy mode: compile (once per graph) and launch the ops queued so far."""
        if self.is_lazy():
            self.core.mark_step()

    def wrap_in_hpu_graph(self, module):
        """Capture ``module.forward`` per distinct input shapes and replay it."""
        return self.hpu.wrap_in_hpu_graph(module)

    def device_count(self) -> int:
        return int(self.hpu.device_count())

    def mem_get_info(self) -> tuple[int, int]:
        return self.hpu.mem_get_info()

    def synchronize(self) -> None:
        self.hpu.synchronize()

    def register_collectives(self) -> None:
        """Make "hccl" a torch.distributed backend."""
        _import("habana_frameworks.torch.distributed.hccl")

    def fused_sdpa(self):
        """Habana's FusedSDPA autograd function, or None on a stack without it."""
        try:
            return importlib.import_module("habana_frameworks.torch.hpex.kernels").FusedSDPA
        except (ImportError, AttributeError):
            return None
