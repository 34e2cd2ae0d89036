"""Tiny speculative checkpoints for tests: Medusa heads in TGI's layout and EAGLE-1 draft
layers in the EAGLE repository's layout, written next to / apart from a tiny target model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genserve.spec_decode.medusa import HEADS_FILE


def random_medusa_heads(num_heads: int, num_layers: int, hidden_size: int, vocab_size: int,
                        seed: int = 0, lm_heads: bool = True, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """TGI-named Medusa tensors (``{i}.{j}.linear.weight/bias``, ``{i}.{num_layers}.weight``)
    with random fp32 values; ``lm_heads`` False leaves out the per-head LM heads."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(num_heads):
        for j in range(num_layers):
            tensors[f"{i}.{j}.linear.weight"] = torch.randn(hidden_size, hidden_size, generator=g) * scale
            tensors[f"{i}.{j}.linear.bias"] = torch.randn(hidden_size, generator=g) * scale
        if lm_heads:
            tensors[f"{i}.{num_layers}.weight"] = torch.randn(vocab_size, hidden_size, generator=g)
    return tensors


def save_medusa_heads(folder: Path, tensors: dict[str, torch.Tensor], num_heads: int, num_layers: int,
                      base_model: Path | None = None) -> None:
    """Write ``tensors`` as ``folder/medusa_lm_head.safetensors`` and the Medusa fields into
    ``folder/config.json``: added to the model's own config when ``base_model`` is None (heads
    next to the model), else a heads-only config naming ``base_model_name_or_path`` (TGI's
    layout of a Medusa repository)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / HEADS_FILE))
    path = folder / "config.json"
    config = {} if base_model is not None else json.loads(path.read_text())
    config.update(medusa_num_heads=num_heads, medusa_num_layers=num_layers)
    if base_model is not None:
        config["base_model_name_or_path"] = str(base_model)
    path.write_text(json.dumps(config, indent=2))


def save_eagle(folder: Path, target_config, seed: int = 0, fc_bias: bool = True,
               embed_tokens: bool = False, num_layers: int = 1, scale: float = 0.1):
    """An EAGLE-1 draft for a Llama-family ``target_config`` in the EAGLE repository's layout:
    ``config.json`` (the target's config with ``num_layers`` layers) and ``model.safetensors``
    with ``fc.weight`` [H, 2H] (``fc.bias`` when ``fc_bias``), the layers of a transformers
    ``LlamaModel`` built from that config (``layers.{i}.*``; no ``layers.0.input_layernorm``:
    EAGLE-1's first layer has none) and, with ``embed_tokens``, its embedding. Returns the
    transformers ``LlamaModel`` (its norm and first input norm to be replaced by identities
    for a reference) and the fc ``nn.Linear``, both fp32."""
    import copy

    from safetensors.torch import save_file
    from transformers import LlamaModel

    config = copy.deepcopy(target_config)
    config.num_hidden_layers = num_layers
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaModel(config).float().eval()
    fc = torch.nn.Linear(2 * config.hidden_size, config.hidden_size, bias=fc_bias)
    with torch.no_grad():
        for p in [*model.parameters(), *fc.parameters()]:
            p.add_(torch.randn_like(p) * scale)
    tensors = {f"fc.{k}": v for k, v in fc.state_dict().items()}
    for name, value in model.state_dict().items():
        if name.startswith("layers.") and not name.startswith("layers.0.input_layernorm."):
            tensors[name] = value
    if embed_tokens:
        tensors["embed_tokens.weight"] = model.embed_tokens.weight.data
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return model, fc
