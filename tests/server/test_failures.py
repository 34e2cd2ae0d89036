"""Generation failures inside the engine, --disable-grammar-support, and SIGTERM.

The faulty model's tokenizer knows more tokens than its embedding table: prompts with those
tokens make the engine step raise (a real failure, no mocks), which must come back as TGI's
424 ``generation`` error (or one SSE error event) while the server keeps serving.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from serverkit import sse_events

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def poison(faulty_server) -> str:
    """A prompt whose tokens include ids >= the model's vocabulary (300)."""
    client = httpx.Client(base_url=faulty_server.url)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(faulty_server_dir(faulty_server) / "tokenizer.json"))
    for i in range(tok.get_vocab_size() - 1, 300, -1):
        text = tok.decode([i])
        ids = [t["id"] for t in client.post("/tokenize", json={"inputs": text}).json()]
        if text.strip() and any(t >= 300 for t in ids):
            return text
    pytest.skip("no poisonous token found")


@pytest.fixture(scope="module")
def safe(faulty_server) -> str:
    """A prompt whose tokens are all inside the model's vocabulary."""
    for text in ("a", "e", "x y z", "1 2 3"):
        ids = [t["id"] for t in httpx.post(faulty_server.url + "/tokenize", json={"inputs": text}).json()]
        if all(t < 300 for t in ids):
            return text
    pytest.skip("no safe prompt found")


def faulty_server_dir(server):
    from pathlib import Path

    return Path(server.args[server.args.index("--model-id") + 1])


def test_generation_error_is_424(faulty_server, poison, safe):
    r = httpx.post(faulty_server.url + "/generate", json={"inputs": poison, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 424
    assert r.json()["error_type"] == "generation" and "generation failed" in r.json()["error"]
    r = httpx.post(faulty_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": poison}], "max_tokens": 3})
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    metrics = httpx.get(faulty_server.url + "/metrics").text
    assert 'tgi_request_failure{err="generation"}' in metrics
    # the engine survives: a good request still works and /health is green
    ok = httpx.post(faulty_server.url + "/generate", json={"inputs": safe, "parameters": {"max_new_tokens": 3}})
    assert ok.status_code == 200
    assert httpx.get(faulty_server.url + "/health").status_code == 200


def test_stream_error_is_one_event_then_close(faulty_server, poison):
    with httpx.stream("POST", faulty_server.url + "/generate_stream",
                      json={"inputs": poison, "parameters": {"max_new_tokens": 3}}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert len(events) == 1 and events[0]["error_type"] == "generation" and set(events[0]) == {"error", "error_type"}
    with httpx.stream("POST", faulty_server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": poison}], "max_tokens": 3, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1]["error_type"] == "generation" and "[DONE]" not in events


def test_grammar_disabled(faulty_server):
    r = httpx.post(faulty_server.url + "/generate", json={"inputs": "Hi", "parameters": {
        "grammar": {"type": "regex", "value": "[0-9]+"}}})
    assert r.status_code == 422 and r.json() == {"error": "grammar is not supported", "error_type": "validation"}
    assert httpx.get(faulty_server.url + "/info").json()["grammar_support"] is False


def test_sigterm_lets_in_flight_requests_finish(faulty_server, safe):
    """Last test on this server: SIGTERM while two requests run. The short stream finishes, the
    long request gets a clean error when the grace period (3 s here) ends, new requests get 503,
    and the process exits 0."""
    results, stream_started = {}, threading.Event()

    def short_stream():
        with httpx.stream("POST", faulty_server.url + "/generate_stream",
                          json={"inputs": safe, "parameters": {"max_new_tokens": 20}}, timeout=60) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    stream_started.set()
            results["events"] = events

    def long_request():
        results["long"] = httpx.post(faulty_server.url + "/generate", json={"inputs": safe, "parameters": {
            "max_new_tokens": 16000}}, timeout=60)

    long = threading.Thread(target=long_request)
    long.start()
    deadline = time.monotonic() + 30
    while "genserve_requests_running 1.0" not in httpx.get(faulty_server.url + "/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    short = threading.Thread(target=short_stream)
    short.start()
    assert stream_started.wait(30)
    faulty_server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(faulty_server.url + "/generate", json={"inputs": safe})
    assert refused.status_code == 503 and refused.json()["error"] == "the server is shutting down"
    assert httpx.get(faulty_server.url + "/health").status_code == 503
    short.join(60)
    long.join(60)
    assert len(results["events"]) == 20 and results["events"][-1]["generated_text"] is not None
    assert results["long"].status_code == 424, results["long"].text[-300:]
    assert results["long"].json() == {"error": "the server is shutting down", "error_type": "generation"}
    assert faulty_server.proc.wait(30) == 0
    log = open(faulty_server.log_path).read()
    assert "genserve stopped" in log and "Traceback" not in log.split("stopping:")[-1]
