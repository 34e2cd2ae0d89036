"""Prefill attention implementations side by side on the GPU (Llama-3-8B heads: 32 q, 8 kv, d 128).

    python bench/prefill_attention.py

For each batch of fresh causal prompts it times (CUDA graph replay, median ms) genserve's
paged Triton kernel, its fresh-prompt variant (K/V read from the step's rows) in a few tile
configurations, and what torch ships: ``varlen_attn`` (FlashAttention-2 inside torch) and
``scaled_dot_product_attention`` per sequence with the cuDNN and flash backends. Each output is
checked against fp32 maths; TFLOP/s counts the causal (query, key) pairs, 4*D flops per pair.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

H, HKV, D = 32, 8, 128


def bench_graph(fn) -> float:
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:  # not capturable: time it eagerly (launch gaps included)
        print(f"  (eager timing: {exc!r})"[:160])
        torch.cuda.synchronize()
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    return do_bench(graph.replay, warmup=25, rep=200, return_mode="median")


def reference(q, k, v, lens):
    outs, at = [], 0
    for n in lens:
        qi, ki, vi = (t[at:at + n].transpose(0, 1).float() for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True).transpose(0, 1))
        at += n
    return torch.cat(outs)


def per_sequence_sdpa(q, k, v, lens, backend):
    from torch.nn.attention import sdpa_kernel

    def fn():
        outs, at = [], 0
        with sdpa_kernel(backend):
            for n in lens:
                qi, ki, vi = (t[at:at + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True,
                                                           enable_gqa=True)[0].transpose(0, 1))
                at += n
        return torch.cat(outs)
    return fn


def candidates(q, k, v, meta, kv_cache, lens):
    from genserve_cuda.kernels.prefill_attention import fresh_prefill_attention, paged_prefill_attention

    scale = D ** -0.5
    m = meta
    yield "triton paged (default)", lambda: paged_prefill_attention(
        q, kv_cache, m.block_tables, m.seq_lens, m.cu_seqlens_q, m.max_seqlen_q, scale)
    for bm, bn, w, s in ((128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 5), (128, 32, 8, 4), (128, 64, 4, 4),
                         (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (128, 128, 8, 3)):
        yield f"triton fresh M{bm} N{bn} w{w} s{s}", (
            lambda bm=bm, bn=bn, w=w, s=s: fresh_prefill_attention(
                q, k, v, m.seq_lens, m.cu_seqlens_q, m.max_seqlen_q, scale,
                block_m=bm, block_n=bn, num_warps=w, num_stages=s))
    try:
        from torch.nn.attention.varlen import varlen_attn
        cu = m.cu_seqlens_q
        yield "torch varlen_attn (FA2)", lambda: varlen_attn(q, k, v, cu, cu, m.max_seqlen_q, m.max_seqlen_q,
                                                             is_causal=True)
    except ImportError as exc:
        print("varlen_attn unavailable:", exc)
    from torch.nn.attention import SDPBackend
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        yield f"sdpa {name} per sequence", per_sequence_sdpa(q, k, v, lens, backend)


def cudnn_first_calls():
    """cuDNN builds an execution plan per new shape: what does a first call at a new prompt
    length cost, against a repeat?"""
    import time

    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("\ncuDNN first call vs repeat at new prompt lengths")
    for n in (2048, 2061, 2300, 3001, 4096, 5555):
        q = torch.randn(1, H, n, D, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(1, HKV, n, D, dtype=torch.bfloat16, device="cuda")
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"  length {n}: " + ", ".join(f"{t:.2f}" for t in times) + " ms", flush=True)


def main() -> int:
    from genserve_cuda.testing import make_paged_batch

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}")
    only_first_calls = "--first-calls" in sys.argv
    for lens in [] if only_first_calls else ([4096, 4096], [1024], [512] * 16, [300, 1500, 77, 2200]):
        b = make_paged_batch([(n, n) for n in lens], H, HKV, D, 16, torch.bfloat16, "cuda")
        ref = reference(b.q, b.k, b.v, lens)
        pairs = sum(n * (n + 1) / 2 for n in lens)
        # The paged kernel reads the cache: fill it with this step's K/V as the runner does.
        from genserve_cuda.kernels.kv_cache import write_kv_cache
        write_kv_cache(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
        print(f"\nprompts {lens}")
        for name, fn in candidates(b.q, b.k, b.v, b.meta, b.kv_cache, lens):
            try:
                err = (fn().float() - ref).abs().max().item()
                ms = bench_graph(fn)
            except Exception as exc:  # a backend that refuses this shape: report and go on
                print(f"  {name:32s} failed: {exc!r}"[:240], flush=True)
                continue
            print(f"  {name:32s} {ms:8.3f} ms  {4 * D * H * pairs / ms / 1e9:6.0f} TFLOP/s  err {err:.1e}",
                  flush=True)
        del b
        torch.cuda.empty_cache()
    if only_first_calls:
        cudnn_first_calls()
    return 0


if __name__ == "__main__":
    sys.exit(main())
