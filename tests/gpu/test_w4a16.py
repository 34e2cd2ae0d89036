"""The Triton W4A16/W8A16 GEMM (``triton_w4a16``) against the dequantized matmul.

Weights are random floats quantized here in pure torch (GPTQ-style round-to-nearest per group,
symmetric or with zero points, optionally act-order), so the reference is exact:
``F.linear(x, WNA16Weights.dequantize(...))`` in fp32. Every check draws fresh inputs.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

from genserve.layers.quantization.kernels import WNA16Config, WNA16Weights  # noqa: E402
from genserve_cuda.kernels.w4a16 import (  # noqa: E402
    BUCKETS,
    DOT_MAX_M,
    GemmConfig,
    magic_bias,
    pack_wna16,
    ptx_available,
    select_config,
    unpack_wna16,
    wna16_dequantize,
    wna16_gemm,
)
from genserve_cuda.quant.triton_w4a16 import TritonW4A16Kernel, shape_unsupported_reason  # noqa: E402


@pytest.fixture
def dtype(device):
    # Triton's CPU interpreter has no bfloat16 arithmetic; the GPU runs the serving dtype.
    return torch.bfloat16 if device == "cuda" else torch.float16


def tolerance(dtype):
    return 1e-2 if dtype == torch.bfloat16 else 4e-3


def quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool, gen=None):
    """Round-to-nearest quantization of ``w [N, K]`` into the canonical form.

    Returns ``(WNA16Weights, group_size)``; ``group_size = -1`` means one group of K (per channel).
    With ``act_order`` the input features are visited in a random order (as GPTQ ``desc_act``
    does by Hessian diagonal), so the canonical rows come permuted with ``perm``.
    """
    N, K = w.shape
    gs = K if group_size == -1 else group_size
    perm = torch.randperm(K, generator=gen) if act_order else None
    wk = (w[:, perm] if perm is not None else w).t().float()          # [K, N], permuted rows
    g = wk.reshape(K // gs, gs, N)
    qmax = 2 ** bits - 1
    if sym:
        scale = g.abs().amax(dim=1) / (2 ** (bits - 1) - 1)
        scale = scale.clamp(min=1e-8)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = g.amin(dim=1), g.amax(dim=1)
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, qmax)
    q = (g / scale[:, None, :]).round() + zero[:, None, :]
    q = q.clamp(0, qmax).reshape(K, N).to(torch.uint8)
    weights = WNA16Weights(q, scale.to(w.dtype), None if sym else zero.to(torch.uint8), perm)
    return weights, gs


def make_layer(device, dtype, n, k, bits, group_size, sym, act_order, bias=False):
    gen = torch.Generator().manual_seed(1000 * n + k + bits)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    weights, gs = quantize(w, bits, group_size, sym, act_order, gen)
    weights = WNA16Weights(weights.qweight.to(device), weights.scales.to(dtype).to(device),
                           None if weights.zeros is None else weights.zeros.to(device),
                           None if weights.perm is None else weights.perm.to(device))
    config = WNA16Config(bits=bits, group_size=gs, has_zero_points=not sym, act_order=act_order,
                         in_features=k, out_features=n, act_dtype=dtype)
    layer = nn.Module()
    kernel = TritonW4A16Kernel(config)
    assert shape_unsupported_reason(config) is None
    kernel.process_weights(layer, weights)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype).to(device) if bias else None
    dense = weights.dequantize(config, torch.float32)                   # [N, K], original order
    return layer, kernel, dense, b


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output (unwritten or poisoned elements)"
    return ((out.float() - ref).norm() / ref.norm()).item()


def reference(x, dense, b):
    return F.linear(x.float(), dense, None if b is None else b.float())


def test_pack_roundtrip_and_layout():
    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        q = torch.randint(0, 2 ** bits, (256, 100), generator=gen, dtype=torch.uint8)
        packed = pack_wna16(q, bits)
        assert packed.dtype == torch.int32 and packed.shape == (2, 256 * bits // 32, 64)
        assert torch.equal(unpack_wna16(packed, bits, 100), q)
        # strip 1, word row 16 + 3 (block 1, r = 3), column 64 + 5: field j holds row 128*.. + j*16 + 3
        bk = 32 // bits * 16
        w = int(packed[1, 16 + 3, 5]) & 0xFFFFFFFF
        assert all((w >> (j * bits)) & (2 ** bits - 1) == int(q[bk + j * 16 + 3, 69]) for j in range(32 // bits))
        assert int(packed[1, :, 100 - 64:].abs().sum()) == 0  # padding columns
    with pytest.raises(ValueError, match="multiple of 128"):
        pack_wna16(torch.zeros(96, 8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="outside"):
        pack_wna16(torch.full((128, 8), 16, dtype=torch.uint8), 4)


CASES = [  # bits, group_size, sym, act_order
    (4, 128, True, False),
    (4, 128, False, False),
    (4, 32, False, False),
    (4, 64, True, True),
    (4, -1, False, False),
    (4, 128, False, True),
    (8, 128, True, False),
    (8, 32, False, True),
    (8, -1, True, False),
]


@pytest.mark.parametrize("bits,group_size,sym,act_order", CASES)
@pytest.mark.parametrize("m", [1, 3, 16, 40])
def test_apply_matches_dequantized_matmul(device, dtype, bits, group_size, sym, act_order, m):
    layer, kernel, dense, b = make_layer(device, dtype, 96, 256, bits, group_size, sym, act_order,
                                         bias=m == 3)
    for _ in range(2):  # fresh inputs each time: the kernel computes the function, not a value
        x = torch.randn(m, 256, dtype=dtype, device=device)
        out = kernel.apply(layer, x, b)
        assert out.shape == (m, 96) and out.dtype == dtype
        assert rel_err(out, reference(x, dense, b)) < tolerance(dtype)
    assert int(layer.w4a16_counters.abs().sum()) == 0, "split-K counters must be left at zero"


@pytest.mark.parametrize("bits,group_size,sym,act_order", [(4, 64, False, True), (8, 128, True, False)])
def test_large_m_dequantizes_to_cublas(device, dtype, bits, group_size, sym, act_order):
    layer, kernel, dense, b = make_layer(device, dtype, 64, 128, bits, group_size, sym, act_order, bias=True)
    x = torch.randn(2, DOT_MAX_M // 2 + 1, 128, dtype=dtype, device=device)  # 3-D input, M > table
    out = kernel.apply(layer, x, b)
    assert out.shape == (2, DOT_MAX_M // 2 + 1, 64)
    assert rel_err(out, reference(x, dense, b)) < tolerance(dtype)
    # the scratch weight itself, in the packed (permuted) row order
    w = wna16_dequantize(layer.w4a16_qweight, layer.w4a16_scales, layer.w4a16_zeros, bits, group_size,
                         torch.float32)
    perm = layer.w4a16_perm
    expect = dense.t() if perm is None else dense.t()[perm]
    torch.testing.assert_close(w, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bucket", BUCKETS, ids=lambda b: f"m{b[0]}")
@pytest.mark.parametrize("split_k", [1, 3])
def test_every_launch_config_with_poisoned_output(device, dtype, bucket, split_k):
    """Each bucket's tile shape, forced, with and without split-K, into a NaN-filled output."""
    max_m, use_dot, bm, bn, warps, stages, prefetch, _ = bucket
    if device == "cpu" and bm > 32:
        bm = 32  # the interpreter is slow on large tiles; the GPU runs the real ones
    n, k = 80, 384 if split_k == 3 else 128
    layer, _, dense, b = make_layer(device, dtype, n, k, 4, 128, False, False, bias=True)
    m = max(1, max_m - 1)
    x = torch.randn(m, k, dtype=dtype, device=device)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    cfg = GemmConfig(use_dot, bm, bn, split_k, warps, stages, prefetch)
    counters = torch.zeros(-(-m // bm) * -(-n // bn), dtype=torch.int32, device=device)
    for _ in range(2):  # the second launch relies on the first having reset the counters
        wna16_gemm(x, layer.w4a16_qweight, layer.w4a16_scales, layer.w4a16_zeros, b,
                   counters, 4, 128, cfg, out=out)
        assert rel_err(out, reference(x, dense, b)) < tolerance(dtype)
        assert int(counters.abs().sum()) == 0
        out.fill_(float("nan"))
        x = torch.randn(m, k, dtype=dtype, device=device)


@pytest.mark.parametrize("prefetch", [1, 2, 3])
@pytest.mark.parametrize("split_k", [1, 2])
def test_gemv_prefetch_depths(device, dtype, prefetch, split_k):
    """The register prefetch ring of the one-row GEMV, deeper than the blocks of a split too."""
    layer, _, dense, _ = make_layer(device, dtype, 72, 512, 4, 128, False, False)
    x = torch.randn(1, 512, dtype=dtype, device=device)
    out = torch.full((1, 72), float("nan"), dtype=dtype, device=device)
    cfg = GemmConfig(False, 1, 64, split_k, 2, 3, prefetch)
    wna16_gemm(x, layer.w4a16_qweight, layer.w4a16_scales, layer.w4a16_zeros, None,
               layer.w4a16_counters, 4, 128, cfg, out=out)
    assert rel_err(out, reference(x, dense, None)) < tolerance(dtype)


@pytest.mark.parametrize("m", [1, 16])
def test_group_not_a_multiple_of_the_block(device, dtype, m):
    """group 192 >= the 128-row block but not a multiple of it: scales change inside a block."""
    layer, kernel, dense, _ = make_layer(device, dtype, 64, 384, 4, 192, False, True)
    x = torch.randn(m, 384, dtype=dtype, device=device)
    assert rel_err(kernel.apply(layer, x, None), reference(x, dense, None)) < tolerance(dtype)


def test_select_config_buckets_and_split_k():
    # decode on a Llama-8B 4096x4096 layer: enough programs for 132 SMs through split-K
    cfg = select_config(1, 4096, 4096, 4, 132)
    assert cfg.use_dot and cfg.block_m == 16  # one row padded to a tensor-core tile (faster than the GEMV)
    programs = (4096 // cfg.block_n) * cfg.split_k
    assert programs >= 132 and cfg.split_k <= 4096 // 128
    assert select_config(16, 4096, 4096, 4, 132).use_dot
    assert select_config(DOT_MAX_M, 28672, 4096, 4, 132).split_k >= 1
    # the same bucket gives the same launch (no new compile for another M in it)
    assert select_config(17, 6144, 4096, 4, 132) == select_config(32, 6144, 4096, 4, 132)
    with pytest.raises(ValueError):
        select_config(DOT_MAX_M + 1, 4096, 4096, 4, 132)


@pytest.mark.parametrize("k,n,bits,gs,dt,why", [
    (200, 64, 4, 200, torch.bfloat16, "not a multiple of 128"),
    (96, 64, 8, 32, torch.bfloat16, "not a multiple of 64"),
    (256, 64, 4, 24, torch.bfloat16, "group_size 24"),
    (256, 64, 3, 128, torch.bfloat16, "3-bit"),
    (256, 64, 4, 128, torch.float32, "float32"),
])
def test_shapes_it_cannot_take_fall_back(k, n, bits, gs, dt, why):
    cfg = WNA16Config(bits=bits, group_size=gs, has_zero_points=False, act_order=False,
                      in_features=k, out_features=n, act_dtype=dt)
    assert why in TritonW4A16Kernel.can_implement(cfg, torch.device("cuda"))
    ok = WNA16Config(bits=4, group_size=128, has_zero_points=True, act_order=True,
                     in_features=256, out_features=n, act_dtype=torch.float16)
    assert TritonW4A16Kernel.can_implement(ok, torch.device("cpu")) is not None  # needs a GPU
    assert shape_unsupported_reason(ok) is None


@pytest.mark.parametrize("m", [1, 16, 64, 128, 200])
def test_cuda_graph_capture_and_replay(device, on_gpu, dtype, m):
    if not on_gpu:
        pytest.skip("CUDA graphs need a GPU")
    layer, kernel, dense, b = make_layer(device, dtype, 512, 1024, 4, 128, False, True, bias=True)
    static_x = torch.randn(m, 1024, dtype=dtype, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        kernel.apply(layer, static_x, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kernel.apply(layer, static_x, b)
    for _ in range(3):
        static_x.copy_(torch.randn(m, 1024, dtype=dtype, device=device))
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_out, reference(static_x, dense, b)) < tolerance(dtype)
    assert int(layer.w4a16_counters.abs().sum()) == 0


def _emulate_dequant4_asm(w0, w1, z, s, dtype):
    """``_dequant4_asm``'s PTX step by step in torch integer/float ops (CPU): 8 planes of pairs."""
    def u(t):  # the registers are unsigned 32-bit
        return t.to(torch.int64) & 0xFFFFFFFF
    a, b = u(w0), u(w1)
    lo = (a & 0xFFFF) | ((b & 0xFFFF) << 16)                    # prmt 0x5410
    hi = (a >> 16) | (b & 0xFFFF0000)                           # prmt 0x7632
    magic = 0x43004300 if dtype == torch.bfloat16 else 0x64006400
    e = magic_bias(dtype)
    nzb = (-(z.float() + e)).to(dtype).float()                  # exact: a small integer
    planes = []
    for j in range(8):
        reg = (((lo if j < 4 else hi) >> (4 * (j % 4))) & 0x000F000F) | magic  # shr + lop3 0xEA
        halves = torch.stack([reg & 0xFFFF, reg >> 16], dim=-1).to(torch.int16)  # (elem 0, elem 1)
        v = halves.view(dtype).float()                          # E + q, exactly
        v = (v + nzb[..., None]).to(dtype).float()              # fma(v, 1, -(E + z))
        planes.append((v * s.float()[..., None]).to(dtype))     # fma(v, s, -0): one rounding
    return planes


@pytest.mark.parametrize("dtype_", [torch.bfloat16, torch.float16])
def test_magic_number_dequant_arithmetic_cpu(dtype_):
    """The magic-number trick of the PTX dequantization, emulated bit by bit on the CPU, equals
    ``((q - z) * s)`` rounded once to the activation dtype, for every q and z of 4 bits."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(0, 16, (2, 512, 8), generator=gen)          # word, sample, field
    q[:, :16, :] = torch.arange(16).view(1, 16, 1)                # every value in every field
    words = [(q[i] << (4 * torch.arange(8))).sum(-1) for i in range(2)]
    words = [torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32) for w in words]
    z = torch.randint(0, 16, (512, 2), generator=gen)
    z[:16, :] = torch.arange(16).view(16, 1)
    s = (torch.rand(512, 2, generator=gen) * 0.05 + 1e-3).to(dtype_)
    # elem e of the pair takes word e with its own zero point and scale: pack z/s pairs like the asm
    planes = [torch.stack(p) for p in zip(*[_emulate_dequant4_asm(words[0], words[1], z[:, e], s[:, e], dtype_)
                                            for e in range(2)])]
    for j in range(8):
        for e in range(2):
            expect = ((q[e, :, j] - z[:, e]).float() * s[:, e].float()).to(dtype_)
            assert torch.equal(planes[j][e, :, e], expect), (j, e)


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 40])
def test_ptx_dequant_matches_twin(device, on_gpu, act, m):
    """On the GPU the inline-PTX dequantization (4-bit) against the pure-Triton twin and the
    reference, bf16 and fp16; on the CPU the twin alone (and the PTX refused)."""
    if device == "cpu" and act == torch.bfloat16:
        pytest.skip("the interpreter has no bfloat16 arithmetic")
    layer, _, dense, b = make_layer(device, act, 136, 384, 4, 128, False, False, bias=True)
    x = torch.randn(m, 384, dtype=act, device=device)
    bm = 16 if m <= 16 else 32
    cfg = GemmConfig(True, bm, 64, 3, 4, 3, 1)
    counters = torch.zeros(-(-m // bm) * -(-136 // 64), dtype=torch.int32, device=device)
    outs = []
    for asm in ((False, True) if on_gpu else (False,)):
        out = torch.full((m, 136), float("nan"), dtype=act, device=device)
        wna16_gemm(x, layer.w4a16_qweight, layer.w4a16_scales, layer.w4a16_zeros, b, counters, 4, 128,
                   cfg, out=out, asm=asm)
        assert rel_err(out, reference(x, dense, b)) < tolerance(act)
        assert int(counters.abs().sum()) == 0
        outs.append(out)
    if on_gpu:  # the same 16-bit weight tiles in the same dots: the same sums up to accumulation order
        assert rel_err(outs[1], outs[0].float()) < 2e-3
    else:
        with pytest.raises(ValueError, match="inline-PTX"):
            wna16_gemm(x, layer.w4a16_qweight, layer.w4a16_scales, layer.w4a16_zeros, b, counters, 4, 128,
                       cfg, asm=True)


def test_prefill_scratch_is_shared_across_layers(device, dtype):
    """Every layer's dequantize-to-cuBLAS path writes into one scratch per device and dtype."""
    from genserve_cuda.quant.triton_w4a16 import SCRATCH

    big = make_layer(device, dtype, 192, 256, 4, 128, True, False)
    small = make_layer(device, dtype, 64, 128, 4, 128, False, True)
    x_big = torch.randn(DOT_MAX_M + 1, 256, dtype=dtype, device=device)
    x_small = torch.randn(DOT_MAX_M + 1, 128, dtype=dtype, device=device)
    used = []
    for (layer, kernel, dense, b), x in ((small, x_small), (big, x_big), (small, x_small)):
        assert rel_err(kernel.apply(layer, x, b), reference(x, dense, b)) < tolerance(dtype)
        used.append(SCRATCH.buffers[(x.device, dtype)])
    assert used[0].numel() >= 192 * 256  # sized at the first call for the largest layer announced
    assert all(u is used[0] for u in used), "one buffer, not one per layer or call"
    with pytest.raises(ValueError, match="scratch"):
        wna16_dequantize(small[0].w4a16_qweight, small[0].w4a16_scales, small[0].w4a16_zeros, 4, 128, dtype,
                         out=torch.empty(10, dtype=dtype, device=device))


def test_inline_ptx_only_on_nvidia(monkeypatch):
    """ROCm's torch reports ``is_cuda`` too; AMD GPUs take no PTX, so the pure-Triton
    dequantization must run there (the kernel is in ROCm's preference, inherited from CUDA)."""

    class FakeGpuTensor:
        is_cuda = True

    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert ptx_available(FakeGpuTensor())
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    assert not ptx_available(FakeGpuTensor())
    assert not ptx_available(torch.zeros(1))  # CPU (the interpreter)
