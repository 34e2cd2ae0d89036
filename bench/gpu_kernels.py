"""GPU check and timing of genserve-cuda's kernels, in one run (for the device machine).

    python bench/gpu_kernels.py [--out DIR] [--skip-tests]

1. runs the GPU tests (tests/gpu) and the plugin tests with pytest;
2. times every kernel against the PyTorch path it replaces (triton.testing.do_bench,
   median ms) and reports its max abs error against the fp32 reference;
3. times a decode step of a small random Llama, eager vs CUDA graph.
Prints a short table last; the full log goes to DIR (default $OUT or bench/results).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import graph_ms, median_ms  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HBM_BYTES_PER_S = 3.0e12  # measured device-to-device copy on this workplace's H100 (KINDS.md)
ROWS: list[tuple] = []  # (group, case, graph ms, eager ms, baseline ms, max abs err, note)


def bench(fn) -> float:
    """Median ms of ``fn`` launched from Python (includes host launch overhead when it dominates)."""
    return median_ms(fn, rep=100)


def bench_graph(fn) -> float:
    """Median ms of ``fn``'s kernels replayed as one CUDA graph: device time, no launch gaps."""
    return graph_ms(fn, rep=100)


def record(group, case, ms, eager_ms, base_ms, err, note=""):
    ROWS.append((group, case, ms, eager_ms, base_ms, err, note))
    print(f"{group:10s} {case:34s} graph {ms:8.4f} ms  eager {eager_ms:8.4f} ms  base {base_ms:8.4f} ms  "
          f"x{base_ms / ms:6.2f}  err {err:.2e}  {note}", flush=True)


# -- attention --------------------------------------------------------------------------------
def attention_cases():
    from genserve.attention.base import AttentionSpec
    from genserve.attention.torch_ref import TorchAttention, TorchReferenceAttention
    from genserve_cuda.attention.triton_paged import TritonPagedAttention
    from genserve_cuda.testing import make_paged_batch

    H, HKV, D = 32, 8, 128  # Llama-3-8B's attention
    spec = AttentionSpec(H, D, HKV, D ** -0.5)
    cases = [
        ("decode b1 ctx4096", [(4096, 1)]),
        ("decode b1 ctx32768 (split-K)", [(32768, 1)]),
        ("decode b16 ctx2048", [(2048, 1)] * 16),
        ("decode b64 ctx1024", [(1024, 1)] * 64),
        ("decode b128 ctx512..4096", [(512 + 28 * i, 1) for i in range(128)]),
        ("prefill 1x4096", [(4096, 4096)]),
        ("prefill 8x512", [(512, 512)] * 8),
        ("chunked 2x(3072 ctx+1024)", [(4096, 1024)] * 2),
        ("mixed 1x(1536+512)+32 decodes", [(2048, 512)] + [(1024, 1)] * 32),
    ]
    for name, seqs in cases:
        b = make_paged_batch(seqs, H, HKV, D, 16, torch.bfloat16, "cuda")
        tri, tor, ref = TritonPagedAttention(spec), TorchAttention(spec), TorchReferenceAttention(spec)
        ref_out = ref.forward(b.q, b.k, b.v, b.kv_cache.clone(), b.meta)
        err = (tri.forward(b.q, b.k, b.v, b.kv_cache, b.meta).float() - ref_out.float()).abs().max().item()

        def run_tri():
            return tri.forward(b.q, b.k, b.v, b.kv_cache, b.meta)

        ms, eager = bench_graph(run_tri), bench(run_tri)
        base = bench(lambda: tor.forward(b.q, b.k, b.v, b.kv_cache, b.meta))
        kv_bytes = sum(s for s, _ in seqs) * HKV * D * 2 * 2
        if b.meta.is_decode_only:
            note = f"{kv_bytes / ms / 1e6:.0f} GB/s, floor {kv_bytes / HBM_BYTES_PER_S * 1e3:.4f} ms"
        else:
            # Causal (query, visible key) pairs; two matmuls of 2*D flops per pair and head.
            pairs = sum(q * (s - q) + q * (q + 1) / 2 for s, q in seqs)
            note = f"{4 * D * H * pairs / ms / 1e9:.0f} TFLOP/s"
        record("attention", name, ms, eager, base, err, note)
        torch.cuda.empty_cache()


def decode_split_sweep():
    """Decode tile/split variants (graph-timed, each checked against the reference)."""
    from genserve.attention.base import AttentionSpec
    from genserve.attention.torch_ref import TorchReferenceAttention
    from genserve_cuda.kernels.decode_attention import paged_decode_attention
    from genserve_cuda.testing import make_paged_batch

    spec = AttentionSpec(32, 128, 8, 128 ** -0.5)
    for seqs, label in (([(32768, 1)], "b1 ctx32768"), ([(2048, 1)] * 16, "b16 ctx2048"),
                        ([(1024, 1)] * 64, "b64 ctx1024"), ([(1024, 1)] * 128, "b128 ctx1024")):
        b = make_paged_batch(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda")
        m = b.meta
        TorchReferenceAttention(spec).forward(b.q, b.k, b.v, b.kv_cache, m)  # writes this step's KV
        # float8 cache (--kv-cache-dtype fp8): the same values rounded to e4m3; its reference is
        # the bf16 kernel on the upcast cache, so only the kernel's fp8 path differs
        caches = {"bf16": b.kv_cache, "fp8": b.kv_cache.to(torch.float8_e4m3fn)}
        refs = {"bf16": None, "fp8": None}
        base = None
        for kind, cache in caches.items():
            kv = sum(s for s, _ in seqs) * 8 * 128 * 2 * cache.element_size()
            upcast = cache.to(torch.bfloat16)
            refs[kind] = paged_decode_attention(b.q, upcast, m.block_tables, m.seq_lens, spec.scale,
                                                m.max_seqlen_k)
            for splits, bn, warps in ((None, 64, 4), (None, 32, 4), (None, 128, 4), (None, 64, 2),
                                      (None, 128, 8), (None, 256, 8), (8, 64, 4), (32, 64, 4)):
                def fn():
                    return paged_decode_attention(b.q, cache, m.block_tables, m.seq_lens, spec.scale,
                                                  m.max_seqlen_k, num_splits=splits, block_n=bn,
                                                  num_warps=warps)
                try:
                    err = (fn().float() - refs[kind].float()).abs().max().item()
                    ms = bench_graph(fn)
                except Exception as exc:  # e.g. out of shared memory: report, try the next
                    print(f"decode variant {kind} S={splits} N={bn} w={warps} failed: {exc!r}"[:300], flush=True)
                    continue
                base = base or ms
                record("sweep-dec", f"{label} {kind} S={splits or 'auto'} N={bn} w={warps}", ms, ms, base, err,
                       f"{kv / ms / 1e6:.0f} GB/s")


def prefill_config_sweep():
    from genserve.attention.base import AttentionSpec
    from genserve.attention.torch_ref import TorchReferenceAttention
    from genserve_cuda.kernels.prefill_attention import paged_prefill_attention
    from genserve_cuda.testing import make_paged_batch

    spec = AttentionSpec(32, 128, 8, 128 ** -0.5)
    for seqs, label in (([(4096, 4096)], "1x4096"), ([(4096, 1024)] * 2, "2x(3072+1024)")):
        b = make_paged_batch(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda")
        m = b.meta
        ref = TorchReferenceAttention(spec).forward(b.q, b.k, b.v, b.kv_cache, m)
        pairs = sum(q * (s - q) + q * (q + 1) / 2 for s, q in seqs)
        base = None
        for bm, bn, warps, stages in ((128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                                      (64, 64, 4, 3), (128, 32, 4, 2)):
            def fn():
                return paged_prefill_attention(b.q, b.kv_cache, m.block_tables, m.seq_lens, m.cu_seqlens_q,
                                               m.max_seqlen_q, spec.scale, block_m=bm, block_n=bn,
                                               num_warps=warps, num_stages=stages)
            try:
                err = (fn().float() - ref.float()).abs().max().item()
                ms = bench_graph(fn)
            except Exception as exc:
                print(f"prefill variant M={bm} N={bn} w={warps} s={stages} failed: {exc!r}"[:300], flush=True)
                continue
            base = base or ms
            record("sweep-pre", f"{label} M={bm} N={bn} w={warps} s={stages}", ms, ms, base, err,
                   f"{4 * 128 * 32 * pairs / ms / 1e9:.0f} TFLOP/s")
        torch.cuda.empty_cache()


# -- KV write and fused layers ----------------------------------------------------------------
def elementwise_cases():
    from genserve.attention.base import write_kv
    from genserve.layers.activation import GatedActivation
    from genserve.layers.norm import RMSNorm
    from genserve.layers.rotary import RotaryEmbedding
    from genserve_cuda.kernels.activation import silu_and_mul
    from genserve_cuda.kernels.kv_cache import write_kv_cache
    from genserve_cuda.kernels.rms_norm import rms_norm
    from genserve_cuda.kernels.rotary import rotary_embedding

    dev, bf = "cuda", torch.bfloat16
    for T in (4096, 64):
        # KV write: 4096 new tokens into a 64k-token cache.
        cache = torch.randn(2, 4096, 16, 8, 128, dtype=bf, device=dev)
        k, v = torch.randn(T, 8, 128, dtype=bf, device=dev), torch.randn(T, 8, 128, dtype=bf, device=dev)
        slots = torch.randperm(4096 * 16, device=dev)[:T]
        ref_cache = cache.clone()
        write_kv(k, v, ref_cache, slots)
        write_kv_cache(k, v, cache, slots)
        err = (cache.float() - ref_cache.float()).abs().max().item()
        fused = lambda: write_kv_cache(k, v, cache, slots)  # noqa: E731
        record("kv_write", f"T={T} Hkv=8 D=128", bench_graph(fused), bench(fused),
               bench_graph(lambda: write_kv(k, v, cache, slots)), err)

        x, r = torch.randn(T, 4096, dtype=bf, device=dev), torch.randn(T, 4096, dtype=bf, device=dev)
        norm = RMSNorm(4096, 1e-5, bf).to(dev)
        norm.weight.data.normal_(1, 0.1)
        exact = (x.float() + r.float())
        exact = exact * torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()
        err = (rms_norm(x, norm.weight, 1e-5, residual=r)[0].float() - exact).abs().max().item()
        fused = lambda: rms_norm(x, norm.weight, 1e-5, residual=r)  # noqa: E731
        record("rms_norm", f"+residual T={T} H=4096", bench_graph(fused), bench(fused),
               bench_graph(lambda: norm(x, r)), err, "err vs fp32 maths")

        inv = 1.0 / (500000 ** (torch.arange(0, 128, 2).float() / 128))
        rope = RotaryEmbedding(128, 128, 8192, inv).to(dev)
        qkv = torch.randn(T, 48 * 128, dtype=bf, device=dev)
        q, kk, _ = qkv.split([32 * 128, 8 * 128, 8 * 128], -1)
        q, kk = q.view(T, 32, 128), kk.view(T, 8, 128)
        pos = torch.randint(0, 8192, (T,), device=dev)
        eq, _ = rope(pos, q.float(), kk.float())
        err = (rotary_embedding(pos, q, kk, rope.cos, rope.sin, 128)[0].float() - eq).abs().max().item()
        fused = lambda: rotary_embedding(pos, q, kk, rope.cos, rope.sin, 128)  # noqa: E731
        record("rotary", f"T={T} 32q+8k heads D=128", bench_graph(fused), bench(fused),
               bench_graph(lambda: rope(pos, q, kk)), err, "err vs fp32 maths")

        gu = torch.randn(T, 2 * 14336, dtype=bf, device=dev)
        act = GatedActivation("silu")
        g32, u32 = gu.float().chunk(2, -1)
        err = (silu_and_mul(gu).float() - torch.nn.functional.silu(g32) * u32).abs().max().item()
        record("silu_mul", f"T={T} I=14336", bench_graph(lambda: silu_and_mul(gu)), bench(lambda: silu_and_mul(gu)),
               bench_graph(lambda: act(gu)), err, "err vs fp32 maths")
        torch.cuda.empty_cache()


# -- CUDA graphs ------------------------------------------------------------------------------
@torch.inference_mode()
def graph_cases():
    from transformers import LlamaConfig

    from genserve.backends.options import BackendOptions
    from genserve.engine.config import EngineConfig
    from genserve.engine.model_runner import ModelRunner
    from genserve.models.base import ForwardBatch, ModelContext, build_model
    from genserve.models.llama import LlamaForCausalLM
    from genserve_cuda.attention.triton_paged import TritonPagedAttention
    from genserve_cuda.backend import CudaBackend
    from genserve_cuda.testing import make_paged_batch

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    dev = torch.device("cuda")
    backend = CudaBackend(BackendOptions(graph_sizes="1,16,64"))
    ctx = ModelContext(dtype=torch.bfloat16, device=dev, attention_cls=TritonPagedAttention,
                       layer_ops=backend.layer_ops())
    model = build_model(LlamaForCausalLM, cfg, ctx)
    for name, p in model.named_parameters():
        p.data.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.02)
    runner = backend.create_model_runner(model, EngineConfig(dtype=torch.bfloat16, block_size=16,
                                                             max_total_tokens=1024))
    runner.allocate_kv_cache(64 * 64)
    t0 = time.perf_counter()
    runner.warmup()
    print(f"graph capture of 3 sizes: {time.perf_counter() - t0:.2f} s", flush=True)
    for bs in (1, 16, 64):
        b = make_paged_batch([(512, 1)] * bs, 16, 4, 128, 16, torch.bfloat16, dev)
        ids = torch.randint(0, 32000, (bs,), device=dev)
        pos = torch.full((bs,), 511, device=dev)
        batch = ForwardBatch(b.meta, runner.kv_caches)
        eager = ModelRunner.execute(runner, ids, pos, batch).clone()
        graphed = runner.execute(ids, pos, batch)
        err = (graphed.float() - eager.float()).abs().max().item()
        graphed_ms = bench(lambda: runner.execute(ids, pos, batch))
        record("graphs", f"decode step 8L h2048 bs={bs} ctx512", graphed_ms, graphed_ms,
               bench(lambda: ModelRunner.execute(runner, ids, pos, batch)), err, "runner replay vs eager")


def run_tests(out_dir: str) -> int:
    log = os.path.join(out_dir, "pytest.log")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu",
           "tests/test_backend_plugins.py"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(res.stdout + res.stderr)
    tail = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"pytest ({time.perf_counter() - t0:.0f} s): {tail}", flush=True)
    if res.returncode:
        print(res.stdout[-6000:], flush=True)
    return res.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--only", default="", help="comma list of: attention,sweep,elementwise,graphs")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    rc = 0 if args.skip_tests else run_tests(args.out)
    only = set(filter(None, args.only.split(","))) or {"attention", "sweep", "elementwise", "graphs"}
    torch.manual_seed(0)
    for name, fn in (("attention", attention_cases), ("sweep", decode_split_sweep), ("sweep", prefill_config_sweep),
                     ("elementwise", elementwise_cases), ("graphs", graph_cases)):
        if name in only:
            try:
                fn()
            except Exception as exc:  # one broken section must not hide the others' numbers
                import traceback

                traceback.print_exc()
                print(f"section {fn.__name__} failed: {exc}", flush=True)
                rc = rc or 1
    lines = ["graph = kernels replayed as a CUDA graph (device time); eager = launched from Python; "
             "base = PyTorch path (attention: TorchAttention eager, it can't be captured; "
             "elementwise: graph-timed)",
             f"{'group':10s} {'case':42s} {'graph ms':>9s} {'eager ms':>9s} {'base ms':>9s} {'speedup':>8s} "
             f"{'max err':>9s}  note"]
    for g, c, ms, eager, base, err, note in ROWS:
        lines.append(f"{g:10s} {c:42s} {ms:9.4f} {eager:9.4f} {base:9.4f} {base / ms:8.2f} {err:9.2e}  {note}")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return rc


if __name__ == "__main__":
    sys.exit(main())
