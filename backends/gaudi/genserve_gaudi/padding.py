"""Decode batches padded to an HPU-graph bucket ``(B, W)`` (host side, then one copy).

Rows ``0..n-1`` are the real sequences in scheduled order, so the core runner's logits rows
and sampling need no remapping; rows ``n..B-1`` are pad sequences: token 0 at position 0,
context length 1, a block table full of the scratch block, and their key/value written to the
scratch block that no sequence owns. Every block table is ``W`` wide, padded with the
scratch block.
"""

from __future__ import annotations

import torch

from genserve.attention.base import AttentionMetadata
from genserve.engine.model_runner import PreparedBatch
from genserve.engine.scheduler import ScheduledSeq


def powers_of_two_upto(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... and finally ``n`` itself, so that ``n`` always has a bucket."""
    out, v = [], 1
    while v < n:
        out.append(v)
        v *= 2
    return tuple(out) + (n,)


def bucket_for(n: int, sizes: tuple[int, ...]) -> int | None:
    return next((s for s in sizes if s >= n), None)


def padded_decode_batch(scheduled: list[ScheduledSeq], batch: int, width: int, block_size: int,
                        pad_block: int, device) -> PreparedBatch:
    pad_slot = pad_block * block_size
    ids, pos, slots = [0] * batch, [0] * batch, [pad_slot] * batch
    seq_lens = [1] * batch
    tables = [[pad_block] * width for _ in range(batch)]
    sampling_index, logit_rows, prompt_rows = [], [], {}
    for i, s in enumerate(scheduled):
        seq, p = s.seq, s.seq.num_computed
        need = -(-(p + 1) // block_size)
        ids[i], pos[i] = seq.all_ids[p], p
        slots[i] = seq.block_table[p // block_size] * block_size + p % block_size
        seq_lens[i] = p + 1
        tables[i][:need] = seq.block_table[:need]
        if seq.params.prompt_logprobs and not seq.output_ids and p < len(seq.prompt_ids):
            prompt_rows[i] = (i, 1)
        if s.completes:
            logit_rows.append(i)
            sampling_index.append(i)

    def t(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    attn = AttentionMetadata(
        cu_seqlens_q=t(list(range(batch + 1)), torch.int32),
        seq_lens=t(seq_lens, torch.int32),
        block_tables=t(tables, torch.int32),
        slot_mapping=t(slots, torch.long),
        max_seqlen_q=1,
        max_seqlen_k=width * block_size,
        is_decode_only=True,
    )
    return PreparedBatch(t(ids, torch.long), t(pos, torch.long), attn,
                         t(logit_rows, torch.long), sampling_index, prompt_rows)
