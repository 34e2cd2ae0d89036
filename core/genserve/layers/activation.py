"""Activations, including the gated ones that split a merged gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genserve.layers.custom_op import CustomOp


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x):
    """CLIP's activation: ``x * sigmoid(1.702 x)`` (OpenAI CLIP, transformers' QuickGELU)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "quick_gelu": _quick_gelu,
}


def get_activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class GatedActivation(CustomOp):
    """``act(gate) * up`` for ``x = [gate | up]`` along the last dimension: ``[..., 2 * d]`` ->
    ``[..., d]``. A backend may bind a fused kernel at construction (op ``gated_activation``;
    the CUDA backend's serves SiLU only)."""

    op_name = "gated_activation"

    def __init__(self, name: str = "silu"):
        super().__init__()
        self.act = get_activation(name)
        self.bind_forward()

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
