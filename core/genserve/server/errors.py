"""TGI's error body ``{"error", "error_type"}`` and the exception handlers that produce it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered with TGI's JSON body and an HTTP status."""

    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientDisconnected(Exception):
    """The HTTP client went away before a non-streamed answer was ready. Raised by
    ``admission.run_to_completion`` and answered once, by ``install_handlers``, with 499
    (nginx's "client closed request"; nobody reads it) counted as ``err="cancelled"``."""


def validation(message: str) -> APIError:
    return APIError(422, message, "validation")


def unsupported_media_type(content_type: str) -> APIError:
    """TGI (axum's ``Json`` extractor) refuses a body not declared ``application/json``: a web
    page can send ``text/plain`` cross-site without a CORS preflight, JSON it cannot."""
    return APIError(415, f"Expected request with `Content-Type: application/json`, got "
                         f"`{content_type or 'none'}`", "unsupported_media_type")


def overloaded() -> APIError:
    return APIError(429, "Model is overloaded", "overloaded")


def generation(message: str) -> APIError:
    return APIError(424, message, "generation")


def incomplete() -> APIError:
    return APIError(500, "Incomplete generation", "incomplete_generation")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "unavailable")


def _describe(errors: Sequence[Any]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        elif loc:
            parts.append(f"{loc}: {err.get('msg')}")
        else:
            parts.append(str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(ClientDisconnected)
    async def _client_disconnected(request: Request, exc: ClientDisconnected):
        request.app.state.genserve.metrics.request_failed("cancelled")
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        return validation(_describe(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not read the body (e.g. not UTF-8)
            return validation(f"malformed request body: {exc.detail}").response()
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return JSONResponse({"error": str(exc.detail), "error_type": kinds.get(exc.status_code, "http")},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}", "error_type": "internal"},
                            status_code=500)


class counted:
    """Count the APIErrors raised inside as ``tgi_request_failure{err=<error_type>}``."""

    def __init__(self, metrics):
        self.metrics = metrics

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, APIError) and exc.error_type != "overloaded":  # admit() counts those
            self.metrics.request_failed(exc.error_type)
        return False
