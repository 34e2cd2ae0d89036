"""``VisionLanguageLM``: what the vision-language models share over our Llama text model.

A subclass adds its vision tower and projector and implements ``embed_images``; this base
refuses tensor parallelism (the towers are not sharded yet), keeps the full config as
``vlm_config`` and the image token id, maps checkpoint names by ``renames`` (prefix -> prefix),
and merges the images' embedding rows into the token embeddings (``merge_image_rows``).
Idefics v1 uses all of it but the merge: its text rows cross-attend to the images instead
(``idefics.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from genserve.errors import ConfigError
from genserve.models.base import ForwardBatch, ModelContext
from genserve.models.llama import LlamaForCausalLM
from genserve.multimodal.inputs import ImageRows, MultiModalInputs
from genserve.multimodal.rows import merge_image_rows


class VisionLanguageLM(LlamaForCausalLM):
    """Base of the Llama-backed vision-language models (Llava-Next, Idefics2, Idefics3).

    Subclasses set ``model_name`` (for errors) and ``renames`` (checkpoint prefix -> ours), and
    implement ``embed_images``. Raises ConfigError under tensor parallelism.
    """

    model_name: ClassVar[str] = "?"
    renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config, ctx: ModelContext, image_token_id: int):
        if ctx.tp.size > 1:
            raise ConfigError(f"{self.model_name}: tensor parallelism (--num-shard > 1) is not supported "
                              "for vision-language models yet; serve it on one device")
        super().__init__(self.text_config_of(config), ctx)
        self.vlm_config = config
        self.image_token_id = image_token_id

    @classmethod
    def text_config_of(cls, config):
        """The config the Llama text model is built from (``self.config``, what the engine
        reads): ``config.text_config`` for the models that nest it."""
        return config.text_config

    def rename_weight(self, name):
        for old, new in self.renames:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def input_embeddings(self, input_ids, batch: ForwardBatch):
        images = batch.images
        assert images is None or isinstance(images, ImageRows)  # what merged_image_rows builds
        return merge_image_rows(self.embed(input_ids), images)

    def embed_images(self, inputs: list[MultiModalInputs]) -> list[torch.Tensor]:
        raise NotImplementedError
