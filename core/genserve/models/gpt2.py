"""GPT-2 (OpenAI) and GPTBigCode (SantaCoder, StarCoder), its multi-query descendant.

Both: learned absolute positions, pre-norm blocks, a fused ``c_attn``. GPT-2 stores its
projections as ``Conv1D`` ([in, out], the transpose of a linear weight) with ``c_attn`` laid out
``[q; k; v]``; GPTBigCode uses plain linears, and its ``c_attn`` is ``[q; k; v]`` with one KV head
(multi-query) or ``[q, k, v]`` per head otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from genserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.layers.norm import LayerNorm
from genserve.layers.weights import shape_of
from genserve.models.base import ModelContext
from genserve.models.gpt_layers import MLP, GPTStyleLM, SelfAttention


class TransposedSlice:
    """A lazy 2-D checkpoint slice read as its transpose, so layers can narrow it as usual."""

    def __init__(self, loaded):
        self.loaded = loaded

    def get_shape(self):
        return shape_of(self.loaded)[::-1]

    def __getitem__(self, index):
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        return self.loaded[cols, rows].t()


def transposed(loaded):
    return loaded.t() if isinstance(loaded, torch.Tensor) else TransposedSlice(loaded)


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        heads = config.num_attention_heads
        scale = (h // heads) ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        multi_query = config.model_type == "gpt_bigcode" and config.multi_query
        self.ln_1 = LayerNorm(h, eps, dtype=ctx.dtype)
        self.attn = SelfAttention(layer_idx, ctx, hidden_size=h, num_heads=heads,
                                  num_kv_heads=1 if multi_query else heads, names=("c_attn", "c_proj"),
                                  grouped=config.model_type == "gpt_bigcode", scale=scale,
                                  prefix=f"transformer.h.{layer_idx}.attn")
        self.ln_2 = LayerNorm(h, eps, dtype=ctx.dtype)
        self.mlp = MLP(h, config.n_inner or 4 * h, config.activation_function, ctx, names=("c_fc", "c_proj"),
                       prefix=f"transformer.h.{layer_idx}.mlp")

    def forward(self, positions, x, batch):
        x = x + self.attn(positions, self.ln_1(x), batch)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(GPTStyleLM):
    conv1d = True  # checkpoint projections are [in, out]

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        h = config.hidden_size
        self.wte = VocabParallelEmbedding(config.vocab_size, h, ctx.dtype)
        self.wpe = VocabParallelEmbedding(config.max_position_embeddings, h, ctx.dtype)
        self.h = nn.ModuleList(GPT2Block(config, i, ctx) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(h, config.layer_norm_epsilon, dtype=ctx.dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, h, dtype=ctx.dtype)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.wte)

    def load_weights(self, weights):
        if not self.conv1d:
            return super().load_weights(weights)

        def transpose_conv1d(name, tensor):
            is_conv1d = (".attn.c_" in name or ".mlp.c_" in name) and name.endswith(".weight")
            return name, transposed(tensor) if is_conv1d and len(shape_of(tensor)) == 2 else tensor

        return super().load_weights(transpose_conv1d(n, t) for n, t in weights)

    def forward(self, input_ids, positions, batch):
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(positions, x, batch)
        return self.ln_f(x)


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    conv1d = False


ARCHITECTURES = {"gpt2": GPT2LMHeadModel, "gpt_bigcode": GPTBigCodeForCausalLM}
