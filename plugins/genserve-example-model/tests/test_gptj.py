"""The plugin's GPT-J equals transformers' GPTJForCausalLM on tiny random configs."""

import pytest
from transformers import GPTJConfig

from genserve.testing import assert_matches_transformers


def tiny_gptj(**overrides):
    cfg = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, rotary_dim=8,
               n_inner=None, activation_function="gelu_new", tie_word_embeddings=False)
    cfg.update(overrides)
    return GPTJConfig(**cfg)


@pytest.mark.parametrize("overrides", [{}, {"rotary_dim": 16}],  # head_dim is 16
                         ids=["partial-rotary", "full-rotary"])
def test_gptj_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_gptj(**overrides), tmp_path)
    assert report.max_logit_diff < 1e-3


def test_gptj_chunked_prefill(tmp_path):
    assert_matches_transformers(tiny_gptj(), tmp_path, max_batch_prefill_tokens=6)
