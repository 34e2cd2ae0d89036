"""The life of a generation request around its validation and run, shared by every route.

``admitted`` counts the request, takes a queue permit (429 when the queue is full) and hands
the permit back if validation fails; ``run_to_completion`` runs a non-streaming request and
always hands the permit back, turning a vanished client into a 499. Streaming routes give the
permit to ``GenerationEvents``, which releases it when the stream ends.
"""

from __future__ import annotations

from contextlib import contextmanager

from fastapi.responses import Response

from genserve.server.errors import counted
from genserve.server.inference import ClientDisconnected, SeqResult, run_many, unless_disconnected


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


async def run_to_completion(state, request, permit, jobs) -> list[SeqResult] | Response:
    """Every job's result, or a 499 response when the client went away first."""
    try:
        with counted(state.metrics):
            return await unless_disconnected(request, run_many(state, permit, jobs))
    except ClientDisconnected:
        state.metrics.request_failed("cancelled")
        return Response(status_code=499)
    finally:
        permit.release()
