"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models. Thin: each
reads its body and hands it to its serving class (serving_chat, serving_completion)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.server.common import (ERRORS, OpenAPIResponses, chat_serving, completion_serving, get_state,
                                    json_body, parse_body, sse_schema)
from genserve.server.schemas_openai import ChatCompletion, ChatRequest, Completion, CompletionRequest, ModelList

router = APIRouter(tags=["OpenAI"])
CHAT_200: OpenAPIResponses = {
    200: {"description": "A chat completion, or chunks as server-sent events", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
        "text/event-stream": {"schema": sse_schema("ChatCompletionChunk", done=True)}}}}
COMPLETION_200: OpenAPIResponses = {
    200: {"description": "A completion, or chunks as server-sent events", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Completion"}},
        "text/event-stream": {"schema": sse_schema("Completion", done=True)}}}}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={**CHAT_200, **ERRORS},
             openapi_extra=json_body(ChatRequest))
async def chat_completions(request: Request):
    """Chat completion with the model's chat template (OpenAI-compatible)."""
    return await chat_serving(request).create(request, await parse_body(request, ChatRequest))


@router.post("/v1/completions", response_model=Completion, responses={**COMPLETION_200, **ERRORS},
             openapi_extra=json_body(CompletionRequest))
async def completions(request: Request):
    """Text completion (OpenAI-compatible)."""
    return await completion_serving(request).create(request, await parse_body(request, CompletionRequest))


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request):
    """The served model (and the LoRA adapters, selectable as `model`)."""
    state = get_state(request)
    owner = "genserve"
    data = [{"id": state.model_name, "object": "model", "created": state.started, "owned_by": owner}]
    data += [{"id": a, "object": "model", "created": state.started, "owned_by": owner}
             for a in sorted(state.lora_adapters)]
    return JSONResponse({"object": "list", "data": data})
