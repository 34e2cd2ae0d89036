"""Running validated requests on the engine: whole sequences, streams, cancellation.

Every engine stream is consumed inside ``aclosing`` so that leaving early (client gone,
sibling sequence failed, shutdown) closes ``AsyncEngine.generate``, which aborts the request
and frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import AsyncGenerator

from genserve.errors import EngineDeadError
from genserve.engine.outputs import PromptToken, RequestOutput
from genserve.engine.sequence import FinishReason, TokenInfo
from genserve.server import errors, tracing
from genserve.server.errors import ClientDisconnected


def new_request_id() -> str:
    return uuid.uuid4().hex


def finite(logprob: float | None) -> float | None:
    return logprob if logprob is not None and math.isfinite(logprob) else None


@dataclass
class SeqResult:
    """One finished sequence."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    seed: int | None = None
    prompt_tokens: list[PromptToken] | None = None
    num_prompt_tokens: int = 0
    arrival: float = 0.0
    first_scheduled: float | None = None
    stop_chars: int = 0  # characters at the end of ``text`` that are the matched stop string
    spec_proposed: int = 0  # speculative decoding: tokens proposed for it, and accepted
    spec_accepted: int = 0

    @property
    def logprob_sum(self) -> float:
        return sum(t.logprob for t in self.tokens if t.logprob is not None and math.isfinite(t.logprob))


def check_output(out: RequestOutput, permit) -> None:
    """Turn an engine error or abort into the HTTP error TGI answers with."""
    if out.finish_reason is FinishReason.ERROR:
        raise errors.generation(out.error or "Request failed during generation")
    if out.finish_reason is FinishReason.ABORTED:
        if permit is not None and permit.shutting_down:
            raise errors.generation("the server is shutting down")
        raise errors.generation("the request was aborted")


async def engine_stream(state, permit, request_id: str, prompt_ids: list[int],
                        params) -> AsyncGenerator[RequestOutput, None]:
    """The engine's outputs for one sequence; engine failures become ``APIError``s."""
    if permit is not None:
        permit.request_ids.add(request_id)
    try:
        async with aclosing(state.engine.generate(request_id, prompt_ids, params)) as outputs:
            async for out in outputs:
                tracing.engine_output(out)  # the queued and infer spans, when tracing
                check_output(out, permit)
                yield out
    except EngineDeadError as exc:
        raise errors.generation(f"the engine is not running: {exc}") from None
    except (ValueError, RuntimeError) as exc:  # refused by the engine at admission
        raise errors.generation(str(exc)) from None
    finally:
        if permit is not None:
            permit.request_ids.discard(request_id)


async def run_sequence(state, permit, request_id: str, prompt_ids: list[int], params) -> SeqResult:
    result = SeqResult()
    finished = False
    async with aclosing(engine_stream(state, permit, request_id, prompt_ids, params)) as outputs:
        async for out in outputs:
            result.text += out.text
            result.tokens.extend(out.tokens)
            if out.prompt_tokens is not None:
                result.prompt_tokens = out.prompt_tokens
            result.num_prompt_tokens = out.num_prompt_tokens
            result.arrival, result.first_scheduled = out.arrival, out.first_scheduled
            if out.finished:
                result.finish_reason, result.seed = out.finish_reason, out.seed
                result.stop_chars = out.stop_chars
                result.spec_proposed, result.spec_accepted = out.spec_proposed, out.spec_accepted
                finished = True
    if not finished:
        raise errors.incomplete()
    return result


async def run_many(state, permit, jobs: list[tuple[list[int], object]]) -> list[SeqResult]:
    """Several sequences at once (best_of, n, prompt lists); one failure cancels the rest."""
    base = new_request_id()
    if len(jobs) == 1:
        return [await run_sequence(state, permit, base, *jobs[0])]
    tasks = [asyncio.ensure_future(run_sequence(state, permit, f"{base}-{i}", ids, params))
             for i, (ids, params) in enumerate(jobs)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            failure = None if t.cancelled() else t.exception()
            if failure is not None:
                raise failure
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their streams are closed


async def merged_streams(state, permit, jobs: list[tuple[list[int], object]]
                         ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Outputs of several sequences as they come, tagged with the job index."""
    base = new_request_id()
    if len(jobs) == 1:
        ids, params = jobs[0]
        async with aclosing(engine_stream(state, permit, base, ids, params)) as outputs:
            async for out in outputs:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, ids, params):
        try:
            async with aclosing(engine_stream(state, permit, f"{base}-{i}", ids, params)) as outputs:
                async for out in outputs:
                    queue.put_nowait((i, out))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((i, exc))
            return
        queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, ids, params)) for i, (ids, params) in enumerate(jobs)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                if isinstance(item, asyncio.CancelledError):
                    remaining -= 1
                    continue
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with suppress(BaseException):
                await t


async def _wait_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request, coro):
    """Await ``coro``, cancelling it as soon as the client disconnects.

    Starlette does not cancel a non-streaming handler when its client goes away; this does,
    and the cancellation closes the engine streams (so the KV blocks are freed next step).
    """
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with suppress(BaseException):
            await task
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with suppress(BaseException):
                await task
