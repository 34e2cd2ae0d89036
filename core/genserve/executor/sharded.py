"""``--num-shard N`` / ``--sharded``: tensor parallelism over N processes of one host.

Rank 0 is the server process: ``ShardedExecutor`` spawns ranks 1..N-1 (``multiprocessing``
'spawn', with nothing but plain flag values), joins the process groups, then builds its own
shard through the single-rank ``build_engine`` and keeps the scheduler; its runner's ``peers``
are the workers (``ShardWorkers``). The workers build theirs the same way and follow rank 0's
messages (``distributed/channel.py``). Each rank loads only its slice of the weights (the
layers' weight loaders narrow lazy safetensors slices).

Workers find architectures and backends through their own plugin discovery: a ``plugins``
object handed to ``create_engine`` by hand reaches rank 0 only.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import time

import torch.distributed as dist

from genserve.args import FLAGS
from genserve.backends.select import select_backend
from genserve.distributed.channel import Channel
from genserve.distributed.groups import (
    HOST,
    READY_KEY,
    START_TIMEOUT,
    destroy_groups,
    init_groups,
    local_env,
    shard_timeout,
    share_cpu_threads,
)
from genserve.distributed.state import get_tp_group
from genserve.distributed.supervisor import Supervisor
from genserve.engine.build import LoadedEngine, build_engine
from genserve.errors import ConfigError
from genserve.executor.base import Executor
from genserve.executor.shard_workers import ShardWorkers
from genserve.executor.worker import worker_main
from genserve.plugins import get_plugins

logger = logging.getLogger(__name__)
PLAIN = (str, int, float, bool, type(None))


def sharding_requested(args) -> bool:
    """True when the engine must be sharded from here: shards were asked for and this process
    is not already one of the ranks."""
    return ((args.num_shard or 1) > 1 or bool(args.sharded)) and get_tp_group().size == 1


def device_count(backend_cls) -> int | None:
    """Devices the backend sees; None where ranks are processes, not devices (CPU)."""
    return backend_cls.device_count()


def shard_count(args, backend_cls) -> int:
    devices = device_count(backend_cls)
    n = args.num_shard if args.num_shard is not None else devices  # --sharded: every device
    if n is None:
        raise ConfigError(f"--sharded cannot count the devices of backend {backend_cls.name!r}; "
                          "give --num-shard")
    if n < 1 or (args.sharded and n == 1):
        raise ConfigError(f"--sharded needs at least 2 shards, got {n}")
    if devices is not None and n > devices:
        raise ConfigError(f"--num-shard {n} needs {n} devices; backend {backend_cls.name!r} sees {devices}")
    return n


def plain_flags(args, backend_cls=None) -> dict:
    """The flag values (TGI's, genserve's and ``backend_cls``'s own) a worker rebuilds its
    arguments from: strings and numbers only."""
    flags = {}
    own = backend_cls.options_cls.flags() if backend_cls is not None else []
    for flag in [*FLAGS, *own]:
        # A namespace built without the backend's flags (``defaults()``) means their defaults.
        value = getattr(args, flag.dest) if hasattr(args, flag.dest) else \
            (flag.env_default() if flag in own else None)
        if not isinstance(value, PLAIN):
            raise ConfigError(f"{flag.name}={value!r} cannot be passed to the shard workers")
        flags[flag.dest] = value
    return flags


def _abort_default_group() -> None:
    dist.distributed_c10d._abort_process_group()


def _wait_ready(store, supervisor: Supervisor, world_size: int) -> None:
    """Wait for every worker to reach the store, failing at once if one exits first."""
    keys = [READY_KEY.format(r) for r in range(1, world_size)]
    deadline = time.monotonic() + START_TIMEOUT.total_seconds()
    while not store.check(keys):
        supervisor.check()
        if time.monotonic() > deadline:
            raise supervisor.fail(f"the workers did not start within {START_TIMEOUT}")
        time.sleep(0.05)


class ShardedExecutor(Executor):
    """Rank 0 of a tensor-parallel engine over ``shard_count`` processes of this host."""

    @classmethod
    def create_engine(cls, args, plugins=None) -> LoadedEngine:
        if dist.is_initialized():
            raise ConfigError("this process already belongs to a process group: one sharded engine per process")
        plugins = plugins or get_plugins()
        backend_cls = select_backend(plugins, args.backend)
        world_size = shard_count(args, backend_cls)
        flags = plain_flags(args, backend_cls)
        local_env()  # before the spawn: the workers inherit the environment
        share_cpu_threads(backend_cls().device, world_size)

        # Port 0: the store picks a free port itself, so there is no race for one.
        store = dist.TCPStore(HOST, 0, world_size, is_master=True, wait_for_workers=False)
        spawn = mp.get_context("spawn")
        procs = {rank: spawn.Process(target=worker_main, name=f"genserve-shard-{rank}", daemon=True,
                                     args=(rank, world_size, store.port, backend_cls.name, flags))
                 for rank in range(1, world_size)}
        for p in procs.values():
            p.start()
        nccl = backend_cls.distributed_backend == "nccl"
        supervisor = Supervisor(procs, shard_timeout(), abort=_abort_default_group if nccl else None)
        workers = ShardWorkers(supervisor)
        logger.info("tensor parallel: %d ranks over %s (workers %s)", world_size,
                    backend_cls.distributed_backend, [p.pid for p in procs.values()])
        try:
            _wait_ready(store, supervisor, world_size)
            tp = init_groups(0, world_size, store, backend_cls.distributed_backend)
            loaded = build_engine(args, plugins, peers=workers)
            workers.serve(Channel(tp.cpu_group, loaded.backend.device))
        except BaseException as exc:
            failure = supervisor.fail_from("start-up", exc)  # stops the workers in any case
            destroy_groups()
            if isinstance(exc, RuntimeError):  # a failed collective: the lost worker says more
                raise failure from exc
            raise  # rank 0's own error (a ConfigError, a missing file) as it is
        atexit.register(workers.shutdown, 5.0)
        return loaded
