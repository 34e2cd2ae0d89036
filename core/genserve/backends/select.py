"""Choosing the backend for ``--backend``."""

from __future__ import annotations

import logging

from genserve.backends.base import Backend
from genserve.plugins import Plugins

logger = logging.getLogger(__name__)

KNOWN_BACKENDS = ("cpu", "cuda", "rocm", "ipex", "neuron", "gaudi")


class BackendError(RuntimeError):
    pass


def select_backend(plugins: Plugins, name: str = "auto") -> type[Backend]:
    installed = {n: plugins.backends.get(n) for n in plugins.backends}
    listing = ", ".join(sorted(installed)) or "none"
    if name == "auto":
        ranked = sorted(installed.values(), key=lambda b: -b.priority)
        for cls in ranked:
            try:
                if cls.is_available():
                    logger.info("backend auto: chose %r", cls.name)
                    return cls
            except Exception as exc:  # a broken driver must not stop the CPU fallback
                logger.warning("backend %r failed its availability check: %s", cls.name, exc)
        raise BackendError(f"no backend is available; installed: {listing}")
    if name not in installed:
        hint = f" (pip install \"genserve[{name}]\")" if name in KNOWN_BACKENDS else ""
        raise BackendError(f"backend {name!r} is not installed{hint}; installed backends: {listing}")
    cls = installed[name]
    if not cls.is_available():
        raise BackendError(f"{cls.unavailable_reason()}; installed backends: {listing}")
    return cls
