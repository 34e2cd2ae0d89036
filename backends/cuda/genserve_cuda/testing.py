"""Random paged batches for kernel tests and benchmarks (pure PyTorch, any device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genserve.attention.base import AttentionMetadata


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
    need = [-(-s // block_size) for s, _ in seqs]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n])
        at += n
    width = max(need)
    slots, cu = [], [0]
    for (seq_len, q_len), table in zip(seqs, tables):
        assert 1 <= q_len <= seq_len
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(seq_len - q_len, seq_len)]
        cu.append(cu[-1] + q_len)
    T = cu[-1]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                  device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        max_seqlen_q=max(q for _, q in seqs),
        max_seqlen_k=max(s for s, _ in seqs),
        is_decode_only=all(q == 1 for _, q in seqs),
        seq_lens_cpu=[s for s, _ in seqs],
        query_lens_cpu=[q for _, q in seqs],
    )
    return PagedBatch(
        q=rnd(T, num_heads, head_dim), k=rnd(T, num_kv_heads, head_dim), v=rnd(T, num_kv_heads, head_dim),
        kv_cache=rnd(2, num_blocks, block_size, num_kv_heads, head_dim), meta=meta,
    )


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """The ALiBi paper's geometric slopes (power-of-two head counts)."""
    return tuple(2 ** (-8 * (i + 1) / num_heads) for i in range(num_heads))
