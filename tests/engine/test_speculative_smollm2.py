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
