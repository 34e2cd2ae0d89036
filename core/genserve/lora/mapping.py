"""Which genserve linear layer (and which part of its output) a PEFT module name adapts.

The model's own checkpoint mapping decides, so no architecture is named here:
``rename_weight`` turns the transformers name into ours, and ``stacked_params`` says which fused
layer a projection lives in. E.g. for Llama, ``model.layers.0.self_attn.k_proj`` becomes
(``layers.0.self_attn.qkv_proj``, ``"k"``): the adapter may only touch the k slice of qkv_proj's
output, which the layer's own ``weight_loader`` locates (see ``sharding.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from genserve.layers.linear import LinearBase
from genserve.lora.errors import LoRAError
from genserve.models.base import CausalLM


@dataclass(frozen=True)
class Target:
    layer: str  # module name in our model
    shard_id: object  # the part of a fused layer's output ("q", 1, ...); None: the whole layer


def check_model(adapter_id: str, model: CausalLM) -> None:
    """Models whose checkpoint names go through the generic mapping can take adapters."""
    if model.is_encoder_decoder:
        raise LoRAError(adapter_id, f"{type(model).__name__} is an encoder-decoder model; LoRA is "
                                    "supported on decoder-only models")
    if type(model).load_weights is not CausalLM.load_weights:
        raise LoRAError(adapter_id, f"{type(model).__name__} maps its checkpoint with its own "
                                    "load_weights, so PEFT module names cannot be mapped to its layers")


def resolve(adapter_id: str, model: CausalLM, peft_module: str, modules: dict[str, nn.Module]) -> Target:
    """The layer a PEFT module path adapts, or a LoRAError saying why it can't be adapted."""
    renamed = model.rename_weight(peft_module + ".weight")
    if renamed is None or not renamed.endswith(".weight"):
        raise LoRAError(adapter_id, f"target {peft_module!r} is not a layer of "
                                    f"{type(model).__name__} (its weights are dropped at load time)")
    name = renamed[: -len(".weight")]
    target = None
    for fragment, (fused, shard_id) in model.stacked_params:  # same rule as CausalLM.load_weights
        if fragment in name and name.replace(fragment, fused) in modules:
            target = Target(name.replace(fragment, fused), shard_id)
            break
    if target is None and name in modules:
        target = Target(name, None)
    if target is None:
        raise LoRAError(adapter_id, f"target {peft_module!r} has no counterpart in "
                                    f"{type(model).__name__}")
    layer = modules[target.layer]
    if not isinstance(layer, LinearBase):
        leaf = peft_module.rsplit(".", 1)[-1]
        why = ("LoRA on embeddings and the LM head is not supported"
               if leaf in ("embed_tokens", "lm_head", "wte", "embed_out") or "embed" in leaf
               else "only linear layers can be adapted")
        raise LoRAError(adapter_id, f"target {peft_module!r} is a {type(layer).__name__}: {why}")
    return target
