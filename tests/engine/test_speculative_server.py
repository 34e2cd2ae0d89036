"""Speculative decoding through the HTTP server (in process): ``details`` report proposed and
accepted tokens, ``/metrics`` has TGI's ``tgi_request_skipped_tokens`` and the acceptance-rate
histogram, and the text equals the server's without speculation."""

import json
import time

import pytest
from fastapi.testclient import TestClient

from genserve.args import defaults
from genserve.server.app import create_app
from genserve.server.state import ServerState
from tests.server.tinymodel import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-tok"))


def serve(folder, **flags):
    args = defaults(model_id=str(folder), backend="cpu", dtype="float32", max_batch_total_tokens=2048, **flags)
    client = TestClient(create_app(ServerState(args)))
    client.__enter__()
    deadline = time.monotonic() + 120
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the server did not load"
        time.sleep(0.2)
    return client


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_details_and_metrics_report_speculative_tokens(tiny):
    body = {"inputs": "the capital of France. the capital of France. the capital of",
            "parameters": {"max_new_tokens": 24, "details": True, "decoder_input_details": False}}
    plain = serve(tiny)
    try:
        want = plain.post("/generate", json=body).json()
    finally:
        plain.__exit__(None, None, None)
    assert "speculative_proposed_tokens" not in want["details"]
    client = serve(tiny, speculate=3)
    try:
        got = client.post("/generate", json=body).json()
        assert got["generated_text"] == want["generated_text"]
        assert [t["id"] for t in got["details"]["tokens"]] == [t["id"] for t in want["details"]["tokens"]]
        d = got["details"]
        assert d["speculative_proposed_tokens"] > 0
        assert 0 <= d["speculative_accepted_tokens"] <= d["speculative_proposed_tokens"]
        events = client.post("/generate_stream", json={**body, "stream": True}).text
        assert '"speculative_proposed_tokens"' in events
        text = client.get("/metrics").text
        assert metric(text, "tgi_request_skipped_tokens_count") == 2
        assert metric(text, "tgi_request_skipped_tokens_sum") == 2 * d["speculative_accepted_tokens"]
        assert metric(text, "genserve_request_spec_acceptance_rate_count") == 2
        assert metric(text, "genserve_spec_proposed_tokens") == 2 * d["speculative_proposed_tokens"]
        assert metric(text, "genserve_spec_accepted_tokens") == 2 * d["speculative_accepted_tokens"]
    finally:
        client.__exit__(None, None, None)


def test_grammar_requests_speculate_through_the_server(tiny):
    """TGI's ``grammar`` (regex and JSON Schema) and OpenAI's ``response_format``: the same
    tokens with speculation on and off, and ``details`` show verified proposals."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    inputs = 'People: {"name":"Ada Ada Ada","age":36} {"name":"Ada Ada Ada","age":36} {"name":"'
    bodies = [{"inputs": inputs, "parameters": {"max_new_tokens": 48, "details": True, "grammar": grammar}}
              for grammar in ({"type": "regex", "value": "[a-z ]{10,60}"}, {"type": "json", "value": schema})]
    chat = {"messages": [{"role": "user", "content": inputs}], "max_tokens": 48, "seed": 7,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}}

    def run(client):
        tgi = [client.post("/generate", json=body).json() for body in bodies]
        openai = client.post("/v1/chat/completions", json=chat).json()  # sampled, seeded
        return tgi, openai

    plain = serve(tiny)
    try:
        want_tgi, want_chat = run(plain)
    finally:
        plain.__exit__(None, None, None)
    client = serve(tiny, speculate=4)
    try:
        got_tgi, got_chat = run(client)
    finally:
        client.__exit__(None, None, None)
    for got, want in zip(got_tgi, want_tgi):
        assert got["generated_text"] == want["generated_text"]
        assert [t["id"] for t in got["details"]["tokens"]] == [t["id"] for t in want["details"]["tokens"]]
        assert got["details"]["finish_reason"] == "eos_token"  # the grammar ended the text
        assert got["details"]["speculative_proposed_tokens"] > 0
    assert got_tgi[1]["details"]["speculative_accepted_tokens"] > 0
    json.loads(got_tgi[1]["generated_text"])
    message = got_chat["choices"][0]["message"]["content"]
    assert message == want_chat["choices"][0]["message"]["content"]
    assert json.loads(message)["age"] <= 120
