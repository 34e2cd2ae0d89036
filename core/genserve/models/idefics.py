"""Idefics (v1; Laurençon et al. 2023, "OBELICS: An Open Web-Scale Filtered Dataset of
Interleaved Image-Text Documents"; transformers' ``IdeficsForVisionText2Text``), the open
reproduction of Flamingo (Alayrac et al. 2022): a CLIP ViT, a Perceiver resampler (Jaegle et
al. 2021) that turns each image into ``resampler_n_latents`` latents, and a Llama whose every
``cross_layer_interval``-th decoder layer is preceded by a gated cross-attention layer, in which
the text rows attend to the latents of their image and add the result scaled by tanh(alpha).

Unlike Llava-Next and Idefics2/3, the images are not rows of the prompt: each is one
``<image>`` token (between ``<fake_token_around_image>`` tokens), embedded like any token. So
``VisionLanguageLM``'s merge of image rows into the embeddings does not apply; this model keeps
the rest of that base (tensor-parallel refusal, ``vlm_config``, renames) and replaces the step's
image rows by cross-attention inputs (``step_images`` -> ``genserve.multimodal.cross``): per
request, the keys and values of every cross-attention layer over its images' latents, computed
once when the request first computes a row attending to an image, and which images each row
attends to (the processor's ``image_attention_mask``). The self-attention goes through the
paged KV cache as in Llama.

Decoupled vocabulary: the checkpoints hold the image tokens' rows apart
(``embed_tokens.additional_embedding``, ``lm_head.additional_fc``, ``additional_vocab_size``
of them after ``vocab_size``); here they are the last rows of one embedding and one LM head.

Decode steps of requests with images run eagerly (their cross-attention inputs are per request;
CUDA graphs capture only steps without images, ``graphs.DecodeGraphs.can_run``).
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from genserve.errors import ConfigError
from genserve.layers.linear import ReplicatedLinear
from genserve.layers.norm import LayerNorm, RMSNorm
from genserve.layers.weights import copy_into, narrow, set_weight_loader, shape_of
from genserve.models.base import ModelContext
from genserve.models.clip import CLIPVisionTower
from genserve.models.llama import LlamaForCausalLM, LlamaMLP
from genserve.models.vision_language import VisionLanguageLM
from genserve.multimodal.cross import cross_image_inputs
from genserve.multimodal.inputs import CrossImages, MultiModalInputs
from genserve.multimodal.processor import InterleavedProcessor

RENAMES = (
    ("model.vision_model.", "vision_tower."),
    ("model.", ""),
)


def decoupled_loader(base_rows: int):
    """A weight loader for a [base_rows + additional, hidden] table: the checkpoint's main
    tensor (shard id None) fills the first ``base_rows`` rows, its ``additional_*`` tensor
    (shard id "additional") the rest (transformers' ``IdeficsDecoupledEmbedding`` / ``Linear``)."""

    def load(param, loaded, shard_id=None):
        if shard_id is None:
            copy_into(param.data[:base_rows], narrow(loaded, 0, 0, min(base_rows, shape_of(loaded)[0])))
        else:
            copy_into(param.data[base_rows:], loaded)

    return load


class IdeficsPerceiverAttention(nn.Module):
    """Latents attend to [context; latents] (LayerNorms on both, optional per-head LayerNorms
    on q and k, no positions, no causality)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norms: bool, dtype, prefix: str):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.context_layer_norm = LayerNorm(dim, dtype=dtype)
        self.latents_layer_norm = LayerNorm(dim, dtype=dtype)
        self.q_layer_norm = LayerNorm(head_dim, dtype=dtype) if qk_norms else None
        self.k_layer_norm = LayerNorm(head_dim, dtype=dtype) if qk_norms else None
        inner = heads * head_dim
        self.q_proj = ReplicatedLinear(dim, inner, False, dtype, prefix=f"{prefix}.q_proj")
        self.k_proj = ReplicatedLinear(dim, inner, False, dtype, prefix=f"{prefix}.k_proj")
        self.v_proj = ReplicatedLinear(dim, inner, False, dtype, prefix=f"{prefix}.v_proj")
        self.output_proj = ReplicatedLinear(inner, dim, False, dtype, prefix=f"{prefix}.output_proj")

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``context`` [N, patches, dim], ``latents`` [N, latents, dim] -> [N, latents, dim]."""
        context, latents = self.context_layer_norm(context), self.latents_layer_norm(latents)
        both = torch.cat([context, latents], dim=1)
        N = latents.shape[0]

        def heads(x):
            return x.view(N, x.shape[1], self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(latents)), heads(self.k_proj(both)), heads(self.v_proj(both))
        if self.q_layer_norm is not None and self.k_layer_norm is not None:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.output_proj(out.transpose(1, 2).flatten(2))


class IdeficsPerceiverMLP(nn.Module):
    """LayerNorm -> fc -> ReLU -> c_proj (no biases)."""

    def __init__(self, dim: int, intermediate: int, dtype, prefix: str):
        super().__init__()
        self.ln = LayerNorm(dim, dtype=dtype)
        self.fc = ReplicatedLinear(dim, intermediate, False, dtype, prefix=f"{prefix}.fc")
        self.c_proj = ReplicatedLinear(intermediate, dim, False, dtype, prefix=f"{prefix}.c_proj")

    def forward(self, x):
        return self.c_proj(F.relu(self.fc(self.ln(x))))


class IdeficsPerceiverResampler(nn.Module):
    """``resampler_n_latents`` learned latents, ``resampler_depth`` blocks of (attention, MLP)
    with residuals, then a LayerNorm: [N, patches, dim] -> [N, latents, dim]. Checkpoint names
    ``blocks.{i}.0`` (attention) and ``blocks.{i}.1`` (MLP), as transformers' module lists."""

    def __init__(self, config, dtype, prefix: str = "perceiver_resampler"):
        super().__init__()
        p, dim = config.perceiver_config, config.vision_config.embed_dim
        self.latents = nn.Parameter(torch.empty(p.resampler_n_latents, dim, dtype=dtype), requires_grad=False)
        self.blocks = nn.ModuleList(
            nn.ModuleList([
                IdeficsPerceiverAttention(dim, p.resampler_n_heads, p.resampler_head_dim,
                                          p.qk_layer_norms_perceiver, dtype, f"{prefix}.blocks.{i}.0"),
                IdeficsPerceiverMLP(dim, 4 * dim, dtype, f"{prefix}.blocks.{i}.1"),
            ]) for i in range(p.resampler_depth))
        self.layer_norm = LayerNorm(dim, dtype=dtype)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(context.shape[0], -1, -1)
        for block in self.blocks:
            attn, mlp = cast(nn.ModuleList, block)
            latents = attn(context, latents) + latents
            latents = mlp(latents) + latents
        return self.layer_norm(latents)


class IdeficsCrossAttention(nn.Module):
    """Text rows (queries) attend to image latents (keys and values, projected from the vision
    width), every head alike; optional per-head RMSNorms on q and k (``qk_layer_norms``)."""

    def __init__(self, config, ctx: ModelContext, prefix: str):
        super().__init__()
        h, self.heads = config.hidden_size, config.num_attention_heads
        self.head_dim = h // self.heads
        kv_in, dtype = config.vision_config.embed_dim, ctx.dtype
        self.q_proj = ReplicatedLinear(h, h, False, dtype, ctx.quant, prefix=f"{prefix}.q_proj")
        self.k_proj = ReplicatedLinear(kv_in, h, False, dtype, ctx.quant, prefix=f"{prefix}.k_proj")
        self.v_proj = ReplicatedLinear(kv_in, h, False, dtype, ctx.quant, prefix=f"{prefix}.v_proj")
        self.o_proj = ReplicatedLinear(h, h, False, dtype, ctx.quant, prefix=f"{prefix}.o_proj")
        eps = config.rms_norm_eps
        self.q_layer_norm = RMSNorm(self.head_dim, eps, dtype) if config.qk_layer_norms else None
        self.k_layer_norm = RMSNorm(self.head_dim, eps, dtype) if config.qk_layer_norms else None

    def _per_head_norm(self, norm: RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else norm(x.reshape(-1, self.head_dim)).view(x.shape)

    def keys_values(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, vision width] -> keys and values [2, N, hidden] (k normalized per head)."""
        return torch.stack([self._per_head_norm(self.k_layer_norm, self.k_proj(latents)), self.v_proj(latents)])

    def forward(self, x: torch.Tensor, cross: CrossImages, layer: int) -> torch.Tensor:
        """``x`` [T, hidden] (normalized) -> [T, hidden]: each grouped row's attention over its
        request's image keys (``key_mask``), zero for gated-off rows and rows in no group."""
        out = torch.zeros_like(x)
        for g in cross.groups:
            G, L, H, D = g.num_seqs, g.num_rows, self.heads, self.head_dim
            q = self._per_head_norm(self.q_layer_norm, self.q_proj(x[g.rows]))
            q = q.view(G, L, H, D).transpose(1, 2)
            k, v = g.keys_values(layer)
            k, v = (t.view(G, t.shape[1], H, D).transpose(1, 2) for t in (k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.key_mask[:, None], scale=D ** -0.5)
            o = self.o_proj(o.transpose(1, 2).reshape(G * L, H * D)) * g.gate
            out.index_copy_(0, g.rows, o.to(out.dtype))
        return out


class IdeficsGatedCrossAttentionLayer(nn.Module):
    """h + tanh(alpha_cross_attn) * cross_attn(norm(h)), then h + tanh(alpha_dense) * mlp(norm(h)).
    The MLP half applies to every row, images or not (as in transformers)."""

    def __init__(self, config, index: int, ctx: ModelContext):
        super().__init__()
        prefix, h = f"model.gated_cross_attn_layers.{index}", config.hidden_size
        self.cross_attn = IdeficsCrossAttention(config, ctx, f"{prefix}.cross_attn")
        self.mlp = LlamaMLP(config, ctx, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps, ctx.dtype)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps, ctx.dtype)
        shape = {"vector": (1, 1, h), "float": (1,)}[config.alpha_type]
        self.alpha_cross_attn = nn.Parameter(torch.empty(shape, dtype=ctx.dtype), requires_grad=False)
        self.alpha_dense = nn.Parameter(torch.empty(shape, dtype=ctx.dtype), requires_grad=False)

    def forward(self, h: torch.Tensor, cross: CrossImages | None, index: int) -> torch.Tensor:
        if cross is not None:
            h = h + torch.tanh(self.alpha_cross_attn).view(-1) * self.cross_attn(self.input_layernorm(h), cross, index)
        return h + torch.tanh(self.alpha_dense).view(-1) * self.mlp(self.post_attention_layernorm(h))


class IdeficsForVisionText2Text(VisionLanguageLM):
    model_name = "idefics"
    renames = RENAMES
    processor_cls = InterleavedProcessor
    stacked_params: tuple[tuple[str, tuple[str, object]], ...] = LlamaForCausalLM.stacked_params + (
        (".additional_embedding", ("", "additional")),
        (".additional_fc", ("", "additional")),
    )

    def __init__(self, config, ctx: ModelContext):
        if config.alpha_type not in ("vector", "float"):
            raise ConfigError(f"idefics: alpha_type {config.alpha_type!r} is not 'vector' or 'float'")
        if config.num_hidden_layers % config.cross_layer_interval:
            raise ConfigError(f"idefics: {config.num_hidden_layers} layers are not a multiple of "
                              f"cross_layer_interval {config.cross_layer_interval}")
        # The IdeficsProcessor's image token is "<image>", one of the additional ids.
        super().__init__(config, ctx, self.image_token_of(config))
        self.base_vocab = config.vocab_size
        for param in (self.embed_tokens.weight, self.lm_head.weight):
            set_weight_loader(param, decoupled_loader(self.base_vocab))
        self.use_resampler = bool(config.use_resampler)
        self.vision_tower = CLIPVisionTower(config.vision_config, ctx.dtype, [-1])
        if self.use_resampler:
            self.perceiver_resampler = IdeficsPerceiverResampler(config, ctx.dtype)
        self.cross_layer_interval = config.cross_layer_interval
        self.gated_cross_attn_layers = nn.ModuleList(
            IdeficsGatedCrossAttentionLayer(config, i, ctx)
            for i in range(config.num_hidden_layers // config.cross_layer_interval))

    @staticmethod
    def image_token_of(config) -> int:
        """The ``<image>`` id. The config does not name it; the processor (``IdeficsProcessor``)
        adds ``<fake_token_around_image>`` and ``<image>`` as the ``additional_vocab_size`` ids
        after ``vocab_size``, ``<image>`` last (HuggingFaceM4/idefics-9b: 32000 and 32001)."""
        if config.additional_vocab_size < 2:
            raise ConfigError("idefics: additional_vocab_size < 2: the checkpoint has no image tokens")
        return config.vocab_size + config.additional_vocab_size - 1

    @classmethod
    def text_config_of(cls, config):
        """The Llama text model's config: Idefics' own (flat), with the additional ids counted
        in ``vocab_size`` (what the embedding, the LM head and the engine's sampler see)."""
        text = copy.copy(config)
        text.vocab_size = config.vocab_size + config.additional_vocab_size
        return text

    # -- images ---------------------------------------------------------------------------
    def embed_images(self, inputs: list[MultiModalInputs]) -> list[torch.Tensor]:
        """Every image of every request through the vision tower and the resampler in one
        batch, then, per request, each cross-attention layer's keys and values over its images'
        latents: [cross layers, 2, images * latents, hidden]."""
        like = self.embed_tokens.weight
        pixels = torch.cat([mm.data["pixel_values"][0, :mm.num_images] for mm in inputs])
        latents = self.vision_tower(pixels.to(like.device, like.dtype))  # [N, 1 + patches, dim]
        if self.use_resampler:
            latents = self.perceiver_resampler(latents)
        out, k = [], 0
        for mm in inputs:
            mine = latents[k:k + mm.num_images].flatten(0, 1)
            k += mm.num_images
            out.append(torch.stack([cast(IdeficsGatedCrossAttentionLayer, layer).cross_attn.keys_values(mine)
                                    for layer in self.gated_cross_attn_layers]))
        return out

    def step_images(self, scheduled, device):
        return cross_image_inputs(self, scheduled, device, self.embed_tokens.weight.dtype)

    # -- text -----------------------------------------------------------------------------
    def input_embeddings(self, input_ids, batch):
        """The token embeddings alone: the images enter through the cross-attention layers."""
        return self.embed(input_ids)

    def forward(self, input_ids, positions, batch):
        x, residual = self.input_embeddings(input_ids, batch), None
        rows = self.rotary_emb.cache_rows(positions, batch.attn)
        cross = batch.images
        assert cross is None or isinstance(cross, CrossImages)
        for i, layer in enumerate(self.layers):
            if i % self.cross_layer_interval == 0:
                h = x if residual is None else x + residual
                index = i // self.cross_layer_interval
                x, residual = self.gated_cross_attn_layers[index](h, cross, index), None
            x, residual = layer(rows, x, residual, batch)
        x, _ = self.norm(x, residual)
        return x


ARCHITECTURES = {"idefics": IdeficsForVisionText2Text}
