"""GPT-NeoX (EleutherAI): Pythia, GPT-NeoX-20B, StableLM-alpha, RedPajama-INCITE.

Rotary on the leading ``partial_rotary_factor`` (``rotary_pct``) of each head, attention and
MLP in parallel from the same input (``use_parallel_residual``), qkv fused per head.
"""

from __future__ import annotations

from torch import nn

from genserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.layers.norm import LayerNorm
from genserve.layers.rotary import RotaryEmbedding, rope_parameters
from genserve.models.base import ModelContext
from genserve.models.gpt_layers import MLP, GPTStyleLM, SelfAttention


class GPTNeoXLayer(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext):
        super().__init__()
        h, eps, heads = config.hidden_size, config.layer_norm_eps, config.num_attention_heads
        hd = h // heads
        pct = rope_parameters(config).get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
        self.input_layernorm = LayerNorm(h, eps, dtype=ctx.dtype)
        # query_key_value rows are [head, (q, k, v), head_dim].
        self.attention = SelfAttention(layer_idx, ctx, hidden_size=h, num_heads=heads, grouped=True,
                                       bias=getattr(config, "attention_bias", True),
                                       rotary=RotaryEmbedding.from_config(config, hd, int(hd * pct)),
                                       prefix=f"gpt_neox.layers.{layer_idx}.attention")
        self.post_attention_layernorm = LayerNorm(h, eps, dtype=ctx.dtype)
        self.mlp = MLP(h, config.intermediate_size, config.hidden_act, ctx, prefix=f"gpt_neox.layers.{layer_idx}.mlp")
        self.parallel = config.use_parallel_residual

    def forward(self, positions, x, batch):
        attn = self.attention(positions, self.input_layernorm(x), batch)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXForCausalLM(GPTStyleLM):
    prefixes = ("gpt_neox.",)
    renames = (("embed_out.", "lm_head."),)  # the original checkpoints' name for the head

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        h = config.hidden_size
        self.embed_in = VocabParallelEmbedding(config.vocab_size, h, ctx.dtype)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, i, ctx) for i in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(h, config.layer_norm_eps, dtype=ctx.dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, h, dtype=ctx.dtype)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.embed_in)

    def forward(self, input_ids, positions, batch):
        x = self.embed_in(input_ids)
        for layer in self.layers:
            x = layer(positions, x, batch)
        return self.final_layer_norm(x)


ARCHITECTURES = {"gpt_neox": GPTNeoXForCausalLM}
