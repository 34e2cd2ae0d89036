"""One request that makes a step raise fails alone: its batch mates produce exactly the tokens
they produce without it, and every KV block comes back (issue 16, item 10).

The bad requests are real failures, no mocks of the engine: sampler values that overflow their
int64 column (the issue's ``top_k`` = 2**63), prompt ids outside the embedding table (the forward
pass raises), and grammar constraints that raise while the runner fills the mask or while the
engine reads the token.
"""

import pytest

from genserve.engine.constraints import Constraint
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.sequence import FinishReason
from genserve.testing import load_genserve, make_prompts, reference_greedy

from .tinyllama import VOCAB  # the `checkpoint` fixture's vocabulary (conftest.py)


class RaisingConstraint(Constraint):
    """A grammar constraint that allows every token and raises at a chosen call."""

    def __init__(self, fail_in: str, after: int = 0):
        self.fail_in, self.after, self.calls = fail_in, after, 0

    def _maybe_raise(self, where: str) -> None:
        if where == self.fail_in:
            self.calls += 1
            if self.calls > self.after:
                raise RuntimeError(f"grammar broke in {where}")

    def fill_bitmask(self, bitmask, row: int) -> None:
        self._maybe_raise("fill_bitmask")

    def advance(self, token_id: int) -> None:
        self._maybe_raise("advance")

    def is_finished(self) -> bool:
        return False

    def rollback(self, num_tokens: int) -> None:
        pass  # it keeps no state of the tokens (it allows every one)

    def valid_prefix(self, token_ids: list[int]) -> int:
        return len(token_ids)


def good_requests():
    prompts = make_prompts(VOCAB, lengths=(5, 23, 9, 17))
    sampled = SamplingParams(max_new_tokens=10, ignore_eos=True, do_sample=True, temperature=0.9,
                             top_k=40, seed=7)
    return [(f"good{i}", p, SamplingParams(max_new_tokens=10, ignore_eos=True) if i != 2 else sampled)
            for i, p in enumerate(prompts)]


def drive(engine, requests, poison=None):
    """Run ``requests`` (id, prompt, params) together; ``poison(engine)`` runs after they are
    added, before the first step. Returns id -> (tokens, finish reason, error)."""
    got = {}
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
        got[rid] = ([], None, None)
    if poison is not None:
        poison(engine)
    for _ in range(200):
        if not engine.has_work:
            break
        for out in engine.step():
            ids, _, _ = got[out.request_id]
            ids += [t.id for t in out.tokens]
            got[out.request_id] = (ids, out.finish_reason if out.finished else None, out.error)
    assert not engine.has_work, "the engine did not drain"
    return got


@pytest.fixture(scope="module")
def alone(checkpoint):
    """Each good request's tokens when it runs by itself."""
    folder, model = checkpoint
    engine = load_genserve(folder)
    out = {}
    for rid, prompt, params in good_requests():
        out[rid] = drive(engine, [(rid, prompt, params)])[rid][0]
        if not params.do_sample:
            assert out[rid] == reference_greedy(model, prompt, 10)
    return out


def bad_prompt_id():
    return [5, 9, VOCAB + 3, 11]  # the embedding has no row VOCAB + 3


def overflow_after_admission(engine):
    """The issue's value, as if validation had let it through: the step's int64 sampler column
    overflows ("Overflow when unpacking long")."""
    engine.seqs["bad"].params.top_k = 2**63
    engine.seqs["bad"].params.do_sample = True


CASES = {
    "prompt id outside the vocabulary": (lambda: ("bad", bad_prompt_id(), SamplingParams(max_new_tokens=4)), None),
    "top_k overflows its column in the step": (
        lambda: ("bad", [3, 4, 5], SamplingParams(max_new_tokens=4)), overflow_after_admission),
    "constraint raises while the mask is filled": (
        lambda: ("bad", [3, 4, 5], SamplingParams(max_new_tokens=6, ignore_eos=True,
                                                  constraint=RaisingConstraint("fill_bitmask", after=2))), None),
    "constraint raises on the sampled token": (
        lambda: ("bad", [3, 4, 5], SamplingParams(max_new_tokens=6, ignore_eos=True,
                                                  constraint=RaisingConstraint("advance", after=1))), None),
}


@pytest.mark.parametrize("overlap", [False, True], ids=["waiting", "overlapped"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_request_fails_alone(checkpoint, alone, case, overlap):
    folder, _ = checkpoint
    # Small prefill chunks: the bad request and its mates share prefill and decode steps.
    engine = load_genserve(folder, max_batch_prefill_tokens=16)
    engine.overlap = overlap
    baseline = engine.blocks.num_used
    make_bad, poison = CASES[case]
    goods = good_requests()
    requests = goods[:2] + [make_bad()] + goods[2:]
    got = drive(engine, requests, poison)

    _, reason, error = got["bad"]
    assert reason is FinishReason.ERROR
    assert error.startswith("generation failed: ") and len(error) > len("generation failed: ")
    for rid, _, _ in goods:
        assert got[rid][1] is FinishReason.LENGTH, f"{rid} failed with its bad batch mate: {got[rid][2]}"
        assert got[rid][0] == alone[rid], f"{rid}: tokens differ from its run alone"
    assert engine.blocks.num_used == baseline  # nothing leaked, the failed request's blocks included
    assert not engine.seqs and not engine.scheduler.running and not engine.scheduler.waiting
    # and the engine goes on serving
    rid, prompt, params = goods[0]
    assert drive(engine, [(rid, prompt, params)])[rid][0] == alone[rid]


@pytest.mark.parametrize("params, word", [
    (SamplingParams(do_sample=True, top_k=2**63), "range"),
    (SamplingParams(do_sample=True, temperature=1e-320), "temperature"),
    (SamplingParams(do_sample=True, temperature=1e39), "temperature"),
    (SamplingParams(repetition_penalty=1e-40), "repetition_penalty"),
    (SamplingParams(frequency_penalty=float("nan")), "frequency_penalty"),
])
def test_values_the_sampler_cannot_take_are_refused_when_added(checkpoint, params, word):
    folder, _ = checkpoint
    engine = load_genserve(folder)
    with pytest.raises(ValueError, match=word):
        engine.add_request("bad", [3, 4, 5], params)
    assert not engine.seqs and not engine.has_work and engine.blocks.num_used == 0


def test_greedy_requests_ignore_sampling_only_values(checkpoint):
    """Temperature and top_k are not read for a greedy row (float_row/long_row neutralise
    them), so they cannot break it."""
    folder, _ = checkpoint
    engine = load_genserve(folder)
    engine.add_request("ok", [3, 4, 5], SamplingParams(max_new_tokens=2, top_k=2**70, temperature=1e-320))
    assert engine.has_work


def test_an_engine_failure_is_not_blamed_on_a_request(checkpoint, monkeypatch):
    """A lost tensor-parallel shard (EngineDeadError) stops the engine: the step does not retry
    request by request, so AsyncEngine marks the engine dead instead of failing one request at a
    time on a broken device."""
    from genserve.errors import EngineDeadError

    folder, _ = checkpoint
    engine = load_genserve(folder)
    calls = []

    def dead(scheduled):
        calls.append(len(scheduled))
        raise EngineDeadError("rank 1 died")

    monkeypatch.setattr(engine.runner, "launch", dead)
    for rid, prompt, params in good_requests():
        engine.add_request(rid, prompt, params)
    with pytest.raises(EngineDeadError):
        engine.step()
    assert calls == [len(good_requests())]  # one launch, no bisection
