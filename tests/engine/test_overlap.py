"""Overlapped steps (launch step N+1 before reading step N) give exactly the outputs of
waiting for every step: same tokens, logprobs, finish reasons, and no leaked KV blocks."""

import pytest
import torch

from genserve.engine.offline import OfflineRequest, OutputCollector, iter_steps
from genserve.engine.sampling_params import SamplingParams
from genserve.testing import load_genserve, make_prompts, reference_greedy


def engine_for(folder, overlap, **flags):
    engine = load_genserve(folder, **flags)
    engine.overlap = overlap
    return engine


def drive(engine, requests, abort_at=None):
    """``requests``: (join step, id, prompt, params). Returns id -> (ids, logprobs, reason)."""
    offline = [OfflineRequest(prompt, params, join_step=join, request_id=rid)
               for join, rid, prompt, params in requests]
    collector = OutputCollector(offline)
    for step, outputs in enumerate(iter_steps(engine, offline)):
        collector.add(outputs)
        if abort_at and step + 1 == abort_at[0]:  # before step abort_at[0]
            aborted = engine.abort(abort_at[1])
            collector.add([aborted] if aborted else [])
        assert step + 1 < 500, "the engine did not drain"
    return {r.request_id: (r.outputs[0].token_ids, r.outputs[0].logprobs, r.outputs[0].finish_reason)
            for r in collector.results()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid][0] == b[rid][0], f"{rid}: tokens differ"
        assert a[rid][2] == b[rid][2], f"{rid}: finish reasons differ"
        assert a[rid][1] == pytest.approx(b[rid][1], abs=1e-5), f"{rid}: logprobs differ"


def test_greedy_batch_with_chunking_and_preemption_matches_transformers(checkpoint):
    folder, model = checkpoint
    prompts = make_prompts(256, lengths=(5, 23, 9, 40, 17, 31))
    flags = dict(max_batch_prefill_tokens=8, max_batch_total_tokens=96, max_total_tokens=96,
                 max_input_tokens=80)
    requests = [(i, f"r{i}", p, SamplingParams(max_new_tokens=16, ignore_eos=True))
                for i, p in enumerate(prompts)]
    overlapped = engine_for(folder, True, **flags)
    got = drive(overlapped, requests)
    assert overlapped.scheduler.num_preemptions > 0  # the small cache forced preemption
    assert_same(got, drive(engine_for(folder, False, **flags), requests))
    for i, p in enumerate(prompts):
        assert got[f"r{i}"][0] == reference_greedy(model, p, 16)
    assert overlapped.blocks.num_used == 0


def test_mixed_parameters_and_early_stops_match_the_waiting_engine(checkpoint):
    folder, _ = checkpoint
    prompts = make_prompts(256, lengths=(6, 12, 20, 8, 14, 10, 9))
    sync = engine_for(folder, False)
    sampled = dict(do_sample=True, temperature=1.5, seed=11)  # varied tokens, reproducible
    stop_tok = drive(sync, [(0, "probe", prompts[1], SamplingParams(max_new_tokens=12, **sampled))])
    probe = stop_tok["probe"][0]
    cut = next(i for i in range(3, len(probe)) if probe[i] not in probe[:i])
    stop_id = probe[cut]  # a token greedy first emits mid-way: request "stop" ends there
    requests = [
        (0, "greedy", prompts[0], SamplingParams(max_new_tokens=20, ignore_eos=True)),
        (0, "stop", prompts[1], SamplingParams(max_new_tokens=30, stop_token_ids=[stop_id], **sampled)),
        (1, "seeded", prompts[2], SamplingParams(max_new_tokens=15, do_sample=True, temperature=0.8,
                                                 top_k=20, top_p=0.9, seed=7)),
        (1, "top-n", prompts[3], SamplingParams(max_new_tokens=9, top_n_tokens=3)),
        (3, "details", prompts[4], SamplingParams(max_new_tokens=4, prompt_logprobs=True)),
        (4, "one", prompts[5], SamplingParams(max_new_tokens=1)),
        (6, "late-sampled", prompts[6], SamplingParams(max_new_tokens=11, do_sample=True, seed=3)),
    ]
    assert_same(drive(engine_for(folder, True), requests), drive(engine_for(folder, False), requests))
    overlapped = drive(engine_for(folder, True), requests)
    assert overlapped["stop"][0] == probe[:cut + 1]
    assert overlapped["stop"][2] == "stop_sequence"
    assert len(overlapped["one"][0]) == 1


def test_penalties_make_the_engine_wait_and_still_match(checkpoint):
    folder, _ = checkpoint
    prompts = make_prompts(256, lengths=(6, 12, 9))
    requests = [
        (0, "plain", prompts[0], SamplingParams(max_new_tokens=12, ignore_eos=True)),
        (2, "penalised", prompts[1], SamplingParams(max_new_tokens=12, repetition_penalty=1.5,
                                                    frequency_penalty=0.5, ignore_eos=True)),
        (3, "watermarked", prompts[2], SamplingParams(max_new_tokens=8, watermark=True,
                                                      do_sample=True, seed=1, ignore_eos=True)),
    ]
    overlapped = engine_for(folder, True)
    assert_same(drive(overlapped, requests), drive(engine_for(folder, False), requests))
    assert overlapped._num_host_history == 0  # every finished request was forgotten


def test_abort_of_an_in_flight_request_frees_its_blocks(checkpoint):
    folder, _ = checkpoint
    prompts = make_prompts(256, lengths=(6, 12))
    requests = [(0, "kept", prompts[0], SamplingParams(max_new_tokens=10, ignore_eos=True)),
                (0, "aborted", prompts[1], SamplingParams(max_new_tokens=50, ignore_eos=True))]
    engine = engine_for(folder, True)
    got = drive(engine, requests, abort_at=(4, "aborted"))
    want = drive(engine_for(folder, False), requests, abort_at=(4, "aborted"))
    assert got["kept"] == want["kept"]
    assert got["aborted"][2] is None or got["aborted"][2] == "aborted"
    assert len(got["aborted"][0]) < 50
    assert engine.blocks.num_used == 0 and not engine.seqs


def test_outputs_lag_one_step_when_overlapping(checkpoint):
    # The point of overlapping: the first step returns before the device's token is read.
    folder, _ = checkpoint
    engine = engine_for(folder, True)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert engine.step() == []
    assert engine.has_work
    outs = engine.step()
    assert [o.request_id for o in outs] == ["a"] and len(outs[0].tokens) == 1
    with torch.inference_mode():
        while engine.has_work:
            engine.step()
    assert engine.blocks.num_used == 0


def test_a_step_that_fails_to_complete_is_not_completed_again(checkpoint):
    # The async engine fails the requests of a step that raised and carries on; the broken
    # in-flight step must be gone, or every later step would raise again.
    folder, _ = checkpoint
    engine = engine_for(folder, True)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_new_tokens=5, ignore_eos=True))
    engine.step()
    broken = engine._in_flight[1]
    broken.results = lambda: (_ for _ in ()).throw(RuntimeError("device error"))
    with pytest.raises(RuntimeError):
        engine.step()
    assert engine._in_flight is None or engine._in_flight[1] is not broken


def test_the_flag_turns_overlap_off(checkpoint, monkeypatch):
    folder, _ = checkpoint
    engine = load_genserve(folder)  # CPU: its runner doesn't overlap
    assert engine.overlap is False
    monkeypatch.setattr(type(engine.runner), "overlap_steps", True)  # as a GPU runner does
    assert load_genserve(folder).overlap is True
    assert load_genserve(folder, disable_overlap_steps=True).overlap is False
