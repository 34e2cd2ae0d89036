"""What the OpenAI-compatible serving classes share (vLLM's ``OpenAIServing``).

A serving class turns one validated request into engine jobs and the engine's outputs into
OpenAI's answer: ``OpenAIServing.create`` runs the request's life (admission, validation, the
run or the stream, the success metrics) once for every API, and a subclass says what differs:
``prepare`` (body -> jobs), ``response`` (whole answer), ``first_chunks`` and ``chunks`` (the
streamed answer). ``OpenAIServingChat`` and ``OpenAIServingCompletion`` are the two APIs.
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Generic, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from genserve.engine.outputs import RequestOutput
from genserve.engine.sequence import FinishReason
from genserve.server import errors
from genserve.server.admission import admitted, admitted_stream, run_to_completion
from genserve.server.errors import APIError, counted
from genserve.server.inference import SeqResult, merged_streams
from genserve.server.sse import DONE, event
from genserve.server.validation import U64_MAX, GenParams

BAD_LOGPROB = -9999.0  # OpenAI's stand-in for "impossible"


def finish_reason(reason: FinishReason | None) -> str:
    """OpenAI's ``finish_reason``: "length" for max_tokens, else "stop"."""
    return "length" if reason is FinishReason.LENGTH else "stop"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_string(raw: bytes) -> str:
    """A token's text as OpenAI-compatible servers show it in logprobs: its bytes as UTF-8, or,
    for a piece of a character, vLLM's ``bytes:`` form with each byte escaped (``bytes:\\xf0\\x9f``);
    the exact bytes are in the entry's ``bytes``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def without_stop(text: str, reason: FinishReason | None, stop_chars: int) -> str:
    """``text`` without the stop string that ended it: OpenAI never returns the matched stop
    (TGI's routes do, so the engine's text includes it)."""
    if reason is FinishReason.STOP and stop_chars:
        return text[:max(len(text) - stop_chars, 0)]
    return text


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (could still
    become one): what a stream must hold back."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class HeldText:
    """One streamed choice's text, with whatever could still become a stop string held back
    until the next output says (vLLM does the same): no character of a matched stop reaches
    the client, even when the stop spans several tokens."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def feed(self, out: RequestOutput) -> str:
        """The text of ``out`` (and of earlier outputs) that can be sent now."""
        self.pending += out.text
        if out.finished:
            text, self.pending = without_stop(self.pending, out.finish_reason, out.stop_chars), ""
            return text
        keep = stop_prefix_len(self.pending, self.stops)
        cut = len(self.pending) - keep
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text


@dataclass
class RequestTimes:
    """``time.monotonic()`` when the handler started and when validation ended (metrics)."""

    start: float = field(default_factory=time.monotonic)
    validated: float = 0.0


class OpenAIContext:
    """One OpenAI request from validation to its last event: the body, the engine jobs
    (prompt ids, sampling params; one per choice), and the answer's id, time and model."""

    def __init__(self, serving: "OpenAIServing", req, jobs: list[tuple[list[int], Any]],
                 prompt_tokens: int, times: RequestTimes):
        self.req, self.jobs, self.prompt_tokens, self.times = req, jobs, prompt_tokens, times
        self.id = f"{serving.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = serving.model_name(req)
        self.fingerprint = serving.state.system_fingerprint
        self.held = [HeldText(params.stop) for _, params in jobs]  # per choice, when streamed

    def header(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)


CtxT = TypeVar("CtxT", bound=OpenAIContext)


class OpenAIServing(Generic[CtxT]):
    """The request life common to the OpenAI APIs; subclasses fill in the API's shapes.

    Generic in the context type its ``prepare`` makes (``CompletionContext``, ``ChatContext``),
    which its ``response``/``chunks`` then take."""

    id_prefix = "cmpl"
    response_object = chunk_object = "text_completion"

    def __init__(self, state):
        self.state = state

    # -- parameters -----------------------------------------------------------------------
    def gen_params(self, req, max_tokens: int | None) -> GenParams:
        """The sampling fields every OpenAI body has, as TGI's parameters."""
        if req.logit_bias:
            raise errors.validation("`logit_bias` is not supported")
        t, top_p = req.temperature, req.top_p
        if t is not None and not t >= 0:
            raise errors.validation("`temperature` must be >= 0")
        if top_p is not None and not 0 < top_p <= 1:
            raise errors.validation("`top_p` must be > 0.0 and <= 1.0")
        greedy = t == 0
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return GenParams(
            do_sample=not greedy, temperature=None if greedy else t,
            top_p=None if greedy or top_p == 1 else top_p,
            frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
            repetition_penalty=req.repetition_penalty, seed=req.seed, stop=stop,
            max_new_tokens=max_tokens,
            adapter_id=req.model if req.model in self.state.lora_adapters else None)

    def choices_count(self, n: int | None) -> int:
        n = 1 if n is None else n
        limit = self.state.limits.max_client_batch_size
        if not 1 <= n <= limit:
            raise errors.validation(f"`n` must be >= 1 and <= {limit}. Given: {n}")
        return n

    @staticmethod
    def seeded(valid, n: int) -> list:
        """``n`` sampling params for one prompt; a request seed gives choice i the seed + i."""
        seed = valid.params.seed
        return [valid.sampling_params(None if seed is None else (seed + i) % (U64_MAX + 1))
                for i in range(n)]

    def model_name(self, req) -> str:
        return req.model if req.model in self.state.lora_adapters else self.state.model_name

    # -- what a subclass says -------------------------------------------------------------
    async def prepare(self, req, times: RequestTimes) -> CtxT:
        """Validate ``req`` (raising ``APIError``s) and return its context with the jobs."""
        raise NotImplementedError

    def response(self, ctx: CtxT, results: list[SeqResult]) -> dict:
        """The whole answer from the finished sequences (in job order)."""
        raise NotImplementedError

    def first_chunks(self, ctx: CtxT) -> list[dict]:
        """Chunks streamed before any output."""
        return []

    def chunks(self, ctx: CtxT, i: int, out: RequestOutput) -> list[dict]:
        """Chunks for one engine output of choice ``i``."""
        raise NotImplementedError

    # -- the request's life ---------------------------------------------------------------
    async def create(self, request: Request, req) -> Response:
        """Answer ``req``: a JSON body, or server-sent events when ``req.stream``."""
        state, times = self.state, RequestTimes()
        if req.stream:
            return await admitted_stream(state, lambda: self.prepare(req, times), self.events)
        with admitted(state) as permit:
            ctx = await self.prepare(req, times)
        results = await run_to_completion(state, request, permit, ctx.jobs)
        state.record_success(start=times.start, validated=times.validated, arrival=results[-1].arrival,
                             first_scheduled=results[-1].first_scheduled,
                             generated=sum(len(r.tokens) for r in results),
                             spec_proposed=sum(r.spec_proposed for r in results),
                             spec_accepted=sum(r.spec_accepted for r in results))
        return JSONResponse(self.response(ctx, results))

    async def events(self, permit, ctx: CtxT) -> AsyncGenerator:
        """The streamed answer; an error ends it as one ``{error, error_type}`` event."""
        state = self.state
        head = ctx.header(self.chunk_object)
        try:
            with counted(state.metrics):
                for chunk in self.first_chunks(ctx):
                    yield event({**head, **chunk})
                generated, finished, last = 0, 0, None
                proposed = accepted = 0
                async with aclosing(merged_streams(state, permit, ctx.jobs)) as outputs:
                    async for i, out in outputs:
                        generated += len(out.tokens)
                        if out.finished:
                            finished, last = finished + 1, out
                            proposed, accepted = proposed + out.spec_proposed, accepted + out.spec_accepted
                        for chunk in self.chunks(ctx, i, out):
                            yield event({**head, **chunk})
                if finished < len(ctx.jobs):
                    raise errors.incomplete()
                assert last is not None  # every job (there is at least one) has finished
                state.record_success(start=ctx.times.start, validated=ctx.times.validated,
                                     arrival=last.arrival, first_scheduled=last.first_scheduled,
                                     generated=generated, spec_proposed=proposed, spec_accepted=accepted)
                if ctx.include_usage:
                    yield event({**head, "choices": [], "usage": usage(ctx.prompt_tokens, generated)})
                yield DONE
        except APIError as exc:
            yield event(exc.body())
