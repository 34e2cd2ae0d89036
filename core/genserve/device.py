"""Host <-> device copies that don't wait for the device (a leaf module: the engine's runner
and sampler and the LoRA manager all upload through it).

A copy from pageable host memory waits for the work already queued on the device, which
would undo overlapped steps; staging through pinned memory keeps both directions asynchronous.

The pinned buffers are kept and reused round-robin rather than allocated per copy: a step's
uploads change size every step (the block tables grow with the sequences), and each size the
caching host allocator had not seen yet cost a cudaHostAlloc that stalled the step behind the
one running (by how much: docs/benchmarks.md, "Measurements behind design choices").
"""

from __future__ import annotations

import torch

SLOTS = 16  # buffers per direction: far more than the copies of the steps in flight
MIN_BYTES = 1 << 20  # a slot's first size; grown by doubling when a copy needs more


class _Slot:
    __slots__ = ("buf", "event", "held")

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.event = None  # recorded after the slot's latest copy
        self.held = False  # a download not read yet


class PinnedRing:
    def __init__(self, device: torch.device):
        self.device = device
        self.slots = [_Slot() for _ in range(SLOTS)]
        self.next = 0

    def _take(self, nbytes: int) -> tuple[_Slot, torch.Tensor]:
        """A free slot whose pinned buffer holds at least ``nbytes``, and that buffer."""
        for _ in range(SLOTS):
            slot = self.slots[self.next]
            self.next = (self.next + 1) % SLOTS
            if not slot.held:
                break
        else:  # every slot holds an unread download: start another buffer set
            slot = _Slot()
        if slot.event is not None:
            slot.event.synchronize()  # its last copy was queued SLOTS copies ago: long done
        if slot.buf is None or slot.buf.numel() < nbytes:
            size = max(MIN_BYTES, 2 * (slot.buf.numel() if slot.buf is not None else 0), nbytes)
            slot.buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return slot, slot.buf

    def _record(self, slot: _Slot) -> None:
        if slot.event is None:
            slot.event = torch.Event(device=self.device)
        slot.event.record()

    def upload(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        slot, buf = self._take(nbytes)
        staged = buf[:nbytes].view(t.dtype).view(t.shape)
        staged.copy_(t)
        out = staged.to(self.device, non_blocking=True)
        self._record(slot)
        return out

    def download(self, t: torch.Tensor) -> tuple[torch.Tensor, _Slot]:
        """``t``'s copy on the host (valid after a later event) and the slot to ``release``."""
        nbytes = t.numel() * t.element_size()
        slot, buf = self._take(nbytes)
        host = buf[:nbytes].view(t.dtype).view(t.shape)
        host.copy_(t, non_blocking=True)
        self._record(slot)
        slot.held = True
        return host, slot


_RINGS: dict[torch.device, PinnedRing] = {}


def _ring(device: torch.device) -> PinnedRing:
    ring = _RINGS.get(device)
    if ring is None:
        ring = _RINGS[device] = PinnedRing(device)
    return ring


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (on the host) on ``device``, the copy queued rather than waited for."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    return _ring(device).upload(t)


def download(t: torch.Tensor | None) -> tuple[torch.Tensor | None, object | None]:
    """Start copying ``t`` to pinned host memory. Read the copy only after an event recorded
    later, then pass the second value to ``release`` so its buffer can be reused."""
    if t is None or t.device.type == "cpu":
        return t, None
    return _ring(t.device).download(t)


def release(handle) -> None:
    if handle is not None:
        handle.held = False
