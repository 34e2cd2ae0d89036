"""SageMaker's /invocations: the body's shape picks chat, completion or TGI's compat route."""

from __future__ import annotations

from fastapi import APIRouter, Request

from genserve.server.common import (
    ERRORS,
    OpenAPIResponses,
    chat_serving,
    completion_serving,
    json_body,
    read_json,
    sse_schema,
    tgi_serving,
    validated,
)
from genserve.server.schemas_openai import ChatRequest, CompletionRequest
from genserve.server.schemas_tgi import CompatGenerateRequest

router = APIRouter(tags=["SageMaker"])
RESPONSES: OpenAPIResponses = {200: {"description": "As the chosen route", "content": {
    "application/json": {"schema": {"anyOf": [
        {"type": "array", "items": {"$ref": "#/components/schemas/GenerateResponse"}},
        {"$ref": "#/components/schemas/ChatCompletion"},
        {"$ref": "#/components/schemas/Completion"}]}},
    "text/event-stream": {"schema": sse_schema("StreamResponse", "ChatCompletionChunk", "Completion",
                                               done=True)}}}, **ERRORS}


@router.post("/invocations", openapi_extra=json_body(CompatGenerateRequest, ChatRequest, CompletionRequest),
             responses=RESPONSES, response_model=None)
async def invocations(request: Request):
    """`messages` -> /v1/chat/completions, `prompt` -> /v1/completions, else TGI's /."""
    body = await read_json(request)
    if isinstance(body, dict) and "messages" in body:
        return await chat_serving(request).create(request, validated(ChatRequest, body))
    if isinstance(body, dict) and "prompt" in body:
        return await completion_serving(request).create(request, validated(CompletionRequest, body))
    return await tgi_serving(request).compat_generate(request, validated(CompatGenerateRequest, body))
