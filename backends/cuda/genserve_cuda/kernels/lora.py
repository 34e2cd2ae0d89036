"""Batched LoRA over a batch whose rows use different adapters: one shrink launch (x @ A^T)
and one expand launch (y += s * (. @ B^T)) per linear layer.

The layout follows Punica's SGMV as vLLM's Triton LoRA kernels run it: the rows are grouped
by adapter slot once per step (``sort_rows``: rows without an adapter first, then each slot's
rows contiguously, in order), and the grid is (row tiles, slots). Program (m, s) takes the m-th tile of
up to ``BLOCK_M`` rows of slot s (gathered through the sorted order) and multiplies them by
slot s's matrix with tensor-core dots; tiles past a slot's row count return at once, so rows
without an adapter cost nothing and a slot's matrix is read once per tile of its rows. Every
shape is fixed by the batch size and the slot tensors, nothing is read back by the host: a
decode step can be captured in a CUDA graph with the slot index as an input.

Slot tensors: A [S, R, K] (rank R padded: an adapter of lower rank is zero past its rank),
B [S, N, R]; the scales of each slot multiply the expand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # rows per tile: tensor-core dots need at least 16


@dataclass
class SortedRows:
    """One step's rows grouped by slot: ``order`` [T] row ids (rows without an adapter first),
    ``counts`` [S] rows per slot, ``starts`` [S] where each slot's rows begin in ``order``."""

    order: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor


def sort_rows(index: torch.Tensor, num_slots: int) -> SortedRows:
    """Group the rows of ``index`` [T] (slot per row, -1 for none) by slot, stably, with
    elementwise work, cumulative sums and one scatter on fixed shapes (no sort, no host sync:
    capturable in a CUDA graph). Memory: (slots + 1) x T counters, 4 MB at 64 slots and 8192 rows."""
    key = index + 1  # 0: no adapter
    groups = torch.arange(num_slots + 1, device=index.device)
    member = key[None, :] == groups[:, None]  # [S + 1, T]
    counts = member.sum(1)
    starts = torch.cumsum(counts, 0) - counts
    within = (torch.cumsum(member, 1) - 1).gather(0, key[None, :])[0]  # rank among its slot's rows
    dest = starts.gather(0, key) + within
    order = torch.empty_like(index).scatter_(0, dest, torch.arange(index.numel(), device=index.device))
    return SortedRows(order.to(torch.int32), counts[1:].to(torch.int32), starts[1:].to(torch.int32))


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, order_ptr, counts_ptr, starts_ptr, K, R,
                   stride_xm, stride_as, stride_ar, stride_om,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    count = tl.load(counts_ptr + slot)
    m0 = pid_m * BLOCK_M
    if m0 >= count:
        return
    start = tl.load(starts_ptr + slot)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < count
    rows = tl.load(order_ptr + start + offs_m, mask=mmask, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        a = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None],
                    mask=rmask[None, :] & kmask[:, None], other=0.0)  # [BLOCK_K, BLOCK_R] = A^T
        if IEEE:
            acc += tl.dot(x.to(a.dtype), a, input_precision="ieee")
        else:
            acc += tl.dot(x.to(a.dtype), a)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_r[None, :], acc,
             mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _expand_kernel(s_ptr, b_ptr, y_ptr, scale_ptr, order_ptr, counts_ptr, starts_ptr, N, R,
                   stride_sm, stride_bs, stride_bn, stride_ym,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    count = tl.load(counts_ptr + slot)
    m0 = pid_m * BLOCK_M
    if m0 >= count:
        return
    start = tl.load(starts_ptr + slot)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < count
    rows = tl.load(order_ptr + start + offs_m, mask=mmask, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :],
                mask=mmask[:, None] & rmask[None, :], other=0.0)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None],
                mask=rmask[:, None] & nmask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N] = B^T
    if IEEE:
        delta = tl.dot(s.to(b.dtype), b, input_precision="ieee")
    else:
        delta = tl.dot(s.to(b.dtype), b)
    delta = delta * tl.load(scale_ptr + slot).to(tl.float32)
    ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    mask = mmask[:, None] & nmask[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def lora_shrink(x: torch.Tensor, a: torch.Tensor, rows: SortedRows) -> torch.Tensor:
    """[T, R] float32: row t is ``x[t] @ A[slot(t)]^T``; rows without an adapter are left
    unset (the expand never reads them). ``x`` [T, K], ``a`` [S, R, K] with unit stride on K."""
    T, K = x.shape
    S, R, _ = a.shape
    assert a.shape[2] == K and a.stride(2) == 1 and x.stride(1) == 1
    out = torch.empty(T, R, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(T, BLOCK_M), S)
    _shrink_kernel[grid](x, a, out, rows.order, rows.counts, rows.starts, K, R,
                         x.stride(0), a.stride(0), a.stride(1), out.stride(0),
                         IEEE=a.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_R=_block(R), BLOCK_K=64)
    return out


def lora_expand(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                rows: SortedRows) -> torch.Tensor:
    """``y`` [T, N] += scales[slot] * s[t] @ B[slot]^T for every row with an adapter, in place
    (each row is written by the programs of its own slot only); returns ``y``.
    ``s`` [T, R] from ``lora_shrink``, ``b`` [S, N, R] with unit stride on R."""
    T, N = y.shape
    S, _, R = b.shape
    assert b.shape[1] == N and b.stride(2) == 1 and y.stride(1) == 1 and s.shape == (T, R)
    block_n = 64
    grid = (triton.cdiv(T, BLOCK_M) * triton.cdiv(N, block_n), S)
    _expand_kernel[grid](s, b, y, scales, rows.order, rows.counts, rows.starts, N, R,
                         s.stride(0), b.stride(0), b.stride(1), y.stride(0),
                         IEEE=b.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=_block(R))
    return y
