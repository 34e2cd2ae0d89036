"""Errors shared across the package's layers, in a leaf module so that any layer can raise or
catch them without importing the layer that usually does (``engine/``, ``distributed/``)."""

from __future__ import annotations


class ConfigError(ValueError):
    """The flags and the model do not fit together; the message says how (one line, no
    traceback, from the CLI)."""


class EngineDeadError(RuntimeError):
    """The engine cannot step any more (its thread stopped, or a shard was lost); no request
    can be served."""


class ShardFailure(EngineDeadError):
    """A tensor-parallel rank died or hangs: the engine cannot compute any more."""
