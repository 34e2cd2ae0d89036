"""Our OPT (and Galactica, which is OPT) equals transformers' on tiny random configs."""

import pytest
from transformers import OPTConfig

from genserve.testing import assert_matches_transformers


def tiny_opt(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=512)
    cfg.update(overrides)
    return OPTConfig(**cfg)


@pytest.mark.parametrize("overrides", [
    {},
    # OPT-350m: post-norm layers, no final norm, narrower word embeddings projected in and out.
    {"do_layer_norm_before": False, "word_embed_proj_dim": 32},
    # Galactica's gelu, with the rarer flags: no biases, LayerNorms without parameters, untied head.
    {"activation_function": "gelu", "enable_bias": False, "layer_norm_elementwise_affine": False,
     "tie_word_embeddings": False},
], ids=["opt", "opt-350m-style", "galactica-gelu-bare"])
def test_opt_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_opt(**overrides), tmp_path)
    assert report.prefix_cache_hit_tokens > 0
