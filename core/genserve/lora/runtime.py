"""What a linear layer needs at run time: its adapter slots and the step's row -> slot map.

How a layer learns the step's adapters: the engine puts a ``LoRABatch`` in
``ForwardBatch.lora`` (``LoRAManager.batch_for``; tensor-parallel workers receive it from rank 0
with the step's other inputs, ``distributed/channel.py``). Linear layers never see the
ForwardBatch, so ``ModelRunner.execute`` makes it current in the one ``LoRAContext`` shared by
every adapted layer for the forward's duration (``LoRAManager.active``), as vLLM's runner sets
its LoRA mapping before each forward. A step without adapter rows has ``lora`` None, so adapted
layers return at once; a model without adapters has no ``LinearBase.lora`` attached at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoRABatch:
    """One step's adapters: ``index[row]`` is the slot of each token row's adapter, -1 for none.

    ``loads``: (slot, adapter number) pairs to copy from the host into their slots before the
    forward (adapter numbers are registration order, the same on every tensor-parallel rank).
    ``meta``: the LoRA method's per-step metadata (``LoRAMethod.prepare``), made by the first
    adapted layer of the forward and shared by the others.
    """

    index: torch.Tensor  # [T] long, on the model's device
    index_cpu: torch.Tensor | None  # the same on the host (sent to tensor-parallel ranks)
    loads: list[tuple[int, int]] = field(default_factory=list)
    loaded: bool = False  # the loads were copied (once per step, whoever runs it first)
    meta: object = None


class LoRAContext:
    """The step being run; set around each forward by ``LoRAManager.active``."""

    current: LoRABatch | None = None


class LoRALayer:
    """One linear layer's adapter slots: A [S, R, in], B [S, out, R] at fixed addresses (CUDA
    graphs read them), R = ``--max-lora-rank`` x the layer's fused parts; smaller ranks and
    modules an adapter does not target are zero in its slot, scales folded into B. Called by
    ``LinearBase.forward`` with the base output (before a row-parallel all-reduce) and its input."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, method, context: LoRAContext):
        self.a, self.b, self.method, self.context = a, b, method, context
        self.scales = torch.ones(a.shape[0], dtype=a.dtype, device=a.device)

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        step = self.context.current
        if step is None:
            return y
        if step.meta is None:
            step.meta = self.method.prepare(step.index, self.a.shape[0])
        shape = y.shape
        out = self.method.apply(y.reshape(-1, shape[-1]), x.reshape(-1, x.shape[-1]),
                                self.a, self.b, self.scales, step.index, step.meta)
        return out.reshape(shape)
