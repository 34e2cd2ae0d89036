"""Write the step's new keys and values into the paged KV cache.

One program per token writes all its KV heads for both K and V. A negative slot means
"padding" (CUDA-graph batches are padded to a captured size) and writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genserve_cuda._triton import next_pow2


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_slot, stride_c_h,
    num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_kv_heads) & (d < head_dim) & (slot >= 0)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + slot * stride_c_slot + h * stride_c_h + d
    out_ty = cache_ptr.dtype.element_ty
    tl.store(dst, k.to(out_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(out_ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D]; slot_mapping: [T]."""
    T, Hkv, D = k.shape
    if T == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    # Slots index blocks*block_size rows, which needs the block and token dims contiguous.
    assert kv_cache.stride(1) == kv_cache.shape[2] * kv_cache.stride(2), "KV cache blocks must be dense"
    assert kv_cache.stride(-1) == 1
    _write_kv_kernel[(T,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        Hkv, D,
        BLOCK_H=next_pow2(Hkv), BLOCK_D=max(16, next_pow2(D)),
    )
