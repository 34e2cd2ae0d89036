"""Pick cuBLAS or the Triton GEMV for each one-row linear shape, by measuring both.

``GemvDispatch.linear`` is what the CUDA backend's unquantized linear layers and LM head call
(``layer_ops.py``); they register with it as they are built. Until ``tune`` has run (the CUDA
runner's warm-up, before graph capture) every call goes to cuBLAS. ``tune`` times each
candidate over all weights of a shape (so the weights stream from HBM as in a real step,
not from L2), inside a CUDA graph (so launch overhead doesn't hide kernel time), and keeps a
Triton config only where it is clearly faster.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

Key = tuple[int, int, torch.dtype]
MIN_GAIN = 0.97  # keep Triton only when it takes < 97% of cuBLAS's time


def shape_key(weight: torch.Tensor) -> Key:
    return weight.shape[0], weight.shape[1], weight.dtype


class GemvDispatch:
    # The kernel module imports triton, so it is imported only where a chosen kernel runs or is
    # timed: the dispatch itself works (all cuBLAS) where triton is missing.

    def __init__(self) -> None:
        self.choice: dict[Key, object | None] = {}  # a GemvConfig, or None for cuBLAS
        self.layers: list[nn.Module] = []
        self.report: list[dict] = []

    def register(self, layer: nn.Module) -> None:
        """A layer (with ``weight`` [N, K] and ``bias``) whose one-row calls may go to the
        Triton kernel. Its tensors are read when tuning, after loading (and tying) them."""
        self.layers.append(layer)

    @property
    def weights(self) -> dict[Key, list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """The registered layers' current weights the kernel takes (fp16/bf16, contiguous
        rows), by shape."""
        out: dict[Key, list[tuple[torch.Tensor, torch.Tensor | None]]] = defaultdict(list)
        for layer in self.layers:
            weight, bias = layer.weight, layer.bias
            if weight.dim() == 2 and weight.stride(1) == 1 and weight.dtype in (torch.float16, torch.bfloat16):
                out[shape_key(weight)].append((weight, bias))
        return out

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype:
            cfg = self.choice.get(shape_key(weight))
            if cfg is not None:
                from genserve_cuda.kernels.gemv import gemv

                return gemv(x, weight, bias, cfg)
        return F.linear(x, weight, bias)

    @torch.inference_mode()
    def tune(self, max_weights: int = 32) -> list[dict]:
        from genserve_cuda.kernels.gemv import CANDIDATES, gemv

        for key, items in self.weights.items():
            if key in self.choice:
                continue
            n, k, dtype = key
            items = items[:max_weights]
            x = torch.randn(1, k, dtype=dtype, device=items[0][0].device)
            times = {None: _graph_time([lambda w=w, b=b: F.linear(x, w, b) for w, b in items])}
            for cfg in CANDIDATES:
                times[cfg] = _graph_time([lambda w=w, b=b, c=cfg: gemv(x, w, b, c) for w, b in items])
            best = min(CANDIDATES, key=lambda c: times[c])
            chosen = best if times[best] < MIN_GAIN * times[None] else None
            self.choice[key] = chosen
            gbs = n * k * torch.empty((), dtype=dtype).element_size() / 1e9
            row = {"shape": f"{n}x{k}", "cublas_us": round(times[None] * 1e6, 2),
                   "triton_us": round(times[best] * 1e6, 2), "triton_config": str(best),
                   "chosen": "triton" if chosen else "cublas",
                   "cublas_tb_s": round(gbs / times[None] / 1e3, 2),
                   "triton_tb_s": round(gbs / times[best] / 1e3, 2)}
            self.report.append(row)
            logger.info("gemv %s: cuBLAS %.1f us, Triton %.1f us (%s) -> %s", row["shape"],
                        row["cublas_us"], row["triton_us"], best, row["chosen"])
        return self.report


def _graph_time(calls, replays: int = 5) -> float:
    """Device seconds per call, the calls replayed as one CUDA graph."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / 1e3 / replays / len(calls)
