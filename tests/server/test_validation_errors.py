"""Every validation rule of TGI's table answers 422 with TGI's message and error body (streamed
requests get the same body as their one SSE event: test_stream_errors.py)."""

from __future__ import annotations

import pytest

from serverkit import metric

pytestmark = pytest.mark.slow

P = lambda **kw: {"inputs": "Hello", "parameters": kw}  # noqa: E731
CASES = [
    ({"inputs": "", "parameters": {}}, "`inputs` cannot be empty"),
    (P(best_of=2), "you must use sampling when `best_of` is > 1"),
    (P(best_of=4, do_sample=True), "`best_of` must be > 0 and <= 3. Given: 4"),
    (P(best_of=0, do_sample=True), "`best_of` must be > 0 and <= 3. Given: 0"),
    (P(best_of=2, do_sample=True, seed=5), "`seed` must not be set when `best_of` > 1"),
    (P(temperature=0.0), "`temperature` must be strictly positive"),
    (P(temperature=-1.5), "`temperature` must be strictly positive"),
    (P(repetition_penalty=0.0), "`repetition_penalty` must be strictly positive"),
    (P(frequency_penalty=2.5), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (P(frequency_penalty=-2.01), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (P(top_p=1.0), "`top_p` must be > 0.0 and < 1.0"),
    (P(top_p=0.0), "`top_p` must be > 0.0 and < 1.0"),
    (P(typical_p=1.0), "`typical_p` must be > 0.0 and < 1.0"),
    (P(top_k=0), "`top_k` must be strictly positive"),
    (P(max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
    (P(stop=["a", "b", "c", "d", "e"]), "`stop` supports up to 4 stop sequences. Given: 5"),
    (P(top_n_tokens=6), "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    (P(truncate=0), "`truncate` must be strictly positive and less than 4095. Given: 0"),
    (P(truncate=4096), "`truncate` must be strictly positive and less than 4095. Given: 4096"),
    (P(seed=-1), "`seed` must be >= 0"),
    (P(seed=2**64), "`seed` must be >= 0"),
    (P(max_new_tokens=4096), "`inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4 `inputs` tokens "
                             "and 4096 `max_new_tokens`"),
    (P(adapter_id="nope"), "adapter `nope` is not loaded"),
    (P(grammar={"type": "regex", "value": "(("}), "grammar is not valid"),
    (P(grammar={"type": "json", "value": {"type": "object"}}),
     "grammar is not valid: Grammar must have a 'properties' field"),
    (P(grammar={"type": "json", "value": {"properties": {}, "type": 5}}), "grammar is not valid"),
    (P(grammar={"type": "json", "value": "{not json"}), "grammar is not valid"),
]


@pytest.mark.parametrize("body,message", CASES, ids=[m[:40] for _, m in CASES])
def test_generate_parameter_rules(tiny, body, message):
    r = tiny.post("/generate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith(message), r.json()["error"]


def test_input_longer_than_total_budget(tiny):
    long = "The quick brown fox jumps over the lazy dog. " * 500  # > 4096 tokens
    r = tiny.post("/generate", json={"inputs": long, "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 422 and "`inputs` tokens + `max_new_tokens` must be <= 4096" in r.json()["error"]


@pytest.mark.parametrize("raw,content_type", [
    (b'{"inputs": "x", "parameters": {', "application/json"),  # malformed JSON
    (b'{"parameters": {}}', "application/json"),  # missing inputs
    (b'{"inputs": "x", "parameters": {"max_new_tokens": "5"}}', "application/json"),  # wrong type
    (b'{"inputs": 5}', "application/json"),
    (b'{"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": "x"}}}', "application/json"),
])
def test_malformed_bodies_are_422_in_tgi_format(tiny, raw, content_type):
    r = tiny.post("/generate", content=raw, headers={"content-type": content_type})
    assert r.status_code == 422
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == "validation"


def test_validation_failures_are_counted(tiny):
    before = metric(tiny, 'tgi_request_failure{err="validation"}') if "validation" in tiny.get("/metrics").text else 0
    tiny.post("/generate", json=P(top_k=0))
    assert metric(tiny, 'tgi_request_failure{err="validation"}') == before + 1


def test_unknown_route_and_method(tiny):
    assert tiny.get("/nope").json()["error_type"] == "not_found"
    assert tiny.get("/generate").status_code == 405


@pytest.mark.parametrize("body,message", [
    ({"messages": []}, "`messages` cannot be empty"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "`n` must be >= 1 and <= 4. Given: 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 5}, "`n` must be >= 1 and <= 4. Given: 5"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, "`temperature` must be >= 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "`top_p` must be > 0.0 and <= 1.0"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 1.0}}, "`logit_bias` is not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 9},
     "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
     "`stop` supports up to 4 stop sequences"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "image inputs are not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "function", "function": {"name": "f"}},
      "tools": [{"type": "function", "function": {"name": "g"}}]}, "tool `f` is not in `tools`"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, "`presence_penalty` must be >= -2.0"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
])
def test_chat_validation(tiny, body, message):
    r = tiny.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and message in r.json()["error"]


@pytest.mark.parametrize("body,message", [
    ({"prompt": "hi", "suffix": "x"}, "Suffix is not supported"),
    ({"prompt": ["a", "b", "c", "d", "e"]}, "Number of prompts exceeds the maximum allowed batch size of 4"),
    ({"prompt": []}, "`prompt` cannot be empty"),
    ({"prompt": [1, 2, 99999]}, "token ids must be >= 0 and < 400"),
    ({"prompt": "hi", "max_tokens": 0}, "`max_new_tokens` must be strictly positive"),
])
def test_completion_validation(tiny, body, message):
    r = tiny.post("/v1/completions", json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]
