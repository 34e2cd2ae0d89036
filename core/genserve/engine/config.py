"""Engine settings resolved once from the CLI flags and the model (``config_resolver``), then
frozen: every component receives them in its constructor and nobody changes them after."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from genserve.engine.scheduler import SchedulerConfig


@dataclass(frozen=True)
class EngineConfig:
    dtype: torch.dtype = torch.float32
    kv_cache_dtype: torch.dtype | None = None  # None: same as dtype
    block_size: int = 16
    num_blocks: int | None = None  # KV-cache blocks; None: not sized yet (runners built by hand)
    max_batch_total_tokens: int | None = None  # KV-cache capacity in tokens (TGI's flag)
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    enable_prefix_caching: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    # False under --disable-overlap-steps; True leaves it to the runner (``ModelRunner.overlap_steps``).
    overlap_steps: bool = True
