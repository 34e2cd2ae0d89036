"""The few torch-neuronx / torch_xla calls the backend makes, behind one small object.

Everything device-specific goes through ``XlaApi``, imported only once the backend is chosen;
tests on CPU hand the runner a stand-in with the same methods.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util

import torch

INSTALL_NEURON = ("pip install torch-neuronx neuronx-cc "
                  "--extra-index-url=https://pip.repos.neuron.amazonaws.com")


class MissingVendorLibrary(ImportError):
    """A library this backend needs is not installed; the message says how to install it."""


def neuronx_installed() -> bool:
    return importlib.util.find_spec("torch_neuronx") is not None  # no import: it is heavy


def neuron_devices() -> list[str]:
    # The Neuron driver exposes one /dev/neuronN per Neuron device (Inf2, Trn1, Trn2).
    return sorted(glob.glob("/dev/neuron[0-9]*"))


class XlaApi:
    """torch_xla's lazy-tensor device as set up by torch-neuronx (PJRT device NEURON)."""

    def __init__(self):
        try:
            importlib.import_module("torch_neuronx")  # registers the Neuron PJRT plugin
            self.xm = importlib.import_module("torch_xla.core.xla_model")
        except ImportError as exc:
            raise MissingVendorLibrary(
                f"backend 'neuron' needs torch-neuronx and torch-xla ({exc}): {INSTALL_NEURON}"
            ) from exc

    def device(self) -> torch.device:
        return self.xm.xla_device()

    def mark_step(self) -> None:
        """Cut the lazy graph here: compile it (once per distinct graph) and run it."""
        self.xm.mark_step()

    def wait_device_ops(self) -> None:
        self.xm.wait_device_ops()

    def memory_info(self, device) -> tuple[int, int] | None:
        """(free, total) bytes of the device's HBM, or None where the runtime does not say."""
        try:
            info = self.xm.get_memory_info(device)
        except Exception:  # not every PJRT plugin implements it
            return None
        if "bytes_limit" in info:  # torch_xla >= 2.5
            return info["bytes_limit"] - info["bytes_used"], info["bytes_limit"]
        if "kb_total" in info:
            return info["kb_free"] * 1024, info["kb_total"] * 1024
        return None

    def register_collectives(self) -> None:
        """Make "xla" a torch.distributed backend (init_process_group("xla"))."""
        importlib.import_module("torch_xla.distributed.xla_backend")
