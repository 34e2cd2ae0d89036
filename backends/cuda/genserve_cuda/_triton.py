"""One place that answers "can Triton kernels run here?" without importing triton eagerly."""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on ``device``, else why not."""
    if not triton_importable():
        return "triton is not installed"
    if device.type != "cuda":
        return f"Triton kernels need a CUDA/ROCm device, not {device.type!r}"
    return None


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
