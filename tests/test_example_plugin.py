"""The example model plugin (plugins/genserve-example-model) is found and served like a built-in.

Needs ``pip install -e plugins/genserve-example-model --no-deps``; skipped otherwise.
"""

from importlib.metadata import entry_points

import pytest

pytest.importorskip("genserve_example_model", reason="pip install -e plugins/genserve-example-model --no-deps")

from transformers import GPTJConfig  # noqa: E402

from genserve.plugins import load_plugins  # noqa: E402
from genserve.testing import assert_matches_transformers  # noqa: E402


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="genserve")}
    assert eps.get("example") == "genserve_example_model.plugin"


def test_plugin_registers_its_architecture(monkeypatch):
    monkeypatch.delenv("GENSERVE_PLUGINS", raising=False)
    plugins = load_plugins()
    info = next(i for i in plugins.infos if i.name == "example")
    assert not info.builtin and info.error is None
    assert info.registered == {"architectures": ["gptj"]}
    assert plugins.architectures.owner("gptj") == "example"
    load_plugins()  # loading again (as every tensor-parallel worker does) is harmless


def test_allow_list_leaves_it_out(monkeypatch):
    monkeypatch.setenv("GENSERVE_PLUGINS", "someone-else")
    assert "gptj" not in load_plugins().architectures
    monkeypatch.setenv("GENSERVE_PLUGINS", "example")
    assert "gptj" in load_plugins().architectures


def test_plugin_model_is_served(tmp_path):
    """The engine builds the plugin's GPT-J from a checkpoint and matches transformers."""
    config = GPTJConfig(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, rotary_dim=8,
                        tie_word_embeddings=False)
    report = assert_matches_transformers(config, tmp_path)
    assert report.max_logit_diff < 1e-3
