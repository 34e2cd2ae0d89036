"""TGI's routes: /, /generate, /generate_stream, /tokenize, /chat_tokenize, /info, /health
(and /ping, GET /), /metrics. Thin: each reads its body and hands it to ``TGIServing``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from genserve.server.common import (ERRORS, OpenAPIResponses, get_state, json_body, parse_body, sse_schema,
                                    tgi_serving)
from genserve.server.schemas_openai import ChatTokenizeRequest
from genserve.server.schemas_tgi import (ChatTokenizeResponse, CompatGenerateRequest, ErrorResponse,
                                         GenerateRequest, GenerateResponse, Info, SimpleToken)
from genserve.server.sse import GenerationEvents

TAG = "Text Generation Inference"
SSE_200: OpenAPIResponses = {
    200: {"description": "Generated tokens as server-sent events; an error (validation and "
                         "overload included) is one `{error, error_type}` event that ends the stream",
          "content": {"text/event-stream": {"schema": sse_schema("StreamResponse")}}}}
COMPAT_200: OpenAPIResponses = {
    200: {"description": "Generated text (JSON list) or tokens (server-sent events)", "content": {
        "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/GenerateResponse"}}},
        "text/event-stream": {"schema": sse_schema("StreamResponse")}}}}
HEALTH: OpenAPIResponses = {200: {"description": "The model answers (empty body)"},
                            503: {"model": ErrorResponse, "description": "Not ready or unhealthy"}}
METRICS_200: OpenAPIResponses = {200: {"description": "Prometheus metrics",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}

router = APIRouter(tags=[TAG])


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS,
             openapi_extra=json_body(GenerateRequest))
async def generate(request: Request):
    """Generate text for a prompt."""
    return await tgi_serving(request).generate(request, await parse_body(request, GenerateRequest))


@router.post("/generate_stream", response_class=GenerationEvents, status_code=200,
             responses={**SSE_200, **ERRORS}, openapi_extra=json_body(GenerateRequest))
async def generate_stream(request: Request):
    """Generate tokens as server-sent events; the last event carries the full text."""
    return await tgi_serving(request).generate_stream(await parse_body(request, GenerateRequest))


@router.post("/", responses={**COMPAT_200, **ERRORS}, response_model=None,
             openapi_extra=json_body(CompatGenerateRequest))
async def compat_generate(request: Request):
    """TGI's compatibility route: /generate (answer wrapped in a list) or /generate_stream."""
    return await tgi_serving(request).compat_generate(request, await parse_body(request, CompatGenerateRequest))


@router.post("/tokenize", response_model=list[SimpleToken], responses=ERRORS,
             openapi_extra=json_body(GenerateRequest))
async def tokenize(request: Request):
    """Tokenize a prompt: ids, texts and byte offsets into the input."""
    return await tgi_serving(request).tokenize(await parse_body(request, GenerateRequest))


@router.post("/chat_tokenize", response_model=ChatTokenizeResponse, responses=ERRORS,
             openapi_extra=json_body(ChatTokenizeRequest))
async def chat_tokenize(request: Request):
    """Render a chat request with the chat template and tokenize it."""
    get_state(request).require_ready()  # 503 while loading, before the body is read
    return await tgi_serving(request).chat_tokenize(await parse_body(request, ChatTokenizeRequest))


@router.get("/info", response_model=Info, responses={503: {"model": ErrorResponse}})
async def info(request: Request):
    """Model and server settings."""
    return tgi_serving(request).info()


@router.get("/health", response_class=Response, responses=HEALTH)
async def health(request: Request):
    """200 once the model is loaded and answers a tiny generation; 503 otherwise."""
    return await tgi_serving(request).health()


@router.get("/ping", response_class=Response, responses=HEALTH)
async def ping(request: Request):
    """SageMaker's health check: the same answer as /health."""
    return await tgi_serving(request).health()


@router.get("/", response_class=Response, responses=HEALTH)
async def root_health(request: Request):
    """TGI answers GET / as a health check: the same answer as /health."""
    return await tgi_serving(request).health()


@router.get("/metrics", response_class=Response, responses=METRICS_200)
async def metrics(request: Request):
    """Prometheus metrics (TGI's names plus genserve_*)."""
    return tgi_serving(request).metrics()
