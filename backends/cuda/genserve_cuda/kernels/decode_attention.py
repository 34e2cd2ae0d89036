"""Paged decode attention: one query token per sequence, flash-decoding style.

Grid ``(batch, kv_heads, splits)``. A program loads the query rows of every query head that
shares its KV head (GQA packing: K/V are read once per KV head, not once per query head) and
walks its slice of the context through the block table. With more than one split, each
program writes a normalised partial output and its log-sum-exp, and a second kernel merges
them; the split count depends only on host-known sizes, so the launch is CUDA-graph safe.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from genserve_cuda._triton import next_pow2
from genserve_cuda.kernels._attn_common import load_kv_tile, scores_log2

MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost outweighs the parallelism it adds
MAX_SPLITS = 32


# Values that change from step to step are not specialised on: otherwise each new class of
# them (1, a multiple of 16, other) compiles another variant in the middle of serving.
@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _decode_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, slopes_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_block, stride_c_tok, stride_c_h, stride_bt,
    scale, softcap, window, num_splits, head_dim, block_size, num_heads,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_ALIBI: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, F16_DOTS: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    q_pos = seq_len - 1
    start = 0
    if USE_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    # Every sequence splits its own span evenly, in whole tiles; later splits may be empty.
    chunk = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < head_dim
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if F16_DOTS:
        # float8 cache: e4m3 -> fp16 is one cvt per pair of values on sm89+, while e4m3 -> bf16
        # goes through fp32 and made the fp8 kernel slower than bf16 (bench/gpu_kernels.py
        # sweep). The dots (K tiles, V tiles, q, p) then run in fp16: q's bf16 values are exact
        # in fp16 below 65504 in magnitude (clamped there, never inf), p lies in [0, 1]; the
        # accumulators stay fp32.
        q = tl.minimum(tl.maximum(q, -65504.0), 65504.0).to(tl.float16)
    slopes = 0.0
    if USE_ALIBI:
        slopes = tl.load(slopes_ptr + heads, mask=gmask, other=0.0)[:, None] * 1.4426950408889634
    q_pos_rows = tl.full([GROUP_PAD], 0, tl.int32) + q_pos
    scale_log2 = scale * 1.4426950408889634

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        kmask = pos < hi
        k = load_kv_tile(cache_ptr, bt_row, pos, kmask, d, dmask, kvh,
                         block_size, stride_c_block, stride_c_tok, stride_c_h, True)
        s = scores_log2(q, k, scale_log2, softcap, pos, q_pos_rows, slopes,
                        USE_SOFTCAP, USE_ALIBI, DOT_PRECISION)
        s = tl.where(kmask[None, :], s, float("-inf"))
        # Each tile holds >= 1 visible key, so m_new is finite and no inf-inf appears.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = load_kv_tile(cache_ptr + stride_c_kv, bt_row, pos, kmask, d, dmask, kvh,
                         block_size, stride_c_block, stride_c_tok, stride_c_h, True)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if SPLIT:
        row = (b * num_heads + heads).to(tl.int64) * num_splits + split  # [B, H, S] layout
        tl.store(part_out_ptr + row[:, None] * head_dim + d[None, :], out, mask=omask)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=gmask)
    else:
        tl.store(out_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, num_splits, head_dim, num_heads,
    SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    smask = s < num_splits
    row = (b * num_heads + h).to(tl.int64) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh 0
    o = tl.load(part_out_ptr + row[:, None] * head_dim + d[None, :],
                mask=smask[:, None] & (d < head_dim)[None, :], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # the Triton interpreter on CPU: any small number
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def choose_num_splits(batch: int, num_kv_heads: int, max_seqlen_k: int, sm_count: int) -> int:
    """Enough programs for ~2 waves, never a split under MIN_SPLIT_TOKENS keys."""
    programs = batch * num_kv_heads
    by_occupancy = math.ceil(2 * sm_count / max(programs, 1))
    by_length = math.ceil(max_seqlen_k / MIN_SPLIT_TOKENS)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    max_seqlen_k: int,
    *,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,  # [H] fp32 on q's device
    logit_softcap: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    B, H, D = q.shape
    Hkv = kv_cache.shape[3]
    group = H // Hkv
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if num_splits is None:
        span = min(max_seqlen_k, sliding_window) if sliding_window else max_seqlen_k
        num_splits = choose_num_splits(B, Hkv, span, _sm_count(q.device))
    BLOCK_D = max(16, next_pow2(D))
    split = num_splits > 1
    if split:
        part_out = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _decode_kernel[(B, Hkv, num_splits)](
        q, kv_cache, block_tables, seq_lens, alibi_slopes if alibi_slopes is not None else q,
        out, part_out, part_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        scale, logit_softcap or 0.0, sliding_window or 0, num_splits, D, kv_cache.shape[2], H,
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)), BLOCK_D=BLOCK_D, BLOCK_N=block_n,
        USE_ALIBI=alibi_slopes is not None, USE_SOFTCAP=logit_softcap is not None,
        USE_WINDOW=sliding_window is not None, SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # None: the target's default
        F16_DOTS=kv_cache.element_size() == 1 and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _reduce_kernel[(B, H)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_splits, D, H,
            SPLITS_PAD=max(2, next_pow2(num_splits)), BLOCK_D=BLOCK_D,
        )
    return out
