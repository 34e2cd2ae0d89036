"""Plugin discovery and the registries the hooks fill.

Built-in implementations register through the same hooks as outside plugins, the way
pytest loads its own plugins. Loading is idempotent: tensor-parallel workers call
``get_plugins()`` again in their own processes.

Loading goes in three steps, so that a plugin is loaded whole or not at all:

1. import every plugin module and register it with one pluggy ``PluginManager``, through a
   stand-in that ties each of its hook implementations to it (pluggy itself parses and
   validates the module first: unknown hooks, wrong argument names, wrappers that are not
   generators);
2. call every hook once through ``manager.hook`` (so ``tryfirst``/``trylast`` and wrappers
   work); each ``register(name, obj)`` call is *staged* on the plugin that made it;
3. commit each plugin's staged registrations together, built-ins first, then installed
   plugins in load order. A plugin that raised, or whose names collide with entries already
   committed, commits nothing and is reported as failed.

Overriding a built-in is a declared, logged policy: ``register(name, obj, override=True)``
from an installed plugin replaces the built-in entry of that name (a warning names both); a
collision without it, or with another installed plugin's entry, fails the later plugin.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Callable, Generator

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
    "genserve.spec_decode.builtin",
)


class PluginLoadError(RuntimeError):
    """A plugin that was asked for (``GENSERVE_PLUGINS``) could not be loaded."""


class PluginConflictError(RuntimeError):
    """A plugin registered a name that is already taken (and may not be replaced)."""


@dataclass
class PluginInfo:
    """What ``genserve plugins`` reports about one plugin.

    ``registered`` maps a registry (``"backends"``, ``"attention"``, ...) to the names this
    plugin put there, in call order; it is empty for a plugin that failed (``error`` set),
    since a failed plugin leaves nothing behind. ``overrides`` lists the subset of those
    names that replaced a built-in entry.
    """

    name: str
    module: str
    builtin: bool
    error: str | None = None
    registered: dict[str, list[str]] = field(default_factory=dict)
    overrides: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Plugins:
    """Everything the installed plugins registered.

    One ``Registry`` per hook in ``genserve.hookspecs``, reachable as an attribute named
    after the hook: ``plugins.backends``, ``plugins.architectures``, ``plugins.quantizers``,
    ``plugins.linear_kernels``, ``plugins.attention``, ``plugins.lora``. ``manager`` is the
    pluggy manager holding the plugins that loaded.
    """

    manager: pluggy.PluginManager
    registries: dict[str, Registry[Any]]
    infos: list[PluginInfo]

    def __getattr__(self, kind: str) -> Registry[Any]:
        # Only called for names that are not fields; __dict__ avoids recursing while unpickling.
        registries = self.__dict__.get("registries", {})
        if kind in registries:
            return registries[kind]
        raise AttributeError(f"{type(self).__name__!r} has no registry {kind!r} "
                             f"(hooks: {', '.join(registries)})")

    def failed(self) -> list[PluginInfo]:
        return [p for p in self.infos if p.error]


@dataclass(frozen=True)
class Registration:
    """One staged ``register(name, obj, override=...)`` call into registry ``kind``."""

    kind: str
    name: str
    obj: object
    override: bool = False


# What each hook call passes as ``register``; a plugin's stand-in binds it to the plugin.
Stage = Callable[["_Loading", str, str, object, bool], None]

_lock = threading.Lock()
_cached: Plugins | None = None


def _allow_list() -> set[str] | None:
    raw = os.environ.get("GENSERVE_PLUGINS", "").strip()
    return {p.strip() for p in raw.split(",") if p.strip()} if raw else None


class _Loading:
    """One plugin while it loads: the registrations it staged, or why it failed."""

    def __init__(self, info: PluginInfo):
        self.info = info
        self.staged: list[Registration] = []
        self.failure: BaseException | None = None
        self.stand_in: _StandIn | None = None  # once registered with the manager

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:  # the first failure is the one to report
            self.failure = exc
            self.info.error = f"{type(exc).__name__}: {exc}"
        self.staged.clear()


def _stage(plugin: _Loading, kind: str, name: str, obj: object, override: bool) -> None:
    """The ``register`` every hook call is given: record the call on the plugin that made it."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register(name, obj): name must be a non-empty string, got {name!r}")
    if obj is None:
        raise TypeError(f"register({name!r}, obj): obj is None")
    plugin.staged.append(Registration(kind, name.lower(), obj, bool(override)))


class _StandIn:
    """Registered with pluggy in place of a plugin module: the same hook implementations,
    with the same markers (tryfirst, trylast, wrappers), each handing the original a
    ``register`` bound to this plugin and catching its errors, so that one broken plugin
    neither stops the hook call for the others nor loses track of whose registration is whose.
    """

    def __init__(self, plugin: _Loading, module: ModuleType):
        self.module = module
        checker = pluggy.PluginManager("genserve")  # pluggy parses and validates the module
        checker.add_hookspecs(hookspecs)
        checker.register(module, name=plugin.info.name)
        checker.check_pending()  # a genserve_* implementation that matches no hook
        for caller in checker.get_hookcallers(module) or ():
            kind = caller.name.removeprefix(hookspecs.HOOK_PREFIX)
            for i, impl in enumerate(caller.get_hookimpls()):
                opts = impl.opts.copy()  # a HookimplOpts, so it still types as hookimpl's keywords
                opts["specname"] = caller.name
                setattr(self, f"impl_{kind}_{i}", hookspecs.hookimpl(**opts)(_attributed(plugin, kind, impl)))

    def __repr__(self) -> str:
        return f"<genserve plugin {self.module.__name__}>"


def _attributed(plugin: _Loading, kind: str, impl: pluggy.HookImpl) -> Callable:
    """The stand-in for one hook implementation of ``plugin``."""

    def call_original(register: Stage):
        def bound(name: str, obj: object, *, override: bool = False) -> None:
            register(plugin, kind, name, obj, override)

        bound.__name__ = bound.__qualname__ = "register"  # how a wrong call's TypeError names it
        return impl.function(*[bound for _ in impl.argnames])  # argnames: () or ("register",)

    if not (impl.hookwrapper or impl.wrapper):
        def plain(register: Stage) -> None:
            if plugin.failure is not None:
                return  # failed in an earlier hook: stage nothing more
            try:
                call_original(register)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the others down
                plugin.fail(exc)
        return plain

    def wrapper(register: Stage) -> Generator[Any, Any, Any]:
        # The implementations inside never raise (each is a stand-in that catches), so any
        # exception here is this wrapper's own.
        if plugin.failure is not None:
            return (yield)  # failed in an earlier hook: let the others run, stage nothing
        try:
            inner = call_original(register)
            yielded = next(inner)  # the wrapper's code before its yield
        except Exception as exc:  # noqa: BLE001
            plugin.fail(exc)
            return (yield)
        outcome = yield yielded  # the other implementations run here
        try:
            inner.send(outcome)
        except StopIteration as stop:
            return stop.value if impl.wrapper else None
        except Exception as exc:  # noqa: BLE001
            plugin.fail(exc)
            return outcome
        inner.close()
        plugin.fail(RuntimeError(f"hook wrapper {impl.function.__name__} yielded more than once"))
        return outcome

    return wrapper


def _candidates(allowed: set[str] | None, extra_modules: tuple[str, ...]) -> list[tuple[str, str, bool]]:
    """(name, module path, built-in?) of every plugin to load, built-ins first."""
    found: list[tuple[str, str, bool]] = [(m, m, True) for m in BUILTIN_PLUGINS]
    installed = list(entry_points(group=ENTRY_POINT_GROUP))
    found += [(ep.name, ep.value, False) for ep in installed if allowed is None or ep.name in allowed]
    if allowed is not None:
        unknown = allowed - {ep.name for ep in installed}
        if unknown:
            logger.warning("GENSERVE_PLUGINS names %s, which no installed plugin is called; installed: %s",
                           ", ".join(sorted(unknown)), ", ".join(sorted(ep.name for ep in installed)) or "none")
    found += [(m, m, False) for m in extra_modules]
    return found


def _commit(plugins: Plugins, plugin: _Loading, builtins: set[str]) -> None:
    """Move ``plugin``'s staged registrations into the registries: all of them, or none."""
    info = plugin.info
    problems: list[str] = []
    replaced: dict[int, str] = {}  # index in plugin.staged -> owner of the built-in it replaces
    staged: dict[tuple[str, str], object] = {}
    for i, reg in enumerate(plugin.staged):
        registry = plugins.registries[reg.kind]
        if staged.setdefault((reg.kind, reg.name), reg.obj) is not reg.obj:
            problems.append(f"it registers {registry.kind} {reg.name!r} twice, with different objects")
        if reg.name not in registry or registry.get(reg.name) is reg.obj:
            continue
        owner = registry.owner(reg.name)
        if owner not in builtins:
            problems.append(f"{registry.kind} {reg.name!r} is already registered by plugin {owner!r}")
        elif info.builtin or not reg.override:
            problems.append(f"{registry.kind} {reg.name!r} is built in (from {owner}); "
                            f"register it with override=True to replace the built-in")
        else:
            replaced[i] = owner
    if problems:
        plugin.fail(PluginConflictError("; ".join(problems)))
        return
    for i, reg in enumerate(plugin.staged):
        plugins.registries[reg.kind].register(reg.name, reg.obj, owner=info.name, replace=i in replaced)
        info.registered.setdefault(reg.kind, []).append(reg.name)
        if i in replaced:
            info.overrides.setdefault(reg.kind, []).append(reg.name)
            logger.warning("plugin %r replaces the built-in %s %r of %s (it registered it with "
                           "override=True)", info.name, plugins.registries[reg.kind].kind, reg.name,
                           replaced[i])


def load_plugins(extra_modules: tuple[str, ...] = ()) -> Plugins:
    """Import built-in and installed plugins and fill fresh registries.

    ``extra_modules``: more plugin modules (dotted paths) to load after the installed ones,
    as if installed; ``GENSERVE_PLUGINS`` does not filter them.

    A built-in plugin that fails raises its error (a bug in genserve). An installed plugin
    that fails to import, raises in a hook or collides with a taken name is skipped, with a
    warning and its ``PluginInfo.error`` set, unless ``GENSERVE_PLUGINS`` asked for it by
    name: then ``PluginLoadError`` is raised.
    """
    manager = pluggy.PluginManager("genserve")
    manager.add_hookspecs(hookspecs)
    plugins = Plugins(manager=manager, infos=[],
                      registries={kind: Registry(entry) for kind, entry in hookspecs.REGISTRIES.items()})
    allowed = _allow_list()

    loading: list[_Loading] = []
    seen: set[str] = set()
    for name, module_path, builtin in _candidates(allowed, extra_modules):
        if module_path in seen:
            continue
        seen.add(module_path)
        plugin = _Loading(PluginInfo(name=name, module=module_path, builtin=builtin))
        plugins.infos.append(plugin.info)
        loading.append(plugin)
        try:
            stand_in = _StandIn(plugin, import_module(module_path))
            manager.register(stand_in, name=name)
            plugin.stand_in = stand_in
        except Exception as exc:  # a broken plugin must not take the server down
            plugin.fail(exc)

    for kind in hookspecs.REGISTRIES:
        getattr(manager.hook, hookspecs.HOOK_PREFIX + kind)(register=_stage)

    builtins = {p.info.name for p in loading if p.info.builtin}
    for plugin in loading:  # built-ins come first, so they are committed first
        if plugin.failure is None:
            _commit(plugins, plugin, builtins)
        if plugin.failure is not None:
            _drop(manager, plugin, allowed)
    return plugins


def _drop(manager: pluggy.PluginManager, plugin: _Loading, allowed: set[str] | None) -> None:
    """Take a failed plugin out of the manager and report it (or raise, see ``load_plugins``)."""
    info = plugin.info
    if plugin.stand_in is not None:
        manager.unregister(plugin.stand_in)
    if info.builtin:
        raise plugin.failure  # type: ignore[misc]
    logger.warning("plugin %r (%s) failed to load and is skipped: %s", info.name, info.module, info.error)
    if allowed is not None and info.name in allowed:
        raise PluginLoadError(
            f"plugin {info.name!r} ({info.module}) was asked for in GENSERVE_PLUGINS "
            f"but failed to load: {info.error}"
        ) from plugin.failure


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
