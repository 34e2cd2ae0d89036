"""A process that runs shards only: ``genserve serve`` on a node other than 0, or a torchrun
rank other than 0. Rank 0 (node 0) serves HTTP and schedules; these processes mirror its calls.

- A node (``run_node``) spawns its ranks (``topology.local_ranks``), beats a heartbeat in
  node 0's store and supervises them: a shard that fails is reported to rank 0 (which fails
  its requests and its /health) and the node stops the others; rank 0 declaring the engine dead,
  or its store going away, stops them too. After rank 0's normal stop every shard exits 0 and so
  does the node.
- A torchrun rank (``run_torchrun_rank``) is one shard in this process, with its own heartbeat:
  torchrun supervises the processes of its node.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import cast

from genserve.distributed.groups import START_TIMEOUT, local_env
from genserve.distributed.heartbeat import Heartbeat, node_timeout
from genserve.distributed.supervisor import describe_exit
from genserve.errors import ConfigError
from genserve.executor.sharded import FLAGS_KEY, open_store, plain_flags, spawn_workers
from genserve.executor.topology import Topology, is_loopback
from genserve.executor.worker import hard_exit, run_rank

logger = logging.getLogger(__name__)
STOP_GRACE_S = 10.0  # after one shard stopped normally, the others get this long to follow


def _heartbeat_store(topo: Topology):
    # Its own connection, with a short timeout: a store call that blocks must not outlast a beat's worth.
    from datetime import timedelta

    return open_store(topo, is_master=False, timeout=timedelta(seconds=max(1.0, node_timeout())))


TOPOLOGY_DESTS = ("nnodes", "node_rank", "master_addr", "master_port")
PER_PROCESS_DESTS = (*TOPOLOGY_DESTS, "hostname", "port", "json_output")


def rank0_flags(store, topo: Topology, own: dict) -> dict:
    """The flags rank 0 builds with (``sharded.FLAGS_KEY``), which this node's ranks must build
    with too (every rank makes the same collectives while building): a flag given here with
    another value is overridden, with a warning. Raises ``ConfigError`` when the nodes disagree
    on the number of ranks (the process groups could never form)."""
    published = json.loads(store.get(FLAGS_KEY).decode())
    if published["world_size"] != topo.world_size:
        raise ConfigError(f"node 0 runs {published['world_size']} ranks in all, this node's flags give "
                          f"{topo.world_size} ({topo.ranks_per_node} per node): give every node the "
                          "same --num-shard / --sharded")
    flags = dict(published["flags"])
    differ = sorted(k for k, v in own.items()
                    if k not in PER_PROCESS_DESTS and k in flags and flags[k] != v and v is not None)
    if differ:
        logger.warning("node %d: using node 0's values of %s (this node's own differ)", topo.node_rank,
                       ", ".join("--" + k.replace("_", "-") for k in differ))
    flags.update({k: own[k] for k in TOPOLOGY_DESTS if k in own})
    return flags


def run_node(args, topo: Topology, backend_cls) -> int:
    """Serve this node's ranks until rank 0 stops them; 0 after a normal stop, else 1."""
    local_env(is_loopback(topo.master_addr))
    logger.info("%s: this node runs shards only; HTTP is served by node 0 (waiting for its store)",
                topo.describe())
    store = open_store(topo, is_master=False, timeout=START_TIMEOUT)  # waits for node 0 to be up
    flags = rank0_flags(store, topo, plain_flags(args, backend_cls))
    del store
    procs = spawn_workers(topo, topo.master_port, backend_cls.name, flags)
    lost = threading.Event()
    why: list[str] = []

    def on_lost(reason: str) -> None:
        why.append(reason)
        lost.set()

    beat = Heartbeat(_heartbeat_store(topo), f"node {topo.node_rank}", on_lost).start()
    stop_signal = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_signal.set())
    logger.info("node %d: shards %s started (pids %s)", topo.node_rank, list(procs),
                [p.pid for p in procs.values()])
    sentinels = {p.sentinel: rank for rank, p in procs.items()}
    code = 0
    while True:
        ready = wait(list(sentinels), timeout=0.2)
        if ready:
            rank = sentinels[cast(int, ready[0])]  # wait() returns the sentinels it was given
            p = procs[rank]
            p.join()
            if p.exitcode == 0:  # rank 0 told every shard to stop: wait for the others
                logger.info("node %d: rank 0 stopped the engine", topo.node_rank)
                deadline = time.monotonic() + STOP_GRACE_S
                for q in procs.values():
                    q.join(max(0.0, deadline - time.monotonic()))
                code = 0 if all(q.exitcode == 0 for q in procs.values()) else 1
                break
            reason = f"shard {rank} exited ({describe_exit(p.exitcode)})"
            logger.error("node %d: %s; stopping this node's shards", topo.node_rank, reason)
            beat.report_down(reason)
            code = 1
            break
        if lost.is_set():
            logger.error("node %d: %s; stopping this node's shards", topo.node_rank, why[0])
            code = 1
            break
        if stop_signal.is_set():
            logger.warning("node %d: stopped by a signal; the engine on node 0 loses its shards",
                           topo.node_rank)
            beat.report_down(f"node {topo.node_rank} was stopped by a signal")
            code = 1
            break
    beat.stop()
    for p in procs.values():
        if p.is_alive():
            p.kill()
    for p in procs.values():
        p.join(5)
    return code


def run_torchrun_rank(args, topo: Topology, backend_cls) -> int:
    """Be torchrun's rank ``topo.rank`` (not 0) until rank 0 stops the engine; exits the process."""
    local_env(is_loopback(topo.master_addr))
    flags = plain_flags(args, backend_cls)
    name = f"rank {topo.rank}"
    logger.info("%s (torchrun): this process runs one shard only; HTTP is served by rank 0", name)

    def on_lost(reason: str) -> None:
        logger.error("%s: %s; stopping", name, reason)
        hard_exit(1)  # the shard may be blocked in a collective that will never complete

    beats: list[Heartbeat] = []

    def start_heartbeat() -> None:
        beats.append(Heartbeat(_heartbeat_store(topo), name, on_lost).start())

    try:
        run_rank(topo.rank, topo, topo.master_port, backend_cls.name, flags, on_store=start_heartbeat)
        code = 0
    except Exception as exc:
        logger.exception("%s failed", name)
        for beat in beats:
            beat.report_down(f"{type(exc).__name__}: {exc}")
        code = 1
    for beat in beats:
        beat.stop()
    hard_exit(code)
    return code  # not reached: hard_exit ends the process


def serve_shards_only(args, backend_cls) -> int | None:
    """``genserve serve`` on a process that is not rank 0: run its shards and return the exit
    code. None when this process is rank 0 (or unsharded) and serves HTTP itself."""
    from genserve.executor.sharded import sharding_requested
    from genserve.executor.topology import resolve_topology

    if not sharding_requested(args):
        return None
    topo = resolve_topology(args, backend_cls)
    if topo.serves_http:
        return None
    return run_torchrun_rank(args, topo, backend_cls) if topo.torchrun else run_node(args, topo, backend_cls)
