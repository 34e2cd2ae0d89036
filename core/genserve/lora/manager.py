"""``LoRAManager``: every loaded adapter stacked per target layer, attached to the model.

Each adapter gets a slot (its position in ``--lora-adapters``). For every linear layer that any
adapter targets, the manager builds A [n_slots, R, in] and B [n_slots, out, R] on the device
(R = the largest rank any adapter has there; smaller ranks and adapters that do not target the
layer are zero-padded, which adds exactly nothing) and sets ``layer.lora``. Layers no adapter
targets keep ``lora = None`` and run unchanged.

Each step's adapter rows travel in ``ForwardBatch.lora`` (``batch_for``; tensor-parallel
workers receive them from rank 0 with the step's other inputs), and ``ModelRunner.execute``
makes them current with ``active`` for the forward's duration: no hooks, no collectives here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from genserve.device import upload
from genserve.layers.linear import LinearBase
from genserve.lora.errors import LoRAError
from genserve.lora.mapping import check_model, resolve
from genserve.lora.peft_format import PeftAdapter
from genserve.lora.runtime import LoRABatch, LoRAContext, LoRALayer
from genserve.lora.sharding import shard_for_layer
from genserve.models.base import CausalLM

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, model: CausalLM, adapters: list[PeftAdapter], method, device: torch.device,
                 dtype: torch.dtype):
        self.adapter_ids = [a.adapter_id for a in adapters]
        self.slots = {aid: i for i, aid in enumerate(self.adapter_ids)}
        self.device = torch.device(device)
        self.context = LoRAContext()
        self.layers: dict[str, LoRALayer] = {}
        self._attached: list[LinearBase] = []

        modules = dict(model.named_modules())
        n = len(adapters)
        per_layer: dict[str, list[list]] = {}
        for slot, adapter in enumerate(adapters):
            check_model(adapter.adapter_id, model)
            seen: dict[tuple, str] = {}
            for name, part in adapter.modules.items():
                target = resolve(adapter.adapter_id, model, name, modules)
                key = (target.layer, target.shard_id)
                if key in seen or (target.layer, None) in seen or \
                        (target.shard_id is None and any(k[0] == target.layer for k in seen)):
                    raise LoRAError(adapter.adapter_id, f"modules {seen.get(key, '?')!r} and {name!r} "
                                                        f"overlap in {target.layer!r}")
                seen[key] = name
                per_layer.setdefault(target.layer, [[] for _ in range(n)])[slot].append(
                    (target.shard_id, name, part))

        for layer_name, by_slot in per_layer.items():
            layer = modules[layer_name]
            shards = [shard_for_layer(adapters[s].adapter_id, layer, parts) if parts else None
                      for s, parts in enumerate(by_slot)]
            rank = max(a.shape[0] for a, _ in filter(None, shards))
            a = torch.zeros(n, rank, layer.in_features)
            b = torch.zeros(n, layer.out_features, rank)
            for s, shard in enumerate(shards):
                if shard is not None:
                    a[s, :shard[0].shape[0]] = shard[0]
                    b[s, :, :shard[1].shape[1]] = shard[1]
            lora = LoRALayer(a.to(self.device, dtype), b.to(self.device, dtype), method, self.context)
            layer.lora = lora
            self.layers[layer_name] = lora
            self._attached.append(layer)

        logger.info("LoRA: %d adapter(s) %s on %d layers, method %s", n, self.adapter_ids,
                    len(self.layers), getattr(method, "name", type(method).__name__))

    # -- per step ---------------------------------------------------------------------------
    def batch_for(self, adapter_ids: list[str | None], q_lens: list[int]) -> LoRABatch | None:
        """The step's per-row adapter slots (rows of a sequence are contiguous, in order);
        None when no row uses an adapter, so the step costs nothing extra."""
        if len(adapter_ids) != len(q_lens):
            raise ValueError(f"{len(adapter_ids)} adapter ids for {len(q_lens)} sequences")
        if all(a is None for a in adapter_ids):
            return None
        slots = []
        for aid in adapter_ids:
            if aid is not None and aid not in self.slots:
                raise ValueError(f"LoRA adapter {aid!r} is not loaded; loaded: {self.adapter_ids}")
            slots.append(-1 if aid is None else self.slots[aid])
        index_cpu = torch.repeat_interleave(torch.tensor(slots, dtype=torch.long),
                                            torch.tensor(q_lens, dtype=torch.long))
        return LoRABatch(upload(index_cpu, self.device), index_cpu)

    @contextmanager
    def active(self, step: LoRABatch | None) -> Iterator[None]:
        """Make ``step`` (a ``ForwardBatch.lora``) the rows every adapted layer applies, for one
        forward; cleared afterwards, also when the forward raises."""
        self.context.current = step
        try:
            yield
        finally:
            self.context.current = None

    def close(self) -> None:
        """Detach from the model (tests; a server keeps its adapters for its lifetime)."""
        self.context.current = None
        for layer in self._attached:
            layer.lora = None
        self._attached.clear()
        self.layers.clear()
