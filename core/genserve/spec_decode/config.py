"""The speculative-decoding settings, resolved from the flags (``build.resolve``)."""

from __future__ import annotations

from dataclasses import dataclass

# Above this many decoding sequences a step verifies no proposals: a large batch already keeps
# the device busy, so k extra rows per sequence cost time instead of hiding in idle bandwidth.
DEFAULT_MAX_BATCH_SIZE = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    num_tokens: int  # k: most tokens proposed per sequence and step (--speculate)
    method: str  # the proposer's registry name
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # --speculative-max-batch-size
    model: str | None = None  # --speculative-model: the draft checkpoint
