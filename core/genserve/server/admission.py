"""The life of a generation request around its validation and run, shared by every route.

``admitted`` counts the request, takes a queue permit (429 when the queue is full) and hands
the permit back if validation fails; ``run_to_completion`` runs a non-streaming request and
always hands the permit back; a vanished client raises ``ClientDisconnected``, which the app
answers once (errors.install_handlers, 499). ``admitted_stream`` does both for a streamed
request: its permit goes to ``GenerationEvents``, which releases it when the stream ends, and
an admission or validation error becomes the stream's one error event.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import contextmanager
from typing import Any

from fastapi.responses import Response

from genserve.server.errors import APIError, counted
from genserve.server.inference import SeqResult, run_many, unless_disconnected
from genserve.server.sse import GenerationEvents, single_event


@contextmanager
def admitted(state):
    state.metrics.request_received()
    with counted(state.metrics):
        permit = state.admit()
        try:
            yield permit
        except BaseException:
            permit.release()
            raise


async def run_to_completion(state, request, permit, jobs) -> list[SeqResult]:
    """Every job's result, in job order. Raises ``APIError`` (engine failures) or
    ``ClientDisconnected`` (the client went away first; its sequences are aborted)."""
    try:
        with counted(state.metrics):
            return await unless_disconnected(request, run_many(state, permit, jobs))
    finally:
        permit.release()


async def admitted_stream(state, prepare: Callable[[], Awaitable[Any]],
                          events: Callable[[Any, Any], AsyncGenerator],
                          headers: dict | None = None) -> Response:
    """A streamed request: ``prepare()`` validates under ``admitted`` and returns what
    ``events(permit, prepared)`` needs to make the SSE events; the permit is released when the
    stream ends.

    Errors follow TGI (router/src/server.rs ``generate_stream_internal`` and
    ``Infer::generate_stream``, which take the concurrency permit and validate inside the SSE
    stream): once a request has chosen to stream, a validation error (422), an overload (429) or
    a dead engine (424) is a 200 ``text/event-stream`` whose one event is
    ``{"error", "error_type"}``, and later generation errors end the stream the same way. A
    server that is loading or draining (503) still answers with its status: that is the server's
    state, not the request's, and load balancers read it. Malformed bodies (422), wrong content
    types (415), auth (401) and payload size (413) are refused before the request is admitted.
    """
    try:
        with admitted(state) as permit:  # counts the failure and releases the permit
            prepared = await prepare()
    except APIError as exc:
        if exc.status == 503:
            raise
        return GenerationEvents(single_event(exc.body()), lambda: None, headers)
    return GenerationEvents(events(permit, prepared), permit.release, headers)
