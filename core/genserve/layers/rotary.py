"""Rotary position embedding, with every scaling type transformers knows.

The inverse frequencies come from transformers' own ``ROPE_INIT_FUNCTIONS`` (linear, dynamic,
yarn, longrope, llama3), so scaled models match the reference exactly.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_parameters(config) -> dict:
    """The rope settings of a config, in transformers 5's ``rope_parameters`` shape."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def compute_inv_freq(config, rotary_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    if params["rope_type"] == "default":
        base = params["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to ``q`` and ``k`` of shape ``[T, heads, head_dim]`` at ``positions``.

    ``rotary_dim < head_dim`` rotates only the leading dimensions (GPT-NeoX, Phi).
    ``interleaved=True`` rotates adjacent pairs (GPT-J style) instead of halves.
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, inv_freq: torch.Tensor,
                 scaling: float = 1.0, interleaved: bool = False):
        super().__init__()
        self.head_dim, self.rotary_dim, self.interleaved = head_dim, rotary_dim, interleaved
        t = torch.arange(max_position, dtype=torch.float32)
        # transformers' scaled-rope functions return CPU tensors; build on the default device.
        freqs = torch.outer(t, inv_freq.float().to(t.device))
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)  # [P, rotary_dim/2]
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)

    @classmethod
    def from_config(cls, config, head_dim: int, rotary_dim: int | None = None, interleaved=False):
        rotary_dim = rotary_dim or head_dim
        inv_freq, scaling = compute_inv_freq(config, rotary_dim)
        max_pos = getattr(config, "max_position_embeddings", 4096)
        return cls(head_dim, rotary_dim, max_pos, inv_freq, scaling, interleaved)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
            out = rot * cos2 + torch.cat((-x2, x1), -1) * sin2
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].to(q.dtype)[:, None]  # [T, 1, rotary_dim/2]
        sin = self.sin[positions].to(q.dtype)[:, None]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
