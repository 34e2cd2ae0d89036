"""Idefics2 and Idefics3 equal transformers' ``Idefics2ForConditionalGeneration`` and
``Idefics3ForConditionalGeneration`` on tiny random checkpoints: logits and greedy tokens with
split images (crops or tiles plus the global view; Idefics2's of varying sizes, padded and
masked), batched with text-only requests under small prefill chunks; the variable-resolution
vision encoder with a padding mask; prefix caching keyed on the image."""

from __future__ import annotations

import pytest
import torch
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from genserve.multimodal.processor import MultiModalProcessor
from genserve.multimodal.testing import (
    build_tiny_idefics2,
    build_tiny_idefics3,
    image_prompt_logits,
    random_image,
    reference_greedy as _reference_greedy,
)
from genserve.testing import load_genserve
from transformers import AutoProcessor, Idefics2ForConditionalGeneration, Idefics3ForConditionalGeneration

NEW = 12


ARCHS = {"idefics2": (build_tiny_idefics2, Idefics2ForConditionalGeneration),
         "idefics3": (build_tiny_idefics3, Idefics3ForConditionalGeneration)}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def ckpt(request, tmp_path_factory):
    build, cls = ARCHS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    build(folder)
    ref = cls.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, ref, AutoProcessor.from_pretrained(folder)


def prompt(processor, text, images):
    mm = MultiModalProcessor(processor, processor.image_token_id)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = mm.render_chat([{"role": "user", "content": content}])
    ids, inputs = mm.process(rendered, images, add_special_tokens=True)
    out = processor(text=[rendered], images=images or None, return_tensors="pt")
    assert out["input_ids"][0].tolist() == ids
    return ids, inputs, out


def reference_greedy(ref, out, n=NEW) -> list[int]:
    return _reference_greedy(ref, out, n)


def params(inputs, n=NEW):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, multimodal=inputs)


SIZES = [(70, 40), (40, 70), (200, 90), (20, 20)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_logits_and_greedy_match_transformers(ckpt, size):
    folder, ref, processor = ckpt
    ids, inputs, out = prompt(processor, "Describe this image.", [random_image(*size, seed=sum(size))])
    engine = load_genserve(folder)
    ours = image_prompt_logits(engine, ids, inputs)
    with torch.inference_mode():
        theirs = ref(**out).logits[0].float()
    assert (ours - theirs).abs().max().item() <= 1e-3
    got = run_to_completion(engine, [OfflineRequest(ids, params(inputs))])[0].outputs[0].token_ids
    assert got == reference_greedy(ref, out)


def test_batched_with_text_only_requests_and_prefix_cache(ckpt):
    folder, ref, processor = ckpt
    cases = [("Describe this image.", [random_image(70, 40, seed=1)]), ("What is in the picture?", []),
             ("Compare them.", [random_image(200, 90, seed=2), random_image(40, 70, seed=3)]),
             ("Describe this image.", [random_image(70, 40, seed=4)])]
    prepared = [prompt(processor, t, im) for t, im in cases]
    expected = [reference_greedy(ref, out) for *_, out in prepared]
    engine = load_genserve(folder, max_batch_prefill_tokens=9, block_size=4)
    results = run_to_completion(engine, [OfflineRequest(ids, params(inp), join_step=i * 2)
                                         for i, (ids, inp, _) in enumerate(prepared)])
    assert [r.outputs[0].token_ids for r in results] == expected
    # Request 3 has request 0's tokens but another image: it reused nothing; a repeat of
    # request 0 reuses its blocks.
    assert prepared[0][0] == prepared[3][0]
    hits = engine.blocks.hits
    ids, inputs, out = prompt(processor, "Describe this image.", [random_image(70, 40, seed=1)])
    again = run_to_completion(engine, [OfflineRequest(ids, params(inputs))])[0].outputs[0].token_ids
    assert engine.blocks.hits - hits >= len(ids) - 4 and again == expected[0]


def test_vision_encoder_with_a_padding_mask_matches_transformers(ckpt):
    """Tiles with padded patches (the processor pads images of different sizes in one batch):
    positions bucketed over the real area and padding keys masked, as transformers does."""
    folder, ref, _ = ckpt
    engine = load_genserve(folder)
    ours = engine.runner.model.vision_model
    side = ref.config.vision_config.image_size // 14
    pixels = torch.randn(3, 3, 14 * side, 14 * side)
    mask = torch.ones(3, side, side, dtype=torch.bool)
    mask[1, :, 3:] = False  # three columns of patches are real
    mask[2, 2:, :] = False  # two rows
    with torch.inference_mode():
        want = ref.model.vision_model(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
        got = ours(pixels, mask)
    assert (got - want).abs().max().item() < 1e-4
    with torch.inference_mode():  # the mask matters: without it the outputs differ
        assert (ours(pixels, torch.ones_like(mask)) - want).abs().max().item() > 1e-2
