"""What proposers that run a network of their own share (a draft model, EAGLE, Medusa heads):
inputs for their own paged KV cache, and drawing proposals with the request's sampler."""

from __future__ import annotations

import itertools

import torch

from genserve.attention.base import AttentionMetadata
from genserve.device import upload
from genserve.engine.constraints import bitmask_words, unpack_bitmask
from genserve.engine.sampler import SamplingBatch, sample
from genserve.spec_decode.base import ProposalRequest


def paged_inputs(tables: list[list[int]], rows: list[tuple[list[int], int]], block_size: int, device,
                 firsts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
    """Inputs for running ``rows`` ((token ids, first position) per sequence) of a proposer's
    own model through its paged KV cache, laid out with the sequences' block ``tables``:
    (token ids [T], positions [T], attention metadata, each sequence's last row).

    ``firsts``: per sequence, the first position its attention sees (a multiple of
    ``block_size``; default 0): its block table is taken from that block on, so the rows
    attend to positions ``first ..`` only, and rotate with their true positions."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    cu, seq_lens, last, used = [0], [], [], []
    for i, (table, (tokens, start)) in enumerate(zip(tables, rows)):
        first = firsts[i] if firsts is not None else 0
        ids += tokens
        pos += range(start, start + len(tokens))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + len(tokens))]
        cu.append(len(ids))
        seq_lens.append(start + len(tokens) - first)
        last.append(len(ids) - 1)
        used.append(table[first // block_size:])
    width = max(len(t) for t in used)
    q_lens = [b - a for a, b in itertools.pairwise(cu)]
    meta = AttentionMetadata(
        cu_seqlens_q=upload(torch.tensor(cu, dtype=torch.int32), device),
        seq_lens=upload(torch.tensor(seq_lens, dtype=torch.int32), device),
        block_tables=upload(torch.tensor([t + [0] * (width - len(t)) for t in used], dtype=torch.int32), device),
        slot_mapping=upload(torch.tensor(slots, dtype=torch.long), device),
        max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens),
        is_decode_only=all(q == 1 for q in q_lens),
        seq_lens_cpu=seq_lens, query_lens_cpu=q_lens,
    )
    return (upload(torch.tensor(ids, dtype=torch.long), device),
            upload(torch.tensor(pos, dtype=torch.long), device), meta, last)


def draw(logits: torch.Tensor, requests: list[ProposalRequest], drafts: list[list[int]], j: int,
         config, under_grammar: bool = False) -> list[int]:
    """Proposal ``j`` of each request from a proposer's ``logits`` [B, vocab], drawn with the
    request's own sampler as output index ``num_generated + j`` (its drafts so far in the
    history): the same Gumbel noise the target's row j uses, so a proposer that agrees with
    the target is accepted, sampled or greedy (``verify``). ``config``: the EngineConfig
    (watermark settings).

    ``under_grammar``: grammar-constrained requests draw under their grammar's mask, as the
    verify row will be masked (a draft the grammar forbids would be cut before verify, and the
    masked draw is the coupled one), and their grammar consumes the drawn token: the caller has
    advanced it through ``drafts`` already and rolls it back by ``len(draft)`` when done."""
    seqs = [r.seq for r in requests]
    params = [s.params for s in seqs]
    batch = SamplingBatch.for_sequences(seqs, drafts, [s.num_generated + j for s in seqs], logits.device,
                                        config.watermark_gamma, config.watermark_delta)
    constraints = [p.constraint if under_grammar else None for p in params]
    if any(c is not None for c in constraints):
        bitmask = torch.full((len(seqs), bitmask_words(logits.shape[-1])), -1, dtype=torch.int32)
        for row, c in enumerate(constraints):
            if c is not None:
                c.fill_bitmask(bitmask, row)
        batch.allowed = unpack_bitmask(bitmask.to(logits.device), logits.shape[-1])
    tokens = sample(logits, batch).tokens.tolist()
    for c, token in zip(constraints, tokens):
        if c is not None:
            c.advance(token)
    return tokens
