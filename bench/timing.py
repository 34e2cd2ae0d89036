"""Timing helpers shared by the GPU kernel benches (``gpu_kernels.py``, ``gpu_w4a16.py``, ``gpu_fp8.py``)."""

from __future__ import annotations

import torch


def median_ms(fn, rep: int = 200) -> float:
    """Median ms of ``fn`` launched from Python (``triton.testing.do_bench``: includes host launch
    overhead where it dominates)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def graph_ms(fn, rep: int = 200) -> float:
    """Median ms of one replay of ``fn``'s kernels captured as a CUDA graph: device time, no
    launch gaps. ``fn`` runs twice on a side stream first (compiles and warms outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, rep=rep)
