"""MPT (MosaicML): ALiBi positions, no biases (`no_bias`), optional clamping of the qkv activations."""

from __future__ import annotations

from torch import nn

from genserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.layers.norm import LayerNorm
from genserve.models.base import ModelContext
from genserve.models.gpt_layers import MLP, GPTStyleLM, SelfAttention, alibi_slopes


class MptBlock(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext):
        super().__init__()
        h, eps, attn_cfg = config.hidden_size, config.layer_norm_epsilon, config.attn_config
        bias = not config.no_bias  # released MPTs have none (transformers ignores the flag)
        self.norm_1 = LayerNorm(h, eps, bias=bias, dtype=ctx.dtype)
        self.attn = SelfAttention(layer_idx, ctx, hidden_size=h, num_heads=config.n_heads, bias=bias,
                                  names=("Wqkv", "out_proj"), scale=attn_cfg.softmax_scale,
                                  alibi=alibi_slopes(config.n_heads, attn_cfg.alibi_bias_max),
                                  clip_qkv=attn_cfg.clip_qkv, prefix=f"transformer.blocks.{layer_idx}.attn")
        self.norm_2 = LayerNorm(h, eps, bias=bias, dtype=ctx.dtype)
        self.ffn = MLP(h, config.expansion_ratio * h, "gelu", ctx, bias=bias, names=("up_proj", "down_proj"),
                       prefix=f"transformer.blocks.{layer_idx}.ffn")

    def forward(self, positions, x, batch):
        x = x + self.attn(positions, self.norm_1(x), batch)
        return x + self.ffn(self.norm_2(x))


class MptForCausalLM(GPTStyleLM):
    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        attn_cfg = config.attn_config
        if not attn_cfg.alibi or attn_cfg.qk_ln or attn_cfg.attn_type != "multihead_attention":
            raise ValueError("MPT is supported with ALiBi multi-head attention without qk_ln "
                             "(every released MPT); this config asks for something else")
        h = config.hidden_size
        self.wte = VocabParallelEmbedding(config.vocab_size, h, ctx.dtype)
        self.blocks = nn.ModuleList(MptBlock(config, i, ctx) for i in range(config.n_layers))
        self.norm_f = LayerNorm(h, config.layer_norm_epsilon, bias=not config.no_bias, dtype=ctx.dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, h, dtype=ctx.dtype)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.wte)

    def forward(self, input_ids, positions, batch):
        x = self.wte(input_ids)
        for block in self.blocks:
            x = block(positions, x, batch)
        return self.norm_f(x)


ARCHITECTURES = {"mpt": MptForCausalLM}
