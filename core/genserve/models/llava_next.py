"""Llava-Next (LLaVA-1.6; Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world
knowledge"; transformers' ``LlavaNextForConditionalGeneration``): a CLIP vision tower, a
two-layer projector and the image-newline embedding over a Llama/Mistral/Vicuna text model.

"Anyres": the processor resizes an image to the best of ``image_grid_pinpoints`` and cuts it
into tiles of the vision tower's size, plus one base tile of the whole image. Each tile is
encoded; the tiles' features are laid out as one grid, the padding the resize added is cut
off (``unpad_image``), and an ``image_newline`` embedding ends every row of the grid. The
base tile's features come first. The processor already expanded each ``<image>`` into as many
placeholder tokens as this produces, so a prompt's length is known before the model runs.

The text model is our ``LlamaForCausalLM`` built from ``text_config`` (``self.config`` is that
text config, what the engine reads; the whole config is ``self.vlm_config``).
"""

from __future__ import annotations

import torch
from torch import nn

from genserve.errors import ConfigError
from genserve.layers.activation import get_activation
from genserve.layers.linear import ColumnParallelLinear, RowParallelLinear
from genserve.models.base import ModelContext
from genserve.models.clip import CLIPVisionTower
from genserve.models.vision_language import VisionLanguageLM
from genserve.multimodal.inputs import MultiModalInputs

# Checkpoint names: llava-hf's (``language_model.model.*``) and transformers 5's
# (``model.language_model.*``) -> this module's.
RENAMES = (
    ("model.language_model.", ""),
    ("language_model.model.", ""),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)


class LlavaNextProjector(nn.Module):
    """linear_1 -> activation -> linear_2, from the vision features to the text model's width."""

    def __init__(self, in_features: int, hidden: int, act: str, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = ColumnParallelLinear(in_features, hidden, bias, dtype, None,
                                             prefix="multi_modal_projector.linear_1")
        self.act = get_activation(act)
        self.linear_2 = RowParallelLinear(hidden, hidden, bias, dtype, None, prefix="multi_modal_projector.linear_2")

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaNextForConditionalGeneration(VisionLanguageLM):
    model_name = "llava_next"
    renames = RENAMES

    def __init__(self, config, ctx: ModelContext):
        if config.vision_config.model_type != "clip_vision_model":
            raise ConfigError(f"llava_next: vision tower {config.vision_config.model_type!r} is not "
                              "supported (CLIP only)")
        super().__init__(config, ctx, config.image_token_index)
        layers = config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.select_strategy = config.vision_feature_select_strategy
        if self.select_strategy not in ("default", "full"):
            raise ConfigError(f"llava_next: vision_feature_select_strategy {self.select_strategy!r} "
                              "is not 'default' or 'full'")
        vision = config.vision_config
        self.vision_tower = CLIPVisionTower(vision, ctx.dtype, self.feature_layers)
        hidden = config.text_config.hidden_size
        self.multi_modal_projector = LlavaNextProjector(
            vision.hidden_size * len(self.feature_layers), hidden, config.projector_hidden_act,
            getattr(config, "multimodal_projector_bias", True), ctx.dtype)
        self.image_newline = nn.Parameter(torch.empty(hidden, dtype=ctx.dtype), requires_grad=False)

    # -- images ---------------------------------------------------------------------------
    def embed_images(self, inputs: list[MultiModalInputs]) -> list[torch.Tensor]:
        """Every image of every request through the vision tower in one batch of tiles, then
        projected and packed per image (anyres grid, unpadding, newlines); per request, its
        images' rows concatenated in prompt order."""
        # transformers' anyres geometry, imported at first use: its modules import triton,
        # which plugin loading must not (tests/test_backend_plugins.py).
        from transformers.models.llava_next.modeling_llava_next import (
            image_size_to_num_patches,
        )

        cfg, vision = self.vlm_config, self.vlm_config.vision_config
        device, dtype = self.image_newline.device, self.image_newline.dtype
        tiles, counts, sizes = [], [], []
        for mm in inputs:
            # [images, tiles (padded to the request's most), C, H, W]: the processor's do_pad
            pixels, image_sizes = mm.data["pixel_values"], mm.data["image_sizes"]
            for i in range(mm.num_images):
                size = image_sizes[i].tolist()
                n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, vision.image_size)
                tiles.append(pixels[i, :n])
                counts.append(n)
                sizes.append(size)
        features = self.vision_tower(torch.cat(tiles).to(device, dtype))
        if self.select_strategy == "default":
            features = features[:, 1:]  # drop the class token
        features = self.multi_modal_projector(features)
        per_image = [self.pack(f, size) for f, size in zip(features.split(counts), sizes)]
        out, k = [], 0
        for mm in inputs:
            out.append(torch.cat(per_image[k:k + mm.num_images]))
            k += mm.num_images
        return out

    def pack(self, features: torch.Tensor, image_size: list[int]) -> torch.Tensor:
        """One image's tile features [tiles, tile tokens, hidden] -> [tokens, hidden]: the base
        tile's, then the grid's (unpadded to the image's aspect ratio) with a newline per row
        (transformers' ``LlavaNextModel.pack_image_features``, "spatial_unpad")."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        newline = self.image_newline
        if features.shape[0] == 1:
            return torch.cat([features[0], newline[None]])
        vision = self.vlm_config.vision_config
        side = vision.image_size // vision.patch_size
        base, grid = features[0], features[1:]
        rows, cols = get_anyres_image_grid_shape(image_size, self.vlm_config.image_grid_pinpoints,
                                                 vision.image_size)
        grid = grid.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = unpad_image(grid, image_size)  # [hidden, H, W]
        grid = torch.cat([grid, newline[:, None, None].expand(*grid.shape[:-1], 1)], dim=-1)
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)])


ARCHITECTURES = {"llava_next": LlavaNextForConditionalGeneration}
