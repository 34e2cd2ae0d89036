"""TGI's API: /generate, /generate_stream, TGI's compat route /, /tokenize and /chat_tokenize,
and the server facts /info, /health, /metrics."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from genserve.server import errors
from genserve.server.admission import admitted, admitted_stream, run_to_completion
from genserve.server.chat import render_chat
from genserve.server.errors import APIError, counted
from genserve.server.inference import SeqResult, engine_stream, finite, new_request_id
from genserve.server.schemas_openai import ChatTokenizeRequest
from genserve.server.schemas_tgi import CompatGenerateRequest, GenerateRequest
from genserve.server.sse import event
from genserve.server.validation import GenParams, ValidRequest, validate


def token_dict(info) -> dict:
    return {"id": info.id, "text": info.text, "logprob": finite(info.logprob), "special": info.special}


def tokenize_with_offsets(tokenizer, text: str, add_special_tokens: bool, truncate: int | None) -> list[dict]:
    """TGI's /tokenize answer: each token's id, its text and its byte offsets in ``text``."""
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


def tokenize_json(tokenizer, text: str, add_special_tokens: bool, truncate: int | None,
                  templated: bool = False) -> bytes:
    """/tokenize's (or, ``templated``, /chat_tokenize's) JSON body, made on a validation worker:
    for a megabyte of text both the tokens and their JSON are too much work for the event loop."""
    tokens = tokenize_with_offsets(tokenizer, text, add_special_tokens, truncate)
    body = {"tokenize_response": tokens, "templated_text": text} if templated else tokens
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class TGIServing:
    """TGI's routes over one ``ServerState``."""

    def __init__(self, state):
        self.state = state

    # -- shaping answers ------------------------------------------------------------------
    def top_dicts(self, info) -> list[dict]:
        state = self.state
        return [{"id": t, "text": state.token_text(t), "logprob": lp, "special": state.is_special(t)}
                for t, lp in info.top if finite(lp) is not None]

    def sequence_details(self, r: SeqResult, valid: ValidRequest) -> dict:
        prefill = [{"id": t.id, "text": t.text, "logprob": finite(t.logprob)}
                   for t in (r.prompt_tokens or [])] if valid.params.decoder_input_details else []
        assert r.finish_reason is not None  # run_sequence returns finished sequences only
        out: dict[str, Any] = {"finish_reason": r.finish_reason.value, "generated_tokens": len(r.tokens),
                               "seed": r.seed, "prefill": prefill, "tokens": [token_dict(t) for t in r.tokens]}
        if valid.top_n_tokens:
            out["top_tokens"] = [self.top_dicts(t) for t in r.tokens]
        if r.spec_proposed:  # speculative decoding proposed tokens for it
            out["speculative_proposed_tokens"] = r.spec_proposed
            out["speculative_accepted_tokens"] = r.spec_accepted
        return out

    # -- /generate ------------------------------------------------------------------------
    async def validate(self, req: GenerateRequest, full_text_default: bool,
                       stream: bool = False) -> ValidRequest:
        """The parameters of a /generate-style request, with the route's return_full_text default."""
        p = GenParams.from_tgi(req.parameters)
        if req.parameters is None or req.parameters.return_full_text is None:
            p.return_full_text = full_text_default
        return await validate(self.state, req.inputs, p, stream=stream,
                              add_special_tokens=req.add_special_tokens is not False)

    async def generate(self, request: Request, req: GenerateRequest, full_text_default: bool = False,
                       as_list: bool = False) -> Response:
        """/generate: the best of ``best_of`` sequences, with TGI's timing headers."""
        state = self.state
        start = time.monotonic()
        with admitted(state) as permit:
            valid = await self.validate(req, full_text_default)
        validated = state.record_validated(valid)
        jobs = [(valid.prompt_ids, valid.sampling_params()) for _ in range(valid.best_of)]
        results = await run_to_completion(state, request, permit, jobs)
        p = valid.params
        best = max(results, key=lambda r: r.logprob_sum) if len(results) > 1 else results[0]
        state.record_success(start=start, validated=validated, arrival=best.arrival,
                             first_scheduled=best.first_scheduled, generated=len(best.tokens),
                             spec_proposed=sum(r.spec_proposed for r in results),
                             spec_accepted=sum(r.spec_accepted for r in results))
        prefix = valid.inputs if p.return_full_text else ""
        body: dict = {"generated_text": prefix + best.text}
        if p.details or p.decoder_input_details:
            details = self.sequence_details(best, valid)
            if len(results) > 1:
                details["best_of_sequences"] = [
                    {"generated_text": prefix + r.text, **self.sequence_details(r, valid)}
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

    # -- /generate_stream -----------------------------------------------------------------
    async def generate_stream(self, req: GenerateRequest, full_text_default: bool = False) -> Response:
        """/generate_stream: one event per token, the last with the full text."""
        state = self.state
        start = time.monotonic()

        async def prepare() -> tuple[ValidRequest, float]:
            valid = await self.validate(req, full_text_default, stream=True)
            return valid, state.record_validated(valid)

        def events(permit, prepared: tuple[ValidRequest, float]) -> AsyncGenerator:
            valid, validated = prepared
            return self.events(permit, valid, validated, start)

        headers = {"x-compute-type": state.loaded.backend.name} if state.loaded is not None else None
        return await admitted_stream(state, prepare, events, headers)

    async def events(self, permit, valid: ValidRequest, validated: float, start: float) -> AsyncGenerator:
        state = self.state
        p = valid.params
        index, text = 0, []
        try:
            with counted(state.metrics):
                async with aclosing(engine_stream(state, permit, new_request_id(), valid.prompt_ids,
                                                  valid.sampling_params())) as outputs:
                    async for out in outputs:
                        text.append(out.text)
                        for k, info in enumerate(out.tokens):
                            index += 1
                            ev = {"index": index, "token": token_dict(info), "generated_text": None,
                                  "details": None}
                            if valid.top_n_tokens:
                                ev["top_tokens"] = self.top_dicts(info)
                            if out.finished and k == len(out.tokens) - 1:
                                ev["generated_text"] = (valid.inputs if p.return_full_text else "") + "".join(text)
                                if p.details:
                                    assert out.finish_reason is not None  # set on a finished output
                                    details: dict[str, Any] = {
                                        "finish_reason": out.finish_reason.value,
                                        "generated_tokens": out.num_generated,
                                        "seed": out.seed, "input_length": valid.input_length}
                                    if out.spec_proposed:
                                        details["speculative_proposed_tokens"] = out.spec_proposed
                                        details["speculative_accepted_tokens"] = out.spec_accepted
                                    ev["details"] = details
                                state.record_success(start=start, validated=validated, arrival=out.arrival,
                                                     first_scheduled=out.first_scheduled,
                                                     generated=out.num_generated,
                                                     spec_proposed=out.spec_proposed,
                                                     spec_accepted=out.spec_accepted)
                                yield event(ev)
                                return
                            yield event(ev)
                raise errors.incomplete()
        except APIError as exc:
            yield event(exc.body())

    # -- / --------------------------------------------------------------------------------
    async def compat_generate(self, request: Request, req: CompatGenerateRequest) -> Response:
        """TGI's compatibility route: /generate (answer wrapped in a list) or /generate_stream."""
        if req.stream:
            return await self.generate_stream(req)
        return await self.generate(request, req, as_list=True)

    # -- tokenizing -----------------------------------------------------------------------
    async def tokenize(self, req: GenerateRequest) -> Response:
        state = self.state
        state.require_ready()
        if state.tokenizer is None:
            raise APIError(404, "No fast tokenizer available", "tokenizer")
        truncate = req.parameters.truncate if req.parameters else None
        if truncate is not None and truncate <= 0:
            raise errors.validation(f"`truncate` must be strictly positive. Given: {truncate}")
        body = await state.in_worker(tokenize_json, state.tokenizer, req.inputs,
                                     req.add_special_tokens is not False, truncate)
        return Response(body, media_type="application/json")

    async def chat_tokenize(self, chat: ChatTokenizeRequest) -> Response:
        state = self.state
        state.require_ready()
        # Image parts stay as the placeholder text (one image token each: nothing is fetched).
        text, _ = render_chat(state, chat.messages, chat.tools if chat.tool_choice != "none" else None,
                              chat.tool_prompt)
        body = await state.in_worker(tokenize_json, state.tokenizer, text, False, None, True)
        return Response(body, media_type="application/json")

    # -- facts ----------------------------------------------------------------------------
    def info(self) -> Response:
        state = self.state
        if state.status != "ready":
            state.require_ready()
        return JSONResponse(state.info())

    async def health(self) -> Response:
        """200 once the model is loaded and answers a tiny generation; 503 otherwise."""
        state = self.state
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
        if not await state.probe_health():
            return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, 503)
        return Response(status_code=200)

    def metrics(self) -> Response:
        state = self.state
        stats = state.engine.stats() if state.engine is not None else None
        block_size = state.loaded.engine.config.block_size if state.loaded is not None else 16
        return Response(state.metrics.render(stats, block_size, state.in_flight), media_type=CONTENT_TYPE_LATEST)
