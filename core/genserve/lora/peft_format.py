"""Reading a PEFT LoRA adapter: ``adapter_config.json`` plus ``adapter_model.safetensors``
(or ``adapter_model.bin``), into one (A, B, scale) per adapted module.

Only what genserve can apply exactly is accepted; everything else is refused here, at startup,
with the adapter's id and the reason.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genserve.lora.errors import LoRAError

# PEFT saves ``base_model.model.<module path>.lora_A.weight`` (older versions kept the adapter
# name: ``...lora_A.default.weight``).
TENSOR_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


# Module names of input embeddings and LM heads in transformers' models.
EMBEDDING_NAMES = {"lm_head", "embed_tokens", "embed_out", "wte", "word_embeddings", "embed_in"}


@dataclass
class LoRAModule:
    """One adapted module, as PEFT named it (``model.layers.0.self_attn.q_proj``)."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class PeftAdapter:
    adapter_id: str
    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: object = None
    modules: dict[str, LoRAModule] = field(default_factory=dict)


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a pattern matches a module path ending in it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _check_config(adapter_id: str, cfg: dict) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAError(adapter_id, f"peft_type {peft_type} is not supported (only LORA)")
    refusals = [
        (cfg.get("use_dora"), "DoRA (use_dora) is not supported"),
        (cfg.get("modules_to_save"), (f"modules_to_save {cfg.get('modules_to_save')} is not supported "
                                      "(it replaces whole base-model modules)")),
        (cfg.get("bias", "none") not in (None, "none"), (f"bias={cfg.get('bias')!r} is not supported "
                                                         "(it trains base-model biases)")),
        (cfg.get("lora_bias"), "lora_bias is not supported"),
        (cfg.get("target_parameters"), ("target_parameters (LoRA on raw parameters, e.g. MoE experts) "
                                        "is not supported")),
        (cfg.get("layer_replication"), "layer_replication is not supported"),
        (cfg.get("use_qalora"), "QALoRA is not supported"),
    ]
    for refused, reason in refusals:
        if refused:
            raise LoRAError(adapter_id, reason)
    targets = cfg.get("target_modules")
    for name in targets if isinstance(targets, list) else ():
        if name in EMBEDDING_NAMES:
            raise LoRAError(adapter_id, f"target {name!r}: LoRA on embeddings and the LM head is "
                                        "not supported")


def _read_tensors(adapter_id: str, path: Path) -> dict[str, torch.Tensor]:
    st, binary = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st), device="cpu")
    if binary.exists():
        return torch.load(str(binary), map_location="cpu", weights_only=True)
    raise LoRAError(adapter_id, f"{path} has neither adapter_model.safetensors nor adapter_model.bin")


def read_peft_adapter(adapter_id: str, path: Path) -> PeftAdapter:
    config_file = Path(path) / "adapter_config.json"
    if not config_file.exists():
        raise LoRAError(adapter_id, f"{path} has no adapter_config.json (not a PEFT adapter)")
    cfg = json.loads(config_file.read_text())
    _check_config(adapter_id, cfg)
    adapter = PeftAdapter(adapter_id, Path(path), int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"])),
                          bool(cfg.get("use_rslora", False)), cfg.get("target_modules"))

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in _read_tensors(adapter_id, Path(path)).items():
        m = TENSOR_NAME.match(name)
        if m is None:
            if "lora_embedding" in name:
                why = "LoRA on embeddings is not supported"
            elif "lora_magnitude_vector" in name:
                why = "DoRA is not supported"
            elif not any(k in name for k in ("lora_A", "lora_B")):
                why = ("the adapter carries a full base-model tensor (modules_to_save or saved "
                       "embedding layers), which is not supported")
            else:
                why = "only lora_A / lora_B weights of linear layers are supported"
            raise LoRAError(adapter_id, f"tensor {name!r}: {why}")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    if not pairs:
        raise LoRAError(adapter_id, f"{path} holds no LoRA weights")

    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoRAError(adapter_id, f"module {module!r} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoRAError(adapter_id, f"module {module!r}: lora_A {tuple(a.shape)} and lora_B "
                                        f"{tuple(b.shape)} are not a linear LoRA pair")
        # PEFT: per-module rank and alpha from rank_pattern / alpha_pattern, else the global ones.
        r = a.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, adapter.lora_alpha))
        scale = alpha / math.sqrt(r) if adapter.use_rslora else alpha / r
        adapter.modules[module] = LoRAModule(a, b, scale)
    return adapter
