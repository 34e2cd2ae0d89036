"""Linear layers with tensor parallelism and a pluggable quantization method.

Megatron-style: a column-parallel layer splits output features across ranks, a row-parallel
layer splits input features and all-reduces. Each parameter carries a ``weight_loader`` that
reads this rank's slice of the checkpoint tensor, so the loader needs no per-model code.
"""

from __future__ import annotations

import torch
from torch import nn

from genserve.distributed.state import divide, get_tp_group
from genserve.layers.custom_op import current_layer_ops
from genserve.layers.quantization.base import QuantMethod
from genserve.layers.weights import copy_into, expect_dim, narrow, shape_of


class LinearBase(nn.Module):
    # LoRA adapters of this layer (``genserve.lora.runtime.LoRALayer``), attached by the
    # LoRAManager; None (no adapter targets this layer) costs one attribute check.
    lora = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quant: QuantMethod | None):
        super().__init__()
        self.tp = get_tp_group()
        self.in_features, self.out_features = in_features, out_features
        self.quant = quant or current_layer_ops().unquantized_linear()  # the backend's, chosen now
        self.quant.create_weights(self, in_features, out_features, dtype, self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param, loaded, shard_id=None):
        copy_into(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant.apply(self, x, self.bias)
        return out if self.lora is None else self.lora(out, x)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole layer (small projections, routers)."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays split."""

    def __init__(self, in_features, out_features, bias=False, dtype=torch.float32, quant=None):
        tp = get_tp_group()
        super().__init__(in_features, divide(out_features, tp.size), bias, dtype, quant)

    def weight_loader(self, param, loaded, shard_id=None):
        rows = param.shape[0]
        expect_dim(loaded, 0, rows * self.tp.size)
        copy_into(param, narrow(loaded, 0, self.tp.rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers in one matmul (gate and up projections)."""

    def __init__(self, in_features, output_sizes: list[int], bias=False, dtype=torch.float32, quant=None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype, quant)

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is None:  # already merged in the checkpoint (e.g. Phi-3 gate_up_proj)
            chunks = [narrow(loaded, 0, sum(self.output_sizes[:i]), s)
                      for i, s in enumerate(self.output_sizes)]
            for i, chunk in enumerate(chunks):
                self.weight_loader(param, chunk, i)
            return
        expect_dim(loaded, 0, self.output_sizes[shard_id])
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        copy_into(param.data.narrow(0, offset, size), narrow(loaded, 0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul; KV heads replicate when fewer than ranks."""

    def __init__(self, hidden_size, head_dim, num_heads, num_kv_heads, bias=False,
                 dtype=torch.float32, quant=None):
        tp = get_tp_group()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size)
        if num_kv_heads >= tp.size:
            self.num_kv_heads, self.kv_replicas = divide(num_kv_heads, tp.size), 1
        else:
            self.num_kv_heads, self.kv_replicas = 1, divide(tp.size, num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden_size, out, bias, dtype, quant)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is None:  # fused qkv in the checkpoint, laid out [q; k; v]
            total_q = self.q_size * self.tp.size
            total_kv = shape_of(loaded)[0] - total_q
            self.weight_loader(param, narrow(loaded, 0, 0, total_q), "q")
            self.weight_loader(param, narrow(loaded, 0, total_q, total_kv // 2), "k")
            self.weight_loader(param, narrow(loaded, 0, total_q + total_kv // 2, total_kv // 2), "v")
            return
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp.rank
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, rank = self.kv_size, self.tp.rank // self.kv_replicas
        expect_dim(loaded, 0, size * self.tp.size // (1 if shard_id == "q" else self.kv_replicas))
        copy_into(param.data.narrow(0, offset, size), narrow(loaded, 0, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features, out_features, bias=False, dtype=torch.float32, quant=None):
        tp = get_tp_group()
        super().__init__(divide(in_features, tp.size), out_features, bias, dtype, quant)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # the bias is not split
            copy_into(param, loaded)
            return
        cols = param.shape[1]
        expect_dim(loaded, 1, cols * self.tp.size)
        copy_into(param, narrow(loaded, 1, self.tp.rank * cols, cols))

    def forward(self, x):
        out = self.quant.apply(self, x, None)
        if self.lora is not None:
            # Before the all-reduce: this rank's partial delta from its slice of A (sharding.py).
            out = self.lora(out, x)
        out = self.tp.all_reduce(out)
        return out + self.bias if self.bias is not None else out
