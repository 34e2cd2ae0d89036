"""Our BLOOM equals transformers' on tiny random configs (ALiBi, fused per-head qkv)."""

import pytest
from transformers import BloomConfig

from genserve.testing import assert_matches_transformers, make_prompts


def tiny_bloom(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-5)
    cfg.update(overrides)
    return BloomConfig(**cfg)


# A 70-token prompt plus 20 new tokens spans 23 four-token blocks: ALiBi's distance term
# has to be right across blocks, chunks (64-token prefill budget) and prefix-cache hits.
LONG_PROMPTS = make_prompts(256, lengths=(5, 23, 9, 70))


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": False, "apply_residual_connection_post_layernorm": True},
    {"hidden_size": 96, "n_head": 6},  # not a power of two: BLOOM's interleaved extra slopes
], ids=["tied", "untied-post-ln-residual", "six-heads"])
def test_bloom_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_bloom(**overrides), tmp_path, prompts=LONG_PROMPTS)
    assert report.prefix_cache_hit_tokens > 0


def test_bloom_reference_attention(tmp_path):
    assert_matches_transformers(tiny_bloom(), tmp_path, prompts=LONG_PROMPTS, attention="reference")
