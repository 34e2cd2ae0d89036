"""The embedded SmolLM2 with n-gram speculation: greedy tokens identical to decoding without it,
on an input-grounded prompt (a rewrite, where proposals from the prompt get accepted)."""

from genserve.args import defaults
from genserve.engine.build import build_engine
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from tests.conftest import chat_ids

PASSAGE = ("The city council met on Tuesday to discuss the new park. The new park will have a "
           "playground, a pond and a small library. The council will vote on the new park next month.")


def test_ngram_greedy_identical_on_smollm2(smollm2):
    spec = build_engine(defaults(backend="cpu", dtype="float32", max_batch_total_tokens=8192,
                                 max_total_tokens=2048, speculate=4)).engine
    prompts = [chat_ids(smollm2.tokenizer, f"Repeat this passage word for word: {PASSAGE}"),
               chat_ids(smollm2.tokenizer, "What is the capital of France?")]
    params = SamplingParams(max_new_tokens=24)
    want = [r.outputs[0].token_ids for r in run_to_completion(
        smollm2.engine, [OfflineRequest(p, params) for p in prompts])]
    got = [r.outputs[0].token_ids for r in run_to_completion(spec, [OfflineRequest(p, params) for p in prompts])]
    assert got == want
    assert spec.speculator.num_accepted > 0  # the rewrite copies the prompt: proposals land
    assert spec.blocks.num_used == 0


def test_ngram_under_a_json_grammar_on_smollm2(smollm2):
    """A JSON-Schema request copying a record from the prompt: the grammar's masks per verify
    row keep the tokens those of decoding without speculation, and the copied text's n-gram
    proposals are accepted (docs/speculative.md has the figures)."""
    import json

    from genserve.server.grammar import GrammarCompiler

    record = {"name": "Ada Lovelace", "born": 1815, "known_for": ["the Analytical Engine", "the first program"]}
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"},
                                               "known_for": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "born", "known_for"], "additionalProperties": False}
    engine = smollm2.engine
    grammars = GrammarCompiler(smollm2.tokenizer, engine.runner.vocab_size, set(engine.eos_token_ids))
    assert grammars.check() is None
    prompt = chat_ids(smollm2.tokenizer, "Copy this JSON record exactly, as compact JSON: "
                      + json.dumps(record, separators=(",", ":")))

    def run(eng):
        params = SamplingParams(max_new_tokens=60, constraint=grammars.compile("json", schema)())
        return run_to_completion(eng, [OfflineRequest(prompt, params)])[0].outputs[0]

    spec = build_engine(defaults(backend="cpu", dtype="float32", max_batch_total_tokens=8192,
                                 max_total_tokens=2048, speculate=4)).engine
    want, got = run(engine), run(spec)
    assert got.token_ids == want.token_ids and got.finish_reason == "eos_token"
    assert json.loads(got.text) == record
    assert spec.speculator.num_accepted >= 10
    assert spec.blocks.num_used == 0
