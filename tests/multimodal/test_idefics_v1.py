"""Idefics v1 equals transformers' ``IdeficsForVisionText2Text`` on a tiny random checkpoint:
prompt logits and greedy tokens (text before the first image, adjacent images, an end of
sequence between images, text-only), continuously batched with text-only requests under small
prefill chunks, the images encoded once per request (also after a prefix-cache hit that skips
the image token, and after preemption), prefix caching keyed on the image; and the
``IdeficsProcessor`` adapter (interleaved prompt, BOS, refusals)."""

from __future__ import annotations

import pytest
import torch
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from genserve.multimodal.images import ImageError
from genserve.multimodal.inputs import MultiModalInputs
from genserve.multimodal.processor import InterleavedProcessor
from genserve.multimodal.testing import (
    build_tiny_idefics,
    random_image,
    image_prompt_logits as logits,
    reference_greedy as _reference_greedy,
)
from genserve.testing import load_genserve
from transformers import AutoProcessor, IdeficsForVisionText2Text

NEW = 12
ATOL = 1e-3
LATENTS = 4  # build_tiny_idefics' resampler_n_latents


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idefics")
    build_tiny_idefics(folder)
    ref = IdeficsForVisionText2Text.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return folder, ref, processor


def prompt(processor, text: str, images: list):
    """(ids, MultiModalInputs or None, the processor's tensors): ``text`` with one ``<image>``
    per image through our adapter, checked against the processor's own interleaved call."""
    mm = InterleavedProcessor(processor, processor.image_token_id)
    ids, inputs = mm.process(text, images, add_special_tokens=True)
    pieces, interleaved = text.split("<image>"), []
    for i, piece in enumerate(pieces):
        interleaved += [piece] if piece else []
        interleaved += [images[i]] if i < len(images) else []
    out = processor(text=interleaved, return_tensors="pt")
    assert out["input_ids"][0].tolist() == ids
    return ids, inputs, out


def reference_greedy(ref, out, n=NEW) -> list[int]:
    return _reference_greedy(ref, out, n)


def params(inputs, n=NEW) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, multimodal=inputs)


def counting(monkeypatch, engine) -> list[int]:
    """Record the number of requests of each ``embed_images`` call."""
    calls: list[int] = []
    original = engine.runner.model.embed_images
    monkeypatch.setattr(engine.runner.model, "embed_images",
                        lambda inputs: calls.append(len(inputs)) or original(inputs))
    return calls


CASES = {
    "text-then-image": ("User:<image>Describe this image.", [(40, 30)]),
    "adjacent-images": ("<image><image>Compare them.", [(40, 30), (30, 40)]),
    "eos-between-images": ("Look:<image>A cat?</s>Then<image>And this one?", [(40, 30), (50, 50)]),
    "text-only": ("What is in the picture?", []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_transformers(ckpt, case):
    folder, ref, processor = ckpt
    text, sizes = CASES[case]
    images = [random_image(w, h, seed=i + len(case)) for i, (w, h) in enumerate(sizes)]
    ids, inputs, out = prompt(processor, text, images)
    engine = load_genserve(folder)
    ours = logits(engine, ids, inputs)
    with torch.inference_mode():
        theirs = ref(**out).logits[0].float()
    assert ours.shape == theirs.shape  # the decoupled ids are logits too
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"logits differ by {diff:.2e}"
    got = run_to_completion(engine, [OfflineRequest(ids, params(inputs))])[0].outputs[0].token_ids
    assert got == reference_greedy(ref, out)


def test_the_image_matters_and_only_after_it(ckpt):
    """Two images give different logits from the image token on, the same before it (rows
    before the first image attend to none: their cross-attention is zeroed)."""
    folder, _, processor = ckpt
    text = "User: the quick brown fox<image>Describe this image."
    ids, a, _ = prompt(processor, text, [random_image(40, 30, seed=1)])
    _, b, _ = prompt(processor, text, [random_image(40, 30, seed=2)])
    engine = load_genserve(folder)
    la, lb = logits(engine, ids, a), logits(engine, ids, b)
    first = ids.index(processor.image_token_id)
    assert (la[:first] - lb[:first]).abs().max().item() < 1e-5
    assert (la[first:] - lb[first:]).abs().max().item() > 0.1


def test_batched_mix_with_text_only_and_small_chunks(ckpt, monkeypatch):
    """Image and text-only requests joining a running batch, prefill chunks of 5 tokens cutting
    each prompt; every request's images encoded exactly once, kept as per-layer keys/values."""
    folder, ref, processor = ckpt
    cases = [("User:<image>Describe this image.", [random_image(40, 30, seed=3)]),
             ("What is in the picture?", []),
             ("A cat<image>, a dog<image>?", [random_image(50, 50, seed=4), random_image(30, 60, seed=5)]),
             ("The quick brown fox jumps over the lazy dog.", []),
             ("<image>Describe this image.", [random_image(60, 20, seed=6)])]
    prepared = [prompt(processor, t, im) for t, im in cases]
    expected = [reference_greedy(ref, out) for *_, out in prepared]
    engine = load_genserve(folder, max_batch_prefill_tokens=5, block_size=4)
    calls = counting(monkeypatch, engine)
    results = run_to_completion(engine, [OfflineRequest(ids, params(inputs), join_step=(i // 2) * 3)
                                         for i, (ids, inputs, _) in enumerate(prepared)])
    for i, (r, want) in enumerate(zip(results, expected)):
        assert r.outputs[0].token_ids == want, f"request {i} differs in the batch"
    assert sum(calls) == 3, calls
    model = engine.runner.model
    for ids, inputs, _ in prepared:
        if inputs is not None:
            assert inputs.embeds is not None
            assert tuple(inputs.embeds.shape) == (len(model.gated_cross_attn_layers), 2,
                                                  inputs.num_images * LATENTS, model.config.hidden_size)


def test_one_vision_call_for_a_step_of_image_requests(ckpt, monkeypatch):
    folder, ref, processor = ckpt
    prepared = [prompt(processor, "User:<image>Describe it.", [random_image(40, 30, seed=s)]) for s in (7, 8, 9)]
    engine = load_genserve(folder, max_batch_prefill_tokens=512)
    calls = counting(monkeypatch, engine)
    results = run_to_completion(engine, [OfflineRequest(ids, params(inputs)) for ids, inputs, _ in prepared])
    assert calls == [3]
    assert [r.outputs[0].token_ids for r in results] == [reference_greedy(ref, out) for *_, out in prepared]


def test_prefix_cache_hits_the_same_image_and_never_another(ckpt, monkeypatch):
    """A repeated image prompt reuses its cached blocks, past its image token: the rows it still
    computes attend to the image, so it is encoded although no computed row is the image token.
    The same tokens with another image reuse nothing and match transformers for that image."""
    folder, ref, processor = ckpt
    text = "<image>Describe this image. The quick brown fox."
    ids_a, inputs_a, out_a = prompt(processor, text, [random_image(40, 30, seed=10)])
    ids_b, inputs_b, out_b = prompt(processor, text, [random_image(40, 30, seed=11)])
    assert ids_a == ids_b and inputs_a.content_hash != inputs_b.content_hash
    engine = load_genserve(folder, block_size=4)
    calls = counting(monkeypatch, engine)

    def run(ids, inputs):
        hits = engine.blocks.hits
        tokens = run_to_completion(engine, [OfflineRequest(ids, params(inputs))])[0].outputs[0].token_ids
        return tokens, engine.blocks.hits - hits

    first, hits = run(ids_a, inputs_a)
    assert hits == 0 and first == reference_greedy(ref, out_a)
    again = MultiModalInputs({k: v.clone() for k, v in inputs_a.data.items()}, inputs_a.positions, 1)
    second, hits = run(ids_a, again)
    assert hits >= len(ids_a) - 4 > ids_a.index(processor.image_token_id) + 1
    assert second == first and calls == [1, 1]
    other, hits = run(ids_b, inputs_b)
    assert hits == 0, "a different image must never reuse the first image's KV"
    assert other == reference_greedy(ref, out_b)


def test_preemption_keeps_the_image_keys(ckpt, monkeypatch):
    folder, ref, processor = ckpt
    prepared = [prompt(processor, "User:<image>Describe this image.", [random_image(40, 30, seed=s)])
                for s in (13, 14, 15)]
    expected = [reference_greedy(ref, out, 24) for *_, out in prepared]
    engine = load_genserve(folder, block_size=4, max_batch_total_tokens=96, max_total_tokens=64)
    calls = counting(monkeypatch, engine)
    results = run_to_completion(engine, [OfflineRequest(ids, params(inputs, 24)) for ids, inputs, _ in prepared])
    assert engine.scheduler.num_preemptions > 0
    assert sum(calls) == 3, calls
    assert [r.outputs[0].token_ids for r in results] == expected


def test_a_request_with_bad_image_keys_fails_alone(ckpt, monkeypatch):
    folder, ref, processor = ckpt
    ids, inputs, _ = prompt(processor, "<image>Describe this image.", [random_image(40, 30, seed=16)])
    text_ids, _, text_out = prompt(processor, "What is in the picture?", [])
    engine = load_genserve(folder)
    original = engine.runner.model.embed_images
    monkeypatch.setattr(engine.runner.model, "embed_images", lambda xs: [e[0] for e in original(xs)])
    bad, good = run_to_completion(engine, [OfflineRequest(ids, params(inputs)),
                                           OfflineRequest(text_ids, params(None))])
    assert bad.outputs[0].finish_reason.value == "error" and "image keys" in bad.outputs[0].error
    assert good.outputs[0].token_ids == reference_greedy(ref, text_out)


# -- the processor adapter --------------------------------------------------------------------

def test_chat_prompt_has_one_bos(ckpt):
    """A chat template that writes the BOS (add_special_tokens=False) keeps one BOS, not the
    processor's too; its image attention rows are cut alike. (The template is the tokenizer's:
    IdeficsProcessor keeps none, so the server writes the image token in the text.)"""
    _, _, processor = ckpt
    mm = InterleavedProcessor(processor, processor.image_token_id)
    assert mm.chat_template is None
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": "<image>Hi"}], tokenize=False,
                                                   add_generation_prompt=True)
    assert text.startswith("<s>User:<image>Hi")
    image = random_image(40, 30, seed=17)
    ids, inputs = mm.process(text, [image], add_special_tokens=False)
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    want = processor(text=[text[len("<s>"):].split("<image>")[0], image, text.split("<image>")[1]],
                     return_tensors="pt")
    assert ids == want["input_ids"][0].tolist()
    assert torch.equal(inputs.data["image_attention_mask"], want["image_attention_mask"])


@pytest.mark.parametrize("text, n, fragment", [
    ("<image> and <image>", 1, "2 <image> tokens but 1 images"),
    ("Hi", 1, "0 <image> tokens but 1 images"),
    ("<image>https://example.com/cat.png", 1, "would be fetched"),
], ids=["more-tokens", "no-token", "url-piece"])
def test_processor_refusals(ckpt, text, n, fragment):
    _, _, processor = ckpt
    mm = InterleavedProcessor(processor, processor.image_token_id)
    with pytest.raises(ImageError, match=fragment.replace("(", r"\(")):
        mm.process(text, [random_image(40, 30, seed=i) for i in range(n)], add_special_tokens=True)


def test_image_token_is_the_tokenizers(ckpt):
    folder, _, processor = ckpt
    engine = load_genserve(folder)
    assert engine.runner.model.image_token_id == processor.image_token_id == processor.tokenizer.convert_tokens_to_ids(
        "<image>")
