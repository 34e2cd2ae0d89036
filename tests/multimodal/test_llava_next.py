"""Llava-Next equals transformers' LlavaNextForConditionalGeneration on a tiny random checkpoint:
prompt logits with images, greedy tokens alone and continuously batched with text-only
requests (prefill chunks cutting through images), the vision encoder run once per request
and batched over a step's requests, and prefix caching keyed on the image content."""

from __future__ import annotations

import pytest
import torch
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from genserve.multimodal.inputs import MultiModalInputs
from genserve.multimodal.processor import MultiModalProcessor
from genserve.multimodal.testing import (
    build_tiny_llava_next,
    random_image,
    image_prompt_logits as logits,
    reference_greedy as _reference_greedy,
)
from genserve.testing import load_genserve
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

ATOL = 1e-3
NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava_next")
    build_tiny_llava_next(folder)
    ref = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return folder, ref, processor


def prompt(processor, text: str, images: list):
    """(ids, MultiModalInputs or None, the processor's tensors) for a user turn."""
    mm = MultiModalProcessor(processor, processor.image_token_id)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = mm.render_chat([{"role": "user", "content": content}])
    ids, inputs = mm.process(rendered, images, add_special_tokens=True)
    out = processor(text=[rendered], images=images or None, return_tensors="pt")
    assert out["input_ids"][0].tolist() == ids
    return ids, inputs, out


def reference_greedy(ref, out, n=NEW) -> list[int]:
    return _reference_greedy(ref, out, n)


def params(inputs, n=NEW) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, multimodal=inputs)


# Sizes that pick each anyres grid (1x2, 2x1, 2x2), unpad rows or columns, and a single-tile image.
SIZES = [(70, 40), (40, 70), (56, 56), (90, 30), (28, 28)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_logits_and_greedy_match_transformers(ckpt, size):
    folder, ref, processor = ckpt
    ids, inputs, out = prompt(processor, "Describe this image.", [random_image(*size, seed=sum(size))])
    assert inputs is not None and len(inputs.positions) > 4
    engine = load_genserve(folder)
    ours = logits(engine, ids, inputs)
    with torch.inference_mode():
        theirs = ref(**out).logits[0].float()
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"logits differ by {diff:.2e}"
    got = run_to_completion(engine, [OfflineRequest(ids, params(inputs))])[0].outputs[0].token_ids
    assert got == reference_greedy(ref, out)


def test_two_images_in_one_prompt(ckpt):
    folder, ref, processor = ckpt
    images = [random_image(70, 40, seed=1), random_image(30, 90, seed=2)]
    ids, inputs, out = prompt(processor, "Compare the two pictures.", images)
    assert inputs.num_images == 2
    engine = load_genserve(folder)
    got = run_to_completion(engine, [OfflineRequest(ids, params(inputs))])[0].outputs[0].token_ids
    assert got == reference_greedy(ref, out)


def test_batched_mix_with_text_only_and_chunks_through_images(ckpt, monkeypatch):
    """Image and text-only requests joining a running batch; prefill chunks of 7 tokens cut
    every image's placeholder run; each request's images are encoded exactly once, and
    requests that need their images in the same step are encoded in one call."""
    folder, ref, processor = ckpt
    cases = [
        ("Describe this image.", [random_image(70, 40, seed=3)]),
        ("What is in the picture?", []),
        ("A cat, a dog?", [random_image(56, 56, seed=4), random_image(40, 70, seed=5)]),
        ("The quick brown fox jumps over the lazy dog.", []),
        ("Describe this image.", [random_image(90, 30, seed=6)]),
    ]
    prepared = [prompt(processor, text, images) for text, images in cases]
    expected = [reference_greedy(ref, out) for _, _, out in prepared]
    engine = load_genserve(folder, max_batch_prefill_tokens=7, block_size=4)
    calls: list[int] = []
    original = engine.runner.model.embed_images

    def counting(inputs):
        calls.append(len(inputs))
        return original(inputs)

    monkeypatch.setattr(engine.runner.model, "embed_images", counting)
    requests = [OfflineRequest(ids, params(inputs), join_step=(i // 2) * 3)
                for i, (ids, inputs, _) in enumerate(prepared)]
    results = run_to_completion(engine, requests)
    for i, (r, want) in enumerate(zip(results, expected)):
        assert r.outputs[0].token_ids == want, f"request {i} differs in the batch"
    assert sum(calls) == 3, calls  # three requests with images, each encoded once
    for ids, inputs, _ in prepared:
        if inputs is not None:
            assert inputs.embeds is not None and inputs.embeds.shape[0] == len(inputs.positions)


def test_one_vision_call_for_a_step_of_image_requests(ckpt, monkeypatch):
    folder, ref, processor = ckpt
    prepared = [prompt(processor, "Describe this image.", [random_image(70, 40, seed=s)]) for s in (7, 8, 9)]
    engine = load_genserve(folder, max_batch_prefill_tokens=512)
    calls: list[int] = []
    original = engine.runner.model.embed_images
    monkeypatch.setattr(engine.runner.model, "embed_images",
                        lambda inputs: calls.append(len(inputs)) or original(inputs))
    results = run_to_completion(engine, [OfflineRequest(ids, params(inputs)) for ids, inputs, _ in prepared])
    assert calls == [3]
    for r, (_, _, out) in zip(results, prepared):
        assert r.outputs[0].token_ids == reference_greedy(ref, out)


def test_prefix_cache_hits_the_same_image_and_never_another(ckpt):
    """A repeated image prompt reuses its cached blocks; the same tokens with another image
    (every image is the same run of placeholder tokens) reuse none and still match
    transformers for that image."""
    folder, ref, processor = ckpt
    text = "Describe this image."
    ids_a, inputs_a, out_a = prompt(processor, text, [random_image(70, 40, seed=10)])
    ids_b, inputs_b, out_b = prompt(processor, text, [random_image(70, 40, seed=11)])
    assert ids_a == ids_b and inputs_a.content_hash != inputs_b.content_hash
    engine = load_genserve(folder, block_size=4)

    def run(ids, inputs):
        hits = engine.blocks.hits
        tokens = run_to_completion(engine, [OfflineRequest(ids, params(inputs))])[0].outputs[0].token_ids
        return tokens, engine.blocks.hits - hits

    first, hits = run(ids_a, inputs_a)
    assert hits == 0 and first == reference_greedy(ref, out_a)
    # A new MultiModalInputs for the same image (a new request): same hash, a cache hit.
    again = MultiModalInputs({k: v.clone() for k, v in inputs_a.data.items()}, inputs_a.positions, 1)
    second, hits = run(ids_a, again)
    assert hits >= len(ids_a) - 4 and second == first
    other, hits = run(ids_b, inputs_b)
    assert hits == 0, "a different image must never reuse the first image's KV"
    assert other == reference_greedy(ref, out_b)
    text_only_ids = processor(text=["Describe this image."], return_tensors="pt")["input_ids"][0].tolist()
    assert run(text_only_ids, None)[1] == 0  # the text-only request shares nothing with either


def test_a_request_without_enough_embeddings_fails_alone(ckpt, monkeypatch):
    """A vision encoder that returns the wrong number of rows fails that request (RuntimeError
    through the engine's isolation), not the text-only request batched with it."""
    folder, ref, processor = ckpt
    ids, inputs, _ = prompt(processor, "Describe this image.", [random_image(70, 40, seed=12)])
    text_ids, _, text_out = prompt(processor, "What is in the picture?", [])
    engine = load_genserve(folder)
    original = engine.runner.model.embed_images
    monkeypatch.setattr(engine.runner.model, "embed_images", lambda xs: [e[1:] for e in original(xs)])
    bad, good = run_to_completion(engine, [OfflineRequest(ids, params(inputs)), OfflineRequest(text_ids, params(None))])
    assert bad.outputs[0].finish_reason.value == "error" and "image embeddings" in bad.outputs[0].error
    assert good.outputs[0].token_ids == reference_greedy(ref, text_out)


def test_preemption_keeps_the_image_embeddings(ckpt, monkeypatch):
    """A KV cache too small for every request at once preempts some; recomputing them reuses
    their image embeddings (no second vision call) and still gives transformers' tokens."""
    folder, ref, processor = ckpt
    prepared = [prompt(processor, "Describe this image.", [random_image(70, 40, seed=s)]) for s in (13, 14, 15)]
    expected = [reference_greedy(ref, out, 24) for _, _, out in prepared]
    engine = load_genserve(folder, block_size=4, max_batch_total_tokens=128, max_total_tokens=96)
    calls: list[int] = []
    original = engine.runner.model.embed_images
    monkeypatch.setattr(engine.runner.model, "embed_images",
                        lambda inputs: calls.append(len(inputs)) or original(inputs))
    results = run_to_completion(engine, [OfflineRequest(ids, params(inputs, 24)) for ids, inputs, _ in prepared])
    assert engine.scheduler.num_preemptions > 0
    assert sum(calls) == 3, calls
    assert [r.outputs[0].token_ids for r in results] == expected
