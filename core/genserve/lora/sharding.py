"""This rank's LoRA matrices for one linear layer and one adapter.

A layer's delta is ``B @ A @ x`` (the scale is folded into B). The layer's own ``weight_loader``
places every slice, so fused layers and tensor parallelism follow the base weights exactly:

- Column-parallel layers (incl. fused qkv_proj / gate_up_proj) split their output rows across
  ranks and see the full input: A is replicated, B is split by output rows like the weight.
  A fused layer gets one block of LoRA rank per sub-projection: A stacks [A_q; A_k; A_v] and B
  is block-diagonal, B_q in the q rows and q's rank columns, etc., so the adapter for q_proj
  only changes the q slice of the output (and an adapter without k_proj leaves k untouched).
- Row-parallel layers (o_proj, down_proj) split their input columns and all-reduce partial
  outputs. A is split by input columns like the weight, B is replicated, and the partial delta
  ``B @ (A_rank @ x_rank)`` is added to the partial output *before* the all-reduce: the sum over
  ranks of ``A_rank @ x_rank`` is ``A @ x``, so the all-reduce that already runs produces the
  exact delta. Computing it on the full input instead would need an extra all-gather of x.
"""

from __future__ import annotations

import torch

from genserve.layers.linear import LinearBase, RowParallelLinear
from genserve.lora.errors import LoRAError
from genserve.lora.peft_format import LoRAModule


def shard_for_layer(adapter_id: str, layer: LinearBase, parts: list[tuple[object, str, LoRAModule]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [R, in_local], B [out_local, R]) in float32 on the CPU, R = the parts' summed ranks.

    ``parts``: (shard id, PEFT module name, weights) of the sub-projections this adapter targets.
    """
    rank = sum(p.rank for _, _, p in parts)
    a = torch.zeros(rank, layer.in_features)
    b = torch.zeros(layer.out_features, rank)
    row_parallel = isinstance(layer, RowParallelLinear)
    col = 0
    for shard_id, name, part in parts:
        a_block, b_block = a[col:col + part.rank], b[:, col:col + part.rank]
        scaled_b = part.b * part.scale
        try:
            if row_parallel:
                layer.weight_loader(a_block, part.a)  # split by input columns
                _copy(b_block, scaled_b)
            else:
                _copy(a_block, part.a)
                layer.weight_loader(b_block, scaled_b, shard_id)  # this rank's output rows
        except ValueError as exc:
            raise LoRAError(adapter_id, f"module {name!r} (lora_A {tuple(part.a.shape)}, lora_B "
                                        f"{tuple(part.b.shape)}) does not fit the base model's layer: "
                                        f"{exc} (an adapter for another model?)") from exc
        col += part.rank
    return a, b


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape {tuple(src.shape)} where {tuple(dst.shape)} is expected")
    dst.copy_(src)
