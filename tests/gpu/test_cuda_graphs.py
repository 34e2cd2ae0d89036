"""CudaModelRunner on a tiny random Llama: fused kernels and decode graphs vs eager PyTorch."""

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("CUDA graphs need a CUDA device", allow_module_level=True)

from transformers import LlamaConfig  # noqa: E402

from genserve.attention.base import AttentionMetadata  # noqa: E402
from genserve.attention.torch_ref import TorchReferenceAttention  # noqa: E402
from genserve.backends.options import BackendOptions  # noqa: E402
from genserve.engine.config import EngineConfig  # noqa: E402
from genserve.engine.model_runner import ModelRunner  # noqa: E402
from genserve.models.base import ForwardBatch, ModelContext, build_model  # noqa: E402
from genserve.models.llama import LlamaForCausalLM  # noqa: E402
from genserve_cuda.attention.triton_paged import TritonPagedAttention  # noqa: E402
from genserve_cuda.backend import CudaBackend  # noqa: E402
from genserve_cuda.graphs import CudaModelRunner  # noqa: E402

BLOCK, BLOCKS_PER_SEQ = 16, 16  # sequence i owns blocks [i*16, (i+1)*16): up to 256 tokens
DEV = torch.device("cuda")


def tiny_llama(attention_cls, seed=0, backend=None):
    """The model as engine/build.py builds it: layers bind ``backend``'s implementations (the
    PyTorch reference without one)."""
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(seed)
    ctx = ModelContext(dtype=torch.bfloat16, device=DEV, attention_cls=attention_cls)
    if backend is not None:
        ctx.layer_ops = backend.layer_ops()
    model = build_model(LlamaForCausalLM, cfg, ctx)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) + 0.1 * torch.randn_like(p) if "norm" in name
                    else 0.05 * torch.randn_like(p))
    return model


def step_inputs(seqs, vocab=512, seed=0):
    """Flat inputs for sequences i with (seq_len, q_len), each in its own run of blocks."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, slots, cu = [], [], [], [0]
    for i, (seq_len, q_len) in enumerate(seqs):
        for p in range(seq_len - q_len, seq_len):
            ids.append(int(torch.randint(vocab, (1,), generator=g)))
            pos.append(p)
            slots.append(i * BLOCKS_PER_SEQ * BLOCK + p)
        cu.append(cu[-1] + q_len)
    width = max(-(-s // BLOCK) for s, _ in seqs)
    tables = [[i * BLOCKS_PER_SEQ + b for b in range(width)] for i in range(len(seqs))]
    t = lambda v, dt: torch.tensor(v, dtype=dt, device=DEV)  # noqa: E731
    meta = AttentionMetadata(
        cu_seqlens_q=t(cu, torch.int32), seq_lens=t([s for s, _ in seqs], torch.int32),
        block_tables=t(tables, torch.int32), slot_mapping=t(slots, torch.long),
        max_seqlen_q=max(q for _, q in seqs), max_seqlen_k=max(s for s, _ in seqs),
        is_decode_only=all(q == 1 for _, q in seqs),
        seq_lens_cpu=[s for s, _ in seqs], query_lens_cpu=[q for _, q in seqs])
    return t(ids, torch.long), t(pos, torch.long), meta


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_runner(sizes=(1, 2, 4, 8)):
    config = EngineConfig(dtype=torch.bfloat16, block_size=BLOCK, max_total_tokens=BLOCKS_PER_SEQ * BLOCK)
    backend = CudaBackend(BackendOptions(graph_sizes=",".join(map(str, sizes)) or "0"))
    model = tiny_llama(TritonPagedAttention, backend=backend)
    runner = backend.create_model_runner(model, config)
    runner.allocate_kv_cache(num_blocks=8 * BLOCKS_PER_SEQ)
    return runner


@torch.inference_mode()
def test_fused_triton_model_matches_reference_model():
    """Prefill then decode through the CUDA runner's model (fused + Triton) vs the reference."""
    runner = make_runner(sizes=())
    assert isinstance(runner, CudaModelRunner) and runner.graphs_off
    ref_model = tiny_llama(TorchReferenceAttention)
    ref_caches = [torch.zeros_like(c) for c in runner.kv_caches]
    for seqs, seed in (([(40, 40), (100, 100), (7, 7)], 1), ([(60, 20), (101, 1), (8, 1)], 2),
                       ([(61, 1), (102, 1), (9, 1)], 3)):
        ids, pos, meta = step_inputs(seqs, seed=seed)
        out = runner.execute(ids, pos, ForwardBatch(meta, runner.kv_caches))
        ref = ref_model(ids, pos, ForwardBatch(meta, ref_caches))
        assert rel_err(out, ref) < 2e-2, (seqs, rel_err(out, ref))


@torch.inference_mode()
def test_decode_graphs_replay_matches_eager():
    runner = make_runner()
    assert not runner.graphs_off
    ids, pos, meta = step_inputs([(90, 90), (33, 33), (150, 150), (5, 5), (64, 64)], seed=4)
    runner.execute(ids, pos, ForwardBatch(meta, runner.kv_caches))  # prefill: eager
    assert not runner.graphs.graphs
    runner.warmup()
    assert sorted(runner.graphs.graphs) == [1, 2, 4, 8]
    for n, seed in ((5, 5), (3, 6), (1, 7), (5, 8)):  # 5 and 3 pad to 8 and 4
        seqs = [(s + 1, 1) for s in (90, 33, 150, 5, 64)[:n]]
        ids, pos, meta = step_inputs(seqs, seed=seed)
        batch = ForwardBatch(meta, runner.kv_caches)
        before = [c.clone() for c in runner.kv_caches]
        eager = ModelRunner.execute(runner, ids, pos, batch).clone()
        after_eager = [c.clone() for c in runner.kv_caches]
        for c, b in zip(runner.kv_caches, before):
            c.copy_(b)
        graphed = runner.execute(ids, pos, batch)
        assert graphed.shape == eager.shape
        assert rel_err(graphed, eager) < 1e-2, (n, rel_err(graphed, eager))
        for c, e in zip(runner.kv_caches, after_eager):  # same KV written, padding wrote none
            assert rel_err(c, e) < 1e-2
            assert ((c != e).flatten(2).any(-1).sum() <= 2 * n)


@torch.inference_mode()
def test_graphs_skip_what_they_cannot_hold():
    runner = make_runner(sizes=(1, 2))
    ids, pos, meta = step_inputs([(10, 2)])  # not decode-only: eager, nothing captured
    runner.execute(ids, pos, ForwardBatch(meta, runner.kv_caches))
    graphs = runner.graphs
    assert graphs is not None and not graphs.graphs
    assert not graphs.can_run(ids, ForwardBatch(meta, runner.kv_caches))
    ids, pos, meta = step_inputs([(10, 1), (11, 1), (12, 1)])  # 3 rows > largest size 2
    assert not graphs.can_run(ids, ForwardBatch(meta, runner.kv_caches))
    ids, pos, meta = step_inputs([(300, 1)])  # longer than max_total_tokens (256)
    assert not graphs.can_run(ids, ForwardBatch(meta, runner.kv_caches))
    ids, pos, meta = step_inputs([(11, 1)])
    assert graphs.can_run(ids, ForwardBatch(meta, runner.kv_caches))
