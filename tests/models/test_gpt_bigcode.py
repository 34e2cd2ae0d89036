"""Our GPTBigCode (SantaCoder/StarCoder) equals transformers' on tiny random configs."""

import pytest
from transformers import GPTBigCodeConfig

from genserve.testing import assert_matches_transformers


def tiny_bigcode(**overrides):
    cfg = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    cfg.update(overrides)
    return GPTBigCodeConfig(**cfg)


@pytest.mark.parametrize("overrides", [
    {"multi_query": True},  # StarCoder/SantaCoder: one KV head, c_attn is [q; k; v]
    {"multi_query": False, "tie_word_embeddings": False},  # c_attn is [q, k, v] per head
], ids=["multi-query", "multi-head"])
def test_gpt_bigcode_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_bigcode(**overrides), tmp_path)
    assert report.prefix_cache_hit_tokens > 0
