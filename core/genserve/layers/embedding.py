"""Vocabulary-parallel embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.distributed.state import get_tp_group
from genserve.layers.custom_op import CustomOp
from genserve.layers.weights import copy_into, narrow, set_weight_loader, shape_of


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous range of the vocabulary (padded to divide evenly)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype=torch.float32):
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        per_rank = -(-vocab_size // self.tp.size)
        self.start = self.tp.rank * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, hidden_size, dtype=dtype), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param, loaded, shard_id=None):
        rows = min(param.shape[0], shape_of(loaded)[0] - self.start)
        with torch.no_grad():
            param.zero_()
        copy_into(param.data[:rows], narrow(loaded, 0, self.start, rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding, CustomOp):
    """Output projection to the vocabulary; each rank computes its slice of the logits.

    ``forward(hidden [T, hidden_size])`` -> logits ``[T, vocab_size]`` (all-gathered over the
    tensor-parallel ranks). A backend may bind its own matmul at construction (op ``lm_head``;
    it reads ``weight`` at call time, so ``tie_to`` after construction is fine).
    """

    op_name = "lm_head"
    forward = CustomOp.forward  # VocabParallelEmbedding's comes first in the MRO

    def __init__(self, vocab_size, hidden_size, bias=False, dtype=torch.float32):
        super().__init__(vocab_size, hidden_size, dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.weight.shape[0], dtype=dtype), requires_grad=False)
            set_weight_loader(self.bias, self.weight_loader)
        else:
            self.register_parameter("bias", None)
        self.bind_forward()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward_native(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
