"""Our GPT-2 equals transformers' on tiny random configs (Conv1D weights loaded transposed)."""

import pytest
from transformers import GPT2Config

from genserve.testing import assert_matches_transformers


def tiny_gpt2(**overrides):
    cfg = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    cfg.update(overrides)
    return GPT2Config(**cfg)


@pytest.mark.parametrize("overrides", [
    {},
    # Untied head, a non-default MLP width and the per-layer attention scaling of some variants.
    {"tie_word_embeddings": False, "n_inner": 96, "scale_attn_by_inverse_layer_idx": True,
     "activation_function": "relu"},
], ids=["gpt2", "untied-scaled"])
def test_gpt2_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_gpt2(**overrides), tmp_path)
    assert report.prefix_cache_hit_tokens > 0
