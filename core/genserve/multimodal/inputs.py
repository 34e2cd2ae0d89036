"""What a request with images carries through the engine (a leaf: torch and hashlib only)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class MultiModalInputs:
    """A prompt's images, as the model's processor prepared them.

    ``data``: the processor's tensors other than the token ids (Llava-Next: ``pixel_values``
    [images, patches, 3, H, W] and ``image_sizes`` [images, 2]), on the CPU. ``positions``:
    the prompt indices of the image placeholder tokens, ascending; the model's
    ``embed_images`` returns exactly one embedding row per position. ``content_hash``: the
    SHA-256 of ``data``, what the prefix cache keys the prompt's KV on besides its tokens.
    ``embeds``: [len(positions), hidden] once the engine ran the vision encoder (once per
    request: later prefill chunks and recomputation after preemption reuse it).
    """

    data: dict[str, torch.Tensor]
    positions: list[int]
    num_images: int
    content_hash: str = ""
    embeds: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        if not self.content_hash:
            self.content_hash = content_hash(self.data)


def content_hash(data: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, shapes, dtypes and bytes (what the model sees)."""
    h = hashlib.sha256()
    for name in sorted(data):
        t = data[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class ImageRows:
    """A step's image embeddings and the flat batch rows they replace: ``rows`` [R] (int64,
    on the model's device), ``embeds`` [R, hidden]."""

    rows: torch.Tensor
    embeds: torch.Tensor
