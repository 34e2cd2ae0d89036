"""The asyncio face of the engine.

The engine steps in one dedicated thread (model compute never blocks the event loop);
requests and aborts reach it through a thread-safe inbox, and each request's outputs come
back through its own asyncio queue. A consumer that stops iterating (client gone) aborts its
request, which frees the KV blocks at the start of the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from typing import AsyncIterator, Callable

from genserve.engine.llm_engine import LLMEngine
from genserve.engine.outputs import RequestOutput
from genserve.engine.sampling_params import SamplingParams
from genserve.errors import EngineDeadError

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.dead: str | None = None
        self.step_listeners: list[Callable[[dict], None]] = []
        self.request_count = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="genserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all("the server is shutting down")

    @property
    def is_alive(self) -> bool:
        lost = self.engine.runner.peers.dead
        if lost is not None and self.dead is None:
            # A shard or node was lost while no step ran: no step can succeed again, so /health
            # and admission say so now instead of after the next request's failed step.
            self.dead = f"tensor-parallel engine is down: {lost}"
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    # -- public API -----------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if not self.is_alive:
            raise EngineDeadError(self.dead or "the engine is not running")
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        self.request_count += 1
        self._inbox.put(("add", (request_id, prompt_ids, params)))
        finished = False
        try:
            while True:
                out = await self._next_output(stream)
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    async def _next_output(self, stream: asyncio.Queue) -> RequestOutput | BaseException:
        """The stream's next item, checking every second that the engine thread still runs.

        Not ``asyncio.wait_for(stream.get(), 1.0)``: before Python 3.12, ``wait_for`` swallows a
        cancellation that arrives in the same loop iteration as the item it waited for (it
        returns the item instead, CPython gh-86296). Tokens arrive every few milliseconds, so a
        client that went away was often not cancelled at all and its request ran to the end,
        holding its KV blocks. ``asyncio.wait`` never swallows the caller's cancellation.
        """
        if not stream.empty():
            return stream.get_nowait()
        getter = asyncio.ensure_future(stream.get())
        try:
            while True:
                done, _ = await asyncio.wait((getter,), timeout=1.0)
                if done:
                    return getter.result()
                if not self.is_alive:  # nothing yet: make sure someone is still computing
                    raise EngineDeadError(self.dead or "the engine stopped")
        finally:
            if not getter.done():
                getter.cancel()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> dict:
        return {**self.engine.stats(), "in_flight": len(self._streams)}

    # -- the engine thread ----------------------------------------------------------------
    def _deliver(self, out: RequestOutput | BaseException, request_id: str) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, out)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                request_id, prompt_ids, params = item
                try:
                    self.engine.add_request(request_id, prompt_ids, params)
                except Exception as exc:
                    self._deliver(exc, request_id)
            elif kind == "abort":
                out = self.engine.abort(item)
                if out is not None:
                    self._deliver(out, item)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._drain_inbox(block=not self.engine.has_work)
                if not self.engine.has_work:
                    continue
                outputs = self.engine.step()
                for out in outputs:
                    self._deliver(out, out.request_id)
                stats = self.engine.last_step_stats
                for listener in self.step_listeners:
                    listener(stats)
            except EngineDeadError as exc:  # e.g. a tensor-parallel shard died: stop serving
                logger.error("engine stopped: %s", exc)
                self.dead = str(exc)
                self._fail_all(f"the engine stopped: {exc}")
                return
            except Exception:
                # LLMEngine.step fails the one request a failure belongs to (it retries the step
                # in halves); what reaches here could not be pinned on one (the device's results
                # could not be read, the scheduler broke): fail every request, not the server.
                detail = traceback.format_exc()
                logger.error("engine step failed:\n%s", detail)
                self._fail_all(f"generation failed: {detail.strip().splitlines()[-1]}")

    def _fail_all(self, message: str) -> None:
        for request_id in list(self.engine.seqs):
            out = self.engine.fail_request(request_id, message)
            if out is not None:
                self._deliver(out, request_id)
