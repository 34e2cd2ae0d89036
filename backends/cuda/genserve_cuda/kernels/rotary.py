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
    pos_ptr, x_ptr, out_ptr, cos_ptr, sin_ptr,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_cos,
    num_heads, head_dim, half,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_TAIL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
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
    src = x_ptr + t * stride_xt + h * stride_xh
    dst = out_ptr + t * stride_ot + h * stride_oh
    x1 = tl.load(src + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    tl.store(dst + i1[None, :], (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(dst + i2[None, :], (x2 * cos + x1 * sin).to(ty), mask=mask)
    if HAS_TAIL:  # partial rotary: the dims past rotary_dim pass through
        j = 2 * half + tl.arange(0, BLOCK_TAIL)
        tmask = (h < num_heads) & (j < head_dim)[None, :]
        tl.store(dst + j[None, :], tl.load(src + j[None, :], mask=tmask), mask=tmask)


def _rope_one(positions, x, cos, sin, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    half = rotary_dim // 2
    tail = D - rotary_dim
    _rope_kernel[(T,)](
        positions, x, out, cos, sin,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
        H, D, half,
        BLOCK_H=next_pow2(H), BLOCK_HALF=max(2, next_pow2(half)), BLOCK_TAIL=max(2, next_pow2(tail)),
        INTERLEAVED=interleaved, HAS_TAIL=tail > 0,
    )
    return out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool = False):
    """q [T, H, D], k [T, Hkv, D], cos/sin [max_pos, rotary_dim/2] fp32 -> rotated (q, k)."""
    assert cos.stride(-1) == 1 and sin.stride(0) == cos.stride(0)
    return (_rope_one(positions, q, cos, sin, rotary_dim, interleaved),
            _rope_one(positions, k, cos, sin, rotary_dim, interleaved))
