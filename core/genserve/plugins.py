"""Plugin discovery and the registries the hooks fill.

Built-in implementations register through the same hooks as outside plugins, the way
pytest loads its own plugins. Loading is idempotent: tensor-parallel workers call
``get_plugins()`` again in their own processes.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points

import pluggy

from genserve import hookspecs
from genserve.registry import Registry

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "genserve"

# Modules of the core that implement hooks; each one is a plugin like any other.
BUILTIN_PLUGINS = (
    "genserve.backends.cpu",
    "genserve.attention.torch_ref",
    "genserve.models.builtin",
    "genserve.layers.quantization.builtin",
    "genserve.layers.lora",
)


class PluginLoadError(RuntimeError):
    """A plugin that was asked for could not be imported."""


@dataclass
class PluginInfo:
    name: str
    module: str
    builtin: bool
    error: str | None = None
    registered: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Plugins:
    """Everything the installed plugins registered."""

    manager: pluggy.PluginManager
    backends: Registry
    architectures: Registry
    quantizers: Registry
    linear_kernels: Registry
    attention: Registry
    lora: Registry
    infos: list[PluginInfo]

    def failed(self) -> list[PluginInfo]:
        return [p for p in self.infos if p.error]


_HOOKS = {
    "backends": "genserve_register_backends",
    "architectures": "genserve_register_architectures",
    "quantizers": "genserve_register_quantizers",
    "linear_kernels": "genserve_register_linear_kernels",
    "attention": "genserve_register_attention",
    "lora": "genserve_register_lora",
}

_lock = threading.Lock()
_cached: Plugins | None = None


def _allow_list() -> set[str] | None:
    raw = os.environ.get("GENSERVE_PLUGINS", "").strip()
    return {p.strip() for p in raw.split(",") if p.strip()} if raw else None


def _fill(plugins: Plugins, info: PluginInfo, module) -> None:
    """Call the hook implementations of one plugin module; record what they registered."""
    for kind, hook_name in _HOOKS.items():
        registry: Registry = getattr(plugins, kind)
        for impl in getattr(plugins.manager.hook, hook_name).get_hookimpls():
            if impl.plugin is not module:
                continue
            if kind == "backends":
                def register(cls, _r=registry, _k=kind):
                    _r.register(cls.name, cls, owner=info.name)
                    info.registered.setdefault(_k, []).append(cls.name)
            else:
                def register(name, obj, _r=registry, _k=kind):
                    _r.register(name, obj, owner=info.name)
                    info.registered.setdefault(_k, []).append(name)
            impl.function(register=register)


def load_plugins(extra_modules: tuple[str, ...] = ()) -> Plugins:
    """Import built-in and installed plugins and fill fresh registries."""
    manager = pluggy.PluginManager("genserve")
    manager.add_hookspecs(hookspecs)
    plugins = Plugins(
        manager=manager,
        backends=Registry("backend"),
        architectures=Registry("architecture"),
        quantizers=Registry("quantizer"),
        linear_kernels=Registry("linear kernel"),
        attention=Registry("attention implementation"),
        lora=Registry("LoRA method"),
        infos=[],
    )
    allowed = _allow_list()

    candidates: list[tuple[str, str, bool]] = [(m, m, True) for m in BUILTIN_PLUGINS]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if allowed is None or ep.name in allowed:
            candidates.append((ep.name, ep.value, False))
    candidates += [(m, m, False) for m in extra_modules]

    seen: set[str] = set()
    for name, module_path, builtin in candidates:
        if module_path in seen:
            continue
        seen.add(module_path)
        info = PluginInfo(name=name, module=module_path, builtin=builtin)
        plugins.infos.append(info)
        try:
            module = import_module(module_path)
            manager.register(module, name=name)
            _fill(plugins, info, module)
        except Exception as exc:  # a broken plugin must not take the server down
            info.error = f"{type(exc).__name__}: {exc}"
            if builtin:
                raise
            logger.warning("plugin %r (%s) failed to load and is skipped: %s",
                           name, module_path, info.error)
            if allowed is not None and name in allowed:
                raise PluginLoadError(
                    f"plugin {name!r} ({module_path}) was asked for in GENSERVE_PLUGINS "
                    f"but failed to load: {info.error}"
                ) from exc
    return plugins


def get_plugins() -> Plugins:
    """The process-wide plugins, loaded once."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = load_plugins()
        return _cached


def reset_plugins() -> None:
    """Forget the loaded plugins (tests that install plugins at run time)."""
    global _cached
    with _lock:
        _cached = None
