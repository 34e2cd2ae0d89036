"""SageMaker's /invocations: the body's shape picks chat, completion or TGI's compat route."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request

from genserve.server.routes_openai import chat_impl, completions_impl, parse_body
from genserve.server.routes_tgi import ERRORS, compat_generate_impl, get_state, sse_schema
from genserve.server.schemas_openai import ChatRequest, CompletionRequest
from genserve.server.schemas_tgi import CompatGenerateRequest

router = APIRouter(tags=["SageMaker"])
BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": [
    {"$ref": "#/components/schemas/CompatGenerateRequest"},
    {"$ref": "#/components/schemas/ChatRequest"},
    {"$ref": "#/components/schemas/CompletionRequest"}]}}}}}
RESPONSES = {200: {"description": "As the chosen route", "content": {
    "application/json": {"schema": {"anyOf": [
        {"type": "array", "items": {"$ref": "#/components/schemas/GenerateResponse"}},
        {"$ref": "#/components/schemas/ChatCompletion"},
        {"$ref": "#/components/schemas/Completion"}]}},
    "text/event-stream": {"schema": sse_schema("StreamResponse", "ChatCompletionChunk", "Completion",
                                               done=True)}}}, **ERRORS}


@router.post("/invocations", openapi_extra=BODY, responses=RESPONSES, response_model=None)
async def invocations(request: Request):
    """`messages` -> /v1/chat/completions, `prompt` -> /v1/completions, else TGI's /."""
    state = get_state(request)
    body = await request.body()

    try:
        keys = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        keys = None
    if isinstance(keys, dict) and "messages" in keys:
        return await chat_impl(state, request, await parse_body(request, ChatRequest))
    if isinstance(keys, dict) and "prompt" in keys:
        return await completions_impl(state, request, await parse_body(request, CompletionRequest))
    return await compat_generate_impl(state, request, await parse_body(request, CompatGenerateRequest))
