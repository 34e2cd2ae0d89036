"""The attention layer models call; the kernel behind it comes from the backend's choice."""

from __future__ import annotations

import torch
from torch import nn

from genserve.attention.base import AttentionSpec


class Attention(nn.Module):
    """Paged attention for one layer: ``forward(q, k, v, batch)`` on flat token rows.

    ``q``: [T, num_heads * head_dim]; ``k``, ``v``: [T, num_kv_heads * head_dim]
    (this rank's heads). Returns [T, num_heads * head_dim].
    """

    def __init__(self, layer_idx: int, spec: AttentionSpec, ctx):
        super().__init__()
        self.layer_idx, self.spec = layer_idx, spec
        self.impl = ctx.attention_for(spec)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch) -> torch.Tensor:
        s = self.spec
        T = q.shape[0]
        out = self.impl.forward(
            q.view(T, s.num_heads, s.head_dim),
            k.view(T, s.num_kv_heads, s.head_dim),
            v.view(T, s.num_kv_heads, s.head_dim),
            batch.kv_caches[self.layer_idx],
            batch.attn,
        )
        return out.reshape(T, s.num_heads * s.head_dim)
