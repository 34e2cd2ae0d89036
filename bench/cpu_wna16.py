"""CPU mixed-precision linear kernels: time per matmul of SmolLM2- and Llama-shaped layers.

Each layer is quantized in-process (4-bit group 64 asymmetric (SmolLM2's 576 features are not a multiple of 128), GPTQ-style round-to-nearest; 8-bit
per-channel for ``cpu_int8pack``), loaded through the GPTQ format and run by each CPU kernel
against the dense matmul of the same dtype, at batch 1 and 16.

    python bench/cpu_wna16.py [--json bench/results/cpu-wna16.jsonl] [--repeat 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import torch

SHAPES = {  # name: (in_features K, out_features N)
    "smollm2_gate_up": (576, 3072),
    "smollm2_down": (1536, 576),
    "llama8b_qkv": (4096, 6144),
    "llama8b_down": (14336, 4096),
}


def gptq_layer(k, n, bits, group, dtype, kernel):
    from genserve.layers.linear import RowParallelLinear
    from genserve.layers.quantization.base import LinearKernelChooser
    from genserve.layers.quantization.cpu_kernels import (
        CpuInt4PackKernel,
        CpuInt8PackKernel,
    )
    from genserve.layers.quantization.gptq import GPTQConfig
    from genserve.layers.quantization.kernels import TorchWNA16Kernel
    from genserve.layers.quantization.wna16 import pack_int32

    kernels = {c.name: c for c in (TorchWNA16Kernel, CpuInt4PackKernel, CpuInt8PackKernel)}
    cfg = GPTQConfig.from_config({"bits": bits, "group_size": group, "sym": False, "checkpoint_format": "gptq_v2"},
                                 LinearKernelChooser(torch.device("cpu"), (kernel,), kernels))
    layer = RowParallelLinear(k, n, False, dtype, cfg, prefix="bench")
    gs = k if group == -1 else group
    q = torch.randint(0, 2 ** bits, (k, n))
    z = torch.randint(0, 2 ** bits, (k // gs, n))
    tensors = {"qweight": pack_int32(q, bits, 0), "qzeros": pack_int32(z, bits, 1),
               "scales": torch.rand(k // gs, n) * 0.01}
    for name, t in tensors.items():
        getattr(layer, name).weight_loader(getattr(layer, name), t)
    layer.quant.process_after_loading(layer)
    return layer


def timed(fn, x, repeat):
    """Fastest of ``repeat`` calls, in ms: the CPU is shared with other jobs, and the minimum is
    the figure least disturbed by them."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for shape in args.shapes.split(","):
        k, n = SHAPES[shape]
        for dtype in (torch.float32, torch.bfloat16):
            dense = torch.randn(n, k, dtype=dtype) * 0.02
            variants = {"dense": lambda x, w=dense: torch.nn.functional.linear(x, w)}
            for kernel, bits, group in (("torch_wna16", 4, 64), ("cpu_int4pack", 4, 64), ("cpu_int8pack", 8, -1)):
                variants[f"{kernel}_w{bits}g{group}"] = gptq_layer(k, n, bits, group, dtype, kernel)
            for batch in (1, 16):
                x = torch.randn(batch, k, dtype=dtype)
                for name, fn in variants.items():
                    ms = timed(fn, x, args.repeat)
                    row = {"metric": f"linear_{shape}_b{batch}_ms", "value": round(ms, 4), "unit": "ms", "stat": "min",
                           "kernel": name, "dtype": str(dtype).removeprefix("torch."), "K": k, "N": n,
                           "device": "cpu", "threads": torch.get_num_threads(), "commit": commit,
                           "date": time.strftime("%Y-%m-%d")}
                    print(f"{shape:18s} {row['dtype']:9s} b{batch:<3d} {name:24s} {ms:8.3f} ms", flush=True)
                    if args.json:  # row by row: a long run that is stopped keeps what it measured
                        with open(args.json, "a") as f:
                            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
