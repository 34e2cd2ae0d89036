"""Llava-Next on the CUDA backend (its kernels, decode graphs, overlapped steps) gives
transformers' greedy tokens on the tiny random checkpoint, fp32, alone and batched with
text-only requests."""

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("the CUDA backend needs a CUDA device", allow_module_level=True)

from genserve.args import defaults  # noqa: E402
from genserve.engine.offline import OfflineRequest, run_to_completion  # noqa: E402
from genserve.engine.sampling_params import SamplingParams  # noqa: E402
from genserve.executor import create_engine  # noqa: E402
from genserve.multimodal.processor import MultiModalProcessor  # noqa: E402
from genserve.multimodal.testing import build_tiny_llava_next, random_image, reference_greedy  # noqa: E402
from transformers import AutoProcessor, LlavaNextForConditionalGeneration  # noqa: E402

NEW = 16


def test_llava_next_on_cuda_matches_transformers(tmp_path):
    build_tiny_llava_next(tmp_path)
    ref = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    mm = MultiModalProcessor(processor, processor.image_token_id)
    cases = [("Describe this image.", [random_image(70, 40, seed=1)]), ("What is in the picture?", []),
             ("A cat, a dog?", [random_image(56, 56, seed=2), random_image(40, 70, seed=3)])]
    requests, expected = [], []
    for i, (text, images) in enumerate(cases):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        rendered = mm.render_chat([{"role": "user", "content": content}])
        ids, inputs = mm.process(rendered, images, add_special_tokens=True)
        out = processor(text=[rendered], images=images or None, return_tensors="pt").to("cuda")
        expected.append(reference_greedy(ref, out, NEW))
        requests.append(OfflineRequest(ids, SamplingParams(max_new_tokens=NEW, ignore_eos=True, multimodal=inputs),
                                       join_step=i * 2))
    engine = create_engine(defaults(model_id=str(tmp_path), backend="cuda", dtype="float32", block_size=16,
                                    max_batch_prefill_tokens=32, max_batch_total_tokens=4096)).engine
    results = run_to_completion(engine, requests)
    assert [r.outputs[0].token_ids for r in results] == expected
