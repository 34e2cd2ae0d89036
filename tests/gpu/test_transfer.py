"""Pinned staging ring: reused buffers never hand a copy someone else's bytes."""

import pytest
import torch

from genserve import device as transfer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and events need CUDA")


def test_uploads_of_growing_sizes_arrive_intact():
    ring = transfer.PinnedRing(torch.device("cuda"))
    sent, got = [], []
    for i in range(3 * transfer.SLOTS):
        t = torch.arange(i * 50_000 + 1, dtype=torch.int64) * (i + 1)  # grows past MIN_BYTES
        sent.append(t)
        got.append(ring.upload(t))
    torch.cuda.synchronize()
    for s, g in zip(sent, got):
        assert torch.equal(g.cpu(), s)


def test_unread_downloads_keep_their_buffers():
    ring = transfer.PinnedRing(torch.device("cuda"))
    pending = []
    for i in range(2 * transfer.SLOTS + 3):  # more unread downloads than slots
        pending.append((i, *ring.download(torch.full((1000,), i, device="cuda"))))
    torch.cuda.synchronize()
    for i, host, handle in pending:
        assert bool((host == i).all()), f"download {i} was overwritten before it was read"
        transfer.release(handle)
    host, handle = ring.download(torch.full((10,), 7, device="cuda"))
    torch.cuda.synchronize()
    assert host.tolist() == [7] * 10
