"""GPT-J: attention and MLP in parallel off one LayerNorm, interleaved partial rotary.

Written only against genserve's public building blocks, as any outside plugin would be:
``genserve.layers`` for tensor-parallel linear layers, norms, rotary and paged attention, and
``genserve.models.base.CausalLM`` for the contract with the engine and the weight loader.
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


class GPTJAttention(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        hd = h // heads
        # q_proj, k_proj and v_proj load into one column-parallel matmul (see stacked_params).
        # ``prefix``: the checkpoint name quantizers match (e.g. ``transformer.h.0.attn``).
        self.qkv_proj = QKVParallelLinear(h, hd, heads, heads, False, ctx.dtype, ctx.quant, prefix=f"{prefix}.qkv_proj")
        self.out_proj = RowParallelLinear(h, h, False, ctx.dtype, ctx.quant, prefix=f"{prefix}.out_proj")
        # GPT-J rotates adjacent pairs of the first rotary_dim features of each head.
        self.rotary_emb = RotaryEmbedding.from_config(config, hd, config.rotary_dim or hd, interleaved=True)
        spec = AttentionSpec(num_heads=self.qkv_proj.num_heads, head_dim=hd,
                             num_kv_heads=self.qkv_proj.num_kv_heads, scale=hd ** -0.5)
        self.attn = Attention(layer_idx, spec, ctx)

    def forward(self, positions, x, batch: ForwardBatch):
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        T, hd = x.shape[0], self.attn.spec.head_dim
        q, k = self.rotary_emb(positions, q.view(T, -1, hd), k.view(T, -1, hd))
        return self.out_proj(self.attn(q.reshape(T, -1), k.reshape(T, -1), v, batch))


class GPTJMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.fc_in = ColumnParallelLinear(config.hidden_size, inner, True, ctx.dtype, ctx.quant, prefix=f"{prefix}.fc_in")
        self.fc_out = RowParallelLinear(inner, config.hidden_size, True, ctx.dtype, ctx.quant, prefix=f"{prefix}.fc_out")
        self.act = get_activation(config.activation_function)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class GPTJBlock(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext):
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.layer_norm_epsilon, dtype=ctx.dtype)
        self.attn = GPTJAttention(config, layer_idx, ctx, prefix=f"transformer.h.{layer_idx}.attn")
        self.mlp = GPTJMLP(config, ctx, prefix=f"transformer.h.{layer_idx}.mlp")

    def forward(self, positions, x, residual, batch):
        # genserve norms take (x, residual) and return (norm(x + residual), x + residual), so the
        # residual add of the previous block happens inside this block's LayerNorm.
        if residual is None:
            residual, h = x, self.ln_1(x)
        else:
            h, residual = self.ln_1(x, residual)
        return self.attn(positions, h, batch) + self.mlp(h), residual


class GPTJForCausalLM(CausalLM):
    # Checkpoint fragment -> (parameter fragment, shard of the fused parameter).
    stacked_params = (
        (".q_proj", (".qkv_proj", "q")),
        (".k_proj", (".qkv_proj", "k")),
        (".v_proj", (".qkv_proj", "v")),
    )
    skip_weights = ("attn.bias", "attn.masked_bias")  # causal-mask buffers in old checkpoints

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        # Module names follow the checkpoint's (transformer.wte, transformer.h.N..., lm_head).
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.dtype)
        self.h = nn.ModuleList(GPTJBlock(config, i, ctx) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon, dtype=ctx.dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=True, dtype=ctx.dtype)

    def rename_weight(self, name):
        return name.removeprefix("transformer.")

    def kv_cache_spec(self):
        spec = self.h[0].attn.attn.spec
        return KVCacheSpec(len(self.h), spec.num_kv_heads, spec.head_dim)

    def forward(self, input_ids, positions, batch):
        x, residual = self.wte(input_ids), None
        for block in self.h:
            x, residual = block(positions, x, residual, batch)
        x, _ = self.ln_f(x, residual)
        return x

    def compute_logits(self, hidden):
        return self.lm_head(hidden)
