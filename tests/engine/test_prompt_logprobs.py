"""Prompt logprobs (TGI's decoder_input_details) in bounded memory (issue 16, item 9).

Only the rows of requests that ask go through the LM head's full-vocabulary log-softmax, at
most ``PROMPT_LOGPROBS_CHUNK_ELEMENTS`` logits at a time, across chunked prefill and
preemption; the values equal transformers' log-softmax over the prompt.
"""

import pytest
import torch

from genserve.engine import model_runner
from genserve.engine.sampling_params import SamplingParams
from genserve.testing import load_genserve, make_prompts

from .tinyllama import VOCAB  # the `checkpoint` fixture's vocabulary (conftest.py)


@torch.inference_mode()
def reference(model, prompt: list[int]) -> list[float]:
    """transformers: log P(prompt[i] | prompt[:i]) for i >= 1."""
    logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    return [logprobs[i - 1, t].item() for i, t in enumerate(prompt) if i]


def run(engine, requests):
    """id -> prompt tokens (PromptToken list) of each request, run together."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    got = {}
    for _ in range(500):
        if not engine.has_work:
            break
        for out in engine.step():
            if out.prompt_tokens is not None:
                got[out.request_id] = out.prompt_tokens
    assert not engine.has_work
    return got


@pytest.fixture()
def lm_head_rows(monkeypatch):
    """Chunks of 3 rows (3 * VOCAB logits); ``watch(engine)`` returns the row counts of the LM
    head's calls made for prompt logprobs (the sampler's own calls are not counted)."""
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_CHUNK_ELEMENTS", 3 * VOCAB)
    seen, inside = [], []

    def watch(engine):
        runner, model = engine.runner, engine.runner.model
        head, prompt_logprobs = model.compute_logits, runner._prompt_logprobs

        def compute_logits(hidden):
            if inside:
                seen.append(hidden.shape[0])
            return head(hidden)

        def counted(s, hidden):
            inside.append(True)
            try:
                return prompt_logprobs(s, hidden)
            finally:
                inside.pop()

        monkeypatch.setattr(model, "compute_logits", compute_logits)
        monkeypatch.setattr(runner, "_prompt_logprobs", counted)
        return seen

    return watch


@pytest.mark.parametrize("overlap", [False, True], ids=["waiting", "overlapped"])
def test_chunked_prompt_logprobs_match_transformers(checkpoint, lm_head_rows, overlap):
    folder, model = checkpoint
    prompts = make_prompts(VOCAB, lengths=(5, 41, 9, 30))
    # 8-token prefill chunks and a cache too small for all four: chunked prefill and preemption.
    engine = load_genserve(folder, max_batch_prefill_tokens=8, max_batch_total_tokens=96,
                           max_total_tokens=96, max_input_tokens=80)
    engine.overlap = overlap
    seen = lm_head_rows(engine)
    asking = {0, 1, 3}
    requests = [(f"r{i}", p, SamplingParams(max_new_tokens=12, ignore_eos=True, prompt_logprobs=i in asking))
                for i, p in enumerate(prompts)]
    got = run(engine, requests)
    assert set(got) == {f"r{i}" for i in asking}  # only those that asked get prompt tokens
    for i in asking:
        tokens = got[f"r{i}"]
        assert [t.id for t in tokens] == prompts[i]
        assert tokens[0].logprob is None
        assert [t.logprob for t in tokens[1:]] == pytest.approx(reference(model, prompts[i]), abs=1e-4)
    # every LM-head call for prompt logprobs held at most 3 rows, though chunks were 8 rows
    assert max(seen) == 3 and sum(seen) >= sum(len(prompts[i]) - 1 for i in asking)
    assert engine.blocks.num_used == 0


def test_prompt_logprobs_after_a_prefix_cache_hit(checkpoint):
    """A prompt already in the prefix cache still gets every logprob (such requests compute
    their prompt rows instead of taking cached blocks), and later requests still hit."""
    folder, model = checkpoint
    engine = load_genserve(folder)
    prompt = make_prompts(VOCAB, lengths=(33,))[0]
    run(engine, [("warm", prompt, SamplingParams(max_new_tokens=2))])
    hits = engine.blocks.hits
    got = run(engine, [("ask", prompt, SamplingParams(max_new_tokens=2, prompt_logprobs=True))])
    assert [t.logprob for t in got["ask"][1:]] == pytest.approx(reference(model, prompt), abs=1e-4)
    run(engine, [("again", prompt, SamplingParams(max_new_tokens=2))])
    assert engine.blocks.hits > hits


@pytest.mark.parametrize("overlap", [False, True], ids=["waiting", "overlapped"])
def test_prompt_logprobs_survive_preemption_mid_prompt(checkpoint, overlap):
    """A decoding request grows until the cache is full while an asking request is still in
    its prompt: the asking one is preempted, computes its first rows again, and reports each
    prompt position once."""
    folder, model = checkpoint
    engine = load_genserve(folder, max_batch_prefill_tokens=4, max_batch_total_tokens=88,
                           max_total_tokens=88, max_input_tokens=80)
    engine.overlap = overlap
    short, long = make_prompts(VOCAB, lengths=(5, 70), shared_prefix=0)
    engine.add_request("decoding", short, SamplingParams(max_new_tokens=60, ignore_eos=True))
    asking = SamplingParams(max_new_tokens=4, ignore_eos=True, prompt_logprobs=True)
    got = run(engine, [("asking", long, asking)])
    assert engine.scheduler.num_preemptions > 0
    assert [t.id for t in got["asking"]] == long
    assert [t.logprob for t in got["asking"][1:]] == pytest.approx(reference(model, long), abs=1e-4)
    assert engine.blocks.num_used == 0
