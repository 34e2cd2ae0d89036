"""A real ``genserve serve --lora-adapters`` process: requests naming the adapter (TGI
``parameters.adapter_id``, OpenAI ``model``) get the adapter's greedy tokens, others the base's."""

import sys
from pathlib import Path

import httpx
import pytest

from .lorakit import (
    ALL_TARGETS,
    generate,
    load_with_adapters,
    make_adapter,
    runner_fills_lora,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from serverkit import ServerProcess
from tinymodel import build_tiny_llama

NEW_TOKENS = 8
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-http")
    base = build_tiny_llama(root / "tiny")
    adapter = make_adapter(base, root / "adapter", seed=5, target_modules=ALL_TARGETS)
    server = ServerProcess("lora", ["--model-id", str(base), "--max-batch-total-tokens", "4096",
                                    "--enable-prefill-logprobs", "--lora-adapters", f"my={adapter}"],
                           {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    try:
        server.wait_ready()
        yield server, base, adapter
    finally:
        server.stop()


def tgi_ids(server, adapter_id=None):
    params = {"max_new_tokens": NEW_TOKENS, "details": True, "decoder_input_details": True}
    if adapter_id:
        params["adapter_id"] = adapter_id
    r = httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": params}, timeout=60)
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    return [t["id"] for t in details["prefill"]], [t["id"] for t in details["tokens"]]


def test_server_loads_the_adapter(served):
    server, _, _ = served
    assert httpx.get(server.url + "/info").json()["lora_adapters"] == ["my"]
    assert "LoRA: 1 adapter(s) ['my'] on 8 layers" in server.log_tail(200)
    bad = httpx.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "nope"}})
    assert bad.status_code == 422


@pytest.mark.skipif(not runner_fills_lora(), reason="ModelRunner does not fill ForwardBatch.lora yet "
                                                    "(the lead's wiring, see docs/lora.md)")
def test_adapter_requests_get_the_adapter(served):
    server, base, adapter = served
    prompt_ids, base_tokens = tgi_ids(server)
    _, tgi_tokens = tgi_ids(server, "my")
    # The same engine in-process (checked against PEFT in test_lora_parity.py) is the reference.
    engine = load_with_adapters(base, f"my={adapter}")
    want_base, want_adapter = generate(engine, [(prompt_ids, None), (prompt_ids, "my")], NEW_TOKENS)
    assert base_tokens == want_base
    assert tgi_tokens == want_adapter
    assert want_adapter != want_base

    r = httpx.post(server.url + "/v1/completions", json={
        "model": "my", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "my"
    text = r.json()["choices"][0]["text"]
    g = httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": NEW_TOKENS, "adapter_id": "my"}}, timeout=60).json()["generated_text"]
    assert text == g
