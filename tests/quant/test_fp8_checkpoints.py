"""FP8 checkpoints in the layouts tools publish (``quant_method: fp8`` per-tensor/static and
per-channel/dynamic, TGI's ``fbgemm_fp8``) served on CPU against a reference: transformers on the
dense model holding the dequantized weights, each quantized Linear's input fake-quantized as
the checkpoint says (per token: ``s = amax / 448``; static: the checkpoint's ``input_scale``).
The llm-compressor fixtures (compressed-tensors ``float-quantized``) are checked against
llm-compressor's own model in test_checkpoints.py."""

import json
from pathlib import Path

import pytest
import torch
from genserve.testing import (
    generate_greedy,
    load_genserve,
    make_prompts,
    prompt_logits,
    save_reference,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_MAX = 448.0


def fake_quant(x, scale):
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def write_fp8(folder: Path, quant_config: dict, per_tensor: bool, static: bool, skip=()):
    """A tiny Llama whose projections (but ``skip``) are FP8 with per-tensor or per-channel
    ``weight_scale`` (and ``input_scale`` when ``static``); returns the reference model."""
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    save_reference(cfg, folder)
    saved = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            saved.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 (a safe_open handle)
        f.unlink()
    dense, out, input_scales = {}, {}, {}
    for name, w in saved.items():
        module = name.rpartition(".")[0]
        if not (name.endswith(".weight") and module.rpartition(".")[2] in PROJ) or module in skip:
            out[name] = dense[name] = w
            continue
        amax = w.abs().amax() if per_tensor else w.abs().amax(dim=1, keepdim=True)
        scale = (amax / FP8_MAX).float()
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out[name], out[f"{module}.weight_scale"] = q, scale.reshape(() if per_tensor else (-1, 1))
        dense[name] = q.float() * scale
        if static:  # one scale per input, as calibration gives the projections of one input
            shared = module.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            out[f"{module}.input_scale"] = input_scales.setdefault(
                shared, torch.tensor(0.5 + len(input_scales) % 3) / FP8_MAX).clone()
    save_file(out, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quant_config
    (folder / "config.json").write_text(json.dumps(config))
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ref.load_state_dict(dense)
    for name, mod in ref.named_modules():
        if name.rpartition(".")[2] in PROJ and name not in skip:
            if static:
                s = out[f"{name}.input_scale"]
                mod.register_forward_pre_hook(lambda m, args, s=s: (fake_quant(args[0], s),))
            else:
                mod.register_forward_pre_hook(lambda m, args: (fake_quant(
                    args[0], (args[0].abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)),))
    return ref


CASES = {
    "fp8-tensor-static": ({"quant_method": "fp8", "activation_scheme": "static"}, True, True, ()),
    "fp8-channel-dynamic-ignored": ({"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "ignored_layers": ["model.layers.1.mlp.down_proj"]}, False, False,
                                    ("model.layers.1.mlp.down_proj",)),
    "fbgemm_fp8": ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                    "modules_to_not_convert": ["lm_head"]}, False, False, ()),
}


@pytest.mark.parametrize("case", CASES)
def test_fp8_checkpoint_matches_reference(tmp_path, case):
    qconf, per_tensor, static, skip = CASES[case]
    ref = write_fp8(tmp_path, qconf, per_tensor, static, skip)
    engine = load_genserve(tmp_path)
    model = engine.runner.model
    methods = {type(m.quant).__name__ for m, _ in model.quantized_modules()}
    assert "FP8CheckpointLinear" in methods
    if skip:
        assert type(model.layers[1].mlp.down_proj.quant).__name__ == "UnquantizedLinear"
    prompts = make_prompts(256)
    want = []
    for p in prompts:
        with torch.inference_mode():
            theirs = ref(torch.tensor([p])).logits[0].float()
            want.append(ref.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)[0, len(p):].tolist())
        diff = (prompt_logits(engine, p) - theirs).abs().max().item()
        assert diff <= 1e-2 * theirs.abs().max().item(), f"{case}: logits differ by {diff:.3e}"
    assert [generate_greedy(engine, [p], 12)[0] for p in prompts] == want
    assert generate_greedy(engine, prompts, 12, join_every=3) == want


def test_fp8_checkpoint_without_activation_emulation_would_differ(tmp_path):
    """The reference's activation quantization matters at the tolerance used above: the same
    checkpoint read as weight-only FP8 is further from it (so the test above can fail)."""
    qconf, per_tensor, static, skip = CASES["fp8-tensor-static"]
    ref = write_fp8(tmp_path, qconf, per_tensor, static, skip)
    engine = load_genserve(tmp_path)
    for m, _ in engine.runner.model.quantized_modules():
        m.fp8_input_scale = None
        m.quant.kernel.config = type(m.quant.kernel.config)(**{**m.quant.kernel.config.__dict__, "activations": None})
    p = make_prompts(256)[0]
    with torch.inference_mode():
        theirs = ref(torch.tensor([p])).logits[0].float()
    assert (prompt_logits(engine, p) - theirs).abs().max() > 1e-2 * theirs.abs().max()


def test_block_wise_fp8_is_refused(tmp_path):
    from genserve.errors import ConfigError

    write_fp8(tmp_path, {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
              False, False)
    with pytest.raises(ConfigError, match="block-wise"):
        load_genserve(tmp_path)
