"""T5, T5 v1.1, FLAN-T5 and mT5: encoder-decoder with bucketed relative position bias.

How it runs in the engine (see ``CausalLM.is_encoder_decoder``): ``encode`` runs the encoder
over a request's prompt once and returns the cross-attention keys and values of every decoder
layer, which stay with the request; the decoder then runs step by step like a decoder-only
model, its self-attention keys and values in the paged KV cache.

T5 attention has no score scaling and adds a learnt per-head bias indexed by bucketed relative
distance (first layer of each stack owns it, the others reuse it). The backend's attention
kernels know no such bias, so both attentions here are computed with PyTorch's
``scaled_dot_product_attention`` over padded batches, reading the paged cache directly
(layout in ``attention/base.py``).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from genserve.attention.base import AttentionMetadata, write_kv
from genserve.distributed.state import get_tp_group
from genserve.layers.activation import GatedActivation, get_activation
from genserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                    RowParallelLinear)
from genserve.layers.norm import RMSNorm
from genserve.layers.weights import copy_into, narrow
from genserve.models.base import CausalLM, ForwardBatch, KVCacheSpec, ModelContext


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Mesh TensorFlow's bucketing of ``key_pos - query_pos``: exact near, logarithmic far."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -rel.clamp(max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class RelativeBias(nn.Module):
    """Per-head additive attention bias from bucketed relative positions (this rank's heads)."""

    def __init__(self, config, bidirectional: bool, num_heads: int, dtype):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.weight = nn.Parameter(torch.empty(self.num_buckets, num_heads, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        heads = param.shape[1]
        copy_into(param, narrow(loaded, 1, get_tp_group().rank * heads, heads))

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """``q_pos`` [..., Lq], ``k_pos`` [..., Lk] -> bias [..., heads, Lq, Lk]."""
        rel = k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return F.embedding(buckets, self.weight).movedim(-1, -3)


class T5FeedForward(nn.Module):
    """``relu`` (T5) or gated ``gelu_new`` (T5 v1.1, FLAN-T5, mT5) MLP."""

    def __init__(self, config, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        d, ff = config.d_model, config.d_ff
        if config.is_gated_act:
            self.wi = MergedColumnParallelLinear(d, [ff, ff], False, ctx.dtype, ctx.quant, prefix=f"{prefix}.wi")
            self.act = GatedActivation(config.dense_act_fn)
        else:
            self.wi = ColumnParallelLinear(d, ff, False, ctx.dtype, ctx.quant, prefix=f"{prefix}.wi")
            self.act = get_activation(config.dense_act_fn)
        self.wo = RowParallelLinear(ff, d, False, ctx.dtype, ctx.quant, prefix=f"{prefix}.wo")

    def forward(self, x):
        return self.wo(self.act(self.wi(x)))


class T5SelfAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        self.qkv = QKVParallelLinear(config.d_model, config.d_kv, config.num_heads, config.num_heads,
                                     False, ctx.dtype, ctx.quant, prefix=f"{prefix}.qkv")
        self.o = RowParallelLinear(config.num_heads * config.d_kv, config.d_model, False, ctx.dtype, ctx.quant,
                                   prefix=f"{prefix}.o")
        self.num_heads, self.head_dim = self.qkv.num_heads, config.d_kv

    def qkv_heads(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        return q.view(shape), k.view(shape), v.view(shape)


class T5CrossAttention(nn.Module):
    """Queries from the decoder; keys and values projected once from the encoder output."""

    def __init__(self, config, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.q = ColumnParallelLinear(config.d_model, inner, False, ctx.dtype, ctx.quant, prefix=f"{prefix}.q")
        self.kv = MergedColumnParallelLinear(config.d_model, [inner, inner], False, ctx.dtype, ctx.quant,
                                             prefix=f"{prefix}.kv")
        self.o = RowParallelLinear(inner, config.d_model, False, ctx.dtype, ctx.quant, prefix=f"{prefix}.o")


class T5EncoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.self_attn_norm = RMSNorm(config.d_model, eps, ctx.dtype)
        self.self_attn = T5SelfAttention(config, ctx, prefix=f"{prefix}.layer.0.SelfAttention")
        self.mlp_norm = RMSNorm(config.d_model, eps, ctx.dtype)
        self.mlp = T5FeedForward(config, ctx, prefix=f"{prefix}.layer.1.DenseReluDense")

    def forward(self, x, mask):
        """``x`` [B, S, d]; ``mask`` [B, H, S, S]: position bias plus key padding."""
        q, k, v = (t.transpose(1, 2) for t in self.self_attn.qkv_heads(self.self_attn_norm(x)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        x = x + self.self_attn.o(out.transpose(1, 2).flatten(2))
        return x + self.mlp(self.mlp_norm(x))


class T5DecoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.self_attn_norm = RMSNorm(config.d_model, eps, ctx.dtype)
        self.self_attn = T5SelfAttention(config, ctx, prefix=f"{prefix}.layer.0.SelfAttention")
        self.cross_attn_norm = RMSNorm(config.d_model, eps, ctx.dtype)
        self.cross_attn = T5CrossAttention(config, ctx, prefix=f"{prefix}.layer.1.EncDecAttention")
        self.mlp_norm = RMSNorm(config.d_model, eps, ctx.dtype)
        self.mlp = T5FeedForward(config, ctx, prefix=f"{prefix}.layer.2.DenseReluDense")

    def forward(self, x, residual, step: "_DecoderStep", layer_idx: int):
        if residual is None:
            residual, h = x, self.self_attn_norm(x)
        else:
            h, residual = self.self_attn_norm(x, residual)
        q, k, v = self.self_attn.qkv_heads(h)
        x = self.self_attn.o(step.self_attention(q, k, v, layer_idx))
        h, residual = self.cross_attn_norm(x, residual)
        q = self.cross_attn.q(h).view(h.shape[0], -1, self.self_attn.head_dim)
        x = self.cross_attn.o(step.cross_attention(q, layer_idx))
        h, residual = self.mlp_norm(x, residual)
        return self.mlp(h), residual


class _DecoderStep:
    """The padded view of one decoder step, shared by every layer.

    Sequence ``i``'s query rows go to row ``i`` of a [B, max_q] grid, right-aligned so column
    ``j`` is position ``seq_len - max_q + j``; its cached keys to [B, max_k] and its encoder
    keys/values to [B, max_src]. Masks (with the relative bias) are built once per step.
    """

    def __init__(self, meta: AttentionMetadata, kv_caches, cross_kv: list[torch.Tensor], bias: RelativeBias):
        self.meta, self.kv_caches = meta, kv_caches
        dev = meta.seq_lens.device
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        q_lens = meta.query_lens_cpu or (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
        self.B, self.max_q, self.max_k = len(seq_lens), max(q_lens), max(seq_lens)
        sl, ql = torch.tensor(seq_lens, device=dev), torch.tensor(q_lens, device=dev)

        col = torch.arange(self.max_q, device=dev)
        self.valid = col[None] >= (self.max_q - ql)[:, None]  # [B, max_q] real query rows
        self.src_row = (meta.cu_seqlens_q[:-1].long()[:, None] + col[None] - (self.max_q - ql)[:, None])
        q_pos = sl[:, None] - self.max_q + col[None]
        k_pos = torch.arange(self.max_k, device=dev)
        visible = (k_pos[None, None] <= q_pos[:, :, None]) & (k_pos[None, None] < sl[:, None, None])
        visible[..., 0] |= ~self.valid  # padding rows see key 0 so their softmax stays finite
        bias = bias(q_pos.clamp(min=0), k_pos.expand(self.B, -1))  # [B, H, max_q, max_k]
        self.self_mask = bias.masked_fill(~visible[:, None], float("-inf"))

        # Encoder keys/values of every layer: [B, max_src, L, 2, H, D] -> per layer [B, H, max_src, D].
        src_lens = torch.tensor([kv.shape[0] for kv in cross_kv], device=dev)
        self.cross_kv = pad_sequence(cross_kv, batch_first=True)
        src_visible = torch.arange(self.cross_kv.shape[1], device=dev)[None] < src_lens[:, None]
        self.cross_mask = torch.zeros(src_visible.shape, dtype=bias.dtype, device=dev).masked_fill(
            ~src_visible, float("-inf"))[:, None, None]  # [B, 1, 1, max_src]

    def _pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, H, D] flat query rows -> [B, H, max_q, D]."""
        if self.meta.is_decode_only:
            return rows.unsqueeze(2)
        grid = rows.new_zeros(self.B, self.max_q, *rows.shape[1:])
        grid[self.valid] = rows[self.src_row[self.valid]]
        return grid.transpose(1, 2)

    def _unpad(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, max_q, D] -> [T, H * D] in flat batch order."""
        out = out.transpose(1, 2)
        out = out.reshape(self.B, -1) if self.meta.is_decode_only else out[self.valid]
        return out.reshape(out.shape[0], -1)

    def self_attention(self, q, k, v, layer_idx: int) -> torch.Tensor:
        cache = self.kv_caches[layer_idx]
        write_kv(k, v, cache, self.meta.slot_mapping)
        block_size = cache.shape[2]
        n_blocks = -(-self.max_k // block_size)
        tables = self.meta.block_tables[:, :n_blocks].long()
        kv = cache[:, tables].flatten(2, 3)[:, :, : self.max_k].transpose(2, 3).to(q.dtype)  # [2, B, H, K, D]
        out = F.scaled_dot_product_attention(self._pad(q), kv[0], kv[1], attn_mask=self.self_mask, scale=1.0)
        return self._unpad(out)

    def cross_attention(self, q, layer_idx: int) -> torch.Tensor:
        kv = self.cross_kv[:, :, layer_idx].permute(2, 0, 3, 1, 4)  # [2, B, H, max_src, D]
        out = F.scaled_dot_product_attention(self._pad(q), kv[0], kv[1], attn_mask=self.cross_mask, scale=1.0)
        return self._unpad(out)


class T5Stack(nn.Module):
    def __init__(self, config, ctx: ModelContext, is_decoder: bool):
        super().__init__()
        n = config.num_decoder_layers if is_decoder else config.num_layers
        layer_cls = T5DecoderLayer if is_decoder else T5EncoderLayer
        stack = "decoder" if is_decoder else "encoder"
        self.layers = nn.ModuleList(layer_cls(config, ctx, prefix=f"{stack}.block.{i}") for i in range(n))
        heads = self.layers[0].self_attn.num_heads
        self.relative_bias = RelativeBias(config, not is_decoder, heads, ctx.dtype)
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, ctx.dtype)


class T5ForConditionalGeneration(CausalLM):
    is_encoder_decoder = True
    stacked_params = (
        (".self_attn.q.", (".self_attn.qkv.", "q")),
        (".self_attn.k.", (".self_attn.qkv.", "k")),
        (".self_attn.v.", (".self_attn.qkv.", "v")),
        (".cross_attn.k.", (".cross_attn.kv.", 0)),
        (".cross_attn.v.", (".cross_attn.kv.", 1)),
        (".mlp.wi_0.", (".mlp.wi.", 0)),
        (".mlp.wi_1.", (".mlp.wi.", 1)),
    )

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        if ctx.tp.size > 1:
            # The model shards like any other, but the TP step channel carries no encoder inputs.
            raise ValueError("T5 does not run tensor-parallel yet: serve it on one device")
        self.decoder_start_token_id = (config.decoder_start_token_id
                                       if getattr(config, "decoder_start_token_id", None) is not None
                                       else config.pad_token_id)
        self.shared = VocabParallelEmbedding(config.vocab_size, config.d_model, ctx.dtype)
        self.encoder = T5Stack(config, ctx, is_decoder=False)
        self.decoder = T5Stack(config, ctx, is_decoder=True)
        self.lm_head = ParallelLMHead(config.vocab_size, config.d_model, dtype=ctx.dtype)
        # Original T5 ties the head to the embedding and rescales; v1.1/FLAN-T5 have their own
        # head and do not (transformers 5 records this as scale_decoder_outputs); mT5 never does.
        scale = config.model_type != "mt5" and getattr(
            config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True))
        self.output_scale = config.d_model ** -0.5 if scale else None

    # -- weights --------------------------------------------------------------------------
    _SUBLAYER = {("encoder", "0"): "self_attn", ("encoder", "1"): "mlp",
                 ("decoder", "0"): "self_attn", ("decoder", "1"): "cross_attn", ("decoder", "2"): "mlp"}
    _BLOCK = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(\w+)\.(.+)$")

    def rename_weight(self, name):
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            return None  # tied to shared.weight
        name = name.replace("final_layer_norm", "final_norm")
        m = self._BLOCK.match(name)
        if m is None:
            return name
        stack, i, sub, module, rest = m.groups()
        part = self._SUBLAYER[(stack, sub)]
        if rest.startswith("relative_attention_bias"):  # cross-attention never has one
            return f"{stack}.relative_bias.weight" if part == "self_attn" else None
        if module == "layer_norm":
            return f"{stack}.layers.{i}.{part}_norm.{rest}"
        return f"{stack}.layers.{i}.{part}.{rest}"

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if "lm_head.weight" not in loaded:  # T5 v1.0 (and transformers 5 saves) tie the head
            self.lm_head.tie_to(self.shared)
        return loaded

    def kv_cache_spec(self):
        attn = self.decoder.layers[0].self_attn
        return KVCacheSpec(len(self.decoder.layers), attn.num_heads, attn.head_dim)

    # -- encoder --------------------------------------------------------------------------
    def encode(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Each prompt's cross-attention keys and values: [src_len, layers, 2, heads, head_dim]."""
        dev = self.shared.weight.device
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        ids = pad_sequence([torch.tensor(p, device=dev) for p in prompts], batch_first=True)
        B, S = ids.shape
        x = self.shared(ids.reshape(-1)).view(B, S, -1)
        pos = torch.arange(S, device=dev)
        mask = self.encoder.relative_bias(pos, pos)[None].to(x.dtype)  # [1, H, S, S]
        padding = pos[None] >= lens[:, None]  # [B, S]
        mask = mask.masked_fill(padding[:, None, None], float("-inf"))
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.encoder.final_norm(x)
        kv = torch.stack([layer.cross_attn.kv(x) for layer in self.decoder.layers], dim=2)  # [B, S, L, 2*inner]
        hd = self.decoder.layers[0].self_attn.head_dim
        kv = kv.view(B, S, len(self.decoder.layers), 2, -1, hd)
        return [kv[i, : len(p)].contiguous() for i, p in enumerate(prompts)]

    # -- decoder --------------------------------------------------------------------------
    def forward(self, input_ids, positions, batch: ForwardBatch):
        if batch.encoder is None:
            raise ValueError("T5 decodes against encoder states: ForwardBatch.encoder is missing")
        step = _DecoderStep(batch.attn, batch.kv_caches, batch.encoder, self.decoder.relative_bias)
        x, residual = self.shared(input_ids), None
        for i, layer in enumerate(self.decoder.layers):
            x, residual = layer(x, residual, step, i)
        x, _ = self.decoder.final_norm(x, residual)
        return x

    def compute_logits(self, hidden):
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        return self.lm_head(hidden)


ARCHITECTURES = {"t5": T5ForConditionalGeneration, "mt5": T5ForConditionalGeneration}
