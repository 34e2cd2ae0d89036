"""Speculative decoding (spec_decode/): outputs identical with speculation on and off for every
proposer, greedy and sampled, with chunked prefill, preemption, stops, logprobs and aborts;
sampled-token distributions that match; KV blocks back to baseline."""

import logging
import random

import pytest
import torch

from genserve.engine.constraints import Constraint
from genserve.engine.offline import OfflineRequest, OutputCollector, iter_steps
from genserve.engine.sampling_params import SamplingParams
from genserve.plugins import get_plugins
from genserve.spec_decode.base import ProposalRequest, Proposer
from genserve.spec_decode.config import SpeculativeConfig
from genserve.spec_decode.ngram import lookup
from genserve.spec_decode.speculator import Speculator
from genserve.spec_decode.verify import accepted_prefix
from genserve.testing import load_genserve, make_prompts, reference_greedy, save_reference

from .tinyllama import VOCAB, tiny_llama_config


def repetitive_prompts(lengths=(5, 23, 9, 40, 17)):
    """Prompts that repeat a stretch of themselves, so n-gram lookups find matches."""
    return [p + p[:8] + p for p in make_prompts(VOCAB, lengths=lengths)]


def drive(engine, requests, abort=None, check_blocks=False):
    """``requests``: (join step, id, prompt, params). Returns id -> completion (tokens etc.).
    ``abort``: (step, id) aborted before that step. ``check_blocks``: after every step, each
    decoding sequence holds the blocks of its computed tokens (no lookahead left)."""
    offline = [OfflineRequest(prompt, params, join_step=join, request_id=rid)
               for join, rid, prompt, params in requests]
    collector = OutputCollector(offline)
    for step, outputs in enumerate(iter_steps(engine, offline)):
        collector.add(outputs)
        if abort and step + 1 == abort[0]:
            out = engine.abort(abort[1])
            collector.add([out] if out else [])
        if check_blocks:
            for seq in engine.scheduler.running:
                if seq.num_generated and not seq.in_prefill:
                    # As without speculation: the computed tokens' blocks, and after a
                    # recomputation the last known token's too; no slots of rejected proposals.
                    held, need = len(seq.block_table), engine.blocks.blocks_needed
                    assert need(seq.num_computed) <= held <= need(seq.num_computed + 1)
        assert step < 500, "the engine did not drain"
    return {r.request_id: r.outputs[0] for r in collector.results()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for rid in a:
        ta, tb = a[rid].tokens, b[rid].tokens
        assert [t.id for t in ta] == [t.id for t in tb], f"{rid}: tokens differ"
        assert a[rid].finish_reason == b[rid].finish_reason, f"{rid}: finish reasons differ"
        assert [t.logprob for t in ta] == pytest.approx([t.logprob for t in tb], abs=1e-4), rid
        assert [[i for i, _ in t.top] for t in ta] == [[i for i, _ in t.top] for t in tb], rid
        assert a[rid].text == b[rid].text


class FixedProposer(Proposer):
    """Proposes tokens from its own RNG: mostly wrong, so most proposals are rejected."""

    name = "test-random"

    def __init__(self, vocab=VOCAB, seed=0):
        self.rng, self.vocab = random.Random(seed), vocab

    @classmethod
    def create(cls, ctx):
        return cls()

    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        return [[self.rng.randrange(self.vocab) for _ in range(r.k)] for r in requests]


def with_proposer(engine, proposer, k=3, max_batch_size=64):
    engine.speculator = Speculator(proposer, SpeculativeConfig(k, proposer.name, max_batch_size))
    engine.overlap = False
    return engine


# -- units -------------------------------------------------------------------------------
def test_ngram_lookup_takes_the_latest_longest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, max_n=3) == [7, 1]
    assert lookup([5, 6, 7, 5, 6], 3, max_n=3) == [7, 5, 6]
    assert lookup([1, 2, 3, 4], 2, max_n=3) == []
    assert lookup([4, 1, 8, 1], 4, max_n=2) == [8, 1]  # falls back to a 1-gram


def test_accepted_prefix():
    assert accepted_prefix([5, 6, 7], [5, 6, 7, 8]) == 3
    assert accepted_prefix([5, 6, 7], [5, 9, 7, 8]) == 1
    assert accepted_prefix([5], [4, 5]) == 0
    with pytest.raises(ValueError):
        accepted_prefix([1, 2], [1, 2])


def test_builtin_proposers_register_through_the_hook():
    names = set(get_plugins().spec_proposers)
    assert {"ngram", "draft_model", "medusa", "eagle"} <= names


# -- n-gram ------------------------------------------------------------------------------
def test_ngram_greedy_matches_transformers_alone_and_batched(checkpoint):
    folder, model = checkpoint
    prompts = repetitive_prompts()
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    engine = load_genserve(folder, speculate=4)
    alone = drive(engine, [(0, "a", prompts[0], params)], check_blocks=True)
    assert [t.id for t in alone["a"].tokens] == reference_greedy(model, prompts[0], 20)
    batched = drive(engine, [(i, f"r{i}", p, params) for i, p in enumerate(prompts)], check_blocks=True)
    for i, p in enumerate(prompts):
        assert [t.id for t in batched[f"r{i}"].tokens] == reference_greedy(model, p, 20)
    assert engine.speculator.num_accepted > 0  # speculation did skip steps
    assert engine.blocks.num_used == 0


def test_mixed_batch_with_chunking_preemption_stops_and_logprobs(checkpoint):
    folder, _ = checkpoint
    prompts = repetitive_prompts(lengths=(6, 12, 20, 8, 14, 10, 9))
    sampled = dict(do_sample=True, temperature=1.5, seed=11)
    probe = drive(load_genserve(folder), [(0, "p", prompts[1], SamplingParams(max_new_tokens=12, **sampled))])
    ids = [t.id for t in probe["p"].tokens]
    cut = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    requests = [
        (0, "greedy", prompts[0], SamplingParams(max_new_tokens=20, ignore_eos=True)),
        (0, "stop", prompts[1], SamplingParams(max_new_tokens=30, stop_token_ids=[ids[cut]], **sampled)),
        (1, "seeded", prompts[2], SamplingParams(max_new_tokens=15, do_sample=True, temperature=0.8,
                                                 top_k=20, top_p=0.9, seed=7)),
        (1, "top-n", prompts[3], SamplingParams(max_new_tokens=9, top_n_tokens=3)),
        (3, "details", prompts[4], SamplingParams(max_new_tokens=4, prompt_logprobs=True)),
        (4, "one", prompts[5], SamplingParams(max_new_tokens=1)),
        (5, "penalty", prompts[6], SamplingParams(max_new_tokens=12, repetition_penalty=1.3,
                                                  frequency_penalty=0.5, do_sample=True, seed=5)),
    ]
    small = dict(max_batch_prefill_tokens=8, max_batch_total_tokens=96, max_total_tokens=96,
                 max_input_tokens=80)
    off = drive(load_genserve(folder, **small), requests)
    preemptions = 0
    for proposer in (None, FixedProposer()):
        engine = load_genserve(folder, speculate=3, **small)
        if proposer is not None:
            with_proposer(engine, proposer)
        on = drive(engine, requests, check_blocks=True)
        assert_same(on, off)
        preemptions += engine.scheduler.num_preemptions
        assert engine.speculator.num_proposed > 0
        assert engine.blocks.num_used == 0
    assert preemptions > 0  # the small cache forced preemption
    assert [t.id for t in on["stop"].tokens] == ids[:cut + 1]
    assert on["stop"].finish_reason == "stop_sequence"


def test_rejected_proposals_and_aborts_return_every_block(checkpoint):
    folder, _ = checkpoint
    prompts = make_prompts(VOCAB, lengths=(7, 30, 11))
    engine = with_proposer(load_genserve(folder, disable_prefix_caching=True), FixedProposer(), k=4)
    requests = [(0, f"r{i}", p, SamplingParams(max_new_tokens=25, ignore_eos=True))
                for i, p in enumerate(prompts)]
    drive(engine, requests, abort=(4, "r1"), check_blocks=True)
    assert engine.speculator.num_proposed > 4 * engine.speculator.num_accepted  # mostly rejected
    assert engine.blocks.num_used == 0 and engine.blocks.num_free == engine.blocks.num_blocks


def test_large_batches_turn_speculation_off_and_say_so(checkpoint, caplog):
    folder, _ = checkpoint
    engine = load_genserve(folder, speculate=2, speculative_max_batch_size=2)
    prompts = repetitive_prompts(lengths=(5, 6, 7, 8))
    requests = [(0, f"r{i}", p, SamplingParams(max_new_tokens=6 + 8 * (i == 0), ignore_eos=True))
                for i, p in enumerate(prompts)]
    off = drive(load_genserve(folder), requests)
    with caplog.at_level(logging.INFO, logger="genserve.spec_decode.speculator"):
        on = drive(engine, requests)
    assert_same(on, off)
    assert "speculation off: 4 sequences decoding" in caplog.text
    assert "speculation back on" in caplog.text  # once r0 decodes alone
    assert on["r0"].tokens and engine.speculator.num_proposed > 0


class AllowAll(Constraint):
    """A grammar constraint that allows every token; ``seen`` is what it has consumed, so a
    rollback that undid too little or too much shows in it."""

    def __init__(self):
        self.seen = []

    def fill_bitmask(self, bitmask, row):
        bitmask[row] = -1

    def advance(self, token_id):
        self.seen.append(token_id)

    def is_finished(self):
        return False

    def rollback(self, num_tokens):
        assert 0 <= num_tokens <= len(self.seen)
        del self.seen[len(self.seen) - num_tokens:]

    def valid_prefix(self, token_ids):
        return len(token_ids)


def test_grammar_requests_speculate_and_end_at_their_tokens(checkpoint):
    """A constrained request speculates (masks per verify row, tests/engine/
    test_speculative_grammar.py has real grammars); its constraint ends having consumed exactly
    the emitted tokens: every proposal it walked through was rolled back."""
    folder, _ = checkpoint
    prompt = repetitive_prompts()[1]
    engine = load_genserve(folder, speculate=3)
    c = AllowAll()
    on = drive(engine, [(0, "g", prompt, SamplingParams(max_new_tokens=10, ignore_eos=True, constraint=c))])
    off = drive(load_genserve(folder), [(0, "g", prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))])
    assert_same(on, off)
    assert c.seen == [t.id for t in on["g"].tokens]
    assert engine.speculator.num_proposed > 0 and engine.speculator.num_accepted > 0


# -- draft model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-draft")
    cfg = tiny_llama_config()
    cfg.num_hidden_layers = 1
    save_reference(cfg, folder, seed=3)
    return folder


@pytest.mark.parametrize("which", ["self", "small"])
def test_draft_model_outputs_identical_greedy_and_sampled(checkpoint, draft, which):
    folder, model = checkpoint
    path = folder if which == "self" else draft
    prompts = make_prompts(VOCAB, lengths=(5, 23, 9))
    requests = [(0, "g0", prompts[0], SamplingParams(max_new_tokens=16, ignore_eos=True)),
                (1, "s1", prompts[1], SamplingParams(max_new_tokens=16, do_sample=True, seed=4, ignore_eos=True)),
                (2, "g2", prompts[2], SamplingParams(max_new_tokens=12, ignore_eos=True, top_n_tokens=2))]
    engine = load_genserve(folder, speculative_model=str(path), speculate=3)
    on = drive(engine, requests, check_blocks=True)
    assert_same(on, drive(load_genserve(folder), requests))
    assert [t.id for t in on["g0"].tokens] == reference_greedy(model, prompts[0], 16)
    spec = engine.speculator
    assert spec.num_proposed > 0 and engine.blocks.num_used == 0
    if which == "self":  # the target drafting for itself: every proposal is its own token
        assert spec.num_accepted >= 0.95 * spec.num_proposed - 3  # ends cut the last proposals


def test_draft_model_with_preemption(checkpoint, draft):
    folder, _ = checkpoint
    prompts = make_prompts(VOCAB, lengths=(5, 23, 9, 40, 17, 31))
    small = dict(max_batch_prefill_tokens=8, max_batch_total_tokens=96, max_total_tokens=96,
                 max_input_tokens=80)
    requests = [(i, f"r{i}", p, SamplingParams(max_new_tokens=16, ignore_eos=True)) for i, p in enumerate(prompts)]
    engine = load_genserve(folder, speculative_model=str(folder), speculate=2, **small)
    on = drive(engine, requests, check_blocks=True)
    assert engine.scheduler.num_preemptions > 0
    assert_same(on, drive(load_genserve(folder, **small), requests))
    assert engine.blocks.num_used == 0


# -- sampling distribution ---------------------------------------------------------------
def chi_square_two_sample(a: list[int], b: list[int]) -> float:
    """p-value of the chi-square test that samples ``a`` and ``b`` come from one distribution
    (categories with fewer than 5 expected draws pooled)."""
    cats = sorted(set(a) | set(b))
    ca = torch.tensor([a.count(c) for c in cats], dtype=torch.float64)
    cb = torch.tensor([b.count(c) for c in cats], dtype=torch.float64)
    total = ca + cb
    small = total < 10
    if small.any():
        ca = torch.cat([ca[~small], ca[small].sum()[None]])
        cb = torch.cat([cb[~small], cb[small].sum()[None]])
        total = ca + cb
    na, nb = ca.sum(), cb.sum()
    ea, eb = total * na / (na + nb), total * nb / (na + nb)
    stat = (((ca - ea) ** 2) / ea + ((cb - eb) ** 2) / eb).sum()
    df = len(ca) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_sampled_distribution_matches_without_speculation(tmp_path):
    cfg = tiny_llama_config()
    cfg.vocab_size = 12
    save_reference(cfg, tmp_path, seed=5)
    prompt = [1, 2, 3, 1, 2]
    n = 300

    def draws(engine, seeds):
        requests = [(0, f"s{s}", prompt, SamplingParams(max_new_tokens=4, do_sample=True, seed=s,
                                                       ignore_eos=True)) for s in seeds]
        out = drive(engine, requests)
        return [[t.id for t in out[f"s{s}"].tokens] for s in seeds]

    def engine(spec):
        e = load_genserve(tmp_path, max_batch_size=400)
        return with_proposer(e, FixedProposer(vocab=12), k=3, max_batch_size=1000) if spec else e

    spec_on = draws(engine(True), range(n))
    spec_off_same = draws(engine(False), range(n))
    assert spec_on == spec_off_same  # seeded: the very same tokens
    spec_off = draws(engine(False), range(n, 2 * n))  # independent draws for the test below
    for index in range(1, 4):  # the tokens that went through verify steps
        p = chi_square_two_sample([d[index] for d in spec_on], [d[index] for d in spec_off])
        assert p > 0.001, f"token {index}: distributions differ (p={p:.2g})"
    # The test can fail: a proposer that changed the distribution is caught.
    biased = [[d[0]] + [0] * 3 for d in spec_on]
    assert chi_square_two_sample([d[2] for d in biased], [d[2] for d in spec_off]) < 1e-6


# -- LoRA --------------------------------------------------------------------------------
def test_lora_requests_speculate_with_their_adapter(tmp_path):
    from tests.lora.lorakit import make_adapter, peft_model, save_base

    base = save_base(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "alpha", seed=1, target_modules=["q_proj", "v_proj", "down_proj"])
    prompts = repetitive_prompts(lengths=(6, 11, 9))
    requests = [(0, "base", prompts[0], SamplingParams(max_new_tokens=14, ignore_eos=True)),
                (0, "alpha", prompts[1], SamplingParams(max_new_tokens=14, ignore_eos=True, adapter_id="alpha")),
                (1, "alpha-sampled", prompts[2], SamplingParams(max_new_tokens=14, ignore_eos=True,
                                                                adapter_id="alpha", do_sample=True, seed=3))]
    engine = load_genserve(base, lora_adapters=f"alpha={adapter}", speculate=3)
    on = drive(engine, requests, check_blocks=True)
    assert_same(on, drive(load_genserve(base, lora_adapters=f"alpha={adapter}"), requests))
    assert engine.speculator.num_proposed > 0
    assert [t.id for t in on["alpha"].tokens] == reference_greedy(peft_model(base, adapter), prompts[1], 14)


def test_no_position_past_the_last_one_decoding_computes(checkpoint):
    """Requests that run into max_total_tokens (the model's 512 positions): proposals stop short
    of positions the model does not have, and outputs match decoding without speculation."""
    folder, model = checkpoint
    prompt = repetitive_prompts(lengths=(160,))[0]  # 352 tokens
    requests = [(0, "long", prompt, SamplingParams(max_new_tokens=300, ignore_eos=True))]
    engine = load_genserve(folder, speculate=4, max_total_tokens=512, max_input_tokens=500)
    on = drive(engine, requests)
    assert_same(on, drive(load_genserve(folder, max_total_tokens=512, max_input_tokens=500), requests))
    assert len(on["long"].tokens) == 512 - len(prompt) and on["long"].finish_reason == "length"
    assert engine.speculator.num_proposed > 0


def test_lookahead_caps():
    from genserve.engine.sequence import Sequence

    spec = Speculator(FixedProposer(), SpeculativeConfig(4, "test-random"), recompute_at=None,
                      max_total_tokens=512)
    seq = Sequence("x", list(range(500)), SamplingParams(max_new_tokens=100))
    seq.output_ids = [1] * 8  # 508 known tokens: positions 507..510 may be computed, not 511
    assert spec.lookahead(seq) == 3
    seq.params = SamplingParams(max_new_tokens=10)  # 2 more tokens to generate: 1 proposal
    assert spec.lookahead(seq) == 1
    long_rope = Speculator(FixedProposer(), SpeculativeConfig(4, "test-random"), recompute_at=510)
    seq.params, seq.admitted_len = SamplingParams(max_new_tokens=100), 300
    assert long_rope.lookahead(seq) == 1  # positions past 508 wait for the recomputation
    seq.params = SamplingParams(max_new_tokens=100, constraint=AllowAll())
    assert spec.lookahead(seq) == 3  # grammar requests speculate like any other


def test_verify_rows_are_one_token_attention_sequences(checkpoint):
    """A verify row's k + 1 tokens are k + 1 one-token sequences over one block table, so a
    batch of decodes and verify rows is decode-only (decode kernels, decode CUDA graphs)."""
    from genserve.engine.scheduler import ScheduledSeq
    from genserve.engine.sequence import Sequence

    folder, _ = checkpoint
    engine = load_genserve(folder, disable_prefix_caching=True)
    seq = Sequence("v", list(range(10, 19)), SamplingParams(max_new_tokens=8))
    seq.output_ids = [5]  # 10 known tokens, 9 computed
    engine.blocks.allocate(seq)
    seq.num_computed = 9
    engine.blocks.append_slot(seq, 3)
    prep = engine.runner.prepare([ScheduledSeq(seq, 4, lookahead=3, spec=[7, 8, 9])])
    a = prep.attn
    assert a.is_decode_only and a.query_lens_cpu == [1, 1, 1, 1]
    assert a.seq_lens.tolist() == [10, 11, 12, 13]
    assert prep.input_ids.tolist() == [5, 7, 8, 9] and prep.positions.tolist() == [9, 10, 11, 12]
    assert prep.sampling_index == [0, 0, 0, 0] and prep.logit_rows is None
    assert (a.block_tables == a.block_tables[0]).all()
    engine.blocks.free_seq(seq)
