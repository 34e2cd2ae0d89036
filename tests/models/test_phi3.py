"""Phi-3 (the Llama module loading fused qkv_proj / gate_up_proj) equals transformers'."""

import inspect
import random

import pytest
import torch
from safetensors import safe_open
from transformers import DynamicCache, Phi3Config, Phi3ForCausalLM

from genserve.attention.base import AttentionMetadata
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.scheduler import ScheduledSeq
from genserve.engine.sequence import Sequence
from genserve.layers.rotary import LongRopeRotaryEmbedding, RotaryEmbedding
from genserve.models.base import ForwardBatch
from genserve.testing import (assert_matches_transformers, generate_greedy, load_genserve,
                              reference_greedy, save_reference)

# transformers 5 renamed ``past_key_values`` to ``cache``.
CACHE_KW = "cache" if "cache" in inspect.signature(Phi3ForCausalLM.forward).parameters else "past_key_values"


def tiny_phi3(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
    cfg.update(overrides)
    return Phi3Config(**cfg)


@pytest.mark.parametrize("overrides", [
    {},
    {"sliding_window": 8},
    # Phi-4-mini rotates 3/4 of each head.
    {"partial_rotary_factor": 0.75, "num_key_value_heads": 4},
], ids=["gqa", "sliding", "partial-rotary"])
def test_phi3_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_phi3(**overrides), tmp_path)
    assert report.max_logit_diff < 1e-3
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # the fused layout was exercised
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names


# -- longrope (Phi-3-mini-128k, Phi-3.5): short factors up to original_max_position_embeddings,
#    long ones beyond, chosen per sequence --------------------------------------------------------

THRESHOLD = 32  # original_max_position_embeddings of the tiny config; max_position_embeddings 256


def longrope_phi3(rotary_dim=16, **overrides):
    """A tiny Phi-3 configured the way the 128k checkpoints are (legacy ``rope_scaling``)."""
    rng = random.Random(7)
    half = rotary_dim // 2
    scaling = {"type": "longrope",
               "short_factor": [round(1 + 0.5 * rng.random(), 4) for _ in range(half)],
               "long_factor": [round(4 + 8 * rng.random(), 4) for _ in range(half)]}
    return tiny_phi3(max_position_embeddings=256, original_max_position_embeddings=THRESHOLD,
                     rope_scaling=scaling, **overrides)


def random_prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def meta_for(seqs, known=None):
    """AttentionMetadata for sequences given as (seq_len after the step, query rows), and
    optionally each one's known length (default: seq_len)."""
    cu = [0]
    for _, q in seqs:
        cu.append(cu[-1] + q)
    pos = [p for s, q in seqs for p in range(s - q, s)]
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32),
        block_tables=torch.zeros(len(seqs), 1, dtype=torch.int32),
        slot_mapping=torch.zeros(len(pos), dtype=torch.long),
        max_seqlen_q=max(q for _, q in seqs), max_seqlen_k=max(s for s, _ in seqs),
        is_decode_only=all(q == 1 for _, q in seqs),
        known_lens=None if known is None else torch.tensor(known, dtype=torch.int32))
    return torch.tensor(pos), meta


def test_longrope_rows_follow_each_sequence_and_match_transformers_tables():
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    cfg = longrope_phi3()
    rope = RotaryEmbedding.from_config(cfg, 16)
    assert isinstance(rope, LongRopeRotaryEmbedding) and rope.cos.shape == (512, 8)
    # A chunk of a short sequence, a long prefill, a decode row at the threshold and one past it.
    seqs = [(20, 5), (40, 40), (THRESHOLD, 1), (THRESHOLD + 1, 1)]
    pos, meta = meta_for(seqs)
    rows = rope.cache_rows(pos, meta)
    long = torch.cat([torch.full((q,), s > THRESHOLD) for s, q in seqs])
    assert torch.equal(rows, pos + 256 * long)
    # Decode-only steps take the comparison shortcut; same answer.
    pos, meta = meta_for([(5, 1), (THRESHOLD, 1), (THRESHOLD + 1, 1), (200, 1)])
    assert rope.cache_rows(pos, meta).tolist() == [4, 31, 32 + 256, 199 + 256]

    # Each sequence's rows are transformers' cos/sin for that sequence alone.
    ref = Phi3RotaryEmbedding(cfg)
    pos, meta = meta_for(seqs)
    rows = rope.cache_rows(pos, meta)
    start = 0
    for s, q in seqs:
        cos, sin = ref(torch.zeros(1), torch.arange(s)[None])
        torch.testing.assert_close(rope.cos[rows[start:start + q]], cos[0, s - q:, :8], rtol=0, atol=1e-6)
        torch.testing.assert_close(rope.sin[rows[start:start + q]], sin[0, s - q:, :8], rtol=0, atol=1e-6)
        start += q
    assert ref.attention_scaling > 1  # mscale from 256 / 32 is applied to both tables
    torch.testing.assert_close(rope.cos[0, 0].item(), ref.attention_scaling)
    torch.testing.assert_close(rope.cos[256, 0].item(), ref.attention_scaling)


def test_longrope_rows_follow_the_known_length_not_the_chunk_end():
    """Prefill chunks of a prompt longer than the threshold take the long table from the first
    chunk on (transformers sees the whole prompt in one forward); a chunk of a short prompt and
    a decode row in the same step keep their own choice."""
    rope = RotaryEmbedding.from_config(longrope_phi3(), 16)
    assert rope.recompute_at_length == THRESHOLD + 1
    seqs, known = [(16, 16), (32, 16), (20, 5), (THRESHOLD, 1)], [45, 45, 30, THRESHOLD]
    pos, meta = meta_for(seqs, known)
    long = torch.cat([torch.full((q,), k > THRESHOLD) for (_, q), k in zip(seqs, known)])
    assert long[:32].all() and not long[32:].any()
    assert torch.equal(rope.cache_rows(pos, meta), pos + 256 * long)


@pytest.mark.parametrize("overrides", [{}, {"partial_rotary_factor": 0.75, "num_key_value_heads": 4}],
                         ids=["full", "partial-rotary"])
def test_phi3_longrope_matches_transformers(tmp_path, overrides):
    """A prompt past the threshold, generating further past it, and a short one that stays
    under it: logits and greedy tokens alone and continuously batched equal transformers'."""
    cfg = longrope_phi3(rotary_dim=12 if overrides else 16, **overrides)
    prompts = [random_prompt(THRESHOLD + 13, 1), random_prompt(9, 2)]  # 45 + 20, 9 + 20 <= 32
    report = assert_matches_transformers(cfg, tmp_path, prompts=prompts, max_new_tokens=20,
                                         max_batch_prefill_tokens=256)
    assert report.max_logit_diff < 1e-3


def _reference_ignoring_long_factors(tmp_path, cfg):
    """transformers on the same weights with the long factors ignored (genserve's old behaviour)."""
    from transformers import AutoModelForCausalLM

    params = dict(cfg.rope_parameters, long_factor=cfg.rope_parameters["short_factor"])
    same = AutoModelForCausalLM.from_pretrained(tmp_path, rope_parameters=params, dtype=torch.float32)
    return same.eval()


@torch.inference_mode()
def test_phi3_longrope_batch_rows_match_single_sequence_runs(tmp_path):
    """One step holding a short and a long prompt: each sequence's logits equal transformers'
    on that prompt alone (so the long factors apply to the long rows only), and greedy tokens of
    both prompts started together equal each one's own transformers generate."""
    cfg = longrope_phi3()
    ref = save_reference(cfg, tmp_path)
    engine = load_genserve(tmp_path, max_batch_prefill_tokens=256)
    short, long = random_prompt(24, 3), random_prompt(THRESHOLD + 8, 4)

    seqs = [Sequence(f"probe-{i}", list(p), SamplingParams(max_new_tokens=1))
            for i, p in enumerate((short, long))]
    for seq in seqs:
        engine.blocks.allocate(seq)
        seq.num_computed = 0
    try:
        runner = engine.runner
        prep = runner.prepare([ScheduledSeq(seq, len(seq.prompt_ids)) for seq in seqs])
        hidden = runner.execute(prep.input_ids, prep.positions, ForwardBatch(prep.attn, runner.kv_caches))
        logits = runner.model.compute_logits(hidden).float()
    finally:
        for seq in seqs:
            engine.blocks.free_seq(seq)
    ours = logits[:len(short)], logits[len(short):]
    for p, got in zip((short, long), ours):
        want = ref(torch.tensor([p])).logits[0].float()
        assert (got - want).abs().max().item() < 1e-3
    # The long factors change the long prompt's logits: the check above is not vacuous.
    ignored = _reference_ignoring_long_factors(tmp_path, cfg)(torch.tensor([long])).logits[0].float()
    assert (ours[1] - ignored).abs().max().item() > 1e-2

    expected = [reference_greedy(ref, p, 8) for p in (short, long)]  # 24 + 8 stays at 32
    assert generate_greedy(engine, [short, long], 8) == expected
    assert generate_greedy(engine, [long, short], 8) == expected[::-1]


@torch.inference_mode()
def test_longrope_decode_rows_past_the_threshold_use_the_long_factors(tmp_path):
    """Without a recompute, decode rows past the threshold over keys cached with the short
    factors equal transformers' rotary layer over a plain cache, step by step (the engine
    recomputes at the crossing instead: the next test)."""
    cfg = longrope_phi3()
    ref = save_reference(cfg, tmp_path)
    engine = load_genserve(tmp_path, max_batch_prefill_tokens=256)
    prompt, n = random_prompt(THRESHOLD - 4, 10), 12
    # transformers: prefill, then one token at a time through a DynamicCache.
    cache, ids, inp, want = DynamicCache(config=ref.config), list(prompt), torch.tensor([prompt]), []
    for _ in range(n):
        start = len(ids) - inp.shape[1]
        out = ref(inp, position_ids=torch.arange(start, len(ids))[None], use_cache=True, **{CACHE_KW: cache})
        want.append(out.logits[0, -1].float())
        ids.append(int(want[-1].argmax()))
        inp = torch.tensor([[ids[-1]]])
    # genserve, the same steps through the paged cache (teacher-forced with those tokens).
    seq = Sequence("probe", list(prompt), SamplingParams(max_new_tokens=n))
    seq.output_ids = ids[len(prompt):-1]
    engine.blocks.allocate(seq)
    seq.output_ids, seq.num_computed, runner = [], 0, engine.runner
    try:
        for step in range(n):
            count = len(prompt) if step == 0 else 1
            if step:
                seq.output_ids.append(ids[len(prompt) + step - 1])  # known up to this row
            prep = runner.prepare([ScheduledSeq(seq, count)])
            hidden = runner.execute(prep.input_ids, prep.positions, ForwardBatch(prep.attn, runner.kv_caches))
            got = runner.model.compute_logits(hidden[-1:]).float()[0]
            where = f"step {step}, position {seq.num_computed + count - 1}"
            assert (got - want[step]).abs().max().item() < 1e-3, where
            seq.num_computed += count
    finally:
        engine.blocks.free_seq(seq)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
@torch.inference_mode()
def test_phi3_longrope_matches_generate_across_the_threshold(tmp_path, overlap):
    """Greedy tokens equal transformers' Phi-3 ``generate`` where the factor set changes under
    a sequence: a 45-token prompt prefilled in 16-token chunks (long factors from the first
    chunk), and a 20-token prompt generating 30 tokens (recomputed from scratch when it reaches
    33 tokens, as ``prepare_inputs_for_generation`` drops its cache there), alone and together,
    with overlapped steps on and off; prefix caching is off for the model."""
    cfg = longrope_phi3()
    ref = save_reference(cfg, tmp_path)
    engine = load_genserve(tmp_path, max_batch_prefill_tokens=16)
    engine.overlap = overlap
    assert not engine.blocks.enable_prefix_caching
    chunked, crossing = random_prompt(THRESHOLD + 13, 11), random_prompt(20, 16)
    expected = [reference_greedy(ref, chunked, 10), reference_greedy(ref, crossing, 30)]

    assert generate_greedy(engine, [chunked], 10) == expected[:1]
    assert engine.scheduler.num_preemptions == 0  # 45 tokens: long from the start, no crossing
    assert generate_greedy(engine, [crossing], 30) == expected[1:]
    assert engine.scheduler.num_preemptions == 1  # recomputed once, at 33 known tokens
    together = generate_greedy(engine, [chunked, crossing], 30)
    assert [together[0][:10], together[1]] == expected
    joined = generate_greedy(engine, [crossing, chunked], 10, join_every=2)
    assert joined == [expected[1][:10], expected[0]]
    assert engine.blocks.num_used == 0

    # Not vacuous: without the recompute, the crossing sequence drifts from generate.
    engine.scheduler.recompute_at = None
    assert generate_greedy(engine, [crossing], 30) != expected[1:]
