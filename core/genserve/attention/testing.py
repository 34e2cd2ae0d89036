"""Random paged batches and the reference attention, for testing an attention kernel on a CPU.

A kernel that implements the attention contract (``genserve.attention.base``) must give, for
the same batch, the output and the cache writes of ``TorchReferenceAttention``:
``paged_batch`` makes such a batch (a cache filled with random context everywhere, so that a
wrong slot cannot read a lucky zero, and shuffled block tables), ``reference_attention`` runs
the reference on a copy of its cache. Used by the tests of the backend plugins.
"""

from __future__ import annotations

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


def paged_batch(seqs: list[tuple[int, int]], H: int = 4, Hkv: int = 2, D: int = 16, bs: int = 4,
                extra_blocks: int = 3, seed: int = 0):
    """A batch of ``seqs`` = [(seq_len after this step, q_len)] in a paged cache of block size ``bs``.

    Returns ``q [T, H, D]``, ``k`` and ``v [T, Hkv, D]`` (T = sum of q_len), ``cache
    [2, num_blocks, bs, Hkv, D]`` filled with random context, the block table of each sequence,
    and ``meta()``, which builds a fresh ``AttentionMetadata`` for the batch.
    """
    g = torch.Generator().manual_seed(seed)
    need = [-(-s // bs) for s, _ in seqs]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n])
        at += n
    T = sum(q for _, q in seqs)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv))
    cache = torch.randn(2, num_blocks, bs, Hkv, D, generator=g)
    slots, cu = [], [0]
    for (s, ql), t in zip(seqs, tables):
        slots += [t[p // bs] * bs + p % bs for p in range(s - ql, s)]
        cu.append(cu[-1] + ql)
    width = max(need)

    def meta() -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            slot_mapping=torch.tensor(slots), max_seqlen_q=max(ql for _, ql in seqs),
            max_seqlen_k=max(s for s, _ in seqs), is_decode_only=all(ql == 1 for _, ql in seqs),
            seq_lens_cpu=[s for s, _ in seqs], query_lens_cpu=[ql for _, ql in seqs])

    return q, k, v, cache, tables, meta


def reference_attention(spec: AttentionSpec, q, k, v, cache: torch.Tensor,
                        meta: Callable[[], AttentionMetadata]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference output ``[T, H, D]`` and the cache after its writes (``cache`` is untouched)."""
    cache = cache.clone()
    out = TorchReferenceAttention(spec).forward(q, k, v, cache, meta())
    return out, cache
