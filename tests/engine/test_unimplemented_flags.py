"""Flags genserve accepts for TGI's sake but does not implement yet are refused, not ignored."""

import pytest

from genserve.args import defaults
from genserve.engine.build import build_engine
from genserve.errors import ConfigError


def test_speculate_is_refused_before_anything_loads():
    # A model id that does not exist: the refusal must come first, with nothing loaded.
    args = defaults(model_id="/nonexistent/model", backend="cpu", speculate=3)
    with pytest.raises(ConfigError, match="--speculate 3: speculative decoding is not implemented"):
        build_engine(args)


def test_speculate_zero_means_off():
    args = defaults(model_id="/nonexistent/model", backend="cpu", speculate=0)
    with pytest.raises(Exception) as info:  # gets as far as resolving the model
        build_engine(args)
    assert "speculate" not in str(info.value)
