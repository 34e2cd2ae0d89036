"""The vision side Idefics2 and Idefics3 share: SigLIP's encoder made to take images of variable
resolution (NaViT, Dehghani et al. 2023: patch positions bucketed over each image's real area,
padding patches masked out of attention; transformers' ``Idefics2VisionTransformer``, which
Idefics3 copies), and the gathering of a step's image tiles into batches for it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from genserve.layers.norm import LayerNorm
from genserve.models.clip import CLIPEncoder
from genserve.multimodal.inputs import MultiModalInputs


class IdeficsVisionEmbeddings(nn.Module):
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


class IdeficsVisionTransformer(nn.Module):
    def __init__(self, config, dtype: torch.dtype, prefix: str = "vision_model"):
        super().__init__()
        self.embeddings = IdeficsVisionEmbeddings(config, dtype)
        self.encoder = CLIPEncoder(config, dtype, config.num_hidden_layers, f"{prefix}.encoder")
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values, patch_mask)
        flat = patch_mask.view(patch_mask.shape[0], -1)
        mask = None if bool(flat.all()) else flat[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


def embed_tiles(inputs: list[MultiModalInputs], patch_size: int, any_pixel: bool,
                encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                like: torch.Tensor) -> list[torch.Tensor]:
    """Per request, the rows [tokens, hidden] of all its real image tiles in prompt order.

    A request's ``pixel_values`` [1, tiles, C, H, W] are padded with all-zero tiles, which are
    skipped (as transformers does); ``pixel_attention_mask`` [1, tiles, H, W] marks real
    pixels, and a patch is real if any (``any_pixel``: Idefics3) or all (Idefics2) of its
    pixels are. Tiles of one shape, from every request, go through ``encode(pixels [N, C, H,
    W], patch mask [N, H/p, W/p]) -> [N, rows, hidden]`` together; ``like``'s device and dtype
    are the model's."""
    tiles, masks, owner = [], [], []
    for k, mm in enumerate(inputs):
        pixels = mm.data["pixel_values"].flatten(0, 1)  # [tiles, C, H, W]
        pmask = mm.data.get("pixel_attention_mask")
        pmask = (torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool) if pmask is None
                 else pmask.flatten(0, 1).bool())
        real = (pixels != 0).flatten(1).any(1)
        for t in torch.nonzero(real).flatten().tolist():
            patches = pmask[t].unfold(0, patch_size, patch_size).unfold(1, patch_size, patch_size).flatten(2)
            tiles.append(pixels[t])
            masks.append(patches.any(-1) if any_pixel else patches.all(-1))
            owner.append(k)
    rows: list[torch.Tensor] = [like.new_zeros(0)] * len(tiles)
    by_shape: dict[tuple, list[int]] = {}
    for i, t in enumerate(tiles):
        by_shape.setdefault(tuple(t.shape), []).append(i)
    for idx in by_shape.values():
        pixels = torch.stack([tiles[i] for i in idx]).to(like.device, like.dtype)
        mask = torch.stack([masks[i] for i in idx]).to(like.device)
        for i, f in zip(idx, encode(pixels, mask)):
            rows[i] = f
    out = []
    for k in range(len(inputs)):
        mine = [r for r, o in zip(rows, owner) if o == k]
        out.append(torch.cat(mine) if mine else like.new_zeros(0, like.shape[-1]))
    return out
