"""TGI's routes: /, /generate, /generate_stream, /tokenize, /info, /health, /metrics."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from genserve.engine.sampling_params import SamplingParams
from genserve.server import errors
from genserve.server.admission import admitted, admitted_stream, run_to_completion
from genserve.server.errors import APIError, counted
from genserve.server.inference import SeqResult, engine_stream, finite, new_request_id
from genserve.server.schemas_tgi import (ChatTokenizeResponse, CompatGenerateRequest, ErrorResponse,
                                         GenerateRequest, GenerateResponse, Info, SimpleToken)
from genserve.server.sse import GenerationEvents, event
from genserve.server.validation import GenParams, ValidRequest, validate

TAG = "Text Generation Inference"
ERRORS = {
    413: {"model": ErrorResponse, "description": "Payload too large"},
    422: {"model": ErrorResponse, "description": "Input validation error"},
    424: {"model": ErrorResponse, "description": "Generation error"},
    429: {"model": ErrorResponse, "description": "Model is overloaded"},
    500: {"model": ErrorResponse, "description": "Incomplete generation"},
    503: {"model": ErrorResponse, "description": "The model is loading or the server is stopping"},
}


def sse_schema(*payloads: str, done: bool = False) -> dict:
    """One server-sent event: ``data`` holds JSON of one of ``payloads`` (an error body included),
    or the text ``[DONE]`` when ``done``."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [{"$ref": f"#/components/schemas/{p}"} for p in (*payloads, "ErrorResponse")]}}
    data = {"anyOf": [{"const": "[DONE]"}, json_data]} if done else json_data
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


SSE_200 = {200: {"description": "Generated tokens as server-sent events; an error (validation and "
                                 "overload included) is one `{error, error_type}` event that ends the stream",
                 "content": {"text/event-stream": {"schema": sse_schema("StreamResponse")}}}}

router = APIRouter(tags=[TAG])


def get_state(request: Request):
    return request.app.state.genserve


# -- shaping answers ----------------------------------------------------------------------
def token_dict(info) -> dict:
    return {"id": info.id, "text": info.text, "logprob": finite(info.logprob), "special": info.special}


def top_dicts(state, info) -> list[dict]:
    return [{"id": t, "text": state.token_text(t), "logprob": lp, "special": state.is_special(t)}
            for t, lp in info.top if finite(lp) is not None]


def sequence_details(state, r: SeqResult, valid: ValidRequest) -> dict:
    prefill = [{"id": t.id, "text": t.text, "logprob": finite(t.logprob)}
               for t in (r.prompt_tokens or [])] if valid.params.decoder_input_details else []
    out = {"finish_reason": r.finish_reason.value, "generated_tokens": len(r.tokens), "seed": r.seed,
           "prefill": prefill, "tokens": [token_dict(t) for t in r.tokens]}
    if valid.top_n_tokens:
        out["top_tokens"] = [top_dicts(state, t) for t in r.tokens]
    return out


def record_success(state, start: float, validated: float, r: SeqResult) -> None:
    state.last_success = time.monotonic()
    state.metrics.request_succeeded(start=start, validated=validated, arrival=r.arrival,
                                    first_scheduled=r.first_scheduled, end=state.last_success,
                                    generated=len(r.tokens))


def record_validated(state, valid: ValidRequest) -> float:
    state.metrics.input_length.observe(valid.input_length)
    state.metrics.max_new_tokens.observe(valid.max_new_tokens)
    return time.monotonic()


# -- /generate ----------------------------------------------------------------------------
async def validate_generate(state, req: GenerateRequest, full_text_default: bool,
                            stream: bool = False) -> ValidRequest:
    """The parameters of a /generate-style request, with the route's return_full_text default."""
    p = GenParams.from_tgi(req.parameters)
    if req.parameters is None or req.parameters.return_full_text is None:
        p.return_full_text = full_text_default
    return await validate(state, req.inputs, p, stream=stream,
                          add_special_tokens=req.add_special_tokens is not False)


async def generate_json(state, request: Request, req: GenerateRequest, full_text_default: bool,
                        as_list: bool = False) -> Response:
    start = time.monotonic()
    with admitted(state) as permit:
        valid = await validate_generate(state, req, full_text_default)
    validated = record_validated(state, valid)
    jobs = [(valid.prompt_ids, valid.sampling_params()) for _ in range(valid.best_of)]
    results = await run_to_completion(state, request, permit, jobs)
    if isinstance(results, Response):
        return results
    p = valid.params
    best = max(results, key=lambda r: r.logprob_sum) if len(results) > 1 else results[0]
    record_success(state, start, validated, best)
    prefix = valid.inputs if p.return_full_text else ""
    body: dict = {"generated_text": prefix + best.text}
    if p.details or p.decoder_input_details:
        details = sequence_details(state, best, valid)
        if len(results) > 1:
            details["best_of_sequences"] = [
                {"generated_text": prefix + r.text, **sequence_details(state, r, valid)}
                for r in results if r is not best]
        body["details"] = details
    end = time.monotonic()
    inference = end - (best.first_scheduled or best.arrival)
    headers = {
        "x-compute-type": state.loaded.backend.name,
        "x-compute-time": f"{end - start:.6f}",
        "x-compute-characters": str(len(req.inputs)),
        "x-total-time": str(int((end - start) * 1000)),
        "x-validation-time": str(int((validated - start) * 1000)),
        "x-queue-time": str(int(max((best.first_scheduled or best.arrival) - best.arrival, 0) * 1000)),
        "x-inference-time": str(int(inference * 1000)),
        "x-time-per-token": str(int(inference * 1000 / max(len(best.tokens), 1))),
        "x-prompt-tokens": str(valid.input_length),
        "x-generated-tokens": str(len(best.tokens)),
    }
    return JSONResponse([body] if as_list else body, headers=headers)


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(req: GenerateRequest, request: Request):
    """Generate text for a prompt."""
    return await generate_json(get_state(request), request, req, full_text_default=False)


# -- /generate_stream ---------------------------------------------------------------------
async def tgi_events(state, permit, valid: ValidRequest, start: float, validated: float):
    p = valid.params
    index, text = 0, []
    try:
        with counted(state.metrics):
            rid = new_request_id()
            async with aclosing(engine_stream(state, permit, rid, valid.prompt_ids,
                                              valid.sampling_params())) as outputs:
                async for out in outputs:
                    text.append(out.text)
                    for k, info in enumerate(out.tokens):
                        index += 1
                        ev = {"index": index, "token": token_dict(info), "generated_text": None,
                              "details": None}
                        if valid.top_n_tokens:
                            ev["top_tokens"] = top_dicts(state, info)
                        if out.finished and k == len(out.tokens) - 1:
                            ev["generated_text"] = (valid.inputs if p.return_full_text else "") + "".join(text)
                            if p.details:
                                ev["details"] = {"finish_reason": out.finish_reason.value,
                                                 "generated_tokens": out.num_generated,
                                                 "seed": out.seed, "input_length": valid.input_length}
                            state.last_success = time.monotonic()
                            state.metrics.request_succeeded(
                                start=start, validated=validated, arrival=out.arrival,
                                first_scheduled=out.first_scheduled, end=state.last_success,
                                generated=out.num_generated)
                            yield event(ev)
                            return
                        yield event(ev)
            raise errors.incomplete()
    except APIError as exc:
        yield event(exc.body())


async def generate_events(state, req: GenerateRequest, full_text_default: bool) -> Response:
    start = time.monotonic()

    async def prepare():
        valid = await validate_generate(state, req, full_text_default, stream=True)
        return valid, record_validated(state, valid)

    headers = {"x-compute-type": state.loaded.backend.name} if state.loaded is not None else None
    return await admitted_stream(state, prepare, lambda permit, valid, validated: tgi_events(
        state, permit, valid, start, validated), headers)


@router.post("/generate_stream", response_class=GenerationEvents, status_code=200,
             responses={**SSE_200, **ERRORS})
async def generate_stream(req: GenerateRequest, request: Request):
    """Generate tokens as server-sent events; the last event carries the full text."""
    return await generate_events(get_state(request), req, full_text_default=False)


# -- / -----------------------------------------------------------------------------------
COMPAT_200 = {200: {"description": "Generated text (JSON list) or tokens (server-sent events)", "content": {
    "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/GenerateResponse"}}},
    "text/event-stream": {"schema": sse_schema("StreamResponse")}}}}


async def compat_generate_impl(state, request: Request, req: CompatGenerateRequest) -> Response:
    if req.stream:
        return await generate_events(state, req, full_text_default=False)
    return await generate_json(state, request, req, full_text_default=False, as_list=True)


@router.post("/", responses={**COMPAT_200, **ERRORS}, response_model=None)
async def compat_generate(req: CompatGenerateRequest, request: Request):
    """TGI's compatibility route: /generate (answer wrapped in a list) or /generate_stream."""
    return await compat_generate_impl(get_state(request), request, req)


# -- /tokenize ----------------------------------------------------------------------------
def tokenize_with_offsets(tokenizer, text: str, add_special_tokens: bool, truncate: int | None) -> list[dict]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc.get("offset_mapping")
    byte_at = [0]
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
    tokens = []
    for i, tid in enumerate(ids):
        if offsets is not None and i < len(offsets):
            s, e = offsets[i]
            tokens.append({"id": tid, "text": text[s:e], "start": byte_at[s], "stop": byte_at[e]})
        else:
            tokens.append({"id": tid, "text": "", "start": 0, "stop": 0})
    return tokens[-truncate:] if truncate else tokens


@router.post("/tokenize", response_model=list[SimpleToken], responses=ERRORS)
async def tokenize(req: GenerateRequest, request: Request):
    """Tokenize a prompt: ids, texts and byte offsets into the input."""
    state = get_state(request)
    state.require_ready()
    if state.tokenizer is None:
        raise APIError(404, "No fast tokenizer available", "tokenizer")
    truncate = req.parameters.truncate if req.parameters else None
    if truncate is not None and truncate <= 0:
        raise errors.validation(f"`truncate` must be strictly positive. Given: {truncate}")
    tokens = await asyncio.to_thread(tokenize_with_offsets, state.tokenizer, req.inputs,
                                     req.add_special_tokens is not False, truncate)
    return JSONResponse(tokens)


@router.post("/chat_tokenize", response_model=ChatTokenizeResponse, responses=ERRORS)
async def chat_tokenize(request: Request):
    """Render a chat request with the chat template and tokenize it."""
    from genserve.server.chat import render_chat
    from genserve.server.routes_openai import parse_body
    from genserve.server.schemas_openai import ChatRequest

    state = get_state(request)
    state.require_ready()
    chat = await parse_body(request, ChatRequest)
    text = render_chat(state, chat.messages, chat.tools if chat.tool_choice != "none" else None,
                       chat.tool_prompt)
    tokens = await asyncio.to_thread(tokenize_with_offsets, state.tokenizer, text, False, None)
    return JSONResponse({"tokenize_response": tokens, "templated_text": text})


# -- /info, /health, /metrics -------------------------------------------------------------
@router.get("/info", response_model=Info, responses={503: {"model": ErrorResponse}})
async def info(request: Request):
    """Model and server settings."""
    state = get_state(request)
    if state.status != "ready":
        state.require_ready()
    return JSONResponse(state.info())


HEALTH_FRESH_S = 5.0


async def probe(state) -> bool:
    """A one-token generation, unless a request succeeded in the last few seconds."""
    if time.monotonic() - state.last_success < HEALTH_FRESH_S:
        return True
    if state._health_lock is None:
        state._health_lock = asyncio.Lock()
    async with state._health_lock:
        if time.monotonic() - state.last_success < HEALTH_FRESH_S:
            return True
        ids = state.probe_ids(state.tokenizer, state.vocab_size)

        async def one_token() -> bool:
            async with aclosing(state.engine.generate(f"health-{new_request_id()}", ids,
                                                      SamplingParams(max_new_tokens=1))) as outs:
                async for out in outs:
                    if out.finished:
                        return out.error is None and out.finish_reason.value != "aborted"
            return False

        try:
            ok = await asyncio.wait_for(one_token(), 30)
        except Exception:
            return False
        if ok:
            state.last_success = time.monotonic()
        return ok


@router.get("/health", response_class=Response, responses={
    200: {"description": "The model answers (empty body)"},
    503: {"model": ErrorResponse, "description": "Not ready or unhealthy"}})
async def health(request: Request):
    """200 once the model is loaded and answers a tiny generation; 503 otherwise."""
    state = get_state(request)
    if state.status == "loading":
        return JSONResponse({"error": "the model is loading", "error_type": "healthcheck"}, 503)
    if state.status == "failed":
        return JSONResponse({"error": f"the model failed to load: {state.error}",
                             "error_type": "healthcheck"}, 503)
    if not state.engine.is_alive:
        return JSONResponse({"error": f"unhealthy: engine stopped ({state.engine.dead or 'not running'})",
                             "error_type": "healthcheck"}, 503)
    if state.draining:
        return JSONResponse({"error": "the server is shutting down", "error_type": "healthcheck"}, 503)
    if not await probe(state):
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, 503)
    return Response(status_code=200)


METRICS_200 = {200: {"description": "Prometheus metrics",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.get("/metrics", response_class=Response, responses=METRICS_200)
async def metrics(request: Request):
    """Prometheus metrics (TGI's names plus genserve_*)."""
    state = get_state(request)
    stats = state.engine.stats() if state.engine is not None else None
    block_size = state.loaded.engine.config.block_size if state.loaded is not None else 16
    return Response(state.metrics.render(stats, block_size, state.in_flight), media_type=CONTENT_TYPE_LATEST)
