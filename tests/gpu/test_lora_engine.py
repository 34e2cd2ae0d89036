"""The CUDA engine with LoRA adapters, end to end: the Triton SGMV method, decode CUDA graphs
with adapters, 3 adapters through 2 slots; logits and greedy tokens equal PEFT's (float32)."""

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from genserve.args import defaults
from genserve.engine.build import build_engine
from genserve.testing import make_prompts, reference_greedy

from tests.lora.lorakit import (
    ALL_TARGETS,
    batch_logits,
    generate,
    make_adapter,
    peft_model,
    reference_logits,
    save_base,
)

NEW_TOKENS = 8


def test_cuda_engine_with_adapters_matches_peft(tmp_path):
    base = save_base(tmp_path / "base")
    dirs = {"alpha": make_adapter(base, tmp_path / "alpha", seed=1, target_modules=ALL_TARGETS),
            "beta": make_adapter(base, tmp_path / "beta", seed=2, r=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            "gamma": make_adapter(base, tmp_path / "gamma", seed=3, r=2, target_modules=["k_proj", "up_proj"])}
    refs = {name: peft_model(base, dirs.get(name)) for name in ("base", "alpha", "beta", "gamma")}
    args = defaults(model_id=str(base), backend="cuda", dtype="float32", block_size=16,
                    max_batch_total_tokens=4096, max_batch_prefill_tokens=256, cuda_graphs="1,2,4,8",
                    lora_adapters=",".join(f"{k}={v}" for k, v in dirs.items()), max_loras=2)
    engine = build_engine(args).engine
    runner = engine.runner
    assert runner.lora.method.name == "triton_sgmv" and not runner.graphs_off
    assert sorted(runner.graphs.lora_graphs) == [1, 2, 4, 8]

    ps = make_prompts(256, lengths=(5, 23, 9, 17), shared_prefix=6)
    items = [(ps[0], "alpha"), (ps[1], "beta"), (ps[2], None)]
    for (p, a), ours in zip(items, batch_logits(engine, items)):
        diff = (ours.cpu() - reference_logits(refs[a or "base"], p)).abs().max().item()
        assert diff <= 1e-2, f"{a}: logits differ by {diff:.2e}"
    items = [(ps[i % 4], a) for i, a in enumerate(["alpha", "beta", None, "gamma", "alpha", "gamma", "beta"])]
    want = [reference_greedy(refs[a or "base"], p, NEW_TOKENS) for p, a in items]
    loads = runner.lora.table.loads
    assert generate(engine, items, NEW_TOKENS) == want
    assert generate(engine, items, NEW_TOKENS, join_every=1) == want
    assert runner.lora.table.loads - loads >= 3  # three adapters through two slots
