"""--api-key, --payload-limit, --max-concurrent-requests, --cors-allow-origin, token limits and
--lora-adapters, on a server started with all of them."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from serverkit import ALLOWED_ORIGIN, API_KEY, OVERLOADED, authed_async_client, metric, overloaded_failures

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method,path", [("POST", "/generate"), ("POST", "/generate_stream"), ("GET", "/info"),
                                         ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                                         ("GET", "/openapi.json"), ("POST", "/tokenize")])
def test_api_key_required(limited_server, method, path):
    body = {"inputs": "hi", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.request(method, limited_server.url + path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error_type"] == "authentication" and r.headers["www-authenticate"] == "Bearer"
    ok = httpx.request(method, limited_server.url + path, json=body,
                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code != 401


def test_health_and_metrics_stay_open(limited_server):
    assert httpx.get(limited_server.url + "/health").status_code == 200
    assert "tgi_request_count" in httpx.get(limited_server.url + "/metrics").text


def test_payload_limit(limited):
    big = {"inputs": "x" * 9000, "parameters": {"max_new_tokens": 1}}
    r = limited.post("/generate", json=big)
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = limited.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    assert limited.post("/generate", json={"inputs": "x" * 100, "parameters": {"max_new_tokens": 1}}).status_code == 422


def test_overloaded(limited_server, limited):
    before = overloaded_failures(limited)

    async def burst():
        async with authed_async_client(limited_server) as client:
            return await asyncio.gather(*[client.post("/generate", json={
                "inputs": "Hello", "parameters": {"max_new_tokens": 40}}) for _ in range(8)])

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert metric(limited, OVERLOADED) >= before + codes.count(429)
    # capacity comes back once the burst is over
    assert limited.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_cors(limited_server):
    pre = httpx.options(limited_server.url + "/generate", headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = httpx.get(limited_server.url + "/info", headers={"Origin": ALLOWED_ORIGIN,
                                                       "Authorization": f"Bearer {API_KEY}"})
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    evil = httpx.get(limited_server.url + "/info", headers={"Origin": "https://evil.example",
                                                          "Authorization": f"Bearer {API_KEY}"})
    assert "access-control-allow-origin" not in evil.headers
    bad_pre = httpx.options(limited_server.url + "/generate", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert bad_pre.status_code == 400


def test_token_limits(limited):
    info = limited.get("/info").json()
    assert info["max_input_tokens"] == 48 and info["max_total_tokens"] == 64
    n = len(limited.post("/tokenize", json={"inputs": "Hello world"}).json())
    d = limited.post("/generate", json={"inputs": "Hello world", "parameters": {"details": True}}).json()
    assert d["details"]["generated_tokens"] == 64 - n  # TGI's default: fill the total budget
    long = "The quick brown fox"
    while (n_long := len(limited.post("/tokenize", json={"inputs": long}).json())) <= 48:
        long += " jumps"
    assert n_long < 60
    r = limited.post("/generate", json={"inputs": long, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 422
    assert r.json()["error"] == f"`inputs` must have less than 48 tokens. Given: {n_long}"
    r = limited.post("/generate", json={"inputs": long, "parameters": {"max_new_tokens": 2, "truncate": 40}})
    assert r.status_code == 200


def test_prefill_logprobs_need_no_flag(limited):
    """Issue 16 item 9: TGI refused decoder_input_details without --enable-prefill-logprobs;
    genserve computes them in bounded memory, so this server (no flag) answers them."""
    r = limited.post("/generate", json={"inputs": "Hi", "parameters": {"decoder_input_details": True,
                                                                       "details": True, "max_new_tokens": 2}})
    assert r.status_code == 200, r.text
    prefill = r.json()["details"]["prefill"]
    assert prefill and prefill[0]["logprob"] is None and all(t["logprob"] <= 0 for t in prefill[1:])


def test_lora_adapters(limited_server, limited):
    assert limited.get("/info").json()["lora_adapters"] == ["tiny-adapter"]
    ok = limited.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2,
                                                                       "adapter_id": "tiny-adapter"}})
    assert ok.status_code == 200
    bad = limited.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "other"}})
    assert bad.status_code == 422 and bad.json()["error"].startswith("adapter `other` is not loaded")
    client = openai.OpenAI(base_url=limited_server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data][1:] == ["tiny-adapter"]
    r = client.chat.completions.create(model="tiny-adapter", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2)
    assert r.model == "tiny-adapter"
