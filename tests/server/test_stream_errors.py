"""A request that chose to stream gets its errors as TGI sends them: 200 ``text/event-stream``,
one ``data: {"error", "error_type"}`` event, then the stream ends (no ``[DONE]``). Bodies the
framework rejects, auth and payload size stay plain HTTP errors. Permits and counters are
released and counted on every path."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from serverkit import OVERLOADED, authed_async_client, metric, overloaded_failures

pytestmark = pytest.mark.slow
HI = [{"role": "user", "content": "hi"}]
GEN = lambda **kw: {"inputs": "Hello", "parameters": kw}  # noqa: E731
TOOL = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}

CASES = [  # (path, body, start of the error message)
    ("/generate_stream", {"inputs": "", "parameters": {}}, "`inputs` cannot be empty"),
    ("/generate_stream", GEN(max_new_tokens=4096), "`inputs` tokens + `max_new_tokens` must be <= 4096"),
    ("/generate_stream", GEN(top_p=1.0), "`top_p` must be > 0.0 and < 1.0"),
    ("/generate_stream", GEN(temperature=-1), "`temperature` must be strictly positive"),
    ("/generate_stream", GEN(best_of=2, do_sample=True), "`best_of` != 1 is not supported when streaming tokens"),
    ("/generate_stream", GEN(decoder_input_details=True),
     "`decoder_input_details` == true is not supported when streaming tokens"),
    ("/generate_stream", GEN(grammar={"type": "regex", "value": "(("}), "grammar is not valid"),
    ("/generate_stream", GEN(adapter_id="nope"), "adapter `nope` is not loaded"),
    ("/", {**GEN(top_p=1.0), "stream": True}, "`top_p` must be > 0.0 and < 1.0"),
    ("/", {"inputs": "", "stream": True}, "`inputs` cannot be empty"),
    ("/invocations", {**GEN(top_k=0), "stream": True}, "`top_k` must be strictly positive"),
    ("/v1/chat/completions", {"messages": HI, "stream": True, "top_p": 1.5}, "`top_p` must be > 0.0 and <= 1.0"),
    ("/v1/chat/completions", {"messages": HI, "stream": True, "max_tokens": 5000},
     "`inputs` tokens + `max_new_tokens` must be <= 4096"),
    ("/v1/chat/completions", {"messages": HI, "stream": True, "n": 9}, "`n` must be >= 1 and <= 4"),
    ("/v1/chat/completions", {"messages": HI, "stream": True, "tools": [TOOL],
                              "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tool `f` is not in `tools`"),
    ("/v1/chat/completions", {"messages": HI, "stream": True, "response_format": {"type": "regex", "value": "(("}},
     "grammar is not valid"),
    ("/v1/chat/completions", {"messages": [], "stream": True}, "`messages` cannot be empty"),
    ("/invocations", {"messages": HI, "stream": True, "temperature": -1}, "`temperature` must be >= 0"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "max_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "suffix": "x"}, "Suffix is not supported"),
    ("/v1/completions", {"prompt": [], "stream": True}, "`prompt` cannot be empty"),
]


def stream_events(client: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, list[str]]:
    """The response and the raw ``data:`` payloads, read until the server closes the stream."""
    with client.stream("POST", path, json=body) as r:
        data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    return r, data


def validation_failures(client) -> float:
    text = client.get("/metrics").text
    return metric(client, 'tgi_request_failure{err="validation"}') if 'err="validation"' in text else 0


@pytest.mark.parametrize("path,body,message", CASES, ids=[f"{p} {m[:30]}" for p, _, m in CASES])
def test_streamed_validation_error_is_one_event(tiny, path, body, message):
    before = validation_failures(tiny)
    r, data = stream_events(tiny, path, body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert len(data) == 1, data  # one event, no tokens and no [DONE]: the stream ended
    error = json.loads(data[0])
    assert error["error_type"] == "validation" and set(error) == {"error", "error_type"}
    assert error["error"].startswith(message), error
    assert validation_failures(tiny) == before + 1
    assert metric(tiny, "genserve_requests_in_flight") == 0  # the permit came back


def test_non_streamed_errors_keep_their_status(tiny):
    r = tiny.post("/generate", json=GEN(top_p=1.0))
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = tiny.post("/", json={**GEN(top_p=1.0), "stream": False})
    assert r.status_code == 422
    r = tiny.post("/v1/chat/completions", json={"messages": HI, "top_p": 1.5})
    assert r.status_code == 422


@pytest.mark.parametrize("path,raw", [
    ("/generate_stream", b'{"inputs": "x", "parameters": {'),  # malformed JSON
    ("/generate_stream", b'{"inputs": "x", "parameters": {"max_new_tokens": "5"}}'),  # wrong type
    ("/", b'{"inputs": 5, "stream": true}'),
    ("/v1/chat/completions", b'{"messages": "hi", "stream": true}'),
    ("/v1/completions", b'{"prompt": {"a": 1}, "stream": true}'),
])
def test_bodies_the_framework_rejects_stay_http_errors(tiny, path, raw):
    r = tiny.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error_type"] == "validation"


def test_auth_and_payload_limit_stay_http_errors(limited_server, limited):
    body = {**GEN(max_new_tokens=2), "stream": True}
    assert httpx.post(limited_server.url + "/", json=body).status_code == 401
    r = httpx.post(limited_server.url + "/v1/chat/completions", json={"messages": HI, "stream": True},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = limited.post("/generate_stream", json={"inputs": "x" * 9000, "parameters": {}})
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"


def test_validation_errors_release_permits(limited_server, limited):
    """The limited server admits 2 requests at once: 6 refused streams in a row must not hold any."""
    for _ in range(3):
        for path, body in (("/generate_stream", GEN(top_k=0)),
                           ("/v1/chat/completions", {"messages": HI, "stream": True, "n": 0})):
            r, data = stream_events(limited, path, body)
            assert r.status_code == 200 and json.loads(data[0])["error_type"] == "validation"
    assert metric(limited, "genserve_requests_in_flight") == 0
    r, data = stream_events(limited, "/generate_stream", GEN(max_new_tokens=3))
    assert len(data) == 3 and json.loads(data[-1])["generated_text"] is not None


def test_overloaded_stream_is_one_event(limited_server, limited):
    """As TGI (the permit is taken inside the stream): 200 and one `overloaded` event."""
    before = overloaded_failures(limited)

    async def burst():
        async with authed_async_client(limited_server) as client:
            async def one(i):
                path, body = (("/generate_stream", GEN(max_new_tokens=40)) if i % 2 else
                              ("/v1/chat/completions", {"messages": HI, "max_tokens": 40, "stream": True}))
                async with client.stream("POST", path, json=body) as r:
                    return r.status_code, [line[5:].strip() async for line in r.aiter_lines()
                                           if line.startswith("data:")]
            return await asyncio.gather(*[one(i) for i in range(8)])

    results = asyncio.run(burst())
    assert all(status == 200 for status, _ in results)
    busy = [data for _, data in results if data and data[0].startswith('{"error"')]
    assert len(busy) >= 1 and len(busy) <= 6
    assert all(data == ['{"error":"Model is overloaded","error_type":"overloaded"}'] for data in busy)
    assert metric(limited, OVERLOADED) >= before + len(busy)
    deadline = time.monotonic() + 10  # a finished stream hands its permit back just after its last byte
    while metric(limited, "genserve_requests_in_flight") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    _, data = stream_events(limited, "/generate_stream", GEN(max_new_tokens=2))
    assert len(data) == 2
