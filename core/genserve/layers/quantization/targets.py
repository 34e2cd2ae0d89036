"""Which layers a checkpoint quantized: ignore lists, ``re:`` patterns and fused projections.

Checkpoints name the projections they skip the way the tool saw them (``q_proj``, ``gate_proj``);
genserve fuses some of them (``qkv_proj``, ``gate_up_proj``). A fused layer is asked about each
of its parts, and parts that disagree are refused (one matmul cannot be half quantized).
"""

from __future__ import annotations

import re

from genserve.layers.quantization.base import QuantizationError

# genserve's fused projection -> the checkpoint projections it holds (Llama family names).
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def part_prefixes(prefix: str) -> list[str]:
    """The checkpoint names a layer's ``prefix`` stands for (itself if not a fused name)."""
    head, _, last = prefix.rpartition(".")
    parts = FUSED_PARTS.get(last)
    if not parts:
        return [prefix]
    return [f"{head}.{p}" if head else p for p in parts]


def matches(name: str, pattern: str, module_class: str = "Linear") -> bool:
    """compressed-tensors target matching (its ``is_match``): ``re:<regex>`` matched at the start
    of the name (``re.match``), a class name (``Linear``), an exact name or a name suffix."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if pattern == module_class:
        return True
    return name == pattern or name.endswith("." + pattern)


def contains_module(name: str, fragment: str) -> bool:
    """transformers' ``modules_to_not_convert`` rule: ``fragment`` names the module or a parent."""
    return name == fragment or f".{fragment}." in f".{name}." or name.endswith("." + fragment) \
        or name.startswith(fragment + ".")


def decide(prefix: str, rule) -> object:
    """``rule(part_name)`` for every part of ``prefix``; the common answer, or a
    QuantizationError when the parts of a fused layer disagree."""
    answers = [(p, rule(p)) for p in part_prefixes(prefix)]
    first = answers[0][1]
    for name, answer in answers[1:]:
        if answer != first:
            raise QuantizationError(f"layer {prefix}: its parts are quantized differently "
                                    f"({answers[0][0]}: {first}; {name}: {answer}); a fused matmul "
                                    f"needs one scheme")
    return first
