"""Vocabulary-parallel embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.distributed.state import get_tp_group
from genserve.layers.custom_op import CustomOp
from genserve.layers.quantization.base import EmbeddingMethod
from genserve.layers.weights import copy_into, narrow, set_weight_loader, shape_of


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous range of the vocabulary (padded to divide evenly).

    With a ``quant_config`` whose ``get_embedding_method(self, prefix)`` answers (GGUF), the table
    is that method's tensors instead of a dense ``weight``, and lookups dequantize only the rows
    they gather (``EmbeddingMethod.embedding``)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype=torch.float32, quant_config=None,
                 prefix: str = ""):
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        per_rank = -(-vocab_size // self.tp.size)
        self.start = self.tp.rank * per_rank
        self.num_rows, self.hidden_size = per_rank, hidden_size  # this rank's table
        self.quant: EmbeddingMethod | None = (
            quant_config.get_embedding_method(self, prefix) if quant_config is not None else None)
        if self.quant is not None:
            self.quant.create_weights(self, hidden_size, per_rank, dtype, self.weight_loader)
            return
        self.weight = nn.Parameter(torch.empty(per_rank, hidden_size, dtype=dtype), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param, loaded, shard_id=None):
        rows = min(param.shape[0], shape_of(loaded)[0] - self.start)
        with torch.no_grad():
            param.zero_()
        copy_into(param.data[:rows], narrow(loaded, 0, self.start, rows))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (this rank's numbering) of the table, ``[T, hidden]``."""
        return F.embedding(ids, self.weight) if self.quant is None else self.quant.embedding(self, ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.lookup(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_rows)
        out = self.lookup(local.masked_fill(outside, 0))
        out = out.masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding, CustomOp):
    """Output projection to the vocabulary; each rank computes its slice of the logits.

    ``forward(hidden [T, hidden_size])`` -> logits ``[T, vocab_size]`` (all-gathered over the
    tensor-parallel ranks). A backend may bind its own matmul at construction (op ``lm_head``;
    it reads ``weight`` at call time, so ``tie_to`` after construction is fine). A quantized head
    (``EmbeddingMethod``, its own or its tied embedding's) runs the method's matmul, never a
    backend's dense one.
    """

    op_name = "lm_head"
    forward = CustomOp.forward  # VocabParallelEmbedding's comes first in the MRO

    def __init__(self, vocab_size, hidden_size, bias=False, dtype=torch.float32, quant_config=None,
                 prefix: str = "lm_head"):
        super().__init__(vocab_size, hidden_size, dtype, quant_config, prefix)
        if bias:
            rows = -(-vocab_size // self.tp.size)
            self.bias = nn.Parameter(torch.empty(rows, dtype=dtype), requires_grad=False)
            set_weight_loader(self.bias, self.weight_loader)
        else:
            self.register_parameter("bias", None)
        if self.quant is None:
            self.bind_forward()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        if embedding.quant is None:
            self.weight, self.quant = embedding.weight, None
            return
        # The head multiplies by the embedding's packed table: no dense weight, and the
        # reference forward (a backend's dense lm_head op reads ``weight``).
        if "weight" in self._parameters:
            del self.weight
        self.quant, self._impl, self.impl_name = embedding.quant, None, "native"

    def forward_native(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            logits = self.quant.apply(self, hidden, self.bias)
        else:
            logits = F.linear(hidden, self.weight, self.bias)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
