"""Speculative-decoding flags that cannot be served are refused at start-up, not ignored
(--speculate was refused as a whole before issue 14; what remains refused is tested here)."""

import pytest

from genserve.args import defaults
from genserve.engine.build import build_engine
from genserve.errors import ConfigError
from genserve.spec_decode.build import resolve
from genserve.testing import save_reference

from .tinyllama import tiny_llama_config


def test_bad_counts_are_refused():
    with pytest.raises(ConfigError, match="--speculate -1: must be >= 0"):
        resolve(defaults(speculate=-1), None)
    with pytest.raises(ConfigError, match="--speculative-max-batch-size 0: must be >= 1"):
        resolve(defaults(speculate=2, speculative_max_batch_size=0), None)
    assert resolve(defaults(), None) is None


def test_speculate_zero_means_off():
    args = defaults(model_id="/nonexistent/model", backend="cpu", speculate=0)
    with pytest.raises(Exception) as info:  # gets as far as resolving the model
        build_engine(args)
    assert "speculate" not in str(info.value)


@pytest.fixture(scope="module")
def medusa_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("medusa-like")
    cfg = tiny_llama_config()
    cfg.medusa_num_heads, cfg.medusa_num_layers = 2, 1
    save_reference(cfg, folder)
    return folder


def flags(folder, **kw):
    return defaults(model_id=str(folder), backend="cpu", dtype="float32", max_batch_total_tokens=256, **kw)


def test_medusa_config_without_heads_is_refused_clearly(medusa_like):
    # The config promises heads that the folder does not hold (tests/engine/test_speculative_heads.py
    # serves real ones); a checkpoint with medusa_num_heads uses them by default, as in TGI.
    with pytest.raises(ConfigError, match="medusa_num_heads but .*medusa_lm_head.safetensors does not exist"):
        build_engine(flags(medusa_like, speculate=2))
    with pytest.raises(ConfigError, match="medusa_lm_head.safetensors does not exist"):
        build_engine(flags(medusa_like))
    # Asked for explicitly, n-gram proposals serve the same checkpoint.
    engine = build_engine(flags(medusa_like, speculate=2, speculative_method="ngram")).engine
    assert engine.speculator is not None


def test_unknown_method_and_foreign_draft_are_refused(medusa_like, tmp_path):
    with pytest.raises(ConfigError, match="speculative method 'lookahead' is not available"):
        build_engine(flags(medusa_like, speculate=2, speculative_method="lookahead"))
    cfg = tiny_llama_config()
    cfg.vocab_size = 300
    save_reference(cfg, tmp_path)
    with pytest.raises(ConfigError, match="vocabulary of 300 tokens"):
        build_engine(flags(medusa_like, speculative_model=str(tmp_path), speculative_method="draft_model"))
    with pytest.raises(ConfigError, match="--speculate 0 turns speculation off"):
        build_engine(flags(medusa_like, speculate=0, speculative_model=str(tmp_path)))
