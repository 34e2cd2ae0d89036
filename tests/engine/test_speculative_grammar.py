"""Speculative decoding of grammar-constrained requests (llguidance: regex, JSON Schema, OpenAI
``json_schema``/``json_object``, tool calls): each verify row is masked with the grammar's state
after the proposals before it, proposals the grammar forbids are cut before verify, and the
matcher ends at exactly the emitted tokens. Outputs are token-identical with speculation on and
off, greedy and seeded-sampled, in batches mixed with unconstrained requests.

The model is the tiny random Llama with a real byte-level BPE tokenizer (tests/server/
tinymodel.py); the prompts repeat JSON text, and the greedy grammar outputs repeat themselves,
so n-gram proposals are made and some are accepted (asserted: the tests cannot pass vacuously).
"""

import json
import re

import jsonschema
import pytest
import torch

from genserve.engine.constraints import bitmask_words, fill_verify_bitmask, speculative_prefix
from genserve.engine.offline import OfflineRequest, OutputCollector, iter_steps
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.sequence import FinishReason
from genserve.server.chat import tool_schema
from genserve.server.grammar import GrammarCompiler
from genserve.server.schemas_openai import Tool
from genserve.spec_decode.base import ProposalRequest
from genserve.testing import load_genserve
from tests.server.tinymodel import build_tiny_llama

from .test_speculative import FixedProposer, assert_same, with_proposer

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
COLORS = {"type": "object",
          "properties": {"colors": {"type": "array", "maxItems": 6,
                                    "items": {"enum": ["red", "green", "blue"]}}},
          "required": ["colors"], "additionalProperties": False}
WORDS = "[a-z ]{10,60}"
TOOLS = [Tool.model_validate({"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"], "additionalProperties": False}}})]

# (kind, value, a text the grammar accepts, the schema or regex the output must satisfy)
GRAMMARS = {
    "regex": ("regex", "[0-9]{3}-[a-z]{2}", "123-ab"),
    "json": ("json", PERSON, '{"name":"Ada","age":36}'),
    "json_schema": ("json_schema", {"name": "colors", "schema": COLORS}, '{"colors":["red","blue"]}'),
    "json_object": ("json_object", None, '{"ok":true,"n":[1,2]}'),
    "tool": ("json_schema", tool_schema(TOOLS, "required"),
             '{"name":"get_weather","arguments":{"city":"Paris"}}'),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, tokenizer, GrammarCompiler) of the tiny Llama with a real tokenizer."""
    from transformers import AutoTokenizer

    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-grammar"))
    tok = AutoTokenizer.from_pretrained(folder)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    compiler = GrammarCompiler(tok, len(tok), {eos})
    assert compiler.check() is None
    return folder, tok, compiler


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def mask_of(c, vocab: int) -> torch.Tensor:
    bitmask = torch.zeros((1, bitmask_words(vocab)), dtype=torch.int32)
    c.fill_bitmask(bitmask, 0)
    return bitmask[0].clone()


def state_of(c, vocab: int, probe: list[int]):
    """What a constraint's state decides: its mask, whether it is finished, and how much of
    ``probe`` it would accept."""
    return mask_of(c, vocab).tolist(), c.is_finished(), c.valid_prefix(probe)


def advanced(make, tokens: list[int]):
    c = make()
    for t in tokens:
        c.advance(t)
    return c


# -- rollback, per constraint type ---------------------------------------------------------
@pytest.mark.parametrize("name", list(GRAMMARS))
def test_rollback_restores_the_state_of_a_fresh_matcher(tiny, name):
    """After advancing i tokens and rolling back m, masks, ``is_finished`` and ``valid_prefix``
    equal those of a fresh matcher advanced i - m tokens, at every i and m, through the token
    that finishes the grammar and an EOS consumed after it (not in llguidance's own history)."""
    _, tok, compiler = tiny
    kind, value, text = GRAMMARS[name]
    make = compiler.compile(kind, value)
    tokens = encode(tok, text)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    vocab = len(tok)
    fresh = make()
    assert fresh.valid_prefix(tokens) == len(tokens)
    want = [state_of(advanced(make, tokens[:i]), vocab, tokens[i:]) for i in range(len(tokens) + 1)]
    assert want[-1][1] and not want[-2][1]  # the text's last token finishes the grammar
    c = make()
    for i, token in enumerate(tokens):
        c.advance(token)
        for m in sorted({1, 2, i + 1} & set(range(1, i + 2))):
            c.rollback(m)
            assert state_of(c, vocab, tokens[i + 1 - m:]) == want[i + 1 - m], (i, m)
            for t in tokens[i + 1 - m:i + 1]:
                c.advance(t)
    assert c.is_finished()
    c.advance(eos)  # a finished grammar takes EOS (the mask allows it)
    c.rollback(2)  # the EOS and the finishing token
    assert state_of(c, vocab, tokens[-1:]) == want[-2]
    c.rollback(len(tokens) - 1)
    assert state_of(c, vocab, tokens) == want[0]
    c.rollback(0)
    assert state_of(c, vocab, tokens) == want[0]


def test_rollback_and_advance_refuse_what_they_cannot_do(tiny):
    _, tok, compiler = tiny
    make = compiler.compile("regex", "[0-9]{3}-[a-z]{2}")
    digits, letters = encode(tok, "123"), encode(tok, "ab")
    c = advanced(make, digits[:2])
    before = mask_of(c, len(tok))
    with pytest.raises(ValueError, match="cannot roll back 3 tokens"):
        c.rollback(3)
    with pytest.raises(ValueError):
        c.rollback(-1)
    assert torch.equal(mask_of(c, len(tok)), before)  # the matcher is still usable
    with pytest.raises(ValueError, match="does not allow token"):
        c.advance(letters[0])  # a letter where a digit must come
    assert torch.equal(mask_of(c, len(tok)), before)  # refused, and still usable
    c.advance(digits[2])
    c.rollback(3)
    assert torch.equal(mask_of(c, len(tok)), mask_of(make(), len(tok)))


def test_valid_prefix_stops_at_the_first_forbidden_token(tiny):
    _, tok, compiler = tiny
    c = compiler.compile("json", PERSON)()
    good = encode(tok, '{"name":"Ada","age":36}')
    assert c.valid_prefix(good) == len(good)
    assert c.valid_prefix(good[:3] + encode(tok, "]") + good[3:]) == 3
    assert c.valid_prefix(good[:2] + [len(tok) + 7]) == 2  # an id past the vocabulary
    assert c.valid_prefix([]) == 0
    assert not c.is_finished() and c.valid_prefix(good) == len(good)  # nothing was consumed


def test_engine_refuses_a_constraint_that_is_not_a_constraint(tiny):
    """Speculation calls rollback/valid_prefix: an object without the contract is refused
    when the request is added, not mid-step."""

    class DuckTyped:  # the pre-speculation protocol, without rollback/valid_prefix
        def fill_bitmask(self, bitmask, row): ...
        def advance(self, token_id): ...
        def is_finished(self): return False

    engine = load_genserve(tiny[0], speculate=2)
    with pytest.raises(TypeError, match="must be a genserve.engine.constraints.Constraint"):
        engine.add_request("x", [1, 2, 3], SamplingParams(constraint=DuckTyped()))
    assert not engine.has_work


# -- the helpers the speculator and the runner use ----------------------------------------
def test_speculative_prefix_cuts_forbidden_and_finishing_tokens(tiny):
    _, tok, compiler = tiny
    make = compiler.compile("regex", "[0-9]{3}-[a-z]{2}")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tokens = encode(tok, "123-ab")
    c = make()
    before = state_of(c, len(tok), tokens)
    # "b" finishes the grammar: the row that would check it samples it anyway, and nothing
    # after it (EOS here) is verified.
    assert speculative_prefix(c, tokens + [eos]) == len(tokens) - 1
    assert speculative_prefix(c, tokens[:3] + tokens[4:]) == 3  # "-" missing: a letter is cut
    assert speculative_prefix(c, tokens[:2]) == 2
    assert state_of(c, len(tok), tokens) == before  # the constraint ends where it started


def test_verify_masks_are_the_masks_after_each_proposal(tiny):
    _, tok, compiler = tiny
    make = compiler.compile("json", PERSON)
    vocab = len(tok)
    done = encode(tok, '{"name":"A')
    proposals = encode(tok, 'da","age":3')
    c = advanced(make, done)
    before = state_of(c, vocab, proposals)
    bitmask = torch.zeros((2 + len(proposals), bitmask_words(vocab)), dtype=torch.int32)
    fill_verify_bitmask(c, bitmask, 1, proposals)
    assert not bitmask[0].any()  # rows outside the sequence's are left alone
    for j in range(len(proposals) + 1):
        assert torch.equal(bitmask[1 + j], mask_of(advanced(make, done + proposals[:j]), vocab)), j
    assert state_of(c, vocab, proposals) == before


# -- engine: identical outputs with speculation on and off -------------------------------
def drive_counts(engine, requests):
    """Run (join step, id, prompt, params) requests; returns id -> completion and id ->
    (proposed, accepted) speculative tokens as the request's last output reports them."""
    offline = [OfflineRequest(prompt, params, join_step=join, request_id=rid)
               for join, rid, prompt, params in requests]
    collector = OutputCollector(offline)
    counts = {}
    for step, outputs in enumerate(iter_steps(engine, offline)):
        collector.add(outputs)
        for out in outputs:
            counts[out.request_id] = (out.spec_proposed, out.spec_accepted)
        assert step < 500, "the engine did not drain"
    assert engine.blocks.num_used == 0
    return {r.request_id: r.outputs[0] for r in collector.results()}, counts


def grammar_of(rid: str) -> tuple:
    """(kind, value) of a test request id: its part before "-" names a GRAMMARS entry, or
    "words" (the WORDS regex); "free" ones have none."""
    name = rid.split("-")[0]
    return ("regex", WORDS) if name == "words" else GRAMMARS[name][:2]


def mixed_requests(tok, compiler):
    """Grammar requests of every kind, greedy and seeded-sampled, and unconstrained ones,
    joining at different steps. Fresh constraints each call (they hold per-request state)."""
    prompt = encode(tok, 'People: {"name":"Ada Ada Ada","age":36} {"name":"Ada Ada Ada","age":36} '
                         '{"colors":["red","red","red"]} {"name":"get_weather","arguments":{"city":"Paris"}} '
                         "the quick brown fox the quick brown fox")
    sampled = dict(do_sample=True, temperature=0.8, top_k=50)

    def grammar(rid, **p):
        return SamplingParams(max_new_tokens=64, constraint=compiler.compile(*grammar_of(rid))(), **p)

    return [
        (0, "json", prompt, grammar("json", top_n_tokens=2)),
        (0, "json-sampled", prompt, grammar("json", seed=3, **sampled)),
        (0, "words", prompt, grammar("words")),
        (1, "words-sampled", prompt, grammar("words", seed=5, **sampled)),
        (1, "free", prompt, SamplingParams(max_new_tokens=30)),
        (2, "json_schema", prompt, grammar("json_schema")),
        (2, "tool", prompt, grammar("tool")),
        (3, "free-sampled", prompt, SamplingParams(max_new_tokens=30, seed=9, **sampled)),
        (3, "json_object-sampled", prompt, grammar("json_object", seed=11, **sampled)),
    ]


SCHEMAS = {"json": PERSON, "json_schema": COLORS, "tool": tool_schema(TOOLS, "required"),
           "json_object": {"type": "object"}}


def assert_valid(compiler, rid: str, out):
    """A grammar request's tokens are all accepted by its grammar (checked by a fresh matcher),
    and a request the grammar ended has a text that satisfies the schema or regex."""
    ids = [t.id for t in out.tokens]
    assert compiler.compile(*grammar_of(rid))().valid_prefix(ids) == len(ids), rid
    if out.finish_reason != FinishReason.EOS:
        assert out.finish_reason == FinishReason.LENGTH and len(ids) == 64, rid
        return
    name = rid.split("-")[0]
    if name == "words":
        assert re.fullmatch(WORDS, out.text), out.text
    else:
        jsonschema.validate(json.loads(out.text), SCHEMAS[name])


def test_grammar_requests_identical_with_speculation_in_mixed_batches(tiny):
    folder, tok, compiler = tiny
    off, _ = drive_counts(load_genserve(folder), mixed_requests(tok, compiler))
    engine = load_genserve(folder, speculate=4)
    on, counts = drive_counts(engine, mixed_requests(tok, compiler))
    assert_same(on, off)
    constrained = [rid for rid in on if not rid.startswith("free")]
    for rid in constrained:
        assert_valid(compiler, rid, on[rid])
        assert counts[rid][0] > 0, f"{rid}: no proposal was verified"
    # Not vacuous: proposals of grammar requests were accepted, greedy and sampled.
    assert sum(counts[rid][1] for rid in constrained) >= 10
    assert counts["json"][1] > 0 and counts["words"][1] > 0
    assert sum(counts[rid][1] for rid in constrained if "sampled" in rid) > 0
    assert engine.speculator.num_accepted == sum(a for _, a in counts.values())


class CountingProposer(FixedProposer):
    """Random proposals (mostly forbidden by any grammar), counted per request."""

    def __init__(self, vocab):
        super().__init__(vocab=vocab, seed=1)
        self.offered: dict[str, int] = {}

    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        out = super().propose(requests)
        for r, tokens in zip(requests, out):
            self.offered[r.seq.request_id] = self.offered.get(r.seq.request_id, 0) + len(tokens)
        return out


def test_forbidden_proposals_are_cut_before_verify_and_change_nothing(tiny):
    folder, tok, compiler = tiny
    requests = mixed_requests(tok, compiler)
    off, _ = drive_counts(load_genserve(folder), requests)
    proposer = CountingProposer(len(tok))
    engine = with_proposer(load_genserve(folder), proposer, k=3)
    on, counts = drive_counts(engine, mixed_requests(tok, compiler))
    assert_same(on, off)
    for rid in on:
        offered, (verified, _) = proposer.offered[rid], counts.get(rid, (0, 0))
        if rid.startswith("free"):
            assert verified == offered  # unconstrained: every proposal is verified
        else:
            assert verified < offered / 2, f"{rid}: {verified} of {offered} random proposals verified"
            assert_valid(compiler, rid, on[rid])


def test_grammar_speculation_with_chunked_prefill_and_preemption(tiny):
    folder, tok, compiler = tiny
    small = dict(max_batch_prefill_tokens=16, max_batch_total_tokens=256, max_total_tokens=192,
                 max_input_tokens=160)
    off, _ = drive_counts(load_genserve(folder, **small), mixed_requests(tok, compiler))
    engine = load_genserve(folder, speculate=3, **small)
    on, _ = drive_counts(engine, mixed_requests(tok, compiler))
    assert_same(on, off)
    assert engine.scheduler.num_preemptions > 0
    assert engine.speculator.num_accepted > 0
    for rid in on:
        if not rid.startswith("free"):
            assert_valid(compiler, rid, on[rid])


@pytest.mark.parametrize("which", ["self", "other"])
def test_draft_model_drafts_under_the_grammar(tiny, tmp_path, which):
    """The draft model samples its proposals under the request's grammar (masked as the verify
    rows are): the target drafting for itself has its grammar proposals accepted, and with any
    draft the outputs are those without speculation."""
    folder, tok, compiler = tiny
    draft = folder if which == "self" else build_tiny_llama(tmp_path / "draft", seed=4)
    off, _ = drive_counts(load_genserve(folder), mixed_requests(tok, compiler))
    engine = load_genserve(folder, speculative_model=str(draft), speculate=3)
    on, counts = drive_counts(engine, mixed_requests(tok, compiler))
    assert_same(on, off)
    for rid in on:
        if not rid.startswith("free"):
            assert_valid(compiler, rid, on[rid])
    proposed = sum(p for p, _ in counts.values())
    assert proposed > 0
    if which == "self":  # every proposal is the target's own token, grammar requests included
        for rid, (p, a) in counts.items():
            # Every step verifies up to 3 proposals and they are the tokens emitted.
            assert p >= len(on[rid].tokens) // 2 and a >= 0.9 * p - 3, f"{rid}: {a} of {p} accepted"
