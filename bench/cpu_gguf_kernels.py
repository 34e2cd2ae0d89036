"""Microseconds per matmul at one row on SmolLM2-135M's shapes, the candidates for GGUF on the CPU:
dense fp32 and bf16 ``F.linear``; ``cpu_int4pack`` (torch's ``_weight_int4pack_mm_for_cpu``) per
GGUF format class, through the kernel class (activation casts and the 8-bit split's expansion
included); ``_weight_int8pack_mm`` (per-channel scales: not exact for GGUF's groups, shown for
speed); ``_dyn_quant_matmul_4bit`` (int8 activations, KleidiAI on Arm). Each figure: the
second-fastest of 7 timed loops. Used by docs/benchmarks.md ("GGUF served packed").

    python bench/cpu_gguf_kernels.py
"""

import os
import time

import torch
from genserve.layers.quantization.cpu_kernels import CpuInt4PackKernel
from genserve.layers.quantization.kernels import WNA16Config, WNA16Weights
from torch import nn

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
          "lm_head": (576, 49152)}
# label -> (bits, group, float offsets) of the canonical form (layers/quantization/gguf.py)
FORMATS = {"int4_g32 (Q4_0/Q4_1/Q4_K)": (4, 32, True), "8bit_g32 (Q5_*/Q8_0)": (8, 32, True),
           "8bit_g16 (Q6_K)": (8, 16, False)}
ops = torch.ops.aten


def timed(fn, *args, reps: int) -> float:
    """Second-fastest of 7 loops of ``reps`` calls, in microseconds per call."""
    for _ in range(3):
        fn(*args)
    loops = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        loops.append((time.perf_counter() - t0) / reps * 1e6)
    return sorted(loops)[1]


def packed(k: int, n: int, bits: int, group: int, offsets: bool):
    config = WNA16Config(bits, group, False, False, k, n, torch.float32, has_offsets=offsets,
                         compute_dtype=torch.bfloat16)
    layer, kernel = nn.Module(), CpuInt4PackKernel(config)
    q = torch.randint(0, 2 ** bits, (k, n), dtype=torch.uint8)
    s = torch.rand(k // group, n) * 0.01
    kernel.process_weights(layer, WNA16Weights(q, s, None, None, s.clone() if offsets else None))
    return lambda x: kernel.apply(layer, x, None)


def dyn_quant_4bit(k: int, n: int):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    weight = ops._dyn_quant_pack_4bit_weight((q[:, ::2] | (q[:, 1::2] << 4)).contiguous(),
                                             torch.rand(n, k // 32), None, 32, k, n)
    return lambda x: ops._dyn_quant_matmul_4bit(x, weight, 32, k, n)


def row(name: str, k: int, n: int) -> dict[str, float]:
    reps = 10 if name == "lm_head" else 100
    x, w = torch.randn(1, k), torch.randn(n, k) * 0.05
    res = {"fp32": timed(torch.nn.functional.linear, x, w, reps=reps),
           "bf16": timed(torch.nn.functional.linear, x.bfloat16(), w.bfloat16(), reps=reps)}
    for label, fmt in FORMATS.items():
        res[label] = timed(packed(k, n, *fmt), x, reps=reps)
    w8, s8 = torch.randint(-128, 127, (n, k), dtype=torch.int8), torch.rand(n).bfloat16()
    res["int8pack_bf16 (per-channel, not GGUF-exact)"] = timed(ops._weight_int8pack_mm, x.bfloat16(), w8, s8,
                                                              reps=reps)
    res["dyn_quant_matmul_4bit"] = timed(dyn_quant_4bit(k, n), x, reps=max(2, reps // 10))
    return res


def main():
    print("torch", torch.__version__, "threads", torch.get_num_threads(), "load", os.getloadavg())
    for name, (k, n) in SHAPES.items():
        res = row(name, k, n)
        print(f"{name:8s} K={k:5d} N={n:6d} " + "  ".join(f"{a}={b:.1f}" for a, b in res.items()), flush=True)
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()
