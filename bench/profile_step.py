"""Where a decode step's time goes: host vs device, overlapped vs waiting, top kernels.

Llama-3-8B shape, bf16, random weights, one GPU. For each batch size it runs the same decode
twice, with overlapped steps (the default on CUDA) and waiting for each step, and reports the
wall time per step against the device's busy time per step (the sum of kernel durations,
from the torch profiler), so "host-bound" and "device-bound" are measured, not guessed.

    python bench/profile_step.py [--batches 1,128] [--tokens 64] [--variant bf16|fp8|w4a16|...] [--tiny]

``--variant`` takes the weight variants of ``bench/gpu_llama8b.py`` (quantized dummy weights).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_llama8b import ENGINE_FLAGS, LLAMA3_8B, TINY, VARIANTS, random_prompt  # noqa: E402


def decode(engine, batch: int, prompt_len: int, new_tokens: int, rng, prof=None) -> tuple[float, int]:
    """(seconds per decode step after the prefill, decode steps) for ``batch`` requests;
    ``prof`` (a torch profiler) records the decode steps only: from the step after every request
    has its first token (so ``new_tokens`` must outlast the prefill chunks)."""
    from genserve.engine.offline import OfflineRequest, iter_steps
    from genserve.engine.sampling_params import SamplingParams

    requests = [OfflineRequest(random_prompt(rng, prompt_len, 1000),
                               SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for _ in range(batch)]
    first = None
    steps = 0
    started: set[str] = set()
    for outs in iter_steps(engine, requests):
        started.update(o.request_id for o in outs)
        # every request has its first token: the prefill chunks are over, only decodes remain
        if first is None and len(started) == batch:
            torch.cuda.synchronize()
            if prof is not None:
                prof.start()
            first, steps = time.perf_counter(), 0
            continue
        steps += 1
    torch.cuda.synchronize()
    if prof is not None:
        prof.stop()
    return (time.perf_counter() - first) / max(1, steps), steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--variant", default="bf16", choices=list(VARIANTS))
    ap.add_argument("--top", type=int, default=12, help="kernels listed per batch size")
    args = ap.parse_args()

    import random

    from transformers import LlamaConfig

    from genserve.args import defaults
    from genserve.engine.build import build_engine
    from genserve.engine.warmup import warm_up

    folder = tempfile.mkdtemp(prefix="genserve-prof-")
    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    _, quant = VARIANTS[args.variant]
    if quant and not quant.get("online"):
        config.quantization_config = quant
    config.save_pretrained(folder)
    engine = build_engine(defaults(model_id=folder, load_format="dummy", backend="cuda", dtype="bfloat16",
                                   max_batch_prefill_tokens=8192, max_batch_size=256,
                                   cuda_memory_fraction=0.9, quantize=quant and quant["quant_method"],
                                   **ENGINE_FLAGS.get(args.variant, {}))).engine
    warm_up(engine, config.vocab_size)  # as the server does before serving (graphs, kernel variants)
    print(f"variant {args.variant}", flush=True)
    rng = random.Random(0)
    decode(engine, 1, 16, 8, rng)  # warm-up
    print(f"{'batch':>5} {'mode':>8} {'wall ms/step':>13} {'device ms/step':>15} {'host-bound?':>12}")
    for batch in [int(b) for b in args.batches.split(",")]:
        for overlap in (True, False):
            engine.overlap = overlap
            wall, _ = decode(engine, batch, args.prompt, args.tokens, rng)
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            _, steps = decode(engine, batch, args.prompt, args.tokens, rng, prof)
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy_us = sum(e.self_device_time_total for e in events)
            per_step = busy_us / 1e3 / steps
            mode = "overlap" if overlap else "wait"
            print(f"{batch:5d} {mode:>8} {wall * 1e3:13.2f} {per_step:15.2f} "
                  f"{'yes' if wall * 1e3 > 1.1 * per_step else 'no':>12}", flush=True)
            if overlap:
                top = sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]
                for e in top:
                    print(f"      {e.self_device_time_total / 1e3 / steps:8.3f} ms/step "
                          f"{e.count / steps:6.1f}x  {e.key[:90]}")
    engine.overlap = True


if __name__ == "__main__":
    main()
