"""--quantize fp8 on the CPU: the per-token activation quantizer, the dequantizing reference
kernel (the behaviour before FP8 kernels existed) and the kernel choice through the backend's
preference list."""

import pytest
import torch
import torch.nn.functional as F

from genserve.layers.quantization.base import LinearKernelChooser
from genserve.layers.quantization.fp8 import FP8Config, FP8WeightOnly, choose_fp8_kernel
from genserve.layers.quantization.fp8_kernels import (
    FP8_MAX,
    FP8LinearConfig,
    FP8LinearKernel,
    TorchFP8Kernel,
    quantize_fp8_per_channel,
    quantize_fp8_per_token,
)
from genserve.layers.quantization.kernels import TorchWNA16Kernel


class Layer(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_quantization(dtype):
    torch.manual_seed(0)
    x = (torch.randn(5, 64) * torch.tensor([1e-3, 0.1, 1.0, 30.0, 0.0])[:, None]).to(dtype)
    q, scale = quantize_fp8_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (5, 1)
    amax = x.float().abs().amax(dim=1)
    # Each row's largest magnitude maps to the largest finite e4m3 value.
    assert torch.equal(q[:4].float().abs().amax(dim=1), torch.full((4,), FP8_MAX))
    assert torch.allclose(scale[:4, 0], amax[:4] / FP8_MAX)
    assert torch.equal(q[4].float(), torch.zeros(64)) and scale[4, 0] > 0  # a zero row stays finite
    # e4m3 keeps 3 mantissa bits: relative error at most 2**-4 per element (above the subnormals).
    deq = q.float() * scale
    err = (deq - x.float()).abs()
    assert (err <= x.float().abs() * 2 ** -4 + scale * 2 ** -9).all()


def test_per_token_quantization_keeps_leading_dims():
    x = torch.randn(2, 3, 32)
    q, scale = quantize_fp8_per_token(x)
    assert q.shape == (2, 3, 32) and scale.shape == (2, 3, 1)


def test_reference_kernel_equals_the_previous_dequantize_path():
    """Before kernels: weight_fp8 [N, K] and weight_scale [N, 1] in the weight's dtype, and
    apply = F.linear(x, weight_fp8.to(x.dtype) * weight_scale, bias)."""
    torch.manual_seed(1)
    w, bias, x = torch.randn(48, 32, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16), \
        torch.randn(3, 32, dtype=torch.bfloat16)
    layer, quant = Layer(w.clone()), FP8WeightOnly()
    quant.process_after_loading(layer)
    assert isinstance(quant.kernel, TorchFP8Kernel)
    scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    assert torch.equal(layer.weight_fp8.view(torch.uint8), q.view(torch.uint8))
    assert layer.weight_scale.dtype == torch.bfloat16 and torch.equal(layer.weight_scale, scale.to(torch.bfloat16))
    want = F.linear(x, q.to(x.dtype) * scale.to(torch.bfloat16), bias)
    assert torch.equal(quant.apply(layer, x, bias), want)
    q2, s2 = quantize_fp8_per_channel(w)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, scale)


class FakeFastFP8(FP8LinearKernel):
    name = "fake_fast_fp8"

    @classmethod
    def can_implement(cls, config, device):
        return None if config.in_features % 16 == 0 else "in_features not a multiple of 16"


def test_kernel_choice_follows_the_backend_preference():
    registry = {TorchWNA16Kernel.name: TorchWNA16Kernel, FakeFastFP8.name: FakeFastFP8}
    chooser = LinearKernelChooser(torch.device("cpu"), ("torch_wna16", "fake_fast_fp8"), registry)
    ok = FP8LinearConfig(32, 48, torch.bfloat16)
    odd = FP8LinearConfig(40, 48, torch.bfloat16)
    # WNA16 kernels in the list are never asked about FP8 layers.
    assert choose_fp8_kernel(chooser, ok, "l0") is FakeFastFP8
    assert choose_fp8_kernel(chooser, odd, "l1") is TorchFP8Kernel  # refused: the reference
    # A backend that does not list the kernel (the CPU's) gets the reference.
    cpu = LinearKernelChooser(torch.device("cpu"), ("torch_wna16",), registry)
    assert choose_fp8_kernel(cpu, ok, "l0") is TorchFP8Kernel
    assert choose_fp8_kernel(None, ok, "l0") is TorchFP8Kernel


def test_config_builds_methods_with_the_chooser():
    registry = {FakeFastFP8.name: FakeFastFP8}
    chooser = LinearKernelChooser(torch.device("cpu"), ("fake_fast_fp8",), registry)
    method = FP8Config.from_config(None, chooser).get_quant_method(torch.nn.Module(), "model.layers.0.x")
    layer = torch.nn.Module()
    method.create_weights(layer, 32, 48, torch.bfloat16, lambda *a: None)
    assert isinstance(method.kernel, FakeFastFP8) and layer.weight.shape == (48, 32)
