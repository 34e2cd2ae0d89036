"""OpenTelemetry traces of generation requests (``--otlp-endpoint``), in TGI's span names.

TGI's router instruments each route handler (router/src/server.rs: ``generate``,
``generate_stream``, ``chat_completions``, ``completions``, ``compat_generate``,
``sagemaker_compatibility``) with the fields ``parameters``, ``total_time``, ``validation_time``,
``queue_time``, ``inference_time``, ``time_per_token`` and ``seed`` (durations and the seed in
Rust's ``{:?}`` form: ``"12.5ms"``, ``"Some(42)"``); under it come ``validate``
(validation.rs), ``queued`` while the request waits and ``infer`` while it runs (queue.rs), and
``send_error`` when generation fails (infer.rs). genserve makes the same tree per request::

    generate | generate_stream | chat_completions | ...   (the route; W3C traceparent = parent)
      validate
      queued     engine arrival .. first scheduled   (one pair per sequence: best_of, n)
      infer      first scheduled .. last token
        send_error                                    (a generation failure)

The surface is three calls: ``install`` (app creation), ``child("validate")`` around
validation, and ``engine_output(out)`` for each engine output. With no endpoint, they cost a
``None`` check. The SDK and exporters are the optional extra ``genserve[otel]``; asking for an
endpoint without them fails at startup with the command to install them.

The exporter speaks OTLP over gRPC, as TGI's does (``--otlp-endpoint http://collector:4317``),
or OTLP/HTTP when ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (or ``OTEL_EXPORTER_OTLP_PROTOCOL``) is
``http/protobuf`` (spans go to ``<endpoint>/v1/traces``). The SDK's own ``OTEL_BSP_*``
variables tune the batching.
"""

from __future__ import annotations

import atexit
import os
import time
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the API package comes with the otel extra; only the types are needed here
    from opentelemetry.trace import Span, Tracer

INSTALL_HINT = "pip install 'genserve[otel]'"
# TGI's handler (span) name for each generation route.
ROUTE_SPANS = {
    "/generate": "generate",
    "/generate_stream": "generate_stream",
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/": "compat_generate",
    "/invocations": "sagemaker_compatibility",
}
MAX_PARAMETERS_CHARS = 4096  # a grammar can be large; the attribute need not be


class TracingError(RuntimeError):
    """--otlp-endpoint was given but tracing cannot start (the extra is missing, or a bad value)."""


@dataclass
class _Request:
    """The route span of the request being served, shared by its tasks through a ContextVar."""

    span: Span
    start_ns: int
    validated_ns: int | None = None


_tracer: Tracer | None = None  # set by install(); None: tracing is off
_current: ContextVar[_Request | None] = ContextVar("genserve_trace_request", default=None)


def install(app, endpoint: str | None, service_name: str) -> None:
    """Export spans to ``endpoint`` and trace the generation routes of ``app``; nothing when
    ``endpoint`` is None. Raises ``TracingError`` when the ``otel`` extra is not installed."""
    global _tracer
    if not endpoint:
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingError(f"--otlp-endpoint needs the OpenTelemetry SDK and exporters ({exc}); "
                           f"install them with: {INSTALL_HINT}") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
    atexit.register(provider.shutdown)  # flush the last batch when the server exits
    _tracer = provider.get_tracer("genserve")
    app.add_middleware(TracingMiddleware)


def _exporter(endpoint: str):
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
            return HttpExporter(endpoint=url)
    except ImportError as exc:
        raise TracingError(f"the OTLP {protocol} exporter is not installed ({exc}); "
                           f"install it with: {INSTALL_HINT}") from None
    raise TracingError(f"OTLP protocol {protocol!r} is not supported: use grpc or http/protobuf")


class TracingMiddleware:
    """The route span of each generation request, child of the request's W3C ``traceparent``.

    A plain ASGI middleware, so the span stays current while a streamed body is sent."""

    def __init__(self, app):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.app = app
        self.propagator = TraceContextTextMapPropagator()

    async def __call__(self, scope, receive, send):
        traced = scope["type"] == "http" and scope.get("method") == "POST"
        name = ROUTE_SPANS.get(scope.get("path", "")) if traced else None
        if name is None or _tracer is None:
            return await self.app(scope, receive, send)
        from opentelemetry.trace import SpanKind, Status, StatusCode

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        with _tracer.start_as_current_span(name, context=self.propagator.extract(carrier),
                                           kind=SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", scope.get("method", ""))
            span.set_attribute("url.path", scope["path"])
            token = _current.set(_Request(span, time.time_ns()))

            async def traced_send(message):
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 400:
                        span.set_status(Status(StatusCode.ERROR, f"HTTP {message['status']}"))
                await send(message)

            try:
                await self.app(scope, receive, traced_send)
            finally:
                _current.reset(token)


def child(name: str, **attributes):
    """A context manager: a span ``name`` under the current request's route span (a no-op when
    tracing is off). ``validate`` also marks the end of validation (``validation_time``)."""
    request = _current.get()
    if _tracer is None or request is None:
        return nullcontext()
    return _Child(request, name, attributes)


class _Child:
    def __init__(self, request: _Request, name: str, attributes: dict):
        self.request, self.name, self.attributes = request, name, attributes

    def __enter__(self):
        self.cm = _tracer.start_as_current_span(self.name, attributes=self.attributes or None)
        return self.cm.__enter__()

    def __exit__(self, *exc):
        if self.name == "validate":
            self.request.validated_ns = time.time_ns()
        return self.cm.__exit__(*exc)


def record_parameters(parameters) -> None:
    """The route span's ``parameters`` attribute (TGI: the request's parameters, ``{:?}``)."""
    request = _current.get()
    if _tracer is not None and request is not None:
        request.span.set_attribute("parameters", repr(parameters)[:MAX_PARAMETERS_CHARS])


def engine_output(out) -> None:
    """Called with each engine output of a request; on the last one, adds the ``queued`` and
    ``infer`` spans (``send_error`` under ``infer`` when generation failed) and TGI's timing
    attributes to the route span. ``out`` is a ``RequestOutput`` (times from ``time.monotonic``)."""
    request = _current.get()
    if _tracer is None or request is None or not out.finished:
        return
    from opentelemetry.trace import Status, StatusCode, set_span_in_context

    to_epoch = time.time_ns() - time.monotonic_ns()
    now = time.monotonic_ns() + to_epoch
    arrival = int(out.arrival * 1e9) + to_epoch
    started = int(out.first_scheduled * 1e9) + to_epoch if out.first_scheduled is not None else now
    parent = set_span_in_context(request.span)
    _tracer.start_span("queued", context=parent, start_time=arrival).end(end_time=started)
    infer = _tracer.start_span("infer", context=parent, start_time=started)
    infer.set_attribute("generated_tokens", out.num_generated)
    error = getattr(out, "error", None)
    reason = getattr(out.finish_reason, "value", out.finish_reason)
    if reason in ("error", "aborted"):
        message = error or f"request {reason}"
        failed = _tracer.start_span("send_error", context=set_span_in_context(infer), start_time=now)
        failed.set_attribute("error", message)
        failed.set_status(Status(StatusCode.ERROR, message))
        failed.end(end_time=now)
        infer.set_status(Status(StatusCode.ERROR, message))
    infer.end(end_time=now)

    validated = request.validated_ns or arrival
    inference = now - started
    span = request.span
    span.set_attribute("total_time", rust_duration(now - request.start_ns))
    span.set_attribute("validation_time", rust_duration(validated - request.start_ns))
    span.set_attribute("queue_time", rust_duration(started - arrival))
    span.set_attribute("inference_time", rust_duration(inference))
    span.set_attribute("time_per_token", rust_duration(inference // max(out.num_generated, 1)))
    span.set_attribute("seed", f"Some({out.seed})" if out.seed is not None else "None")


def rust_duration(ns: int) -> str:
    """A duration as Rust's ``Duration`` ``{:?}`` writes it (TGI's attribute values): the
    largest unit of s, ms, µs, ns with a value >= 1, and up to 9 significant decimals."""
    ns = max(int(ns), 0)
    for unit, size in (("s", 10**9), ("ms", 10**6), ("µs", 10**3)):
        if ns >= size:
            whole, frac = divmod(ns, size)
            digits = len(str(size)) - 1
            text = f"{whole}.{frac:0{digits}d}".rstrip("0").rstrip(".")
            return text + unit
    return f"{ns}ns"
