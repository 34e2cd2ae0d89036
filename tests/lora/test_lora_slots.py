"""More adapters than device slots (--max-loras): least-recently-used slots, a scheduler that
never runs more adapters than slots, and every request still gets exactly its adapter (PEFT)."""

import pytest
from genserve.engine.block_manager import BlockManager
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.scheduler import Scheduler, SchedulerConfig
from genserve.engine.sequence import FinishReason, Sequence
from genserve.errors import ConfigError
from genserve.lora.slots import SlotTable
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

NEW_TOKENS = 8
NAMES = ["a0", "a1", "a2", "a3", "a4"]


# -- the slot table ---------------------------------------------------------------------------
def test_lru_order_and_pins():
    table = SlotTable(2)
    assert table.assign(["x"]) == ({"x": 0}, [(0, "x")])
    assert table.assign(["y"]) == ({"y": 1}, [(1, "y")])
    assert table.assign(["x"]) == ({"x": 0}, [])  # resident: no load; x is now the most recent
    assert table.assign(["z"]) == ({"z": 1}, [(1, "z")])  # y was least recently used
    assert table.slot_of("y") is None
    # x is least recently used now, but a running request holds it: z goes instead.
    table.in_use = lambda: {"x"}
    assert table.assign(["w"]) == ({"w": 1}, [(1, "w")])
    assert list(table.resident) == ["x", "w"]
    assert table.loads == 4
    with pytest.raises(RuntimeError, match="one step needs 3 LoRA adapters but there are only 2 slots"):
        table.assign(["x", "w", "v"])
    table.in_use = lambda: {"x", "w"}
    with pytest.raises(RuntimeError, match="all 2 LoRA slots hold adapters in use"):
        table.assign(["v"])
    table.drop("w")  # unloaded: its slot is free again
    assert table.assign(["v"]) == ({"v": 1}, [(1, "v")])


# -- the scheduler ----------------------------------------------------------------------------
def lora_sched(max_loras, **cfg):
    return Scheduler(SchedulerConfig(max_loras=max_loras, max_batch_prefill_tokens=1000,
                                     waiting_served_ratio=0.0, **cfg), BlockManager(256, 4))


def add(sched, rid, adapter, new_tokens=3):
    seq = Sequence(rid, [1, 2, 3], SamplingParams(max_new_tokens=new_tokens, adapter_id=adapter))
    sched.add(seq)
    return seq


def step(sched):
    """Schedule and pretend the model ran; retire sequences that reached max_new_tokens.
    Returns the ids scheduled and checks the slot invariant."""
    plan = sched.schedule()
    adapters = {s.seq.params.adapter_id for s in plan.scheduled} - {None}
    assert len(adapters) <= sched.config.max_loras, adapters
    assert len(sched.running_adapters) <= sched.config.max_loras
    for s in plan.scheduled:
        done = s.completes
        s.seq.num_computed += s.num_tokens
        if done:
            s.seq.output_ids.append(7)
            if s.seq.num_generated >= s.seq.params.max_new_tokens:
                sched.finish(s.seq, FinishReason.LENGTH)
    return [s.seq.request_id for s in plan.scheduled]


def test_request_waits_for_a_slot_then_runs():
    sched = lora_sched(2)
    add(sched, "r0", "A")
    add(sched, "r1", "B")
    add(sched, "r2", "C")  # a third adapter: no slot while A and B run
    add(sched, "r3", None)  # the base model needs no slot: passes it
    add(sched, "r4", "A")  # A is running: passes it too
    first = step(sched)
    assert first == ["r0", "r1", "r3", "r4"]
    assert [s.request_id for s in sched.waiting] == ["r2"]
    seen = set(first)
    for _ in range(10):
        seen |= set(step(sched))
        if not sched.has_work:
            break
    assert "r2" in seen and not sched.has_work  # served once a slot freed; nothing lost


def test_no_starvation_behind_a_busy_adapter():
    """Requests for running adapter A keep arriving; the one for C, blocked by the slot limit,
    may be passed only for max_waiting_tokens steps, then A drains and C gets its slot."""
    sched = lora_sched(1, max_waiting_tokens=3)
    add(sched, "a-0", "A", new_tokens=4)
    add(sched, "c", "C")
    step(sched)
    admitted_c = None
    for i in range(1, 30):
        add(sched, f"a-{i}", "A", new_tokens=4)
        if "c" in step(sched):
            admitted_c = i
            break
    assert admitted_c is not None, "the request for C starved"
    assert admitted_c <= 3 + 4 + 1  # bypass window, then the running A requests finish


def test_preempted_requests_keep_their_slot_accounting():
    sched = Scheduler(SchedulerConfig(max_loras=1, max_batch_prefill_tokens=1000, waiting_served_ratio=0.0),
                      BlockManager(3, 4))  # 3 blocks of 4 tokens: two requests can't both grow
    add(sched, "x", "A", new_tokens=6)
    add(sched, "y", "A", new_tokens=6)
    for _ in range(30):
        step(sched)
        if not sched.has_work:
            break
    assert not sched.has_work and not sched.running_adapters
    assert sched.num_preemptions > 0


# -- the engine, against PEFT -----------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-slots")
    base = save_base(root / "base")
    adapters = {name: make_adapter(base, root / name, seed=10 + i, r=2 + i % 3,
                                   target_modules=ALL_TARGETS if i % 2 == 0 else ["q_proj", "v_proj", "down_proj"])
                for i, name in enumerate(NAMES)}
    return base, adapters


@pytest.fixture(scope="module")
def references(files):
    base, adapters = files
    return {None: peft_model(base, None), **{n: peft_model(base, p) for n, p in adapters.items()}}


def spec(adapters):
    return ",".join(f"{n}={p}" for n, p in adapters.items())


def test_more_adapters_than_slots_match_peft(files, references):
    base, adapters = files
    engine = load_with_adapters(base, spec(adapters), max_loras=2, max_lora_rank=8)
    manager = engine.runner.lora
    assert manager.max_loras == 2 and engine.config.scheduler.max_loras == 2
    assert manager.table.in_use == engine.scheduler.adapters_in_use  # running adapters are pinned
    assert tuple(manager.layers["layers.0.self_attn.qkv_proj"].a.shape) == (2, 24, 64)
    ps = make_prompts(256, lengths=(7, 13, 5, 11, 9, 6), shared_prefix=3)
    items = [(ps[i % len(ps)], NAMES[i % 5] if i % 6 else None) for i in range(12)]
    want = [reference_greedy(references[a], p, NEW_TOKENS) for p, a in items]
    assert generate(engine, items, NEW_TOKENS) == want
    assert generate(engine, items, NEW_TOKENS, join_every=1) == want
    # Every adapter had to be brought in, and some more than once (evicted, then reloaded).
    assert manager.table.loads > len(NAMES)
    # Logits too, for an adapter just reloaded into a slot another adapter used before.
    for name in ("a3", "a0"):
        (ours,) = batch_logits(engine, [(ps[1], name)])
        diff = (ours - reference_logits(references[name], ps[1])).abs().max().item()
        assert diff <= 1e-3, f"{name}: logits differ by {diff:.2e}"


def test_limits_are_checked(files, tmp_path):
    base, adapters = files
    with pytest.raises(ConfigError, match=r"LoRA adapter 'a2': module .* has rank 4, above --max-lora-rank 3"):
        load_with_adapters(base, spec(adapters), max_lora_rank=3)
    with pytest.raises(ConfigError, match="--max-loras must be at least 1"):
        load_with_adapters(base, spec(adapters), max_loras=0)
    with pytest.raises(ConfigError, match="--max-loras and --max-lora-rank need LoRA adapters"):
        load_with_adapters(base, None, max_loras=2)
