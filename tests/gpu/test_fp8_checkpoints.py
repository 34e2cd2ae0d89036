"""FP8 checkpoints written by llm-compressor (compressed-tensors ``float-quantized``, fixtures in
tests/fixtures/quant/compressed-tensors/fp8-*) served on the GPU through ``cuda_fp8_scaled_mm``,
against the logits transformers + compressed-tensors recorded on CPU in fp32 for the same
checkpoint. bf16 activations and per-token activation scales (the static fixture's
``input_scale`` is not used by the W8A8 kernel), so the bound is a logit tolerance (15% of the
largest reference logit: this random model's logits span about +-1.4 and the H200 run showed
6.5% (dynamic) and 10.1% (static: per-token scales where the reference used the static one)
from bf16 and the activation quantization over two layers) and top-1 agreement wherever the reference's top-1/top-2 margin is
twice that tolerance (the tiny random model has near-ties that bf16 may flip; elsewhere a flip
means the error exceeded its budget). Skips without an sm89+ GPU."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs an sm89+ CUDA GPU", allow_module_level=True)

from genserve_cuda.quant.scaled_mm_fp8 import CudaScaledMMFP8Kernel  # noqa: E402

FIXTURES = Path(__file__).parents[1] / "fixtures" / "quant" / "compressed-tensors"


@pytest.mark.parametrize("name", ["fp8-dynamic", "fp8-static"])
def test_llmcompressor_fp8_checkpoint_on_the_gpu(name):
    from safetensors.torch import load_file

    from genserve.args import defaults
    from genserve.engine.build import build_engine
    from genserve.testing import prompt_logits

    folder = FIXTURES / name
    engine = build_engine(defaults(model_id=str(folder), backend="cuda", dtype="bfloat16", block_size=16,
                                   max_batch_total_tokens=4096, max_batch_prefill_tokens=64,
                                   cuda_graphs=0)).engine
    layer = engine.runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer.quant.kernel, CudaScaledMMFP8Kernel)
    ref = load_file(folder / "reference.safetensors")
    checked = 0
    for i in range(len([k for k in ref if k.startswith("prompt_")])):
        ours = prompt_logits(engine, ref[f"prompt_{i}"].tolist()).float().cpu()
        theirs = ref[f"logits_{i}"]
        assert F.cosine_similarity(ours, theirs, dim=-1).min() > 0.99
        tol = 0.15 * theirs.abs().max()
        assert (ours - theirs).abs().max() <= tol
        top2 = theirs.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) > 2 * tol
        assert torch.equal(ours.argmax(-1)[decisive], theirs.argmax(-1)[decisive])
        checked += int(decisive.sum())
    print(f"{name}: top-1 compared at {checked} decisive positions")
