"""CLIP's vision transformer (Radford et al. 2021; transformers' ``CLIPVisionModel``) as the
image encoder of vision-language models, written against our layers. Its encoder layers are
SigLIP's too (Idefics3 uses them with a padding mask).

It attends over each image's patches without a KV cache (every image is one short,
bidirectional sequence), so it calls PyTorch's SDPA rather than the paged attention kernels.
Only the layers whose output is used are built: Llava-Next reads the second to last layer's
hidden states, so the last layer and the post-LayerNorm are never run nor loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.layers.activation import get_activation
from genserve.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from genserve.layers.norm import LayerNorm


class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding (a strided convolution), the class token and learned positions."""

    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.patch_size, self.image_size = config.patch_size, config.image_size
        h = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(h, dtype=dtype), requires_grad=False)
        self.patch_embedding = nn.Conv2d(config.num_channels, h, config.patch_size, config.patch_size,
                                         bias=False, dtype=dtype)
        self.patch_embedding.requires_grad_(False)
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, h, dtype=dtype)
        self.position_embedding.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, 1 + patches, hidden]."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, config, dtype: torch.dtype, prefix: str):
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = h // heads
        self.qkv_proj = QKVParallelLinear(h, self.head_dim, heads, heads, True, dtype, None,
                                          prefix=f"{prefix}.qkv_proj")
        self.out_proj = RowParallelLinear(h, h, True, dtype, None, prefix=f"{prefix}.out_proj")
        self.num_heads = self.qkv_proj.num_heads
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [N, L, hidden]; ``mask`` None or bool [N, 1, 1, L], False for keys to ignore
        (padding patches of variable-resolution encoders)."""
        N, L, _ = x.shape
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        q, k, v = (t.view(N, L, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(N, L, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype, prefix: str):
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, True, dtype, None,
                                        prefix=f"{prefix}.fc1")
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, True, dtype, None,
                                     prefix=f"{prefix}.fc2")
        self.act = get_activation(config.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config, dtype: torch.dtype, prefix: str):
        super().__init__()
        eps = config.layer_norm_eps
        self.layer_norm1 = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.self_attn = CLIPAttention(config, dtype, f"{prefix}.self_attn")
        self.layer_norm2 = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype, f"{prefix}.mlp")

    def forward(self, x, mask: torch.Tensor | None = None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The first ``num_layers`` encoder layers (checkpoint names ``encoder.layers.N``)."""

    def __init__(self, config, dtype: torch.dtype, num_layers: int, prefix: str):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, dtype, f"{prefix}.layers.{i}") for i in range(num_layers))


class CLIPVisionTower(nn.Module):
    """The encoder up to the deepest layer ``feature_layers`` names (transformers' indexing of
    ``hidden_states``: 0 is the embeddings after ``pre_layrnorm``, -1 the last layer).
    Checkpoint names are transformers' with ``vision_model.`` removed."""

    def __init__(self, config, dtype: torch.dtype, feature_layers: list[int], prefix: str = "vision_tower"):
        super().__init__()
        n = config.num_hidden_layers
        self.feature_layers = [i if i >= 0 else n + 1 + i for i in feature_layers]
        if not all(0 <= i <= n for i in self.feature_layers):
            raise ValueError(f"vision feature layers {feature_layers} are outside a {n}-layer encoder")
        self.embeddings = CLIPVisionEmbeddings(config, dtype)
        self.pre_layrnorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)
        self.encoder = CLIPEncoder(config, dtype, max(self.feature_layers), f"{prefix}.encoder")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> the feature layers' hidden states concatenated: [N, 1 + patches,
        hidden * len(feature_layers)]."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return torch.cat([states[i] for i in self.feature_layers], dim=-1)
