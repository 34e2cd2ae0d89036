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
        self.image_token: str = self.image_token_of(processor)

    @staticmethod
    def image_token_of(processor) -> str:
        """The text that stands for one image in a prompt: the processor's ``image_token``."""
        return processor.image_token

    @classmethod
    def load(cls, path, image_token_id: int, trust_remote_code: bool = False) -> MultiModalProcessor:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        made = cls(processor, image_token_id)
        logger.info("images: %s (image token %r, id %d)", type(processor).__name__,
                    made.image_token, made.image_token_id)
        return made

    @staticmethod
    def for_engine(loaded, args) -> MultiModalProcessor | None:
        """The processor of a built engine's model (a ``LoadedEngine``), as the model's
        ``processor_cls`` calls it, or None for a text-only model."""
        model = loaded.engine.runner.model
        if model.image_token_id is None:
            return None
        return model.processor_cls.load(loaded.source.path, model.image_token_id,
                                        bool(getattr(args, "trust_remote_code", False)))

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None)

    def render_chat(self, messages: list[dict[str, Any]], **kwargs) -> str:
        """The processor's chat template over OpenAI-shaped messages whose ``content`` is a list
        of ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` parts."""
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def call_processor(self, text: str, images: list, add_special_tokens: bool) -> dict[str, Any]:
        """The processor's output (``input_ids`` [1, L] and its image tensors) for ``text``,
        which holds one ``image_token`` per image. Raises ValueError as the processor does."""
        return self.processor(text=[text], images=images or None, return_tensors="pt",
                              add_special_tokens=add_special_tokens)

    def process(self, text: str, images: list, add_special_tokens: bool) -> tuple[list[int], MultiModalInputs | None]:
        """(prompt ids, the images' inputs or None) for ``text`` with one ``image_token`` per
        image, in order. Raises ``ImageError`` when the processor refuses them (e.g. the text
        holds a different number of image tokens than there are images)."""
        try:
            out = self.call_processor(text, images, add_special_tokens)
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


class InterleavedProcessor(MultiModalProcessor):
    """For processors that take a prompt as a list of text pieces and images in order rather
    than a text with placeholders: transformers' ``IdeficsProcessor`` (Idefics v1), which
    writes ``<fake_token_around_image><image><fake_token_around_image>`` for each image (one
    fake token between adjacent images), always starts the prompt with ``<s>`` and returns
    ``image_attention_mask`` [1, L, images] (each token attends to the last image before it).

    The text is split at ``<image>``; empty pieces are dropped (as TGI's input chunks do).
    ``add_special_tokens=False`` (a chat template that wrote the BOS itself) drops the BOS the
    processor prepends. A text piece that is a URL and nothing else is refused: the processor
    would download it as an image, past the server's image limits."""

    IMAGE_TOKEN = "<image>"  # transformers' processing_idefics.IMAGE_TOKEN

    def __init__(self, processor, image_token_id: int):
        # The tokenizer's id for <image> is the truth (the model infers it from the config).
        token_id = processor.tokenizer.convert_tokens_to_ids(self.IMAGE_TOKEN)
        if token_id != image_token_id:
            logger.warning("images: the tokenizer's %s is id %d, the model expected %d",
                           self.IMAGE_TOKEN, token_id, image_token_id)
        super().__init__(processor, token_id)

    @staticmethod
    def image_token_of(processor) -> str:
        """IdeficsProcessor has no ``image_token`` attribute; its image token is ``<image>``."""
        return InterleavedProcessor.IMAGE_TOKEN

    def call_processor(self, text: str, images: list, add_special_tokens: bool) -> dict[str, Any]:
        from transformers.models.idefics.processing_idefics import is_url

        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the prompt holds {len(pieces) - 1} {self.image_token} tokens but "
                             f"{len(images)} images were passed")
        prompt: list = []
        for i, piece in enumerate(pieces):
            if piece:
                if is_url(piece.strip(" ")):
                    raise ValueError(f"a text piece that is only a URL ({piece.strip()[:60]!r}) would be "
                                     "fetched by the processor as an image: send images as ![](url)")
                prompt.append(piece)
            if i < len(images):
                prompt.append(images[i])
        if not prompt:
            prompt = [""]
        out = dict(self.processor(text=prompt, return_tensors="pt", add_end_of_utterance_token=False))
        if not images:  # the processor's dummy tensors for a text-only prompt
            out.pop("pixel_values", None)
            out.pop("image_attention_mask", None)
        if not add_special_tokens:
            bos = self.processor.tokenizer.bos_token_id
            if out["input_ids"][0, 0].item() == bos:
                out["input_ids"] = out["input_ids"][:, 1:]
                if "image_attention_mask" in out:
                    out["image_attention_mask"] = out["image_attention_mask"][:, 1:]
        return out
