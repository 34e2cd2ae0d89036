"""Quantized checkpoints sharded over 2 ranks (gloo, CPU) compute what 1 rank does: the loaders
narrow packed tensors from their declared dimensions (GPTQ packs the input, AWQ the output)."""

import pytest
from genserve.testing import generate_greedy, load_genserve, make_prompts, prompt_logits

from tests.quant.ckpt import write_quantized

from .conftest import tiny_llama


@pytest.mark.parametrize("fmt,group,act", [("gptq", 32, True), ("awq", 64, False)], ids=["gptq-act-order", "awq"])
def test_quantized_sharded_matches_unsharded(tmp_path, build_sharded, fmt, group, act):
    config = tiny_llama(hidden_size=128, intermediate_size=256)
    folder = tmp_path / "ckpt"
    write_quantized(config, folder, fmt, 4, group, sym=False, act_order=act)
    plain = load_genserve(folder)
    sharded = build_sharded(folder)
    prompts = make_prompts(config.vocab_size)
    for p in prompts:
        diff = (prompt_logits(sharded, p) - prompt_logits(plain, p)).abs().max().item()
        assert diff < 1e-4, f"sharded logits differ by {diff:.2e}"
    want = [generate_greedy(plain, [p], 12)[0] for p in prompts]
    assert [generate_greedy(sharded, [p], 12)[0] for p in prompts] == want
    assert generate_greedy(sharded, prompts, 12, join_every=3) == want
    down = sharded.runner.model.layers[0].mlp.down_proj  # rank 0 holds half of the input rows
    assert down.in_features == 128 and down.quant.wconfig.in_features == 128
