"""Liveness across machines: rank 0 cannot wait on another node's process sentinels, so every
remote member (a node's ``genserve serve`` process, or a torchrun rank) beats a counter in the
rendezvous store (``torch.distributed.TCPStore``) and rank 0 watches the counters.

Keys, all under the store of node 0 (``--master-addr:--master-port``):
- ``genserve/member/<name>/beat``: a counter the member adds 1 to every ``beat_interval()`` s;
- ``genserve/member/<name>/down``: why the member stopped (one of its shards died);
- ``genserve/engine/down``: why rank 0 declared the engine dead; members then stop their shards,
  so no rank waits forever on a collective that will never come (and their closed sockets end
  any gloo call rank 0 is blocked in: gloo's abort does not interrupt one, measured on torch 2.14).

A member that misses beats for ``node_timeout()`` seconds is lost; a member that cannot reach
the store (node 0 is gone) stops its shards.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

BEAT_KEY = "genserve/member/{}/beat"
DOWN_KEY = "genserve/member/{}/down"
ENGINE_DOWN_KEY = "genserve/engine/down"


def node_timeout() -> float:
    """Seconds without a heartbeat after which rank 0 declares a remote member lost
    (``GENSERVE_NODE_TIMEOUT``, default 30)."""
    return float(os.environ.get("GENSERVE_NODE_TIMEOUT", "30"))


def beat_interval() -> float:
    """Seconds between two beats: a quarter of the timeout, at most one second."""
    return min(1.0, node_timeout() / 4)


class Heartbeat:
    """A member's side: beats until stopped; ``on_lost(reason)`` runs once, from the beating
    thread, when rank 0 declared the engine dead or the store cannot be reached.

    ``store``: a ``TCPStore`` client of this process's own (its calls must not interleave with
    another thread's); ``name``: how rank 0 knows the member ("node 1", "rank 3").
    """

    def __init__(self, store, name: str, on_lost: Callable[[str], None]):
        self.store, self.name, self.on_lost = store, name, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genserve-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.store.add(BEAT_KEY.format(self.name), 1)  # rank 0 starts timing from the first beat
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(beat_interval()):
            try:
                self.store.add(BEAT_KEY.format(self.name), 1)
                if self.store.check([ENGINE_DOWN_KEY]):
                    reason = f"rank 0 declared the engine dead: {self.store.get(ENGINE_DOWN_KEY).decode()}"
                else:
                    continue
            except Exception as exc:  # noqa: BLE001 - any store error: node 0's store is gone, so is rank 0
                reason = f"node 0's store is unreachable ({type(exc).__name__}: {exc})"
            if not self._stop.is_set():
                self.on_lost(reason)
            return

    def report_down(self, reason: str) -> None:
        """Tell rank 0 why this member stops (best effort: the store may be gone)."""
        try:
            self.store.set(DOWN_KEY.format(self.name), reason)
        except Exception as exc:  # noqa: BLE001 - best effort: the store may be gone
            logger.warning("could not report the failure to rank 0: %s", exc)

    def stop(self) -> None:
        self._stop.set()


class MemberMonitor:
    """Rank 0's side: ``poll()`` says why a remote member is lost, or None while all are alive.

    ``store``: a ``TCPStore`` client only the supervisor's thread uses; ``members``: the names
    the members beat under; ``timeout``: seconds without a beat (counted from a member's first
    beat: one that never started is the start-up's timeout to report).
    """

    def __init__(self, store, members: list[str], timeout: float | None = None):
        self.store, self.members = store, list(members)
        self.timeout = node_timeout() if timeout is None else timeout
        self._seen: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()  # the watchdog polls; whoever fails the engine announces

    def poll(self) -> str | None:
        with self._lock:
            return self._poll()

    def _poll(self) -> str | None:
        now = time.monotonic()
        for name in self.members:
            if self.store.check([DOWN_KEY.format(name)]):
                return f"{name} failed: {self.store.get(DOWN_KEY.format(name)).decode()}"
            count = self.store.add(BEAT_KEY.format(name), 0)
            last = self._seen.get(name)
            if last is None or count != last[0]:
                if count:
                    self._seen[name] = (count, now)
            elif now - last[1] > self.timeout:
                return f"{name} lost: no heartbeat for {self.timeout:g}s"
        return None

    def announce_down(self, reason: str) -> None:
        """Tell every member the engine is dead, so they stop their shards (best effort)."""
        try:
            with self._lock:
                self.store.set(ENGINE_DOWN_KEY, reason)
        except Exception as exc:  # noqa: BLE001 - best effort: the store may be gone
            logger.warning("could not tell the other nodes the engine is down: %s", exc)
