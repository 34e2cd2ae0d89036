"""LoRA adapters in genserve equal PEFT's on a tiny random Llama (logits and greedy tokens)."""

import pytest
import torch
from genserve.layers.linear import LinearBase
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
)

ATOL = 1e-3
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = save_base(root / "base")
    return {
        "base": base,
        # Every projection of attention and MLP: q/k/v land in the fused qkv_proj, gate/up in
        # gate_up_proj, o/down are row-parallel.
        "alpha": make_adapter(base, root / "alpha", seed=1, target_modules=ALL_TARGETS),
        # Another rank and scaling rule, a partial set of targets (q and v of qkv_proj but not
        # k; down_proj but not gate_up_proj), a per-module rank and alpha.
        "beta": make_adapter(base, root / "beta", seed=2, r=8, lora_alpha=4, use_rslora=True,
                             target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 24}),
    }


@pytest.fixture(scope="module")
def references(files):
    return {name: peft_model(files["base"], None if name == "base" else files[name])
            for name in ("base", "alpha", "beta")}


@pytest.fixture(scope="module")
def engine(files):
    return load_with_adapters(files["base"], f"alpha={files['alpha']},beta={files['beta']}")


def prompts():
    return make_prompts(256, lengths=(5, 23, 9, 17), shared_prefix=6)


def test_adapters_change_the_model(references):
    """Guards the other tests: were the adapters no-ops, parity with PEFT would prove nothing."""
    p = prompts()[1]
    base = reference_logits(references["base"], p)
    for name in ("alpha", "beta"):
        assert (reference_logits(references[name], p) - base).abs().max().item() > 0.05, name


def test_one_adapter_matches_peft(files, references):
    engine = load_with_adapters(files["base"], f"alpha={files['alpha']}")
    ref = references["alpha"]
    for p in prompts():
        (ours,) = batch_logits(engine, [(p, "alpha")])
        diff = (ours - reference_logits(ref, p)).abs().max().item()
        assert diff <= ATOL, f"logits differ by {diff:.2e} for a prompt of {len(p)} tokens"
    want = [reference_greedy(ref, p, NEW_TOKENS) for p in prompts()]
    assert generate(engine, [(p, "alpha") for p in prompts()], NEW_TOKENS) == want
    # Without an adapter the same engine is the base model.
    base = references["base"]
    assert generate(engine, [(prompts()[0], None)], NEW_TOKENS) == [reference_greedy(base, prompts()[0], NEW_TOKENS)]


def test_two_adapters_and_none_in_one_forward(engine, references):
    """One flat batch holding rows of alpha, beta and no adapter (each row block must get
    exactly its own delta)."""
    ps = prompts()
    items = [(ps[0], "alpha"), (ps[1], "beta"), (ps[2], None), (ps[3], "alpha"), (ps[1], None)]
    for (p, adapter), ours in zip(items, batch_logits(engine, items)):
        want = reference_logits(references[adapter or "base"], p)
        diff = (ours - want).abs().max().item()
        assert diff <= ATOL, f"adapter {adapter}: logits differ by {diff:.2e} ({len(p)} tokens)"


def test_two_adapters_and_none_greedy_batched(engine, references):
    ps = prompts()
    items = [(ps[0], "alpha"), (ps[1], "beta"), (ps[2], None), (ps[3], "beta"), (ps[0], None)]
    want = [reference_greedy(references[a or "base"], p, NEW_TOKENS) for p, a in items]
    # All at once (shared decode steps), then joining mid-flight (prefills mixed with decodes).
    assert generate(engine, items, NEW_TOKENS) == want
    assert generate(engine, items, NEW_TOKENS, join_every=2) == want
    # The same prompt under different adapters really gives different continuations here.
    assert want[0] != want[4]


def test_prefix_cache_is_shared_per_adapter_only(files, references):
    """Prefix caching stays on with adapters: a block's hash chains from the request's adapter,
    so a repeated prompt hits the cache under the same adapter, and never reuses another
    adapter's (or the base model's) KV. Sequential requests, so every hit is a real reuse."""
    engine = load_with_adapters(files["base"], f"alpha={files['alpha']},beta={files['beta']}")
    assert engine.blocks.enable_prefix_caching
    p = make_prompts(256, lengths=(40,))[0]  # several full blocks
    hits = []
    outputs = []
    for adapter in ("alpha", "beta", None, "alpha", "beta", None):
        before = engine.blocks.hits
        outputs.append(generate(engine, [(p, adapter)], NEW_TOKENS)[0])
        hits.append(engine.blocks.hits - before)
    assert hits[:3] == [0, 0, 0], hits  # alpha, beta and the base each start cold
    assert all(h > 0 for h in hits[3:]), hits  # each one's repeat hits its own blocks
    for out, adapter in zip(outputs, ("alpha", "beta", None, "alpha", "beta", None)):
        assert out == reference_greedy(references[adapter or "base"], p, NEW_TOKENS), adapter


def test_no_adapter_rows_cost_nothing(engine, files):
    runner = engine.runner
    assert runner.lora.batch_for([None, None], [3, 1]) is None  # such a step skips every delta
    step = runner.lora.batch_for(["beta", None, "alpha"], [2, 3, 1])
    assert step.index_cpu.tolist() == [1, 1, -1, -1, -1, 0]
    with pytest.raises(ValueError, match="'gamma' is not loaded"):
        runner.lora.batch_for(["gamma"], [1])
    # Adapters sit on the targeted linear layers only; an engine without adapters has none.
    adapted = {n for n, m in runner.model.named_modules() if getattr(m, "lora", None) is not None}
    assert adapted == {f"layers.{i}.{n}" for i in range(2) for n in
                       ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    plain = load_with_adapters(files["base"], None)
    assert not any(getattr(m, "lora", None) for m in plain.runner.model.modules() if isinstance(m, LinearBase))
    assert getattr(plain.runner, "lora", None) is None


def test_stacked_layout(engine):
    """Each slot holds --max-lora-rank (default: the largest startup rank, beta's 8) per fused
    part, zero-padded; beta's k slice of qkv_proj is untouched."""
    manager = engine.runner.lora
    manager.load_slots(manager.batch_for(["alpha", "beta"], [1, 1]))
    sa, sb = manager.table.slot_of("alpha"), manager.table.slot_of("beta")
    assert {sa, sb} == {0, 1}
    lora = manager.layers["layers.0.self_attn.qkv_proj"]
    # 2 slots (one per startup adapter) of 3 parts x rank 8; alpha: q, k, v at r=4 -> 12
    # columns used; beta: q at 8 + v at 2 -> 10.
    assert tuple(lora.a.shape) == (2, 24, 64)
    assert tuple(lora.b.shape) == (2, 64 + 2 * 32, 24)
    beta_b = lora.b[sb]
    assert beta_b[:, 10:].abs().sum() == 0 and lora.a[sb, 10:].abs().sum() == 0  # padding
    assert lora.b[sa, :, 12:].abs().sum() == 0 and lora.b[sa, :, :12].abs().sum() > 0
    assert beta_b[64:96].abs().sum() == 0  # k rows: beta has no k_proj
    assert beta_b[:64, 8:10].abs().sum() == 0 and beta_b[96:, :8].abs().sum() == 0  # block-diagonal
    assert beta_b[:64, :8].abs().sum() > 0 and beta_b[96:, 8:10].abs().sum() > 0
    assert torch.equal(lora.scales, torch.ones(2))


def test_phi3_fused_checkpoint_projections(tmp_path):
    """Phi-3 holds qkv_proj and gate_up_proj fused in its checkpoint: PEFT adapts the fused
    layers as wholes, and genserve must split their B exactly like the weights."""
    from transformers import Phi3Config

    config = Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, pad_token_id=0)
    base = save_base(tmp_path / "base", config)
    adapter = make_adapter(base, tmp_path / "phi", seed=6, r=4, lora_alpha=16,
                           target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    ref, plain = peft_model(base, adapter), peft_model(base, None)
    engine = load_with_adapters(base, f"phi={adapter}")
    ps = prompts()[:3]
    items = [(ps[0], "phi"), (ps[1], None), (ps[2], "phi")]
    for (p, a), ours in zip(items, batch_logits(engine, items)):
        want = reference_logits(ref if a else plain, p)
        assert (ours - want).abs().max().item() <= ATOL
    assert (reference_logits(ref, ps[0]) - reference_logits(plain, ps[0])).abs().max().item() > 0.05
    assert generate(engine, items, NEW_TOKENS) == [reference_greedy(ref if a else plain, p, NEW_TOKENS)
                                                   for p, a in items]
