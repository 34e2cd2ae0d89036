"""The composition root above the engine: ``create_engine(args)`` decides how the engine
executes and builds it (vLLM's ``Executor.get_class(config)``: ``get_executor_class``).

- ``base``: ``Executor`` and ``UniProcExecutor`` (one process);
- ``sharded``: ``ShardedExecutor`` (``--num-shard N``): spawns this node's other ranks and builds rank 0;
- ``topology``: where the ranks run (one host, ``--nnodes`` machines, torchrun's processes);
- ``shard_workers``: rank 0's runner's ``peers``: announce, supervise and stop the workers;
- ``worker``: the process of one rank other than 0;
- ``node``: ``genserve serve`` on a node other than 0 (or a torchrun rank): shards only, no HTTP.

Every rank is built by ``genserve.engine.build.build_engine``, which builds exactly one rank
and imports nothing from here.
"""

from __future__ import annotations

from genserve.engine.build import LoadedEngine
from genserve.executor.base import Executor, UniProcExecutor
from genserve.executor.sharded import ShardedExecutor, sharding_requested
from genserve.plugins import Plugins

__all__ = ["Executor", "ShardedExecutor", "UniProcExecutor", "create_engine", "get_executor_class"]


def get_executor_class(args) -> type[Executor]:
    """``ShardedExecutor`` when --num-shard > 1 or --sharded asks for shards (and this process
    is not already a rank), else ``UniProcExecutor``."""
    return ShardedExecutor if sharding_requested(args) else UniProcExecutor


def create_engine(args, plugins: Plugins | None = None) -> LoadedEngine:
    """A serving engine for the parsed flags ``args`` (an ``argparse.Namespace`` of
    ``genserve.args``; ``genserve.args.defaults(model_id=..., ...)`` builds one in code).

    The one entry point the server, the offline API, tests and benches call: it decides
    single-process or tensor-parallel execution (--num-shard, --sharded) and returns the
    ``LoadedEngine`` (``.engine`` is the ``LLMEngine`` to step, ``.tokenizer``,
    ``.model_config``, ``.backend``, ...). ``plugins``: the registries to build from (default:
    the installed plugins; shard workers always use their own discovery). A sharded engine's
    workers stop at exit, or with ``loaded.engine.runner.peers.shutdown()``.

    Raises ``genserve.errors.ConfigError`` (flags and model do not fit),
    ``genserve.backends.select.BackendError`` (no such backend or device),
    ``genserve.loader.source.ModelNotFoundError``, ``genserve.errors.ShardFailure`` (a shard
    died while starting).
    """
    return get_executor_class(args).create_engine(args, plugins)
