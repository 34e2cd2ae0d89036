"""Falcon (TII): 7B-style multi-query, 40B/180B-style grouped KV, and the ALiBi RW models.

``new_decoder_architecture`` (40B, 180B): ``num_kv_heads`` KV groups, attention and MLP in
parallel with their own norms (``ln_attn``, ``ln_mlp``). Otherwise (7B, RW-1B): one KV head when
``multi_query``, attention and MLP in parallel from one norm when ``parallel_attn``, rotary
positions unless ``alibi``. Every variant's qkv is fused per KV head.
"""

from __future__ import annotations

import torch
from torch import nn

from genserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.layers.norm import LayerNorm
from genserve.layers.rotary import RotaryEmbedding
from genserve.models.base import ModelContext
from genserve.models.gpt_layers import MLP, GPTStyleLM, SelfAttention, alibi_slopes


def falcon_kv_heads(config) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def falcon_alibi(config) -> list[float]:
    # Falcon adds ALiBi before scaling the scores by 1/sqrt(head_dim), so the slopes shrink by
    # that factor too; transformers (like the original code) rounds them to bfloat16 first.
    hd = config.hidden_size // config.num_attention_heads
    slopes = torch.tensor(alibi_slopes(config.num_attention_heads)).bfloat16().float()
    return (slopes * hd ** -0.5).tolist()


class FalconDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext):
        super().__init__()
        h, eps, bias = config.hidden_size, config.layer_norm_epsilon, config.bias
        hd = h // config.num_attention_heads
        self.self_attention = SelfAttention(
            layer_idx, ctx, hidden_size=h, num_heads=config.num_attention_heads,
            num_kv_heads=falcon_kv_heads(config), bias=bias, grouped=True,
            rotary=None if config.alibi else RotaryEmbedding.from_config(config, hd),
            alibi=falcon_alibi(config) if config.alibi else None,
            prefix=f"transformer.h.{layer_idx}.self_attention")
        self.mlp = MLP(h, config.ffn_hidden_size, config.activation, ctx, bias=bias,
                       prefix=f"transformer.h.{layer_idx}.mlp")
        self.parallel = config.new_decoder_architecture or config.parallel_attn
        # Only the new architecture gives attention and MLP separate norms (num_ln_in_parallel_attn).
        self.two_norms = config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2
        if self.two_norms:
            self.ln_attn = LayerNorm(h, eps, dtype=ctx.dtype)
            self.ln_mlp = LayerNorm(h, eps, dtype=ctx.dtype)
        else:
            self.input_layernorm = LayerNorm(h, eps, dtype=ctx.dtype)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(h, eps, dtype=ctx.dtype)

    def forward(self, positions, x, batch):
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(positions, attn_in, batch)
        if self.parallel:
            return x + attn + self.mlp(mlp_in)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class FalconForCausalLM(GPTStyleLM):
    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        h = config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, h, ctx.dtype)
        self.h = nn.ModuleList(FalconDecoderLayer(config, i, ctx) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(h, config.layer_norm_epsilon, dtype=ctx.dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, h, dtype=ctx.dtype)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.word_embeddings)

    def forward(self, input_ids, positions, batch):
        x = self.word_embeddings(input_ids)
        for layer in self.h:
            x = layer(positions, x, batch)
        return self.ln_f(x)


ARCHITECTURES = {"falcon": FalconForCausalLM}
