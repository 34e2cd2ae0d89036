"""Random paged batches and the reference attention, for testing an attention kernel on a CPU.

A kernel that implements the attention contract (``genserve.attention.base``) must give, for
the same batch, the output and the cache writes of ``TorchReferenceAttention``:
``paged_batch`` makes such a batch (a cache filled with random context everywhere, so that a
wrong slot cannot read a lucky zero, and shuffled block tables), ``reference_attention`` runs
the reference on a copy of its cache. Used by the tests of the backend plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from genserve.attention.base import AttentionMetadata, AttentionSpec
from genserve.attention.torch_ref import TorchReferenceAttention

# Attention features to test a kernel with: keyword arguments of ``attention_spec``.
FEATURES: dict[str, dict] = {
    "gqa": dict(),
    "mha": dict(Hkv=4),
    "window-alibi": dict(sliding_window=5, alibi_slopes=(0.5, 0.25, 0.125, 0.0625)),
    "softcap": dict(logit_softcap=2.0),
}

# (sequence length after this step, query tokens this step): a fresh prefill, a decode, a
# prefill chunk over cached context and another decode.
MIXED = [(9, 9), (13, 1), (20, 5), (7, 1)]


def attention_spec(H: int = 4, Hkv: int = 2, D: int = 16, **features) -> AttentionSpec:
    """``H`` query heads and ``Hkv`` KV heads of size ``D``, scale ``D ** -0.5``."""
    return AttentionSpec(H, D, Hkv, D ** -0.5, **features)


@dataclass
class PagedLayout:
    """Where a batch's tokens live in a paged cache: one shuffled block table per sequence."""

    tables: list[list[int]]  # block ids of each sequence, non-contiguous
    num_blocks: int  # blocks the tables use, plus spare ones
    slots: list[int]  # cache slot of each new token, in batch order
    cu_seqlens_q: list[int]  # [B + 1] row offsets of each sequence's new tokens

    def metadata(self, seqs: list[tuple[int, int]], device: str | torch.device = "cpu") -> AttentionMetadata:
        """The ``AttentionMetadata`` of ``seqs`` (the ones the layout was made for) on ``device``."""
        width = max(len(t) for t in self.tables)
        return AttentionMetadata(
            cu_seqlens_q=torch.tensor(self.cu_seqlens_q, dtype=torch.int32, device=device),
            seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in self.tables],
                                      dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(self.slots, dtype=torch.long, device=device),
            max_seqlen_q=max(ql for _, ql in seqs), max_seqlen_k=max(s for s, _ in seqs),
            is_decode_only=all(ql == 1 for _, ql in seqs),
            seq_lens_cpu=[s for s, _ in seqs], query_lens_cpu=[ql for _, ql in seqs])


def shuffled_layout(seqs: list[tuple[int, int]], block_size: int, extra_blocks: int,
                    generator: torch.Generator) -> PagedLayout:
    """Block tables for ``seqs`` = [(seq_len after this step, q_len)] drawn from one random
    permutation of the cache's blocks (so a kernel that assumes contiguous blocks fails), with
    ``extra_blocks`` spare blocks, and the slots of the new tokens. Draws one ``randperm``."""
    need = [-(-s // block_size) for s, _ in seqs]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n])
        at += n
    slots, cu = [], [0]
    for (seq_len, q_len), table in zip(seqs, tables):
        assert 1 <= q_len <= seq_len
        slots += [table[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
        cu.append(cu[-1] + q_len)
    return PagedLayout(tables, num_blocks, slots, cu)


def paged_batch(seqs: list[tuple[int, int]], H: int = 4, Hkv: int = 2, D: int = 16, bs: int = 4,
                extra_blocks: int = 3, seed: int = 0):
    """A batch of ``seqs`` = [(seq_len after this step, q_len)] in a paged cache of block size ``bs``.

    Returns ``q [T, H, D]``, ``k`` and ``v [T, Hkv, D]`` (T = sum of q_len), ``cache
    [2, num_blocks, bs, Hkv, D]`` filled with random context, the block table of each sequence,
    and ``meta()``, which builds a fresh ``AttentionMetadata`` for the batch.
    """
    g = torch.Generator().manual_seed(seed)
    layout = shuffled_layout(seqs, bs, extra_blocks, g)
    T = layout.cu_seqlens_q[-1]
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv))
    cache = torch.randn(2, layout.num_blocks, bs, Hkv, D, generator=g)
    return q, k, v, cache, layout.tables, lambda: layout.metadata(seqs)


def reference_attention(spec: AttentionSpec, q, k, v, cache: torch.Tensor,
                        meta: Callable[[], AttentionMetadata]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference output ``[T, H, D]`` and the cache after its writes (``cache`` is untouched)."""
    cache = cache.clone()
    out = TorchReferenceAttention(spec).forward(q, k, v, cache, meta())
    return out, cache
