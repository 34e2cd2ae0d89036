"""Host <-> device copies that don't wait for the device.

A copy from pageable host memory waits for the work already queued on the device, which
would undo overlapped steps; staging through pinned memory keeps both directions asynchronous.
"""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (on the host) on ``device``, the copy queued rather than waited for."""
    if torch.device(device).type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def download(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start copying ``t`` to pinned host memory; read it only after an event recorded later."""
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
