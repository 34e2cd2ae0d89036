"""Copying checkpoint tensors into parameters, reading only this rank's slice.

``loaded`` is a tensor or a lazy safetensors slice (``safe_open(...).get_slice(name)``);
narrowing a slice reads just those bytes from disk.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

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

# -- declared dimensions (vLLM's BasevLLMParameter / PackedvLLMParameter idea) ------------------
#
# A quantizer's parameters are not all dense [out, in] matrices: GPTQ packs eight 4-bit input
# rows into one int32 ``qweight`` row, AWQ packs output columns, scales have one row per group.
# Each parameter says which of its dimensions runs along the layer's input and output features
# and which one is packed (``packed_factor`` values per element), and the tensor-parallel
# loaders narrow along those dimensions only. A dimension of None is not split (the tensor is
# replicated on every rank, e.g. a bias of a row-parallel layer or ``g_idx`` of a column one).


def set_weight_dims(param: torch.Tensor, *, input_dim: int | None, output_dim: int | None,
                    packed_dim: int | None = None, packed_factor: int = 1) -> torch.Tensor:
    """Declare ``param``'s layout (attributes ``input_dim``, ``output_dim``, ``packed_dim``,
    ``packed_factor``, read by ``weight_dims``); returns ``param``."""
    # A Parameter takes attributes (as ``weight_loader``); torch's stubs don't declare these.
    param.input_dim, param.output_dim = input_dim, output_dim  # type: ignore[attr-defined]
    param.packed_dim, param.packed_factor = packed_dim, packed_factor  # type: ignore[attr-defined]
    return param


def weight_dims(param: torch.Tensor) -> tuple[int | None, int | None, int | None, int]:
    """``(input_dim, output_dim, packed_dim, packed_factor)`` of ``param``.

    Tensors that declared nothing (LoRA blocks the adapter loader narrows, parameters of plain
    ``nn.Module``s) follow the dense layout: ``[out, in]`` matrices and ``[out]`` vectors.
    """
    if "output_dim" in getattr(param, "__dict__", {}):
        return (param.input_dim, param.output_dim,  # type: ignore[attr-defined]
                param.packed_dim, param.packed_factor)  # type: ignore[attr-defined]
    return (1 if param.dim() == 2 else None), 0, None, 1


def in_param_units(param: torch.Tensor, dim: int, features: int) -> int:
    """``features`` counted in elements of ``param`` along ``dim``: divided by the pack factor
    when ``dim`` is packed (a ``Fraction`` factor below one, as in Marlin's 16-row tiles, makes
    one feature span several elements). Raises ValueError when the cut splits an element."""
    _, _, packed_dim, factor = weight_dims(param)
    if packed_dim != dim or factor == 1:
        return features
    units = Fraction(features) / Fraction(factor)
    if units.denominator != 1:
        raise ValueError(f"{features} features do not split into whole packed elements of {factor}")
    return int(units)
