"""The engine's side of speculative decoding: which sequences speculate this step, asking the
proposer, and the counts ``/metrics`` and ``details`` report."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from genserve.engine.constraints import speculative_prefix
from genserve.engine.scheduler import ScheduledSeq
from genserve.engine.sequence import Sequence
from genserve.spec_decode.base import ProposalRequest, Proposer, TargetHidden
from genserve.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from genserve.engine.model_runner import LaunchedStep, StepResult

logger = logging.getLogger(__name__)


class Speculator:
    """Owns the proposer for one engine. Each step: ``lookahead_for(num_decoding)`` is given to
    the scheduler (how many slots to reserve per sequence), then ``propose`` fills the decode
    rows of the scheduled batch with proposals."""

    def __init__(self, proposer: Proposer, config: SpeculativeConfig, recompute_at: int | None = None,
                 max_total_tokens: int | None = None):
        self.proposer, self.config = proposer, config
        self.recompute_at = recompute_at  # the model's recompute_at_length (longrope), or None
        self.max_total_tokens = max_total_tokens  # the engine's limit: positions never reach it
        self.enabled = True  # False while the decode batch is above config.max_batch_size
        self.num_proposed = 0  # over the engine's life
        self.num_accepted = 0

    def lookahead_for(self, num_decoding: int) -> Callable[[Sequence], int] | None:
        """The scheduler's per-sequence lookahead for a step with ``num_decoding`` running
        sequences, or None when the step should not speculate (said in the log on change)."""
        enabled = num_decoding <= self.config.max_batch_size
        if enabled != self.enabled:
            self.enabled = enabled
            if enabled:
                logger.info("speculation back on: %d sequences decoding (<= %d)",
                            num_decoding, self.config.max_batch_size)
            else:
                logger.info("speculation off: %d sequences decoding, more than "
                            "--speculative-max-batch-size %d", num_decoding, self.config.max_batch_size)
        return self.lookahead if enabled else None

    def lookahead(self, seq: Sequence) -> int:
        """Positions to reserve past ``seq``'s decode token: k, less what it may still generate
        (a verify step emits at most 1 + k tokens) and positions the model must not compute.
        Grammar-constrained sequences speculate too: ``propose`` cuts their proposals to what
        the grammar accepts, and the runner masks each verify row (``engine.constraints``)."""
        p = seq.params
        k = min(self.config.num_tokens, p.max_new_tokens - seq.num_generated - 1)
        if self.recompute_at is not None and seq.admitted_len < self.recompute_at:
            # Positions past recompute_at - 2 would be computed with the short-context rotary
            # factors that the recomputation at that length replaces.
            k = min(k, self.recompute_at - 1 - len(seq))
        if self.max_total_tokens is not None:
            # Without speculation the last position computed is max_total_tokens - 2 (the
            # token at max_total_tokens - 1 ends the request): past it lie positions the model
            # may not have (its rotary tables end at max_position_embeddings).
            k = min(k, self.max_total_tokens - 1 - len(seq))
        return max(k, 0)

    def propose(self, scheduled: list[ScheduledSeq]) -> None:
        """Fill ``spec`` (and ``num_tokens``) of the scheduled decode rows that have lookahead."""
        rows = [s for s in scheduled if s.lookahead > 0]
        if not rows:
            return
        proposals = self.proposer.propose([ProposalRequest(s.seq, s.lookahead) for s in rows])
        for s, tokens in zip(rows, proposals):
            tokens = list(tokens[:s.lookahead])
            if tokens and s.seq.params.constraint is not None:
                tokens = tokens[:self._grammar_prefix(s.seq, tokens)]
            s.spec, s.num_tokens = tokens, 1 + len(tokens)

    def _grammar_prefix(self, seq: Sequence, tokens: list[int]) -> int:
        """How many of a grammar-constrained sequence's proposals to verify: a proposal the
        grammar forbids could never be accepted (its verify row's mask forbids it), and the
        masks of the rows after it could not be computed. A grammar that fails here costs the
        sequence this step's proposals; the runner's mask fill then fails the request alone."""
        try:
            return speculative_prefix(seq.params.constraint, tokens)
        except Exception as exc:
            logger.error("request %s: its grammar failed on the proposals; no proposals this step: %s",
                         seq.request_id, exc, exc_info=exc)
            return 0

    def observe(self, scheduled: list[ScheduledSeq], results: list[StepResult], step: LaunchedStep) -> None:
        """Hand a completed step's hidden states to a proposer that drafts from them: each
        sequence still running and not preempted since the launch gets the rows whose K/V it
        kept (all its rows; of a verify row, the last known token's and the accepted ones)."""
        if not self.proposer.needs_hidden_states or step.hidden is None:
            return
        rows = []
        for s, r, row0 in zip(scheduled, results, step.row_starts):
            seq = s.seq
            if seq.is_finished or seq.block_table is not s.block_table:
                continue
            n = 1 + len(r.accepted) if s.spec else s.num_tokens
            rows.append(TargetHidden(seq, s.start, step.hidden[row0:row0 + n]))
        if rows:
            self.proposer.observe(rows)

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        seq.spec_proposed += proposed
        seq.spec_accepted += accepted
        self.num_proposed += proposed
        self.num_accepted += accepted

    def forget(self, seq: Sequence) -> None:
        self.proposer.forget(seq.request_id)
