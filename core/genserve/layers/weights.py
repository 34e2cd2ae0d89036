"""Copying checkpoint tensors into parameters, reading only this rank's slice.

``loaded`` is a tensor or a lazy safetensors slice (``safe_open(...).get_slice(name)``);
narrowing a slice reads just those bytes from disk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# loader(param, loaded, shard_id=None): fills ``param`` (or its ``shard_id`` part) from ``loaded``.
WeightLoader = Callable[..., None]


def shape_of(loaded) -> list[int]:
    return list(loaded.shape) if isinstance(loaded, torch.Tensor) else list(loaded.get_shape())


def narrow(loaded, dim: int, start: int, size: int):
    """``loaded[..., start:start+size, ...]`` along ``dim`` for tensors and lazy slices."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(shape_of(loaded))
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def expect_dim(loaded, dim: int, size: int) -> None:
    """Refuse a checkpoint tensor whose split dimension is not what the layer was built for
    (narrowing would otherwise silently take a slice of a too-large tensor)."""
    actual = shape_of(loaded)[dim]
    if actual != size:
        raise ValueError(f"checkpoint tensor has {actual} along dim {dim}, the layer expects {size}")


def materialize(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def copy_into(param: torch.Tensor, loaded) -> None:
    tensor = materialize(loaded)
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit "
                         f"parameter of shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)


def default_weight_loader(param: torch.Tensor, loaded) -> None:
    copy_into(param, loaded)


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    """Attach the loader that fills ``param`` from checkpoint tensors (vLLM's parameter
    attribute ``weight_loader``, which ``CausalLM.load_weights`` calls)."""
    param.weight_loader = loader  # type: ignore[attr-defined]  # a Parameter takes attributes


def weight_loader_of(param: nn.Parameter) -> WeightLoader:
    """``param``'s loader (``set_weight_loader``), or a plain copy for parameters without one."""
    loader: WeightLoader = getattr(param, "weight_loader", default_weight_loader)
    return loader
