"""What a linear layer needs at run time: its stacked adapters and the step's row -> adapter map.

How a layer learns the step's adapters: the engine puts a ``LoRABatch`` in
``ForwardBatch.lora`` (``LoRAManager.batch_for``; tensor-parallel workers receive it from rank 0
with the step's other inputs, ``distributed/channel.py``). Linear layers never see the
ForwardBatch, so ``ModelRunner.execute`` makes it current in the one ``LoRAContext`` shared by
every adapted layer for the forward's duration (``LoRAManager.active``), as vLLM's runner sets
its LoRA mapping before each forward. A step without adapter rows has ``lora`` None, so adapted
layers return at once; a model without adapters has no ``LinearBase.lora`` attached at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    """One step's adapters: ``index[row]`` is the adapter slot of each token row, -1 for none."""

    index: torch.Tensor  # [T] long, on the model's device
    index_cpu: torch.Tensor  # the same on the host (tensor-parallel ranks receive it from rank 0)


class LoRAContext:
    """The step being run; set around each forward by ``LoRAManager.active``."""

    current: LoRABatch | None = None


class LoRALayer:
    """One linear layer's adapters, stacked by slot: A [n, R, in], B [n, out, R], zero-padded
    to the largest rank R, scales folded into B. Called by ``LinearBase.forward`` with the base
    output (before a row-parallel all-reduce) and the layer's input."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, method, context: LoRAContext):
        self.a, self.b, self.method, self.context = a, b, method, context
        self.scales = torch.ones(a.shape[0], dtype=a.dtype, device=a.device)

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        step = self.context.current
        if step is None:
            return y
        shape = y.shape
        out = self.method.apply(y.reshape(-1, shape[-1]), x.reshape(-1, x.shape[-1]),
                                self.a, self.b, self.scales, step.index)
        return out.reshape(shape)
