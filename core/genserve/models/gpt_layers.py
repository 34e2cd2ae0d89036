"""Pieces shared by the GPT-style families: BLOOM, OPT, GPT-2/GPTBigCode, GPT-NeoX, Falcon, MPT.

These models predate Llama's conventions: LayerNorm, a two-matmul MLP, fused QKV projections
in several head layouts, learned or ALiBi positions. The modules here take the checkpoint's
own names for their projections (``names=``), so a model's module tree mirrors its
checkpoint and loading needs no renaming beyond a prefix.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from genserve.attention.base import AttentionSpec
from genserve.layers.activation import get_activation
from genserve.layers.attention import Attention
from genserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from genserve.layers.weights import copy_into, materialize, narrow, shape_of
from genserve.models.base import CausalLM, KVCacheSpec, ModelContext


class GroupedQKVParallelLinear(QKVParallelLinear):
    """A QKV projection whose checkpoint tensor is fused per KV head.

    Rows are ``[num_kv_heads, group + 2, head_dim]``: each KV head's ``group`` query heads, then
    its key, then its value. BLOOM, GPT-NeoX and multi-head GPTBigCode are group 1
    (``[q, k, v]`` per head); Falcon-7B and multi-query GPTBigCode have a single KV head
    (``[q...; k; v]``); Falcon-40B groups 16 query heads per KV head. The loader reads only this
    rank's KV heads (one group when KV heads are replicated across ranks) and reorders them
    into ``QKVParallelLinear``'s ``[q; k; v]``, so tensor-parallel shards are right by
    construction.
    """

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is not None:  # separate q/k/v tensors: nothing is interleaved
            return super().weight_loader(param, loaded, shard_id)
        total_q = self.num_heads * self.tp.size
        total_kv = self.num_kv_heads * self.tp.size // self.kv_replicas
        group, hd = total_q // total_kv, self.head_dim
        per_kv = self.num_heads // self.num_kv_heads  # this rank's query heads per KV head
        first_kv = (self.tp.rank // self.kv_replicas) * self.num_kv_heads
        q_start = (self.tp.rank % self.kv_replicas) * per_kv  # > 0 only when KV heads replicate
        rows = (group + 2) * hd
        if shape_of(loaded)[0] != total_kv * rows:
            raise ValueError(f"fused qkv of {shape_of(loaded)[0]} rows does not fit {total_q} query "
                             f"and {total_kv} KV heads of size {hd}")
        block = materialize(narrow(loaded, 0, first_kv * rows, self.num_kv_heads * rows))
        rest = block.shape[1:]
        block = block.reshape(self.num_kv_heads, group + 2, hd, *rest)
        out = param.data
        copy_into(out.narrow(0, 0, self.q_size),
                  block[:, q_start:q_start + per_kv].reshape(self.q_size, *rest))
        copy_into(out.narrow(0, self.q_size, self.kv_size), block[:, group].reshape(self.kv_size, *rest))
        copy_into(out.narrow(0, self.q_size + self.kv_size, self.kv_size),
                  block[:, group + 1].reshape(self.kv_size, *rest))


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> list[float]:
    """ALiBi slopes in fp32, as BLOOM, Falcon and MPT compute them.

    For a power of two heads they are ``2^(-max_bias * i / n)``; other counts take the closest
    power of two and add every other slope of the next power.
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-max_bias / closest), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra = torch.tensor(2 ** (-max_bias / (2 * closest)), dtype=torch.float32)
        n_extra = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * n_extra, 2, dtype=torch.int32))])
    return slopes.tolist()


class MLP(nn.Module):
    """Column-parallel up projection, activation, row-parallel down projection.

    ``names`` are the checkpoint's names for the two projections (e.g. GPT-2's ``c_fc, c_proj``);
    ``prefix`` the checkpoint name of the module holding them.
    """

    def __init__(self, hidden_size: int, inner_size: int, act: str, ctx: ModelContext, bias: bool = True,
                 names: tuple[str, str] = ("dense_h_to_4h", "dense_4h_to_h"), prefix: str = ""):
        super().__init__()
        self.names = names
        self.add_module(names[0], ColumnParallelLinear(hidden_size, inner_size, bias, ctx.dtype, ctx.quant,
                                                       prefix=f"{prefix}.{names[0]}"))
        self.add_module(names[1], RowParallelLinear(inner_size, hidden_size, bias, ctx.dtype, ctx.quant,
                                                    prefix=f"{prefix}.{names[1]}"))
        self.act = get_activation(act)

    def forward(self, x):
        up, down = (getattr(self, n) for n in self.names)
        return down(self.act(up(x)))


class SelfAttention(nn.Module):
    """QKV projection, optional rotary, paged attention, output projection.

    ``grouped=True`` reads a checkpoint qkv fused per KV head (see ``GroupedQKVParallelLinear``);
    otherwise a fused tensor is ``[q; k; v]`` (GPT-2, MPT) or comes as separate q/k/v (OPT).
    ``alibi`` holds the slopes of *all* heads; each rank keeps its own heads' slopes.
    ``names`` are the checkpoint's names for the QKV and output projections.
    """

    def __init__(self, layer_idx: int, ctx: ModelContext, *, hidden_size: int, num_heads: int,
                 num_kv_heads: int | None = None, bias: bool = True,
                 names: tuple[str, str] = ("query_key_value", "dense"), grouped: bool = False,
                 rotary: nn.Module | None = None, alibi: list[float] | None = None,
                 scale: float | None = None, clip_qkv: float | None = None, prefix: str = ""):
        super().__init__()
        hd = hidden_size // num_heads
        cls = GroupedQKVParallelLinear if grouped else QKVParallelLinear
        qkv = cls(hidden_size, hd, num_heads, num_kv_heads or num_heads, bias, ctx.dtype, ctx.quant,
                  prefix=f"{prefix}.{names[0]}")
        out = RowParallelLinear(num_heads * hd, hidden_size, bias, ctx.dtype, ctx.quant, prefix=f"{prefix}.{names[1]}")
        self.names = names
        self.add_module(names[0], qkv)
        self.add_module(names[1], out)
        self.rotary_emb = rotary
        self.clip_qkv = clip_qkv
        self.sizes = [qkv.q_size, qkv.kv_size, qkv.kv_size]
        slopes = None  # this rank's heads' slopes
        if alibi is not None:
            first = ctx.tp.rank * qkv.num_heads
            slopes = tuple(alibi[first:first + qkv.num_heads])
        spec = AttentionSpec(num_heads=qkv.num_heads, head_dim=hd, num_kv_heads=qkv.num_kv_heads,
                             scale=hd ** -0.5 if scale is None else scale, alibi_slopes=slopes)
        self.attn = Attention(layer_idx, spec, ctx)

    def forward(self, positions, x, batch):
        qkv_proj, out_proj = (getattr(self, n) for n in self.names)
        qkv = qkv_proj(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split(self.sizes, dim=-1)
        if self.rotary_emb is not None:
            T, hd = x.shape[0], self.attn.spec.head_dim
            q, k = self.rotary_emb(positions, q.reshape(T, -1, hd), k.reshape(T, -1, hd))
            q, k = q.reshape(T, -1), k.reshape(T, -1)
        return out_proj(self.attn(q, k, v, batch))


class GPTStyleLM(CausalLM):
    """What the GPT-style models share around their layers: prefixes, the LM head, the KV spec.

    ``prefixes`` are stripped from checkpoint names (checkpoints saved from the bare model lack
    them, so both spellings load); ``renames`` are (old, new) name prefixes after that.
    """

    prefixes: ClassVar[tuple[str, ...]] = ("transformer.",)
    renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def rename_weight(self, name):
        for prefix in self.prefixes:
            name = name.removeprefix(prefix)
        for old, new in self.renames:
            if name.startswith(old):
                name = new + name[len(old):]
        return name

    def kv_cache_spec(self):
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        spec = layers[0].spec
        return KVCacheSpec(len(layers), spec.num_kv_heads, spec.head_dim)

    def compute_logits(self, hidden):
        return self.lm_head(hidden)
