"""A real ``genserve serve`` answering over HTTP from a GPTQ checkpoint auto-round wrote, and the
startup errors for a flag that does not fit the checkpoint."""

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.server.serverkit import ServerProcess, genserve_command

FIXTURE = Path(__file__).parents[1] / "fixtures" / "quant" / "gptq" / "w4-g32-sym"
pytestmark = pytest.mark.skipif(not (FIXTURE / "tokenizer.json").exists(), reason="fixture not generated")


def test_serve_gptq_over_http():
    from genserve.testing import generate_greedy, load_genserve
    from transformers import AutoTokenizer

    server = ServerProcess("gptq", ["--model-id", str(FIXTURE), "--backend", "cpu", "--dtype", "float32",
                                    "--max-batch-total-tokens", "2048", "--max-total-tokens", "200"])
    try:
        server.wait_ready()
        info = httpx.get(server.url + "/info", timeout=30).json()
        assert info["quantize"] == "gptq"
        r = httpx.post(server.url + "/generate", json={"inputs": "the quick brown fox", "parameters": {
            "max_new_tokens": 8, "details": True}}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        tokens = [t["id"] for t in body["details"]["tokens"]]
        assert len(tokens) == 8 and body["details"]["finish_reason"] == "length"
    finally:
        server.stop()
    # The same greedy tokens as the in-process engine on the same checkpoint.
    prompt = AutoTokenizer.from_pretrained(FIXTURE)("the quick brown fox")["input_ids"]
    assert generate_greedy(load_genserve(FIXTURE), [prompt], 8)[0] == tokens


@pytest.mark.parametrize("flag,message", [
    ("awq", "does not match the checkpoint, which is gptq-quantized"),
    ("eetq", "does not match the checkpoint"),
])
def test_flag_that_contradicts_the_checkpoint_is_a_startup_error(flag, message):
    r = subprocess.run(genserve_command() + ["serve", "--model-id", str(FIXTURE), "--backend", "cpu",
                                             "--quantize", flag], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr


def test_gptq_flag_on_an_unquantized_checkpoint_is_a_startup_error(tmp_path):
    from genserve.testing import save_reference
    from transformers import LlamaConfig

    save_reference(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1), tmp_path)
    r = subprocess.run(genserve_command() + ["serve", "--model-id", str(tmp_path), "--backend", "cpu",
                                             "--quantize", "gptq"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "needs a checkpoint already quantized to gptq" in r.stderr and "Traceback" not in r.stderr
