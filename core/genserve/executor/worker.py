"""A tensor-parallel worker: ranks 1..N-1, one process each.

It builds its shard exactly as rank 0 does (the single-rank ``build_engine`` with the TP group
already set), then mirrors rank 0's collectives until told to stop. It sends nothing back: rank 0 samples
from the logits it all-gathers. Any error ends the process, which rank 0's supervisor sees.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing import parent_process
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
from tqdm import tqdm

from genserve.args import defaults
from genserve.backends.select import select_backend
from genserve.distributed.channel import Channel, Forward
from genserve.distributed.groups import (
    READY_KEY,
    START_TIMEOUT,
    destroy_groups,
    init_groups,
    share_cpu_threads,
)
from genserve.engine.build import build_engine
from genserve.executor.topology import Topology
from genserve.models.base import ForwardBatch
from genserve.plugins import get_plugins

logger = logging.getLogger(__name__)


def _exit_with_parent() -> None:
    """A worker must not outlive rank 0 (under NCCL it would hold its GPU, waiting forever)."""
    parent = parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="genserve-parent-watch", daemon=True).start()


@torch.inference_mode()
def serve(runner, channel: Channel) -> None:
    """Make each call rank 0 announces, in its order, until told to stop."""
    while True:
        _, item = channel.recv()
        if isinstance(item, Forward):
            runner.forward(item.input_ids, item.positions,
                           ForwardBatch(item.attn, runner.kv_caches, lora=item.lora))
        elif isinstance(item, torch.Tensor):  # LOGITS: hidden rows
            runner.compute_logits(item)  # this rank's part of the all-gather; rank 0 keeps the result
        else:  # STOP
            return


def run_rank(rank: int, topo: Topology, port: int, backend_name: str, flags: dict,
             on_store: Callable[[], None] | None = None) -> None:
    """Join the engine as ``rank`` and mirror rank 0 until told to stop (raises on any failure).
    ``topo``: where the ranks meet (``port``: node 0's store); ``on_store()`` runs once the
    store is reached (a torchrun rank starts its heartbeat there)."""
    plugins = get_plugins()
    backend_cls = select_backend(plugins, backend_name)
    backend = backend_cls()
    # Before any communicator exists, so none lands on device 0.
    backend.set_device(rank - topo.local_ranks.start)
    share_cpu_threads(backend.device, topo.ranks_per_node)
    store = dist.TCPStore(topo.master_addr, port, topo.world_size, is_master=False, timeout=START_TIMEOUT)
    if on_store is not None:
        on_store()
    store.set(READY_KEY.format(rank), "1")
    tp = init_groups(rank, topo.world_size, store, backend_cls.distributed_backend)
    args = defaults(extra_flags=backend_cls.options_cls.flags(), **{**flags, "backend": backend_name})
    loaded = build_engine(args, plugins)
    runner = loaded.engine.runner
    serve(runner, Channel(tp.cpu_group, runner.backend.device))  # the engine's own backend
    destroy_groups()


def worker_main(rank: int, topology: dict, port: int, backend_name: str, flags: dict) -> None:
    """A spawned worker process: ``run_rank`` (``topology``: a ``Topology``'s fields), then exit
    without interpreter teardown (code 0 after a stop, 1 after any error)."""
    # Ctrl-C reaches the whole process group: rank 0 decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable()  # a crash in native code (NCCL, gloo) still shows where it happened
    if os.environ.get("GENSERVE_HANG_DUMP_S"):  # debugging a hang: every thread's stack, later
        faulthandler.dump_traceback_later(float(os.environ["GENSERVE_HANG_DUMP_S"]), repeat=True)
    _exit_with_parent()
    # tqdm's default lock is a multiprocessing semaphore, which leaving through os._exit leaks.
    tqdm.set_lock(threading.RLock())
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s [shard {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        run_rank(rank, Topology(**topology), port, backend_name, flags)
        code = 0
    except Exception:
        logger.exception("shard %d failed", rank)
        code = 1
    hard_exit(code)


def hard_exit(code: int) -> None:
    """Skip interpreter teardown: a broken communicator can hang it, and even after a clean stop
    a native thread of the store or gloo may still be joinable and abort the process."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
