"""Idefics3 (Laurençon et al. 2024, "Building and better understanding vision-language models";
transformers' ``Idefics3ForConditionalGeneration``; SmolVLM uses it too): a SigLIP vision
encoder for images of variable resolution (NaViT-style position buckets and a padding mask,
Dehghani et al. 2023), a connector (pixel shuffle, then one linear projection) and a Llama
text model.

The processor (``Idefics3Processor``) splits each image into tiles of the encoder's size plus
a downscaled global view, and writes every tile into the prompt as ``<fake_token_around_image>``,
a row/column or ``<global-img>`` tag, and ``image_seq_len`` ``<image>`` tokens. Each tile's
encoder output, pixel-shuffled by ``scale_factor``, is exactly those ``image_seq_len`` rows.
"""

from __future__ import annotations

import torch
from torch import nn

from genserve.errors import ConfigError
from genserve.layers.linear import ReplicatedLinear
from genserve.layers.norm import LayerNorm
from genserve.models.base import ForwardBatch, ModelContext
from genserve.models.clip import CLIPEncoder
from genserve.models.llama import LlamaForCausalLM
from genserve.multimodal.inputs import MultiModalInputs

RENAMES = (
    ("model.text_model.", ""),
    ("model.vision_model.", "vision_model."),
    ("model.connector.", "connector."),
)


class Idefics3VisionEmbeddings(nn.Module):
    """Patch embedding plus learned positions, bucketed to the tile's real (unpadded) size."""

    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.patch_size = config.patch_size
        self.per_side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         config.patch_size, dtype=dtype)
        self.patch_embedding.requires_grad_(False)
        self.position_embedding = nn.Embedding(self.per_side ** 2, config.hidden_size, dtype=dtype)
        self.position_embedding.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` [N, C, H, W], ``patch_mask`` bool [N, H/p, W/p] (False: padding)
        -> [N, patches, hidden]. Positions as transformers computes them: each real patch's
        fractional coordinate within the real area, bucketed into the ``per_side`` grid."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        N, h, w = patch_mask.shape
        device = pixel_values.device
        boundaries = torch.arange(1 / self.per_side, 1.0, 1 / self.per_side, device=device)
        rows = patch_mask[:, :, 0].sum(1)
        cols = patch_mask[:, 0, :].sum(1)
        fh = (torch.arange(h, device=device, dtype=torch.float32)[None] * (1.0 / rows)[:, None]).clamp(max=1 - 1e-6)
        fw = (torch.arange(w, device=device, dtype=torch.float32)[None] * (1.0 / cols)[:, None]).clamp(max=1 - 1e-6)
        bh = torch.bucketize(fh, boundaries, right=True)
        bw = torch.bucketize(fw, boundaries, right=True)
        pos = (bh[:, :, None] * self.per_side + bw[:, None, :]).reshape(N, -1)
        pos = torch.where(patch_mask.view(N, -1), pos, torch.zeros_like(pos))
        return x + self.position_embedding(pos)


class Idefics3VisionTransformer(nn.Module):
    def __init__(self, config, dtype: torch.dtype, prefix: str = "vision_model"):
        super().__init__()
        self.embeddings = Idefics3VisionEmbeddings(config, dtype)
        self.encoder = CLIPEncoder(config, dtype, config.num_hidden_layers, f"{prefix}.encoder")
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values, patch_mask)
        flat = patch_mask.view(patch_mask.shape[0], -1)
        mask = None if bool(flat.all()) else flat[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[N, side*side, d] -> [N, side*side / scale^2, d * scale^2]: each scale x scale square
    of patches becomes one row (transformers' ``Idefics3Connector.pixel_shuffle``)."""
    N, seq, d = x.shape
    side = int(seq ** 0.5)
    x = x.view(N, side, side // scale, d * scale).permute(0, 2, 1, 3)
    x = x.reshape(N, side // scale, side // scale, d * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(N, seq // (scale * scale), d * scale * scale)


class Idefics3Connector(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.scale = config.scale_factor
        self.modality_projection = nn.Module()
        self.modality_projection.proj = ReplicatedLinear(
            config.vision_config.hidden_size * self.scale ** 2, config.text_config.hidden_size, False, dtype,
            prefix="connector.modality_projection.proj")

    def forward(self, x):
        return self.modality_projection.proj(pixel_shuffle(x, self.scale))


class Idefics3ForConditionalGeneration(LlamaForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        if ctx.tp.size > 1:
            raise ConfigError("idefics3: tensor parallelism (--num-shard > 1) is not supported for "
                              "vision-language models yet; serve it on one device")
        super().__init__(config.text_config, ctx)
        self.vlm_config = config
        self.image_token_id = config.image_token_id
        self.vision_model = Idefics3VisionTransformer(config.vision_config, ctx.dtype)
        self.connector = Idefics3Connector(config, ctx.dtype)

    def rename_weight(self, name):
        for old, new in RENAMES:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def input_embeddings(self, input_ids, batch: ForwardBatch):
        x = self.embed(input_ids)
        if batch.images is not None:
            x = x.index_copy(0, batch.images.rows, batch.images.embeds.to(x.dtype))
        return x

    def embed_images(self, inputs: list[MultiModalInputs]) -> list[torch.Tensor]:
        """Every real tile of every request (the processor pads a request's tile list with
        all-zero tiles) through the encoder, tiles of one shape in one batch; per request,
        its tiles' rows in prompt order."""
        device, dtype = self.embed_tokens.weight.device, self.embed_tokens.weight.dtype
        p = self.vlm_config.vision_config.patch_size
        tiles, masks, owner = [], [], []
        for k, mm in enumerate(inputs):
            pixels = mm.data["pixel_values"].flatten(0, 1)  # [tiles, C, H, W]
            pmask = mm.data.get("pixel_attention_mask")
            pmask = (torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool) if pmask is None
                     else pmask.flatten(0, 1).bool())
            real = (pixels != 0).flatten(1).any(1)
            for t in torch.nonzero(real).flatten().tolist():
                tiles.append(pixels[t])
                # A patch is real if any of its pixels is (transformers' unfold and sum).
                masks.append(pmask[t].unfold(0, p, p).unfold(1, p, p).flatten(2).any(-1))
                owner.append(k)
        rows: list[torch.Tensor | None] = [None] * len(tiles)
        by_shape: dict[tuple, list[int]] = {}
        for i, t in enumerate(tiles):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        for idx in by_shape.values():
            pixels = torch.stack([tiles[i] for i in idx]).to(device, dtype)
            mask = torch.stack([masks[i] for i in idx]).to(device)
            for i, f in zip(idx, self.connector(self.vision_model(pixels, mask))):
                rows[i] = f
        out = []
        for k in range(len(inputs)):
            mine = [r for r, o in zip(rows, owner) if o == k and r is not None]
            out.append(torch.cat(mine) if mine else self.embed_tokens.weight.new_zeros(0, self.config.hidden_size))
        return out


ARCHITECTURES = {"idefics3": Idefics3ForConditionalGeneration}
