"""genserve-cuda's W8A8 FP8 kernel (``cuda_fp8_scaled_mm``, ``torch._scaled_mm``) against the
dequantized matmul, and the whole ``--quantize fp8`` model on the GPU. Skips without an sm89+ GPU.

Reference: the activations and weights quantized with the same functions, dequantized and
multiplied in fp32, so only the GEMM's accumulation order and the bf16 output rounding differ.
"""

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs an sm89+ CUDA GPU", allow_module_level=True)

from genserve.layers.quantization.fp8_kernels import (  # noqa: E402
    FP8LinearConfig,
    quantize_fp8_per_channel,
    quantize_fp8_per_token,
)
from genserve_cuda.quant.scaled_mm_fp8 import CudaScaledMMFP8Kernel  # noqa: E402

DEV = torch.device("cuda")


class Layer(torch.nn.Module):
    pass


@pytest.mark.parametrize("rows", [1, 3, 16, 77, 512])
@pytest.mark.parametrize("n,k", [(256, 128), (6144, 4096), (4096, 14336)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_matches_the_dequantized_matmul(rows, n, k, with_bias):
    torch.manual_seed(rows + n + k)
    w = (torch.randn(n, k, device=DEV) * 0.02).to(torch.bfloat16)
    x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16) if with_bias else None
    config = FP8LinearConfig(k, n, torch.bfloat16)
    assert CudaScaledMMFP8Kernel.can_implement(config, DEV) is None
    kernel, layer = CudaScaledMMFP8Kernel(config), Layer()
    q, scale = quantize_fp8_per_channel(w)
    kernel.process_weights(layer, q, scale)
    got = kernel.apply(layer, x, bias)
    if kernel.quantizes_activations(rows):
        qx, sx = quantize_fp8_per_token(x)
        want = (qx.float() * sx) @ (q.float() * scale).t()
    else:  # one row: weight-only (the float8 GEMV), activations unquantized
        want = x.float() @ (q.float() * scale).t()
    if bias is not None:
        want = want + bias.float()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 1e-2, err
    # And against the unquantized bf16 matmul: W8A8's own error stays small.
    dense = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    assert F.cosine_similarity(got.float(), dense, dim=-1).min() > 0.99


@pytest.mark.parametrize("lead", [(2, 5), (1, 1)])  # W8A8 and the one-row GEMV
def test_three_dim_input_and_graph_capture(lead):
    torch.manual_seed(0)
    n, k = 512, 256
    w = (torch.randn(n, k, device=DEV) * 0.02).to(torch.bfloat16)
    kernel, layer = CudaScaledMMFP8Kernel(FP8LinearConfig(k, n, torch.bfloat16)), Layer()
    kernel.process_weights(layer, *quantize_fp8_per_channel(w))
    x = torch.randn(*lead, k, device=DEV, dtype=torch.bfloat16)
    eager = kernel.apply(layer, x, None)
    assert eager.shape == (*lead, n)
    static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kernel.apply(layer, static, None)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel.apply(layer, static, None)
    static.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out.float(), kernel.apply(layer, x * 2, None).float(), rtol=0, atol=0)


@pytest.mark.parametrize("rows,k", [(1, 4096), (7, 14336), (300, 4096), (2, 100)])
def test_fused_per_token_quantization_matches_the_torch_reference(rows, k):
    from genserve_cuda.kernels.fp8_quant import per_token_fp8

    torch.manual_seed(rows * k)
    x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16) * 3
    x[0, :7] = 0  # partial zeros; an all-zero row gets the EPS scale below
    if rows > 1:
        x[1] = 0
    q, s = per_token_fp8(x)
    q_ref, s_ref = quantize_fp8_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (rows, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    # the same rounding up to the last bit of the division: at most one e4m3 step apart
    diff = (q.float() - q_ref.float()).abs()
    step = q_ref.float().abs().clamp(min=2 ** -6) * 2 ** -3
    assert bool((diff <= step).all()), diff.max()
    assert (q.float() != q_ref.float()).float().mean() < 1e-3


def test_refuses_what_cublaslt_cannot_take():
    assert "multiples of 16" in CudaScaledMMFP8Kernel.can_implement(FP8LinearConfig(40, 64, torch.bfloat16), DEV)
    assert "bf16" in CudaScaledMMFP8Kernel.can_implement(FP8LinearConfig(64, 64, torch.float16), DEV)
    assert CudaScaledMMFP8Kernel.can_implement(FP8LinearConfig(64, 64, torch.bfloat16),
                                               torch.device("cpu")) is not None


def test_fp8_model_uses_the_kernel_and_stays_close(tmp_path):
    from transformers import LlamaConfig

    from genserve.args import defaults
    from genserve.engine.build import build_engine
    from genserve.testing import make_prompts, prompt_logits, save_reference

    def load_genserve(folder, **flags):
        args = defaults(model_id=str(folder), backend="cuda", dtype="bfloat16", block_size=16,
                        max_batch_total_tokens=4096, max_batch_prefill_tokens=64, cuda_graphs=0,
                        **flags)
        return build_engine(args).engine

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         torch_dtype="bfloat16")
    save_reference(config, tmp_path)
    full = load_genserve(tmp_path)
    quant = load_genserve(tmp_path, quantize="fp8")
    layer = quant.runner.model.layers[0].mlp.down_proj
    assert isinstance(layer.quant.kernel, CudaScaledMMFP8Kernel)
    for prompt in make_prompts(256, lengths=(6, 33)):
        a, b = prompt_logits(full, prompt).float(), prompt_logits(quant, prompt).float()
        assert F.cosine_similarity(a, b, dim=-1).min() > 0.98
