"""Finding and importing Intel's libraries, with the install command in every error."""

from __future__ import annotations

import importlib
import importlib.util
import platform

import torch

IPEX_MODULE = "intel_extension_for_pytorch"
XPU_INDEX = "https://pytorch-extension.intel.com/release-whl/stable/xpu/us/"
CPU_INDEX = "https://pytorch-extension.intel.com/release-whl/stable/cpu/us/"
INSTALL_IPEX = (
    "pip install intel-extension-for-pytorch (CPU), or for Intel GPUs "
    f"pip install intel-extension-for-pytorch --extra-index-url {XPU_INDEX}; "
    "its version must match the installed torch"
)


class MissingVendorLibrary(ImportError):
    """A library this backend needs is not installed; the message says how to install it."""


def ipex_installed() -> bool:
    # find_spec does not import: importing IPEX loads large native libraries.
    return importlib.util.find_spec(IPEX_MODULE) is not None


def xpu_present() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def x86_cpu() -> bool:
    # IPEX's CPU kernels are x86-64 only (AVX2 at least, AVX-512/AMX for speed).
    return platform.machine().lower() in ("x86_64", "amd64")


def import_ipex():
    try:
        return importlib.import_module(IPEX_MODULE)
    except ImportError as exc:
        raise MissingVendorLibrary(
            f"genserve-ipex needs {IPEX_MODULE}, which could not be imported ({exc}): {INSTALL_IPEX}"
        ) from exc


def import_ccl(device_type: str):
    """Register the "ccl" torch.distributed backend (oneCCL bindings)."""
    try:
        return importlib.import_module("oneccl_bindings_for_pytorch")
    except ImportError as exc:
        index = XPU_INDEX if device_type == "xpu" else CPU_INDEX
        raise MissingVendorLibrary(
            "tensor parallelism on backend 'ipex' uses the 'ccl' collective backend from "
            f"oneccl_bindings_for_pytorch, which could not be imported ({exc}): "
            f"pip install oneccl_bind_pt --extra-index-url {index}"
        ) from exc
