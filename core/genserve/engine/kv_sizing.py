"""How many KV-cache blocks an engine gets: pure arithmetic, before any runner exists.

The count feeds the config resolver (TGI's limits follow the cache), so it is settled from
the model's KV-cache spec and the backend's memory budget alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from genserve.errors import ConfigError
from genserve.models.base import KVCacheSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheRequest:
    """What the flags ask of the KV cache, before its size is known (``config_resolver.resolve_cache``)."""

    block_size: int  # tokens per block
    kv_cache_dtype: torch.dtype
    max_batch_total_tokens: int | None  # TGI's --max-batch-total-tokens: the capacity, if given
    max_blocks: int  # never more than the scheduler could use: every sequence at full length


def kv_bytes_per_block(spec: KVCacheSpec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block over all layers: K and V, ``block_size`` tokens of this rank's heads."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize


def num_kv_blocks(request: CacheRequest, bytes_per_block: int, budget_bytes) -> int:
    """Blocks for ``--max-batch-total-tokens`` when given (rounded up), else as many as
    ``budget_bytes()`` (the backend's free memory, read only when needed) holds, capped at
    ``request.max_blocks``. Raises ``ConfigError`` when not even one block fits."""
    bs = request.block_size
    if request.max_batch_total_tokens:
        return -(-request.max_batch_total_tokens // bs)
    blocks = int(min(budget_bytes() // bytes_per_block, request.max_blocks))
    if blocks < 1:
        raise ConfigError("not enough memory left for a single KV-cache block")
    logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", blocks, bs, blocks * bytes_per_block / 2**20)
    return blocks
