"""The executors: how one engine's model runs. ``UniProcExecutor``: in this process."""

from __future__ import annotations

from genserve.engine.build import LoadedEngine, build_engine
from genserve.plugins import Plugins


class Executor:
    """A way to run the engine's model: in this process, or sharded over several.
    ``genserve.executor.get_executor_class(args)`` chooses one."""

    @classmethod
    def create_engine(cls, args, plugins: Plugins | None = None) -> LoadedEngine:
        """Build the engine this executor runs (see ``genserve.executor.create_engine``)."""
        raise NotImplementedError


class UniProcExecutor(Executor):
    """One process, one rank: the engine is the single-rank build."""

    @classmethod
    def create_engine(cls, args, plugins: Plugins | None = None) -> LoadedEngine:
        return build_engine(args, plugins)
