"""Adapters on a model sharded over 2 ranks (gloo, CPU) equal PEFT's: B split by output rows in
column-parallel layers (incl. fused qkv with replicated KV heads), A split by input columns in
row-parallel ones, and the workers learn each step's adapters from rank 0."""

import pytest
from genserve.testing import make_prompts, reference_greedy

from .lorakit import (
    ALL_TARGETS,
    batch_logits,
    generate,
    load_with_adapters,
    make_adapter,
    peft_model,
    reference_logits,
    save_base,
    tiny_llama,
)


@pytest.fixture(autouse=True)
def short_shard_timeout(monkeypatch):
    monkeypatch.setenv("GENSERVE_SHARD_TIMEOUT", "30")


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 1}], ids=["gqa", "mqa-replicated-kv"])
def test_sharded_adapters_match_peft(tmp_path, overrides):
    base = save_base(tmp_path / "base", tiny_llama(**overrides))
    dirs = {"alpha": make_adapter(base, tmp_path / "alpha", seed=1, target_modules=ALL_TARGETS),
            "beta": make_adapter(base, tmp_path / "beta", seed=2, r=6, target_modules=["k_proj", "up_proj", "o_proj"])}
    refs = {name: peft_model(base, dirs.get(name)) for name in ("base", "alpha", "beta")}
    engine = load_with_adapters(base, ",".join(f"{k}={v}" for k, v in dirs.items()), num_shard=2)
    try:
        qkv = engine.runner.model.layers[0].self_attn.qkv_proj
        assert qkv.lora.b.shape[1] == qkv.out_features < 64 + 2 * 16 * 2  # this rank's rows only
        down = engine.runner.model.layers[0].mlp.down_proj
        assert down.lora.a.shape[2] == down.in_features == 64  # half of intermediate_size

        ps = make_prompts(256, lengths=(5, 19, 9), shared_prefix=4)
        items = [(ps[0], "alpha"), (ps[1], None), (ps[2], "beta"), (ps[1], "alpha")]
        for (p, a), ours in zip(items, batch_logits(engine, items)):
            diff = (ours - reference_logits(refs[a or "base"], p)).abs().max().item()
            assert diff <= 1e-3, f"adapter {a}: sharded logits differ by {diff:.2e}"
        want = [reference_greedy(refs[a or "base"], p, 8) for p, a in items]
        assert generate(engine, items, 8, join_every=2) == want
        # A step with no adapter rows on rank 0 must also be one on the workers.
        assert generate(engine, [(ps[2], None)], 8) == [reference_greedy(refs["base"], ps[2], 8)]
    finally:
        engine.runner.peers.shutdown()


def test_sharded_slots_evict_and_reload(tmp_path):
    """Three adapters in one device slot on 2 ranks: rank 0 chooses the slot loads and sends
    them with each step, so every rank copies the same adapter into the same slot; requests
    that need another adapter wait for the slot; every output equals PEFT's."""
    base = save_base(tmp_path / "base", tiny_llama())
    dirs = {"alpha": make_adapter(base, tmp_path / "alpha", seed=1, target_modules=ALL_TARGETS),
            "beta": make_adapter(base, tmp_path / "beta", seed=2, r=6, target_modules=["k_proj", "up_proj", "o_proj"]),
            "gamma": make_adapter(base, tmp_path / "gamma", seed=3, r=2, target_modules=["v_proj", "down_proj"])}
    refs = {name: peft_model(base, dirs.get(name)) for name in ("base", "alpha", "beta", "gamma")}
    engine = load_with_adapters(base, ",".join(f"{k}={v}" for k, v in dirs.items()), num_shard=2,
                                max_loras=1)
    try:
        assert engine.runner.lora.max_loras == 1
        ps = make_prompts(256, lengths=(5, 19, 9), shared_prefix=4)
        items = [(ps[0], "alpha"), (ps[1], "gamma"), (ps[2], "beta"), (ps[1], None), (ps[2], "alpha")]
        want = [reference_greedy(refs[a or "base"], p, 6) for p, a in items]
        assert generate(engine, items, 6, join_every=1) == want
        assert engine.runner.lora.table.loads >= 3  # each adapter in turn through the one slot
    finally:
        engine.runner.peers.shutdown()
