"""The contract of a proposer plugin (``genserve_register_spec_proposers``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from genserve.engine.model_runner import ModelRunner
    from genserve.engine.sequence import Sequence


@dataclass
class ProposerContext:
    """What a proposer may build itself from, at engine build time (before the KV cache is
    sized, so a proposer with its own KV can say how much it needs per block)."""

    args: Any  # the parsed flags (genserve.args)
    plugins: Any  # genserve.plugins.Plugins: to build a draft model of any registered architecture
    backend: Any  # the engine's backend (device, options)
    dtype: torch.dtype
    target_model: Any  # the target CausalLM
    target_config: Any  # its Hugging Face config
    tokenizer: Any  # the target's tokenizer (None: token ids only)
    num_speculative_tokens: int  # k


@dataclass
class ProposalRequest:
    """One sequence to propose for: ``seq.all_ids`` are its known tokens (the last one not yet
    computed by the target), ``k`` the most tokens to propose (>= 1)."""

    seq: Sequence
    k: int


@dataclass
class TargetHidden:
    """What the target computed for one sequence in a step, for proposers that draft from its
    hidden states (``Proposer.needs_hidden_states``): ``hidden`` [n, hidden_size] are the
    target's final hidden states (the LM head's input, after the final norm) at positions
    ``start .. start + n - 1`` whose K/V the step kept (a verify step's accepted rows only).
    The row at ``len(seq) - 2``, when present, is the one the last known token was sampled from.

    ``hidden`` is a view of the step's output, valid only during ``observe`` (a CUDA graph
    replay overwrites it): a proposer copies what it keeps."""

    seq: Sequence
    start: int
    hidden: torch.Tensor


class Proposer(ABC):
    """Offers tokens for the target model to verify. Registered by name through
    ``genserve_register_spec_proposers``; ``--speculative-method NAME`` or the automatic choice
    (``spec_decode.build``) picks one.

    A proposer's tokens never change what is generated (``verify``): only how many tokens a
    step emits. It may keep per-request state, released in ``forget``.
    """

    name: ClassVar[str] = "?"
    # Whether it drafts from the target's hidden states (Medusa, EAGLE): the runner then keeps
    # each step's hidden states (those it computes logits from; no second forward) and the
    # engine hands every sequence's kept rows to ``observe`` once the step's tokens are known.
    # Proposers that leave it False cost nothing.
    needs_hidden_states: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def create(cls, ctx: ProposerContext) -> Proposer:
        """Build the proposer. Raises ``genserve.errors.ConfigError`` when it cannot serve this
        model and these flags (e.g. a draft model whose tokenizer differs)."""

    def kv_bytes_per_block(self, block_size: int, kv_dtype: torch.dtype) -> int:
        """Bytes of its own KV cache per block of the engine's cache (0: it keeps none). The
        cache is sized with the target's and the proposer's bytes per block together."""
        return 0

    def bind(self, runner: ModelRunner, num_blocks: int) -> None:
        """Called once the target's runner exists and its cache holds ``num_blocks`` blocks."""

    @abstractmethod
    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        """Up to ``r.k`` token ids for each request (an empty list: nothing to propose).
        Sequences are decoding: every token but the last is in the target's KV cache, and
        their block tables have slots for ``k`` positions past the last token."""

    def observe(self, rows: list[TargetHidden]) -> None:
        """After each step, with ``needs_hidden_states``: the rows the target computed for each
        sequence still running (see ``TargetHidden``), in the step's order. Called before the
        next ``propose``; a sequence preempted since the step is left out."""

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted: drop its state."""
