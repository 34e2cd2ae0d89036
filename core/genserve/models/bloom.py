"""BLOOM (BigScience): ALiBi positions, a LayerNorm right after the embedding, qkv fused per head."""

from __future__ import annotations

from torch import nn

from genserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.layers.norm import LayerNorm
from genserve.models.base import ModelContext
from genserve.models.gpt_layers import MLP, GPTStyleLM, SelfAttention, alibi_slopes


class BloomBlock(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.input_layernorm = LayerNorm(h, eps, dtype=ctx.dtype)
        # query_key_value rows are [head, (q, k, v), head_dim].
        self.self_attention = SelfAttention(layer_idx, ctx, hidden_size=h, num_heads=config.n_head,
                                            grouped=True, alibi=alibi_slopes(config.n_head),
                                            prefix=f"transformer.h.{layer_idx}.self_attention")
        self.post_attention_layernorm = LayerNorm(h, eps, dtype=ctx.dtype)
        self.mlp = MLP(h, 4 * h, "gelu_pytorch_tanh", ctx, prefix=f"transformer.h.{layer_idx}.mlp")  # BLOOM's gelu is the tanh approximation
        # Some BLOOM variants add the residual after the norm rather than before it.
        self.residual_after_norm = config.apply_residual_connection_post_layernorm

    def forward(self, positions, x, batch):
        h = self.input_layernorm(x)
        x = (h if self.residual_after_norm else x) + self.self_attention(positions, h, batch)
        h = self.post_attention_layernorm(x)
        return (h if self.residual_after_norm else x) + self.mlp(h)


class BloomForCausalLM(GPTStyleLM):
    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, h, ctx.dtype)
        self.word_embeddings_layernorm = LayerNorm(h, eps, dtype=ctx.dtype)
        self.h = nn.ModuleList(BloomBlock(config, i, ctx) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(h, eps, dtype=ctx.dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, h, dtype=ctx.dtype)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.word_embeddings)

    def forward(self, input_ids, positions, batch):
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            x = block(positions, x, batch)
        return self.ln_f(x)


ARCHITECTURES = {"bloom": BloomForCausalLM}
