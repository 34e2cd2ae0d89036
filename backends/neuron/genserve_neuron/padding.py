"""Padding a group of scheduled sequences up to a bucket's static shape (host side).

Sequence ``i`` of the bucket owns query rows ``i*Q .. i*Q+Q-1``. Its ``n`` real tokens sit
*right-aligned* in the last ``n`` of those rows, so the padded batch still follows the core's
attention contract (``genserve.attention.base``): with ``cu_seqlens_q = [0, Q, 2Q, ...]`` a
sequence's rows are "its last Q tokens" and the real ones really are its last ``n``. The
``Q - n`` pad rows in front claim earlier positions; they get token 0 at position 0 and write
their keys/values to a scratch block no sequence owns, so whatever they compute is thrown
away and the real cache is untouched. Right alignment also puts every sequence's last token
in row ``i*Q + Q-1``: the logits rows are a static slice.

Pad sequences (batch slots beyond the real ones) have context length 1, a block table full of
the scratch block, and pad rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genserve.attention.base import AttentionMetadata
from genserve_neuron.buckets import Bucket


@dataclass(frozen=True)
class SeqChunk:
    """One scheduled sequence's share of a step."""

    token_ids: list[int]  # the new tokens this step
    start: int  # position of the first of them
    block_table: list[int]  # at least ceil((start + len(token_ids)) / block_size) blocks

    @property
    def seq_len(self) -> int:
        return self.start + len(self.token_ids)


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B*Q] long
    positions: torch.Tensor  # [B*Q] long
    attn: AttentionMetadata  # static-shape tensors; max_seqlen_q = Q
    bucket: Bucket
    num_real: int

    def to(self, device) -> "PaddedBatch":
        a = self.attn
        attn = AttentionMetadata(
            cu_seqlens_q=a.cu_seqlens_q.to(device), seq_lens=a.seq_lens.to(device),
            block_tables=a.block_tables.to(device), slot_mapping=a.slot_mapping.to(device),
            max_seqlen_q=a.max_seqlen_q, max_seqlen_k=a.max_seqlen_k,
            is_decode_only=a.is_decode_only,
        )
        return PaddedBatch(self.input_ids.to(device), self.positions.to(device), attn,
                           self.bucket, self.num_real)

    def real_rows(self, i: int, n: int) -> slice:
        """Rows of the ``n`` real tokens of sequence ``i``."""
        q = self.bucket.q_len
        return slice(i * q + q - n, (i + 1) * q)


def blocks_needed(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def pad_batch(chunks: list[SeqChunk], bucket: Bucket, block_size: int, pad_block: int) -> PaddedBatch:
    B, Q, W = bucket.batch, bucket.q_len, bucket.blocks
    if len(chunks) > B:
        raise ValueError(f"{len(chunks)} sequences do not fit bucket {bucket}")
    pad_slot = pad_block * block_size
    ids = [0] * (B * Q)
    pos = [0] * (B * Q)
    slots = [pad_slot] * (B * Q)
    seq_lens = [1] * B
    tables = [[pad_block] * W for _ in range(B)]
    for i, c in enumerate(chunks):
        n = len(c.token_ids)
        need = blocks_needed(c.seq_len, block_size)
        if n > Q or need > W:
            raise ValueError(f"a sequence of {n} new tokens and {c.seq_len} in all does not fit {bucket}")
        row0 = i * Q + Q - n
        for j, tok in enumerate(c.token_ids):
            p = c.start + j
            ids[row0 + j], pos[row0 + j] = tok, p
            slots[row0 + j] = c.block_table[p // block_size] * block_size + p % block_size
        seq_lens[i] = c.seq_len
        tables[i][:need] = c.block_table[:need]

    attn = AttentionMetadata(
        cu_seqlens_q=torch.arange(0, (B + 1) * Q, Q, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        max_seqlen_q=Q,
        max_seqlen_k=W * block_size,
        is_decode_only=Q == 1,
    )
    return PaddedBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                       attn, bucket, len(chunks))
