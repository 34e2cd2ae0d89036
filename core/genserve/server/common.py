"""What every route shares: the body parser, the documented error answers, the SSE schema and
the way a route finds the server state and its serving objects. A leaf of ``server/``: routers
and serving classes import it, it imports neither."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from genserve.server import errors
from genserve.server.schemas_tgi import ErrorResponse

if TYPE_CHECKING:
    from genserve.server.serving_chat import OpenAIServingChat
    from genserve.server.serving_completion import OpenAIServingCompletion
    from genserve.server.serving_tgi import TGIServing
    from genserve.server.state import ServerState

# FastAPI's type of a route's ``responses`` (status -> OpenAPI response object).
OpenAPIResponses = dict[int | str, dict[str, Any]]
ERRORS: OpenAPIResponses = {
    413: {"model": ErrorResponse, "description": "Payload too large"},
    415: {"model": ErrorResponse, "description": "The body is not `application/json`"},
    422: {"model": ErrorResponse, "description": "Input validation error"},
    424: {"model": ErrorResponse, "description": "Generation error"},
    429: {"model": ErrorResponse, "description": "Model is overloaded"},
    500: {"model": ErrorResponse, "description": "Incomplete generation"},
    503: {"model": ErrorResponse, "description": "The model is loading or the server is stopping"},
}
Model = TypeVar("Model", bound=BaseModel)


def sse_schema(*payloads: str, done: bool = False) -> dict:
    """One server-sent event: ``data`` holds JSON of one of ``payloads`` (an error body included),
    or the text ``[DONE]`` when ``done``."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [{"$ref": f"#/components/schemas/{p}"} for p in (*payloads, "ErrorResponse")]}}
    data = {"anyOf": [{"const": "[DONE]"}, json_data]} if done else json_data
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def json_body(*models: type[BaseModel]) -> dict:
    """``openapi_extra`` documenting a route's JSON body (routes read it with ``parse_body``)."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def get_state(request: Request) -> ServerState:
    return request.app.state.genserve


def chat_serving(request: Request) -> OpenAIServingChat:
    return request.app.state.openai_serving_chat


def completion_serving(request: Request) -> OpenAIServingCompletion:
    return request.app.state.openai_serving_completion


def tgi_serving(request: Request) -> TGIServing:
    return request.app.state.tgi_serving


def is_json(content_type: str) -> bool:
    """``application/json`` or ``application/<x>+json``, parameters (charset) aside: what
    axum's ``Json`` extractor, and so TGI, accepts."""
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


async def read_json(request: Request) -> Any:
    """The request's body as JSON values, or an ``APIError``: 415 unless the body is declared
    JSON, 422 for anything the JSON parser refuses, lone surrogates (``"\\ud800"``, which no
    tokenizer can take), nesting deeper than 255 and numbers that cannot be read included.
    The parser is pydantic-core's (jiter), whose limits make these errors, not crashes."""
    content_type = request.headers.get("content-type", "")
    if not is_json(content_type):
        raise errors.unsupported_media_type(content_type)
    body = await request.body()
    try:
        return from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise errors.validation(f"malformed JSON: {exc}") from None


def validated(model: type[Model], value: Any) -> Model:
    """``value`` (JSON values) as ``model``; field errors are 422s in TGI's format."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def parse_body(request: Request, model: type[Model]) -> Model:
    """The one body parser of every JSON route: ``read_json`` then ``validated``."""
    return validated(model, await read_json(request))
