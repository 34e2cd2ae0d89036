"""Random paged batches for kernel tests and benchmarks (pure PyTorch, any device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genserve.attention.base import AttentionMetadata
from genserve.attention.testing import shuffled_layout


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, H, D]
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, Hkv, D], context already filled
    meta: AttentionMetadata


def make_paged_batch(
    seqs: list[tuple[int, int]],  # (seq_len after this step, q_len) per sequence
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
    extra_blocks: int = 3, generator: torch.Generator | None = None,
) -> PagedBatch:
    """Every sequence gets a shuffled (non-contiguous) block table and random cached context.

    The cache is filled with random values everywhere, so a kernel that reads a wrong slot,
    or a position past ``seq_len``, gives a wrong answer instead of a lucky zero.
    """
    g = generator or torch.Generator().manual_seed(0)
    layout = shuffled_layout(seqs, block_size, extra_blocks, g)
    T = layout.cu_seqlens_q[-1]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    return PagedBatch(
        q=rnd(T, num_heads, head_dim), k=rnd(T, num_kv_heads, head_dim), v=rnd(T, num_kv_heads, head_dim),
        kv_cache=rnd(2, layout.num_blocks, block_size, num_kv_heads, head_dim),
        meta=layout.metadata(seqs, device),
    )


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """The ALiBi paper's geometric slopes (power-of-two head counts)."""
    return tuple(2 ** (-8 * (i + 1) / num_heads) for i in range(num_heads))
