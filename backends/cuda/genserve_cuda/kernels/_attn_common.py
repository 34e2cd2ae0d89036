"""Score transforms shared by the decode and prefill kernels (inlined by Triton)."""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh via exp: libdevice names differ between CUDA and ROCm builds of Triton.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def load_kv_tile(cache_ptr, bt_row_ptr, pos, kmask, d, dmask, kvh,
                 block_size, stride_c_block, stride_c_tok, stride_c_h):
    """Gather a [BLOCK_N, BLOCK_D] tile of one KV head at absolute positions ``pos``."""
    blk = tl.load(bt_row_ptr + pos // block_size, mask=kmask, other=0).to(tl.int64)
    off = blk * stride_c_block + (pos % block_size) * stride_c_tok + kvh * stride_c_h
    return tl.load(cache_ptr + off[:, None] + d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
