"""Phi-1, Phi-1.5 and Phi-2: attention and MLP in parallel off one LayerNorm, partial rotary.

(Phi-3 is Llama-shaped and served by ``llama.py``.)
"""

from __future__ import annotations

from torch import nn

from genserve.attention.base import AttentionSpec
from genserve.layers.activation import get_activation
from genserve.layers.attention import Attention
from genserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from genserve.layers.norm import LayerNorm
from genserve.layers.rotary import RotaryEmbedding
from genserve.models.base import CausalLM, ForwardBatch, KVCacheSpec, ModelContext
from genserve.models.llama import head_dim_of, rotary_dim_of


class PhiAttention(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        hd = head_dim_of(config)
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_attention_heads, n_kv,
                                          True, ctx.dtype, ctx.quant, prefix=f"{prefix}.qkv_proj")
        self.dense = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size, True,
                                       ctx.dtype, ctx.quant, prefix=f"{prefix}.dense")
        self.rotary_emb = RotaryEmbedding.from_config(config, hd, rotary_dim_of(config, hd))
        self.qk_layernorm = getattr(config, "qk_layernorm", False)
        if self.qk_layernorm:  # per head, before the rotation
            self.q_layernorm = LayerNorm(hd, config.layer_norm_eps, dtype=ctx.dtype)
            self.k_layernorm = LayerNorm(hd, config.layer_norm_eps, dtype=ctx.dtype)
        spec = AttentionSpec(num_heads=self.qkv_proj.num_heads, head_dim=hd,
                             num_kv_heads=self.qkv_proj.num_kv_heads, scale=hd ** -0.5)
        self.attn = Attention(layer_idx, spec, ctx)
        self.sizes = [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size]

    def forward(self, positions, x, batch: ForwardBatch):
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        T, hd = x.shape[0], self.attn.spec.head_dim
        q, k = q.reshape(T, -1, hd), k.reshape(T, -1, hd)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q.reshape(T, -1), k.reshape(T, -1), v, batch))


class PhiMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, True, ctx.dtype, ctx.quant,
                                        prefix=f"{prefix}.fc1")
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, True, ctx.dtype, ctx.quant,
                                     prefix=f"{prefix}.fc2")
        self.act = get_activation(config.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=ctx.dtype)
        self.self_attn = PhiAttention(config, layer_idx, ctx, prefix=f"model.layers.{layer_idx}.self_attn")
        self.mlp = PhiMLP(config, ctx, prefix=f"model.layers.{layer_idx}.mlp")

    def forward(self, positions, x, residual, batch):
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        # Both branches read the same normed input; their sum joins the residual in the next norm.
        return self.self_attn(positions, h, batch) + self.mlp(h), residual


class PhiForCausalLM(CausalLM):
    stacked_params = (
        (".q_proj", (".qkv_proj", "q")),
        (".k_proj", (".qkv_proj", "k")),
        (".v_proj", (".qkv_proj", "v")),
    )

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.dtype)
        self.layers = nn.ModuleList(PhiDecoderLayer(config, i, ctx) for i in range(config.num_hidden_layers))
        self.final_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=ctx.dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=True, dtype=ctx.dtype)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.embed_tokens)

    def rename_weight(self, name):
        return name.removeprefix("model.")

    def kv_cache_spec(self):
        spec = self.layers[0].self_attn.attn.spec
        return KVCacheSpec(len(self.layers), spec.num_kv_heads, spec.head_dim)

    def forward(self, input_ids, positions, batch):
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch)
        x, _ = self.final_layernorm(x, residual)
        return x

    def compute_logits(self, hidden):
        return self.lm_head(hidden)


ARCHITECTURES = {"phi": PhiForCausalLM}
