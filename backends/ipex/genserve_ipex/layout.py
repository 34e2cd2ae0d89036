"""genserve's KV-cache layout and the two layouts IPEX's paged kernels read.

genserve's contract (``genserve.attention.base``): one tensor per layer,
``[2, num_blocks, block_size, num_kv_heads, head_dim]``.

IPEX wants key and value caches as two tensors, in a layout that depends on the device:

- ``NHD`` ``[num_blocks, block_size, num_kv_heads, head_dim]``: the XPU flash-decoding kernels
  (``reshape_and_cache_flash`` / ``flash_attn_varlen_func``). This is exactly
  ``kv_cache[0]`` / ``kv_cache[1]`` of our layout: no conversion, no copy.
- ``HND`` ``[num_blocks, num_kv_heads, block_size, head_dim]``: the CPU kernels
  (``reshape_and_cache`` / ``flash_attn_varlen_func`` / ``single_query_cached_kv_attention``).
  Here the runner allocates the storage head-major and hands the model a *transposed view*
  that has our contract's shape; the kernels get the contiguous head-major tensors back with
  one more transpose. Nothing is copied, and a write through either view is seen by the other.

The kernels write the cache in place, so a copy would silently lose the writes: the views
below refuse storage that is not already laid out as the kernel needs.
"""

from __future__ import annotations

import torch

NHD = "NHD"  # block-major, then token, then head: our layout
HND = "HND"  # block-major, then head, then token


def layout_for_device(device: torch.device) -> str:
    return HND if device.type == "cpu" else NHD


def allocate_kv_cache(shape: tuple[int, ...], layout: str, dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    """A zeroed cache of contract ``shape`` ``[2, N, B, H, D]`` whose storage is in ``layout``."""
    two, num_blocks, block_size, heads, dim = shape
    if layout == NHD:
        return torch.zeros(shape, dtype=dtype, device=device)
    if layout == HND:
        storage = torch.zeros((two, num_blocks, heads, block_size, dim), dtype=dtype, device=device)
        return storage.transpose(2, 3)  # contract shape, head-major storage
    raise ValueError(f"unknown KV-cache layout {layout!r}")


def ipex_views(kv_cache: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache) as IPEX's kernels for ``layout`` read them, sharing storage."""
    if layout == NHD:
        both = kv_cache
        expected = "allocated contiguous (genserve's default)"
    elif layout == HND:
        both = kv_cache.transpose(2, 3)
        expected = "allocated head-major by genserve_ipex.runner.IpexModelRunner"
    else:
        raise ValueError(f"unknown KV-cache layout {layout!r}")
    if not both.is_contiguous():
        raise ValueError(
            f"the KV cache is not in IPEX's {layout} layout (it must be {expected}); "
            "its kernels write in place, so a converted copy would lose the writes"
        )
    return both[0], both[1]

