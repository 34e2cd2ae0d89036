"""Idefics v1 on the CUDA backend (its kernels, decode graphs for text-only steps, eager
decode steps with image cross-attention, overlapped steps) gives transformers' greedy tokens on
the tiny random checkpoint, fp32, alone and batched with text-only requests."""

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("the CUDA backend needs a CUDA device", allow_module_level=True)

from genserve.args import defaults  # noqa: E402
from genserve.engine.offline import OfflineRequest, run_to_completion  # noqa: E402
from genserve.engine.sampling_params import SamplingParams  # noqa: E402
from genserve.executor import create_engine  # noqa: E402
from genserve.multimodal.processor import InterleavedProcessor  # noqa: E402
from genserve.multimodal.testing import build_tiny_idefics, random_image, reference_greedy  # noqa: E402
from transformers import AutoProcessor, IdeficsForVisionText2Text  # noqa: E402

NEW = 16


def test_idefics_v1_on_cuda_matches_transformers(tmp_path):
    build_tiny_idefics(tmp_path)
    ref = IdeficsForVisionText2Text.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    mm = InterleavedProcessor(processor, processor.image_token_id)
    cases = [("User:<image>Describe this image.", [random_image(40, 30, seed=1)]),
             ("What is in the picture?", []),
             ("A cat<image>, a dog<image>?", [random_image(50, 50, seed=2), random_image(30, 60, seed=3)]),
             ("The quick brown fox jumps over the lazy dog.", [])]
    requests, expected = [], []
    for i, (text, images) in enumerate(cases):
        ids, inputs = mm.process(text, images, add_special_tokens=True)
        pieces, interleaved = text.split("<image>"), []
        for k, piece in enumerate(pieces):
            interleaved += ([piece] if piece else []) + ([images[k]] if k < len(images) else [])
        out = processor(text=interleaved, return_tensors="pt").to("cuda")
        assert out["input_ids"][0].tolist() == ids
        expected.append(reference_greedy(ref, out, NEW))
        requests.append(OfflineRequest(ids, SamplingParams(max_new_tokens=NEW, ignore_eos=True, multimodal=inputs),
                                       join_step=i * 2))
    engine = create_engine(defaults(model_id=str(tmp_path), backend="cuda", dtype="float32", block_size=16,
                                    max_batch_prefill_tokens=32, max_batch_total_tokens=4096)).engine
    results = run_to_completion(engine, requests)
    assert [r.outputs[0].token_ids for r in results] == expected
    # Text-only requests alone: their decode steps replay CUDA graphs through the gated
    # layers (the MLP half applies to every row); the same tokens as in the mixed batch.
    alone = run_to_completion(engine, [OfflineRequest(r.prompt_token_ids, r.params) for r, case in zip(requests, cases)
                                       if not case[1]])
    assert [r.outputs[0].token_ids for r in alone] == [e for e, case in zip(expected, cases) if not case[1]]
