"""Gemma and Gemma 2 equal transformers' on tiny random configs."""

import pytest
from transformers import Gemma2Config, GemmaConfig

from genserve.testing import assert_matches_transformers

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1)


@pytest.mark.parametrize("overrides", [
    {},
    {"num_key_value_heads": 1, "head_dim": 32},  # MQA like gemma-2b; head_dim != hidden / heads
], ids=["gqa", "mqa-wide-heads"])
def test_gemma_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(GemmaConfig(**{**BASE, **overrides}), tmp_path)
    assert report.max_logit_diff < 1e-3


def tiny_gemma2(**overrides):
    # Softcaps small enough to bend the random model's scores and logits; an 8-token window on
    # the even layers, which prompts of up to 52 tokens plus 20 new ones run far past.
    cfg = dict(BASE, query_pre_attn_scalar=24, attn_logit_softcapping=1.5, final_logit_softcapping=2.0,
               sliding_window=8)
    cfg.update(overrides)
    return Gemma2Config(**cfg)


@pytest.mark.parametrize("flags", [{}, {"max_batch_prefill_tokens": 6}], ids=["default", "chunked-prefill"])
def test_gemma2_matches_transformers(tmp_path, flags):
    config = tiny_gemma2()
    assert config.layer_types == ["sliding_attention", "full_attention"]
    report = assert_matches_transformers(config, tmp_path, **flags)
    assert report.max_logit_diff < 1e-3


def test_gemma2_without_softcap(tmp_path):
    # No softcap lets the CPU attention take its SDPA path instead of the reference maths.
    assert_matches_transformers(tiny_gemma2(attn_logit_softcapping=None, final_logit_softcapping=None),
                                tmp_path)
