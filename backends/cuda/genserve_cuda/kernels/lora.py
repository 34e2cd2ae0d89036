"""Batched LoRA over a batch whose rows use different adapters: one shrink launch (x @ A^T)
and one expand launch (y += s * (. @ B^T)) per linear layer.

The layout follows Punica's SGMV (segmented gather matrix-vector products): once per step the
rows are grouped by adapter slot (``sort_rows``: rows without an adapter first, then each
slot's rows contiguously, in order) and cut into tiles of up to ``BLOCK_M`` rows of one slot.
One program per (tile, output block) gathers its rows through the grouping and multiplies them
by its slot's matrix with tensor-core dots, so rows without an adapter cost nothing and a
slot's matrix is read once per tile of its rows. The tile table has a fixed length, the most
tiles T rows over S slots can need (``cdiv(T, BLOCK_M) + min(S, T)``); unused entries return
at once. Every shape is fixed by the batch size and the slot count and nothing is read back by
the host, so a decode step can be captured in a CUDA graph with the slot index as an input.

Slot tensors: A [S, R, K] (rank R padded: an adapter of lower rank is zero past its rank),
B [S, N, R]; each slot's scale multiplies its expand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # rows per tile: tensor-core dots need at least 16
# The shrink splits K over programs that add their partial products atomically: at batch 1 one
# program reading a whole [R, 4096] A would leave the GPU idle.
SHRINK_K_PER_PROGRAM = 256


@dataclass
class SortedRows:
    """One step's rows grouped by slot: ``order`` [T] row ids (rows without an adapter first),
    ``counts`` [S] rows per slot, ``starts`` [S] where each slot's rows begin in ``order``;
    the tile table ``tile_slot`` / ``tile_m0`` [max_tiles]: each tile's slot (-1: unused) and
    its first row among that slot's rows."""

    order: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    tile_slot: torch.Tensor
    tile_m0: torch.Tensor


def max_tiles(rows: int, num_slots: int) -> int:
    """The most ``BLOCK_M``-row tiles ``rows`` rows over ``num_slots`` slots can need."""
    return triton.cdiv(rows, BLOCK_M) + min(num_slots, rows)


def sort_rows(index: torch.Tensor, num_slots: int) -> SortedRows:
    """Group the rows of ``index`` [T] (slot per row, -1 for none) by slot, stably, and tile
    them, with elementwise work, cumulative sums, one scatter and one search on fixed shapes (no
    sort, no host sync: capturable in a CUDA graph). Memory: (slots + 1) x T counters, 4 MB at
    64 slots and 8192 rows."""
    dev = index.device
    key = index + 1  # 0: no adapter
    member = key[None, :] == torch.arange(num_slots + 1, device=dev)[:, None]  # [S + 1, T]
    counts = member.sum(1)
    starts = torch.cumsum(counts, 0) - counts
    within = (torch.cumsum(member, 1) - 1).gather(0, key[None, :])[0]  # rank among its slot's rows
    dest = starts.gather(0, key) + within
    order = torch.empty_like(index).scatter_(0, dest, torch.arange(index.numel(), device=dev))
    counts, starts = counts[1:], starts[1:]
    tiles = (counts + BLOCK_M - 1) // BLOCK_M  # [S]
    ends = torch.cumsum(tiles, 0)
    t = torch.arange(max_tiles(index.numel(), num_slots), device=dev)
    slot = torch.searchsorted(ends, t, right=True)  # the slot whose tiles hold tile t; S: none
    valid = slot < num_slots
    slot = slot.clamp(max=num_slots - 1)
    m0 = (t - (ends - tiles).gather(0, slot)) * BLOCK_M
    tile_slot = torch.where(valid, slot, torch.full_like(slot, -1))
    i32 = torch.int32
    return SortedRows(order.to(i32), counts.to(i32), starts.to(i32), tile_slot.to(i32), m0.to(i32))


@triton.jit
def _tile_rows(pid, order_ptr, counts_ptr, starts_ptr, tile_slot_ptr, tile_m0_ptr, BLOCK_M: tl.constexpr):
    """The slot of tile ``pid`` (-1: unused), its rows (ids) and which of them are real."""
    slot = tl.load(tile_slot_ptr + pid)
    safe = tl.maximum(slot, 0)
    m0 = tl.load(tile_m0_ptr + pid)
    count = tl.load(counts_ptr + safe)
    start = tl.load(starts_ptr + safe)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < count
    rows = tl.load(order_ptr + start + offs_m, mask=mmask, other=0).to(tl.int64)
    return slot, rows, mmask


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, order_ptr, counts_ptr, starts_ptr, tile_slot_ptr, tile_m0_ptr,
                   K, R, stride_xm, stride_as, stride_ar, stride_om,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   K_PER_PROGRAM: tl.constexpr):
    slot, rows, mmask = _tile_rows(tl.program_id(0), order_ptr, counts_ptr, starts_ptr, tile_slot_ptr,
                                   tile_m0_ptr, BLOCK_M)
    if slot < 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    k_first = tl.program_id(1) * K_PER_PROGRAM
    for k0 in range(k_first, k_first + K_PER_PROGRAM, BLOCK_K):
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
    tl.atomic_add(out_ptr + rows[:, None] * stride_om + offs_r[None, :], acc,
                  mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _expand_kernel(s_ptr, b_ptr, y_ptr, scale_ptr, order_ptr, counts_ptr, starts_ptr, tile_slot_ptr,
                   tile_m0_ptr, N, R, stride_sm, stride_bs, stride_bn, stride_ym,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    slot, rows, mmask = _tile_rows(tl.program_id(0), order_ptr, counts_ptr, starts_ptr, tile_slot_ptr,
                                   tile_m0_ptr, BLOCK_M)
    if slot < 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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


def _tables(rows: SortedRows) -> tuple:
    return rows.order, rows.counts, rows.starts, rows.tile_slot, rows.tile_m0


def lora_shrink(x: torch.Tensor, a: torch.Tensor, rows: SortedRows) -> torch.Tensor:
    """[T, R] float32: row t is ``x[t] @ A[slot(t)]^T``, zero for rows without an adapter (the
    expand never reads them). ``x`` [T, K], ``a`` [S, R, K] with unit stride on K. K is split
    over programs of ``SHRINK_K_PER_PROGRAM`` columns whose partial products add atomically
    (float32, so the order of the additions changes only the last bits)."""
    T, K = x.shape
    _, R, _ = a.shape
    assert a.shape[2] == K and a.stride(2) == 1 and x.stride(1) == 1
    out = torch.zeros(T, R, dtype=torch.float32, device=x.device)  # split-K programs add into it
    grid = (rows.tile_slot.numel(), triton.cdiv(K, SHRINK_K_PER_PROGRAM))
    if grid[0]:
        _shrink_kernel[grid](x, a, out, *_tables(rows), K, R, x.stride(0), a.stride(0), a.stride(1),
                             out.stride(0), IEEE=a.dtype == torch.float32, BLOCK_M=BLOCK_M,
                             BLOCK_R=_block(R), BLOCK_K=64, K_PER_PROGRAM=SHRINK_K_PER_PROGRAM)
    return out


def lora_expand(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                rows: SortedRows) -> torch.Tensor:
    """``y`` [T, N] += scales[slot] * s[t] @ B[slot]^T for every row with an adapter, in place
    (each row is written by the programs of its own tiles only); returns ``y``.
    ``s`` [T, R] from ``lora_shrink``, ``b`` [S, N, R] with unit stride on R."""
    T, N = y.shape
    _, _, R = b.shape
    assert b.shape[1] == N and b.stride(2) == 1 and y.stride(1) == 1 and s.shape == (T, R)
    block_n = 64
    grid = (rows.tile_slot.numel(), triton.cdiv(N, block_n))
    if grid[0]:
        _expand_kernel[grid](s, b, y, scales, *_tables(rows), N, R, s.stride(0), b.stride(0), b.stride(1),
                             y.stride(0), IEEE=b.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
                             BLOCK_R=_block(R))
    return y
