"""Tiny quantized Llama checkpoints written by the test packers (GPTQ act-order, Marlin, MoE...),
and the reference: transformers on the dense model holding the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from genserve.testing import save_reference
from safetensors.torch import save_file

from .packers import awq_tensors, ct_tensors, gptq_tensors, marlin_tensors, quantize

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def quant_config(fmt: str, bits: int, group: int, sym: bool, act_order: bool) -> dict:
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": sym,
                "checkpoint_format": "gptq"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    if fmt == "marlin":
        return {"quant_method": "marlin", "group_size": group}
    if fmt == "compressed-tensors":
        weights = {"num_bits": bits, "type": "int", "symmetric": sym,
                   "strategy": "channel" if group == -1 else "group", "group_size": None if group == -1 else group,
                   "actorder": "group" if act_order else None}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    raise ValueError(fmt)


def pack(fmt, qz, sym, act_order):
    if fmt == "gptq":
        t = gptq_tensors(qz, v1=True)
        if not act_order:
            t.pop("g_idx")
        return t
    if fmt == "awq":
        return awq_tensors(qz)
    if fmt == "marlin":
        return marlin_tensors(qz)
    return ct_tensors(qz, sym, act_order)


def write_quantized(config, folder: Path, fmt: str, bits: int = 4, group: int = 32, sym: bool = False,
                    act_order: bool = False, model_cls=None):
    """Save a random transformers model for ``config``, replace every projection's weight in the
    saved checkpoint by its ``fmt`` tensors, and return transformers' model loaded from the same
    checkpoint holding the dequantized weights instead (the reference)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    save_reference(config, folder, model_cls=model_cls)
    saved = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            saved.update({k: h.get_tensor(k) for k in h.keys()})
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    dense = folder.parent / (folder.name + "-dequantized")
    dense.mkdir(exist_ok=True)
    out, deq = {}, {}
    for name, tensor in saved.items():
        module, _, leaf = name.rpartition(".")
        parent, _, proj = module.rpartition(".")
        if leaf == "weight" and proj in PROJ and tensor.dim() == 2:
            # Projections of one input (q/k/v, gate/up, an expert's w1/w3) share GPTQ's feature order.
            shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu",
                      "w1": "w13", "w3": "w13"}.get(proj, proj)
            qz = quantize(tensor.float(), bits, group, sym, act_order, seed=sum(map(ord, f"{parent}.{shared}")))
            for k, v in pack(fmt, qz, sym, act_order).items():
                out[f"{module}.{k}"] = v.contiguous()
            deq[name] = qz.dequantized()
        else:
            out[name] = deq[name] = tensor.contiguous()
    save_file(out, folder / "model.safetensors")
    save_file(deq, dense / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps(cfg, indent=1))
    cfg["quantization_config"] = quant_config(fmt, bits, group, sym, act_order)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
