"""Continuous batching rules: budgets, chunked prefill, TGI's admission rule, preemption."""

from genserve.engine.block_manager import BlockManager
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.scheduler import Scheduler, SchedulerConfig
from genserve.engine.sequence import FinishReason, Sequence, Status


def make(num_blocks=64, block_size=4, **cfg):
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))


def run_step(sched, plan, token=7):
    """Pretend the model ran: mark tokens computed and append a token where one was sampled."""
    for s in plan.scheduled:
        done = s.completes
        s.seq.num_computed += s.num_tokens
        if done:
            s.seq.output_ids.append(token)


def add(sched, n, rid):
    s = Sequence(rid, list(range(1, n + 1)), SamplingParams(max_new_tokens=100))
    sched.add(s)
    return s


def test_long_prompt_is_chunked_under_the_prefill_budget():
    sched = make(max_batch_prefill_tokens=10)
    s = add(sched, 25, "a")
    chunks = []
    while not s.output_ids:
        plan = sched.schedule()
        chunks.append(plan.scheduled[0].num_tokens)
        run_step(sched, plan)
    assert chunks == [10, 10, 5]


def test_decodes_and_new_prefill_share_a_step():
    sched = make(max_batch_prefill_tokens=100)
    a = add(sched, 5, "a")
    run_step(sched, sched.schedule())
    add(sched, 6, "b")
    plan = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in plan.scheduled] == [("a", 1), ("b", 6)]
    assert a.status is Status.RUNNING


def test_waiting_served_ratio_holds_back_single_arrivals():
    sched = make(max_batch_prefill_tokens=1000, waiting_served_ratio=0.5, max_waiting_tokens=3)
    for i in range(4):
        add(sched, 3, f"r{i}")
    run_step(sched, sched.schedule())  # all four admitted together
    add(sched, 3, "late")
    # 4 running * 0.5 = 2 waiting needed; one waits until max_waiting_tokens steps passed.
    admitted_at = None
    for step in range(6):
        plan = sched.schedule()
        if any(s.seq.request_id == "late" for s in plan.scheduled):
            admitted_at = step
            break
        run_step(sched, plan)
    assert admitted_at == 3  # held for exactly max_waiting_tokens decode steps


def test_a_nearly_full_batch_admits_in_groups_not_one_per_step():
    # TGI counts the requests that can join (free slots), not the queue: with 1 free slot of
    # 8 and a long queue, 8 * 0.5 = 4 joiners are needed, so the queue waits for
    # max_waiting_tokens steps instead of forcing a prefill into every decode step.
    sched = make(num_blocks=256, max_batch_size=8, max_batch_prefill_tokens=1000,
                 waiting_served_ratio=0.5, max_waiting_tokens=4)
    first = [add(sched, 3, f"r{i}") for i in range(8)]
    run_step(sched, sched.schedule())
    for i in range(20):
        add(sched, 3, f"q{i}")
    sched.finish(first[0], FinishReason.EOS)  # one slot frees
    admitted = []
    for step in range(6):
        plan = sched.schedule()
        admitted.append(sum(1 for s in plan.scheduled if s.num_tokens > 1))  # prefills
        run_step(sched, plan)
    assert admitted == [0, 0, 0, 0, 1, 0]
    for s in first[1:5]:
        sched.finish(s, FinishReason.EOS)  # now 4 free slots, 2 joiners needed: all 4 join
    plan = sched.schedule()
    assert sum(1 for s in plan.scheduled if s.num_tokens > 1) == 4


def test_max_batch_size_caps_running_sequences():
    sched = make(max_batch_size=2)
    for i in range(3):
        add(sched, 3, f"r{i}")
    plan = sched.schedule()
    assert len(plan.scheduled) == 2 and len(sched.waiting) == 1


def test_preemption_frees_the_newest_and_requeues_it_first():
    sched = make(num_blocks=4, block_size=2, max_batch_prefill_tokens=100)
    old = add(sched, 3, "old")
    new = add(sched, 3, "new")
    run_step(sched, sched.schedule())  # 2 blocks each: cache full
    assert sched.blocks.num_free == 0
    run_step(sched, sched.schedule())  # 4 tokens each fit exactly
    plan = sched.schedule()  # token 5 needs a third block: "new" is preempted
    assert plan.preempted == [new]
    assert [s.seq for s in plan.scheduled] == [old]
    assert new.status is Status.WAITING and sched.waiting[0] is new and new.block_table == []


def test_request_larger_than_the_cache_fails_instead_of_waiting_forever():
    sched = make(num_blocks=2, block_size=2)
    s = add(sched, 10, "huge")
    plan = sched.schedule()
    assert plan.failed == [s] and s.finish_reason is FinishReason.ERROR and "KV cache" in s.error


def test_finish_frees_blocks_immediately():
    sched = make()
    s = add(sched, 9, "a")
    sched.schedule()
    assert sched.blocks.num_used == 3
    sched.finish(s, FinishReason.ABORTED)
    assert sched.blocks.num_used == 0 and not sched.has_work
