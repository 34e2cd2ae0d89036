"""``TritonSGMVLoRA``: the LoRA method of CUDA GPUs, registered as "triton_sgmv".

Per step the rows are sorted by adapter slot once (``prepare``, shared by every adapted layer
of the forward); each layer then runs one shrink and one expand launch over all rows
(``genserve_cuda.kernels.lora``). Fused projections (qkv_proj, gate_up_proj) are one layer
with their sub-projections' ranks stacked in A and B block-diagonal, so they too take one
launch each. Graph-safe: only device work on fixed shapes.
"""

from __future__ import annotations

import torch
from genserve.layers.lora import LoRAMethod


class TritonSGMVLoRA(LoRAMethod):
    name = "triton_sgmv"
    graph_safe = True

    def prepare(self, index: torch.Tensor, num_slots: int):
        from genserve_cuda.kernels.lora import sort_rows

        return sort_rows(index, num_slots)

    def apply(self, y, x, lora_a, lora_b, scales, index, meta=None):
        from genserve_cuda.kernels.lora import lora_expand, lora_shrink

        rows = meta if meta is not None else self.prepare(index, lora_a.shape[0])
        y = y.contiguous()
        return lora_expand(y, lora_shrink(x.contiguous(), lora_a, rows), lora_b, scales, rows)
