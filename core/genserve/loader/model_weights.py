"""Filling a constructed model's parameters: from its checkpoint, or random (--load-format dummy)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from genserve.errors import ConfigError
from genserve.loader.source import ModelSource


def load_weights(model, src: ModelSource, config, load_format: str, dtype: torch.dtype) -> None:
    """Stream the checkpoint's tensors (safetensors or GGUF) into ``model.load_weights``.
    Raises ``ConfigError`` when a parameter got no weight."""
    if load_format == "dummy":
        random_init(model)
        return
    weights: Iterator[tuple[str, object]]
    if src.is_gguf:
        from genserve.layers.quantization.gguf import GGUFConfig
        from genserve.loader.gguf_weights import iter_gguf

        assert src.gguf_file is not None  # is_gguf means a file was found
        quant = model.ctx.quant
        weights = iter_gguf(src.path, src.gguf_file, config, dtype,
                            quant.keeps_packed if isinstance(quant, GGUFConfig) else None)
    else:
        from genserve.loader.safetensors_weights import iter_safetensors

        weights = iter_safetensors(src.path)
    loaded = model.load_weights(weights)
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        raise ConfigError(f"checkpoint {src.model_id!r} has no weights for {len(missing)} parameters, "
                          f"e.g. {missing[:3]}")


@torch.no_grad()
def random_init(model) -> None:
    """Small random weights (norm weights at 1) so dummy models produce finite, varied logits."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    filled = model.init_dummy_quantized(gen)  # packed integer weights: their quant method's job
    for name, p in model.named_parameters():
        if id(p) in filled:
            continue
        if "norm" in name or p.dim() == 1:
            p.fill_(1.0 if "norm" in name and "bias" not in name else 0.0)
        else:
            chunk = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen) \
                if p.numel() < 50_000_000 else None
            if chunk is None:  # big tensors: fill on the device
                p.normal_(0.0, 0.02)
            else:
                p.copy_(chunk)
