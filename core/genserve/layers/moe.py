"""Sparse mixture-of-experts feed-forward (Mixtral): top-k routing, grouped expert matmuls.

Dispatch sorts the (token, expert) pairs by expert so each expert's rows are contiguous, then
runs every expert's gate/up and down projections as one grouped matmul over those segments
(``torch.nn.functional.grouped_mm``; where the device or dtype lacks it, one matmul per expert
over all of its rows). Weighted outputs are scattered back with a single ``index_add_``.
While a CUDA graph is being captured (decode steps) the sync-free ``dense_experts`` runs instead.

Tensor parallelism over the TP group, chosen by ``shard``:

* ``"intermediate"`` (default, Megatron-style): every rank holds every expert with a slice of
  its intermediate dimension; w1/w3 split by rows, w2 by columns.
* ``"experts"``: each rank holds ``num_experts / tp`` whole experts and computes only the pairs
  routed to them.

Either way each rank's output is a partial sum and one all-reduce finishes the layer.

Quantized checkpoints (GPTQ, AWQ, ... Mixtral): with a ``QuantizationConfig`` the experts are
``ExpertMLP``s, one gated MLP of ordinary linear layers per local expert, each asking the
config for its method with its checkpoint prefix (``...experts.3.w1``) like any linear layer, so
every format and kernel serves experts through the one linear contract. Their loaders narrow
the intermediate dimension as column (w1, w3) and row (w2) parallel layers do; the router stays
dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.distributed.state import divide, get_tp_group
from genserve.layers.activation import GatedActivation
from genserve.layers.custom_op import CustomOp
from genserve.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from genserve.layers.weights import copy_into, narrow, set_weight_loader

# (device type, dtype) -> whether grouped_mm runs there, learnt on first use: CPU and Hopper
# run it; where it raises (older GPUs, older torch) the per-expert loop takes over for good.
_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row segments of ``x`` times their expert's weight: ``x[seg e] @ w[e].T``.

    ``x``: [N, in], rows grouped by expert; ``w``: [E, out, in]; ``offsets``: [E] int32 ends of
    the experts' segments. Rows past the last segment are left undefined.
    """
    key = (x.device.type, x.dtype)
    if hasattr(F, "grouped_mm") and _GROUPED_MM_OK.get(key, True):
        try:
            out = F.grouped_mm(x, w.transpose(1, 2), offs=offsets)
            _GROUPED_MM_OK[key] = True
            return out
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_OK[key] = False
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):  # one matmul per expert, all of its rows at once
        if end > start:
            out[start:end] = x[start:end] @ w[e].T
        start = end
    return out


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """Σ_k weight[t, k] · expert_{ids[t, k]}(x[t]) for every token row ``t``.

    ``topk_ids`` index the local experts of ``w13`` [E, 2I, H] / ``w2`` [E, H, I]; an id of ``E``
    or more marks a pair that another rank computes (expert sharding) and contributes nothing.
    """
    if _capturing(x):
        return dense_experts(x, w13, w2, topk_weights, topk_ids, act)
    T, K = topk_ids.shape
    E = w13.shape[0]
    expert, order = torch.sort(topk_ids.reshape(-1), stable=True)  # pairs grouped by expert
    rows = order // K  # the token of each sorted pair
    # Segment ends by search, not bincount, which syncs with the host (no CUDA graphs).
    offsets = torch.searchsorted(expert, torch.arange(E, device=x.device), right=True).to(torch.int32)

    h = act(grouped_matmul(x[rows], w13, offsets))
    y = grouped_matmul(h, w2, offsets).float()
    weight = topk_weights.reshape(-1)[order].float()
    local = expert < E  # remote experts' pairs sort last
    y = torch.where(local[:, None], y * weight[:, None], 0.0)  # rows past the segments are garbage
    return torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, rows, y).to(x.dtype)


def dense_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """``fused_experts`` computed by every local expert on every token (one batched matmul per
    projection), mixed by the routing weights, zero where a token did not pick the expert.

    E / top_k times the FLOPs but the same weight reads once a batch touches every expert, and no
    data-dependent shapes or host syncs: what a CUDA graph of a decode step can hold.
    """
    E = w13.shape[0]
    h = act(torch.matmul(x, w13.transpose(1, 2)))  # [E, T, I]
    y = torch.matmul(h, w2.transpose(1, 2)).float()  # [E, T, H]
    mix = torch.zeros(x.shape[0], E + 1, dtype=torch.float32, device=x.device)
    mix = mix.scatter_add_(1, topk_ids.clamp(max=E), topk_weights.float())[:, :E]  # remote experts dropped
    return torch.einsum("te,eth->th", mix, y).to(x.dtype)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class FusedExperts(CustomOp):
    """The routed experts' computation of an unquantized ``FusedMoE`` (op ``fused_experts``).

    ``forward(x, w13, w2, topk_weights, topk_ids, act)`` has ``fused_experts``' contract, which is
    the reference; a backend binds a fused kernel at construction (the CUDA backend's sorts the
    pairs by expert and runs grouped Triton GEMMs that read only the routed experts, also inside
    CUDA graphs, where the reference falls back to ``dense_experts``).
    """

    op_name = "fused_experts"

    def __init__(self):
        super().__init__()
        self.bind_forward()

    def forward_native(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, act: nn.Module) -> torch.Tensor:
        return fused_experts(x, w13, w2, topk_weights, topk_ids, act)


class ExpertMLP(nn.Module):
    """One expert's gated MLP from linear layers (w1 gate, w3 up, w2 down), for quantized experts.

    ``sharded``: split the intermediate dimension over the TP ranks (``shard="intermediate"``);
    otherwise the rank holds the whole expert. No all-reduce here: ``FusedMoE`` does one for all.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act: nn.Module, dtype, quant_config,
                 prefix: str, sharded: bool):
        super().__init__()
        up_cls = ColumnParallelLinear if sharded else ReplicatedLinear
        down_cls = RowParallelLinear if sharded else ReplicatedLinear
        self.w1 = up_cls(hidden_size, intermediate_size, False, dtype, quant_config, prefix=f"{prefix}.w1")
        self.w3 = up_cls(hidden_size, intermediate_size, False, dtype, quant_config, prefix=f"{prefix}.w3")
        self.w2 = down_cls(intermediate_size, hidden_size, False, dtype, quant_config, prefix=f"{prefix}.w2")
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(torch.cat([self.w1.quant.apply(self.w1, x, None), self.w3.quant.apply(self.w3, x, None)], -1))
        return self.w2.quant.apply(self.w2, h, None)  # this rank's partial sum when sharded


def quantized_experts(x: torch.Tensor, experts: list[nn.Module], topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
    """``fused_experts`` over ``ExpertMLP``s: each expert runs on the rows routed to it; while a
    CUDA graph is captured, every expert runs on every row (no data-dependent shapes)."""
    E = len(experts)
    mix = torch.zeros(x.shape[0], E + 1, dtype=torch.float32, device=x.device)
    mix = mix.scatter_add_(1, topk_ids.clamp(max=E), topk_weights.float())[:, :E]  # [T, E]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if _capturing(x):
        for e, expert in enumerate(experts):
            out += expert(x).float() * mix[:, e:e + 1]
        return out.to(x.dtype)
    routed = mix > 0
    for e, expert in enumerate(experts):
        idx = routed[:, e].nonzero().squeeze(1)
        if idx.numel():
            out.index_add_(0, idx, expert(x[idx]).float() * mix[idx, e:e + 1])
    return out.to(x.dtype)


class FusedMoE(nn.Module):
    """Router + ``num_experts`` gated MLPs (w1 gate, w3 up, w2 down), top-k per token.

    Parameters: ``gate`` (the router, replicated), ``w13_weight`` [E_local, 2 * I_local, H]
    (gate rows then up rows) and ``w2_weight`` [E_local, H, I_local]. Checkpoint tensors reach
    them through ``checkpoint_mapping`` with shard id ``(expert, "w1" | "w3" | "w2")``.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 renormalize: bool = True, activation: str = "silu", dtype=torch.float32,
                 shard: str = "intermediate", quant_config=None, prefix: str = ""):
        """``quant_config``/``prefix``: the model's quantization and this block's checkpoint name
        (``model.layers.0.block_sparse_moe``); with a config the experts are ``ExpertMLP``s."""
        super().__init__()
        if shard not in ("intermediate", "experts"):
            raise ValueError(f"shard must be 'intermediate' or 'experts', not {shard!r}")
        self.tp = get_tp_group()
        self.num_experts, self.top_k, self.renormalize, self.shard = num_experts, top_k, renormalize, shard
        if shard == "experts":
            self.num_local_experts = divide(num_experts, self.tp.size)
            self.expert_start = self.tp.rank * self.num_local_experts
            self.local_intermediate = intermediate_size
        else:
            self.num_local_experts, self.expert_start = num_experts, 0
            self.local_intermediate = divide(intermediate_size, self.tp.size)
        E, I = self.num_local_experts, self.local_intermediate
        self.gate = ReplicatedLinear(hidden_size, num_experts, False, dtype, None)
        self.act = GatedActivation(activation)
        self.experts = None
        if quant_config is not None:
            # Keyed by the global expert id, so ``experts.<e>.w1.qweight`` names it on every rank.
            self.experts = nn.ModuleDict({
                str(e): ExpertMLP(hidden_size, intermediate_size, self.act, dtype, quant_config,
                                  f"{prefix}.experts.{e}", shard == "intermediate")
                for e in range(self.expert_start, self.expert_start + E)})
            return
        self.w13_weight = nn.Parameter(torch.empty(E, 2 * I, hidden_size, dtype=dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(E, hidden_size, I, dtype=dtype), requires_grad=False)
        set_weight_loader(self.w13_weight, self.weight_loader)
        set_weight_loader(self.w2_weight, self.weight_loader)
        self.fused_experts = FusedExperts()  # its implementation is the backend's, bound here

    @staticmethod
    def checkpoint_mapping(num_experts: int, w1: str = "w1", w2: str = "w2", w3: str = "w3"):
        """``stacked_params`` entries for checkpoints with one tensor per expert (Mixtral's names)."""
        return tuple(
            (f".experts.{e}.{name}.weight", (f".{target}", (e, part)))
            for e in range(num_experts)
            for name, target, part in ((w1, "w13_weight", "w1"), (w3, "w13_weight", "w3"),
                                       (w2, "w2_weight", "w2"))
        )

    def weight_loader(self, param, loaded, shard_id):
        expert, part = shard_id
        local = expert - self.expert_start
        if not 0 <= local < self.num_local_experts:
            return  # another rank's expert
        I = self.local_intermediate
        start = self.tp.rank * I if self.shard == "intermediate" else 0
        if part == "w2":
            copy_into(param.data[local], narrow(loaded, 1, start, I))
        else:
            rows = slice(0, I) if part == "w1" else slice(I, 2 * I)
            copy_into(param.data[local, rows], narrow(loaded, 0, start, I))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids and weights per token (softmax in fp32, then renormalised)."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        if self.shard == "experts":  # remote experts map to ids >= num_local_experts
            ids = ids - self.expert_start
            ids = ids.masked_fill((ids < 0) | (ids >= self.num_local_experts), self.num_local_experts)
        if self.experts is not None:
            out = quantized_experts(x, list(self.experts.values()), weights, ids)
        else:
            out = self.fused_experts(x, self.w13_weight, self.w2_weight, weights, ids, self.act)
        return self.tp.all_reduce(out)

