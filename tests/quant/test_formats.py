"""Every format's loader + every CPU kernel against the dequantized matmul (random weights,
quantized in pure torch by ``packers``): bits, group sizes, symmetric/asymmetric, act-order,
fused layers and odd shapes."""

import pytest
import torch
from genserve.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from genserve.layers.quantization.awq import AWQConfig
from genserve.layers.quantization.base import LinearKernelChooser, QuantizationError
from genserve.layers.quantization.compressed_tensors import CompressedTensorsConfig
from genserve.layers.quantization.cpu_kernels import (
    CpuInt4PackKernel,
    CpuInt8PackKernel,
)
from genserve.layers.quantization.gptq import GPTQConfig
from genserve.layers.quantization.kernels import TorchWNA16Kernel
from genserve.layers.quantization.marlin import MarlinConfig

from .packers import awq_tensors, ct_tensors, gptq_tensors, marlin_tensors, quantize

KERNELS = {k.name: k for k in (TorchWNA16Kernel, CpuInt4PackKernel, CpuInt8PackKernel)}


def chooser(kernel: str) -> LinearKernelChooser:
    return LinearKernelChooser(torch.device("cpu"), (kernel,), KERNELS)


def run_layer(layer, tensors: dict, rows: int = 5, seed: int = 0):
    for name, t in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, t)
    layer.quant.process_after_loading(layer)
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(seed))
    return x, layer(x)


def check(layer, qz, tensors, kernel):
    x, y = run_layer(layer, tensors)
    want = x @ qz.dequantized().t()
    tol = 1e-4 * want.abs().max().item() + 1e-5
    assert (y - want).abs().max().item() <= tol, f"{kernel}: differs by {(y - want).abs().max().item():.3e}"
    assert type(layer.quant.kernel).name == kernel


def kernels_for(bits, group, k, n):
    out = ["torch_wna16"]
    if bits == 4 and group != -1 and k % group == 0 and n % 16 == 0:
        out.append("cpu_int4pack")
    if bits == 4 and group == -1 and n % 16 == 0 and k % 32 == 0:
        out.append("cpu_int4pack")
    if bits == 8 and group == -1:
        out.append("cpu_int8pack")
    return out


GPTQ_CASES = [(bits, group, sym, act, v1, kernel, k, n)
              for bits in (4, 8) for group in (-1, 32, 64, 128) for sym in (True, False)
              for act in (False, True) for v1 in (True, False)
              for (k, n) in [(256, 128)]
              for kernel in kernels_for(bits, group, k, n)
              if not (act and group == -1) and (v1 or not sym)]


@pytest.mark.parametrize("bits,group,sym,act,v1,kernel,k,n", GPTQ_CASES)
def test_gptq(bits, group, sym, act, v1, kernel, k, n):
    torch.manual_seed(bits + group)
    w = torch.randn(n, k) * 0.05
    qz = quantize(w, bits, group, sym, act)
    cfg = GPTQConfig.from_config({"bits": bits, "group_size": group, "desc_act": act, "sym": sym,
                                  "checkpoint_format": "gptq" if v1 else "gptq_v2"}, chooser(kernel))
    layer = RowParallelLinear(k, n, False, torch.float32, cfg, prefix="model.layers.0.mlp.down_proj")
    tensors = gptq_tensors(qz, v1)
    if not act:
        tensors.pop("g_idx")
    check(layer, qz, tensors, kernel)


def test_gptq_odd_shape_and_merged_parts():
    """K = 96 (no 128 groups), fused gate/up from two checkpoint tensors, bias."""
    k, i = 96, 40
    ws = [torch.randn(i, k) * 0.05 for _ in range(2)]
    qs = [quantize(w, 4, 32, False, True, seed=s) for s, w in enumerate(ws)]
    cfg = GPTQConfig.from_config({"bits": 4, "group_size": 32, "desc_act": False, "sym": False}, chooser("torch_wna16"))
    layer = MergedColumnParallelLinear(k, [i, i], False, torch.float32, cfg, prefix="model.layers.0.mlp.gate_up_proj")
    # act-order is per checkpoint tensor; with desc_act False use contiguous groups for both
    qs = [quantize(w, 4, 32, False, False) for w in ws]
    for shard, qz in enumerate(qs):
        t = gptq_tensors(qz, v1=True)
        t.pop("g_idx")
        for name, tensor in t.items():
            getattr(layer, name).weight_loader(getattr(layer, name), tensor, shard)
    layer.quant.process_after_loading(layer)
    x = torch.randn(3, k)
    want = x @ torch.cat([q.dequantized() for q in qs]).t()
    assert torch.allclose(layer(x), want, atol=1e-4)


@pytest.mark.parametrize("group", [-1, 32, 128])
@pytest.mark.parametrize("kernel", ["torch_wna16", "cpu_int4pack"])
def test_awq(group, kernel):
    k, n = 256, 128
    w = torch.randn(n, k) * 0.05
    qz = quantize(w, 4, group, sym=False)
    cfg = AWQConfig.from_config({"bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}, chooser(kernel))
    layer = RowParallelLinear(k, n, False, torch.float32, cfg, prefix="model.layers.0.self_attn.o_proj")
    check(layer, qz, awq_tensors(qz), kernel)


def test_awq_qkv_parts():
    """q, k, v checkpoint tensors packed along the output load into one fused AWQ layer."""
    h, hd, heads, kv = 128, 32, 4, 2
    cfg = AWQConfig.from_config({"bits": 4, "group_size": 64}, chooser("cpu_int4pack"))
    layer = QKVParallelLinear(h, hd, heads, kv, False, torch.float32, cfg, prefix="model.layers.0.self_attn.qkv_proj")
    qs = {s: quantize(torch.randn(n, h) * 0.05, 4, 64, False) for s, n in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd))}
    for shard, qz in qs.items():
        for name, t in awq_tensors(qz).items():
            getattr(layer, name).weight_loader(getattr(layer, name), t, shard)
    layer.quant.process_after_loading(layer)
    x = torch.randn(4, h)
    want = x @ torch.cat([qs[s].dequantized() for s in "qkv"]).t()
    assert torch.allclose(layer(x), want, atol=1e-4)


CT_CASES = [(bits, strategy, group, sym, act, kernel, k, n)
            for bits in (4, 8) for strategy, group in (("channel", -1), ("group", 32), ("group", 128))
            for sym in (True, False) for act in (False, True) for (k, n) in [(256, 128), (100, 72)]
            for kernel in kernels_for(bits, group, k, n)
            if not (act and group == -1) and not (group == 128 and k == 100)]


@pytest.mark.parametrize("bits,strategy,group,sym,act,kernel,k,n", CT_CASES)
def test_compressed_tensors(bits, strategy, group, sym, act, kernel, k, n):
    w = torch.randn(n, k) * 0.05
    qz = quantize(w, bits, group, sym, act)
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy,
               "group_size": None if group == -1 else group, "actorder": "group" if act else None}
    cfg = CompressedTensorsConfig.from_config({"format": "pack-quantized", "ignore": ["lm_head"],
                                               "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}},
                                              chooser(kernel))
    layer = RowParallelLinear(k, n, False, torch.float32, cfg, prefix="model.layers.0.mlp.down_proj")
    check(layer, qz, ct_tensors(qz, sym, act), kernel)


@pytest.mark.parametrize("group", [-1, 128])
@pytest.mark.parametrize("kernel", ["torch_wna16", "cpu_int4pack"])
def test_marlin(group, kernel):
    k, n = 256, 256
    qz = quantize(torch.randn(n, k) * 0.05, 4, group, sym=True)
    cfg = MarlinConfig.from_config({"group_size": group}, chooser(kernel))
    layer = RowParallelLinear(k, n, False, torch.float32, cfg, prefix="model.layers.0.mlp.down_proj")
    check(layer, qz, marlin_tensors(qz), kernel)


def test_fast_kernels_equal_reference_in_bf16():
    """The int4 CPU kernel with bf16 activations stays within bf16 rounding of the reference."""
    k, n = 512, 256
    qz = quantize(torch.randn(n, k) * 0.05, 4, 128, sym=False, act_order=True)
    outs = []
    for kernel in ("torch_wna16", "cpu_int4pack"):
        cfg = GPTQConfig.from_config({"bits": 4, "group_size": 128, "desc_act": True, "sym": False}, chooser(kernel))
        layer = RowParallelLinear(k, n, False, torch.bfloat16, cfg, prefix="p")
        x, y = run_layer(layer, gptq_tensors(qz, v1=True), rows=16)
        outs.append(y.float())
    assert (outs[0] - outs[1]).abs().max() <= 0.02 * outs[0].abs().max()


def test_refusals_name_the_layer_and_reason():
    with pytest.raises(QuantizationError, match="3 bits"):
        GPTQConfig.from_config({"bits": 3, "group_size": 128})
    with pytest.raises(QuantizationError, match="group_size 256"):
        GPTQConfig.from_config({"bits": 4, "group_size": 256})
    with pytest.raises(QuantizationError, match="gemv"):
        AWQConfig.from_config({"bits": 4, "group_size": 128, "version": "gemv"})
    with pytest.raises(QuantizationError, match="Marlin format"):
        GPTQConfig.from_config({"bits": 4, "group_size": 128, "is_marlin_format": True})
    ct = {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int"},
                                  "input_activations": {"num_bits": 8}}}}
    cfg = CompressedTensorsConfig.from_config(ct)
    with pytest.raises(QuantizationError, match=r"model.layers.0.mlp.down_proj.*activations"):
        RowParallelLinear(128, 128, False, torch.float32, cfg, prefix="model.layers.0.mlp.down_proj")
    with pytest.raises(QuantizationError, match="kv_cache_scheme"):
        CompressedTensorsConfig.from_config({**ct, "kv_cache_scheme": {"num_bits": 8, "type": "float"}})
    cfg = GPTQConfig.from_config({"bits": 4, "group_size": 32})
    with pytest.raises(QuantizationError, match=r"layer model.layers.0.x .*pack"):
        RowParallelLinear(100, 128, False, torch.float32, cfg, prefix="model.layers.0.x")
    cfg = GPTQConfig.from_config({"bits": 4, "group_size": 32, "sym": True, "checkpoint_format": "gptq_v2"})
    layer = RowParallelLinear(64, 64, False, torch.float32, cfg, prefix="model.layers.1.o_proj")
    qz = quantize(torch.randn(64, 64), 4, 32, sym=False)
    t = gptq_tensors(qz, v1=False)
    t.pop("g_idx")
    with pytest.raises(QuantizationError, match=r"model.layers.1.o_proj.*sym: true"):
        run_layer(layer, t)


def test_ignore_lists_and_fused_parts():
    ct = {"ignore": ["lm_head", "re:.*layers\\.1\\..*", "model.layers.0.self_attn.k_proj"],
          "config_groups": {"g": {"targets": ["re:.*mlp.*"], "weights": {"num_bits": 4, "type": "int", "group_size": 32}}}}
    cfg = CompressedTensorsConfig.from_config(ct)
    assert cfg.get_quant_method(None, "model.layers.0.mlp.gate_up_proj") is not None
    assert cfg.get_quant_method(None, "model.layers.1.mlp.down_proj") is None       # re: ignore
    assert cfg.get_quant_method(None, "model.layers.0.self_attn.o_proj") is None    # no target
    with pytest.raises(QuantizationError, match="quantized differently"):
        cfg2 = CompressedTensorsConfig.from_config({**ct, "config_groups": {"g": {"targets": ["Linear"],
                                                   "weights": {"num_bits": 4, "type": "int", "group_size": 32}}}})
        cfg2.get_quant_method(None, "model.layers.0.self_attn.qkv_proj")  # k_proj ignored, q/v not
    gptq = GPTQConfig.from_config({"bits": 4, "group_size": 128, "modules_to_not_convert": ["down_proj"],
                                   "dynamic": {"-:.*layers\\.3\\..*": {}, "+:.*layers\\.2\\..*": {"bits": 8}}})
    assert gptq.get_quant_method(None, "model.layers.0.mlp.down_proj") is None
    assert gptq.get_quant_method(None, "model.layers.3.mlp.gate_up_proj") is None
    assert gptq.get_quant_method(None, "model.layers.2.mlp.gate_up_proj").scheme.bits == 8
    assert gptq.get_quant_method(None, "model.layers.0.mlp.gate_up_proj").scheme.bits == 4
