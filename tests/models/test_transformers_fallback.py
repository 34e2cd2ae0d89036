"""Architectures no genserve module registers are served through transformers' modelling code
with genserve's paged attention (``models/transformers_fallback.py``): logits and greedy tokens
equal transformers', alone and in a continuously batched mix with prefix-cache hits."""

from __future__ import annotations

import logging

import pytest
import transformers as tf

from genserve.args import defaults
from genserve.engine.build import ConfigError, build_engine
from genserve.models.transformers_fallback import TransformersForCausalLM
from genserve.testing import assert_matches_transformers, save_reference

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
CONFIGS = {
    # q/k RMSNorm per head, an explicit head_dim
    "qwen3": lambda: tf.Qwen3Config(**SMALL, head_dim=16),
    # biases, LayerNorm, a sliding window of 8 tokens on every layer
    "starcoder2": lambda: tf.Starcoder2Config(**SMALL, sliding_window=8),
    # scaled embeddings, residuals and attention, logits divided after the LM head
    "granite": lambda: tf.GraniteConfig(**SMALL, logits_scaling=2.0, residual_multiplier=0.5,
                                        embedding_multiplier=2.0, attention_multiplier=0.2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fallback_matches_transformers(name, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="genserve.models.transformers_fallback"):
        report = assert_matches_transformers(CONFIGS[name](), tmp_path)
    assert "transformers fallback" in caplog.text
    assert report.prefix_cache_hit_tokens > 0  # the batched mix reused cached blocks


def test_model_impl_transformers_serves_a_registered_type_too(tmp_path):
    report = assert_matches_transformers(tf.LlamaConfig(**SMALL), tmp_path, model_impl="transformers")
    assert report.greedy_single == report.reference


def _build(folder, **flags):
    return build_engine(defaults(model_id=str(folder), backend="cpu", dtype="float32",
                                 max_batch_total_tokens=1024, **flags))


def test_model_impl_genserve_refuses_an_unregistered_type(tmp_path):
    save_reference(CONFIGS["qwen3"](), tmp_path)
    with pytest.raises(ConfigError, match="'qwen3' is not supported by any installed plugin"):
        _build(tmp_path, model_impl="genserve")


def test_the_fallback_is_chosen_for_unregistered_types_only(tmp_path):
    save_reference(CONFIGS["qwen3"](), tmp_path / "q")
    save_reference(tf.LlamaConfig(**SMALL), tmp_path / "l")
    assert isinstance(_build(tmp_path / "q").engine.runner.model, TransformersForCausalLM)
    assert not isinstance(_build(tmp_path / "l").engine.runner.model, TransformersForCausalLM)


@pytest.mark.parametrize("make, why", [
    (lambda: tf.MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=4),
     "no num_attention_heads"),
    (lambda: tf.JambaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                            num_experts=2, mamba_d_state=4, use_mamba_kernels=False),
     "mixed layer kinds"),
])
def test_models_without_attention_on_every_layer_are_refused(tmp_path, make, why):
    """State-space layers would mix the flat rows of different sequences: refused, with why."""
    save_reference(make(), tmp_path)
    with pytest.raises(ConfigError, match=why):
        _build(tmp_path)


def test_encoder_decoder_types_without_a_module_are_refused(tmp_path):
    config = tf.BartConfig(vocab_size=256, d_model=64, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    save_reference(config, tmp_path, model_cls=tf.BartForConditionalGeneration)
    with pytest.raises(ConfigError, match="encoder-decoder"):
        _build(tmp_path)
