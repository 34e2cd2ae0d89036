"""Gemma and Gemma 2: the Llama layers with Gemma's conventions.

Both scale the embeddings by sqrt(hidden_size) and use (1 + w) RMSNorm. Gemma 2 adds what its
config names and the shared Llama attention already reads (``query_pre_attn_scalar``,
``attn_logit_softcapping``, sliding windows on alternate layers through ``layer_types``),
plus a norm after each sublayer and a softcap on the final logits.
"""

from __future__ import annotations

import torch
from torch import nn

from genserve.layers.norm import RMSNorm
from genserve.models.base import ModelContext
from genserve.models.llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaLayer,
    layer_prefix,
)


class GemmaForCausalLM(LlamaForCausalLM):
    norm_offset = 1.0

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        # transformers rounds the scale to the model dtype before multiplying; so do we.
        self.embed_scale = float(torch.tensor(config.hidden_size ** 0.5, dtype=ctx.dtype))

    def embed(self, input_ids):
        return self.embed_tokens(input_ids) * self.embed_scale


class Gemma2DecoderLayer(LlamaLayer):
    """Pre- and post-norms around both sublayers; the post-norms act before the residual add."""

    def __init__(self, config, layer_idx: int, ctx: ModelContext, mlp: nn.Module, norm_offset: float):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = LlamaAttention(config, layer_idx, ctx, prefix=layer_prefix(layer_idx, "self_attn"))
        self.mlp = mlp
        self.input_layernorm = RMSNorm(h, eps, ctx.dtype, norm_offset)
        self.post_attention_layernorm = RMSNorm(h, eps, ctx.dtype, norm_offset)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, ctx.dtype, norm_offset)
        self.post_feedforward_layernorm = RMSNorm(h, eps, ctx.dtype, norm_offset)

    def forward(self, positions, x, residual, batch):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, batch))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma2ForCausalLM(GemmaForCausalLM):
    def make_layer(self, config, layer_idx, ctx) -> Gemma2DecoderLayer:
        return Gemma2DecoderLayer(config, layer_idx, ctx, self.make_mlp(config, layer_idx, ctx),
                                  self.norm_offset)

    def compute_logits(self, hidden):
        logits = super().compute_logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


ARCHITECTURES = {"gemma": GemmaForCausalLM, "gemma2": Gemma2ForCausalLM}
