"""Loading and unloading LoRA adapters while the server runs: vLLM's
``POST /v1/load_lora_adapter`` {"lora_name", "lora_path"} and ``POST /v1/unload_lora_adapter``
{"lora_name"}, answered as vLLM does (200 and a plain-text line), errors in TGI's JSON format.

Refused unless the server was started with ``--enable-lora-runtime-updates`` (vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING) and ``--lora-modules-dir``; the bearer token of ``--api-key``
guards them like every route. A load reads and validates the adapter exactly as startup does
(``read_peft_adapter``, the base model's shapes, ``--max-lora-rank``) on a validation worker,
so the engine keeps stepping; the adapter is on the host until a request needs a slot.
An adapter that unfinished requests use is not unloaded (409): retry once they finish.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from genserve.lora.directories import parse_dirs, resolve_allowed
from genserve.lora.errors import LoRAError
from genserve.lora.peft_format import read_peft_adapter
from genserve.server.common import (
    ERRORS,
    OpenAPIResponses,
    get_state,
    json_body,
    parse_body,
)
from genserve.server.errors import APIError

logger = logging.getLogger(__name__)
router = APIRouter(tags=["LoRA"])
_JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
# Spelled out as JSON: the routes answer text/plain on success, which FastAPI would otherwise
# document for every status.
LORA_ERRORS: OpenAPIResponses = {status: {"description": why, "content": _JSON_ERROR} for status, why in {
    **{status: info["description"] for status, info in ERRORS.items()},
    400: "Run-time updates are off, or the adapter cannot be loaded (the reason)",
    404: "No adapter of that name is loaded",
    409: "Unfinished requests use the adapter",
    503: "The model is still loading",
}.items()}
SUCCESS: OpenAPIResponses = {200: {"description": "Done (vLLM's plain-text answer)",
                                    "content": {"text/plain": {"schema": {"type": "string"}}}}}


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's field; accepted, names nothing here


def _bad(message: str) -> APIError:
    return APIError(400, message, "lora_adapter")


def _manager(request: Request):
    """The engine's LoRAManager, or the reason run-time updates are refused."""
    state = get_state(request)
    if not state.args.enable_lora_runtime_updates:
        raise _bad("run-time LoRA updates are disabled: start the server with "
                   "--enable-lora-runtime-updates (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=true) and "
                   "--lora-modules-dir")
    if state.loaded is None:
        raise APIError(503, "the model is still loading", "unhealthy")
    return state, state.loaded.engine.runner.lora


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses={**SUCCESS, **LORA_ERRORS},
             openapi_extra=json_body(LoadLoRAAdapterRequest))
async def load_lora_adapter(request: Request):
    """Load a PEFT adapter from a directory under --lora-modules-dir and serve it as `lora_name`."""
    state, manager = _manager(request)
    body = await parse_body(request, LoadLoRAAdapterRequest)
    name = body.lora_name.strip()
    if not name or name == state.model_name:
        raise _bad(f"lora_name {body.lora_name!r} is empty or the served model's name")
    if name in state.lora_adapters:
        raise _bad(f"LoRA adapter {name!r} is already loaded; unload it first to replace it")

    def load():
        path = resolve_allowed(name, body.lora_path, parse_dirs(state.args.lora_modules_dir))
        return manager.register(manager.prepare_adapter(read_peft_adapter(name, path)))

    try:
        host = await asyncio.get_running_loop().run_in_executor(state.workers, load)
    except LoRAError as exc:
        raise _bad(str(exc)) from None
    state.lora_adapters[name] = str(host.path)
    logger.info("LoRA adapter %r loaded from %s (rank %d, %d layers)", name, host.path, host.rank,
                len(host.layers))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses={**SUCCESS, **LORA_ERRORS},
             openapi_extra=json_body(UnloadLoRAAdapterRequest))
async def unload_lora_adapter(request: Request):
    """Stop serving adapter `lora_name` and free its host copy and device slot."""
    state, manager = _manager(request)
    body = await parse_body(request, UnloadLoRAAdapterRequest)
    name = body.lora_name
    source = state.lora_adapters.pop(name, None)  # new requests naming it are refused from now on
    if source is None:
        raise APIError(404, f"LoRA adapter {name!r} is not loaded", "not_found")
    users = state.loaded.engine.adapter_users(name)
    if users:
        state.lora_adapters[name] = source
        raise APIError(409, f"LoRA adapter {name!r} is in use by {users} unfinished request(s); "
                            "unload it once they finish", "lora_adapter_in_use")
    manager.unregister(name)
    logger.info("LoRA adapter %r unloaded", name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
