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
    """Every adapter's shrink for every row in one matmul, masked to each row's own adapter,
    then one expand. No host sync and fixed shapes; the work grows with the number of loaded
    adapters, which is fine for a handful (gathering per-row matrices instead would allocate
    [T, r, in] per layer). Rows with index -1 get an exactly zero delta."""

    name = "torch"

    def apply(self, y, x, lora_a, lora_b, scales, index):
        n, r, _ = lora_a.shape
        shrink = (x.to(lora_a.dtype) @ lora_a.reshape(n * r, -1).t()).view(-1, n, r)  # [T, n, r]
        own = index[:, None] == torch.arange(n, device=index.device)  # [T, n], all False for -1
        shrink = shrink * (own.to(shrink.dtype) * scales[None, :])[:, :, None]
        delta = torch.einsum("tnr,nor->to", shrink, lora_b)
        return y + delta.to(y.dtype)


@hookimpl
def genserve_register_lora(register):
    register(TorchLoRA.name, TorchLoRA)
