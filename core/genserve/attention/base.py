"""The contract between models, the model runner and attention kernels.

KV cache layout, one tensor per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 holds keys, 1 values). A token's *slot* is ``block_id * block_size + offset``.

A batch is a flat run of tokens from several sequences (no padding): sequence ``i`` owns
query rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``; those are its *last* ``q_len`` tokens,
at positions ``seq_lens[i] - q_len ...  seq_lens[i] - 1``. Earlier tokens of the sequence
are already in the cache (previous steps, prefix-cache hits, earlier prefill chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch


@dataclass
class AttentionMetadata:
    """Per-batch tensors every attention implementation reads (built once per step)."""

    cu_seqlens_q: torch.Tensor  # [B+1] int32, on device
    seq_lens: torch.Tensor  # [B] int32, context length after this step, on device
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0, on device
    slot_mapping: torch.Tensor  # [T] int64, where each new token's K/V goes, on device
    max_seqlen_q: int
    max_seqlen_k: int
    is_decode_only: bool  # every sequence has exactly one query token
    # [B] int32 on device: every token of the sequence the engine knows at this step (prompt +
    # generated so far), which a prefill chunk may not reach. None: same as ``seq_lens``.
    known_lens: torch.Tensor | None = None
    # Host copies, for reference paths that loop in Python.
    seq_lens_cpu: list[int] = field(default_factory=list)
    query_lens_cpu: list[int] = field(default_factory=list)
    # Free-form per-implementation state (e.g. precomputed split counts).
    extra: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @cached_property
    def is_fresh(self) -> bool:
        """Every sequence is a whole prompt with nothing cached before it (from the host
        copies; worked out once per step, not once per layer)."""
        return bool(self.seq_lens_cpu) and self.seq_lens_cpu == self.query_lens_cpu


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer needs; fixed at model construction."""

    num_heads: int
    head_dim: int
    num_kv_heads: int
    scale: float
    sliding_window: int | None = None  # keys older than this many positions are masked
    alibi_slopes: tuple[float, ...] | None = None  # ALiBi bias per query head
    logit_softcap: float | None = None  # Gemma-2: softcap * tanh(scores / softcap)
    causal: bool = True  # False for encoder self-attention and cross-attention


class AttentionImpl:
    """An attention kernel over the paged KV cache. Subclasses register by name."""

    name: ClassVar[str] = "?"
    # True when ``forward`` never syncs with the host nor allocates by data-dependent sizes, so
    # a decode step through it can be captured in a CUDA graph (``genserve_cuda.graphs``).
    graph_safe: ClassVar[bool] = False

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    @classmethod
    def supports(cls, spec: AttentionSpec, dtype: torch.dtype, device: torch.device) -> str | None:
        """None when this kernel can serve the layer, else the reason it cannot."""
        return None

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        raise NotImplementedError


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values at their slots (pure PyTorch)."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    k, v = k.to(flat.dtype), v.to(flat.dtype)
    if flat.dtype.itemsize == 1 and flat.dtype.is_floating_point:
        # fp8 caches: index_copy_ has no fp8 kernels, so copy the bytes.
        flat, k, v = flat.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)
