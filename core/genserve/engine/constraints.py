"""The interface grammar-constrained decoding plugs into the sampler with.

A constraint follows one request. Each step the runner asks every constrained request to
fill its row of a shared token bitmask (llguidance/xgrammar layout: int32 words, bit ``t % 32``
of word ``t // 32`` allows token ``t``), and the sampler applies the whole mask at once.

Speculative decoding needs two more things of a constraint (as vLLM's structured-output
backends do): to tell how many proposed tokens the grammar accepts without consuming them
(``valid_prefix``), and to undo consumed tokens (``rollback``): the runner walks the matcher
through a sequence's proposals to fill the mask of each verify row, then rolls it back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Constraint(ABC):
    """One sequence's grammar state (e.g. ``genserve.server.grammar.LLGuidanceConstraint``).
    ``SamplingParams.constraint`` holds one; the engine refuses anything else."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (CPU int32 tensor [rows, words],
        ``words = bitmask_words(vocab_size)``). After the grammar finished, at least the EOS
        token(s) are allowed (the row is never all zero)."""

    @abstractmethod
    def advance(self, token_id: int) -> None:
        """Consume ``token_id``, a token the current mask allows (consuming another one is an
        error the constraint may raise on or keep as an error state)."""

    @abstractmethod
    def is_finished(self) -> bool:
        """The grammar accepts no further token (generation ends as on EOS)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` ``advance`` calls (0 <= num_tokens <= the number made),
        including one that finished the grammar: afterwards masks, ``is_finished`` and
        ``valid_prefix`` are what they were before those calls. Raises ``ValueError`` for more
        tokens than were consumed."""

    @abstractmethod
    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many leading ``token_ids`` the grammar accepts one after another from its current
        state (token i allowed after tokens 0..i-1), without changing the state. Ids outside
        the vocabulary are not accepted; once the grammar is finished, 0."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, words] int32 -> [B, vocab_size] bool, on the bitmask's device."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = (bitmask[:, :, None] >> bits) & 1  # [B, words, 32]
    return allowed.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def fill_verify_bitmask(constraint: Constraint, bitmask: torch.Tensor, row: int,
                        proposals: list[int]) -> None:
    """Fill ``bitmask[row + j]`` for j = 0..len(proposals) with the mask after consuming
    ``proposals[:j]``: the rows of one verify step (the proposals past the last known token).
    The constraint ends where it started. ``proposals`` must be a prefix the grammar accepts
    (``speculative_prefix``) so that every advance is legal."""
    consumed = 0
    try:
        constraint.fill_bitmask(bitmask, row)
        for j, token in enumerate(proposals):
            constraint.advance(token)
            consumed += 1
            constraint.fill_bitmask(bitmask, row + 1 + j)
    finally:
        constraint.rollback(consumed)


def speculative_prefix(constraint: Constraint, proposals: list[int]) -> int:
    """How many leading ``proposals`` a verify step may check under ``constraint``: the ones the
    grammar accepts, up to (not including) a token after which it is finished. Such a token
    ends the request, so the verify row that would check it samples it anyway (its mask
    allows it) and the step computes no rows after it. The constraint ends where it
    started."""
    n = constraint.valid_prefix(proposals)
    consumed = 0
    try:
        for token in proposals[:n]:
            constraint.advance(token)
            consumed += 1
            if constraint.is_finished():
                return consumed - 1
    finally:
        constraint.rollback(consumed)
    return n
