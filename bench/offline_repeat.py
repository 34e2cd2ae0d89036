"""Is the offline figure stable within one process? Runs the offline workload of
gpu_llama8b.py several times on one engine (optionally after a long decode run), printing
tok/s and steps each time, and where the host's time went: waiting for the device (in
``LaunchedStep.results``) vs scheduling, launching and reading outputs. A run whose wait is a
small share of its wall time is host-bound.

    python bench/offline_repeat.py [--decode-first] [--repeats N]"""

import argparse
import gc
import os
import random
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_llama8b as b  # noqa: E402


HOST = Counter()  # seconds per phase of the engine's step, summed over a run
STUCK = Counter()  # stacks of launches that took over 100 ms
SLOW_LAUNCHES: list[tuple[float, int, int, int]] = []  # (seconds, sequences, tokens, device mallocs)
LAUNCH_STARTS: list[tuple[float, int, int]] = []  # (perf_counter at launch, sequences, tokens)


def time_phases(engine):
    """Wrap the step's phases with timers (a few microseconds per step)."""
    from genserve.engine import model_runner

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                HOST[label] += time.perf_counter() - t0
        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    launch = engine.runner.launch

    def device_mallocs() -> int:
        import torch
        return torch.cuda.memory_stats().get("num_device_alloc", 0) if torch.cuda.is_available() else 0

    import threading
    import traceback

    main = threading.get_ident()

    def sample_stack():  # where a launch that takes > 100 ms is stuck
        frame = sys._current_frames().get(main)
        if frame is not None:
            STUCK[" | ".join(line.strip().splitlines()[0] for line in traceback.format_stack(frame)[-7:])] += 1

    def timed_launch(scheduled):
        before = device_mallocs()
        watchdog = threading.Timer(0.1, sample_stack)
        watchdog.start()
        t0 = time.perf_counter()
        LAUNCH_STARTS.append((t0, len(scheduled), sum(s.num_tokens for s in scheduled)))
        try:
            return launch(scheduled)
        finally:
            watchdog.cancel()
            took = time.perf_counter() - t0
            HOST["launch (prepare + enqueue)"] += took
            SLOW_LAUNCHES.append((took, len(scheduled), sum(s.num_tokens for s in scheduled),
                                  device_mallocs() - before))

    engine.runner.launch = timed_launch
    engine._complete = timed("complete (wait + outputs)", engine._complete)
    model_runner.LaunchedStep.results = timed("  of which wait for device", model_runner.LaunchedStep.results)


def allocator_stats(when: str) -> None:
    """Device allocations that the caching allocator could not serve from its cache: each
    cudaMalloc/cudaFree waits for the device, which undoes overlapped steps."""
    import torch

    if torch.cuda.is_available():
        st = torch.cuda.memory_stats()
        keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
        print(f"  allocator {when}: " + ", ".join(f"{k} {st.get(k, 0)}" for k in keys), flush=True)
        host_stats = getattr(torch.cuda, "host_memory_stats", None)
        if host_stats is not None:
            hs = host_stats()
            print(f"  pinned host allocator {when}: " + ", ".join(
                f"{k} {hs.get(k, 0)}" for k in ("num_host_alloc", "num_host_free", "host_alloc_time.total")), flush=True)
    print(f"  triton variants {when}: {triton_variants()}", flush=True)


def triton_variants() -> dict[str, int]:
    """Compiled variants of each genserve-cuda Triton kernel: one that grows during a run
    compiled in the middle of serving (seconds each)."""
    import importlib
    import pkgutil

    try:
        import genserve_cuda.kernels as kernels
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    counts = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"genserve_cuda.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction):
                n = sum(len(cache[0]) for cache in obj.device_caches.values())
                if n:
                    counts[name] = n
    return counts


def step_histogram() -> None:
    """Where the run's wall time went by batch size: the time from one launch to the next,
    summed per bucket of scheduled sequences (the long-output tail shows as many small steps)."""
    buckets = (1, 16, 64, 128, 256, 384, 10 ** 9)
    agg: dict[int, list[float]] = {}
    for (t0, seqs, tokens), (t1, _, _) in zip(LAUNCH_STARTS, LAUNCH_STARTS[1:]):
        lo = max(b for b in buckets if b <= max(seqs, 1))
        row = agg.setdefault(lo, [0, 0.0, 0])
        row[0] += 1
        row[1] += t1 - t0
        row[2] += tokens
    total = sum(r[1] for r in agg.values()) or 1.0
    print("    sequences/step  steps   wall s  share  ms/step  tokens scheduled")
    for lo in sorted(agg):
        n, sec, tok = agg[lo]
        print(f"    >= {lo:<12d} {n:6d} {sec:8.2f} {100 * sec / total:5.1f}% {sec / n * 1e3:8.2f} {tok:9d}")


def offline(engine, vocab, n=1000):
    HOST.clear()
    SLOW_LAUNCHES.clear()
    LAUNCH_STARTS.clear()
    prompts, lens_out = b.offline_workload(vocab, n)
    wall, produced, _, _ = b.run_requests(engine, prompts, lens_out)
    steps = b.STEPS["steps"]
    for label, sec in HOST.most_common():
        print(f"    {label:28s} {sec:6.2f} s  {sec / steps * 1e3:6.2f} ms/step", flush=True)
    print(f"    {'wall':28s} {wall:6.2f} s  {wall / steps * 1e3:6.2f} ms/step", flush=True)
    step_histogram()
    allocator_stats("after offline")
    for stack, count in STUCK.most_common(3):
        print(f"  stuck launch x{count}: {stack}", flush=True)
    STUCK.clear()
    slow = sorted(SLOW_LAUNCHES, reverse=True)[:8]
    print("  slowest launches (ms, seqs, tokens, device mallocs): "
          + ", ".join(f"({t * 1e3:.0f}, {n}, {k}, {m})" for t, n, k, m in slow))
    return produced / wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-first", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=512)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--cuda-graphs", default="1,2,4,8,16,32,64,128,192,256,320,384,448,512")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: check the script runs")
    args = ap.parse_args()
    from transformers import LlamaConfig
    folder = tempfile.mkdtemp()
    LlamaConfig(**(b.TINY if args.tiny else b.LLAMA3_8B)).save_pretrained(folder)
    ns = argparse.Namespace(backend="cpu" if args.tiny else "cuda", prefill_chunk=args.prefill_chunk,
                            max_batch_size=args.max_batch_size, cuda_graphs=None if args.tiny else args.cuda_graphs)
    print(f"max batch {args.max_batch_size}, prefill chunk {args.prefill_chunk}", flush=True)
    engine = b.build_genserve(folder, ns)
    time_phases(engine)
    gc.collect()
    gc.freeze()  # as the server and gpu_llama8b.py do after loading
    allocator_stats("after load")
    vocab = 128256 if not args.tiny else b.TINY["vocab_size"]
    if args.decode_first:
        t0 = time.perf_counter()
        rng = random.Random(1)
        n = 8 if args.tiny else 128
        b.run_requests(engine, [b.random_prompt(rng, 32, vocab) for _ in range(n)], [2048 // 16 if args.tiny else 2048] * n)
        print(f"decode 128x2048 took {time.perf_counter() - t0:.1f}s", flush=True)
        allocator_stats("after decode")
    for i in range(args.repeats):
        tok_s = offline(engine, vocab, args.requests)
        print(f"offline run {i}: {tok_s:8.1f} tok/s, steps {b.STEPS}, "
              f"preemptions {engine.scheduler.num_preemptions}", flush=True)


if __name__ == "__main__":
    main()
