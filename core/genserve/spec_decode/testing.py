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
