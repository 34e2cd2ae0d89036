"""The FastAPI app: routes, error handlers, middlewares, OpenAPI document, engine lifecycle."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from genserve import __version__
from genserve.server import routes_lora, routes_openai, routes_sagemaker, routes_tgi, tracing
from genserve.server.errors import install_handlers
from genserve.server.schemas_openai import (ChatCompletion, ChatCompletionChunk, ChatRequest, ChatTokenizeRequest,
                                            Completion, CompletionRequest)
from genserve.server.schemas_tgi import (CompatGenerateRequest, ErrorResponse, GenerateRequest, GenerateResponse,
                                         StreamResponse)
from genserve.server.security import BearerAuth, PayloadLimit
from genserve.server.serving_chat import OpenAIServingChat
from genserve.server.serving_completion import OpenAIServingCompletion
from genserve.server.serving_tgi import TGIServing

logger = logging.getLogger(__name__)
# Documented by hand: response schemas of SSE and list answers, and the request bodies that
# routes read with common.parse_body (referenced from their openapi_extra).
EXTRA_SCHEMAS = (StreamResponse, GenerateResponse, ChatCompletion, ChatCompletionChunk, Completion,
                 ErrorResponse)
REQUEST_SCHEMAS = (GenerateRequest, CompatGenerateRequest, ChatRequest, CompletionRequest, ChatTokenizeRequest,
                   routes_lora.LoadLoRAAdapterRequest, routes_lora.UnloadLoRAAdapterRequest)


def create_app(state, *, load: bool = True, on_fatal=None) -> FastAPI:
    """The app around ``state``. With ``load``, the engine is built in a background thread at
    startup (``/health`` answers 503 until it is ready); ``on_fatal(exc)`` hears a failed load."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load and state.status == "loading":
            state.load_in_background(on_fatal or (lambda exc: None))
        try:
            yield
        finally:
            state.shutdown()

    app = FastAPI(title="genserve", version=__version__, lifespan=lifespan,
                  description="Text Generation Inference's API (and OpenAI's) served by genserve")
    app.state.genserve = state
    # One serving object per API (vLLM's app.state.openai_serving_*); routers look them up.
    app.state.openai_serving_chat = OpenAIServingChat(state)
    app.state.openai_serving_completion = OpenAIServingCompletion(state)
    app.state.tgi_serving = TGIServing(state)
    install_handlers(app)
    app.include_router(routes_tgi.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_sagemaker.router)
    app.include_router(routes_lora.router)

    @app.get("/api-doc/openapi.json", include_in_schema=False)
    async def tgi_openapi():
        return JSONResponse(app.openapi())

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes)
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas: list[tuple[type[BaseModel], JsonSchemaMode]] = [
                (m, "serialization") for m in EXTRA_SCHEMAS] + [(m, "validation") for m in REQUEST_SCHEMAS]
            for model, mode in schemas:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
                for name, sub in schema.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components.setdefault(model.__name__, schema)
            app.openapi_schema = doc
        return app.openapi_schema

    # FastAPI's documented way to extend the schema ("Extending OpenAPI") replaces the method;
    # its stubs declare ``openapi`` a method, so mypy calls the assignment an error.
    app.openapi = openapi  # type: ignore[method-assign]

    args = state.args
    app.add_middleware(PayloadLimit, limit=args.payload_limit)
    if args.api_key:
        app.add_middleware(BearerAuth, api_key=args.api_key)
    if args.cors_allow_origin:
        origins = [o.strip() for o in args.cors_allow_origin.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["content-type", "authorization"])
    tracing.install(app, getattr(args, "otlp_endpoint", None),  # outermost: every request's span
                    getattr(args, "otlp_service_name", None) or "text-generation-inference.router")
    return app
