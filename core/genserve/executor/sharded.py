"""``--num-shard N`` / ``--sharded``: tensor parallelism over N processes, on one host or
several (``--nnodes``, or torchrun's processes: ``executor/topology.py``).

Rank 0 is the server process: ``ShardedExecutor`` spawns this node's other ranks
(``multiprocessing`` 'spawn', with nothing but plain flag values), joins the process groups,
then builds its own shard through the single-rank ``build_engine`` and keeps the scheduler; its
runner's ``peers`` are the workers (``ShardWorkers``). The workers build theirs the same way and
follow rank 0's messages (``distributed/channel.py``). Each rank loads only its slice of the
weights (the layers' weight loaders narrow lazy safetensors slices). Ranks on other nodes are
spawned by those nodes' ``genserve serve`` (``executor/node.py``) and watched through heartbeats.

Workers find architectures and backends through their own plugin discovery: a ``plugins``
object handed to ``create_engine`` by hand reaches rank 0 only.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import time
from multiprocessing.process import BaseProcess

import torch.distributed as dist

from genserve.args import FLAGS
from genserve.backends.select import select_backend
from genserve.distributed.channel import Channel
from genserve.distributed.groups import (
    READY_KEY,
    START_TIMEOUT,
    destroy_groups,
    init_groups,
    local_env,
    shard_timeout,
    share_cpu_threads,
)
from genserve.distributed.heartbeat import MemberMonitor
from genserve.distributed.state import get_tp_group
from genserve.distributed.supervisor import Supervisor
from genserve.engine.build import LoadedEngine, build_engine
from genserve.errors import ConfigError
from genserve.executor.base import Executor
from genserve.executor.shard_workers import ShardWorkers
from genserve.executor.topology import (  # noqa: F401 (device_count, shard_count: their old home)
    Topology,
    device_count,
    is_loopback,
    launched_by_torchrun,
    resolve_topology,
    shard_count,
)
from genserve.executor.worker import worker_main
from genserve.plugins import get_plugins

logger = logging.getLogger(__name__)
FLAGS_KEY = "genserve/rank0/flags"  # JSON: {"world_size", "flags"}, for the other nodes
PLAIN = (str, int, float, bool, type(None))


def sharding_requested(args) -> bool:
    """True when the engine must be sharded from here: shards (or nodes, or torchrun ranks)
    were asked for and this process is not already one of the ranks."""
    asked = ((args.num_shard or 1) > 1 or bool(args.sharded) or int(getattr(args, "nnodes", 1) or 1) > 1
             or (launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1))
    return asked and get_tp_group().size == 1


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


def open_store(topo: Topology, is_master: bool, port: int | None = None, timeout=START_TIMEOUT):
    """A ``TCPStore`` at node 0's rendezvous address: the server (``is_master``, port 0 on one
    host: it picks a free port, so there is no race for one) or a client of it on ``port``.
    Under torchrun the store may be its agent's (TORCHELASTIC_USE_AGENT_STORE): then every rank
    is a client."""
    if topo.torchrun and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        is_master = False
    return dist.TCPStore(topo.master_addr, topo.master_port if port is None else port, topo.world_size,
                         is_master=is_master, timeout=timeout, wait_for_workers=False)


def spawn_workers(topo: Topology, port: int, backend_name: str, flags: dict) -> dict[int, BaseProcess]:
    """Start this node's worker ranks (all of them, but rank 0 on node 0), each told only plain
    values (the topology as a dict of them: nothing of genserve's is unpickled in a worker)."""
    spawn = mp.get_context("spawn")
    procs: dict[int, BaseProcess] = {
        rank: spawn.Process(target=worker_main, name=f"genserve-shard-{rank}", daemon=True,
                            args=(rank, dataclasses.asdict(topo), port, backend_name, flags))
        for rank in topo.local_ranks if rank != 0}
    for p in procs.values():
        p.start()
    return procs


class ShardedExecutor(Executor):
    """Rank 0 of a tensor-parallel engine (``resolve_topology``: this host's ranks, other nodes'
    or torchrun's)."""

    @classmethod
    def create_engine(cls, args, plugins=None) -> LoadedEngine:
        if dist.is_initialized():
            raise ConfigError("this process already belongs to a process group: one sharded engine per process")
        plugins = plugins or get_plugins()
        backend_cls = select_backend(plugins, args.backend)
        topo = resolve_topology(args, backend_cls)
        if not topo.serves_http:
            raise ConfigError(f"this process is {topo.describe()}: it runs shards only "
                              "(`genserve serve` does that), not rank 0's engine")
        flags = plain_flags(args, backend_cls)
        local_env(is_loopback(topo.master_addr))  # before the spawn: the workers inherit the environment
        share_cpu_threads(backend_cls().device, topo.ranks_per_node)

        store = open_store(topo, is_master=True)
        if topo.multi_node:  # the other nodes build from rank 0's flags, so no two ranks disagree
            store.set(FLAGS_KEY, json.dumps({"world_size": topo.world_size, "flags": flags}))
        port = topo.master_port if topo.torchrun else store.port
        procs = {} if topo.torchrun else spawn_workers(topo, port, backend_cls.name, flags)
        # Other machines' ranks are watched through heartbeats, on a store client of the watchdog's own.
        members = (MemberMonitor(open_store(topo, is_master=False, port=port), topo.remote_members)
                   if topo.multi_node else None)
        nccl = backend_cls.distributed_backend == "nccl"
        supervisor = Supervisor(procs, shard_timeout(), abort=_abort_default_group if nccl else None,
                                members=members)
        workers = ShardWorkers(supervisor)
        logger.info("tensor parallel: %d ranks over %s (local workers %s)%s", topo.world_size,
                    backend_cls.distributed_backend, [p.pid for p in procs.values()],
                    f"; {topo.describe()}" if topo.multi_node else "")
        try:
            _wait_ready(store, supervisor, topo.world_size)
            tp = init_groups(0, topo.world_size, store, backend_cls.distributed_backend)
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
