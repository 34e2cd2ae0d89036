"""Quantized checkpoints served end to end against a reference: the fixtures written by real tools
(llm-compressor, auto-round; reference logits recorded by the tool's own model), and checkpoints
written by the test packers (GPTQ act-order, Marlin, AWQ, compressed-tensors; reference =
transformers on the dense model holding the dequantized weights). Logits within tolerance and
identical greedy tokens, alone and in a continuously batched mix."""

from pathlib import Path

import pytest
import torch
from genserve.testing import generate_greedy, load_genserve, prompt_logits
from safetensors.torch import load_file
from transformers import LlamaConfig, MixtralConfig

from .ckpt import write_quantized

FIXTURES = Path(__file__).parents[1] / "fixtures" / "quant"
TOOL_FIXTURES = sorted(str(p.parent.relative_to(FIXTURES)) for p in FIXTURES.glob("*/*/reference.safetensors"))


@pytest.mark.parametrize("name", TOOL_FIXTURES)
def test_tool_checkpoint_matches_the_tools_model(name):
    folder = FIXTURES / name
    ref = load_file(folder / "reference.safetensors")
    n = len([k for k in ref if k.startswith("prompt_")])
    prompts = [ref[f"prompt_{i}"].tolist() for i in range(n)]
    engine = load_genserve(folder)
    model = engine.runner.model
    assert any(type(m.quant).__name__ != "UnquantizedLinear" for m, _ in model.quantized_modules())
    for i, p in enumerate(prompts):
        ours = prompt_logits(engine, p)
        theirs = ref[f"logits_{i}"]
        diff = (ours - theirs).abs().max().item()
        assert diff <= 2e-2 * theirs.abs().max().item(), f"{name}: logits differ by {diff:.3e}"
    want = [ref[f"greedy_{i}"].tolist() for i in range(n)]
    steps = len(want[0])
    assert [generate_greedy(engine, [p], steps)[0] for p in prompts] == want
    assert generate_greedy(engine, prompts + prompts[::-1], steps, join_every=2) == want + want[::-1]


def tiny_llama(**kw):
    base = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaConfig(**{**base, **kw})


@pytest.mark.parametrize("fmt,bits,group,sym,act", [
    ("gptq", 4, 32, False, True),          # act-order (desc_act) with g_idx
    ("gptq", 8, 64, True, False),
    ("awq", 4, 64, False, False),
    ("compressed-tensors", 4, 32, True, True),
    ("compressed-tensors", 8, -1, False, False),
])
def test_packed_checkpoint_matches_dequantized_transformers(tmp_path, fmt, bits, group, sym, act):
    ref = write_quantized(tiny_llama(), tmp_path, fmt, bits, group, sym, act)
    engine = _assert_parity(tmp_path, ref)
    # The CPU backend's preference: torch's packed int4 / int8 matmuls where they apply (grouped
    # 8-bit weights run as two int4 groups, cpu_kernels.py).
    fast = "CpuInt4PackKernel" if bits == 4 or group != -1 else "CpuInt8PackKernel"
    layer = engine.runner.model.layers[0].mlp.down_proj
    assert type(layer.quant.kernel).__name__ == fast


def test_marlin_checkpoint(tmp_path):
    # Marlin's shapes: K % 128, N % 256 (per projection) -> a wider tiny model.
    cfg = tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                     head_dim=64)
    ref = write_quantized(cfg, tmp_path, "marlin", 4, 128, True)
    _assert_parity(tmp_path, ref)


def test_gptq_mixtral_serves(tmp_path):
    cfg = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=512)
    ref = write_quantized(cfg, tmp_path, "gptq", 4, 32, False, True)
    engine = _assert_parity(tmp_path, ref)
    experts = engine.runner.model.layers[0].mlp.experts
    assert type(experts["0"].w1.quant).__name__ == "GPTQLinearMethod"


def test_odd_shape_falls_back_to_the_reference_kernel(tmp_path):
    """hidden 72 (heads of 18): no projection meets the int4 CPU kernel's N % 16 == 0 and
    K % 32 == 0, so every layer runs on the reference kernel, still exact."""
    cfg = tiny_llama(hidden_size=72, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    ref = write_quantized(cfg, tmp_path, "compressed-tensors", 4, -1, True, False)
    engine = _assert_parity(tmp_path, ref)
    names = {type(m.quant.kernel).__name__ for m, _ in engine.runner.model.quantized_modules()}
    assert names == {"TorchWNA16Kernel"}


def _assert_parity(folder, ref, atol=2e-3):
    from genserve.testing import make_prompts, reference_greedy

    engine = load_genserve(folder)
    prompts = make_prompts(256)
    for p in prompts:
        ours = prompt_logits(engine, p)
        with torch.inference_mode():
            theirs = ref(torch.tensor([p])).logits[0].float()
        diff = (ours - theirs).abs().max().item()
        assert diff <= atol, f"logits differ by {diff:.2e} for a prompt of {len(p)} tokens"
    want = [reference_greedy(ref, p, 12) for p in prompts]
    assert [generate_greedy(engine, [p], 12)[0] for p in prompts] == want
    assert generate_greedy(engine, prompts, 12, join_every=3) == want
    return engine


def test_half_quantized_fused_layer_is_refused_naming_it():
    """auto-round left k/v dense (``dynamic`` "-:" rules) but quantized q: one qkv matmul cannot
    hold both, and the startup error says which layer and why."""
    from genserve.engine.build import ConfigError
    from genserve.layers.quantization.base import QuantizationError

    with pytest.raises((ConfigError, QuantizationError), match=r"model.layers.0.self_attn.qkv_proj: its parts"):
        load_genserve(FIXTURES / "gptq" / "w4-g32-asym-partial-kv")
