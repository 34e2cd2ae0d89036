"""ASGI middlewares: bearer-token auth (--api-key) and the body size limit (--payload-limit).

CORS (--cors-allow-origin) is Starlette's CORSMiddleware, installed outermost by ``app``.
"""

from __future__ import annotations

import hmac
import json

from genserve.server.errors import APIError

OPEN_PATHS = frozenset({"/health", "/metrics"})


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": data})


class BearerAuth:
    """401 unless ``Authorization: Bearer <api key>`` (constant-time compare); /health and
    /metrics stay open, as in TGI."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        value = b""
        for name, v in scope.get("headers", ()):
            if name == b"authorization":
                value = v
                break
        scheme, _, token = value.partition(b" ")
        ok = hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"
        if not ok:
            return await _send_json(send, 401, {"error": "Unauthorized: missing or wrong bearer token",
                                                "error_type": "authentication"},
                                    [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


def payload_too_large(limit: int) -> APIError:
    return APIError(413, f"Payload too large: the body is limited to {limit} bytes "
                         f"(--payload-limit)", "payload_too_large")


class PayloadLimit:
    """413 for bodies over ``limit`` bytes: by Content-Length up front; a chunked body (no
    Content-Length) is read here first, up to the limit, then handed on."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for name, v in scope.get("headers", ()):
            if name == b"content-length":
                length = v
                break
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                return await _send_json(send, 413, payload_too_large(self.limit).body())
            return await self.app(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_json(send, 413, payload_too_large(self.limit).body())
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
