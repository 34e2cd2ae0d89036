"""CUDA graphs for decode steps.

``DecodeGraphs`` captures one graph per batch size in ``sizes`` (largest first, sharing one
memory pool) over static input buffers, and replays the smallest one that fits a decode-only
batch, padding the rest: padded rows have slot -1 (no KV write) and seq_len 0 (zero output).
Block tables have a fixed width, enough for ``max_seqlen_k`` tokens, so one graph serves
every context length up to it. ``CudaModelRunner`` plugs this into the engine's runner.

With LoRA adapters each size has a second graph captured with adapters on: the per-row slot
index is one more static input (padded rows -1: no adapter), and the adapters' slot tensors
have fixed addresses, so a step whose adapters were just copied into their slots replays the
same graph. Steps without adapter rows replay the graph without LoRA work.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch
from genserve.attention.base import AttentionMetadata
from genserve.engine.model_runner import ModelRunner
from genserve.lora.manager import LoRAManager
from genserve.lora.runtime import LoRABatch
from genserve.models.base import CausalLM, ForwardBatch
from torch import nn

from genserve_cuda.layer_ops import CudaLayerOps

logger = logging.getLogger(__name__)


def graph_blocker(model: CausalLM, lora: LoRAManager | None = None) -> str | None:
    """Why this model's decode step can't be captured, or None."""
    from genserve.layers.attention import Attention

    if lora is not None and not lora.method.graph_safe:
        return f"LoRA method {lora.method.name!r} is not graph-safe"
    if model.is_encoder_decoder:
        return "encoder-decoder models take per-request encoder state that a graph can't hold"
    impls = {type(m.impl) for m in model.modules() if isinstance(m, Attention)}
    unsafe = sorted(c.name for c in impls if not c.graph_safe)
    if unsafe:
        return f"attention {unsafe} syncs with the host (only graph-safe kernels can be captured)"
    return None


class DecodeGraphs:
    def __init__(self, model: nn.Module, sizes: tuple[int, ...], block_size: int, max_seqlen_k: int,
                 device: torch.device, lora: LoRAManager | None = None):
        self.model, self.device, self.lora = model, device, lora
        self.sizes = sorted(set(sizes))
        self.max_seqlen_k = max_seqlen_k
        self.max_blocks = -(-max_seqlen_k // block_size)
        n = self.sizes[-1]

        def buf(*shape, dtype):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids = buf(n, dtype=torch.long)
        self.positions = buf(n, dtype=torch.long)
        self.slot_mapping = buf(n, dtype=torch.long)
        self.seq_lens = buf(n, dtype=torch.int32)
        self.block_tables = buf(n, self.max_blocks, dtype=torch.int32)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)  # one row each
        self.lora_index = torch.full((n,), -1, dtype=torch.long, device=device)  # slot per row
        # batch size -> the graph and its output; ``lora_graphs`` the same captured with adapters
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lora_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self._kv_key: tuple[int, ...] | None = None

    # -- which batches --------------------------------------------------------------------
    def can_run(self, input_ids: torch.Tensor, batch: ForwardBatch) -> bool:
        m = batch.attn
        # A one-token step can still be an image token (a prompt that ends with an image, its
        # other blocks cached): the graphs were captured without image rows.
        return (m.is_decode_only and batch.images is None and 0 < input_ids.shape[0] <= self.sizes[-1]
                and m.max_seqlen_k <= self.max_seqlen_k and m.block_tables.shape[1] <= self.max_blocks)

    def size_for(self, n: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
            max_seqlen_q=1, max_seqlen_k=self.max_seqlen_k, is_decode_only=True,
        )

    def _pad(self, start: int, end: int) -> None:
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.slot_mapping[start:end] = -1
        self.seq_lens[start:end] = 0
        self.lora_index[start:end] = -1

    # -- capture --------------------------------------------------------------------------
    def _check_kv(self, kv_caches: list[torch.Tensor]) -> None:
        key = tuple(t.data_ptr() for t in kv_caches)
        if key != self._kv_key:  # graphs bake in the cache addresses
            self.graphs.clear()
            self.lora_graphs.clear()
            self.pool = None
            self._kv_key = key

    @property
    def variants(self) -> tuple[bool, ...]:
        """Which graphs each size gets: without LoRA, and with it when adapters are served."""
        return (False, True) if self.lora is not None else (False,)

    @torch.inference_mode()
    def capture(self, kv_caches: list[torch.Tensor], sizes: list[int] | None = None,
                variants: tuple[bool, ...] | None = None) -> None:
        self._check_kv(kv_caches)
        for bs in sorted(sizes or self.sizes, reverse=True):  # largest first: smaller reuse its pool
            for with_lora in variants or self.variants:
                if bs not in self._table(with_lora):
                    self._capture_one(bs, kv_caches, with_lora)

    def _table(self, with_lora: bool) -> dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
        return self.lora_graphs if with_lora else self.graphs

    def _forward(self, ids, pos, batch: ForwardBatch, with_lora: bool) -> torch.Tensor:
        if not with_lora:
            return self.model(ids, pos, batch)
        assert self.lora is not None
        # A fresh LoRABatch per forward: its per-step metadata (``LoRAMethod.prepare``) is then
        # computed inside the capture, from the static index.
        with self.lora.active(LoRABatch(self.lora_index[: ids.shape[0]], None)):
            return self.model(ids, pos, batch)

    def _capture_one(self, bs: int, kv_caches: list[torch.Tensor], with_lora: bool) -> None:
        self._pad(0, bs)
        ids, pos = self.input_ids[:bs], self.positions[:bs]
        batch = ForwardBatch(self._meta(bs), kv_caches)
        # Warm up on a side stream: Triton compiles and loads kernels on their first launch,
        # which a capture can't contain.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(ids, pos, batch, with_lora)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(ids, pos, batch, with_lora)
        self.pool = graph.pool()
        self._table(with_lora)[bs] = (graph, out)
        logger.debug("captured decode graph for batch size %d%s", bs, " with LoRA" if with_lora else "")

    # -- replay ---------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states of the real rows; valid until the next replay overwrites them."""
        n = input_ids.shape[0]
        bs = self.size_for(n)
        with_lora = batch.lora is not None
        if with_lora and self.lora is None:
            raise RuntimeError("a step with LoRA rows reached decode graphs built without adapters")
        self._check_kv(batch.kv_caches)
        if bs not in self._table(with_lora):
            self.capture(batch.kv_caches, [bs], (with_lora,))
        m = batch.attn
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(m.slot_mapping)
        self.seq_lens[:n].copy_(m.seq_lens)
        self.block_tables[:n, : m.block_tables.shape[1]].copy_(m.block_tables)
        if with_lora:
            assert self.lora is not None
            self.lora.load_slots(batch.lora)  # host -> slot copies, queued before the replay
            self.lora_index[:n].copy_(batch.lora.index)
        self._pad(n, bs)
        graph, out = self._table(with_lora)[bs]
        graph.replay()
        return out[:n]


class CudaModelRunner(ModelRunner):
    """The engine's runner, replaying CUDA graphs for decode-only batches.

    The graphs are sized when first needed (``warmup`` or the first decode step) for
    ``config.max_total_tokens``.
    """

    overlap_steps = True  # kernel launches are asynchronous: build step N+1 while N runs
    lazy_kernels = True  # Triton compiles on first use: warm every step kind up (engine/warmup.py)

    def __init__(self, model, config, backend, *, lora=None, peers=None):
        super().__init__(model, config, backend, lora=lora, peers=peers)
        self.graphs: DecodeGraphs | None = None
        self.graph_sizes = backend.graph_sizes()
        self.graphs_off = graph_blocker(model, lora) if self.graph_sizes else "disabled by --cuda-graphs"
        if self.graphs_off:
            logger.info("cuda graphs off: %s", self.graphs_off)

    def _decode_graphs(self) -> DecodeGraphs | None:
        if self.graphs is None and not self.graphs_off:
            max_len = self.config.max_total_tokens
            self.graphs = DecodeGraphs(self.model, self.graph_sizes, self.block_size, max_len, self.device,
                                       self.lora)
            logger.info("cuda graphs: decode batch sizes %s, contexts up to %d tokens",
                        list(self.graph_sizes), max_len)
        return self.graphs

    def warmup(self) -> None:
        """Choose the one-row GEMV kernels, then capture every batch size now (after
        ``allocate_kv_cache``), not on first use."""
        ops = self.model.ctx.layer_ops
        dispatch = ops.gemv if isinstance(ops, CudaLayerOps) else None
        if dispatch is not None and dispatch.weights:
            t0 = time.perf_counter()
            dispatch.tune()
            logger.info("tuned %d one-row GEMV shapes in %.1f s", len(dispatch.choice), time.perf_counter() - t0)
        graphs = self._decode_graphs()
        if graphs is not None and self.kv_caches:
            t0 = time.perf_counter()
            graphs.capture(self.kv_caches)
            logger.info("captured %d decode graphs in %.1f s", len(graphs.graphs) + len(graphs.lora_graphs),
                        time.perf_counter() - t0)

    def execute(self, input_ids, positions, batch: ForwardBatch) -> torch.Tensor:
        graphs = self._decode_graphs()
        if graphs is not None and graphs.can_run(input_ids, batch):
            return graphs.run(input_ids, positions, batch)
        return super().execute(input_ids, positions, batch)
