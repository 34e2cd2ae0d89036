"""Fixtures shared by the engine tests."""

import pytest

from genserve.testing import save_reference

from .tinyllama import tiny_llama_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, transformers model) of a tiny random Llama saved as safetensors."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, save_reference(tiny_llama_config(), folder)
