"""Server-sent events through sse-starlette, with the cleanup a generation stream needs."""

from __future__ import annotations

import json
from contextlib import suppress
from typing import Any, AsyncGenerator, Callable

from sse_starlette import EventSourceResponse, ServerSentEvent


def event(payload: Any) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(payload, ensure_ascii=False, separators=(",", ":")))


DONE = ServerSentEvent(data="[DONE]")


async def single_event(payload: Any) -> AsyncGenerator[ServerSentEvent, None]:
    """A stream of one event (an error body), after which the response ends."""
    yield event(payload)


class GenerationEvents(EventSourceResponse):
    """An SSE response that, however it ends (finished, client gone, server stopping), closes
    its generator (aborting the engine request) and then runs ``on_close`` (the permit)."""

    def __init__(self, events: AsyncGenerator, on_close: Callable[[], None], headers: dict | None = None):
        super().__init__(events, sep="\n", headers={"X-Accel-Buffering": "no", **(headers or {})})
        self._events, self._on_close = events, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with suppress(Exception):
                await self._events.aclose()
            self._on_close()
