"""How a quantizer plugs into linear layers.

A quantizer creates a linear layer's parameters (their dtype, shape and weight loaders) and
computes ``x @ W.T + b`` from them. Each quantizer owns its checkpoint format, so the loader
knows no quantizer by name.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class QuantMethod:
    name: ClassVar[str] = "?"
    # Backends that can run this method; None means any.
    backends: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, quant_config: dict | None = None):
        self.quant_config = quant_config or {}

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int,
                       dtype: torch.dtype, weight_loader) -> None:
        """Add parameters to ``layer``; ``weight_loader(param, loaded, shard_id)`` fills them."""
        raise NotImplementedError

    def process_after_loading(self, layer: nn.Module) -> None:
        """Repack weights once loaded (e.g. into a kernel's layout)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinear(QuantMethod):
    name = "none"

    def create_weights(self, layer, in_features, out_features, dtype, weight_loader):
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        weight.weight_loader = weight_loader
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)
