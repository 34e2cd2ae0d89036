"""Faults from public TGI/vLLM bug reports (issue 16), each turned into a test with the right
value, on the tiny random Llama (which never emits EOS) unless the example needs a real model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serverkit import sse_events

pytestmark = pytest.mark.slow
HI = [{"role": "user", "content": "Say hi"}]


def token_bytes(token: str) -> bytes:
    """The bytes of a logprobs token string (vLLM's ``bytes:\\xNN`` form for partial characters)."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
    return token.encode()


def lossy(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def visible_tokens(tiny, prompt: str, n: int) -> list[str]:
    """The texts the greedy tokens of ``prompt`` add, one per token (TGI's details)."""
    r = tiny.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}})
    assert r.status_code == 200, r.text
    return [t["text"] for t in r.json()["details"]["tokens"]]


def spanning_stop(texts: list[str]) -> tuple[str, int]:
    """A stop text that spans three tokens with text (the last character of one, the next one's
    text, the first character of the one after; tokens that add no text may lie between) and
    first occurs there; and where it starts."""
    full = "".join(texts)
    starts = [sum(len(t) for t in texts[:k]) for k in range(len(texts))]
    shown = [k for k, t in enumerate(texts) if t]
    for a, b, c in zip(shown, shown[1:], shown[2:], strict=False):
        stop = texts[a][-1] + full[starts[b]:starts[c]] + texts[c][0]
        start = starts[a] + len(texts[a]) - 1
        if full.find(stop) == start:
            return stop, start
    raise AssertionError(f"no stop spans three tokens of {texts}")


# -- 1, 2: the OpenAI routes never return a matched stop, not even part of it in a stream ------
def test_completions_trim_the_stop_and_hold_back_its_start(tiny):
    prompt = "Once upon a time"
    texts = visible_tokens(tiny, prompt, 16)
    stop, start = spanning_stop(texts)
    full = "".join(texts)
    tgi = tiny.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 16, "stop": [stop],
                                                                        "details": True}}).json()
    assert tgi["generated_text"] == full[:start + len(stop)]  # TGI keeps the stop
    assert tgi["details"]["finish_reason"] == "stop_sequence"
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stop": stop}
    r = tiny.post("/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == full[:start] and r["choices"][0]["finish_reason"] == "stop"
    with tiny.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        events = [e for e in sse_events(s) if e != "[DONE]"]
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == full[:start]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_trims_the_stop_streamed_or_not(tiny):
    templated = tiny.post("/chat_tokenize", json={"messages": HI}).json()["templated_text"]
    r = tiny.post("/generate", json={"inputs": templated, "add_special_tokens": False,
                                     "parameters": {"max_new_tokens": 16, "details": True}}).json()
    texts = [t["text"] for t in r["details"]["tokens"]]
    stop, start = spanning_stop(texts)
    full = "".join(texts)
    body = {"messages": HI, "max_tokens": 16, "temperature": 0, "stop": [stop]}
    whole = tiny.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["message"]["content"] == full[:start] and whole["finish_reason"] == "stop"
    with tiny.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        events = [e for e in sse_events(s) if e != "[DONE]"]
    assert "".join(e["choices"][0]["delta"]["content"] or "" for e in events) == full[:start]


# -- 3: tool_choice that demands a call needs tools ---------------------------------------------
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_without_tools_is_422(tiny, choice):
    r = tiny.post("/v1/chat/completions", json={"messages": HI, "tool_choice": choice, "max_tokens": 3})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert "`tool_choice`" in r.json()["error"] and "needs `tools`" in r.json()["error"]


def test_tool_choice_auto_or_none_without_tools_is_plain_chat(tiny):
    for choice in ("auto", "none"):
        r = tiny.post("/v1/chat/completions", json={"messages": HI, "tool_choice": choice, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


# -- 4: logprobs carry each token's own bytes ---------------------------------------------------
def test_chat_logprobs_carry_each_tokens_own_bytes(tiny):
    r = tiny.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 40, "temperature": 0,
                                                "logprobs": True, "top_logprobs": 5}).json()
    choice = r["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == 40
    # The bytes of the entries add up to the text, character pieces included (the random model
    # also writes invalid UTF-8, which the text shows as U+FFFD, as Python's decoder does).
    assert lossy(b"".join(bytes(e["bytes"]) for e in entries)) == choice["message"]["content"]
    partial = 0
    for e in [*entries, *(top for entry in entries for top in entry["top_logprobs"])]:
        assert token_bytes(e["token"]) == bytes(e["bytes"])
        try:
            bytes(e["bytes"]).decode()
        except UnicodeDecodeError:
            partial += 1
            assert e["token"].startswith("bytes:\\x")
    assert partial > 0  # the byte-level tiny model shows pieces of characters among 40x5 tokens
    for e in entries:  # greedy: the chosen token is the most likely one
        assert e["top_logprobs"][0]["bytes"] == e["bytes"]


def test_completion_logprobs_tokens_are_each_tokens_own_bytes(tiny):
    r = tiny.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 40, "temperature": 0,
                                           "logprobs": 3}).json()
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert lossy(b"".join(token_bytes(t) for t in lp["tokens"])) == choice["text"]
    for tops, token in zip(lp["top_logprobs"], lp["tokens"], strict=True):
        assert len(tops) == 3 and token in tops  # greedy picks one of its top tokens


# -- 5: echo with logprobs lists the prompt's tokens too, the first without a logprob -----------
def test_completion_echo_logprobs_cover_prompt_and_completion(tiny):
    prompt = "Hello world, how are you"
    prefill = tiny.post("/generate", json={"inputs": prompt, "parameters": {
        "max_new_tokens": 1, "decoder_input_details": True}}).json()["details"]["prefill"]
    r = tiny.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0,
                                           "echo": True, "logprobs": 1}).json()
    choice, usage = r["choices"][0], r["usage"]
    lp = choice["logprobs"]
    assert len(prefill) == usage["prompt_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == usage["prompt_tokens"] + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for k, ref in enumerate(prefill[1:], start=1):  # the reference: TGI's prompt logprobs
        assert lp["token_logprobs"][k] == pytest.approx(ref["logprob"], abs=1e-4)
    assert choice["text"].startswith(prompt)
    assert lossy(b"".join(token_bytes(t) for t in lp["tokens"])) == choice["text"]
    assert lp["text_offset"][0] == 0 and lp["text_offset"][usage["prompt_tokens"]] == len(prompt)
    with tiny.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0,
                                                      "echo": True, "logprobs": 1, "stream": True}) as s:
        events = [e for e in sse_events(s) if e != "[DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
    streamed = [t for e in events if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]


# -- 7: TGI's health checks -----------------------------------------------------------------------
def test_ping_and_root_are_health_checks(tiny):
    assert tiny.get("/ping").status_code == 200 and tiny.get("/").status_code == 200


# -- 11: one body parser for every route ----------------------------------------------------------
JSON = {"content-type": "application/json"}
BODIES = {
    "/generate": '{"inputs": "%s"}', "/generate_stream": '{"inputs": "%s"}', "/tokenize": '{"inputs": "%s"}',
    "/": '{"inputs": "%s"}', "/v1/completions": '{"prompt": "%s"}',
    "/v1/chat/completions": '{"messages": [{"role": "user", "content": "%s"}]}',
    "/chat_tokenize": '{"messages": [{"role": "user", "content": "%s"}]}',
    "/invocations": '{"inputs": "%s"}',
}


@pytest.mark.parametrize("path", sorted(BODIES))
def test_lone_surrogates_are_422(tiny, path):
    r = tiny.post(path, content=(BODIES[path] % "\\ud800").encode(), headers=JSON)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"


@pytest.mark.parametrize("path", ["/chat_tokenize", "/invocations", "/generate", "/v1/completions"])
@pytest.mark.parametrize("body", [b"[" * 200_000, b'{"inputs": "hi", "parameters": {"seed": ' + b"9" * 5000 + b"}}",
                                  b'{"messages": [{"role": "user", "content": "hi"}], "n": ' + b"7" * 5000 + b"}"])
def test_deep_nesting_and_huge_numbers_are_422(tiny, path, body):
    r = tiny.post(path, content=body, headers=JSON)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"


def test_surrogate_pairs_still_work(tiny):
    r = tiny.post("/tokenize", content=b'{"inputs": "sun \\ud83c\\udf1e"}', headers=JSON)
    assert r.status_code == 200 and r.json()[-1]["stop"] == len("sun \U0001f31e".encode())


# -- 13: content types, unrepresentable temperatures, best_of -------------------------------------
@pytest.mark.parametrize("path,body", [
    ("/invocations", '{"inputs": "hi", "parameters": {"max_new_tokens": 2}}'),
    ("/chat_tokenize", '{"messages": [{"role": "user", "content": "hi"}]}'),
    ("/generate", '{"inputs": "hi"}'), ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}]}'),
])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_bodies_are_415(tiny, path, body, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(tiny.base_url.join(path), content=body.encode(), headers=headers)
    if content_type is None:  # httpx sends none for raw bytes
        assert "content-type" not in r.request.headers
    assert r.status_code == 415, r.text
    assert r.json()["error_type"] == "unsupported_media_type"
    ok = tiny.post(path, content=body.encode(), headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path,body", [
    ("/generate", {"inputs": "hi", "parameters": {"temperature": 1e-320, "max_new_tokens": 2}}),
    ("/generate", {"inputs": "hi", "parameters": {"repetition_penalty": 1e-40, "max_new_tokens": 2}}),
    ("/v1/completions", {"prompt": "hi", "temperature": 1e-320, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": HI, "temperature": 1e-35, "max_tokens": 2}),
])
def test_unrepresentable_divisors_are_422(tiny, path, body):
    r = tiny.post(path, json=body)
    assert r.status_code == 422 and "must be >= 1e-30" in r.json()["error"], r.text


def test_completion_best_of_returns_the_likeliest(tiny):
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 1.0, "seed": 11, "logprobs": 0}
    both = tiny.post("/v1/completions", json={**body, "n": 2}).json()["choices"]  # seeds 11 and 12
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in both]
    best = tiny.post("/v1/completions", json={**body, "best_of": 2}).json()
    assert len(best["choices"]) == 1
    assert best["choices"][0]["text"] == both[sums.index(max(sums))]["text"]
    assert best["usage"]["completion_tokens"] == 12  # both sequences were generated


@pytest.mark.parametrize("extra,message", [
    ({"best_of": 1, "n": 2}, "`best_of` must be >= `n`"),
    ({"best_of": 9}, "`best_of` must be >= `n` (1) and <= 3"),
    ({"best_of": 2, "stream": True}, "not supported when streaming"),
])
def test_completion_best_of_refusals(tiny, extra, message):
    r = tiny.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, **extra})
    if extra.get("stream"):
        assert r.status_code == 200 and message in sse_events(r)[0]["error"]
    else:
        assert r.status_code == 422 and message in r.json()["error"], r.text


# -- on the embedded SmolLM2: the issue's own examples ---------------------------------------------
def test_smollm2_stops_as_in_the_reports(smol_server):
    url = smol_server.url
    r = httpx.post(url + "/v1/completions", json={"prompt": "The capital city of France is", "temperature": 0,
                                                  "max_tokens": 12, "stop": "Pari"}, timeout=120).json()
    assert r["choices"][0]["text"] == " " and r["choices"][0]["finish_reason"] == "stop"  # item 1
    alphabet = {"prompt": "Here is the English alphabet: ABC", "temperature": 0, "max_tokens": 16,
                "stop": ["DEFGHIJ"], "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=alphabet, timeout=120) as s:
        events = [e for e in sse_events(s) if e != "[DONE]"]
    text = "".join(e["choices"][0]["text"] for e in events)  # item 2
    assert not any(c in text for c in "DEFGHIJ") and events[-1]["choices"][0]["finish_reason"] == "stop"
    special = {"inputs": "<|im_start|>user\nHi<|im_end|>\n", "parameters": {
        "max_new_tokens": 8, "stop": ["<|im_start|>"], "details": True}}
    g = httpx.post(url + "/generate", json=special, timeout=120).json()  # item 6
    assert g["details"]["finish_reason"] == "stop_sequence" and g["details"]["generated_tokens"] == 1
    assert g["details"]["tokens"][0]["text"] == "<|im_start|>" and g["generated_text"] == ""
    c = httpx.post(url + "/v1/completions", json={"prompt": special["inputs"], "max_tokens": 8, "temperature": 0,
                                                  "stop": ["<|im_start|>"]}, timeout=120).json()
    assert c["usage"]["completion_tokens"] == 1 and c["choices"][0]["finish_reason"] == "stop"
    assert c["choices"][0]["text"] == ""


def test_smollm2_emoji_logprobs(smol_server):
    oai = openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0)
    sun = [{"role": "user", "content": "Reply with three emojis about the sun"}]
    r = oai.chat.completions.create(model="tgi", messages=sun, temperature=0, max_tokens=24, logprobs=True,
                                    top_logprobs=2)
    content = r.choices[0].message.content
    entries = r.choices[0].logprobs.content
    assert b"".join(bytes(e.bytes) for e in entries) == content.encode()
    pieces = [e for e in entries if e.token.startswith("bytes:")]
    assert pieces, json.dumps([e.model_dump() for e in entries])[:2000]  # the reply splits a character
    for e in entries:
        assert e.bytes and token_bytes(e.token) == bytes(e.bytes)
        assert all(token_bytes(t.token) == bytes(t.bytes) and "\ufffd" not in t.token for t in e.top_logprobs)


# -- 8 (and 4 with a leading-space marker): a tokenizer the grammar library cannot load -----------
def test_grammar_support_is_known_at_startup(metaspace_server):
    url = metaspace_server.url
    assert httpx.get(url + "/info").json()["grammar_support"] is False
    log = open(metaspace_server.log_path, errors="replace").read()
    assert "grammar support: off, llguidance cannot load this tokenizer" in log
    requests = [
        ("/generate", {"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "[0-9]+"}}}),
        ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_object"}}),
        ("/v1/chat/completions", {"messages": HI, "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
    ]
    for path, body in requests:
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 422, r.text
        assert r.json()["error"].startswith("grammar is not supported: llguidance cannot load this tokenizer")
    ok = httpx.post(url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert ok.status_code == 200


def test_logprob_bytes_with_a_leading_space_marker(metaspace_server):
    r = httpx.post(metaspace_server.url + "/v1/completions", json={
        "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "logprobs": 2}, timeout=60).json()
    choice = r["choices"][0]
    tokens = choice["logprobs"]["tokens"]
    assert not any("\u2581" in t for t in tokens)  # "▁" is shown as the space it stands for
    assert lossy(b"".join(token_bytes(t) for t in tokens)) == choice["text"]


# -- 12: heavy validation work does not stall other streams ---------------------------------------
def test_grammar_compiles_off_the_event_loop():
    """Grammar compilation (seconds for a 50,000-value enum, which stalled every stream for
    6-7 s) runs on a validation worker, never on the event loop. Checked where it happens, not
    by timing streams: the wall-clock version passed or failed with the machine's load."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from genserve.server import validation
    from genserve.server.state import ServerState

    seen = []

    def compile_spy(kind, value):
        try:
            asyncio.get_running_loop()
            seen.append("event loop")
        except RuntimeError:
            seen.append("worker")
        return ("compiled", kind, value)

    workers = ThreadPoolExecutor(1)
    state = SimpleNamespace(limits=SimpleNamespace(disable_grammar=False), grammar_supported=True,
                            grammar=SimpleNamespace(compile=compile_spy), workers=workers)
    state.in_worker = lambda fn, *args: ServerState.in_worker(state, fn, *args)
    result = asyncio.run(validation.compile_grammar(state, "regex", "[a-z]+"))
    workers.shutdown(wait=True)
    assert result == ("compiled", "regex", "[a-z]+") and seen == ["worker"]


@pytest.mark.parametrize("route", ["tokenize", "chat_tokenize"])
def test_tokenizing_runs_off_the_event_loop(monkeypatch, route):
    """/tokenize and /chat_tokenize tokenize and encode on a validation worker, never on the
    event loop (which would stall every stream). Checked where it happens, not by timing: a
    timing test of a 400 KB body passed or failed with the machine's load."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from genserve.server import serving_tgi
    from genserve.server.schemas_openai import ChatTokenizeRequest
    from genserve.server.schemas_tgi import GenerateRequest
    from genserve.server.state import ServerState

    seen = []

    def spy(tokenizer, text, *args):
        try:
            asyncio.get_running_loop()
            seen.append("event loop")
        except RuntimeError:
            seen.append("worker")
        return b"[]"

    monkeypatch.setattr(serving_tgi, "tokenize_json", spy)
    monkeypatch.setattr(serving_tgi, "render_chat", lambda state, messages, tools, prompt: "hi")
    workers = ThreadPoolExecutor(1)
    state = SimpleNamespace(require_ready=lambda: None, tokenizer=object(), workers=workers)
    state.in_worker = lambda fn, *args: ServerState.in_worker(state, fn, *args)
    serving = serving_tgi.TGIServing(state)
    if route == "tokenize":
        call = serving.tokenize(GenerateRequest(inputs="hi"))
    else:
        call = serving.chat_tokenize(ChatTokenizeRequest(messages=[{"role": "user", "content": "hi"}]))
    response = asyncio.run(call)
    workers.shutdown(wait=True)
    assert response.body == b"[]" and seen == ["worker"]


def test_grammar_compile_time_is_bounded(monkeypatch):
    """A grammar that compiles for longer than the bound is refused (422), not waited on."""
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from genserve.server import validation
    from genserve.server.errors import APIError
    from genserve.server.state import ServerState

    workers = ThreadPoolExecutor(1)
    state = SimpleNamespace(limits=SimpleNamespace(disable_grammar=False), grammar_supported=True,
                            grammar=SimpleNamespace(compile=lambda kind, value: time.sleep(1.0)), workers=workers)
    state.in_worker = lambda fn, *args: ServerState.in_worker(state, fn, *args)
    monkeypatch.setattr(validation, "GRAMMAR_COMPILE_TIMEOUT_S", 0.2)
    with pytest.raises(APIError) as err:
        asyncio.run(validation.compile_grammar(state, "regex", "x"))
    assert err.value.status == 422 and "did not compile within 0.2 s" in err.value.message
    workers.shutdown(wait=True)
