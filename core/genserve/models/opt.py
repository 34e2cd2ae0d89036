"""OPT (Meta) and Galactica, which is OPT: learned positions, optional embedding projections.

OPT-350m is the odd one: post-norm layers (``do_layer_norm_before=False``, no final norm) and
word embeddings narrower than the model (``project_in``/``project_out``).
"""

from __future__ import annotations

from torch import nn

from genserve.layers.activation import get_activation
from genserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from genserve.layers.norm import LayerNorm
from genserve.models.base import ModelContext
from genserve.models.gpt_layers import GPTStyleLM, SelfAttention

# OPT's position table starts two rows in (rows 0 and 1 were fairseq's padding offset).
POSITION_OFFSET = 2


def opt_layer_norm(config, ctx: ModelContext) -> LayerNorm:
    norm = LayerNorm(config.hidden_size, 1e-5, dtype=ctx.dtype)
    if not getattr(config, "layer_norm_elementwise_affine", True):
        # A plain standardisation, nothing to load (what ``norm.weight = None`` does, typed).
        norm.register_parameter("weight", None)
        norm.register_parameter("bias", None)
    return norm


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext):
        super().__init__()
        h, bias = config.hidden_size, getattr(config, "enable_bias", True)
        self.self_attn = SelfAttention(layer_idx, ctx, hidden_size=h, num_heads=config.num_attention_heads,
                                       bias=bias, names=("qkv_proj", "out_proj"),
                                       prefix=f"model.decoder.layers.{layer_idx}.self_attn")
        self.self_attn_layer_norm = opt_layer_norm(config, ctx)
        prefix = f"model.decoder.layers.{layer_idx}"
        self.fc1 = ColumnParallelLinear(h, config.ffn_dim, bias, ctx.dtype, ctx.quant, prefix=f"{prefix}.fc1")
        self.fc2 = RowParallelLinear(config.ffn_dim, h, bias, ctx.dtype, ctx.quant, prefix=f"{prefix}.fc2")
        self.act = get_activation(config.activation_function)
        self.final_layer_norm = opt_layer_norm(config, ctx)
        self.pre_norm = config.do_layer_norm_before

    def forward(self, positions, x, batch):
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(positions, h, batch)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTForCausalLM(GPTStyleLM):
    prefixes = ("model.", "decoder.")
    stacked_params = (
        (".q_proj", (".qkv_proj", "q")),
        (".k_proj", (".qkv_proj", "k")),
        (".v_proj", (".qkv_proj", "v")),
    )

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        h, word_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, word_dim, ctx.dtype)
        self.embed_positions = VocabParallelEmbedding(config.max_position_embeddings + POSITION_OFFSET, h,
                                                      ctx.dtype)
        self.project_in = self.project_out = None
        if word_dim != h:
            self.project_in = ReplicatedLinear(word_dim, h, False, ctx.dtype, ctx.quant,
                                               prefix="model.decoder.project_in")
            self.project_out = ReplicatedLinear(h, word_dim, False, ctx.dtype, ctx.quant,
                                                prefix="model.decoder.project_out")
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i, ctx) for i in range(config.num_hidden_layers))
        self.final_layer_norm = None
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            self.final_layer_norm = opt_layer_norm(config, ctx)
        self.lm_head = ParallelLMHead(config.vocab_size, word_dim, dtype=ctx.dtype)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.embed_tokens)

    def forward(self, input_ids, positions, batch):
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            x = layer(positions, x, batch)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return self.project_out(x) if self.project_out is not None else x


ARCHITECTURES = {"opt": OPTForCausalLM}
