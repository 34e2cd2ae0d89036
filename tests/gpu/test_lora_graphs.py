"""Decode steps with LoRA adapters replayed from CUDA graphs (Triton SGMV method, slots loaded
between replays, evictions included) equal eager steps through the torch reference method."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("CUDA graphs need a CUDA device", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
from genserve.backends.options import BackendOptions
from genserve.engine.config import EngineConfig
from genserve.engine.model_runner import ModelRunner
from genserve.layers.linear import LinearBase
from genserve.layers.lora import TorchLoRA
from genserve.lora.manager import HostAdapter, LoRAManager
from genserve.models.base import ForwardBatch
from genserve_cuda.attention.triton_paged import TritonPagedAttention
from genserve_cuda.backend import CudaBackend
from genserve_cuda.lora import TritonSGMVLoRA
from test_cuda_graphs import (
    BLOCK,
    BLOCKS_PER_SEQ,
    DEV,
    rel_err,
    step_inputs,
    tiny_llama,
)

SEQS = (90, 33, 150, 5, 64)


def random_adapter(manager: LoRAManager, name: str, rank: int, seed: int) -> HostAdapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for layer_name, lora in manager.layers.items():
        r = min(rank * 2, lora.a.shape[1])  # a fused layer's stacked ranks
        k, n = lora.a.shape[2], lora.b.shape[1]
        layers[layer_name] = ((torch.randn(r, k, generator=g) / k ** 0.5).to(torch.bfloat16),
                              (0.5 * torch.randn(n, r, generator=g) / r ** 0.5).to(torch.bfloat16))
    return HostAdapter(name, -1, Path("/dev/null"), rank, layers)


@pytest.fixture(scope="module")
def runner():
    config = EngineConfig(dtype=torch.bfloat16, block_size=BLOCK, max_total_tokens=BLOCKS_PER_SEQ * BLOCK)
    backend = CudaBackend(BackendOptions(graph_sizes="1,2,4,8"))
    model = tiny_llama(TritonPagedAttention, backend=backend)
    layers = [n for n, m in model.named_modules() if isinstance(m, LinearBase)]
    manager = LoRAManager(model, TritonSGMVLoRA(), DEV, torch.bfloat16, max_loras=3, max_lora_rank=8,
                          layer_names=layers)
    for i, name in enumerate("abcd"):
        manager.register(random_adapter(manager, name, rank=(8, 4, 2, 8)[i], seed=i))
    runner = backend.create_model_runner(model, config, lora=manager)
    runner.allocate_kv_cache(num_blocks=8 * BLOCKS_PER_SEQ)
    return runner


def set_method(manager, method):
    for lora in manager.layers.values():
        lora.method = method


@torch.inference_mode()
def test_lora_decode_graphs_match_eager_torch_method(runner):
    manager = runner.lora
    assert not runner.graphs_off
    ids, pos, meta = step_inputs([(s, s) for s in SEQS], seed=4)
    prefill = manager.batch_for(["a", None, "b", "c", "a"], [s for s in SEQS])
    runner.execute(ids, pos, ForwardBatch(meta, runner.kv_caches, lora=prefill))  # eager
    runner.warmup()
    assert sorted(runner.graphs.graphs) == [1, 2, 4, 8] and sorted(runner.graphs.lora_graphs) == [1, 2, 4, 8]
    steps = [  # adapters of the decode rows; "d" evicts the least recently used slot
        ["a", None, "b", "c", "a"], ["d", "a", None], ["b"], [None, None, None, None, None],
        ["c", "d", "c", None, "b"], ["a", "a"],
    ]
    torch_method, sgmv = TorchLoRA(), manager.method
    for i, adapters in enumerate(steps):
        n = len(adapters)
        seqs = [(s + 1 + i, 1) for s in SEQS[:n]]
        ids, pos, meta = step_inputs(seqs, seed=10 + i)
        before = [c.clone() for c in runner.kv_caches]
        set_method(manager, torch_method)
        ref = ModelRunner.execute(runner, ids, pos, ForwardBatch(
            meta, runner.kv_caches, lora=manager.batch_for(adapters, [1] * n))).clone()
        base = ModelRunner.execute(runner, ids, pos, ForwardBatch(meta, runner.kv_caches)).clone()
        for c, b in zip(runner.kv_caches, before):
            c.copy_(b)
        set_method(manager, sgmv)
        graphed = runner.execute(ids, pos, ForwardBatch(meta, runner.kv_caches,
                                                        lora=manager.batch_for(adapters, [1] * n)))
        assert rel_err(graphed, ref) < 2e-2, (adapters, rel_err(graphed, ref))
        for row, aid in enumerate(adapters):  # adapter rows really changed, the others did not
            err = rel_err(ref[row], base[row])
            assert (err > 5e-2) if aid else (err < 1e-2), (adapters, row, err)
    assert manager.table.loads > 4  # evicted and reloaded between replays


@torch.inference_mode()
def test_lora_graphs_are_skipped_for_methods_that_are_not_graph_safe(runner):
    class Eager(TorchLoRA):
        graph_safe = False

    from genserve_cuda.graphs import graph_blocker

    manager = runner.lora
    saved = manager.method
    manager.method = Eager()
    try:
        assert "not graph-safe" in graph_blocker(runner.model, manager)
    finally:
        manager.method = saved
