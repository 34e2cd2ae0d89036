"""Images in the offline API (``genserve.LLM``, vLLM's ``multi_modal_data`` prompt form) for
every vision-language model: greedy tokens equal transformers' ``generate`` with the same
images, mixed with text-only prompts; image inputs refused where they cannot work."""

from __future__ import annotations

import pytest
import torch
from genserve.engine.sampling_params import SamplingParams
from genserve.entrypoints.llm import LLM
from genserve.multimodal import testing
from genserve.multimodal.testing import random_image
from transformers import AutoProcessor

NEW = 8
CPU = {"backend": "cpu", "dtype": "float32", "block_size": 4, "max_batch_total_tokens": 4096,
       "max_batch_prefill_tokens": 64, "max_images": 2, "max_image_pixels": 5000}
A, B = random_image(50, 40, seed=1), random_image(40, 60, seed=2)


def interleaved(text: str, images: list) -> list:
    """Idefics v1's processor input: the text pieces and images in order."""
    out: list = []
    for i, piece in enumerate(text.split("<image>")):
        out += ([piece] if piece else []) + ([images[i]] if i < len(images) else [])
    return out


# model -> (builder, transformers class, how its processor takes a prompt with images)
MODELS = {
    "llava_next": (testing.build_tiny_llava_next, "LlavaNextForConditionalGeneration",
                   lambda p, text, images: p(text=[text], images=images or None, return_tensors="pt")),
    "idefics2": (testing.build_tiny_idefics2, "Idefics2ForConditionalGeneration",
                 lambda p, text, images: p(text=[text], images=[images] if images else None, return_tensors="pt")),
    "idefics3": (testing.build_tiny_idefics3, "Idefics3ForConditionalGeneration",
                 lambda p, text, images: p(text=[text], images=[images] if images else None, return_tensors="pt")),
    "idefics": (testing.build_tiny_idefics, "IdeficsForVisionText2Text",
                lambda p, text, images: p(text=interleaved(text, images), return_tensors="pt")),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def vlm(request, tmp_path_factory):
    build, cls_name, call = MODELS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    build(folder)
    import transformers

    ref = getattr(transformers, cls_name).from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return LLM(str(folder), **CPU), ref, lambda text, images: call(processor, text, images)


def greedy(ref, out) -> list[int]:
    with torch.inference_mode():
        g = ref.generate(**out, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return g[0, out["input_ids"].shape[1]:].tolist()


def test_images_in_prompts_match_transformers(vlm):
    llm, ref, process = vlm
    tok = llm.image_token
    prompts = [(f"{tok}Describe this image.", [A]), ("What is in the picture?", []),
               (f"Look: {tok} and {tok}?", [A, B])]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt": t, "multi_modal_data": {"image": im if len(im) != 1 else im[0]}}
                            if im else t for t, im in prompts], params)
    for (text, images), out in zip(prompts, outputs):
        want = process(text, images)
        assert out.prompt == text and out.prompt_token_ids == want["input_ids"][0].tolist()
        assert out.outputs[0].token_ids == greedy(ref, want), text


def test_image_refusals(vlm):
    llm, _, _ = vlm
    tok = llm.image_token
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="too many images: 3"):
        llm.generate({"prompt": tok * 3, "multi_modal_data": {"image": [A, A, A]}}, params)
    with pytest.raises(ValueError, match="too many pixels: 100x100"):
        llm.generate({"prompt": tok, "multi_modal_data": {"image": random_image(100, 100)}}, params)
    with pytest.raises(ValueError):  # the processor's count check
        llm.generate({"prompt": f"{tok} and {tok}", "multi_modal_data": {"image": A}}, params)
    with pytest.raises(TypeError, match="PIL image"):
        llm.generate({"prompt": tok, "multi_modal_data": {"image": "cat.png"}}, params)
    with pytest.raises(ValueError, match="one key, 'image'"):
        llm.generate({"prompt": tok, "multi_modal_data": {"video": A}}, params)
    with pytest.raises(ValueError, match="token ids hold the image token"):
        llm.generate([[5, llm.multimodal.image_token_id, 6]], params)
    with pytest.raises(ValueError, match="with a text 'prompt'"):
        llm.generate({"prompt_token_ids": [5, 6], "multi_modal_data": {"image": A}}, params)


def test_images_to_a_text_only_model(tmp_path):
    from tests.server.tinymodel import build_tiny_llama

    llm = LLM(build_tiny_llama(tmp_path / "tiny"), **CPU)
    assert llm.image_token is None
    with pytest.raises(ValueError, match="text-only"):
        llm.generate({"prompt": "<image>Hi", "multi_modal_data": {"image": A}}, SamplingParams(max_new_tokens=2))
