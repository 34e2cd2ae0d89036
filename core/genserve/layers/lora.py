"""Batched LoRA: each token row may use a different adapter (or none).

``TorchLoRA`` is the reference method: it adds ``scale * (x @ A^T) @ B^T`` of each row's slot
to the base layer's output. Faster methods (genserve-cuda's Triton SGMV kernels,
"triton_sgmv") register under other names with the same ``prepare``/``apply`` contract.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from genserve.hookspecs import hookimpl


class LoRAMethod:
    name: ClassVar[str] = "?"
    # Whether ``prepare`` and ``apply`` only queue device work on fixed shapes (no host sync,
    # no allocation sized by data), so a decode step with adapters can be captured in a CUDA
    # graph whose inputs are the slot tensors and the per-row slot index.
    graph_safe: ClassVar[bool] = False

    def prepare(self, index: torch.Tensor, num_slots: int) -> object:
        """Per-step metadata shared by every adapted layer of one forward (e.g. rows sorted by
        slot), computed once from ``index`` [T] (slot per row, -1 for none). Default: none."""
        return None

    def apply(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              scales: torch.Tensor, index: torch.Tensor, meta: object = None) -> torch.Tensor:
        """``y`` [T, out] plus the LoRA delta for rows whose ``index`` >= 0.

        ``lora_a``: [n_slots, r, in]; ``lora_b``: [n_slots, out, r]; ``scales``: [n_slots];
        ``index``: [T] slot of each row, -1 for none; ``meta``: what ``prepare`` returned.
        """
        raise NotImplementedError


class TorchLoRA(LoRAMethod):
    """Every slot's shrink for every row in one matmul, masked to each row's own slot, then one
    expand. No host sync and fixed shapes (graph-safe); the work grows with the number of slots
    (--max-loras), which is fine for a handful (gathering per-row matrices instead would allocate
    [T, r, in] per layer). Rows with index -1 get an exactly zero delta."""

    name = "torch"
    graph_safe = True  # fixed shapes, no host sync

    def apply(self, y, x, lora_a, lora_b, scales, index, meta=None):
        n, r, _ = lora_a.shape
        shrink = (x.to(lora_a.dtype) @ lora_a.reshape(n * r, -1).t()).view(-1, n, r)  # [T, n, r]
        own = index[:, None] == torch.arange(n, device=index.device)  # [T, n], all False for -1
        shrink = shrink * (own.to(shrink.dtype) * scales[None, :])[:, :, None]
        delta = torch.einsum("tnr,nor->to", shrink, lora_b)
        return y + delta.to(y.dtype)


@hookimpl
def genserve_register_lora(register):
    register(TorchLoRA.name, TorchLoRA)
