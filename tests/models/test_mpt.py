"""Our MPT equals transformers' on tiny random configs (ALiBi, clip_qkv, no biases)."""

import pytest
from transformers import MptConfig

from genserve.testing import assert_matches_transformers, make_prompts


def tiny_mpt(**overrides):
    cfg = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=512)
    cfg.update(overrides)
    return MptConfig(**cfg)


# A 70-token prompt plus 20 new tokens spans 23 four-token blocks: ALiBi's distance term
# has to be right across blocks, chunks (64-token prefill budget) and prefix-cache hits.
LONG_PROMPTS = make_prompts(256, lengths=(5, 23, 9, 70))


@pytest.mark.parametrize("overrides", [
    {},
    # MPT-7B/30B clamp qkv (tight here so the clamp bites); a custom softmax scale; untied head.
    {"attn_config": {"clip_qkv": 0.05, "softmax_scale": 0.3}, "tie_word_embeddings": False},
    {"d_model": 96, "n_heads": 6},  # not a power of two: interleaved extra slopes
], ids=["mpt", "clip-qkv-scale", "six-heads"])
def test_mpt_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_mpt(**overrides), tmp_path, prompts=LONG_PROMPTS)
    assert report.prefix_cache_hit_tokens > 0


def test_mpt_reference_attention(tmp_path):
    assert_matches_transformers(tiny_mpt(), tmp_path, prompts=LONG_PROMPTS, attention="reference")
