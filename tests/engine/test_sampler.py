"""The batched sampler against transformers' logits processors and basic probability facts."""

import math

import pytest
import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper,
                          TypicalLogitsWarper)

from genserve.engine.constraints import unpack_bitmask
from genserve.engine.sampler import SamplingBatch, apply_penalties, filter_sorted, sample, uniform_noise
from genserve.engine.sampling_params import SamplingParams

V = 50


def batch(params, seeds=None, steps=None, histories=None, outputs=None):
    n = len(params)
    return SamplingBatch.build(params, seeds or list(range(n)), steps or [0] * n,
                               histories or [[] for _ in params], outputs or [[] for _ in params], "cpu")


@pytest.mark.parametrize("warper,kw", [
    (TopKLogitsWarper(top_k=7), {"top_k": 7}),
    (TopPLogitsWarper(top_p=0.6), {"top_p": 0.6}),
    (TypicalLogitsWarper(mass=0.7), {"typical_p": 0.7}),
])
def test_filters_keep_the_same_tokens_as_transformers(warper, kw):
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    b = batch([SamplingParams(do_sample=True, **kw)] * 4)
    ours = torch.isfinite(filter_sorted(logits, b))
    theirs = torch.isfinite(warper(None, logits.clone()))
    assert torch.equal(ours, theirs)


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(1)
    logits = torch.randn(2, V)
    hist = [[1, 5, 5, 9], [2, 3]]
    b = batch([SamplingParams(repetition_penalty=1.3)] * 2, histories=hist)
    ours = apply_penalties(logits.clone(), b)
    for row in range(2):
        theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([hist[row]]), logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row], theirs[0])


def test_frequency_and_presence_penalties_use_output_counts():
    logits = torch.zeros(1, V)
    b = batch([SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)], outputs=[[4, 4, 4, 7]])
    out = apply_penalties(logits, b)
    assert out[0, 4].item() == pytest.approx(-(0.5 * 3 + 0.25))
    assert out[0, 7].item() == pytest.approx(-(0.5 + 0.25))
    assert out[0, 0].item() == 0.0


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    torch.manual_seed(2)
    logits = torch.randn(3, V)
    b = batch([SamplingParams(), SamplingParams(do_sample=True, temperature=5.0), SamplingParams()])
    out = sample(logits, b)
    assert out.tokens[0] == logits[0].argmax() and out.tokens[2] == logits[2].argmax()


def test_seeded_sampling_ignores_batch_mates_and_position():
    torch.manual_seed(3)
    row = torch.randn(1, V)
    p = SamplingParams(do_sample=True, temperature=1.5, top_k=20)
    alone = sample(row, batch([p], seeds=[1234], steps=[5])).tokens[0]
    mates = torch.cat([torch.randn(2, V), row, torch.randn(1, V)])
    other = SamplingParams(do_sample=True, top_p=0.5)
    mixed = sample(mates, batch([other, other, p, SamplingParams()], seeds=[1, 2, 1234, 3], steps=[0, 9, 5, 1]))
    assert mixed.tokens[2] == alone


def test_sampling_follows_the_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    n = 4000
    counts = torch.zeros(4)
    p = SamplingParams(do_sample=True)
    for seed in range(n):
        counts[sample(logits, batch([p], seeds=[seed], steps=[0])).tokens[0]] += 1
    freq = counts / n
    # 4000 draws: a binomial standard error under 0.008; allow 4 of them.
    assert torch.all((freq - probs).abs() < 0.032), (freq, probs)


def test_uniform_noise_is_uniform_and_deterministic():
    u = uniform_noise(torch.tensor([7, 8]), torch.tensor([0, 0]), 20000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(u, uniform_noise(torch.tensor([7, 8]), torch.tensor([0, 0]), 20000))
    assert not torch.equal(u[0], u[1])


def test_logprob_and_top_tokens_come_from_the_processed_distribution():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    out = sample(logits, batch([SamplingParams(top_n_tokens=2)]))
    lp = logits.log_softmax(-1)[0]
    assert out.tokens[0] == 1 and out.logprobs[0].item() == pytest.approx(lp[1].item())
    assert out.top_ids[0].tolist() == [1, 3]


def test_grammar_bitmask_forbids_tokens():
    logits = torch.tensor([[5.0, 1.0, 0.0, 4.0] + [0.0] * 36])
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = 1 << 3  # only token 3 allowed
    b = batch([SamplingParams()])
    b.allowed = unpack_bitmask(bitmask, 40)
    assert sample(logits, b).tokens[0] == 3


def test_watermark_biases_a_gamma_fraction():
    logits = torch.zeros(1, 4000)
    b = batch([SamplingParams(watermark=True)], histories=[[17]])
    b.watermark_gamma, b.watermark_delta = 0.25, 2.0
    from genserve.engine.sampler import apply_watermark

    out = apply_watermark(logits, b)
    green = (out[0] == 2.0).float().mean().item()
    assert math.isclose(green, 0.25, abs_tol=0.03)
