"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from genserve.engine.sequence import FinishReason
from genserve.server import errors
from genserve.server.chat import parse_tool_output, render_chat, response_format_grammar, tool_schema
from genserve.server.admission import admitted, admitted_stream, run_to_completion
from genserve.server.errors import APIError, counted
from genserve.server.inference import finite, merged_streams
from genserve.server.routes_tgi import ERRORS, get_state, record_validated, sse_schema
from genserve.server.schemas_openai import ChatCompletion, ChatRequest, Completion, CompletionRequest, ModelList
from genserve.server.sse import DONE, event
from genserve.server.tool_stream import ToolCallReader, ToolDelta, new_call_id
from genserve.server.validation import U64_MAX, GenParams, validate

router = APIRouter(tags=["OpenAI"])
CHAT_200 = {200: {"description": "A chat completion, or chunks as server-sent events", "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
    "text/event-stream": {"schema": sse_schema("ChatCompletionChunk", done=True)}}}}
COMPLETION_200 = {200: {"description": "A completion, or chunks as server-sent events", "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/Completion"}},
    "text/event-stream": {"schema": sse_schema("Completion", done=True)}}}}
BAD_LOGPROB = -9999.0  # OpenAI's stand-in for "impossible"


async def parse_body(request: Request, model):
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.validation(f"malformed JSON: {exc}") from None
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def finish_reason(reason: FinishReason) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def openai_params(state, req, max_tokens: int | None) -> GenParams:
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
        max_new_tokens=max_tokens, adapter_id=req.model if req.model in state.lora_adapters else None)


def choices_count(state, n: int | None) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= state.limits.max_client_batch_size:
        raise errors.validation(f"`n` must be >= 1 and <= {state.limits.max_client_batch_size}. Given: {n}")
    return n


def seeded(valid, n: int):
    seed = valid.params.seed
    return [valid.sampling_params(None if seed is None else (seed + i) % (U64_MAX + 1)) for i in range(n)]


def chat_logprobs(state, tokens) -> dict:
    content = []
    for t in tokens:
        if t.special:
            continue
        top = [{"token": state.token_text(i), "logprob": lp, "bytes": list(state.token_text(i).encode())}
               for i, lp in t.top if finite(lp) is not None]
        lp = finite(t.logprob)
        content.append({"token": t.text, "logprob": BAD_LOGPROB if lp is None else lp,
                        "bytes": list(t.text.encode()), "top_logprobs": top})
    return {"content": content}


def model_name(state, req) -> str:
    return req.model if req.model in state.lora_adapters else state.model_name


# -- chat ---------------------------------------------------------------------------------
async def chat_impl(state, request: Request, req: ChatRequest) -> Response:
    start = time.monotonic()

    async def prepare() -> tuple[ChatContext, list]:
        n = choices_count(state, req.n)
        p = openai_params(state, req, req.max_completion_tokens or req.max_tokens)
        if req.logprobs:
            p.top_n_tokens = req.top_logprobs or 0
        schema = tool_schema(req.tools, req.tool_choice)
        if schema is not None:
            p.grammar = ("json_schema", schema)
        else:
            p.grammar = response_format_grammar(req.response_format)
        prompt = render_chat(state, req.messages, req.tools if schema is not None else None,
                             req.tool_prompt)
        valid = await validate(state, prompt, p, add_special_tokens=False)
        validated = record_validated(state, valid)
        jobs = [(valid.prompt_ids, params) for params in seeded(valid, n)]
        return ChatContext(state, req, valid, schema is not None, start, validated), jobs

    if req.stream:
        return await admitted_stream(state, prepare, lambda permit, ctx, jobs: chat_events(ctx, permit, jobs))
    with admitted(state) as permit:
        ctx, jobs = await prepare()
    results = await run_to_completion(state, request, permit, jobs)
    if isinstance(results, Response):
        return results
    ctx.succeeded(results[-1].arrival, results[-1].first_scheduled, sum(len(r.tokens) for r in results))
    choices = []
    for i, r in enumerate(results):
        content, calls = parse_tool_output(r.text) if ctx.tools else (r.text, None)
        choices.append({"index": i, "message": {"role": "assistant", "content": content, "tool_calls": calls},
                        "logprobs": chat_logprobs(state, r.tokens) if req.logprobs else None,
                        "finish_reason": chat_finish_reason(r.finish_reason, bool(calls))})
    completion = sum(len(r.tokens) for r in results)
    return JSONResponse({**ctx.header("chat.completion"), "choices": choices,
                         "usage": usage(ctx.valid.input_length, completion)})


def chat_finish_reason(reason: FinishReason, tool_call: bool) -> str:
    # A tool call cut short by max_tokens says "length", as OpenAI does: its arguments are partial.
    return "tool_calls" if tool_call and reason is not FinishReason.LENGTH else finish_reason(reason)


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ChatContext:
    def __init__(self, state, req, valid, tools: bool, start: float, validated: float, kind="chatcmpl"):
        self.state, self.req, self.valid, self.tools = state, req, valid, tools
        self.start, self.validated = start, validated
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name(state, req)

    def header(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.state.system_fingerprint}

    def succeeded(self, arrival, first_scheduled, generated: int) -> None:
        self.state.last_success = time.monotonic()
        self.state.metrics.request_succeeded(start=self.start, validated=self.validated, arrival=arrival,
                                             first_scheduled=first_scheduled,
                                             end=self.state.last_success, generated=generated)

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)


def delta(content=None, tool_calls=None) -> dict:
    # role and tool_calls in every delta: the text-generation client requires both keys
    return {"role": "assistant", "content": content, "tool_calls": tool_calls}


def tool_deltas(d: ToolDelta, call_id: str) -> list[dict]:
    """OpenAI's streamed tool call: id, type and name first (empty arguments), then only pieces
    of the arguments text, all under tool call index 0."""
    out = []
    if d.name is not None:
        out.append(delta(None, [{"index": 0, "id": call_id, "type": "function",
                                 "function": {"name": d.name, "arguments": ""}}]))
    if d.arguments:
        out.append(delta(None, [{"index": 0, "function": {"arguments": d.arguments}}]))
    if d.content:
        out.append(delta(d.content))
    return out


async def chat_events(ctx: ChatContext, permit, jobs):
    state, req = ctx.state, ctx.req
    head = ctx.header("chat.completion.chunk")

    def chunk(i, d, reason=None, logprobs=None) -> dict:
        return {**head, "choices": [{"index": i, "delta": d, "logprobs": logprobs, "finish_reason": reason}]}

    try:
        with counted(state.metrics):
            for i in range(len(jobs)):
                yield event(chunk(i, delta("")))
            readers = [ToolCallReader() for _ in jobs] if ctx.tools else []
            call_ids = [new_call_id() for _ in readers]
            generated, finished, last = 0, 0, None
            async with aclosing(merged_streams(state, permit, jobs)) as outputs:
                async for i, out in outputs:
                    generated += len(out.tokens)
                    if ctx.tools:
                        for d in tool_deltas(readers[i].feed(out.text, final=out.finished), call_ids[i]):
                            yield event(chunk(i, d))
                    elif out.text or (req.logprobs and out.tokens and not out.finished):
                        lp = chat_logprobs(state, out.tokens) if req.logprobs else None
                        yield event(chunk(i, delta(out.text), logprobs=lp))
                    if not out.finished:
                        continue
                    finished, last = finished + 1, out
                    reason = chat_finish_reason(out.finish_reason, ctx.tools and readers[i].is_call)
                    yield event(chunk(i, {"role": "assistant", "content": None, "tool_calls": None}, reason))
            if finished < len(jobs):
                raise errors.incomplete()
            ctx.succeeded(last.arrival, last.first_scheduled, generated)
            if ctx.include_usage:
                yield event({**head, "choices": [], "usage": usage(ctx.valid.input_length, generated)})
            yield DONE
    except APIError as exc:
        yield event(exc.body())


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={**CHAT_200, **ERRORS})
async def chat_completions(req: ChatRequest, request: Request):
    """Chat completion with the model's chat template (OpenAI-compatible)."""
    return await chat_impl(get_state(request), request, req)


# -- completions --------------------------------------------------------------------------
def prompts_of(state, prompt) -> list:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise errors.validation("`prompt` cannot be empty")
    if len(prompts) > state.limits.max_client_batch_size:
        raise errors.validation(f"Number of prompts exceeds the maximum allowed batch size of "
                                f"{state.limits.max_client_batch_size}")
    return prompts


def completion_logprobs(state, tokens, offset: int, top: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        out["tokens"].append(t.text)
        out["token_logprobs"].append(finite(t.logprob))
        out["top_logprobs"].append({state.token_text(i): lp for i, lp in t.top[:top] if finite(lp) is not None})
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


async def completions_impl(state, request: Request, req: CompletionRequest) -> Response:
    start = time.monotonic()

    async def prepare():
        if req.suffix:
            raise errors.validation("Suffix is not supported and can be achieved by preprocessing the prompt.")
        n = choices_count(state, req.n)
        prompts = prompts_of(state, req.prompt)
        p = openai_params(state, req, req.max_tokens if req.max_tokens is not None else 100)
        if req.logprobs is not None:
            p.top_n_tokens = req.logprobs
        valids = [await validate(state, x, p) for x in prompts]
        validated = time.monotonic()
        for v in valids:
            record_validated(state, v)
        jobs = [(v.prompt_ids, params) for v in valids for params in seeded(v, n)]
        echo = [v.inputs if req.echo else "" for v in valids for _ in range(n)]
        ctx = ChatContext(state, req, valids[0], False, start, validated, kind="cmpl")
        return ctx, jobs, echo, sum(v.input_length for v in valids)

    if req.stream:
        return await admitted_stream(state, prepare, lambda permit, ctx, *rest: completion_events(
            ctx, permit, *rest))
    with admitted(state) as permit:
        ctx, jobs, echo, prompt_tokens = await prepare()
    results = await run_to_completion(state, request, permit, jobs)
    if isinstance(results, Response):
        return results
    generated = sum(len(r.tokens) for r in results)
    ctx.succeeded(results[-1].arrival, results[-1].first_scheduled, generated)
    choices = [{"index": i, "text": echo[i] + r.text, "finish_reason": finish_reason(r.finish_reason),
                "logprobs": completion_logprobs(state, r.tokens, len(echo[i]), req.logprobs)
                if req.logprobs is not None else None} for i, r in enumerate(results)]
    return JSONResponse({**ctx.header("text_completion"), "choices": choices,
                         "usage": usage(prompt_tokens, generated)})


async def completion_events(ctx: ChatContext, permit, jobs, echo: list[str], prompt_tokens: int):
    state, req = ctx.state, ctx.req
    head = ctx.header("text_completion")
    try:
        with counted(state.metrics):
            generated, finished, last = 0, 0, None
            offsets = [len(e) for e in echo]
            for i, e in enumerate(echo):
                if e:
                    yield event({**head, "choices": [{"index": i, "text": e, "logprobs": None,
                                                      "finish_reason": None}]})
            async with aclosing(merged_streams(state, permit, jobs)) as outputs:
                async for i, out in outputs:
                    generated += len(out.tokens)
                    lp = None
                    if req.logprobs is not None:
                        lp = completion_logprobs(state, out.tokens, offsets[i], req.logprobs)
                    offsets[i] += len(out.text)
                    reason = None
                    if out.finished:
                        finished, last = finished + 1, out
                        reason = finish_reason(out.finish_reason)
                    if out.text or reason or lp:
                        yield event({**head, "choices": [{"index": i, "text": out.text, "logprobs": lp,
                                                          "finish_reason": reason}]})
            if finished < len(jobs):
                raise errors.incomplete()
            ctx.succeeded(last.arrival, last.first_scheduled, generated)
            if ctx.include_usage:
                yield event({**head, "choices": [], "usage": usage(prompt_tokens, generated)})
            yield DONE
    except APIError as exc:
        yield event(exc.body())


@router.post("/v1/completions", response_model=Completion, responses={**COMPLETION_200, **ERRORS})
async def completions(req: CompletionRequest, request: Request):
    """Text completion (OpenAI-compatible)."""
    return await completions_impl(get_state(request), request, req)


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request):
    """The served model (and the LoRA adapters, selectable as `model`)."""
    state = get_state(request)
    owner = "genserve"
    data = [{"id": state.model_name, "object": "model", "created": state.started, "owned_by": owner}]
    data += [{"id": a, "object": "model", "created": state.started, "owned_by": owner}
             for a in sorted(state.lora_adapters)]
    return JSONResponse({"object": "list", "data": data})
