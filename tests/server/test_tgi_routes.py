"""TGI's routes on a real server process (tiny random Llama that never emits EOS)."""

from __future__ import annotations

import json
import re

import pytest

from serverkit import metric, sse_events

pytestmark = pytest.mark.slow


def gen(client, inputs="Hello world", **parameters):
    r = client.post("/generate", json={"inputs": inputs, "parameters": parameters})
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_details_and_headers(tiny):
    r = tiny.post("/generate", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6, "details": True}})
    assert r.status_code == 200
    body = r.json()
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 6 and len(d["tokens"]) == 6
    assert d["seed"] is None and d["prefill"] == [] and "best_of_sequences" not in d
    assert all(t["logprob"] <= 0 and isinstance(t["special"], bool) for t in d["tokens"])
    assert body["generated_text"].startswith("".join(t["text"] for t in d["tokens"] if not t["special"]))
    assert r.headers["x-generated-tokens"] == "6"
    assert int(r.headers["x-prompt-tokens"]) == len(tiny.post("/tokenize", json={"inputs": "Hello world"}).json())


def test_no_details_unless_asked(tiny):
    assert set(gen(tiny, max_new_tokens=2)) == {"generated_text"}


def test_stream_matches_generate(tiny):
    ref = gen(tiny, max_new_tokens=8, details=True)
    with tiny.stream("POST", "/generate_stream",
                     json={"inputs": "Hello world", "parameters": {"max_new_tokens": 8, "details": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert [e["index"] for e in events] == list(range(1, 9))
    assert [e["token"]["id"] for e in events] == [t["id"] for t in ref["details"]["tokens"]]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == ref["generated_text"]
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 8
    assert last["details"]["input_length"] == int(len(tiny.post("/tokenize", json={"inputs": "Hello world"}).json()))


def test_compat_route_wraps_in_a_list_or_streams(tiny):
    r = tiny.post("/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 1
    assert r.json()[0]["generated_text"] == gen(tiny, "Hello", max_new_tokens=3)["generated_text"]
    with tiny.stream("POST", "/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}, "stream": True}) as s:
        events = sse_events(s)
    assert len(events) == 3 and events[-1]["generated_text"] == r.json()[0]["generated_text"]


def test_best_of_returns_highest_logprob_sequence(tiny):
    d = gen(tiny, max_new_tokens=5, best_of=3, do_sample=True, details=True)["details"]
    others = d["best_of_sequences"]
    assert len(others) == 2 and all(o["generated_tokens"] == 5 for o in others)
    best = sum(t["logprob"] for t in d["tokens"])
    assert all(best >= sum(t["logprob"] for t in o["tokens"]) for o in others)
    assert d["seed"] is not None and all(o["seed"] is not None for o in others)


def test_decoder_input_details(tiny):
    d = gen(tiny, "The quick brown fox", max_new_tokens=2, decoder_input_details=True, details=True)["details"]
    ids = [t["id"] for t in tiny.post("/tokenize", json={"inputs": "The quick brown fox"}).json()]
    assert [t["id"] for t in d["prefill"]] == ids
    assert d["prefill"][0]["logprob"] is None and all(t["logprob"] <= 0 for t in d["prefill"][1:])


def test_return_full_text_and_truncate(tiny):
    plain = gen(tiny, "The quick brown fox", max_new_tokens=4)["generated_text"]
    full = gen(tiny, "The quick brown fox", max_new_tokens=4, return_full_text=True)["generated_text"]
    assert full == "The quick brown fox" + plain
    r = tiny.post("/generate", json={"inputs": "The quick brown fox", "parameters": {
        "max_new_tokens": 2, "truncate": 2, "decoder_input_details": True, "details": True}})
    ids = [t["id"] for t in tiny.post("/tokenize", json={"inputs": "The quick brown fox"}).json()]
    assert r.headers["x-prompt-tokens"] == "2"
    assert [t["id"] for t in r.json()["details"]["prefill"]] == ids[-2:]


def test_top_n_tokens(tiny):
    d = gen(tiny, max_new_tokens=4, top_n_tokens=3, details=True)["details"]
    assert len(d["top_tokens"]) == 4
    for chosen, tops in zip(d["tokens"], d["top_tokens"], strict=True):
        assert len(tops) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["id"] == chosen["id"]  # greedy takes the most likely token


def test_stop_sequence_cuts_after_the_stop_text(tiny):
    full = gen(tiny, "Paris is", max_new_tokens=24)["generated_text"]
    stop = full[6:9]
    d = gen(tiny, "Paris is", max_new_tokens=24, stop=[stop], details=True)
    assert d["details"]["finish_reason"] == "stop_sequence"
    assert d["generated_text"] == full[: full.index(stop) + len(stop)]


def test_seeded_sampling_is_reproducible(tiny):
    a = gen(tiny, max_new_tokens=12, do_sample=True, seed=1234, details=True)
    b = gen(tiny, max_new_tokens=12, do_sample=True, seed=1234, details=True)
    c = gen(tiny, max_new_tokens=12, do_sample=True, seed=99, details=True)
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 1234
    assert [t["id"] for t in a["details"]["tokens"]] != [t["id"] for t in c["details"]["tokens"]]


def test_sampling_parameters_change_the_output(tiny):
    ids = lambda **p: [t["id"] for t in gen(tiny, max_new_tokens=12, details=True, **p)["details"]["tokens"]]  # noqa: E731
    greedy = ids()
    assert ids(watermark=True) != greedy
    assert ids(repetition_penalty=3.0) != greedy
    assert ids(frequency_penalty=2.0) != greedy
    assert ids(top_k=1, do_sample=True, seed=3) == greedy  # top-1 sampling is greedy


def test_regex_grammar(tiny):
    d = gen(tiny, max_new_tokens=20, grammar={"type": "regex", "value": "[0-9]{3}-[a-z]{2}"}, details=True)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", d["generated_text"])
    assert d["details"]["finish_reason"] == "eos_token"


def test_json_grammar(tiny):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "color": {"enum": ["red", "green"]}},
              "required": ["ok", "color"], "additionalProperties": False}
    for kind, value in (("json", schema), ("json", json.dumps(schema)),
                        ("json_schema", {"name": "x", "schema": schema})):
        out = json.loads(gen(tiny, max_new_tokens=40, grammar={"type": kind, "value": value})["generated_text"])
        assert isinstance(out["ok"], bool) and out["color"] in ("red", "green") and len(out) == 2


def test_tokenize_byte_offsets(tiny, tiny_dir):
    from transformers import AutoTokenizer

    text = "Héllo wörld 🚀!"
    toks = tiny.post("/tokenize", json={"inputs": text}).json()
    assert [t["id"] for t in toks] == AutoTokenizer.from_pretrained(tiny_dir)(text)["input_ids"]
    raw = text.encode()
    assert toks[0]["start"] == 0 and toks[-1]["stop"] == len(raw)
    for t in toks:
        assert raw[t["start"]:t["stop"]].decode() == t["text"]


def test_info(tiny, tiny_dir):
    info = tiny.get("/info").json()
    for key in ("model_id", "model_sha", "model_pipeline_tag", "model_dtype", "model_device_type",
                "max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_input_tokens",
                "max_total_tokens", "validation_workers", "max_client_batch_size", "router", "version",
                "sha", "docker_label"):
        assert key in info
    assert info["model_id"] == str(tiny_dir) and info["model_device_type"] == "cpu"
    assert info["max_total_tokens"] == 4096 and info["max_input_tokens"] == 4095
    assert info["max_concurrent_requests"] == 128 and info["max_best_of"] == 3
    assert info["backend"] == "cpu" and info["kv_blocks_total"] * info["block_size"] == 32768
    assert info["model_dtype"] == "float32" and info["grammar_support"] is True


def test_health(tiny):
    r = tiny.get("/health")
    assert r.status_code == 200 and r.content == b""


def test_metrics(tiny):
    before = metric(tiny, "tgi_request_success")
    gen(tiny, max_new_tokens=3)
    text = tiny.get("/metrics").text
    assert metric(tiny, "tgi_request_success") == before + 1
    for name in ("tgi_request_count", "tgi_request_duration_bucket", "tgi_request_validation_duration_sum",
                 "tgi_request_queue_duration_count", "tgi_request_inference_duration_count",
                 "tgi_request_mean_time_per_token_duration_count", "tgi_request_input_length_count",
                 "tgi_request_max_new_tokens_count", "tgi_request_generated_tokens_sum",
                 "tgi_request_skipped_tokens_count", "tgi_batch_current_size", "tgi_batch_current_max_tokens",
                 "tgi_queue_size", "tgi_batch_next_size_count", 'tgi_batch_inference_count{method="decode"}',
                 'tgi_batch_inference_success{method="prefill"}', 'tgi_batch_inference_duration_count{method="decode"}',
                 "tgi_batch_forward_duration", "genserve_kv_blocks_used", "genserve_requests_running",
                 "genserve_requests_waiting", "genserve_preemptions", "genserve_prefix_cache_hit_rate"):
        assert name in text, name
    assert "# TYPE tgi_request_count counter" in text
    assert metric(tiny, "genserve_kv_blocks_total") == 2048
    assert metric(tiny, "genserve_kv_blocks_used") == 0


def test_prefix_cache_hit_rate_moves(tiny):
    prompt = "A language model predicts the next token from the tokens before it, one step at a time. " * 3
    gen(tiny, prompt, max_new_tokens=1)
    before = metric(tiny, "genserve_prefix_cache_hit_rate")
    gen(tiny, prompt, max_new_tokens=1)
    assert metric(tiny, "genserve_prefix_cache_hit_rate") > before


def test_invocations_dispatch_by_shape(tiny):
    r = tiny.post("/invocations", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and isinstance(r.json(), list)
    r = tiny.post("/invocations", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.json()["object"] == "chat.completion"
    r = tiny.post("/invocations", json={"prompt": "hi", "max_tokens": 2})
    assert r.json()["object"] == "text_completion"
    r = tiny.post("/invocations", json={"nothing": 1})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


def test_openapi_and_docs(tiny):
    doc = tiny.get("/openapi.json").json()
    assert tiny.get("/api-doc/openapi.json").json() == doc
    for path in ("/", "/generate", "/generate_stream", "/tokenize", "/info", "/health", "/metrics",
                 "/invocations", "/v1/chat/completions", "/v1/completions", "/v1/models"):
        assert path in doc["paths"], path
    assert "StreamResponse" in doc["components"]["schemas"]
    assert "swagger" in tiny.get("/docs").text.lower()


def test_chat_tokenize(tiny):
    r = tiny.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert r["templated_text"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "".join(t["text"] for t in r["tokenize_response"]) == r["templated_text"]
