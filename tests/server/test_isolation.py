"""One request cannot fail its batch mates (issue 16, item 10).

Numbers the engine cannot hold are refused with TGI's 422 before they reach it; a request that
still makes an engine step raise (the faulty model's prompt ids beyond its embedding table) fails
alone with 424 while the requests sharing its steps finish with the tokens they get alone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import ONE_THREAD, model_dir
from serverkit import ServerProcess

GOOD = {"inputs": "The sun", "parameters": {"max_new_tokens": 24, "details": True}}


def tokens(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


@pytest.fixture(scope="module")
def alone(tiny_server) -> list[int]:
    """The good request's tokens when it runs by itself."""
    return tokens(httpx.post(tiny_server.url + "/generate", json=GOOD, timeout=60))


@pytest.mark.parametrize("route, body, field", [
    ("/generate", {"inputs": "hi", "parameters": {"top_k": 9223372036854775808, "max_new_tokens": 2}}, "top_k"),
    ("/generate", {"inputs": "hi", "parameters": {"top_k": 2**31, "max_new_tokens": 2}}, "top_k"),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": 1e-320, "max_new_tokens": 2}}, "temperature"),
    ("/generate", {"inputs": "hi", "parameters": {"repetition_penalty": 1e39, "max_new_tokens": 2}},
     "repetition_penalty"),
    ("/generate", {"inputs": "hi", "parameters": {"typical_p": 1e-300, "max_new_tokens": 2}}, "typical_p"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_p": 1e-320}, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                              "temperature": 1e39}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                              "presence_penalty": -1e-310}, "presence_penalty"),
    # integers beyond any machine type: each bounded by its own rule
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2**64}}, "max_new_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"best_of": 2**64, "do_sample": True}}, "best_of"),
    ("/generate", {"inputs": "hi", "parameters": {"top_n_tokens": 2**64}}, "top_n_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"truncate": 2**64}}, "truncate"),
    ("/generate", {"inputs": "hi", "parameters": {"seed": 2**64}}, "seed"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": 2**64}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2**64}, "max_new_tokens"),
])
def test_numbers_outside_the_engine_are_422(tiny, alone, route, body, field):
    with ThreadPoolExecutor(2) as pool:
        mate = pool.submit(tiny.post, "/generate", json=GOOD)
        bad = tiny.post(route, json=body)
        assert bad.status_code == 422, bad.text
        assert bad.json()["error_type"] == "validation" and f"`{field}`" in bad.json()["error"]
        assert tokens(mate.result()) == alone


def test_the_issue_input_in_its_largest_legal_form_works(tiny):
    """The bound is the engine's, not lower: top_k = 2**31 - 1 (TGI's i32 maximum) samples."""
    r = tiny.post("/generate", json={"inputs": "hi", "parameters": {"top_k": 2**31 - 1, "max_new_tokens": 2,
                                                                     "seed": 1}})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def faulty():
    """The faulty tiny model (ids its tokenizer has but its embedding lacks), in a server of this
    module's own: test_failures stops the shared one with SIGTERM."""
    server = ServerProcess("faulty-isolation", ["--model-id", str(model_dir("faulty")),
                                                "--max-batch-total-tokens", "4096"], ONE_THREAD)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def token_ids(url: str, text: str) -> list[int]:
    return [t["id"] for t in httpx.post(url + "/tokenize", json={"inputs": text}, timeout=60).json()]


def poisoned_text(url: str) -> str:
    """A text whose tokens include ids the faulty model's embedding does not have (>= 300)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir("faulty") / "tokenizer.json"))
    for i in range(tok.get_vocab_size() - 1, 300, -1):
        text = tok.decode([i])
        if text.strip() and any(t >= 300 for t in token_ids(url, text)):
            return text
    pytest.skip("no poisonous token found")


@pytest.mark.slow
def test_a_step_failure_fails_only_its_request(faulty):
    """Poisoned prompts share the engine's steps with a good request: they get 424, it gets
    exactly the tokens it gets alone, and the KV cache returns to where it was."""
    url = faulty.url
    poison = poisoned_text(url)
    safe = next((t for t in ("a", "e", "x y z") if all(i < 300 for i in token_ids(url, t))), None)
    assert safe is not None
    body = {"inputs": safe, "parameters": {"max_new_tokens": 24, "details": True}}
    alone = tokens(httpx.post(url + "/generate", json=body, timeout=60))
    used_before = _kv_used(url)
    with ThreadPoolExecutor(4) as pool:
        mate = pool.submit(httpx.post, url + "/generate", json=body, timeout=60)
        bad = [pool.submit(httpx.post, url + "/generate", json={
            "inputs": poison, "parameters": {"max_new_tokens": 3}}, timeout=60) for _ in range(3)]
        for b in bad:
            r = b.result()
            assert r.status_code == 424 and "generation failed" in r.json()["error"], r.text
        assert tokens(mate.result()) == alone
    assert _kv_used(url) == used_before


def _kv_used(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("genserve_kv_blocks_used"):
            return float(line.split()[-1])
    raise AssertionError("no genserve_kv_blocks_used metric")
