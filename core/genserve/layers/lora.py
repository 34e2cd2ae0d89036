"""Batched LoRA: each token row may use a different adapter (or none).

``TorchLoRA`` is the reference method: it gathers each row's A and B matrices and adds
``scale * (x @ A^T) @ B^T`` to the base layer's output. Faster methods (Punica/SGMV kernels)
register under other names with the same ``apply`` contract.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from genserve.hookspecs import hookimpl


class LoRAMethod:
    name: ClassVar[str] = "?"

    def apply(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              scales: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``y`` [T, out] plus the LoRA delta for rows whose ``index`` >= 0.

        ``lora_a``: [n_adapters, r, in]; ``lora_b``: [n_adapters, out, r]; ``scales``: [n_adapters];
        ``index``: [T] adapter of each row, -1 for none.
        """
        raise NotImplementedError


class TorchLoRA(LoRAMethod):
    name = "torch"

    def apply(self, y, x, lora_a, lora_b, scales, index):
        active = index >= 0
        if not bool(active.any()):
            return y
        idx = index.clamp(min=0)
        shrink = torch.bmm(lora_a[idx], x[:, :, None])  # [T, r, 1]
        expand = torch.bmm(lora_b[idx], shrink)[:, :, 0]  # [T, out]
        delta = expand * (scales[idx] * active.to(scales.dtype))[:, None]
        return y + delta.to(y.dtype)


@hookimpl
def genserve_register_lora(register):
    register(TorchLoRA.name, TorchLoRA)
