"""Qwen2 (the Llama module: qkv bias, per-layer sliding windows) equals transformers'."""

import pytest
from transformers import Qwen2Config

from genserve.models.llama import LlamaForCausalLM
from genserve.plugins import get_plugins
from genserve.testing import assert_matches_transformers


def tiny_qwen2(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1e6)
    cfg.update(overrides)
    return Qwen2Config(**cfg)


def test_qwen2_is_served_by_llama():
    assert get_plugins().architectures.get("qwen2") is LlamaForCausalLM


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    # Qwen2 slides only on layers >= max_window_layers: layer 1 here, layer 0 stays full.
    {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
], ids=["untied", "tied", "sliding-upper-layers"])
def test_qwen2_matches_transformers(tmp_path, overrides):
    config = tiny_qwen2(**overrides)
    report = assert_matches_transformers(config, tmp_path)
    assert report.max_logit_diff < 1e-3
