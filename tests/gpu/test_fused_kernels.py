"""Fused RMSNorm, rotary and SiLU*mul kernels against the core's PyTorch layers."""

import pytest
import torch

pytest.importorskip("triton")

from genserve.layers.activation import GatedActivation  # noqa: E402
from genserve.layers.custom_op import use_layer_ops  # noqa: E402
from genserve.layers.norm import RMSNorm  # noqa: E402
from genserve.attention.base import AttentionMetadata  # noqa: E402
from genserve.layers.rotary import LongRopeRotaryEmbedding, RotaryEmbedding  # noqa: E402
from genserve_cuda.kernels.activation import silu_and_mul  # noqa: E402
from genserve_cuda.kernels.rms_norm import rms_norm  # noqa: E402
from genserve_cuda.kernels.rotary import rotary_embedding  # noqa: E402
from genserve_cuda.layer_ops import CudaLayerOps  # noqa: E402


@pytest.fixture
def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float16


def ulp_close(out, ref, dtype):
    """Within two units of the last place of the activation dtype (the paths round differently)."""
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("hidden", [64, 1000, 4096])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(device, dtype, hidden, offset):
    norm = RMSNorm(hidden, 1e-5, dtype, offset).to(device)
    norm.weight.normal_(1.0, 0.2)
    x = torch.randn(37, hidden, dtype=dtype, device=device) * 3
    r = torch.randn(37, hidden, dtype=dtype, device=device)
    ulp_close(rms_norm(x, norm.weight, 1e-5, offset), norm(x), dtype)
    out, res = rms_norm(x, norm.weight, 1e-5, offset, residual=r)
    ref_out, ref_res = norm(x, r)
    assert torch.equal(res, ref_res)  # the add is the same single rounding
    ulp_close(out, ref_out, dtype)


def _rope(device, rotary_dim, interleaved, head_dim=64):
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    return RotaryEmbedding(head_dim, rotary_dim, 4096, inv, interleaved=interleaved).to(device)


@pytest.mark.parametrize("rotary_dim,interleaved", [(64, False), (32, False), (64, True), (16, True)])
def test_rotary(device, dtype, rotary_dim, interleaved):
    rope = _rope(device, rotary_dim, interleaved)
    T = 29
    qkv = torch.randn(T, (8 + 2 + 2) * 64, dtype=dtype, device=device)
    q, k, _ = qkv.split([8 * 64, 2 * 64, 2 * 64], dim=-1)  # strided views, as in the models
    q, k = q.view(T, 8, 64), k.view(T, 2, 64)
    pos = torch.randint(0, 4096, (T,), device=device)
    out_q, out_k = rotary_embedding(pos, q, k, rope.cos, rope.sin, rotary_dim, interleaved)
    ref_q, ref_k = rope(pos, q, k)
    exact_q, exact_k = rope(pos, q.float(), k.float())  # fp32 maths: the kernel should be this
    for out, ref, exact in ((out_q, ref_q, exact_q), (out_k, ref_k, exact_k)):
        assert torch.equal(out[..., rotary_dim:], ref[..., rotary_dim:])
        torch.testing.assert_close(out.float(), exact.to(dtype).float(), rtol=0, atol=2 * torch.finfo(dtype).eps * 4)
        # Never further from the fp32 result than the module's own dtype-rounded maths.
        assert (out.float() - exact).abs().max() <= (ref.float() - exact).abs().max() + 1e-6


def test_rotary_longrope_rows(device, dtype):
    """longrope's stacked [short; long] tables through the unchanged kernel: rows chosen per
    sequence by ``cache_rows`` (a short prefill, a long one, decode rows on both sides)."""
    half = 32
    inv = 1.0 / (10000 ** (torch.arange(0, 2 * half, 2).float() / (2 * half)))
    with use_layer_ops(CudaLayerOps()):
        rope = LongRopeRotaryEmbedding(64, 2 * half, 512, inv / 1.2, inv / 9.0, threshold=64,
                                       scaling=1.1).to(device)
    # The subclass keeps the core's reference maths, so it binds the kernel like any rotary.
    assert rope.impl_name == "cuda" and rope.cos.shape == (1024, half)
    seqs = [(40, 7), (100, 50), (64, 1), (65, 1)]  # (length after the step, rows this step)
    pos = torch.tensor([p for n, q in seqs for p in range(n - q, n)], device=device)
    cu = torch.tensor([0, 7, 57, 58, 59], dtype=torch.int32, device=device)
    lens = torch.tensor([n for n, _ in seqs], dtype=torch.int32, device=device)
    meta = AttentionMetadata(cu, lens, torch.zeros(4, 1, dtype=torch.int32, device=device),
                             torch.zeros(59, dtype=torch.long, device=device), 50, 100, False)
    rows = rope.cache_rows(pos, meta)
    assert rows.tolist() == [p + 512 * (n > 64) for n, q in seqs for p in range(n - q, n)]
    q = torch.randn(59, 4, 64, dtype=dtype, device=device)
    k = torch.randn(59, 2, 64, dtype=dtype, device=device)
    exact = RotaryEmbedding.forward_native(rope, rows, q.float(), k.float())
    kernel = rotary_embedding(rows, q, k, rope.cos, rope.sin, 2 * half)
    bound = rope(rows, q, k)  # the kernel on a GPU; the PyTorch fallback on the CPU
    for out, ref in [*zip(kernel, exact), *zip(bound, exact)]:
        torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=0, atol=2 * torch.finfo(dtype).eps * 4)


@pytest.mark.parametrize("inter", [11, 1024, 3000])
def test_silu_mul(device, dtype, inter):
    x = torch.randn(5, 3, 2 * inter, dtype=dtype, device=device) * 4
    out = silu_and_mul(x)
    ref = GatedActivation("silu")(x)
    assert out.shape == ref.shape
    ulp_close(out, ref, dtype)


def test_layer_ops_bind_and_match(device, dtype):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(64, 1e-6, dtype)
            self.rope = _rope("cpu", 64, False)
            self.act = GatedActivation("silu")
            self.gelu = GatedActivation("gelu")  # no fused kernel: must stay as it is

        def forward(self, pos, x, r):
            h, r = self.norm(x, r)
            q, k = self.rope(pos, h.view(-1, 1, 64), h.view(-1, 1, 64))
            return self.act(torch.cat([q, k], -1).view(-1, 128)), self.gelu(h), r

    ref_block = Block().to(device)
    ref_block.norm.weight.normal_()
    with use_layer_ops(CudaLayerOps()):
        block = Block().to(device)
    block.load_state_dict(ref_block.state_dict())
    pos = torch.arange(9, device=device)
    x, r = torch.randn(9, 64, dtype=dtype, device=device), torch.randn(9, 64, dtype=dtype, device=device)
    ref = ref_block(pos, x, r)
    bound = {n: m.impl_name for n, m in block.named_children()}
    assert bound == {"norm": "cuda", "rope": "cuda", "act": "cuda", "gelu": "native"}
    assert all(m.impl_name == "native" for m in ref_block.children())
    out = block(pos, x, r)
    for o, e in zip(out, ref):
        torch.testing.assert_close(o.float(), e.float(), rtol=2e-2, atol=2e-2)
