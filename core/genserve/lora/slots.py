"""Which adapter sits in which device slot: least-recently-used assignment (S-LoRA, vLLM).

The device holds ``max_loras`` slots per adapted layer; many more adapters are registered on
the host. Each step asks for the adapters its rows use; one not resident takes a free slot, or
evicts the least recently used adapter that neither this step nor a running request uses (the
scheduler keeps the running requests' distinct adapters within the slot count, so a victim
always exists for steps the scheduler built). Pure bookkeeping: the copies are the manager's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable


class SlotTable:
    """``max_loras`` slots; ``assign`` maps a step's adapters to slots, least recently used first
    out. ``in_use`` (set by the engine) returns the adapters running requests hold: never evicted."""

    def __init__(self, max_loras: int):
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras}")
        self.max_loras = max_loras
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, least recent first
        self.free = list(range(max_loras - 1, -1, -1))  # popped from the end: slot 0 first
        self.in_use: Callable[[], Collection[str]] = frozenset
        self.loads = 0  # adapters copied into a slot so far (slot misses)

    def slot_of(self, adapter_id: str) -> int | None:
        return self.resident.get(adapter_id)

    def assign(self, adapter_ids: Iterable[str]) -> tuple[dict[str, int], list[tuple[int, str]]]:
        """Slots for ``adapter_ids`` (the distinct adapters of one step) and the loads it needs:
        [(slot, adapter)] for adapters that were not resident. Every adapter of the step is
        marked most recently used.

        Raises RuntimeError when the step needs more adapters than there are slots, or when
        every slot is held by adapters this step or a running request uses (a scheduler bug).
        """
        wanted = list(dict.fromkeys(adapter_ids))
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"one step needs {len(wanted)} LoRA adapters but there are only "
                               f"{self.max_loras} slots (--max-loras)")
        loads: list[tuple[int, str]] = []
        protected = set(wanted) | set(self.in_use())
        for aid in wanted:
            if aid in self.resident:
                continue
            slot = self.free.pop() if self.free else self._evict(protected)
            self.resident[aid] = slot
            loads.append((slot, aid))
            self.loads += 1
        for aid in wanted:
            self.resident.move_to_end(aid)
        return {aid: self.resident[aid] for aid in wanted}, loads

    def _evict(self, protected: set[str]) -> int:
        for victim in self.resident:  # least recently used first
            if victim not in protected:
                return self.resident.pop(victim)
        raise RuntimeError(f"all {self.max_loras} LoRA slots hold adapters in use "
                           f"({sorted(self.resident)}); the scheduler admitted too many adapters")

    def drop(self, adapter_id: str) -> None:
        """Forget ``adapter_id`` (unloaded): its slot becomes free."""
        slot = self.resident.pop(adapter_id, None)
        if slot is not None:
            self.free.append(slot)
