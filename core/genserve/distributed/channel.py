"""Rank 0 tells the other ranks what to compute, as tensors only (never pickle).

Every message starts with a fixed int64 header broadcast over the gloo control group (the one
the workers wait on while the server is idle). A forward pass follows with one flat int64
payload on the same group (the step's LoRA rows and slot loads included, when it has any); an LM-head call follows with the hidden rows on the default group
(device to device under NCCL), since the rows are activations, not host metadata.

Workers mirror exactly the collectives rank 0 makes: each ``execute`` and each
``compute_logits`` (the vocab-parallel LM head all-gathers) is announced before it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from genserve.attention.base import AttentionMetadata
from genserve.lora.runtime import LoRABatch

HEADER_LEN = 8
FORWARD, LOGITS, STOP = 1, 2, 3
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Forward:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    lora: LoRABatch | None = None


class Channel:
    def __init__(self, ctrl_group, device: torch.device):
        self.ctrl, self.device = ctrl_group, torch.device(device)

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, 0, group=self.ctrl)
        return t

    def _header(self, *fields: int) -> None:
        h = torch.zeros(HEADER_LEN, dtype=torch.int64)
        h[: len(fields)] = torch.tensor(fields, dtype=torch.int64)
        self._bcast(h)

    # -- rank 0 ---------------------------------------------------------------------------
    def send_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                     lora: LoRABatch | None = None) -> None:
        tokens, seqs = input_ids.numel(), attn.seq_lens.numel()
        width = attn.block_tables.shape[1]
        # The last field: 0 without LoRA rows, else 1 + the number of slot loads the step needs.
        self._header(FORWARD, tokens, seqs, width, attn.max_seqlen_q, attn.max_seqlen_k,
                     int(attn.is_decode_only), 0 if lora is None else 1 + len(lora.loads))
        known = attn.seq_lens if attn.known_lens is None else attn.known_lens
        lora_parts = () if lora is None else (
            lora.index_cpu, torch.tensor(lora.loads, dtype=torch.long).reshape(-1))
        parts = (input_ids, positions, attn.slot_mapping, attn.cu_seqlens_q, attn.seq_lens, known,
                 attn.block_tables.reshape(-1), *lora_parts)
        # One host copy for the whole batch (a no-op on CPU): one gloo message, not seven.
        self._bcast(torch.cat([p.long() for p in parts]).cpu())

    def send_logits(self, hidden: torch.Tensor) -> None:
        rows, cols = hidden.shape
        self._header(LOGITS, rows, cols, FLOAT_DTYPES.index(hidden.dtype))
        dist.broadcast(hidden.contiguous(), 0)

    def send_stop(self) -> None:
        self._header(STOP)

    # -- other ranks ----------------------------------------------------------------------
    def recv(self) -> tuple[int, Forward | torch.Tensor | None]:
        h = self._bcast(torch.zeros(HEADER_LEN, dtype=torch.int64)).tolist()
        kind = h[0]
        if kind == FORWARD:
            return kind, self._recv_forward(*h[1:8])
        if kind == LOGITS:
            rows, cols, dtype = h[1:4]
            hidden = torch.empty(rows, cols, dtype=FLOAT_DTYPES[dtype], device=self.device)
            dist.broadcast(hidden, 0)
            return kind, hidden
        if kind == STOP:
            return kind, None
        raise RuntimeError(f"unknown message kind {kind} from rank 0")

    def _recv_forward(self, tokens, seqs, width, max_q, max_k, decode_only, has_lora) -> Forward:
        lora_rows = tokens if has_lora else 0
        n_loads = max(0, has_lora - 1)
        payload = self._bcast(torch.empty(3 * tokens + 3 * seqs + 1 + seqs * width + lora_rows + 2 * n_loads,
                                          dtype=torch.int64))
        ids, pos, slots, cu, seq_lens, known, tables, lora_index, loads = payload.split(
            [tokens, tokens, tokens, seqs + 1, seqs, seqs, seqs * width, lora_rows, 2 * n_loads])
        dev = self.device

        def on_dev(t, dtype):
            return t.to(dtype).to(dev, non_blocking=True)

        attn = AttentionMetadata(
            cu_seqlens_q=on_dev(cu, torch.int32),
            seq_lens=on_dev(seq_lens, torch.int32),
            block_tables=on_dev(tables.view(seqs, width), torch.int32),
            slot_mapping=on_dev(slots, torch.long),
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            is_decode_only=bool(decode_only),
            known_lens=on_dev(known, torch.int32),
            seq_lens_cpu=seq_lens.tolist(),
            query_lens_cpu=(cu[1:] - cu[:-1]).tolist(),
        )
        # The slots of each token row's adapter (-1: none) and the (slot, adapter number) loads,
        # as rank 0's ``LoRAManager.batch_for`` made them: every rank fills the same slots.
        lora = LoRABatch(on_dev(lora_index, torch.long), lora_index,
                         [tuple(p) for p in loads.view(-1, 2).tolist()]) if has_lora else None
        return Forward(on_dev(ids, torch.long), on_dev(pos, torch.long), attn, lora)
