"""Our GPT-NeoX (Pythia) equals transformers' on tiny random configs."""

import pytest
from transformers import GPTNeoXConfig

from genserve.testing import assert_matches_transformers


def tiny_neox(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25)
    cfg.update(overrides)
    return GPTNeoXConfig(**cfg)


@pytest.mark.parametrize("overrides", [
    {},  # Pythia: a quarter of each head rotated, parallel residual
    {"use_parallel_residual": False, "rotary_pct": 0.5, "tie_word_embeddings": True,
     "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
], ids=["pythia", "sequential-linear-rope"])
def test_gpt_neox_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_neox(**overrides), tmp_path)
    assert report.prefix_cache_hit_tokens > 0
