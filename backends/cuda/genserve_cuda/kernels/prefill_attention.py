"""Attention for prefill, chunked prefill and mixed batches, over the paged cache or, for a
batch of fresh prompts, over this step's own K/V rows.

Grid ``(heads, batch, q_tiles)``, heaviest tiles first: a program takes ``BLOCK_M`` query
rows of one sequence and one head and streams that sequence's keys from the paged cache
(prefix-cache hits, earlier chunks and this step's tokens alike: the new K/V are written
first). Masking is by absolute position, so a sequence's query rows sit at
``seq_len - q_len ... seq_len - 1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genserve_cuda._triton import next_pow2
from genserve_cuda.kernels._attn_common import load_kv_rows, load_kv_tile, scores_log2


@triton.jit
def _load_tile(base, bt_row, pos, kmask, d, dmask, kvh, block_size, stride_block, stride_tok, stride_h,
               MASKED: tl.constexpr, PAGED: tl.constexpr):
    if PAGED:
        return load_kv_tile(base, bt_row, pos, kmask, d, dmask, kvh,
                            block_size, stride_block, stride_tok, stride_h, MASKED)
    return load_kv_rows(base, pos, kmask, d, dmask, kvh, stride_tok, stride_h, MASKED)


@triton.jit
def _attend_tile(acc, m, l, q, q_pos, n0, hi, k_base, v_base, bt_row, d, dmask, kvh, block_size,
                 stride_block, stride_tok, stride_h,
                 scale_log2, softcap, window, slope_log2,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 USE_ALIBI: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, PAGED: tl.constexpr):
    """One key tile of online softmax. ``MASKED=False`` only for tiles every row sees whole."""
    pos = n0 + tl.arange(0, BLOCK_N)
    kmask = pos < hi
    k = _load_tile(k_base, bt_row, pos, kmask, d, dmask, kvh, block_size, stride_block, stride_tok,
                   stride_h, MASKED, PAGED)
    s = scores_log2(q, k, scale_log2, softcap, pos, q_pos, slope_log2, USE_SOFTCAP, USE_ALIBI, DOT_PRECISION)
    if MASKED:
        rel = pos[None, :] - q_pos[:, None]
        allowed = kmask[None, :]
        if CAUSAL:
            allowed = allowed & (rel <= 0)
        if USE_WINDOW:
            allowed = allowed & (rel > -window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row may see no key of this tile (window, causal edge): keep it at exp2(-inf) = 0.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = m_new
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = _load_tile(v_base, bt_row, pos, kmask, d, dmask, kvh, block_size, stride_block, stride_tok,
                   stride_h, MASKED, PAGED)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l


# The block table's width changes from step to step: not specialised on (see decode_attention).
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, cu_q_ptr, slopes_ptr, out_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_block, stride_tok, stride_h, stride_bt,
    scale, softcap, window, head_dim, block_size,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, USE_ALIBI: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, PAGED: tl.constexpr,
):
    # PAGED: keys and values come from the cache through the block table (k_ptr, v_ptr are its
    # key and value halves). Otherwise every sequence is a fresh prompt (seq_len == q_len) and
    # they are this step's contiguous K/V rows, read directly: no table lookups, and loads
    # Triton can pipeline.
    # Causal tiles further down a sequence see more keys. The tile is the grid's slowest axis
    # and counts down, so the GPU (which starts programs in grid order) takes the heaviest
    # first and the last wave isn't a few long programs on an otherwise idle GPU.
    h = tl.program_id(0)
    b = tl.program_id(1)
    tile = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len  # keys already cached before this step's tokens
    kvh = h // GROUP

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < q_len
    q_pos = ctx + rows
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    slope_log2 = 0.0
    if USE_ALIBI:
        slope_log2 = tl.load(slopes_ptr + h) * 1.4426950408889634
    scale_log2 = scale * 1.4426950408889634

    # Keys some row of this tile can see: [lo, hi). Tiles below ``full`` are visible to every
    # row (no window, and before the first row's position when causal) and skip the masking.
    hi = seq_len
    full = seq_len
    if CAUSAL:
        hi = tl.minimum(seq_len, ctx + (tile + 1) * BLOCK_M)
        full = ctx + tile * BLOCK_M + 1
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx + tile * BLOCK_M - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        full = lo  # window edges vary per row: mask everything
    full = (full // BLOCK_N) * BLOCK_N

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_base = k_ptr
    v_base = v_ptr
    if not PAGED:
        k_base += q_start.to(tl.int64) * stride_tok
        v_base += q_start.to(tl.int64) * stride_tok
    for n0 in range(lo, full, BLOCK_N):
        acc, m, l = _attend_tile(acc, m, l, q, q_pos, n0, hi, k_base, v_base, bt_row, d, dmask, kvh,
                                 block_size, stride_block, stride_tok, stride_h,
                                 scale_log2, softcap, window, slope_log2, BLOCK_N, False, CAUSAL,
                                 USE_ALIBI, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, PAGED)
    for n0 in range(tl.maximum(lo, full), hi, BLOCK_N):
        acc, m, l = _attend_tile(acc, m, l, q, q_pos, n0, hi, k_base, v_base, bt_row, d, dmask, kvh,
                                 block_size, stride_block, stride_tok, stride_h,
                                 scale_log2, softcap, window, slope_log2, BLOCK_N, True, CAUSAL,
                                 USE_ALIBI, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, PAGED)

    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # rows that saw nothing give zeros
    tl.store(out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device, paged: bool = True,
                   max_seqlen_q: int = 0) -> dict:
    """Tile sizes ``{block_m, block_n, num_warps, num_stages}``, chosen with
    bench/prefill_attention.py for bf16/fp16 and head_dim <= 128 (the measurements:
    backends/cuda/NOTES.md, "Prefill attention: tiles and cuDNN").

    Paged: 128x128 tiles, 2 stages. Fresh prompts, whose K/V loads are plain strided rows that
    Triton pipelines deeper: 128x64 with 3 stages for long prompts (``max_seqlen_q`` >= 2048),
    64x64 with 4 warps for short ones (more programs to fill the GPU). fp32 tiles of those
    sizes overflow shared memory: fp32 gets 128x64 with 2 stages; larger heads and other
    devices 64x64.
    """
    if device.type == "cuda" and head_dim <= 128 and dtype.itemsize == 2:
        if paged:
            return dict(block_m=128, block_n=128, num_warps=8, num_stages=2)
        if max_seqlen_q >= 2048:
            return dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
        return dict(block_m=64, block_n=64, num_warps=4, num_stages=3)
    if device.type == "cuda" and head_dim <= 128:
        return dict(block_m=128, block_n=64, num_warps=8, num_stages=2)
    return dict(block_m=64, block_n=64, num_warps=4, num_stages=2)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    max_seqlen_q: int,
    scale: float,
    **kwargs,
) -> torch.Tensor:
    """Attention of this step's query rows over each sequence's whole paged context."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    return _launch(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale,
                   strides=(k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)),
                   block_size=kv_cache.shape[2], paged=True, **kwargs)


def fresh_prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]: this step's keys, every sequence starting at position 0
    v: torch.Tensor,  # [T, Hkv, D]
    seq_lens: torch.Tensor,  # [B] int32, equal to the query lengths
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    max_seqlen_q: int,
    scale: float,
    **kwargs,
) -> torch.Tensor:
    """Attention for a batch of fresh prompts (nothing cached yet): K/V are read from this step's
    rows instead of through the block table. Same numbers as the paged path."""
    if k.stride() != v.stride() or k.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    return _launch(q, k, v, cu_seqlens_q, seq_lens, cu_seqlens_q, max_seqlen_q, scale,
                   strides=(0, k.stride(0), k.stride(1)), block_size=1, paged=False, **kwargs)


def _launch(
    q, k, v, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale, *, strides, block_size, paged,
    causal: bool = True,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    T, H, D = q.shape
    B = seq_lens.shape[0]
    Hkv = k.shape[-2]
    if out is None:
        out = torch.empty_like(q)
    if T == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    cfg = default_config(D, q.dtype, q.device, paged, max_seqlen_q)
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    grid = (H, B, triton.cdiv(max_seqlen_q, block_m))
    _prefill_kernel[grid](
        q, k, v, block_tables, seq_lens, cu_seqlens_q,
        alibi_slopes if alibi_slopes is not None else q, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *strides, block_tables.stride(0),
        scale, logit_softcap or 0.0, sliding_window or 0, D, block_size,
        GROUP=H // Hkv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(D)),
        CAUSAL=causal, USE_ALIBI=alibi_slopes is not None, USE_SOFTCAP=logit_softcap is not None,
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # None: the target's default
        PAGED=paged,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out
