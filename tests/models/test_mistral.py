"""Mistral (the Llama module with a sliding window) equals transformers' on tiny configs."""

import pytest
from transformers import MistralConfig

from genserve.testing import assert_matches_transformers


def tiny_mistral(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=8)
    cfg.update(overrides)
    return MistralConfig(**cfg)


# Prompts of 5-52 tokens plus 20 generated tokens: every request runs past the 8-token window,
# in prefill, across prefill chunks and while decoding through the paged cache.
@pytest.mark.parametrize("flags", [
    {},
    {"attention": "reference"},
    {"max_batch_prefill_tokens": 6, "block_size": 2},
], ids=["torch", "reference", "chunked-prefill"])
def test_mistral_sliding_window(tmp_path, flags):
    report = assert_matches_transformers(tiny_mistral(), tmp_path, **flags)
    assert report.max_logit_diff < 1e-3


def test_mistral_window_matters(tmp_path):
    """The tiny window changes the model's output, so the tests above do test the window."""
    import torch

    from genserve.testing import load_genserve, prompt_logits, save_reference

    prompt = list(range(3, 40))
    save_reference(tiny_mistral(), tmp_path / "w8")
    save_reference(tiny_mistral(sliding_window=None), tmp_path / "full")
    windowed = prompt_logits(load_genserve(tmp_path / "w8"), prompt)
    full = prompt_logits(load_genserve(tmp_path / "full"), prompt)
    assert torch.allclose(windowed[:8], full[:8], atol=1e-5)  # same weights, same first window
    assert (windowed[8:] - full[8:]).abs().max() > 1e-2


def test_mistral_without_window(tmp_path):
    assert_matches_transformers(tiny_mistral(sliding_window=None), tmp_path)
