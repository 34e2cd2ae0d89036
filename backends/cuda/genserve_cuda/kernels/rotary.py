"""Rotary embedding in one pass, matching ``genserve.layers.rotary.RotaryEmbedding``.

One program per token and tensor: rotates the leading ``rotary_dim`` of every head (neox
halves or GPT-J interleaved pairs), copies the tail, reads the fp32 cos/sin cache once.
Math is in fp32 (the module rounds through the activation dtype, so results agree to an ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genserve_cuda._triton import next_pow2


@triton.jit
def _rope_kernel(
    pos_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cos, num_q_heads, num_k_heads, head_dim, half,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_TAIL: tl.constexpr,
):
    # One launch for q and k: axis 1 picks the tensor (launches cost more than this math).
    t = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        src_t = q_ptr + t * stride_qt
        dst_t = qo_ptr + t * stride_qot
        stride_h, stride_oh, num_heads = stride_qh, stride_qoh, num_q_heads
    else:
        src_t = k_ptr + t * stride_kt
        dst_t = ko_ptr + t * stride_kot
        stride_h, stride_oh, num_heads = stride_kh, stride_koh, num_k_heads
    p = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    h = tl.arange(0, BLOCK_H)[:, None]
    imask = i < half
    cos = tl.load(cos_ptr + p * stride_cos + i, mask=imask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + p * stride_cos + i, mask=imask, other=0.0)[None, :]
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + half
    mask = (h < num_heads) & imask[None, :]
    src = src_t + h * stride_h
    dst = dst_t + h * stride_oh
    x1 = tl.load(src + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    ty = qo_ptr.dtype.element_ty
    tl.store(dst + i1[None, :], (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(dst + i2[None, :], (x2 * cos + x1 * sin).to(ty), mask=mask)
    if HAS_TAIL:  # partial rotary: the dims past rotary_dim pass through
        j = 2 * half + tl.arange(0, BLOCK_TAIL)
        tmask = (h < num_heads) & (j < head_dim)[None, :]
        tl.store(dst + j[None, :], tl.load(src + j[None, :], mask=tmask), mask=tmask)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool = False):
    """q [T, H, D], k [T, Hkv, D], cos/sin [max_pos, rotary_dim/2] fp32 -> rotated (q, k)."""
    assert cos.stride(-1) == 1 and sin.stride(0) == cos.stride(0)
    assert q.dtype == k.dtype and q.shape[-1] == k.shape[-1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    T, H, D = q.shape
    Hk = k.shape[1]
    qo = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((T, Hk, D), dtype=k.dtype, device=k.device)
    if T == 0:
        return qo, ko
    half = rotary_dim // 2
    tail = D - rotary_dim
    _rope_kernel[(T, 2)](
        positions, q, k, qo, ko, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0),
        H, Hk, D, half,
        BLOCK_H=next_pow2(max(H, Hk)), BLOCK_HALF=max(2, next_pow2(half)), BLOCK_TAIL=max(2, next_pow2(tail)),
        INTERLEAVED=interleaved, HAS_TAIL=tail > 0,
    )
    return qo, ko
