"""``--load-format dummy`` with a quantized config: each quant method fills its packed weights with
valid random values (the GPU bench builds a Llama-3-8B-shape GPTQ model this way)."""

import json

import pytest
import torch
from genserve.testing import generate_greedy, load_genserve, prompt_logits
from transformers import LlamaConfig

from .ckpt import quant_config


@pytest.mark.parametrize("fmt,bits,group,sym,act", [
    ("gptq", 4, 128, True, True), ("gptq", 8, 64, False, False), ("awq", 4, 128, False, False),
    ("compressed-tensors", 4, 32, False, True), ("marlin", 4, 128, True, False),
])
def test_dummy_quantized_model_serves(tmp_path, fmt, bits, group, sym, act):
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256).to_dict()
    cfg["quantization_config"] = quant_config(fmt, bits, group, sym, act)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    engine = load_genserve(tmp_path, load_format="dummy")
    layer = engine.runner.model.layers[0].mlp.down_proj
    assert layer.quant.scheme.bits == bits
    logits = prompt_logits(engine, [1, 2, 3, 4, 5])
    assert torch.isfinite(logits).all() and logits.std() > 0
    out = generate_greedy(engine, [[1, 2, 3], [4, 5, 6, 7]], 4)
    assert [len(o) for o in out] == [4, 4]
