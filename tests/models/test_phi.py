"""Phi-1/1.5/2 (parallel attention + MLP, partial rotary, LayerNorm, biased LM head)."""

import pytest
from transformers import PhiConfig

from genserve.testing import assert_matches_transformers


def tiny_phi(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=512, layer_norm_eps=1e-5,
               partial_rotary_factor=0.5, hidden_act="gelu_new", tie_word_embeddings=False)
    cfg.update(overrides)
    return PhiConfig(**cfg)


@pytest.mark.parametrize("overrides", [
    {},
    {"partial_rotary_factor": 0.25, "num_key_value_heads": 2},
    {"qk_layernorm": True},
], ids=["phi2", "quarter-rotary-gqa", "qk-layernorm"])
def test_phi_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_phi(**overrides), tmp_path)
    assert report.max_logit_diff < 1e-3


def test_phi_chunked_prefill_and_preemption(tmp_path):
    report = assert_matches_transformers(tiny_phi(), tmp_path, max_batch_prefill_tokens=8,
                                         max_batch_total_tokens=96, max_total_tokens=96,
                                         max_input_tokens=80)
    assert report.preemptions > 0
