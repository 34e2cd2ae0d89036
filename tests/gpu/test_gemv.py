"""The one-row GEMV kernel against F.linear, and the dispatch that picks it per shape."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from genserve.layers.custom_op import use_layer_ops  # noqa: E402
from genserve.layers.embedding import ParallelLMHead  # noqa: E402
from genserve.layers.linear import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from genserve_cuda.gemv_tuning import GemvDispatch  # noqa: E402
from genserve_cuda.kernels.gemv import CANDIDATES, gemv  # noqa: E402
from genserve_cuda.layer_ops import CudaLayerOps  # noqa: E402


@pytest.fixture
def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float16


@pytest.mark.parametrize("cfg", CANDIDATES, ids=str)
@pytest.mark.parametrize("n,k,bias", [(64, 512, False), (37, 300, True), (256, 1024, True)])
def test_gemv_matches_linear(device, dtype, cfg, n, k, bias):
    torch.manual_seed(0)
    w = torch.randn(n, k, dtype=dtype, device=device) / k ** 0.5
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    x = torch.randn(1, k, dtype=dtype, device=device)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    out = gemv(x, w, b, cfg)
    assert out.shape == (1, n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_dispatch_routes_one_row_inputs_only(device, dtype):
    w = torch.randn(64, 512, dtype=dtype, device=device)
    d = GemvDispatch()
    d.register(torch.nn.Linear(512, 64, bias=False, device=device, dtype=dtype))
    assert list(d.weights) == [(64, 512, dtype)]
    d.choice[(64, 512, dtype)] = CANDIDATES[0]  # as if tuning had picked Triton
    x1, x3 = torch.randn(1, 512, dtype=dtype, device=device), torch.randn(3, 512, dtype=dtype, device=device)
    torch.testing.assert_close(d.linear(x1, w, None).float(), F.linear(x1, w).float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(d.linear(x3, w, None), F.linear(x3, w))  # cuBLAS path, bit-equal


def test_layer_ops_route_linears_and_lm_head(device, dtype, on_gpu):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = ColumnParallelLinear(128, 256, bias=True, dtype=dtype)
            self.down = RowParallelLinear(256, 128, bias=False, dtype=dtype)
            self.head = ParallelLMHead(300, 128, dtype=dtype)

        def forward(self, x):
            return self.head(self.down(self.up(x)))

    torch.manual_seed(0)
    ref_model = Tiny().to(device)
    for p in ref_model.parameters():
        p.data.normal_(0, 0.05)
    ops = CudaLayerOps()
    with use_layer_ops(ops):
        model = Tiny().to(device)
    model.load_state_dict(ref_model.state_dict())
    x = torch.randn(1, 128, dtype=dtype, device=device)
    ref = ref_model(x).float()
    dispatch = ops.gemv
    assert len(dispatch.layers) == 3 and len(dispatch.weights) == 3
    for key in dispatch.weights:  # force the Triton kernel everywhere
        dispatch.choice[key] = CANDIDATES[1]
    torch.testing.assert_close(model(x).float(), ref, rtol=2e-2, atol=2e-2)
    if on_gpu:  # the real tuner: it measures, picks, and the result still matches
        dispatch.choice.clear()
        report = dispatch.tune()
        assert len(report) == 3 and all(r["chosen"] in ("triton", "cublas") for r in report)
        torch.testing.assert_close(model(x).float(), ref, rtol=2e-2, atol=2e-2)
