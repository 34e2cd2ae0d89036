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

from genserve.layers.linear import ReplicatedLinear
from genserve.models.base import ModelContext
from genserve.models.idefics_vision import IdeficsVisionTransformer, embed_tiles
from genserve.models.vision_language import VisionLanguageLM
from genserve.multimodal.inputs import MultiModalInputs

RENAMES = (
    ("model.text_model.", ""),
    ("model.vision_model.", "vision_model."),
    ("model.connector.", "connector."),
)


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


class Idefics3ForConditionalGeneration(VisionLanguageLM):
    model_name = "idefics3"
    renames = RENAMES

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx, config.image_token_id)
        self.vision_model = IdeficsVisionTransformer(config.vision_config, ctx.dtype)
        self.connector = Idefics3Connector(config, ctx.dtype)

    def embed_images(self, inputs: list[MultiModalInputs]) -> list[torch.Tensor]:
        """Every real tile through the encoder and the connector (``embed_tiles``); a patch
        counts as real if any of its pixels is (transformers' Idefics3)."""
        return embed_tiles(inputs, self.vlm_config.vision_config.patch_size, any_pixel=True,
                           encode=lambda pixels, mask: self.connector(self.vision_model(pixels, mask)),
                           like=self.embed_tokens.weight)


ARCHITECTURES = {"idefics3": Idefics3ForConditionalGeneration}
