"""A vision-language model's prompt: images read from the request (TGI's markdown in `inputs`,
or a chat's image URLs), then the model's processor (``genserve.multimodal``). Every refusal
is a 422 in TGI's format."""

from __future__ import annotations

from genserve.multimodal.images import ImageError, load_images, split_markdown
from genserve.server.errors import validation


async def image_prompt(state, text: str, urls: list[str] | None, add_special_tokens: bool):
    """(prompt ids, ``MultiModalInputs`` or None) for ``text`` on a vision-language model.

    ``urls`` None: ``text`` is TGI's, each ``![](url)`` an image (replaced by the processor's
    image token); otherwise ``text`` already holds one image token per URL (a rendered chat).
    Fetching, decoding and the processor run off the event loop."""
    mm = state.multimodal
    if urls is None:
        texts, urls = split_markdown(text)
        text = mm.image_token.join(texts)
    try:
        images = await load_images(urls, state.image_limits, state.in_worker)
        return await state.in_worker(mm.process, text, images, add_special_tokens)
    except ImageError as exc:
        raise validation(str(exc)) from None
