"""Rank 0 watches the worker processes so a lost shard is an error, never a hang.

A thread waits on the workers' process sentinels (an exit is seen within a fraction of a
second, even while the engine is idle) and times each collective call (forward, LM head): one
that outlives the timeout means a rank is stuck. Either way the supervisor records why
(``dead``), kills the remaining workers (their closed sockets make a gloo collective on rank 0
fail at once) and, under NCCL, aborts the communicators so kernels waiting on a missing peer
return. Ranks on other machines are watched through their heartbeats (``members``, a
``heartbeat.MemberMonitor``), and told through the store when the engine is declared dead.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from multiprocessing.connection import wait

from genserve.distributed.heartbeat import MemberMonitor
from genserve.errors import ShardFailure

logger = logging.getLogger(__name__)


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
    def __init__(self, procs: dict, timeout: float, abort: Callable[[], None] | None = None,
                 members: MemberMonitor | None = None):
        """``procs``: this host's worker processes by rank (may be empty); ``timeout``: seconds
        a collective call may take; ``abort``: aborts the process groups (NCCL); ``members``:
        the remote members' heartbeats, when ranks run on other machines."""
        self.procs, self.timeout, self._abort, self.members = procs, timeout, abort, members
        self.dead: str | None = None
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._stopping = threading.Event()
        self._failed = threading.Event()
        self._settled = threading.Event()  # the workers are gone and the groups aborted
        self._thread = threading.Thread(target=self._watch, name="genserve-shard-watchdog", daemon=True)
        self._thread.start()

    # -- the watchdog ---------------------------------------------------------------------
    def _watch(self) -> None:
        # Only this thread reaps the workers: a sentinel fires as the process closes its files,
        # a moment before waitpid can report it, and two threads reaping race for the status.
        sentinels = {p.sentinel: (rank, p) for rank, p in self.procs.items()}
        while not self._stopping.is_set() and self.dead is None:
            ready = wait(list(sentinels), timeout=0.2)
            if self._stopping.is_set() or self.dead is not None:
                return
            if ready:
                rank, p = sentinels[ready[0]]
                p.join()
                self.fail(f"shard {rank} exited ({describe_exit(p.exitcode)})")
                return
            since = self._busy_since
            if since is not None and time.monotonic() - since > self.timeout:
                self.fail(f"a forward or LM-head call took longer than {self.timeout:g}s: a shard hangs")
                return
            if self.members is not None:
                try:
                    lost = self.members.poll()
                except Exception as exc:  # noqa: BLE001 - the store failed: no member can be vouched for
                    lost = f"the rendezvous store failed: {exc}"
                if lost is not None:
                    self.fail(lost)
                    return

    # -- called by the runner -------------------------------------------------------------
    @contextmanager
    def busy(self):
        """Time the enclosed collective call against the timeout."""
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None

    def check(self) -> None:
        if self.dead is not None:
            raise self._failure()

    def _failure(self) -> ShardFailure:
        # Whoever raises waits for the clean-up, so an error never reaches a caller while a
        # worker is still being killed.
        self._settled.wait(10)
        return ShardFailure(f"tensor-parallel engine is down: {self.dead}")

    def fail(self, reason: str) -> ShardFailure:
        """Mark the engine dead (the first reason wins), stop the other ranks, unblock rank 0."""
        with self._lock:
            first = self.dead is None
            if first:
                self.dead = reason
                self._failed.set()
        if first:
            logger.error("tensor-parallel engine is down: %s", reason)
            self._kill_workers()
            if self.members is not None:
                self.members.announce_down(reason)
            if self._abort is not None:
                try:
                    self._abort()
                except Exception as exc:  # the group may already be gone
                    logger.warning("aborting the process group failed: %s", exc)
            self._settled.set()
        return self._failure()

    def fail_from(self, what: str, exc: BaseException) -> ShardFailure:
        """A collective raised on rank 0. A worker's exit explains it better than gloo's socket
        error, so the watchdog gets a moment to report one first (the first reason wins)."""
        self._failed.wait(1.0)
        return self.fail(f"{what} failed on rank 0: {exc}")

    def _kill_workers(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(5)

    def stop(self, tell_workers: Callable[[], None], grace: float = 10.0) -> None:
        """Normal shutdown: quiet the watchdog (a worker's exit is expected now), tell the
        workers to stop, wait for them, then make sure."""
        self._stopping.set()
        self._thread.join()
        if self.dead is None:
            try:
                tell_workers()
            except Exception as exc:  # a worker went in the meantime: killed below
                logger.warning("could not tell the workers to stop: %s", exc)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill_workers()
