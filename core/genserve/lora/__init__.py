"""LoRA adapters (``--lora-adapters``): loading PEFT adapters and applying them per request.

- ``spec``: the flag's syntax and where each adapter's files are (local or hub download)
- ``peft_format``: reading and validating a PEFT adapter
- ``mapping``: PEFT module names -> genserve linear layers (and fused-layer slices)
- ``sharding``: this tensor-parallel rank's A and B for a layer
- ``runtime``: the per-step row -> adapter map and the per-layer apply
- ``manager``: stacking all adapters per layer, attaching them, ``batch_for`` each step
"""

from __future__ import annotations

from genserve.lora.errors import LoRAError
from genserve.lora.manager import LoRAManager
from genserve.lora.peft_format import PeftAdapter, read_peft_adapter
from genserve.lora.runtime import LoRABatch
from genserve.lora.spec import parse_lora_adapters, resolve_adapter_dir

__all__ = ["LoRABatch", "LoRAError", "LoRAManager", "PeftAdapter", "load_lora_manager",
           "parse_lora_adapters", "read_peft_adapter", "resolve_adapter_dir"]


def load_lora_manager(spec: str, model, method, device, dtype, revision: str | None = None) -> LoRAManager:
    """Read every adapter named by ``--lora-adapters`` and attach them to ``model``."""
    adapters = [read_peft_adapter(aid, resolve_adapter_dir(aid, source, revision))
                for aid, source in parse_lora_adapters(spec).items()]
    if not adapters:
        raise ValueError(f"--lora-adapters {spec!r} names no adapter")
    return LoRAManager(model, adapters, method, device, dtype)
