"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn

from genserve.layers.custom_op import CustomOp


class RMSNorm(CustomOp):
    """RMSNorm computed in fp32 like transformers; ``offset=1`` gives Gemma's (1 + w) scaling.

    ``forward(x, residual)`` fuses the residual add: it returns ``(norm(x + residual), x + residual)``.
    A backend may bind a fused kernel with the same contract at construction (op ``rms_norm``).
    """

    op_name = "rms_norm"
    reference_methods = ("forward_native", "_norm")

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=torch.float32, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.bind_forward()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma multiplies in fp32 before casting back
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with the same ``(x, residual)`` contract as ``RMSNorm``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True, dtype=torch.float32):
        super().__init__(hidden_size, eps=eps, bias=bias, dtype=dtype)
        self.requires_grad_(False)

    def forward(self, x, residual=None):
        if residual is None:
            return super().forward(x)
        x = x + residual
        return super().forward(x), x
