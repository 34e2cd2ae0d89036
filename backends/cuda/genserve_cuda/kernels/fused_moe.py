"""Fused mixture-of-experts feed-forward: grouped GEMMs over (token, expert) pairs sorted by expert.

The layout is the one of vLLM's ``fused_moe`` (and SGLang's): the ``P = T * top_k`` routed pairs
are sorted by expert, and every expert's run is padded to a multiple of ``BLOCK_M``
(``moe_align``), so each ``BLOCK_M``-row block of the sorted list belongs to exactly one expert.
One Triton launch then computes every block against its own expert's weight (``_moe_gemm_kernel``):
the rows are gathered from the activations by pair index, the weight tile comes from
``w[expert]``. A decode step so reads only the experts its tokens were routed to, where the
dense fallback reads all of them.

Everything here has static shapes and runs on the device (sort, scatter, cumulative sums,
searchsorted; no ``bincount``/``nonzero``, no host sync), so a decode step with MoE layers can
be captured in a CUDA graph. The sorted list is sized for the worst case,
``P + E * (BLOCK_M - 1)`` rows; blocks past the real end exit at once.

Pairs whose id is ``E`` or more (experts another rank holds, ``shard="experts"``) get no row
and contribute nothing, as in ``genserve.layers.moe.fused_experts``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class MoEConfig:
    """One launch shape of ``_moe_gemm_kernel`` (a fixed table by pair count, no run-time tuning)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def select_config(num_pairs: int) -> MoEConfig:
    """Small blocks for decode (few pairs per expert), larger ones for prefill."""
    if num_pairs <= 64:
        return MoEConfig(16, 64, 128, 4, 4)
    if num_pairs <= 512:
        return MoEConfig(32, 64, 64, 4, 4)
    return MoEConfig(64, 128, 64, 8, 3)


@dataclass
class MoEAlignment:
    """Pairs sorted by expert, each expert's run padded to ``block_m`` rows (all on the device).

    ``sorted_pairs``: int32 ``[capacity]``, a pair index ``t * top_k + k`` per row, ``P`` for a
    padding row; ``block_experts``: int32 ``[capacity // block_m]``, the expert of each block;
    ``num_rows``: int32 ``[1]``, the padded rows in use (a multiple of ``block_m``).
    """

    sorted_pairs: torch.Tensor
    block_experts: torch.Tensor
    num_rows: torch.Tensor
    block_m: int


# One-launch alignment (``_moe_align_kernel``) up to these sizes: decode steps, where the ~25
# torch launches of ``moe_align_torch`` cost more than the expert GEMMs (about 2 ms per token
# for a 32-layer Mixtral); larger batches amortize them and take the torch path.
ALIGN_KERNEL_MAX_PAIRS = 1024
ALIGN_KERNEL_MAX_EXPERTS = 64


def _capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    return -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m


@triton.jit
def _moe_align_kernel(ids_ptr, pairs_ptr, block_experts_ptr, num_rows_ptr, P, E, capacity,
                      BLOCK_M: tl.constexpr, P_PAD: tl.constexpr, E_PAD: tl.constexpr,
                      CAP_PAD: tl.constexpr, NB_PAD: tl.constexpr):
    """``moe_align_torch`` in one program: one-hot ``[P, E]``, counts, padded run ends, each
    pair's rank inside its expert (exclusive cumulative sum), then the scatter."""
    offs_p = tl.arange(0, P_PAD)
    offs_e = tl.arange(0, E_PAD)
    ids = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=E_PAD)        # pad / remote: no expert
    onehot = ((ids[:, None] == offs_e[None, :]) & (offs_e[None, :] < E)).to(tl.int32)   # [P, E]
    counts = tl.sum(onehot, axis=0)                                      # [E]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    rank = tl.cumsum(onehot, axis=0) - onehot                            # earlier pairs, same expert
    dest = tl.sum(onehot * (starts[None, :] + rank), axis=1)             # [P]
    local = tl.sum(onehot, axis=1) > 0
    offs_c = tl.arange(0, CAP_PAD)
    tl.store(pairs_ptr + offs_c, tl.full([CAP_PAD], 0, tl.int32) + P, mask=offs_c < capacity)
    tl.debug_barrier()                                                   # the fill lands before the scatter
    tl.store(pairs_ptr + dest, offs_p.to(tl.int32), mask=local)
    offs_b = tl.arange(0, NB_PAD)
    before = (ends[None, :] <= (offs_b * BLOCK_M)[:, None]) & (offs_e[None, :] < E)
    expert = tl.minimum(tl.sum(before.to(tl.int32), axis=1), E - 1)
    tl.store(block_experts_ptr + offs_b, expert, mask=offs_b < capacity // BLOCK_M)
    tl.store(num_rows_ptr, tl.sum(padded, axis=0))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, kernel: bool | None = None) -> MoEAlignment:
    """Sort the ``[T, top_k]`` routed pairs by expert into ``block_m``-row blocks (see module doc):
    one Triton launch for decode-sized inputs on a GPU, ``moe_align_torch`` otherwise (the same
    result: both keep the pairs' order inside an expert's run). ``kernel`` forces the choice
    (tests run the kernel in Triton's interpreter)."""
    P = topk_ids.numel()
    if kernel is None:
        kernel = topk_ids.is_cuda and P <= ALIGN_KERNEL_MAX_PAIRS and num_experts <= ALIGN_KERNEL_MAX_EXPERTS
    if not kernel:
        return moe_align_torch(topk_ids, num_experts, block_m)
    capacity = _capacity(P, num_experts, block_m)
    pairs = torch.empty(capacity, dtype=torch.int32, device=topk_ids.device)
    block_experts = torch.empty(capacity // block_m, dtype=torch.int32, device=topk_ids.device)
    num_rows = torch.empty(1, dtype=torch.int32, device=topk_ids.device)
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32 and ids.dtype != torch.int64:
        ids = ids.to(torch.int64)
    _moe_align_kernel[(1,)](ids, pairs, block_experts, num_rows, P, num_experts, capacity,
                            BLOCK_M=block_m, P_PAD=triton.next_power_of_2(max(P, 16)),
                            E_PAD=triton.next_power_of_2(max(num_experts, 16)),
                            CAP_PAD=triton.next_power_of_2(capacity),
                            NB_PAD=triton.next_power_of_2(max(capacity // block_m, 16)), num_warps=4)
    return MoEAlignment(pairs, block_experts, num_rows, block_m)


def moe_align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """``moe_align`` with torch ops (any size, any device; about 25 launches)."""
    flat = topk_ids.reshape(-1).to(torch.int64).clamp(max=num_experts)  # E: another rank's expert
    P = flat.numel()
    E = num_experts
    device = flat.device
    counts = torch.zeros(E + 1, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:E] + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)                            # padded run ends per expert
    starts = ends - padded
    raw_starts = torch.cumsum(counts, 0) - counts             # unpadded run starts (incl. bucket E)
    order = torch.argsort(flat, stable=True)                  # pair indices grouped by expert
    expert_sorted = flat[order]
    rank = torch.arange(P, device=device) - raw_starts[expert_sorted]
    local = expert_sorted < E
    starts_ext = torch.cat([starts, starts.new_zeros(1)])
    capacity = _capacity(P, E, block_m)
    # rows of remote pairs go to a dump slot past the end, which is cut off
    dest = torch.where(local, starts_ext[expert_sorted] + rank, torch.full_like(rank, capacity))
    sorted_pairs = torch.full((capacity + 1,), P, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_experts = torch.searchsorted(ends, block_starts, right=True).clamp(max=E - 1).to(torch.int32)
    return MoEAlignment(sorted_pairs[:capacity], block_experts, ends[-1:].to(torch.int32), block_m)


@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, c_ptr, pairs_ptr, block_experts_ptr, num_rows_ptr, weights_ptr,
    N, K, num_pairs, a_rows_per_pair,
    stride_am, stride_we, stride_wn, stride_wk, stride_cm,
    MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """``c[pair] = a[pair // a_rows_per_pair] @ w[expert(pair)].T`` (times the pair's routing
    weight with ``MUL_WEIGHT``) for the ``BLOCK_M`` sorted pairs of one block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + offs_r)
    row_mask = pairs < num_pairs
    a_rows = (pairs // a_rows_per_pair).to(tl.int64)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    w_tile = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_tile, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_tile, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_tile, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_tile, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
        a_tile += BLOCK_K
        w_tile += BLOCK_K * stride_wk
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def moe_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, align: MoEAlignment, a_rows_per_pair: int,
             cfg: MoEConfig, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``out[p] = a[p // a_rows_per_pair] @ w[expert(p)].T`` (``* topk_weights.flat[p]``).

    ``a``: ``[rows, K]`` unit column stride; ``w``: ``[E, N, K]``; ``out``: ``[P, N]`` whose
    rows of unrouted pairs are left untouched.
    """
    P, N = out.shape
    K = a.shape[1]
    if a.stride(1) != 1:
        a = a.contiguous()
    grid = (align.block_experts.numel(), triton.cdiv(N, cfg.block_n))
    weights = topk_weights.reshape(-1) if topk_weights is not None else out
    _moe_gemm_kernel[grid](
        a, w, out, align.sorted_pairs, align.block_experts, align.num_rows, weights,
        N, K, P, a_rows_per_pair,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        MUL_WEIGHT=topk_weights is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, act) -> torch.Tensor:
    """``genserve.layers.moe.fused_experts``'s contract on the GPU: ``x [T, H]``, ``w13 [E, 2I, H]``,
    ``w2 [E, H, I]``, ``topk_weights``/``topk_ids`` ``[T, k]`` -> ``[T, H]`` in ``x``'s dtype.
    ``act`` maps ``[.., 2I]`` to ``[.., I]`` (the gated activation layer)."""
    T, H = x.shape
    top_k = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    P = T * top_k
    cfg = select_config(P)
    align = moe_align(topk_ids, E, cfg.block_m)
    gate_up = torch.empty(P, two_i, dtype=x.dtype, device=x.device)
    moe_gemm(x, w13, gate_up, align, top_k, cfg)
    h = act(gate_up)                                           # [P, I]; unrouted rows: garbage, unread
    down = torch.zeros(P, H, dtype=torch.float32, device=x.device)
    moe_gemm(h, w2, down, align, 1, cfg, topk_weights.float())
    return down.view(T, top_k, H).sum(dim=1).to(x.dtype)
