"""Sharded engines for the tensor-parallel tests: 2 ranks over gloo, always shut down."""

import pytest
from transformers import LlamaConfig

from genserve.testing import load_genserve


def tiny_llama(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


@pytest.fixture(autouse=True)
def short_shard_timeout(monkeypatch):
    """A broken mirror of rank 0's collectives fails within a minute instead of five."""
    monkeypatch.setenv("GENSERVE_SHARD_TIMEOUT", "30")


@pytest.fixture
def build_sharded():
    """``build_sharded(folder, **flags)``: a 2-rank engine whose worker is stopped after the test."""
    engines = []

    def build(folder, **flags):
        engine = load_genserve(folder, num_shard=2, **flags)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.runner.peers.shutdown()
