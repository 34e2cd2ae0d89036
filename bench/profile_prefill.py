"""Where a prefill step's time goes (Llama-3-8B shape, bf16, random weights, one GPU).

Runs the prefill figure's workload (``--prompts`` prompts of ``--len`` tokens, one output token
each) once to warm up, then under the torch profiler, and prints wall vs device-busy time per
step and the kernels that take the device's time, largest first.

    python bench/profile_prefill.py [--prompts 8] [--len 4096] [--chunk 8192]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_llama8b import LLAMA3_8B, STEPS, build_genserve, random_prompt, run_requests  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--len", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    from transformers import LlamaConfig

    folder = tempfile.mkdtemp(prefix="genserve-prof-")
    LlamaConfig(**LLAMA3_8B).save_pretrained(folder)
    engine = build_genserve(folder, argparse.Namespace(backend="cuda", prefill_chunk=args.chunk,
                                                       max_batch_size=512, cuda_graphs="1,2,4,8"))
    rng = random.Random(0)

    def workload():
        return run_requests(engine, [random_prompt(rng, args.len, 128256) for _ in range(args.prompts)],
                            [1] * args.prompts)[0]

    workload()  # warm-up: first-call costs (cuBLAS heuristics, Triton specialisations)
    wall = workload()
    steps = STEPS["steps"]
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    with prof:
        workload()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in events) / 1e3 / steps
    tokens = args.prompts * args.len
    print(f"{args.prompts}x{args.len}, chunk {args.chunk}: {tokens / wall:,.0f} tok/s, {steps} steps, "
          f"wall {wall / steps * 1e3:.2f} ms/step, device busy {busy:.2f} ms/step", flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
        ms = e.self_device_time_total / 1e3 / steps
        print(f"  {ms:8.3f} ms/step {100 * ms / busy:5.1f}%  {e.count / steps:6.1f}x  {e.key[:100]}")


if __name__ == "__main__":
    main()
