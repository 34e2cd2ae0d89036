"""The config resolver on its own: flags + model traits -> one frozen EngineConfig.

No model, device or plugin is involved: every case is a namespace of flags (``defaults``) and
a ``ModelTraits``.
"""

import dataclasses

import pytest
import torch

from genserve.args import defaults
from genserve.engine.config_resolver import (
    ModelTraits,
    create_engine_config,
    prefix_caching_off,
    resolve_cache,
    resolve_dtype,
)
from genserve.engine.kv_sizing import CacheRequest, kv_bytes_per_block, num_kv_blocks
from genserve.errors import ConfigError
from genserve.models.base import KVCacheSpec

LLAMA = ModelTraits(max_position_embeddings=2048)


def resolve(traits=LLAMA, num_blocks=1024, **flags):
    return create_engine_config(defaults(**flags), traits, torch.float32, num_blocks)


def test_config_is_frozen():
    config = resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.enable_prefix_caching = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scheduler.max_batch_size = 1


@pytest.mark.parametrize("traits, flags, reason", [
    (LLAMA, {"disable_prefix_caching": True}, "--disable-prefix-caching"),
    (ModelTraits(512, is_encoder_decoder=True), {}, "encoder-decoder"),
    (ModelTraits(131072, recompute_at_length=4096), {}, "longrope"),
])
def test_prefix_caching_off_for_each_reason(traits, flags, reason):
    # (LoRA adapters no longer turn it off: block hashes chain from the request's adapter,
    # tests/engine/test_block_manager.py and tests/lora/test_lora_parity.py.)
    assert resolve(LLAMA).enable_prefix_caching  # on unless something rules it out
    assert reason in prefix_caching_off(defaults(**flags), traits)
    assert resolve(traits, **flags).enable_prefix_caching is False


def test_tgi_default_limits_follow_model_and_cache():
    # The cache (1024 blocks of 16) holds more than the model's 2048 positions: the model wins.
    c = resolve(num_blocks=1024)
    assert (c.max_total_tokens, c.max_input_tokens) == (2048, 2047)
    assert c.scheduler.max_batch_prefill_tokens == 2047 + 50  # from the limits as given
    assert c.scheduler.max_batch_size == 256 and c.num_blocks == 1024 and c.block_size == 16
    # A smaller cache (40 blocks of 16 = 640 tokens) caps them.
    c = resolve(num_blocks=40)
    assert (c.max_total_tokens, c.max_input_tokens) == (640, 639)
    # A config without max_position_embeddings counts as 4096 positions.
    c = resolve(ModelTraits(None), num_blocks=1024)
    assert (c.max_total_tokens, c.max_input_tokens) == (4096, 4095)
    # Given limits are kept; a given input limit survives a fitted total.
    c = resolve(max_total_tokens=300, max_input_tokens=200)
    assert (c.max_total_tokens, c.max_input_tokens) == (300, 200)
    assert c.scheduler.max_batch_prefill_tokens == 512  # never below 512
    c = resolve(max_input_tokens=100, num_blocks=40)
    assert (c.max_total_tokens, c.max_input_tokens) == (640, 100)


def test_inconsistent_limits_are_config_errors_with_todays_messages():
    with pytest.raises(ConfigError, match=r"^--max-input-tokens \(100\) must be smaller than "
                                          r"--max-total-tokens \(50\)$"):
        resolve(max_input_tokens=100, max_total_tokens=50)
    with pytest.raises(ConfigError, match=r"^--max-total-tokens \(1000\) is larger than the KV cache "
                                          r"\(640 tokens\); lower it or raise --max-batch-total-tokens$"):
        resolve(max_total_tokens=1000, num_blocks=40)
    # An input limit at or above a fitted total is refused too.
    with pytest.raises(ConfigError, match="must be smaller"):
        resolve(max_input_tokens=640, num_blocks=40)


def test_flags_reach_the_config():
    c = resolve(block_size=4, max_batch_size=8, max_batch_prefill_tokens=64, kv_cache_dtype="fp8_e5m2",
                waiting_served_ratio=0.5, max_waiting_tokens=7, watermark_gamma=0.25,
                watermark_delta=1.5, max_batch_total_tokens=4096, disable_overlap_steps=True)
    assert (c.block_size, c.scheduler.max_batch_size, c.scheduler.max_batch_prefill_tokens) == (4, 8, 64)
    assert c.kv_cache_dtype == torch.float8_e5m2 and c.dtype == torch.float32
    assert (c.scheduler.waiting_served_ratio, c.scheduler.max_waiting_tokens) == (0.5, 7)
    assert (c.watermark_gamma, c.watermark_delta, c.max_batch_total_tokens) == (0.25, 1.5, 4096)
    assert c.overlap_steps is False and resolve().overlap_steps is True
    assert resolve().kv_cache_dtype is None  # the model's dtype
    assert resolve_dtype(defaults(), torch.bfloat16) == torch.bfloat16
    assert resolve_dtype(defaults(dtype="float16"), torch.bfloat16) == torch.float16


def test_cache_request_and_block_count():
    req = resolve_cache(defaults(block_size=4, max_batch_size=8), LLAMA, torch.float32)
    # Every sequence at full length: ceil(2048 / 4) blocks for each of 8 sequences.
    assert req == CacheRequest(4, torch.float32, None, 512 * 8)
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8)
    per_block = kv_bytes_per_block(spec, 4, torch.float32)
    assert per_block == 2 * 2 * 4 * 2 * 8 * 4
    assert num_kv_blocks(req, per_block, lambda: 100 * per_block + 1) == 100
    assert num_kv_blocks(req, per_block, lambda: 10**12) == 512 * 8  # capped
    with pytest.raises(ConfigError, match="not enough memory left for a single KV-cache block"):
        num_kv_blocks(req, per_block, lambda: per_block - 1)
    # --max-batch-total-tokens decides alone (rounded up to blocks), memory is not asked.
    given = resolve_cache(defaults(block_size=4, max_batch_total_tokens=10), LLAMA, torch.float32)
    assert num_kv_blocks(given, per_block, lambda: pytest.fail("memory was read")) == 3
    fp8 = resolve_cache(defaults(kv_cache_dtype="fp8"), LLAMA, torch.bfloat16)
    assert fp8.kv_cache_dtype == torch.float8_e4m3fn
