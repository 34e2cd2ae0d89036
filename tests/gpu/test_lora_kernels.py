"""The Triton SGMV LoRA method equals the torch reference method (``TorchLoRA``) on batches
whose rows use different slots (or none), with ranks zero-padded in the slots. Runs on a GPU,
or on the CPU under TRITON_INTERPRET=1 (tiny shapes)."""

import pytest
import torch

pytest.importorskip("triton")

from genserve.layers.lora import TorchLoRA
from genserve_cuda.kernels.lora import sort_rows
from genserve_cuda.lora import TritonSGMVLoRA


def slots(S, R, K, N, ranks, dtype, device, seed=0):
    """Slot tensors as the LoRAManager fills them: slot s holds a rank ranks[s] adapter, zero
    past it (a rank-0 slot is empty)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(S, R, K)
    b = torch.zeros(S, N, R)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, K, generator=g) / K ** 0.5
        b[s, :, :r] = torch.randn(N, r, generator=g)
    return a.to(device, dtype), b.to(device, dtype)


CASES = [  # (rows' slots, slot ranks)
    ([0], [4, 2, 8]),
    ([-1, -1, -1], [4, 2, 8]),  # no row with an adapter: y unchanged
    ([2, -1, 0, 0, 1, 2, 2, -1, 1], [4, 2, 8]),
    ([1] * 20 + [0] * 3 + [-1] * 5 + [2] * 17, [8, 1, 5]),  # several 16-row tiles of one slot
    ([3, 0, 3, -1], [0, 8, 8, 3]),  # an empty slot, slots not all used
]


@pytest.mark.parametrize("rows, ranks", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [48, 600], ids=["k48", "k600-split"])
def test_sgmv_matches_torch_method(device, rows, ranks, dtype, K):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the interpreter checks float32 (bfloat16 on the GPU)")
    # K, N not multiples of the blocks: masks are exercised; K=600 is split over 3 programs.
    N, R = 80, 8
    S = len(ranks)
    a, b = slots(S, R, K, N, ranks, dtype, device)
    g = torch.Generator().manual_seed(1)
    T = len(rows)
    x = torch.randn(T, K, generator=g).to(device, dtype)
    y = torch.randn(T, N, generator=g).to(device, dtype)
    scales = torch.tensor([1.0, 0.5, 2.0, 1.5][:S], dtype=dtype, device=device)
    index = torch.tensor(rows, dtype=torch.long, device=device)
    want = TorchLoRA().apply(y.clone(), x, a, b, scales, index)
    method = TritonSGMVLoRA()
    got = method.apply(y.clone(), x, a, b, scales, index, method.prepare(index, S))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (got - want).abs().max()
    none = index < 0
    assert torch.equal(got[none], y[none])  # rows without an adapter are untouched
    if (~none).any():
        assert (got[~none] - y[~none]).abs().max() > 0.1  # the delta is really there


def test_sort_rows(device):
    index = torch.tensor([2, -1, 0, 2, -1, 2], device=device)
    rows = sort_rows(index, 4)
    assert rows.counts.tolist() == [1, 0, 3, 0]
    assert rows.starts.tolist() == [2, 3, 3, 6]
    assert rows.order.tolist() == [1, 4, 2, 0, 3, 5]
    # Tiles: one for slot 0, one for slot 2; the table's other entries (-1) are unused.
    assert rows.tile_slot.tolist() == [0, 2, -1, -1, -1]
    assert rows.tile_m0.tolist()[:2] == [0, 0]
    many = sort_rows(torch.tensor([1] * 20 + [-1] * 3 + [0] * 40, device=device), 3)
    assert many.tile_slot.tolist() == [0, 0, 0, 1, 1, -1, -1]  # 40 rows: 3 tiles, 20: 2
    assert many.tile_m0.tolist()[:5] == [0, 16, 32, 0, 16]


def test_sort_rows_is_a_stable_sort(device):
    g = torch.Generator().manual_seed(3)
    for T, S in ((1, 1), (7, 3), (300, 64), (0, 4)):
        index = torch.randint(-1, S, (T,), generator=g).to(device)
        rows = sort_rows(index, S)
        assert torch.equal(rows.order.long(), torch.sort(index, stable=True).indices)
        assert rows.counts.tolist() == [int((index == s).sum()) for s in range(S)]
