"""Llama family: Llama 1/2/3, CodeLlama, SmolLM2; Mistral, Qwen2 and Phi-3 through configuration.

Variants differ only in what their configs say (sliding windows, qkv bias, partial rotary,
fused checkpoint tensors), so they share these classes. Gemma and Mixtral subclass them and
swap the norm, embedding scale, decoder layer or MLP (``make_layer`` / ``make_mlp``).
"""

from __future__ import annotations

from torch import nn

from genserve.attention.base import AttentionSpec
from genserve.layers.activation import GatedActivation
from genserve.layers.attention import Attention
from genserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from genserve.layers.norm import RMSNorm
from genserve.layers.rotary import RotaryEmbedding, rope_parameters
from genserve.models.base import CausalLM, ForwardBatch, KVCacheSpec, ModelContext


def layer_prefix(layer_idx: int, module: str) -> str:
    """The checkpoint name of a decoder layer's sub-module (what quantizers match against)."""
    return f"model.layers.{layer_idx}.{module}"


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config, layer_idx: int) -> int | None:
    """The layer's attention window: configs name it once, ``layer_types`` says which layers use it."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2 configs carry a disabled window
        return None
    layer_types = getattr(config, "layer_types", None)
    if window and layer_types and layer_types[layer_idx] != "sliding_attention":
        return None
    return window


def rotary_dim_of(config, head_dim: int) -> int:
    """Phi-3.5/Phi-4-mini rotate only part of each head (``partial_rotary_factor``)."""
    factor = rope_parameters(config).get("partial_rotary_factor",
                                         getattr(config, "partial_rotary_factor", 1.0))
    return int(head_dim * (factor or 1.0))


class LlamaMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext, bias: bool = False, prefix: str = ""):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(h, [i, i], bias, ctx.dtype, ctx.quant,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(i, h, bias, ctx.dtype, ctx.quant, prefix=f"{prefix}.down_proj")
        # Gemma 2 names its activation ``hidden_activation``.
        act: str = (config.hidden_activation if getattr(config, "hidden_activation", None)
                    else getattr(config, "hidden_act", "silu"))
        self.act = GatedActivation(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        hd = head_dim_of(config)
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        qkv_bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_attention_heads, n_kv,
                                          qkv_bias, ctx.dtype, ctx.quant, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size,
                                        getattr(config, "attention_bias", False), ctx.dtype, ctx.quant,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = RotaryEmbedding.from_config(config, hd, rotary_dim_of(config, hd))
        # Gemma 2 scales queries by query_pre_attn_scalar instead of head_dim, and softcaps scores.
        scalar = getattr(config, "query_pre_attn_scalar", None) or hd
        spec = AttentionSpec(
            num_heads=self.qkv_proj.num_heads, head_dim=hd, num_kv_heads=self.qkv_proj.num_kv_heads,
            scale=scalar ** -0.5, sliding_window=sliding_window_of(config, layer_idx),
            logit_softcap=getattr(config, "attn_logit_softcapping", None),
        )
        self.attn = Attention(layer_idx, spec, ctx)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size

    def forward(self, positions, x, batch: ForwardBatch):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        T = x.shape[0]
        q, k = self.rotary_emb(positions, q.view(T, -1, self.attn.spec.head_dim),
                               k.view(T, -1, self.attn.spec.head_dim))
        return self.o_proj(self.attn(q.reshape(T, -1), k.reshape(T, -1), v, batch))


class LlamaLayer(nn.Module):
    """What ``LlamaForCausalLM`` reads of the layers ``make_layer`` builds: their attention
    (whose rotary table the model shares across layers, and whose spec sizes the KV cache)."""

    self_attn: LlamaAttention


class LlamaDecoderLayer(LlamaLayer):
    def __init__(self, config, layer_idx: int, ctx: ModelContext, mlp: nn.Module, norm_offset: float = 0.0):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = LlamaAttention(config, layer_idx, ctx, prefix=layer_prefix(layer_idx, "self_attn"))
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ctx.dtype, norm_offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ctx.dtype, norm_offset)

    def forward(self, positions, x, residual, batch):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(CausalLM):
    stacked_params: tuple[tuple[str, tuple[str, object]], ...] = (
        (".q_proj", (".qkv_proj", "q")),
        (".k_proj", (".qkv_proj", "k")),
        (".v_proj", (".qkv_proj", "v")),
        (".gate_proj", (".gate_up_proj", 0)),
        (".up_proj", (".gate_up_proj", 1)),
    )
    # Phi-3 checkpoints hold qkv_proj and gate_up_proj already fused: those names match the
    # parameters directly and their loaders split them (shard id None).

    norm_offset = 0.0  # Gemma: RMSNorm scales by (1 + w)

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.dtype)
        layers = [self.make_layer(config, i, ctx) for i in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(layers)
        # Every layer rotates alike: share one fp32 cos/sin table of max_position rows (otherwise
        # ~50 MB a layer at 128k positions, twice that with longrope's two tables).
        self.rotary_emb = layers[0].self_attn.rotary_emb
        for layer in layers[1:]:
            layer.self_attn.rotary_emb = self.rotary_emb
        # Longrope: the known length at which a decoding sequence must be recomputed (the
        # engine's generic hook; None for every other rotary).
        self.recompute_at_length = self.rotary_emb.recompute_at_length
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.dtype, self.norm_offset)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype=ctx.dtype)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.embed_tokens)

    def make_mlp(self, config, layer_idx: int, ctx: ModelContext) -> nn.Module:
        return LlamaMLP(config, ctx, getattr(config, "mlp_bias", False), prefix=layer_prefix(layer_idx, "mlp"))

    def make_layer(self, config, layer_idx: int, ctx: ModelContext) -> LlamaLayer:
        return LlamaDecoderLayer(config, layer_idx, ctx, self.make_mlp(config, layer_idx, ctx),
                                 self.norm_offset)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def rename_weight(self, name):
        return name.removeprefix("model.")

    def kv_cache_spec(self):
        attn = self.layers[0].self_attn.attn.spec
        return KVCacheSpec(len(self.layers), attn.num_kv_heads, attn.head_dim)

    def input_embeddings(self, input_ids, batch: ForwardBatch):
        """The first layer's input rows [T, hidden]; vision-language models write their image
        embeddings over the placeholder rows here."""
        return self.embed(input_ids)

    def forward(self, input_ids, positions, batch):
        x, residual = self.input_embeddings(input_ids, batch), None
        # The layers use positions only to rotate: hand them the rotary table's rows (longrope
        # picks the short or long table per sequence, once per step rather than per layer).
        rows = self.rotary_emb.cache_rows(positions, batch.attn)
        for layer in self.layers:
            x, residual = layer(rows, x, residual, batch)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden):
        return self.lm_head(hidden)


ARCHITECTURES = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "phi3": LlamaForCausalLM,
}
