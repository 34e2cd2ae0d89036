"""A vision-language model's prompt preparation: its own transformers processor (e.g.
``LlavaNextProcessor``) expands each image placeholder into the model's image tokens and
turns the images into pixel tensors; its chat template places the images in chat prompts.
Nothing here re-implements what the processor does."""

from __future__ import annotations

import logging
from typing import Any

from genserve.multimodal.images import ImageError
from genserve.multimodal.inputs import MultiModalInputs

logger = logging.getLogger(__name__)


class MultiModalProcessor:
    """``processor``: the checkpoint's ``AutoProcessor``; ``image_token_id``: the model's
    placeholder id (``CausalLM.image_token_id``)."""

    def __init__(self, processor, image_token_id: int):
        self.processor = processor
        self.image_token_id = image_token_id
        self.image_token: str = processor.image_token

    @classmethod
    def load(cls, path, image_token_id: int, trust_remote_code: bool = False) -> MultiModalProcessor:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        logger.info("images: %s (image token %r, id %d)", type(processor).__name__,
                    processor.image_token, image_token_id)
        return cls(processor, image_token_id)

    @classmethod
    def for_engine(cls, loaded, args) -> MultiModalProcessor | None:
        """The processor of a built engine's model (a ``LoadedEngine``), or None for a
        text-only model."""
        token_id = loaded.engine.runner.model.image_token_id
        if token_id is None:
            return None
        return cls.load(loaded.source.path, token_id, bool(getattr(args, "trust_remote_code", False)))

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None)

    def render_chat(self, messages: list[dict[str, Any]], **kwargs) -> str:
        """The processor's chat template over OpenAI-shaped messages whose ``content`` is a list
        of ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` parts."""
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def process(self, text: str, images: list, add_special_tokens: bool) -> tuple[list[int], MultiModalInputs | None]:
        """(prompt ids, the images' inputs or None) for ``text`` with one ``image_token`` per
        image, in order. Raises ``ImageError`` when the processor refuses them (e.g. the text
        holds a different number of image tokens than there are images)."""
        try:
            out = self.processor(text=[text], images=images or None, return_tensors="pt",
                                 add_special_tokens=add_special_tokens)
        except ValueError as exc:
            raise ImageError(str(exc)) from None
        ids = out["input_ids"][0].tolist()
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if not images:
            if positions:
                raise ImageError(f"the prompt holds the image token {self.image_token!r} but no image")
            return ids, None
        data = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
        return ids, MultiModalInputs(data, positions, len(images))
