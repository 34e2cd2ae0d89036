"""Flags plus the model's traits -> the frozen ``EngineConfig`` (vLLM's
``EngineArgs.create_engine_config()``), in two pure steps:

1. ``resolve_cache``: what the flags ask of the KV cache before its size is known (block size,
   cache dtype, capacity flag, the most blocks the scheduler could use);
2. ``create_engine_config``: once the cache holds ``num_blocks``, every limit, TGI's way
   (limits follow the model and the cache unless given; given ones are checked), and whether
   prefix caching is safe for this model.

Nothing here touches a device, a file or a plugin: ``args`` is the namespace of
``genserve.args`` (``defaults(...)`` builds one), ``traits`` what the loaded model says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from genserve.engine.config import EngineConfig
from genserve.engine.kv_sizing import CacheRequest
from genserve.engine.scheduler import SchedulerConfig
from genserve.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
DEFAULT_MAX_POSITIONS = 4096  # a config without max_position_embeddings
DEFAULT_MAX_BATCH_SIZE = 256
MIN_PREFILL_TOKENS = 512


@dataclass(frozen=True)
class ModelTraits:
    """What the resolver needs to know about the model being served."""

    max_position_embeddings: int | None = None  # from its config; None: not stated
    is_encoder_decoder: bool = False
    # Set where the model's KV depends on the sequence's length past this many tokens
    # (longrope's two factor sets): ``CausalLM.recompute_at_length``.
    recompute_at_length: int | None = None

    @classmethod
    def of(cls, model, hf_config) -> ModelTraits:
        """The traits of a constructed model and its Hugging Face config."""
        # Composite configs (vision-language models) state it in their text model's config,
        # which such a model keeps as ``model.config``.
        return cls(getattr(hf_config, "max_position_embeddings", None)
                   or getattr(model.config, "max_position_embeddings", None) or None,
                   model.is_encoder_decoder,
                   model.recompute_at_length)


def resolve_dtype(args, backend_default: torch.dtype) -> torch.dtype:
    """--dtype, else the backend's default."""
    return DTYPES[args.dtype] if args.dtype else backend_default


def _requested_limits(args, traits: ModelTraits) -> tuple[int, int]:
    """(max_total_tokens, max_input_tokens) before the cache is sized: the flags, else the
    model's positions (4096 when its config does not say)."""
    max_total = args.max_total_tokens or traits.max_position_embeddings or DEFAULT_MAX_POSITIONS
    return max_total, args.max_input_tokens or max_total - 1


def resolve_cache(args, traits: ModelTraits, dtype: torch.dtype) -> CacheRequest:
    """What the flags ask of the KV cache (``kv_sizing.num_kv_blocks`` turns it into blocks)."""
    kv_dtype = DTYPES[args.kv_cache_dtype] if args.kv_cache_dtype else dtype
    max_total, _ = _requested_limits(args, traits)
    max_blocks = -(-max_total // args.block_size) * (args.max_batch_size or DEFAULT_MAX_BATCH_SIZE)
    return CacheRequest(args.block_size, kv_dtype, args.max_batch_total_tokens, max_blocks)


def prefix_caching_off(args, traits: ModelTraits) -> str | None:
    """Why blocks of shared prompt prefixes must not be reused (None: they may be). A block's
    hash covers its tokens and those before it, nothing else: KV that depends on more would
    be handed to requests it does not belong to."""
    if args.disable_prefix_caching:
        return "--disable-prefix-caching"
    if traits.is_encoder_decoder:
        return "encoder-decoder: the decoder's KV depends on the encoder input"
    if traits.recompute_at_length is not None:
        return "the model's KV depends on the sequence's length (longrope)"
    return None


def create_engine_config(args, traits: ModelTraits, dtype: torch.dtype, num_blocks: int) -> EngineConfig:
    """The frozen engine config for a KV cache of ``num_blocks`` blocks.

    TGI's defaults: --max-total-tokens defaults to min(the model's positions, the cache's
    tokens) and --max-input-tokens to one less. Raises ``ConfigError`` when the limits given
    contradict each other or the cache.
    """
    cache = resolve_cache(args, traits, dtype)
    cache_tokens = num_blocks * cache.block_size
    max_total, max_input = _requested_limits(args, traits)
    # Prefill budget from the limits as given (before fitting them to the cache), as TGI does.
    prefill = args.max_batch_prefill_tokens or max(max_input + 50, MIN_PREFILL_TOKENS)
    if args.max_total_tokens is None:
        max_total = min(traits.max_position_embeddings or max_total, cache_tokens)
        if args.max_input_tokens is None:
            max_input = max_total - 1
    if max_input >= max_total:
        raise ConfigError(f"--max-input-tokens ({max_input}) must be smaller than "
                          f"--max-total-tokens ({max_total})")
    if max_total > cache_tokens:
        raise ConfigError(f"--max-total-tokens ({max_total}) is larger than the KV cache "
                          f"({cache_tokens} tokens); lower it or raise --max-batch-total-tokens")
    no_prefix_cache = prefix_caching_off(args, traits)
    if no_prefix_cache and not args.disable_prefix_caching:
        logger.info("prefix caching off: %s", no_prefix_cache)
    return EngineConfig(
        dtype=dtype,
        kv_cache_dtype=DTYPES[args.kv_cache_dtype] if args.kv_cache_dtype else None,  # None: dtype
        block_size=cache.block_size,
        num_blocks=num_blocks,
        max_batch_total_tokens=args.max_batch_total_tokens,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        enable_prefix_caching=no_prefix_cache is None,
        scheduler=SchedulerConfig(
            max_batch_prefill_tokens=prefill,
            max_batch_size=args.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
            waiting_served_ratio=args.waiting_served_ratio,
            max_waiting_tokens=args.max_waiting_tokens,
        ),
        watermark_gamma=args.watermark_gamma,
        watermark_delta=args.watermark_delta,
        overlap_steps=not args.disable_overlap_steps,
    )
