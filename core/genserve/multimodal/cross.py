"""A step's cross-attention inputs for models whose text rows attend to the request's images
through cross-attention layers instead of reading image rows in the prompt (Flamingo's gated
cross-attention, Alayrac et al. 2022; transformers' ``IdeficsForVisionText2Text``).

Which images a row attends to is the processor's ``image_attention_mask`` [1, prompt length,
images] (Idefics: the last image before the token; none before the first image or after an
end-of-sequence token). A generated token takes the last prompt token's row, as transformers'
``generate`` does (``_update_model_kwargs_for_generation`` repeats the last row).

A request's images are encoded once (``CausalLM.embed_images``, batched over the step's
requests), at the first step that computes a row attending to an image, and kept on the
request (``MultiModalInputs.embeds``: the keys and values of every cross-attention layer), so
later prefill chunks, decode steps and recomputation after preemption reuse them. Rows are
grouped by how many a request has in the step (all decode rows together, each prefill chunk
alone) so each group is one batched attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from genserve.multimodal.inputs import (
    CrossAttentionGroup,
    CrossImages,
    MultiModalInputs,
)
from genserve.multimodal.rows import encode_new

if TYPE_CHECKING:
    from genserve.engine.scheduler import ScheduledSeq
    from genserve.models.base import CausalLM

MASK_KEY = "image_attention_mask"


def row_image_mask(mm: MultiModalInputs, start: int, count: int) -> torch.Tensor:
    """bool [count, images]: the images rows ``start .. start+count-1`` of the sequence attend to
    (rows past the prompt: the last prompt row). Raises ``KeyError`` without the processor's
    ``image_attention_mask``."""
    mask = mm.data[MASK_KEY][0]
    last = mask.shape[0] - 1
    pos = torch.arange(start, start + count).clamp_(max=last)
    return mask[pos].bool()


def cross_image_inputs(model: CausalLM, scheduled: list[ScheduledSeq], device: torch.device,
                       dtype: torch.dtype) -> CrossImages | None:
    """The step's ``CrossImages`` (rows laid out as ``ModelRunner.prepare`` lays them), or None
    when no row attends to an image. Runs ``model.embed_images`` for the requests that need
    their images for the first time; each must return [layers, 2, images * keys per image,
    dim] (``RuntimeError`` otherwise: the engine then fails that request alone)."""
    entries: list[tuple[MultiModalInputs, int, torch.Tensor]] = []  # (inputs, first row, row mask)
    row0 = 0
    for s in scheduled:
        mm = s.seq.params.multimodal
        if mm is not None and mm.num_images:
            mask = row_image_mask(mm, s.seq.num_computed, s.num_tokens)
            if bool(mask.any()):
                entries.append((mm, row0, mask))
        row0 += s.num_tokens
    if not entries:
        return None
    for mm in encode_new(model, [mm for mm, *_ in entries]):
        assert mm.embeds is not None
        if mm.embeds.dim() != 4 or mm.embeds.shape[2] % mm.num_images:
            shape, mm.embeds = tuple(mm.embeds.shape), None
            raise RuntimeError(f"the vision encoder gave image keys of shape {shape} for {mm.num_images} images")
    by_rows: dict[int, list[tuple[MultiModalInputs, int, torch.Tensor]]] = {}
    for entry in entries:
        by_rows.setdefault(entry[2].shape[0], []).append(entry)
    return CrossImages([_group(members, n, device, dtype) for n, members in by_rows.items()])


def _group(members: list[tuple[MultiModalInputs, int, torch.Tensor]], num_rows: int,
           device: torch.device, dtype: torch.dtype) -> CrossAttentionGroup:
    states = [mm.embeds for mm, *_ in members]
    keys = max(state.shape[2] for state in states)  # type: ignore[union-attr]
    key_mask = torch.zeros(len(members), num_rows, keys, dtype=torch.bool)
    gate = torch.zeros(len(members), num_rows)
    rows: list[int] = []
    for i, (mm, row0, mask) in enumerate(members):
        n = mm.embeds.shape[2]  # type: ignore[union-attr]
        per_image = n // mm.num_images
        attends = mask.any(1)
        expanded = mask.repeat_interleave(per_image, dim=1)
        expanded[~attends] = True  # rows gated off: any finite softmax (their output is zeroed)
        key_mask[i, :, :n] = expanded
        gate[i] = attends
        rows.extend(range(row0, row0 + num_rows))
    return CrossAttentionGroup(
        rows=torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True),
        states=states,  # type: ignore[arg-type]
        key_mask=key_mask.to(device, non_blocking=True),
        gate=gate.view(-1, 1).to(device, dtype),
        num_seqs=len(members), num_rows=num_rows)
