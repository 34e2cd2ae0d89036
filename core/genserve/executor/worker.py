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
from multiprocessing import parent_process
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
from tqdm import tqdm

from genserve.args import defaults
from genserve.backends.select import select_backend
from genserve.distributed.channel import Channel, Forward
from genserve.distributed.groups import (
    HOST,
    READY_KEY,
    START_TIMEOUT,
    destroy_groups,
    init_groups,
    share_cpu_threads,
)
from genserve.engine.build import build_engine
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


def worker_main(rank: int, world_size: int, port: int, backend_name: str, flags: dict) -> None:
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
        plugins = get_plugins()
        backend_cls = select_backend(plugins, backend_name)
        backend = backend_cls()
        backend.set_device(rank)  # before any communicator exists, so none lands on device 0
        share_cpu_threads(backend.device, world_size)
        store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=START_TIMEOUT)
        store.set(READY_KEY.format(rank), "1")
        tp = init_groups(rank, world_size, store, backend_cls.distributed_backend)
        args = defaults(extra_flags=backend_cls.options_cls.flags(), **{**flags, "backend": backend_name})
        loaded = build_engine(args, plugins)
        runner = loaded.engine.runner
        serve(runner, Channel(tp.cpu_group, runner.backend.device))  # the engine's own backend
        destroy_groups()
        code = 0
    except Exception:
        logger.exception("shard %d failed", rank)
        code = 1
    # Skip interpreter teardown: a broken communicator can hang it, and even after a clean stop
    # a native thread of the store or gloo may still be joinable and abort the process.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
