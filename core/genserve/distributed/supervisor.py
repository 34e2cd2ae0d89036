"""Rank 0 watches the worker processes so a lost shard is an error, never a hang.

A thread waits on the workers' process sentinels (an exit is seen within a fraction of a
second, even while the engine is idle) and times each step: a step that outlives the timeout
means a rank is stuck. Either way the supervisor records why (``dead``), kills the remaining
workers (their closed sockets make a gloo collective on rank 0 fail at once) and, under NCCL,
aborts the communicators so kernels waiting on a missing peer return.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import Callable

from genserve.engine.async_engine import EngineDeadError

logger = logging.getLogger(__name__)


class ShardFailure(EngineDeadError):
    """A tensor-parallel rank died or hangs: the engine cannot compute any more."""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, procs: dict, timeout: float, abort: Callable[[], None] | None = None):
        self.procs, self.timeout, self._abort = procs, timeout, abort
        self.dead: str | None = None
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="genserve-shard-watchdog", daemon=True)
        self._thread.start()

    # -- the watchdog ---------------------------------------------------------------------
    def _exited(self, wait_s: float = 0.0) -> str | None:
        """Why a worker is gone, if one is (waiting up to ``wait_s`` for one to go)."""
        wait([p.sentinel for p in self.procs.values()], timeout=wait_s)
        for rank, p in self.procs.items():
            if not p.is_alive():
                return f"shard {rank} exited ({describe_exit(p.exitcode)})"
        return None

    def _watch(self) -> None:
        while not self._stopping.is_set() and self.dead is None:
            gone = self._exited(wait_s=0.2)
            if self._stopping.is_set():
                return
            if gone:
                self.fail(gone)
                return
            since = self._busy_since
            if since is not None and time.monotonic() - since > self.timeout:
                self.fail(f"a step took longer than {self.timeout:g}s: a shard hangs")
                return

    # -- called by the runner -------------------------------------------------------------
    @contextmanager
    def busy(self):
        """Time the enclosed step against the timeout."""
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None

    def check(self) -> None:
        if self.dead is not None:
            raise ShardFailure(f"tensor-parallel engine is down: {self.dead}")

    def fail(self, reason: str) -> ShardFailure:
        """Mark the engine dead (the first reason wins), stop the other ranks, unblock rank 0."""
        with self._lock:
            first = self.dead is None
            if first:
                self.dead = reason
        if first:
            logger.error("tensor-parallel engine is down: %s", reason)
            self._kill_workers()
            if self._abort is not None:
                try:
                    self._abort()
                except Exception as exc:  # the group may already be gone
                    logger.warning("aborting the process group failed: %s", exc)
        return ShardFailure(f"tensor-parallel engine is down: {self.dead}")

    def fail_from(self, what: str, exc: BaseException) -> ShardFailure:
        """A collective raised on rank 0; prefer the worker's exit as the reason when there is one."""
        return self.fail(self._exited(wait_s=1.0) or f"{what} failed on rank 0: {exc}")

    def _kill_workers(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(5)

    def stop(self, grace: float = 10.0) -> None:
        """Normal shutdown: the workers were told to stop; wait for them, then make sure."""
        self._stopping.set()
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill_workers()
        self._thread.join(1)
