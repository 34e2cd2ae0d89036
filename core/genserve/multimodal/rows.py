"""The image rows of one engine step: which flat batch rows are image placeholders, and the
embeddings that replace them.

A request's images go through the vision encoder once, at the first step that computes one of
its placeholder tokens; every request that needs it in that step is encoded in one call
(``CausalLM.embed_images``). The embeddings stay on the request (``MultiModalInputs.embeds``),
so later prefill chunks, and recomputation after preemption, take their rows from there.
Models that cross-attend to their images instead (Idefics v1) build their step inputs in
``genserve.multimodal.cross``; the model picks (``CausalLM.step_images``).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Protocol

import torch

from genserve.multimodal.inputs import ImageRows, MultiModalInputs, StepImages

if TYPE_CHECKING:
    from genserve.engine.scheduler import ScheduledSeq


class ImageModel(Protocol):
    """What these functions use of a model (``genserve.models.base.CausalLM`` implements it;
    typed structurally so that models.base can import this module without a cycle)."""

    image_token_id: int | None

    def embed_images(self, inputs: list[MultiModalInputs]) -> list[torch.Tensor]: ...

    def step_images(self, scheduled: list[ScheduledSeq], device: torch.device) -> StepImages | None: ...


def image_rows(model: ImageModel, scheduled: list[ScheduledSeq], device: torch.device) -> StepImages | None:
    """The step's image inputs for ``scheduled`` (rows laid out as ``ModelRunner.prepare`` lays
    them: each sequence's ``num_tokens`` rows from ``seq.num_computed``, in order): None for a
    text-only model, else what the model's ``step_images`` builds (``merged_image_rows`` for
    the models that write image embeddings over placeholder rows, ``cross.cross_image_inputs``
    for those that cross-attend to the images, Idefics v1)."""
    if model.image_token_id is None:
        return None
    return model.step_images(scheduled, device)


def encode_new(model: ImageModel, inputs: list[MultiModalInputs]) -> list[MultiModalInputs]:
    """Run the vision encoder (``CausalLM.embed_images``, one batched call) for the requests
    of ``inputs`` that have no ``embeds`` yet, and keep the result on them; returns those."""
    new = list({id(mm): mm for mm in inputs if mm.embeds is None}.values())
    if new:
        for mm, embeds in zip(new, model.embed_images(new)):
            mm.embeds = embeds
    return new


def merged_image_rows(model: ImageModel, scheduled: list[ScheduledSeq], device: torch.device) -> ImageRows | None:
    """The step's ``ImageRows`` for ``scheduled``, or None when no row is an image placeholder.
    Raises ``RuntimeError`` when the model returns a different number of embeddings than a
    request has placeholders (the engine then fails that request alone)."""
    spans: list[tuple[MultiModalInputs, int, int, int]] = []  # (inputs, first row, lo, hi)
    row0 = 0
    for s in scheduled:
        mm = s.seq.params.multimodal
        if mm is not None and mm.positions:
            start = s.seq.num_computed
            lo, hi = bisect_left(mm.positions, start), bisect_left(mm.positions, start + s.num_tokens)
            if hi > lo:
                spans.append((mm, row0 - start, lo, hi))
        row0 += s.num_tokens
    if not spans:
        return None
    for mm in encode_new(model, [mm for mm, *_ in spans]):
        assert mm.embeds is not None
        if mm.embeds.shape[0] != len(mm.positions):
            embeds, mm.embeds = mm.embeds, None
            raise RuntimeError(f"the vision encoder gave {embeds.shape[0]} image embeddings for "
                               f"{len(mm.positions)} image tokens")
    rows: list[int] = []
    parts: list[torch.Tensor] = []
    for mm, offset, lo, hi in spans:
        rows += [offset + p for p in mm.positions[lo:hi]]
        assert mm.embeds is not None
        parts.append(mm.embeds[lo:hi])
    return ImageRows(torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True), torch.cat(parts))


def merge_image_rows(x: torch.Tensor, images: ImageRows | None) -> torch.Tensor:
    """The embedded rows ``x`` [T, hidden] with the step's image embeddings written over
    their placeholder rows (``ForwardBatch.images``; None: ``x`` unchanged)."""
    if images is None:
        return x
    return x.index_copy(0, images.rows, images.embeds.to(x.dtype))
