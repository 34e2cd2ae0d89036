"""The other tensor-parallel ranks, as a model runner sees them.

A runner's forward pass and LM head are collective calls: under tensor parallelism every rank
must make them together. The runner makes each through its ``Peers``, which it receives in its
constructor: ``Peers()`` (one rank, or a worker that mirrors rank 0) has no one to tell; the
sharded executor's ``ShardWorkers`` (``genserve.executor.shard_workers``) announces each call
to the workers before it runs, times it, and vouches for every step's results.

A contract, not a protocol found by ``hasattr``: the runner calls exactly these members.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from genserve.models.base import ForwardBatch


class Peers:
    """No other rank: every member is the identity (single-process engines, shard workers)."""

    #: Whether the engine may launch step N+1 before it reads step N's tokens. A sharded
    #: engine's supervisor must vouch for each step after it ran, so its steps never overlap.
    allows_overlap: bool = True

    @property
    def dead(self) -> str | None:
        """Why the other ranks cannot compute any more (a shard or a node was lost), even while
        no step runs; None while they can. Health checks read it."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                batch: ForwardBatch) -> AbstractContextManager:
        """Entered around one forward pass (``input_ids``/``positions`` [tokens], ``batch``
        the step's attention metadata and caches)."""
        return nullcontext()

    def logits(self, hidden: torch.Tensor) -> AbstractContextManager:
        """Entered around one LM-head call on ``hidden`` [rows, hidden_size]."""
        return nullcontext()

    def finish(self, step):
        """The step (a ``model_runner.LaunchedStep``) ``launch`` returns to the engine; may wait
        for it (the default does not). Untyped here: the runner module imports this one."""
        return step

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop the other ranks, waiting up to ``grace`` seconds (stop stepping first)."""
