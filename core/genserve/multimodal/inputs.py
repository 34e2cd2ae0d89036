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
    ``embeds``: what the model's ``embed_images`` returned for this request, once the engine
    ran the vision encoder (once per request: later prefill chunks and recomputation after
    preemption reuse it): [len(positions), hidden] for the models that write image rows over
    placeholders; for cross-attending models (Idefics v1), the per-layer keys and values of the
    images, [cross layers, 2, images * keys per image, hidden] (``CrossImages``).
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


@dataclass
class CrossAttentionGroup:
    """The rows of one or more requests that cross-attend to their images in one batched call:
    ``num_seqs`` requests (G) of ``num_rows`` rows each (L), so one SDPA over [G, heads, L, ...].

    ``rows`` [G*L] (int64): their flat batch rows, request-major. ``states``: per request, its
    ``MultiModalInputs.embeds`` [layers, 2, N_s, dim] (keys and values of all its images).
    ``key_mask`` [G, L, N] bool (N: the group's most keys): the keys each row attends to
    (padding keys False). ``gate`` [G*L, 1] in the model's dtype: 0 for rows that attend to no
    image, whose cross-attention output is zeroed (transformers' ``cross_attention_gate``;
    their ``key_mask`` holds all of the request's keys, so the softmax stays finite)."""

    rows: torch.Tensor
    states: list[torch.Tensor]
    key_mask: torch.Tensor
    gate: torch.Tensor
    num_seqs: int
    num_rows: int

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values of the group's requests, padded to the group's most
        keys: two [G, N, dim] tensors (padding rows zero, masked out by ``key_mask``)."""
        n = self.key_mask.shape[-1]
        first = self.states[0]
        kv = first.new_zeros(self.num_seqs, 2, n, first.shape[-1])
        for i, state in enumerate(self.states):
            kv[i, :, :state.shape[2]] = state[layer]
        return kv[:, 0], kv[:, 1]


@dataclass
class CrossImages:
    """A step's cross-attention inputs (``ForwardBatch.images`` of cross-attending models): the
    groups of rows that attend to images. Rows in no group attend to none (output zero)."""

    groups: list[CrossAttentionGroup]


# What ``ForwardBatch.images`` holds: image rows to merge, or cross-attention inputs.
StepImages = ImageRows | CrossImages
