"""Linear layers with tensor parallelism and a pluggable quantization method.

Megatron-style: a column-parallel layer splits output features across ranks, a row-parallel
layer splits input features and all-reduces. Each parameter carries a ``weight_loader`` that
reads this rank's slice of the checkpoint tensor, so the loader needs no per-model code.

The layer asks the model's ``QuantizationConfig`` for its method with its checkpoint prefix
(``get_quant_method(layer, prefix)``); the method creates the parameters and declares their
dimensions (``set_weight_dims``). The loaders below narrow along the declared output or input
dimension, in packed units where that dimension is packed, so a GPTQ ``qweight`` (packed along
the input), an AWQ ``qzeros`` (packed along the output) or a group ``scales`` tensor loads the
same way a dense weight does, and no loader knows a format by name.
"""

from __future__ import annotations

import torch
from torch import nn

from genserve.distributed.state import divide, get_tp_group
from genserve.layers.custom_op import current_layer_ops
from genserve.layers.quantization.base import QuantizationConfig, QuantMethod
from genserve.layers.weights import (
    copy_into,
    expect_dim,
    in_param_units,
    narrow,
    set_weight_dims,
    set_weight_loader,
    shape_of,
    weight_dims,
)


class LinearBase(nn.Module):
    # LoRA adapters of this layer (``genserve.lora.runtime.LoRALayer``), attached by the
    # LoRAManager; None (no adapter targets this layer) costs one attribute check.
    lora = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quant_config: QuantizationConfig | None, prefix: str = "", *,
                 full_in_features: int | None = None, full_out_features: int | None = None,
                 output_partition_sizes: list[int] | None = None):
        """``in_features``/``out_features``: this rank's; ``full_*``: the whole layer's (what the
        checkpoint holds); ``output_partition_sizes``: this rank's part of each fused
        projection (q, k, v or gate, up). ``prefix``: the layer's checkpoint name, e.g.
        ``model.layers.0.mlp.down_proj``."""
        super().__init__()
        self.tp = get_tp_group()
        self.in_features, self.out_features = in_features, out_features
        self.full_in_features = full_in_features or in_features
        self.full_out_features = full_out_features or out_features
        self.output_partition_sizes = output_partition_sizes or [out_features]
        self.prefix = prefix
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        # Unquantized layers take the backend's dense method, chosen now (layer_ops).
        self.quant: QuantMethod = method or current_layer_ops().unquantized_linear()
        self.quant.create_weights(self, in_features, out_features, dtype, self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            set_weight_dims(self.bias, input_dim=None, output_dim=0)
            set_weight_loader(self.bias, self.weight_loader)
        else:
            self.register_parameter("bias", None)

    @property
    def input_is_sharded(self) -> bool:
        """Whether this rank holds only part of the input features (row parallel, tp > 1)."""
        return self.in_features != self.full_in_features

    def weight_loader(self, param, loaded, shard_id=None):
        copy_into(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant.apply(self, x, self.bias)
        return out if self.lora is None else self.lora(out, x)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole layer (small projections, routers)."""

    def __init__(self, in_features, out_features, bias=False, dtype=torch.float32, quant_config=None,
                 prefix=""):
        super().__init__(in_features, out_features, bias, dtype, quant_config, prefix)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays split."""

    def __init__(self, in_features, out_features, bias=False, dtype=torch.float32, quant_config=None,
                 prefix="", output_sizes: list[int] | None = None):
        tp = get_tp_group()
        local = [divide(s, tp.size) for s in (output_sizes or [out_features])]
        super().__init__(in_features, divide(out_features, tp.size), bias, dtype, quant_config, prefix,
                         full_out_features=out_features, output_partition_sizes=local)

    def weight_loader(self, param, loaded, shard_id=None):
        _, dim, _, _ = weight_dims(param)
        if dim is None:  # not split by output (e.g. g_idx): every rank holds all of it
            copy_into(param, loaded)
            return
        rows = param.shape[dim]
        expect_dim(loaded, dim, rows * self.tp.size)
        copy_into(param, narrow(loaded, dim, self.tp.rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers in one matmul (gate and up projections)."""

    def __init__(self, in_features, output_sizes: list[int], bias=False, dtype=torch.float32,
                 quant_config=None, prefix=""):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype, quant_config, prefix, output_sizes)

    def weight_loader(self, param, loaded, shard_id=None):
        _, dim, _, _ = weight_dims(param)
        if dim is None:  # the same tensor for every part (e.g. g_idx): load it whole
            copy_into(param, loaded)
            return
        units = [in_param_units(param, dim, s) for s in self.output_sizes]
        if shard_id is None:  # already merged in the checkpoint (e.g. Phi-3 gate_up_proj)
            for i, u in enumerate(units):
                self.weight_loader(param, narrow(loaded, dim, sum(units[:i]), u), i)
            return
        expect_dim(loaded, dim, units[shard_id])
        size = units[shard_id] // self.tp.size
        offset = sum(units[:shard_id]) // self.tp.size
        copy_into(param.data.narrow(dim, offset, size), narrow(loaded, dim, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul; KV heads replicate when fewer than ranks."""

    def __init__(self, hidden_size, head_dim, num_heads, num_kv_heads, bias=False,
                 dtype=torch.float32, quant_config=None, prefix=""):
        tp = get_tp_group()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size)
        if num_kv_heads >= tp.size:
            self.num_kv_heads, self.kv_replicas = divide(num_kv_heads, tp.size), 1
        else:
            self.num_kv_heads, self.kv_replicas = 1, divide(tp.size, num_kv_heads)
        q, kv = self.num_heads * head_dim * tp.size, self.num_kv_heads * head_dim * tp.size
        super().__init__(hidden_size, q + 2 * kv, bias, dtype, quant_config, prefix, [q, kv, kv])

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param, loaded, shard_id=None):
        _, dim, _, _ = weight_dims(param)
        if dim is None:  # the same tensor for q, k and v (e.g. g_idx): load it whole
            copy_into(param, loaded)
            return
        if shard_id is None:  # fused qkv in the checkpoint, laid out [q; k; v]
            total_q = in_param_units(param, dim, self.q_size * self.tp.size)
            total_kv = shape_of(loaded)[dim] - total_q
            self.weight_loader(param, narrow(loaded, dim, 0, total_q), "q")
            self.weight_loader(param, narrow(loaded, dim, total_q, total_kv // 2), "k")
            self.weight_loader(param, narrow(loaded, dim, total_q + total_kv // 2, total_kv // 2), "v")
            return
        q_units, kv_units = in_param_units(param, dim, self.q_size), in_param_units(param, dim, self.kv_size)
        if shard_id == "q":
            offset, size, rank = 0, q_units, self.tp.rank
        else:
            offset = q_units + (kv_units if shard_id == "v" else 0)
            size, rank = kv_units, self.tp.rank // self.kv_replicas
        expect_dim(loaded, dim, size * self.tp.size // (1 if shard_id == "q" else self.kv_replicas))
        copy_into(param.data.narrow(dim, offset, size), narrow(loaded, dim, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features, out_features, bias=False, dtype=torch.float32, quant_config=None,
                 prefix=""):
        tp = get_tp_group()
        super().__init__(divide(in_features, tp.size), out_features, bias, dtype, quant_config, prefix,
                         full_in_features=in_features)

    def weight_loader(self, param, loaded, shard_id=None):
        dim, _, _, _ = weight_dims(param)
        if dim is None:  # not split by input (the bias; scales of act-order layers)
            copy_into(param, loaded)
            return
        cols = param.shape[dim]
        expect_dim(loaded, dim, cols * self.tp.size)
        copy_into(param, narrow(loaded, dim, self.tp.rank * cols, cols))

    def forward(self, x):
        out = self.quant.apply(self, x, None)
        if self.lora is not None:
            # Before the all-reduce: this rank's partial delta from its slice of A (sharding.py).
            out = self.lora(out, x)
        out = self.tp.all_reduce(out)
        return out + self.bias if self.bias is not None else out
