"""Adapters genserve cannot apply exactly are refused at startup, naming the adapter and why."""

import json

import pytest
from genserve.errors import ConfigError
from genserve.lora import spec

from .lorakit import load_with_adapters, make_adapter, save_base, tiny_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("lora-errors") / "base")


@pytest.mark.parametrize("lora_config, reason", [
    ({"target_modules": ["q_proj", "lm_head"]}, "target 'lm_head': LoRA on embeddings and the LM head is not supported"),
    ({"target_modules": ["embed_tokens"]}, "target 'embed_tokens': LoRA on embeddings and the LM head is not supported"),
    ({"target_modules": ["q_proj"], "use_dora": True}, "DoRA (use_dora) is not supported"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head'] is not supported"),
    ({"target_modules": ["v_proj"], "bias": "lora_only"}, "bias='lora_only' is not supported"),
], ids=["lm_head", "embed_tokens", "dora", "modules_to_save", "bias"])
def test_unsupported_adapter_fails_at_startup(base, tmp_path, lora_config, reason):
    adapter = make_adapter(base, tmp_path / "bad", seed=3, **lora_config)
    with pytest.raises(ConfigError) as err:
        load_with_adapters(base, f"bad={adapter}")
    assert str(err.value).startswith("LoRA adapter 'bad': ")
    assert reason in str(err.value)


def test_unsupported_tensors_are_named(base, tmp_path):
    """Older or hand-made adapters may lack the config entries: the tensors still give it away."""
    adapter = make_adapter(base, tmp_path / "lm", seed=3, target_modules=["q_proj", "lm_head"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with pytest.raises(ConfigError, match="LoRA adapter 'lm': tensor 'base_model.model.lm_head.*"
                                          "full base-model tensor"):
        load_with_adapters(base, f"lm={adapter}")


def test_adapter_for_another_model_fails(base, tmp_path):
    other = save_base(tmp_path / "other", tiny_llama(intermediate_size=96))
    adapter = make_adapter(other, tmp_path / "other-adapter", seed=4, target_modules=["gate_proj"])
    with pytest.raises(ConfigError, match=r"LoRA adapter 'other': module 'model.layers.0.mlp.gate_proj' "
                                          r".*does not fit the base model's layer"):
        load_with_adapters(base, f"other={adapter}")


def test_missing_files(base, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="LoRA adapter 'e': .* has no adapter_config.json"):
        load_with_adapters(base, f"e={tmp_path / 'empty'}")
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(ConfigError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        load_with_adapters(base, f"e={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="LoRA adapter 'x': /nonexistent/dir is not a directory"):
        load_with_adapters(base, "x=/nonexistent/dir")
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="peft_type IA3 is not supported"):
        load_with_adapters(base, f"e={tmp_path / 'empty'}")


def test_hub_ids_are_downloaded(monkeypatch, tmp_path):
    """A bare id (or id=repo) that is not a local directory goes to snapshot_download (faked here:
    no network in tests)."""
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    adapters = spec.parse_lora_adapters("org/adapter-a, mine=org/adapter-b, local=" + str(tmp_path))
    assert adapters == {"org/adapter-a": None, "mine": "org/adapter-b", "local": str(tmp_path)}
    for aid, source in adapters.items():
        assert spec.resolve_adapter_dir(aid, source) == tmp_path
    assert [c[0] for c in calls] == ["org/adapter-a", "org/adapter-b"]
    assert "adapter_config.json" in calls[0][1]
