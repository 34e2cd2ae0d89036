"""``LoRAManager``: adapters registered on the host, a fixed number of device slots per layer.

Every registered adapter is kept on the host as this rank's (A, B) per adapted layer, in the
serving dtype (pinned on GPUs). Every layer that can take adapters gets slot tensors
A [S, R, in] and B [S, out, R] on the device at fixed addresses, S = ``--max-loras``,
R = ``--max-lora-rank`` x the layer's fused parts (3 for qkv_proj, 2 for gate_up_proj): an
adapter of lower rank, or one that leaves a layer alone, is zero there, which adds exactly
nothing. Each step ``batch_for`` maps its adapters to slots (``SlotTable``: least recently used
out, never one a running request holds) and lists the host -> slot copies the step needs;
``active`` makes the copies and the row -> slot map current for one forward.

Which layers get slots: those any startup adapter targets, or every linear layer when adapters
may be loaded at run time (``--enable-lora-runtime-updates``), since a later adapter may target
any of them. Other layers keep ``lora = None`` and run unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from genserve.device import upload
from genserve.layers.linear import LinearBase
from genserve.lora.errors import LoRAError
from genserve.lora.mapping import check_model, resolve
from genserve.lora.peft_format import PeftAdapter
from genserve.lora.runtime import LoRABatch, LoRAContext, LoRALayer
from genserve.lora.sharding import shard_for_layer
from genserve.lora.slots import SlotTable
from genserve.models.base import CausalLM

logger = logging.getLogger(__name__)


@dataclass
class HostAdapter:
    """A registered adapter as this rank applies it: per layer, (A [r, in_local], B [out_local, r])
    with the scale folded into B, on the host in the serving dtype."""

    adapter_id: str
    number: int  # registration order: names the adapter in tensor-parallel messages
    path: Path
    rank: int  # the largest rank of any of its modules
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def adapter_shards(model: CausalLM, modules: dict[str, nn.Module], adapter: PeftAdapter
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """This rank's float32 (A, B) of every layer ``adapter`` targets (fused sub-projections
    stacked, ``sharding.py``). Raises LoRAError for a module that maps to no layer, or two
    modules that overlap in one layer, or shapes that do not fit the base model."""
    check_model(adapter.adapter_id, model)
    per_layer: dict[str, list] = {}
    seen: dict[tuple, str] = {}
    layers: dict[str, LinearBase] = {}
    for name, part in adapter.modules.items():
        target = resolve(adapter.adapter_id, model, name, modules)
        layer = modules[target.layer]
        assert isinstance(layer, LinearBase)  # resolve() refuses anything else
        layers[target.layer] = layer
        key = (target.layer, target.shard_id)
        if key in seen or (target.layer, None) in seen or \
                (target.shard_id is None and any(k[0] == target.layer for k in seen)):
            raise LoRAError(adapter.adapter_id, f"modules {seen.get(key, '?')!r} and {name!r} "
                                                f"overlap in {target.layer!r}")
        seen[key] = name
        per_layer.setdefault(target.layer, []).append((target.shard_id, name, part))
    return {name: shard_for_layer(adapter.adapter_id, layers[name], parts)
            for name, parts in per_layer.items()}


def slot_rank(layer: LinearBase, max_lora_rank: int) -> int:
    """Columns of rank a slot of ``layer`` has: ``max_lora_rank`` per fused sub-projection."""
    return max_lora_rank * len(layer.output_partition_sizes)


class LoRAManager:
    """Host-registered adapters and the device slots of every adaptable layer.

    ``layer_names``: the layers that get slots (module names of ``LinearBase`` layers);
    ``max_loras``: slots (adapters on the device at once); ``max_lora_rank``: the largest rank
    of any adapted module. ``register``/``unregister`` may be called from another thread than
    the one stepping the engine (HTTP loading): one lock orders them with ``batch_for``.
    """

    def __init__(self, model: CausalLM, method, device: torch.device, dtype: torch.dtype, *,
                 max_loras: int, max_lora_rank: int, layer_names: Iterable[str]):
        if max_lora_rank < 1:
            raise ValueError(f"--max-lora-rank must be at least 1, got {max_lora_rank}")
        self.model, self.method = model, method
        self.device, self.dtype = torch.device(device), dtype
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.table = SlotTable(max_loras)
        self.context = LoRAContext()
        self.adapters: dict[str, HostAdapter] = {}
        self._by_number: dict[int, HostAdapter] = {}
        self._next_number = 0
        self._lock = threading.RLock()
        self._modules = dict(model.named_modules())
        self.layers: dict[str, LoRALayer] = {}
        self._attached: list[LinearBase] = []
        for name in sorted(layer_names):
            layer = self._modules[name]
            r = slot_rank(layer, max_lora_rank)
            a = torch.zeros(max_loras, r, layer.in_features, dtype=dtype, device=self.device)
            b = torch.zeros(max_loras, layer.out_features, r, dtype=dtype, device=self.device)
            layer.lora = self.layers[name] = LoRALayer(a, b, method, self.context)
            self._attached.append(layer)

    @property
    def adapter_ids(self) -> list[str]:
        """Registered adapters, in registration order."""
        return list(self.adapters)

    # -- registry -------------------------------------------------------------------------
    def prepare_adapter(self, adapter: PeftAdapter) -> HostAdapter:
        """Validate ``adapter`` against the model and the slots and build its host copy, without
        registering it (the slow part of a run-time load, off the engine's lock). Raises
        LoRAError: a module above ``--max-lora-rank``, a target without slots, shapes that do
        not fit the base model."""
        aid = adapter.adapter_id
        for name, part in adapter.modules.items():
            if part.rank > self.max_lora_rank:
                raise LoRAError(aid, f"module {name!r} has rank {part.rank}, above --max-lora-rank "
                                     f"{self.max_lora_rank}")
        layers = {}
        for layer, (a, b) in adapter_shards(self.model, self._modules, adapter).items():
            slots = self.layers.get(layer)
            if slots is None:
                raise LoRAError(aid, f"targets {layer!r}, which has no LoRA slots: only layers the "
                                     "startup adapters target have them unless "
                                     "--enable-lora-runtime-updates gives every linear layer slots")
            if a.shape[0] > slots.a.shape[1]:  # more sub-projections than the layer fuses
                raise LoRAError(aid, f"layer {layer!r} needs rank {a.shape[0]}, its slots hold "
                                     f"{slots.a.shape[1]}")
            a, b = a.to(self.dtype), b.to(self.dtype)
            if self.device.type == "cuda":  # pinned: slot loads copy without blocking
                a, b = a.pin_memory(), b.pin_memory()
            layers[layer] = (a, b)
        rank = max((p.rank for p in adapter.modules.values()), default=0)
        return HostAdapter(aid, -1, adapter.path, rank, layers)

    def register(self, adapter: PeftAdapter | HostAdapter) -> HostAdapter:
        """Add an adapter (validated by ``prepare_adapter`` when given as a ``PeftAdapter``).
        Raises LoRAError if its id is already registered."""
        host = self.prepare_adapter(adapter) if isinstance(adapter, PeftAdapter) else adapter
        with self._lock:
            if host.adapter_id in self.adapters:
                raise LoRAError(host.adapter_id, "an adapter with this name is already loaded")
            host.number, self._next_number = self._next_number, self._next_number + 1
            self.adapters[host.adapter_id] = self._by_number[host.number] = host
        return host

    def unregister(self, adapter_id: str) -> None:
        """Forget an adapter: its host copy and its slot. The caller makes sure no request uses
        it (``LLMEngine.adapter_users``). Raises KeyError if it is not registered."""
        with self._lock:
            host = self.adapters.pop(adapter_id)
            del self._by_number[host.number]
            self.table.drop(adapter_id)

    # -- per step ---------------------------------------------------------------------------
    def batch_for(self, adapter_ids: list[str | None], q_lens: list[int]) -> LoRABatch | None:
        """The step's per-row slots (rows of a sequence are contiguous, in order) and the slot
        loads it needs; None when no row uses an adapter, so the step costs nothing extra.

        Raises ValueError for an adapter that is not registered, RuntimeError when the step's
        adapters cannot all have a slot (more of them than ``max_loras``)."""
        if len(adapter_ids) != len(q_lens):
            raise ValueError(f"{len(adapter_ids)} adapter ids for {len(q_lens)} sequences")
        if all(a is None for a in adapter_ids):
            return None
        with self._lock:
            unknown = sorted({a for a in adapter_ids if a is not None and a not in self.adapters})
            if unknown:
                raise ValueError(f"LoRA adapter {unknown[0]!r} is not loaded; loaded: {self.adapter_ids}")
            slots, loads = self.table.assign(a for a in adapter_ids if a is not None)
            numbered = [(slot, self.adapters[aid].number) for slot, aid in loads]
        rows = [-1 if aid is None else slots[aid] for aid in adapter_ids]
        index_cpu = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long),
                                            torch.tensor(q_lens, dtype=torch.long))
        return LoRABatch(upload(index_cpu, self.device), index_cpu, numbered)

    def load_slots(self, step: LoRABatch | None) -> None:
        """Copy the adapters ``step`` needs from the host into their slots (once per step).
        The copies are queued on the current stream, so a step still running on the device
        reads the old contents."""
        if step is None or step.loaded:
            return
        for slot, number in step.loads:
            host = self._by_number[number]
            stale: list[torch.Tensor] = []  # what the previous adapter left past this one's rank
            for name, lora in self.layers.items():
                ab = host.layers.get(name)
                r = 0 if ab is None else ab[0].shape[0]
                if ab is not None:
                    lora.a[slot, :r].copy_(ab[0], non_blocking=True)
                    lora.b[slot, :, :r].copy_(ab[1], non_blocking=True)
                if r < lora.a.shape[1]:
                    stale += [lora.a[slot, r:], lora.b[slot, :, r:]]
            if stale:
                torch._foreach_zero_(stale)  # one multi-tensor launch, not one per layer
        step.loaded = True

    @contextmanager
    def active(self, step: LoRABatch | None) -> Iterator[None]:
        """Load ``step``'s slots and make its rows (a ``ForwardBatch.lora``) the ones every
        adapted layer applies, for one forward; cleared afterwards, also when the forward raises."""
        self.load_slots(step)
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
