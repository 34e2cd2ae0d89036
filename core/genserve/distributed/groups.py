"""Process groups: the ranks meet at node 0's store (127.0.0.1 on one host).

Two groups over the same ranks: the default one (NCCL on CUDA, gloo on CPU) carries the
model's collectives under a bounded timeout; a gloo control group carries rank 0's messages,
which the workers wait on for as long as the server stays idle, so it gets no real timeout.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from genserve.distributed.state import TPGroup, set_tp_group

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
READY_KEY = "genserve/shard{}/ready"
IDLE_TIMEOUT = timedelta(days=3650)
DESTROY_TIMEOUT_S = 15.0
# Spawning a worker and importing torch can take a while on a loaded host.
START_TIMEOUT = timedelta(minutes=10)
_threads_before: int | None = None


def shard_timeout() -> float:
    """Seconds a forward or LM-head call may take before rank 0 declares a shard hung."""
    return float(os.environ.get("GENSERVE_SHARD_TIMEOUT", "300"))


def local_env(loopback: bool = True) -> None:
    """Defaults every rank needs before its first collective; the user's own values win.
    ``loopback``: every rank is on this host (the rendezvous address is a loopback one)."""
    # NVLink multicast (NVLS) fails to set up, or hangs, on hosts without multicast support;
    # ring and tree algorithms serve 2-8 GPUs of one host.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if loopback and os.path.exists("/sys/class/net/lo"):  # one host: keep the sockets off the network
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def share_cpu_threads(device: torch.device, world_size: int) -> None:
    """CPU ranks split the cores: N processes that each use every core oversubscribe them, and
    spinning OpenMP threads then slow every step many times over."""
    global _threads_before
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        _threads_before = torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // world_size))


def init_groups(rank: int, world_size: int, store, backend: str) -> TPGroup:
    # Longer than the supervisor's timeout, so rank 0 sees a hang before NCCL's watchdog does.
    timeout = timedelta(seconds=shard_timeout() + 60)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return set_tp_group(rank, world_size, cpu_group=ctrl)


def destroy_groups() -> None:
    """Leave the groups and make this process single-rank again (later engines build unsharded)."""
    global _threads_before
    try:
        if dist.is_initialized():
            # NCCL's teardown can block for good once the peers have exited (seen on 2 H200s
            # after a finished run): give it a bounded time, then leave it to process exit.
            done = threading.Thread(target=dist.destroy_process_group, daemon=True)
            done.start()
            done.join(DESTROY_TIMEOUT_S)
            if done.is_alive():
                logger.warning("process-group teardown still blocked after %.0f s; moving on",
                               DESTROY_TIMEOUT_S)
    finally:
        set_tp_group(0, 1)
        if _threads_before is not None:
            torch.set_num_threads(_threads_before)
            _threads_before = None
