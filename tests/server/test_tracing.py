"""--otlp-endpoint exports TGI's spans (issue 16, item 14), checked at a real OTLP/HTTP receiver
started by the test: a genserve process sends its batches there, the test decodes them with the
OTLP protobuf definitions and reads the span tree of each request."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from conftest import ONE_THREAD, model_dir
from serverkit import ServerProcess, free_port, genserve_command, sse_events
from test_isolation import poisoned_text

pytestmark = pytest.mark.slow
trace_pb = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                               reason="pip install 'genserve[otel]'")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
DURATION = re.compile(r"^\d+(\.\d+)?(s|ms|µs|ns)$")


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self):
        self.requests: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    msg = trace_pb.ExportTraceServiceRequest()
                    msg.ParseFromString(body)
                    receiver.requests.append(msg)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(trace_pb.ExportTraceServiceResponse().SerializeToString())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[dict]:
        out = []
        for req in list(self.requests):
            for rs in req.resource_spans:
                service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append({
                            "name": s.name, "trace": s.trace_id.hex(), "id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(), "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano, "status": s.status.code, "service": service,
                            "attrs": {a.key: _value(a.value) for a in s.attributes}})
        return out

    def wait_for(self, predicate, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.spans()
            if predicate(spans):
                return spans
            time.sleep(0.2)
        raise AssertionError(f"spans never arrived; got {[(s['name'], s['trace']) for s in self.spans()]}")


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture(scope="module")
def traced():
    receiver = Receiver()
    env = {**ONE_THREAD, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    # The faulty tiny model: its high token ids fail in the engine (a real 424 for send_error).
    server = ServerProcess("traced", ["--model-id", str(model_dir("faulty")), "--max-batch-total-tokens", "4096",
                                      "--otlp-endpoint", receiver.url, "--otlp-service-name", "genserve-under-test"],
                           env)
    try:
        yield server.wait_ready(), receiver
    finally:
        server.stop()
        receiver.server.shutdown()


def traceparent(span_id: str = PARENT_ID, trace_id: str = TRACE_ID) -> dict:
    return {"traceparent": f"00-{trace_id}-{span_id}-01"}


def tree(spans: list[dict], trace_id: str, root_name: str) -> tuple[dict, dict[str, list[dict]]]:
    mine = [s for s in spans if s["trace"] == trace_id]
    root = next(s for s in mine if s["name"] == root_name)
    children: dict[str, list[dict]] = {}
    for s in mine:
        children.setdefault(s["parent"], []).append(s)
    return root, children


def test_generate_is_one_trace_with_tgi_spans(traced):
    server, receiver = traced
    trace_id = "11" * 16
    r = httpx.post(server.url + "/generate", headers=traceparent(trace_id=trace_id), timeout=60, json={
        "inputs": "a", "parameters": {"max_new_tokens": 5, "do_sample": True, "seed": 42}})
    assert r.status_code == 200, r.text
    spans = receiver.wait_for(lambda ss: {"generate", "validate", "queued", "infer"}
                              <= {s["name"] for s in ss if s["trace"] == trace_id})
    root, children = tree(spans, trace_id, "generate")
    assert root["parent"] == PARENT_ID  # the caller's traceparent
    assert root["service"] == "genserve-under-test"
    a = root["attrs"]
    for key in ("total_time", "validation_time", "queue_time", "inference_time", "time_per_token"):
        assert DURATION.match(a[key]), (key, a[key])
    assert a["seed"] == "Some(42)"
    assert "max_new_tokens=5" in a["parameters"] and "seed=42" in a["parameters"]
    kids = {s["name"]: s for s in children[root["id"]]}
    assert set(kids) == {"validate", "queued", "infer"}
    validate, queued, infer = kids["validate"], kids["queued"], kids["infer"]
    # in order, inside the route span
    assert root["start"] <= validate["start"] <= validate["end"] <= queued["start"]
    assert queued["end"] == infer["start"] and infer["end"] <= root["end"]
    assert infer["attrs"]["generated_tokens"] == 5
    assert "send_error" not in {s["name"] for s in spans if s["trace"] == trace_id}


def test_stream_and_completions_spans(traced):
    server, receiver = traced
    stream_trace, chat_trace = "22" * 16, "33" * 16
    with httpx.stream("POST", server.url + "/generate_stream", headers=traceparent(trace_id=stream_trace),
                      json={"inputs": "a", "parameters": {"max_new_tokens": 4}}, timeout=60) as r:
        assert len(sse_events(r)) == 4
    # (the faulty model's chat template holds ids it lacks: the OpenAI route here is completions)
    r = httpx.post(server.url + "/v1/completions", headers=traceparent(trace_id=chat_trace), timeout=60,
                   json={"prompt": "a", "max_tokens": 3, "n": 2, "seed": 1})
    assert r.status_code == 200, r.text
    spans = receiver.wait_for(lambda ss: {(stream_trace, "infer"), (chat_trace, "infer")}
                              <= {(s["trace"], s["name"]) for s in ss})
    root, children = tree(spans, stream_trace, "generate_stream")
    assert {s["name"] for s in children[root["id"]]} == {"validate", "queued", "infer"}
    assert root["attrs"]["seed"] == "None" and DURATION.match(root["attrs"]["time_per_token"])
    # the root span of a stream ends after its last event was sent, not when the handler returned
    infer = next(s for s in children[root["id"]] if s["name"] == "infer")
    assert infer["end"] <= root["end"]
    root, children = tree(spans, chat_trace, "completions")
    names = sorted(s["name"] for s in children[root["id"]])
    assert names == ["infer", "infer", "queued", "queued", "validate"]  # n = 2 sequences


def test_failures_are_error_spans(traced):
    server, receiver = traced
    poison = poisoned_text(server.url)
    bad_trace, invalid_trace = "44" * 16, "55" * 16
    r = httpx.post(server.url + "/generate", headers=traceparent(trace_id=bad_trace), timeout=60,
                   json={"inputs": poison, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 424
    r = httpx.post(server.url + "/generate", headers=traceparent(trace_id=invalid_trace), timeout=60,
                   json={"inputs": "a", "parameters": {"temperature": -1}})
    assert r.status_code == 422
    spans = receiver.wait_for(lambda ss: {(bad_trace, "send_error"), (invalid_trace, "generate")}
                              <= {(s["trace"], s["name"]) for s in ss})
    root, children = tree(spans, bad_trace, "generate")
    infer = next(s for s in children[root["id"]] if s["name"] == "infer")
    (send_error,) = children[infer["id"]]
    assert send_error["name"] == "send_error" and "generation failed" in send_error["attrs"]["error"]
    assert send_error["status"] == root["status"] == 2  # STATUS_CODE_ERROR
    root, children = tree(spans, invalid_trace, "generate")
    (validate,) = children[root["id"]]
    assert validate["name"] == "validate" and validate["status"] == 2
    assert root["attrs"]["http.response.status_code"] == 422


def test_endpoint_without_the_extra_refuses_to_start(tmp_path):
    """Without the otel extra, --otlp-endpoint stops the server before it loads anything,
    saying how to install it (here the SDK is made unimportable)."""
    # opentelemetry is a namespace package (FastAPI needs its API part): hide the SDK only
    blocker = tmp_path / "opentelemetry" / "sdk"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'opentelemetry.sdk'\")\n")
    env = {**os.environ, **ONE_THREAD,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(genserve_command() + ["serve", "--model-id", str(model_dir("tiny")), "--port",
                                                str(free_port()), "--otlp-endpoint", "http://127.0.0.1:4317"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert "pip install 'genserve[otel]'" in done.stderr and "--otlp-endpoint" in done.stderr
    assert "Traceback" not in done.stderr


def test_rust_duration_format():
    from genserve.server.tracing import rust_duration

    assert [rust_duration(n) for n in (0, 999, 1_000, 1_500, 12_345_678, 2_000_000_000, 1_250_000_001)] == [
        "0ns", "999ns", "1µs", "1.5µs", "12.345678ms", "2s", "1.250000001s"]


def test_grpc_is_the_default_protocol_as_in_tgi(tmp_path):
    """TGI exports over gRPC: --otlp-endpoint http://host:4317 with no protocol variable."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    received = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.extend(s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans)
            return trace_pb.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    env = {**ONE_THREAD, "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_EXPORTER_OTLP_PROTOCOL": "",
           "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": ""}
    server = ServerProcess("traced-grpc", ["--model-id", str(model_dir("tiny")), "--max-batch-total-tokens",
                                           "4096", "--otlp-endpoint", f"http://127.0.0.1:{port}"], env)
    try:
        server.wait_ready()
        trace_id = "66" * 16
        r = httpx.post(server.url + "/generate", headers=traceparent(trace_id=trace_id), timeout=60,
                       json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "infer" not in {s.name for s in received
                                                             if s.trace_id.hex() == trace_id}:
            time.sleep(0.2)
        names = sorted(s.name for s in received if s.trace_id.hex() == trace_id)
        assert names == ["generate", "infer", "queued", "validate"]
    finally:
        server.stop()
        collector.stop(0)
