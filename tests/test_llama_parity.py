"""Our Llama equals transformers' on tiny random configs (logits and greedy tokens)."""

import pytest
from transformers import LlamaConfig

from genserve.testing import assert_matches_transformers


def tiny_llama(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "num_key_value_heads": 4},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128}},
], ids=["gqa", "tied-mha", "llama3-rope"])
def test_llama_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_llama(**overrides), tmp_path)
    assert report.max_logit_diff < 1e-3
    assert report.prefix_cache_hit_tokens > 0  # the shared-prefix prompts reused blocks


def test_llama_reference_attention_matches(tmp_path):
    assert_matches_transformers(tiny_llama(), tmp_path, attention="reference")


def test_llama_chunked_prefill_and_preemption(tmp_path):
    # A tiny cache (96 tokens) and 8-token prefill chunks force chunking and preemption.
    report = assert_matches_transformers(tiny_llama(), tmp_path, max_batch_prefill_tokens=8,
                                         max_batch_total_tokens=96, max_total_tokens=96,
                                         max_input_tokens=80)
    assert report.preemptions > 0
