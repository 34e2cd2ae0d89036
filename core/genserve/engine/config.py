"""Engine settings resolved from the CLI flags and the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genserve.engine.scheduler import SchedulerConfig


@dataclass
class EngineConfig:
    dtype: torch.dtype = torch.float32
    kv_cache_dtype: torch.dtype | None = None  # None: same as dtype
    block_size: int = 16
    num_blocks: int | None = None  # None: from the backend's memory budget
    max_batch_total_tokens: int | None = None  # KV-cache capacity in tokens (TGI's flag)
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    enable_prefix_caching: bool = True
    scheduler: SchedulerConfig = SchedulerConfig()
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
