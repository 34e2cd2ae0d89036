"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step runs the decodes of running sequences, continues chunked prefills, then admits
waiting requests under TGI's budgets and admission rule. When the KV cache is full, the
newest running sequence is preempted (its blocks freed, its tokens recomputed later, mostly
from the prefix cache), so no request fails because others are long.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from genserve.engine.block_manager import BlockManager
from genserve.engine.sequence import FinishReason, Sequence, Status

PREFILL_FLOOR = 256  # prompt tokens a step may always take, however many sequences decode


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_prefill_tokens: int = 4096  # tokens in one step: decode rows, then prompt chunks
    max_batch_size: int = 256  # sequences in one step
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    # LoRA: the most distinct adapters running requests may use (the device slots); None: no limit.
    max_loras: int | None = None


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens of the sequence computed this step, starting at seq.num_computed
    # Set by the engine at launch: the first position computed, and the block table it used
    # (a new list object after preemption, so a late result can tell).
    start: int = -1
    block_table: list[int] | None = None
    # Speculative decoding (spec_decode/): positions the scheduler reserved KV slots for past
    # the decode token, and the proposed tokens the step verifies (``num_tokens`` is then
    # 1 + len(spec): the last known token, then the proposals).
    lookahead: int = 0
    spec: list[int] = field(default_factory=list)

    @property
    def completes(self) -> bool:
        """After this step every token is computed, so the step samples a next token."""
        return self.seq.num_computed + self.num_tokens - len(self.spec) == len(self.seq)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # can never fit the cache

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled if s.num_tokens > 1 or not s.seq.num_generated)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, recompute_at: int | None = None):
        self.config, self.blocks = config, blocks
        # The model's ``recompute_at_length``: a decoding sequence that reaches this many known
        # tokens is preempted, so its whole cache is recomputed (a prefill of every token).
        self.recompute_at = recompute_at
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps_since_admission = 0
        self.num_preemptions = 0
        # Speculative decoding: how many positions past its decode token to reserve for a
        # sequence this step (set by the engine before each ``schedule``; None: no speculation).
        self.lookahead: Callable[[Sequence], int] | None = None
        # LoRA: running requests per adapter (at most ``max_loras`` distinct ones), and how
        # many steps the oldest request waiting for an adapter slot has waited.
        self.running_adapters: Counter[str] = Counter()
        self._slot_wait: tuple[str | None, int] = (None, 0)  # (that request's id, steps)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _start_running(self, seq: Sequence) -> None:
        self.running.append(seq)
        if seq.params.adapter_id is not None:
            self.running_adapters[seq.params.adapter_id] += 1

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        aid = seq.params.adapter_id
        if aid is not None:
            self.running_adapters[aid] -= 1
            if not self.running_adapters[aid]:
                del self.running_adapters[aid]

    def adapters_in_use(self) -> frozenset[str]:
        """The adapters running requests use: they hold device slots (``lora.slots``)."""
        return frozenset(self.running_adapters)

    def _adapter_may_join(self, seq: Sequence, behind_blocked: bool) -> bool:
        """Whether ``seq``'s LoRA adapter leaves the running requests within the device slots.
        A request behind one that waits for a slot may pass it only while the slot has been
        awaited for fewer than ``max_waiting_tokens`` steps: after that adapter requests are
        admitted in order, so the running adapters drain and the waiting one gets its slot."""
        aid, limit = seq.params.adapter_id, self.config.max_loras
        if aid is None or limit is None:
            return True
        if behind_blocked and self._slot_wait[1] >= self.config.max_waiting_tokens:
            return False
        return aid in self.running_adapters or len(self.running_adapters) < limit

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self._stop_running(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        """Choose this step's batch: which sequences run, and how many of their tokens.

        In order: (1) each running sequence that decodes gets 1 token, oldest first,
        preempting the newest running ones when the KV cache has no block for it; (2) chunked
        prefills in progress continue; (3) waiting requests are admitted, oldest first, under
        TGI's rule (with a batch running, only once ``waiting_served_ratio`` x running requests
        can join, or after ``max_waiting_tokens`` steps without admission). Prompt tokens are
        limited per step to ``max_batch_prefill_tokens`` less the step's decode rows (at least
        ``PREFILL_FLOOR``), sequences to ``max_batch_size``; blocks are allocated here. With
        ``max_loras`` set, running requests use at most that many distinct LoRA adapters: a
        request whose adapter has no slot waits (others may pass it for a bounded number of
        steps, ``_adapter_may_join``).

        Returns a ``SchedulerOutput``: ``scheduled`` (``ScheduledSeq``: the sequence and its
        ``num_tokens`` computed this step, from ``seq.num_computed`` on), ``preempted`` (freed,
        back at the head of the waiting queue, to be recomputed) and ``failed`` (requests that
        need more tokens of KV cache than the whole cache holds: finished with an error). Raises
        nothing: what cannot run now waits.
        """
        out = SchedulerOutput()

        # 1. Running sequences, oldest first; preempt the newest when blocks run out. Decodes
        #    first: they always run, and prefill tokens fill the rest of the step's budget.
        for seq in list(self.running):
            if seq not in self.running or not self._decoding(seq):
                continue  # preempted below to make room for an older one; or prefilling
            if seq.num_pending and seq.num_generated >= seq.params.max_new_tokens:
                continue  # its in-flight token is its last: nothing to compute for it
            if self.recompute_at is not None and seq.admitted_len < self.recompute_at <= len(seq):
                # Its cache, computed while it was shorter, went stale at this length: recompute
                # it. Counting an in-flight token, the re-prefill waits for it (admission skips
                # pending sequences), so overlapped steps recompute at the same length.
                self._preempt(seq, out)
                continue
            k = self.lookahead(seq) if self.lookahead is not None else 0
            if k and not self.blocks.can_append(seq, k):
                k = 0  # speculation never preempts anyone
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq in self.running:
                self.blocks.append_slot(seq, k)
                out.scheduled.append(ScheduledSeq(seq, 1, lookahead=k))
        running = set(map(id, self.running))
        out.scheduled = [s for s in out.scheduled if id(s.seq) in running]
        budget = self._prefill_budget(sum(1 + s.lookahead for s in out.scheduled))
        for seq in self.running:  # chunked prefills in progress
            if budget > 0 and not self._decoding(seq):
                n = min(seq.num_uncomputed, budget)
                budget -= n
                out.scheduled.append(ScheduledSeq(seq, n))

        # 2. Admit waiting requests. TGI's rule: with a running batch, admit only once at least
        #    ``waiting_served_ratio`` x running requests can join together, or once
        #    ``max_waiting_tokens`` decode steps have passed, so prefills come in batches
        #    instead of interrupting every decode step with a one-request prefill.
        decoding = len(self.running)
        min_new = 0
        if decoding and self.steps_since_admission < self.config.max_waiting_tokens:
            min_new = max(1, math.floor(decoding * self.config.waiting_served_ratio))
        admitted = 0
        if min_new == 0 or self._admissible(budget, min_new) >= min_new:
            slot_blocked: list[Sequence] = []  # waiting for a LoRA slot: stay at the head, in order
            while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
                seq = self.waiting[0]
                if seq.num_pending:  # preempted while its last token is in flight: next step
                    break
                if not self._adapter_may_join(seq, bool(slot_blocked)):
                    slot_blocked.append(self.waiting.popleft())
                    continue
                if not self.blocks.can_allocate(seq):
                    if not self.running and self.blocks.num_used == 0:
                        self.waiting.popleft()  # larger than the whole cache: it can never run
                        seq.status, seq.finish_reason = Status.FINISHED, FinishReason.ERROR
                        seq.error = (f"request needs {len(seq)} tokens of KV cache but the cache "
                                     f"holds {self.blocks.num_blocks * self.blocks.block_size}")
                        out.failed.append(seq)
                        continue
                    break
                self.waiting.popleft()
                self.blocks.allocate(seq)
                seq.status, seq.admitted_len = Status.RUNNING, len(seq)
                if seq.first_scheduled is None:
                    seq.first_scheduled = time.monotonic()
                self._start_running(seq)
                n = min(seq.num_uncomputed, budget)
                budget -= n
                out.scheduled.append(ScheduledSeq(seq, n))
                admitted += 1
            self.waiting.extendleft(reversed(slot_blocked))
            if slot_blocked:  # count the steps the oldest of them has waited
                head = slot_blocked[0].request_id
                self._slot_wait = (head, self._slot_wait[1] + 1 if head == self._slot_wait[0] else 1)
            else:
                self._slot_wait = (None, 0)
        self.steps_since_admission = 0 if admitted else self.steps_since_admission + 1
        return out

    @staticmethod
    def _decoding(seq: Sequence) -> bool:
        return seq.num_uncomputed == 1 and seq.num_generated > 0

    def _prefill_budget(self, decodes: int) -> int:
        """Prompt tokens this step may compute: ``max_batch_prefill_tokens`` less the step's
        decode rows, so no step is larger than that (the activation memory the warm-up
        allocated covers every step; vLLM's ``max_num_batched_tokens`` counts the same way).
        A floor keeps prompts moving when decodes alone would fill the budget."""
        limit = self.config.max_batch_prefill_tokens
        return max(limit - decodes, min(limit, PREFILL_FLOOR))

    def _admissible(self, budget: int, enough: int) -> int:
        """How many waiting requests could join now (free batch slots, prefill budget and KV
        blocks permitting), counting no further than ``enough``."""
        slots = self.config.max_batch_size - len(self.running)
        count, reserve = 0, 0
        adapters = set(self.running_adapters)
        blocked = False
        for seq in self.waiting:
            if count >= min(slots, enough) or budget <= 0 or seq.num_pending:
                break
            aid = seq.params.adapter_id
            if self.config.max_loras is not None and aid is not None and aid not in adapters:
                if len(adapters) >= self.config.max_loras:
                    blocked = True
                    continue  # waits for a slot
                adapters.add(aid)
            elif blocked and aid is not None and self._slot_wait[1] >= self.config.max_waiting_tokens:
                continue
            if not self.blocks.can_allocate(seq, reserve):
                break
            reserve += self.blocks.blocks_needed(len(seq))  # an upper bound: ignores prefix hits
            budget -= len(seq)
            count += 1
        return count

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a sequence (finished, aborted or failed) and free its blocks at once."""
        if seq.status is Status.FINISHED:
            return
        seq.status, seq.finish_reason = Status.FINISHED, reason
        seq.num_pending = 0
        if seq in self.running:
            self._stop_running(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.blocks.free_seq(seq)
