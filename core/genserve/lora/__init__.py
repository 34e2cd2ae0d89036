"""LoRA adapters (``--lora-adapters``): loading PEFT adapters and applying them per request.

- ``spec``: the flag's syntax and where each adapter's files are (local or hub download)
- ``peft_format``: reading and validating a PEFT adapter
- ``mapping``: PEFT module names -> genserve linear layers (and fused-layer slices)
- ``sharding``: this tensor-parallel rank's A and B for a layer
- ``runtime``: the per-step row -> adapter map and the per-layer apply
- ``slots``: which adapter sits in which device slot (least recently used out)
- ``manager``: host-registered adapters, device slots per layer, ``batch_for`` each step
- ``directories``: run-time loading, restricted to configured directories
"""

from __future__ import annotations

import logging

from genserve.lora.errors import LoRAError
from genserve.lora.manager import LoRAManager
from genserve.lora.peft_format import PeftAdapter, read_peft_adapter
from genserve.lora.runtime import LoRABatch
from genserve.lora.spec import parse_lora_adapters, resolve_adapter_dir

__all__ = ["LoRABatch", "LoRAError", "LoRAManager", "PeftAdapter", "load_lora_manager",
           "parse_lora_adapters", "read_peft_adapter", "resolve_adapter_dir"]

logger = logging.getLogger(__name__)


# --max-loras when not given: one slot per startup adapter, at most this many (more adapters
# share the slots, least recently used out).
DEFAULT_MAX_LORAS = 16
# --max-lora-rank when not given and no startup adapter says more (vLLM's default).
DEFAULT_MAX_LORA_RANK = 16


def load_lora_manager(spec: str | None, model, method, device, dtype, revision: str | None = None, *,
                      max_loras: int | None = None, max_lora_rank: int | None = None,
                      runtime_updates: bool = False) -> LoRAManager:
    """Read every adapter named by ``--lora-adapters`` (may be none when ``runtime_updates``)
    and attach a ``LoRAManager`` with their slots to ``model``.

    ``max_loras`` (device slots) defaults to the number of startup adapters, at least 1 and at
    most ``DEFAULT_MAX_LORAS``; ``max_lora_rank`` to the largest rank of a startup adapter's
    module, at least ``DEFAULT_MAX_LORA_RANK`` when adapters may be loaded at run time.
    Raises LoRAError for an adapter that cannot be served, ValueError for bad limits."""
    from genserve.layers.linear import LinearBase
    from genserve.lora.manager import adapter_shards

    adapters = [read_peft_adapter(aid, resolve_adapter_dir(aid, source, revision))
                for aid, source in parse_lora_adapters(spec).items()]
    if not adapters and not runtime_updates:
        raise ValueError(f"--lora-adapters {spec!r} names no adapter")
    modules = dict(model.named_modules())
    if runtime_updates:  # a later adapter may target any linear layer
        layers = {n for n, m in modules.items() if isinstance(m, LinearBase)}
    else:
        layers = {layer for a in adapters for layer in adapter_shards(model, modules, a)}
    ranks = [p.rank for a in adapters for p in a.modules.values()]
    if max_lora_rank is None:
        max_lora_rank = max(ranks + [DEFAULT_MAX_LORA_RANK if runtime_updates or not ranks else 1])
    if max_loras is None:
        max_loras = min(max(1, len(adapters)), DEFAULT_MAX_LORAS)
    if max_loras < 1:
        raise ValueError(f"--max-loras must be at least 1, got {max_loras}")
    manager = LoRAManager(model, method, device, dtype, max_loras=max_loras,
                          max_lora_rank=max_lora_rank, layer_names=layers)
    for adapter in adapters:
        manager.register(adapter)
    logger.info("LoRA: %d adapter(s) %s on %d layers, %d slot(s) of rank %d, method %s",
                len(adapters), manager.adapter_ids, len(manager.layers), max_loras, max_lora_rank,
                getattr(method, "name", type(method).__name__))
    return manager
