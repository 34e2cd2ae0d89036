"""Idefics2 (Laurençon et al. 2024, "What matters when building vision-language models?";
transformers' ``Idefics2ForConditionalGeneration``): the variable-resolution SigLIP encoder
(``idefics_vision``), a connector of a gated MLP and a Perceiver resampler (Jaegle et al.
2021: ``resampler_n_latents`` learned latents cross-attend to the image's patches and to
themselves, ``resampler_depth`` times), over a Mistral/Llama text model.

Every image (or crop, with the processor's ``do_image_splitting``) becomes exactly
``resampler_n_latents`` rows, the ``image_seq_len`` ``<image>`` tokens the processor writes
between ``<fake_token_around_image>`` tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.layers.activation import get_activation
from genserve.layers.linear import ReplicatedLinear
from genserve.layers.norm import RMSNorm
from genserve.models.base import ModelContext
from genserve.models.idefics_vision import IdeficsVisionTransformer, embed_tiles
from genserve.models.vision_language import VisionLanguageLM
from genserve.multimodal.inputs import MultiModalInputs

RENAMES = (
    ("model.text_model.", ""),
    ("model.vision_model.", "vision_model."),
    ("model.connector.", "connector."),
)


class Idefics2MLP(nn.Module):
    """down(act(gate(x)) * up(x)), from ``in_features`` to ``out_features``."""

    def __init__(self, in_features: int, intermediate: int, out_features: int, act: str, dtype, prefix: str):
        super().__init__()
        self.gate_proj = ReplicatedLinear(in_features, intermediate, False, dtype, prefix=f"{prefix}.gate_proj")
        self.up_proj = ReplicatedLinear(in_features, intermediate, False, dtype, prefix=f"{prefix}.up_proj")
        self.down_proj = ReplicatedLinear(intermediate, out_features, False, dtype, prefix=f"{prefix}.down_proj")
        self.act = get_activation(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PerceiverAttention(nn.Module):
    """Latents attend to [context; latents] (grouped-query heads, no positions, no causality)."""

    def __init__(self, config, dtype, prefix: str):
        super().__init__()
        h, self.heads, self.kv_heads = config.hidden_size, config.resampler_n_heads, config.num_key_value_heads
        self.head_dim = config.resampler_head_dim
        self.q_proj = ReplicatedLinear(h, self.heads * self.head_dim, False, dtype, prefix=f"{prefix}.q_proj")
        self.k_proj = ReplicatedLinear(h, self.kv_heads * self.head_dim, False, dtype, prefix=f"{prefix}.k_proj")
        self.v_proj = ReplicatedLinear(h, self.kv_heads * self.head_dim, False, dtype, prefix=f"{prefix}.v_proj")
        self.o_proj = ReplicatedLinear(self.heads * self.head_dim, h, False, dtype, prefix=f"{prefix}.o_proj")

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        N, Q, _ = latents.shape
        both = torch.cat([context, latents], dim=1)
        K = both.shape[1]
        q = self.q_proj(latents).view(N, Q, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(both).view(N, K, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(both).view(N, K, self.kv_heads, self.head_dim).transpose(1, 2)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(N, Q, -1))


class PerceiverLayer(nn.Module):
    def __init__(self, config, dtype, prefix: str):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_latents_norm = RMSNorm(h, eps, dtype)
        self.input_context_norm = RMSNorm(h, eps, dtype)
        self.self_attn = PerceiverAttention(config, dtype, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(h, eps, dtype)
        self.mlp = Idefics2MLP(h, 4 * h, h, config.hidden_act, dtype, f"{prefix}.mlp")

    def forward(self, latents, context, mask):
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context), mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, config, dtype, prefix: str):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(config.resampler_n_latents, config.hidden_size, dtype=dtype),
                                    requires_grad=False)
        self.layers = nn.ModuleList(PerceiverLayer(config, dtype, f"{prefix}.layers.{i}")
                                    for i in range(config.resampler_depth))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, context: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """``context`` [N, patches, hidden], ``patch_mask`` bool [N, patches] -> [N, latents, hidden]."""
        N = context.shape[0]
        latents = self.latents.expand(N, -1, -1)
        mask = None
        if not bool(patch_mask.all()):
            keys = torch.cat([patch_mask, patch_mask.new_ones(N, latents.shape[1])], dim=1)
            mask = keys[:, None, None, :]
        for layer in self.layers:
            latents = layer(latents, context, mask)
        return self.norm(latents)


class Idefics2Connector(nn.Module):
    def __init__(self, config, dtype):
        super().__init__()
        text = config.text_config
        self.modality_projection = Idefics2MLP(config.vision_config.hidden_size, text.intermediate_size,
                                               text.hidden_size, text.hidden_act, dtype,
                                               "connector.modality_projection")
        self.perceiver_resampler = PerceiverResampler(config.perceiver_config, dtype, "connector.perceiver_resampler")

    def forward(self, x, patch_mask):
        return self.perceiver_resampler(self.modality_projection(x), patch_mask.flatten(1))


class Idefics2ForConditionalGeneration(VisionLanguageLM):
    model_name = "idefics2"
    renames = RENAMES

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx, config.image_token_id)
        self.vision_model = IdeficsVisionTransformer(config.vision_config, ctx.dtype)
        self.connector = Idefics2Connector(config, ctx.dtype)

    def embed_images(self, inputs: list[MultiModalInputs]) -> list[torch.Tensor]:
        """Every real tile through the encoder and the resampler (``embed_tiles``); a patch
        counts as real only if all its pixels are (transformers' Idefics2)."""
        return embed_tiles(inputs, self.vlm_config.vision_config.patch_size, any_pixel=False,
                           encode=lambda pixels, mask: self.connector(self.vision_model(pixels, mask), mask),
                           like=self.embed_tokens.weight)


ARCHITECTURES = {"idefics2": Idefics2ForConditionalGeneration}
