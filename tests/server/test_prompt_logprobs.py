"""decoder_input_details through TGI's own client, on a server started without
--enable-prefill-logprobs (issue 16, item 9): the prompt logprobs equal transformers'."""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import ONE_THREAD
from serverkit import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def plain_server(tiny_dir):
    """The tiny model with prefix caching and no --enable-prefill-logprobs (the limited server
    has none of that flag either, but its LoRA adapter turns prefix caching off)."""
    server = ServerProcess("plain", ["--model-id", str(tiny_dir), "--max-batch-total-tokens", "4096"],
                           ONE_THREAD)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def reference(model, ids: list[int]) -> list[float]:
    logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [logprobs[i - 1, t].item() for i, t in enumerate(ids) if i]


def test_text_generation_client_gets_prompt_logprobs_without_the_flag(plain_server, reference_model):
    text_generation = pytest.importorskip("text_generation")
    client = text_generation.Client(plain_server.url, timeout=60)

    def tokenize(text: str) -> list[int]:
        return [t["id"] for t in httpx.post(plain_server.url + "/tokenize", json={"inputs": text}).json()]

    ids = tokenize(PROMPT)
    expected = reference(reference_model, ids)
    # First without details (the prompt's blocks go to the prefix cache), then twice with them:
    # a prompt already cached still gets every row computed.
    plain = client.generate(PROMPT, max_new_tokens=4)
    assert client.generate(PROMPT, max_new_tokens=4).generated_text == plain.generated_text  # a hit
    for _ in range(2):
        out = client.generate(PROMPT, max_new_tokens=4, decoder_input_details=True)
        assert out.generated_text == plain.generated_text
        prefill = out.details.prefill
        assert [t.id for t in prefill] == ids
        assert prefill[0].logprob is None
        assert [t.logprob for t in prefill[1:]] == pytest.approx(expected, abs=1e-3)
    # A longer prompt sharing that prefix: its own logprobs, not the cached request's.
    longer = PROMPT + " it was tired"
    ids2 = tokenize(longer)
    out = client.generate(longer, max_new_tokens=2, decoder_input_details=True)
    assert [t.logprob for t in out.details.prefill[1:]] == pytest.approx(reference(reference_model, ids2),
                                                                          abs=1e-3)
    # the prompt was in the prefix cache: the second plain request hit it
    hit_rate = [line for line in httpx.get(plain_server.url + "/metrics").text.splitlines()
                if line.startswith("genserve_prefix_cache_hit_rate")]
    assert hit_rate and float(hit_rate[0].split()[-1]) > 0


def test_truncated_prompt_logprobs_need_no_flag(limited):
    """Raw HTTP, no flag, a truncated prompt: one prefill entry per kept token."""
    r = limited.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 2, "truncate": 5, "decoder_input_details": True, "details": True}})
    assert r.status_code == 200, r.text
    assert len(r.json()["details"]["prefill"]) == 5
