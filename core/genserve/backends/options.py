"""Typed backend options (the parts of vLLM's config a ``Platform`` reads).

Every backend gets a ``BackendOptions``: the settings of TGI's hardware flags that any device
may honour. A backend with settings of its own declares a subclass whose extra fields each
carry their flag (``backend_flag``); ``Backend.options_cls`` names it. The CLI adds those flags
to ``genserve serve`` (shown in ``--help`` under the backend's name, each with its environment
variable) and ``options_cls.from_args`` reads them, so every option a backend reads can be set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from genserve.args import Flag, parse_sizes, size_list

__all__ = ["BackendOptions", "Flag", "all_backend_flags", "backend_flag", "parse_sizes", "size_list"]


def backend_flag(flag: Flag, sizes: bool = False) -> Any:
    """A field of a ``BackendOptions`` subclass set by ``flag`` (its default is the flag's).
    ``sizes``: the value is a list of sizes (``parse_sizes``; a None default reads as ())."""
    return field(default=flag.default, metadata={"flag": flag, "sizes": sizes})


@dataclass(frozen=True)
class BackendOptions:
    """What every backend receives, from TGI's hardware flags."""

    # --cuda-memory-fraction: the share of the device's free memory genserve may use.
    memory_fraction: float = 1.0
    # --cuda-graphs: decode batch sizes to capture as device graphs. None: the backend's
    # default sizes; (): none. Strings and ints are accepted as the flag gives them.
    graph_sizes: tuple[int, ...] | None = field(default=None, metadata={"sizes": True})
    # False under --disable-custom-kernels: the backend keeps to the reference PyTorch kernels
    # (its attention preference becomes ("torch",), nothing is swapped into the model).
    custom_kernels: bool = True

    def __post_init__(self):
        # Sizes arrive as the flags spell them; keep them in one form.
        for f in dataclasses.fields(self):
            if f.metadata.get("sizes"):
                sizes = parse_sizes(getattr(self, f.name))
                if sizes is None and "flag" in f.metadata:
                    sizes = ()  # a backend's own list: empty means its default
                object.__setattr__(self, f.name, sizes)

    @classmethod
    def flags(cls) -> list[Flag]:
        """The flags this backend adds to ``genserve serve`` (none for the shared options)."""
        return [f.metadata["flag"] for f in dataclasses.fields(cls) if "flag" in f.metadata]

    @classmethod
    def from_args(cls, args, **overrides) -> BackendOptions:
        """The options for the flags in ``args`` (a ``genserve.args`` namespace). A backend flag
        missing from ``args`` (a namespace built without it) takes its environment variable or
        default. ``overrides`` replace fields by name."""
        values: dict[str, Any] = {
            "memory_fraction": args.cuda_memory_fraction,
            "graph_sizes": args.cuda_graphs,
            "custom_kernels": not args.disable_custom_kernels,
        }
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            if flag is not None:
                values[f.name] = getattr(args, flag.dest) if hasattr(args, flag.dest) else flag.env_default()
        return cls(**{**values, **overrides})


def all_backend_flags(backend_classes: Iterable[Any]) -> list[Flag]:
    """Every flag the given backends declare, each once (ROCm shares CUDA's options)."""
    seen: dict[str, Flag] = {}
    for cls in backend_classes:
        for flag in cls.options_cls.flags():
            seen.setdefault(flag.dest, flag)
    return list(seen.values())
