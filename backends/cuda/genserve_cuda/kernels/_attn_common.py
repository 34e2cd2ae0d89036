"""Pieces shared by the decode and prefill kernels (inlined by Triton)."""

import triton
import triton.language as tl

@triton.jit
def tanh(x):
    # tanh via exp: libdevice names differ between CUDA and ROCm builds of Triton.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def load_kv_tile(cache_ptr, bt_row_ptr, pos, kmask, d, dmask, kvh,
                 block_size, stride_c_block, stride_c_tok, stride_c_h, CHECK_N: tl.constexpr):
    """Gather a [BLOCK_N, BLOCK_D] tile of one KV head at absolute positions ``pos``.

    ``CHECK_N=False`` for tiles known to lie inside the sequence: no predicate on the loads.
    """
    if CHECK_N:
        blk = tl.load(bt_row_ptr + pos // block_size, mask=kmask, other=0).to(tl.int64)
        mask = kmask[:, None] & dmask[None, :]
    else:
        blk = tl.load(bt_row_ptr + pos // block_size).to(tl.int64)
        mask = dmask[None, :]
    off = blk * stride_c_block + (pos % block_size) * stride_c_tok + kvh * stride_c_h
    return tl.load(cache_ptr + off[:, None] + d[None, :], mask=mask, other=0.0)


@triton.jit
def load_kv_rows(base_ptr, pos, kmask, d, dmask, kvh, stride_tok, stride_h, CHECK_N: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of one KV head from a contiguous run of rows (``base_ptr`` is
    the sequence's first token): the fresh-prompt path, where no key is in the cache yet."""
    mask = (kmask[:, None] & dmask[None, :]) if CHECK_N else dmask[None, :]
    off = pos.to(tl.int64) * stride_tok + kvh * stride_h
    return tl.load(base_ptr + off[:, None] + d[None, :], mask=mask, other=0.0)


@triton.jit
def scores_log2(q, k, scale_log2, softcap, pos, q_pos, slope_log2,
                USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Attention logits in log2 units (so the softmax can use exp2): [rows, BLOCK_N]."""
    s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION)
    if USE_SOFTCAP:
        # scale_log2 = scale * log2(e): undo the log2 factor inside tanh, keep it outside.
        s = (softcap * 1.4426950408889634) * tanh(s * (scale_log2 / 1.4426950408889634 / softcap))
    else:
        s = s * scale_log2
    if USE_ALIBI:
        s += slope_log2 * (pos[None, :] - q_pos[:, None]).to(tl.float32)
    return s
