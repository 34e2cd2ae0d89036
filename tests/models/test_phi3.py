"""Phi-3 (the Llama module loading fused qkv_proj / gate_up_proj) equals transformers'."""

import pytest
from safetensors import safe_open
from transformers import Phi3Config

from genserve.testing import assert_matches_transformers


def tiny_phi3(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
    cfg.update(overrides)
    return Phi3Config(**cfg)


@pytest.mark.parametrize("overrides", [
    {},
    {"sliding_window": 8},
    # Phi-4-mini rotates 3/4 of each head.
    {"partial_rotary_factor": 0.75, "num_key_value_heads": 4},
], ids=["gqa", "sliding", "partial-rotary"])
def test_phi3_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_phi3(**overrides), tmp_path)
    assert report.max_logit_diff < 1e-3
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # the fused layout was exercised
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
